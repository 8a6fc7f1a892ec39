"""DiffMean: agreement with a per-text run_with_cache computation, its metadata, errors, and direction."""

from __future__ import annotations

import weakref

import pytest
import torch

import tl_steer
from tl_steer import AddVector, ContrastivePair, DataError, HookNameError


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


HOOK = "blocks.1.hook_resid_post"

PAIRS = [
    ContrastivePair("The food was", " wonderful and fresh.", " awful and stale."),
    ContrastivePair("The film was", " wonderful and the staff were kind.", " awful and the staff were rude."),
    ContrastivePair("The room was", " clean and fine.", " cold and dirty."),
    ContrastivePair("hello wor", "ld, the weather is fine", "ld, the weather is awful"),
    ContrastivePair("I went to the market and", " bought fresh bread.", " bought stale bread and a cold tea."),
    ContrastivePair("The weather is", " fine today.", " cold today."),
    ContrastivePair("The staff were", " kind and friendly.", " rude."),
]

# diffmean reads activations in float32 (documented), so a float64 reference agrees to float32 rounding.
F32 = dict(rtol=1e-5, atol=1e-6)


def tokens_and_start(model, prompt: str, completion: str) -> tuple[torch.Tensor, int]:
    tok = model.tokenizer
    bos = [tok.bos_token_id]
    full = bos + tok(prompt + completion, add_special_tokens=False).input_ids
    prompt_ids = bos + tok(prompt, add_special_tokens=False).input_ids
    start = next(i for i in range(len(full)) if i >= len(prompt_ids) or prompt_ids[i] != full[i])
    return torch.tensor([full]), start


HOOKS = (HOOK, "blocks.0.hook_mlp_out", "blocks.2.hook_resid_pre")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(prompt, completion): (acts, start)}


def activation(model, prompt: str, completion: str, hook: str, reduce: str) -> torch.Tensor:
    """The activation at ``hook`` of one unpadded text, over its completion tokens or at its last token."""
    cache_of_model = _CACHE.setdefault(model, {})
    if (prompt, completion) not in cache_of_model:
        tokens, start = tokens_and_start(model, prompt, completion)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=list(HOOKS))
        cache_of_model[prompt, completion] = ({name: cache[name][0].double() for name in HOOKS}, start)
    acts, start = cache_of_model[prompt, completion]
    act = acts[hook]
    return act[start:].mean(0) if reduce == "mean" else act[-1]


def reference_diffmean(model, pairs, hook: str, reduce: str) -> torch.Tensor:
    diffs = [
        activation(model, p.prompt, p.positive, hook, reduce) - activation(model, p.prompt, p.negative, hook, reduce)
        for p in pairs
    ]
    return torch.stack(diffs).mean(0)


