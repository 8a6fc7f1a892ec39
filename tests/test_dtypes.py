"""float16 and bfloat16 models: every public entry point runs on a half-precision copy of a tiny model and
agrees with the float32 model of the same weights, on three architectures (Llama style, NeoX style with
parallel attention, GPT-2 style with folded LayerNorm).

Tolerances. ``u`` is the unit roundoff: 2**-11 for float16 (11 significant bits, ~3.3 digits), 2**-8 for
bfloat16 (8 bits, ~2.4 digits). Every comparison is a relative error ``|x - x32| / |x32|`` (vector norms,
so relative to the quantity's own scale) against a multiple of u:

- FORWARD = 16 u (float16 0.78%, bfloat16 6.25%) for quantities read off one forward pass (logits,
  activations, steered activations, mean activations, distances). Measured: the tiny models' logits differ
  from float32 by ~5 u in both dtypes (3 blocks, each adding a few roundings).
- BACKWARD = 32 u (float16 1.6%, bfloat16 12.5%) for gradients and what is trained from them (COLD-Kernel,
  COLD-FD's dZ, SPLIT parameters): a backward pass rounds about twice as often as the forward pass
  (measured: 17-19 u for the COLD-Kernel vector).
- NLL = 2 u (float16 0.1%, bfloat16 0.78%) for teacher-forced NLLs: the logits are upcast before
  ``log_softmax``, so only the logits' rounding enters, and a mean over tokens of ~6 nats is far larger
  than its error (measured: 0.16 u).
- Log-odds (preference = L_n - L_p) are differences of two NLLs, so their error is bounded by
  NLL * (|L_p| + |L_n|), compared as an absolute error.

Each comparison also checks that a deliberately wrong answer (a sign-flipped vector, m = 0 instead of the
strength used, swapped completions) lies outside the tolerance, so none is too loose to fail.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_model
from test_sae_steering import make_sae

import tl_steer
from tl_steer import AddVector, LocalWeight, LoRA, steer
from tl_steer.data import ABItem, MCItem
from tl_steer.dtypes import is_half, master_dtype

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
HALF = [torch.float16, torch.bfloat16]
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FORWARD, BACKWARD, NLL = 16, 32, 2
TEXT = "The film was wonderful and the staff were kind."
PAIRS = tl_steer.load_pairs("sentiment")[:4]
MC = [
    MCItem("The film was", (" wonderful", " awful", " cold"), 0),
    MCItem("The staff were", (" rude", " kind", " cold"), 1),
    MCItem("The room was", (" cold", " wide", " fresh"), 2),
]
AB = [
    ABItem("How was it?", "fine", "cold", "A"),
    ABItem("Was the staff kind?", "awful", "kind", "B"),
    ABItem("The bread?", "fresh bread", "awful bread", "A"),
]
TEXTS = [p.prompt + p.positive for p in tl_steer.load_pairs("sentiment")[:16]]


def _build(arch: str) -> dict[torch.dtype, object]:
    base = make_model(arch, dtype=torch.float32)
    out = {torch.float32: base}
    for dtype in HALF:
        # The same seed gives the same weights; cast the float32 weights to check it.
        out[dtype] = make_model(arch, dtype=dtype)
    return out


@pytest.fixture(scope="module")
def llama():
    return _build("llama")


@pytest.fixture(scope="module", params=["llama", "neox", "gpt2_folded"])
def models(request):
    """The float32, float16 and bfloat16 copies of one tiny model: Llama style (RMSNorm, GQA), NeoX style
    (parallel attention, partial rotary) and GPT-2 style after LayerNorm folding."""
    return _build(request.param)


@pytest.fixture(scope="module")
def gpt2():
    return _build("gpt2")


def rel(x, ref) -> float:
    x = x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.array(x, dtype=np.float64))
    ref = ref.detach().double() if isinstance(ref, torch.Tensor) else torch.as_tensor(np.array(ref, dtype=np.float64))
    return float((x - ref).norm() / ref.norm())


def assert_close(got, want, wrong, dtype: torch.dtype, factor: int, what: str) -> None:
    """rel(got, want) within factor * u, and rel(wrong, want) outside it (the tolerance can fail)."""
    tol = factor * U[dtype]
    assert rel(got, want) <= tol, f"{what} in {dtype}: relative error {rel(got, want):.3g} > {tol:.3g}"
    assert rel(wrong, want) > tol, f"{what}: the tolerance {tol:.3g} would not catch a wrong answer"


def resid_and_logits(model, hooks, text: str = TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation at the layer after HOOK (after steering) and the logits, in float32, plus a check
    that every hook handed the model its own dtype."""
    seen: list[torch.Tensor] = []
    logits = model.run_with_hooks(
        text,
        fwd_hooks=[*hooks, ("blocks.2.hook_resid_pre", lambda a, hook: seen.append(a.detach()))],
        return_type="logits",
    )
    assert seen[0].dtype == model.cfg.dtype and logits.dtype == model.cfg.dtype
    assert torch.isfinite(logits).all()
    return seen[0].float(), logits.float()


