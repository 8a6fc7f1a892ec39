"""SAE feature steering (add / clamp / ablate) and feature ranking, on tiny models and tiny sae-lens SAEs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_bridge, make_model, no_hooks_left
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from test_split import HELD_OUT, PAIRS

import tl_steer
from tl_steer.errors import ConfigError, HookNameError, ShapeError
from tl_steer.methods.sae import concept_tokens, output_scores, rank_features, sae_feature

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
TEXT = "The film was wonderful and the staff were kind."


def make_sae(d_in: int = 32, d_sae: int = 64, hook: str = HOOK, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float64", metadata=SAEMetadata(hook_name=hook))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = StandardSAE(cfg)
    with torch.no_grad():  # a random encoder with biases that leave about half the features active
        sae.W_enc.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def model(request):
    return make_model("llama") if request.param == "hooked" else make_bridge("llama")


@pytest.fixture(scope="module")
def sae():
    return make_sae()


def resid(model, text: str, fwd_hooks=()) -> torch.Tensor:
    """The activation at HOOK after any fwd_hooks ran."""
    out = []
    hooks = [*fwd_hooks, (HOOK, lambda a, hook: out.append(a.detach().clone()))]
    model.run_with_hooks(text, fwd_hooks=hooks, return_type=None)
    return out[0]


def test_add_equals_a_decoder_row_vector(tiny_any, sae) -> None:
    model = tiny_any
    iv = sae_feature(sae, [3, 7], "add", [2.0, -1.0])
    expected = tl_steer.AddVector(HOOK, 2.0 * sae.W_dec[3].detach() - sae.W_dec[7].detach())
    got = model.run_with_hooks(TEXT, fwd_hooks=iv.hooks(m=1.5))
    want = model.run_with_hooks(TEXT, fwd_hooks=expected.hooks(m=1.5))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_clamp_is_sae_lens_decode_with_error_term(tiny_any, sae) -> None:
    """The steered activation equals sae-lens' own forward with the error term added back, the feature set
    through its hook_sae_acts_post (an independent path), for m = 1; m scales the change."""
    model = tiny_any
    clean = resid(model, TEXT)
    iv = sae_feature(sae, 5, "clamp", 3.0)
    steered = resid(model, TEXT, iv.hooks(m=1.0))

    def set_feature(acts, hook):
        acts = acts.clone()
        acts[..., 5] = 3.0
        return acts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae.use_error_term = True
    try:
        want = sae.run_with_hooks(clean, fwd_hooks=[("hook_sae_acts_post", set_feature)])
    finally:
        sae.use_error_term = False
    torch.testing.assert_close(steered, want.detach(), rtol=0, atol=1e-10)
    half = resid(model, TEXT, iv.hooks(m=0.5))
    torch.testing.assert_close(half - clean, 0.5 * (steered - clean), rtol=0, atol=1e-10)


def test_ablate_removes_the_feature_and_m0_is_clean(tiny_any, sae) -> None:
    model = tiny_any
    clean = resid(model, TEXT)
    z = sae.encode(clean).detach()
    assert (z[..., 9] != 0).any()
    ablated = resid(model, TEXT, sae_feature(sae, 9, "ablate").hooks(m=1.0))
    torch.testing.assert_close(ablated, clean - z[..., 9:10] * sae.W_dec[9].detach(), rtol=0, atol=1e-10)
    assert sae_feature(sae, 9, "ablate").hooks(m=0.0) == []
    # clamping to the current value changes nothing: on a one-token input that value is a number
    one = resid(model, "hello")
    current = float(sae.encode(one)[0, -1, 11].detach())
    iv = sae_feature(sae, 11, "clamp", current, positions="last_prompt")
    torch.testing.assert_close(resid(model, "hello", iv.hooks(m=1.0)), one, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["add", "clamp", "ablate"])
def test_save_load_round_trip(model, sae, mode, tmp_path) -> None:
    iv = sae_feature(sae, [2, 4], mode, [1.5, 0.5], model=model)
    path = tl_steer.save(iv, tmp_path / f"{mode}.safetensors")
    back = tl_steer.load(path, model=model)
    assert back.mode == mode and back.features == [2, 4]
    torch.testing.assert_close(
        model.run_with_hooks(TEXT, fwd_hooks=back.hooks(m=2.0)),
        model.run_with_hooks(TEXT, fwd_hooks=iv.hooks(m=2.0)),
        rtol=0,
        atol=1e-10,
    )


def test_scales_use_reference_statistics(model, sae) -> None:
    texts = [TEXT, "hello world, the weather is fine today."]
    iv = sae_feature(sae, 6, "add", 1.0, scale="max_act", model=model, reference_texts=texts)
    acts = torch.cat([resid(model, t)[0, 1:] for t in texts])
    assert iv.values.item() == pytest.approx(float(sae.encode(acts)[:, 6].max().detach()), rel=1e-5)
    iv = sae_feature(sae, 6, "add", 1.0, scale="norm", model=model, reference_texts=texts)
    added = iv.values.item() * sae.W_dec[6].norm().item()
    assert added == pytest.approx(float(acts.norm(dim=-1).median()), rel=1e-5)


def test_bad_input(model, sae) -> None:
    with pytest.raises(ConfigError, match="d_sae=64"):
        sae_feature(sae, 64)
    with pytest.raises(ConfigError, match="valid modes: add, clamp, ablate"):
        sae_feature(sae, 1, "boost")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs model= and reference_texts="):
        sae_feature(sae, 1, scale="max_act")
    with pytest.raises(ShapeError, match="width d_in=16"):
        sae_feature(make_sae(d_in=16), 1, model=model)
    with pytest.raises(HookNameError):
        sae_feature(make_sae(hook="blocks.9.hook_resid_post"), 1, model=model)
    with pytest.raises(ShapeError, match="2 features but 3 values"):
        sae_feature(sae, [1, 2], "add", [1.0, 2.0, 3.0])
    assert no_hooks_left(model)


def test_rank_features_scores_match_independent_computations(tiny_any, sae) -> None:
    model = tiny_any
    table = rank_features(model, sae, PAIRS, n_measure=2, eval_pairs=HELD_OUT).set_index("feature")

    # AUROC by counting, from per-completion mean codes computed here
    def mean_code(prompt: str, completion: str) -> torch.Tensor:
        n_prompt = model.to_tokens(prompt).shape[1]
        acts = resid(model, prompt + completion)
        return sae.encode(acts)[0, n_prompt:].mean(0).detach()

    pos = torch.stack([mean_code(p.prompt, p.positive) for p in PAIRS])
    neg = torch.stack([mean_code(p.prompt, p.negative) for p in PAIRS])
    for f in (0, 13, 40):
        wins = (pos[:, f][:, None] > neg[:, f][None, :]).double() + 0.5 * (pos[:, f][:, None] == neg[:, f][None, :])
        assert table.loc[f, "auroc"] == pytest.approx(float(wins.mean()), abs=1e-9)
        assert table.loc[f, "mean_diff"] == pytest.approx(float(pos[:, f].mean() - neg[:, f].mean()), abs=1e-6)
    up, down = concept_tokens(model, PAIRS)
    logits = model.ln_final(sae.W_dec[None, :, :].detach())[0] @ model.W_U
    expected = logits[:, up].mean(1) - logits[:, down].mean(1)
    np.testing.assert_allclose(table.sort_index()["output"], expected.detach().numpy(), atol=1e-5)
    torch.testing.assert_close(output_scores(model, sae.W_dec[:3].detach(), up, down), expected[:3].float())
    measured = table["d_pref"].notna()
    assert 2 <= measured.sum() <= 4
    # the measured effect is the change in PrefOdds from adding the feature at the DiffMean norm
    f = int(table.index[measured][0])
    norm = table.attrs["added_norm"]
    iv = sae_feature(sae, f, "add", norm / float(sae.W_dec[f].detach().norm()))
    lp, ln = tl_steer.pair_nll(model, HELD_OUT, interventions=[iv])
    lp0, ln0 = tl_steer.pair_nll(model, HELD_OUT)
    assert table.loc[f, "d_pref"] == pytest.approx(float((ln - lp).mean() - (ln0 - lp0).mean()), abs=1e-5)
    assert no_hooks_left(model)


def test_sae_class_round_trip_is_sae_lens(sae) -> None:
    assert isinstance(sae, SAE)
