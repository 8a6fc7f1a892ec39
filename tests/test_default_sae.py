"""sae_quality against hand computations on a tiny model, and the shipped default SAE on the default model."""

from __future__ import annotations

import sys

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformer_lens import HookedTransformer

from tl_steer.analysis.sae_quality import sae_quality
from tl_steer.errors import DataError, HookNameError, MissingDependencyError

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "hello world, the weather is fine today.",
    "I went to the market and bought fresh bread.",
    "The film was wonderful.",
    "The food was awful and the room was cold and dirty, and the staff were rude.",
    "tea",
]


def make_sae(d_in: int, d_sae: int, *, seed: int = 0) -> StandardSAE:
    """A random float64 sae-lens SAE on HOOK, with a non-zero encoder bias and decoder bias."""
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float64"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64) / d_sae**0.5)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen, dtype=torch.float64))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen, dtype=torch.float64))
    sae.cfg.metadata.hook_name = HOOK
    return sae


def identity_sae(d_in: int) -> StandardSAE:
    """relu(x) - relu(-x) = x: latents [x, -x] through ReLU, decoded by [I; -I], reconstruct x exactly."""
    sae = make_sae(d_in, 2 * d_in)
    eye = torch.eye(d_in, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@torch.no_grad()
def hand_quality(model: HookedTransformer, sae: StandardSAE, texts: list[str]) -> dict[str, float]:
    """One text at a time, with the SAE's maths written out: every position but the first (BOS) scored."""
    W_enc, b_enc, W_dec, b_dec = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    n = active = sq_err = 0.0
    xs = []
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_pred = 0
    for text in texts:
        tokens = model.to_tokens(text, prepend_bos=True)
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        x = cache[HOOK][0]
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = f @ W_dec + b_dec
        xs.append(x[1:])
        n += x.shape[0] - 1
        active += float((f[1:] != 0).sum())
        sq_err += float(((x[1:] - x_hat[1:]) ** 2).sum())
        for name, value in (("clean", x), ("sae", x_hat), ("zero", torch.zeros_like(x))):
            replacement = torch.cat([x[:1], value[1:]])
            logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook, r=replacement: r[None])])
            logprobs = torch.log_softmax(logits[0, 1:-1], dim=-1)
            ce[name] -= float(logprobs.gather(-1, tokens[0, 2:, None]).sum())
        n_pred += tokens.shape[1] - 2
    all_x = torch.cat(xs)
    total_var = float(((all_x - all_x.mean(0)) ** 2).sum())
    clean, with_sae, zero = (ce[k] / n_pred for k in ("clean", "sae", "zero"))
    return {
        "n_tokens": n,
        "l0": active / n,
        "explained_variance": 1 - sq_err / total_var,
        "ce_clean": clean,
        "ce_with_sae": with_sae,
        "ce_zero_ablation": zero,
        "ce_loss_recovered": (zero - with_sae) / (zero - clean),
    }


def test_matches_hand_computation_batched_with_padding(tiny_any: HookedTransformer) -> None:
    tiny = tiny_any
    sae = make_sae(tiny.cfg.d_model, 48)
    got = sae_quality(tiny, sae, TEXTS, batch_size=2, skip_first=1).as_dict()
    want = hand_quality(tiny, sae, TEXTS)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert got["hook_name"] == HOOK
    assert 0 < got["l0"] < 48


def test_identity_sae_recovers_everything(tiny: HookedTransformer) -> None:
    q = sae_quality(tiny, identity_sae(tiny.cfg.d_model), TEXTS)
    assert q.explained_variance == pytest.approx(1.0, abs=1e-12)
    assert q.ce_with_sae == pytest.approx(q.ce_clean, abs=1e-12)
    assert q.ce_loss_recovered == pytest.approx(1.0, abs=1e-9)
    # Exactly one of each pair (x_i, -x_i) passes the ReLU for every non-zero coordinate.
    assert q.l0 == pytest.approx(tiny.cfg.d_model)