# ----- the models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_half_models_have_the_float32_weights(arch, request) -> None:
    models = request.getfixturevalue(arch)
    params32 = dict(models[torch.float32].named_parameters())
    for dtype in HALF:
        model = models[dtype]
        assert model.cfg.dtype == dtype and is_half(model) and master_dtype(model) == torch.float32
        for name, p in model.named_parameters():
            assert p.dtype == dtype
            assert torch.equal(p, params32[name].to(dtype)), name


# ----- steering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("vec_dtype", [torch.float32, torch.float64])
def test_add_vector_is_cast_inside_the_hook(arch, dtype, vec_dtype, request) -> None:
    models = request.getfixturevalue(arch)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(vec_dtype)
    iv, flipped = AddVector(HOOK, v), AddVector(HOOK, -v)
    want, want_logits = resid_and_logits(models[torch.float32], iv.hooks(2.0))
    got, got_logits = resid_and_logits(models[dtype], iv.hooks(2.0))
    wrong, _ = resid_and_logits(models[dtype], flipped.hooks(2.0))
    assert_close(got, want, wrong, dtype, FORWARD, "steered activation")
    with steer(models[dtype], iv, m=2.0):
        via_steer = models[dtype](TEXT).float()
    torch.testing.assert_close(via_steer, got_logits, rtol=0, atol=0)
    assert_close(got_logits, want_logits, models[dtype](TEXT).float(), dtype, FORWARD, "steered logits")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["lora", "local_weight"])
def test_module_deltas(models, dtype, kind) -> None:
    g = torch.Generator().manual_seed(2)
    if kind == "lora":
        iv = LoRA.for_model(models[torch.float32], 1, rank=2)
        iv.B.copy_(torch.randn(iv.B.shape, generator=g))
    else:
        iv = LocalWeight.for_model(models[torch.float32], 1)
        iv.dW.copy_(0.3 * torch.randn(iv.dW.shape, generator=g))
    want, _ = resid_and_logits(models[torch.float32], iv.hooks(1.0))
    got, _ = resid_and_logits(models[dtype], iv.hooks(1.0))
    clean, _ = resid_and_logits(models[dtype], [])
    assert_close(got, want, clean, dtype, FORWARD, kind)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_sae_feature_edits(models, dtype, mode) -> None:
    sae = make_sae()  # float64, applied to a half model
    iv = tl_steer.sae_feature(sae, [3, 7], mode, [4.0, 2.0])
    want, _ = resid_and_logits(models[torch.float32], iv.hooks(1.0))
    got, _ = resid_and_logits(models[dtype], iv.hooks(1.0))
    clean, _ = resid_and_logits(models[dtype], [])
    assert_close(got, want, clean, dtype, FORWARD, f"SAE {mode}")
    scaled = tl_steer.sae_feature(sae, 3, "add", 1.0, scale="max_act", model=models[dtype], reference_texts=TEXTS[:4])
    ref = tl_steer.sae_feature(
        sae, 3, "add", 1.0, scale="max_act", model=models[torch.float32], reference_texts=TEXTS[:4]
    )
    assert_close(scaled.values, ref.values, -ref.values, dtype, FORWARD, "SAE max_act scale")