def check_against_reference(model, hook: str, reduce: str) -> None:
    got = tl_steer.diffmean(model, PAIRS, hook, reduce=reduce, batch_size=3)
    want = reference_diffmean(model, PAIRS, hook, reduce)
    assert got.vector.shape == (model.cfg.d_model,)
    assert want.norm() > 0.1
    torch.testing.assert_close(got.vector.double(), want, **F32)
    assert got.info["norm"] == pytest.approx(float(want.norm()), rel=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_diffmean_matches_hand_computation(tiny_any, reduce: str) -> None:
    check_against_reference(tiny_any, HOOK, reduce)


@pytest.mark.parametrize(("hook", "reduce"), [("blocks.0.hook_mlp_out", "mean"), ("blocks.2.hook_resid_pre", "last")])
def test_diffmean_matches_hand_computation_at_other_hooks(tiny, hook: str, reduce: str) -> None:
    check_against_reference(tiny, hook, reduce)


def test_mean_and_last_differ(tiny) -> None:
    mean = tl_steer.diffmean(tiny, PAIRS, HOOK, reduce="mean").vector
    last = tl_steer.diffmean(tiny, PAIRS, HOOK, reduce="last").vector
    assert (mean - last).abs().max() > 1e-3


def test_diffmean_is_independent_of_batching_and_pair_order(tiny) -> None:
    a = tl_steer.diffmean(tiny, PAIRS, HOOK).vector
    b = tl_steer.diffmean(tiny, list(reversed(PAIRS)), HOOK, batch_size=1).vector
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_diffmean_swapping_sides_negates(tiny) -> None:
    swapped = [ContrastivePair(p.prompt, p.negative, p.positive) for p in PAIRS]
    torch.testing.assert_close(
        tl_steer.diffmean(tiny, swapped, HOOK).vector, -tl_steer.diffmean(tiny, PAIRS, HOOK).vector
    )


def test_diffmean_returns_add_vector_with_metadata(tiny) -> None:
    iv = tl_steer.diffmean(tiny, PAIRS, HOOK, reduce="last", positions="generated")
    assert isinstance(iv, AddVector)
    assert iv.hook == HOOK and iv.hook_names == (HOOK,)
    assert iv.method == "diffmean"
    assert iv.kind == "add_vector"
    assert iv.model_identity == tl_steer.model_identity(tiny)
    assert iv.positions.kind == "generated"
    assert iv.vector.dtype == tiny.cfg.dtype
    assert iv.info["n_pairs"] == len(PAIRS)
    assert iv.info["reduce"] == "last"
    assert iv.info["chat"] is False
    assert iv.widths() == {HOOK: tiny.cfg.d_model}
    iv.check(tiny)  # fits the model it was made on


def test_diffmean_empty_pairs(tiny) -> None:
    with pytest.raises(DataError, match="empty"):
        tl_steer.diffmean(tiny, [], HOOK)
    with pytest.raises(DataError, match="not a ContrastivePair"):
        tl_steer.diffmean(tiny, [("a", " b", " c")], HOOK)  # type: ignore[list-item]


def test_diffmean_unknown_hook_suggests_close_names(tiny) -> None:
    with pytest.raises(HookNameError) as info:
        tl_steer.diffmean(tiny, PAIRS, "blocks.1.hook_resid_pots")
    message = str(info.value)
    assert "'blocks.1.hook_resid_pots'" in message
    assert "Closest valid names" in message
    assert "blocks.1.hook_resid_post" in message
    assert isinstance(info.value, KeyError)
    with pytest.raises(HookNameError, match="no hook point 'blocks.7.hook_resid_post'"):
        tl_steer.diffmean(tiny, PAIRS, "blocks.7.hook_resid_post")


def test_diffmean_bad_reduce(tiny) -> None:
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'last'"):
        tl_steer.diffmean(tiny, PAIRS, HOOK, reduce="max")  # type: ignore[arg-type]


# ----- direction -----------------------------------------------------------------------------------


def steered_completion_activation(model, iv: AddVector, m: float, prompt: str, completion: str) -> torch.Tensor:
    """Mean activation at iv.hook over the completion tokens, read after the steering hook ran."""
    tokens, start = tokens_and_start(model, prompt, completion)
    seen = {}

    def grab(act: torch.Tensor, hook: object) -> None:
        seen["act"] = act[0].detach().double()

    with tl_steer.steer(model, iv, m=m), torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(iv.hook, grab)], return_type=None)
    return seen["act"][start:].mean(0)


@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_positives_project_above_negatives(tiny, reduce: str) -> None:
    # By construction mean_i <a_p,i - a_n,i, v> = <v, v> > 0, whatever the model's weights are.
    v = tl_steer.diffmean(tiny, PAIRS, HOOK, reduce=reduce).vector.double()
    gap = torch.stack(
        [
            activation(tiny, p.prompt, p.positive, HOOK, reduce) - activation(tiny, p.prompt, p.negative, HOOK, reduce)
            for p in PAIRS
        ]
    ).mean(0)
    assert float(gap @ v) == pytest.approx(float(v @ v), rel=1e-5)
    assert float(gap @ v) > 0


def test_steering_raises_the_projection_onto_the_vector(tiny) -> None:
    # At the steered hook, h -> h + m v, so <mean completion activation, v> = base + m |v|^2: it rises
    # strictly with m for every text, by linearity (the hook's own activation, not a later layer's).
    iv = tl_steer.diffmean(tiny, PAIRS, HOOK)
    v = iv.vector.double()
    ms = [-4.0, 0.0, 4.0]
    for pair in PAIRS[:3]:
        for completion in (pair.positive, pair.negative):
            proj = [float(steered_completion_activation(tiny, iv, m, pair.prompt, completion) @ v) for m in ms]
            assert all(a < b for a, b in zip(proj, proj[1:], strict=False)), proj
            base = float(activation(tiny, pair.prompt, completion, HOOK, "mean") @ v)
            for m, p in zip(ms, proj, strict=True):
                assert p == pytest.approx(base + m * float(v @ v), rel=1e-9, abs=1e-9)