def test_zero_decoder_recovers_nothing(tiny: HookedTransformer) -> None:
    sae = make_sae(tiny.cfg.d_model, 48)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    q = sae_quality(tiny, sae, TEXTS)
    assert q.ce_with_sae == pytest.approx(q.ce_zero_ablation, abs=1e-12)
    assert q.ce_loss_recovered == pytest.approx(0.0, abs=1e-9)
    assert q.ce_zero_ablation > q.ce_clean
    # x_hat = 0, so EV = 1 - sum ||x||^2 / sum ||x - mean x||^2 over the scored positions.
    xs = torch.cat([tiny.run_with_cache(t, names_filter=HOOK, prepend_bos=True)[1][HOOK][0, 1:] for t in TEXTS])
    expected = 1 - float((xs**2).sum()) / float(((xs - xs.mean(0)) ** 2).sum())
    assert q.explained_variance == pytest.approx(expected, rel=1e-9)


def test_token_input_skips_leading_positions_and_excluded_tokens(tiny: HookedTransformer) -> None:
    sae = make_sae(tiny.cfg.d_model, 48)
    tokens = torch.cat([tiny.to_tokens(t, prepend_bos=True)[:, :8] for t in TEXTS[:3]])
    bos = tiny.tokenizer.bos_token_id
    tokens[1, 4] = bos  # a separator in the middle of a row: excluded like the leading BOS
    q = sae_quality(tiny, sae, tokens, skip_first=2, exclude_token_ids=[bos])
    assert q.n_tokens == 3 * (8 - 2) - 1
    # Predictions are made at scored positions; the last position of a row has no target.
    assert q.n_predictions == 3 * (8 - 2 - 1) - 1
    assert sae_quality(tiny, sae, tokens, skip_first=0, exclude_token_ids=[]).n_tokens == 24


def test_bad_input_is_rejected(tiny: HookedTransformer) -> None:
    sae = make_sae(tiny.cfg.d_model, 48)
    with pytest.raises(DataError):
        sae_quality(tiny, sae, [])
    with pytest.raises(DataError):
        sae_quality(tiny, sae, ["hello"], skip_first=50)
    with pytest.raises(HookNameError):
        sae_quality(tiny, sae, TEXTS, hook_name="blocks.1.hook_resid_pots")


def test_load_default_sae_errors_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import tl_steer.default_sae as default_sae

    monkeypatch.setattr(default_sae, "default_sae_path", lambda: tmp_path)
    with pytest.raises(MissingDependencyError, match="missing"):
        default_sae.load_default_sae()
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # what an uninstalled package looks like to import
    with pytest.raises(MissingDependencyError, match="pip install sae-lens"):
        default_sae.load_default_sae()


# Everyday sentences written for this test, in none of the training corpus' sources.
HELD_OUT = [
    "My grandmother keeps a jar of buttons on the kitchen shelf, and we sort them by colour on rainy days.",
    "The bus was twenty minutes late again, so I walked to work and arrived soaked but oddly cheerful.",
    "Our team lost the final by a single goal, but the crowd sang all the way home.",
    "Please find attached the signed contract; let me know if any clause needs clarification.",
    "The soup was cold, the bread was stale, and the waiter ignored us for half an hour.",
    "Honestly, this little speaker sounds way better than it has any right to at that price.",
    "Bees communicate the direction of flowers to each other through a waggle dance inside the hive.",
    "After the storm, the villagers gathered on the beach to collect driftwood and share hot tea.",
]


# Measured on these sentences when the SAE was trained: explained variance 0.749, CE loss recovered 0.968.
EV_BOUND = 0.70
CE_RECOVERED_BOUND = 0.90


@pytest.mark.default_model
def test_shipped_sae_fits_the_default_model(default_model: HookedTransformer) -> None:
    from tl_steer.default_sae import DEFAULT_SAE_HOOK, default_sae_path, load_default_sae

    sae = load_default_sae()
    assert sae.cfg.metadata.hook_name == DEFAULT_SAE_HOOK
    assert DEFAULT_SAE_HOOK in default_model.hook_dict
    assert sae.cfg.d_in == default_model.cfg.d_model
    assert sae.dtype == torch.float32
    assert (default_sae_path() / "sae_weights.safetensors").stat().st_size < 12 * 2**20
    q = sae_quality(default_model, sae, HELD_OUT, batch_size=8)
    assert q.l0 <= 64
    assert q.explained_variance > EV_BOUND
    assert q.ce_loss_recovered > CE_RECOVERED_BOUND