@pytest.mark.parametrize("dtype", HALF)
def test_position_policies_and_cached_generation(models, dtype) -> None:
    model, v = models[dtype], torch.randn(32, generator=torch.Generator().manual_seed(3))
    # Strength 8: enough for the sign of the vector to move the NLL past bfloat16's tolerance everywhere.
    for policy in ("prompt", "generated"):
        iv = AddVector(HOOK, 8.0 * v, positions=policy)
        want = tl_steer.pair_nll(models[torch.float32], PAIRS, interventions=[iv])
        got = tl_steer.pair_nll(model, PAIRS, interventions=[iv])
        other = tl_steer.pair_nll(model, PAIRS, interventions=[AddVector(HOOK, -8.0 * v, positions=policy)])
        assert_close(torch.cat(got), torch.cat(want), torch.cat(other), dtype, NLL, f"NLL steered at {policy!r}")
    # One steered position moves the completions' NLL by less than bfloat16's tolerance on the NeoX-style
    # model (0.3%), so "last_prompt" is compared on the activations the next block receives.
    iv, other = AddVector(HOOK, 3.0 * v, positions="last_prompt"), AddVector(HOOK, -3.0 * v, positions="last_prompt")
    want, _ = resid_and_logits(models[torch.float32], iv.hooks(1.0))
    got, _ = resid_and_logits(model, iv.hooks(1.0))
    wrong, _ = resid_and_logits(model, other.hooks(1.0))
    assert_close(got, want, wrong, dtype, FORWARD, "activation steered at 'last_prompt'")
    iv = AddVector(HOOK, 3.0 * v, positions="generated")
    outputs = {}
    for cache in (True, False):
        with steer(model, iv, m=1.0):
            outputs[cache] = model.generate(
                "hello world", max_new_tokens=6, verbose=False, do_sample=False, use_past_kv_cache=cache
            )
    assert outputs[True] == outputs[False]
    with steer(model, AddVector(HOOK, 3.0 * v), m=1.0):
        steered = model.generate("hello world", max_new_tokens=6, verbose=False, do_sample=False)
    assert steered != model.generate("hello world", max_new_tokens=6, verbose=False, do_sample=False)


def test_cold_fd_steering_in_half_is_the_jvp(models) -> None:
    # Raw steps (unit 1): the units are measured in each dtype; this compares the dZ computed.
    ref = tl_steer.cold_fd(models[torch.float32], PAIRS, HOOK, method="jvp").with_unit(1.0)
    want, _ = resid_and_logits(models[torch.float32], ref.hooks(3.0, model=models[torch.float32]))
    for dtype in HALF:
        model = models[dtype]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "unreliable" warning: the finite difference is not used
            iv = tl_steer.cold_fd(model, PAIRS, HOOK, method="fd")
        assert iv.fd_method == "fd" and iv.method_for(model) == "jvp"
        assert all(t.dtype == torch.float32 for t in iv.grads.values())
        raw = iv.with_unit(1.0)
        got, _ = resid_and_logits(model, raw.hooks(3.0, model=model))
        wrong, _ = resid_and_logits(model, raw.hooks(-3.0, model=model))
        assert_close(got, want, wrong, dtype, BACKWARD, "COLD-FD steered activation")


# ----- scoring ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_scoring(models, dtype) -> None:
    m32, model = models[torch.float32], models[dtype]
    want, got = tl_steer.pair_nll(m32, PAIRS), tl_steer.pair_nll(model, PAIRS)
    assert got[0].dtype == torch.float32
    assert_close(torch.cat(got), torch.cat(want), torch.cat(got[::-1]), dtype, NLL, "pair NLL")
    want = tl_steer.completion_nll(m32, ["hello world"], [" the weather is fine"], reduction="sum")
    got = tl_steer.completion_nll(model, ["hello world"], [" the weather is fine"], reduction="sum")
    assert_close(got, want, 1.05 * want, dtype, NLL, "summed completion NLL")
    want, got = tl_steer.mc_option_nll(m32, MC), tl_steer.mc_option_nll(model, MC)
    assert_close(got, want, got.flip(-1), dtype, NLL, "option NLL")
    assert tl_steer.mc_accuracy(model, MC).accuracy == tl_steer.mc_accuracy(m32, MC).accuracy
    from tl_steer.analysis.ab import ab_scores

    want, got = ab_scores(m32, None, AB), ab_scores(model, None, AB)
    assert_close(got, want, -got, dtype, FORWARD, "A/B logit difference")
    assert tl_steer.ab_accuracy(model, None, AB) == tl_steer.ab_accuracy(m32, None, AB)


# ----- methods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_diffmean_and_cold_kernel(models, dtype) -> None:
    want = tl_steer.diffmean(models[torch.float32], PAIRS, HOOK).vector
    got = tl_steer.diffmean(models[dtype], PAIRS, HOOK).vector
    assert got.dtype == torch.float32
    assert_close(got, want, -got, dtype, FORWARD, "DiffMean vector")
    want = tl_steer.cold_kernel(models[torch.float32], PAIRS, HOOK).vector
    got = tl_steer.cold_kernel(models[dtype], PAIRS, HOOK).vector
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert_close(got, want, -got, dtype, BACKWARD, "COLD-Kernel vector")


@pytest.mark.parametrize("dtype", HALF)
def test_split_and_sft_train_float32_parameters(models, dtype) -> None:
    """Training on a half model updates float32 master copies (AdamW in float32); the model's own weights
    stay half and untouched."""
    pairs = tl_steer.load_pairs("sentiment")[:8]
    kwargs = dict(epochs=2, batch_size=4, progress=False)
    want, want_history = tl_steer.split(models[torch.float32], pairs, 1, "vector", **kwargs)
    got, history = tl_steer.split(models[dtype], pairs, 1, "vector", **kwargs)
    assert got.vector.dtype == torch.float32 and np.isfinite(history["loss"]).all()
    if dtype == torch.float16:
        assert_close(got.vector, want.vector, -got.vector, dtype, BACKWARD, "SPLIT vector")
    else:
        # bfloat16's 8 bits and AdamW's sign-like first steps leave entries with near-zero gradients at
        # the mercy of rounding (up to 38% relative difference on the NeoX-style model): compare the
        # training losses, as for LoRA below, and the direction.
        loss, loss32 = history["loss"].to_numpy(), want_history["loss"].to_numpy()
        assert_close(loss, loss32, 1.05 * loss32, dtype, NLL, "SPLIT vector training loss")
        assert torch.nn.functional.cosine_similarity(got.vector, want.vector, dim=0) > 0.9
    want, want_history = tl_steer.sft(models[torch.float32], pairs, 1, "lora", **kwargs)
    got, history = tl_steer.sft(models[dtype], pairs, 1, "lora", **kwargs)
    assert got.B.dtype == torch.float32 and torch.isfinite(got.B).all() and got.B.abs().max() > 0
    # The LoRA factors are compared through the training losses, not entry by entry: AdamW's first steps
    # move every entry of B (zero at the start) by about +-lr whatever the size of its gradient, so an entry
    # whose gradient is near 0 takes the sign of a rounding (20% relative difference in bfloat16).
    loss, loss32 = history["loss"].to_numpy(), want_history["loss"].to_numpy()
    assert_close(loss, loss32, 1.05 * loss32, dtype, NLL, "SFT LoRA training loss")
    assert all(p.dtype == dtype for p in models[dtype].parameters())


@pytest.mark.parametrize("dtype", HALF)
def test_rank_features(models, dtype) -> None:
    sae = make_sae()
    # (the rows come sorted by score, so align them by feature)
    want = tl_steer.rank_features(models[torch.float32], sae, PAIRS, n_measure=0).set_index("feature").sort_index()
    got = tl_steer.rank_features(models[dtype], sae, PAIRS, n_measure=0).set_index("feature").sort_index()
    for column in ("mean_diff", "output"):
        g, w = got[column].to_numpy(), want[column].to_numpy()
        assert_close(g, w, -g, dtype, FORWARD, f"rank_features {column}")
    assert np.isfinite(got["auroc"]).all()


# ----- analyses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_preference_utility(models, dtype) -> None:
    iv = AddVector(HOOK, torch.randn(32, generator=torch.Generator().manual_seed(4)))
    ms = (-2.0, 0.0, 2.0)
    want = tl_steer.preference_utility(models[torch.float32], iv, PAIRS, ms, progress=False).table
    cached = tl_steer.preference_utility(models[dtype], iv, PAIRS, ms, progress=False).table
    plain = tl_steer.preference_utility(models[dtype], iv, PAIRS, ms, progress=False, cache_prefix=False).table
    np.testing.assert_allclose(cached["L_p"], plain["L_p"], rtol=2 * U[dtype])  # the same computation
    for got in (cached, plain):
        nll, nll32 = got[["L_p", "L_n"]].to_numpy(), want[["L_p", "L_n"]].to_numpy()
        assert_close(nll, nll32, nll[:, ::-1].copy(), dtype, NLL, "sweep NLL")
        bound = NLL * U[dtype] * (want["L_p"] + want["L_n"]).to_numpy()
        assert (np.abs(got["pref_odds"] - want["pref_odds"]).to_numpy() <= bound).all()
        assert (np.abs(-got["pref_odds"] - want["pref_odds"]).to_numpy() > bound).any()


@pytest.fixture(scope="module")
def probes(models):
    return {d: tl_steer.ManifoldProbe.fit(m, TEXTS, HOOK, k=4, progress=False) for d, m in models.items()}


@pytest.mark.parametrize("dtype", HALF)
def test_manifold_probe_and_sweep(models, probes, dtype) -> None:
    s32, s = probes[torch.float32].stats[HOOK], probes[dtype].stats[HOOK]
    assert s.moments.mean.dtype == torch.float64 and s.moments.n == s32.moments.n
    assert_close(s.moments.mean, s32.moments.mean, -s.moments.mean, dtype, FORWARD, "probe mean")
    assert_close(s.covariance(), s32.covariance(), s.covariance().diag().diag(), dtype, FORWARD, "probe covariance")
    v = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(5))
    iv = AddVector(HOOK, v)
    _, cache32 = models[torch.float32].run_with_cache(TEXT, names_filter=HOOK)
    _, cache = models[dtype].run_with_cache(TEXT, names_filter=HOOK)
    want = probes[torch.float32].score(cache32[HOOK] + v)["mahalanobis"].to_numpy()
    got = probes[dtype].score(cache[HOOK] + v.to(dtype))["mahalanobis"].to_numpy()
    clean = probes[dtype].score(cache[HOOK])["mahalanobis"].to_numpy()
    assert_close(got, want, clean, dtype, FORWARD, "Mahalanobis distance of a steered activation")
    want = tl_steer.manifold_sweep(models[torch.float32], iv, PAIRS, (0, 1), probes[torch.float32], progress=False)
    got = tl_steer.manifold_sweep(models[dtype], iv, PAIRS, (0, 1), probes[dtype], progress=False)
    w, g = (r.table[r.table["label"] == "add_vector"] for r in (want, got))
    for column in ("mahalanobis", "norm", "knn"):
        wrong = g[column].to_numpy()[::-1].copy() if column != "norm" else 1.1 * g[column].to_numpy()
        assert_close(g[column].to_numpy(), w[column].to_numpy(), wrong, dtype, FORWARD, f"sweep {column}")


@pytest.mark.parametrize("dtype", HALF)
def test_gap_and_comparison(models, dtype) -> None:
    iv = AddVector(HOOK, torch.randn(32, generator=torch.Generator().manual_seed(6)))

    def gap(model):
        result = tl_steer.capability_behavior_gap(
            model, [tl_steer.Condition("vec", iv)], PAIRS, MC, ms=(0, 2), progress=False
        )
        return result.summary().set_index(["condition", "m", "metric"])["mean"]

    want, got = gap(models[torch.float32]), gap(models[dtype])
    assert list(want.index) == list(got.index)
    util = [k for k in want.index if k[2] == "util_odds"]
    assert_close(got[util].to_numpy(), want[util].to_numpy(), 1.05 * got[util].to_numpy(), dtype, NLL, "gap utility")
    capability = [k for k in want.index if k[2] == "capability"]
    assert (got[capability] == want[capability]).all()

    def compare(model):
        return tl_steer.compare_interventions(model, {"vec": iv}, PAIRS, progress=False).table.iloc[0]

    want, got = compare(models[torch.float32]), compare(models[dtype])
    assert_close([got["util_odds"]], [want["util_odds"]], [1.05 * want["util_odds"]], dtype, NLL, "compared utility")
    assert abs(got["pref_odds"] - want["pref_odds"]) <= NLL * U[dtype] * 2 * 7.0  # |L_p| + |L_n| < 14 nats here


def test_float16_overflow_names_the_strength_and_the_fix(llama) -> None:
    model = llama[torch.float16]
    v = tl_steer.diffmean(model, PAIRS, HOOK)
    table = tl_steer.preference_utility(model, v, PAIRS, (0.0, 1e4), progress=False).table  # still finite
    assert np.isfinite(table["pref_odds"]).all()
    # Refused at the first steered pass, inside the hook, naming m and the hook (was a non-finite NLL later).
    with pytest.raises(tl_steer.ConfigError, match=r"m=1e\+06 is too large at .*float16.*bfloat16 or float32"):
        tl_steer.preference_utility(model, v, PAIRS, (0.0, 1e6), progress=False)
    # bfloat16 has float32's range: the same strength stays finite there.
    model = llama[torch.bfloat16]
    table = tl_steer.preference_utility(model, tl_steer.diffmean(model, PAIRS, HOOK), PAIRS, (0.0, 1e6), progress=False)
    assert np.isfinite(table.table["pref_odds"]).all()
