"""Adaptive steering kinds (tl_steer.methods.adaptive): each against an independent computation of what it
says it does, plus m = 0, positions, save/load, the KV cache and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import SENTIMENT_PAIRS, TINY_HOOK, make_model, no_hooks_left

import tl_steer
from tl_steer import ConfigError, ContrastivePair, HookNameError, ModelMismatchError, ShapeError
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.interventions import AddVector
from tl_steer.methods.adaptive import (
    BudgetedAddition,
    Conditional,
    ProjectionClamp,
    Rotation,
    budgeted_addition,
    concept_activations,
    condition_probe,
    conditional,
    projection_clamp,
    rotate_toward,
    rotation,
)

HOOK = TINY_HOOK
PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS]
TEXTS = [p.prompt + c for p in PAIRS for c in (p.positive, p.negative)] * 3
TEXT = "hello world, the food was wonderful and the staff were rude"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def acts(tiny):
    return concept_activations(tiny, PAIRS, HOOK)


@pytest.fixture(scope="module")
def probe(tiny):
    return ManifoldProbe.fit(tiny, TEXTS, HOOK, k=8, holdout=0.3, progress=False)


@pytest.fixture(scope="module")
def kinds(tiny, acts, probe):
    """One of each kind, fitted on the tiny model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tiny random model's probe may barely fire
        cond_probe = condition_probe(tiny, None, HOOK, activations=acts)
    base = AddVector(HOOK, acts.diffmean.float(), model_identity=acts.identity)
    return {
        "clamp": projection_clamp(tiny, None, HOOK, activations=acts),
        "budget": budgeted_addition(tiny, None, HOOK, probe, q=0.6, activations=acts),
        "rotation": rotation(tiny, None, HOOK, activations=acts),
        "conditional": conditional(base, cond_probe, tau=0.5),
    }


def resid(model, fwd_hooks=(), text=TEXT):
    """The activation at HOOK (after any edit there) for ``text``."""
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(model.to_tokens(text), fwd_hooks=[*fwd_hooks, (HOOK, grab)], return_type=None)
    return seen["act"][0]


# ----- each kind is its formula ------------------------------------------------------------------


def test_the_clamp_sets_the_projection_to_its_target_exactly(tiny, kinds):
    iv = kinds["clamp"]
    v = iv.direction.double() / iv.direction.double().norm()
    clean, steered = resid(tiny), resid(tiny, iv.hooks(1.0))
    assert (clean @ v - iv.target).abs().min() > 1e-3  # nothing is there before
    torch.testing.assert_close(steered @ v, torch.full_like(steered[:, 0], iv.target), rtol=0, atol=1e-9)
    # Only the component along v moves.
    ortho = lambda h: h - (h @ v)[:, None] * v  # noqa: E731
    torch.testing.assert_close(ortho(steered), ortho(clean), rtol=0, atol=1e-9)
    # Other strengths and units: h + raw (c - p) v, raw = m * unit.
    twin = iv.with_unit(2.0)
    expected = clean + 0.6 * (iv.target - clean @ v)[:, None] * v
    torch.testing.assert_close(resid(tiny, twin.hooks(0.3)), expected, rtol=0, atol=1e-9)


def test_the_one_sided_clamp_leaves_tokens_past_the_target(tiny, acts):
    iv = projection_clamp(tiny, None, HOOK, activations=acts, one_sided=True, q=0.5)
    v = iv.direction.double() / iv.direction.double().norm()
    clean, steered = resid(tiny), resid(tiny, iv.hooks(1.0))
    above = clean @ v >= iv.target
    assert above.any() and (~above).any()
    torch.testing.assert_close(steered[above], clean[above], rtol=0, atol=0)
    torch.testing.assert_close((steered @ v)[~above], torch.full_like(clean[~above, 0], iv.target), rtol=0, atol=1e-9)


def test_the_clamp_target_is_the_quantile_of_the_positive_projections(tiny, acts):
    iv = projection_clamp(tiny, PAIRS, HOOK, q=0.8)
    v = acts.diffmean / acts.diffmean.norm()
    assert iv.target == pytest.approx(float(np.quantile((acts.positive @ v).numpy(), 0.8)), abs=1e-6)
    torch.testing.assert_close(iv.direction.double(), v, rtol=0, atol=1e-6)


def _mahalanobis(probe, h):
    return torch.as_tensor(probe.mahalanobis(h, HOOK)["mahalanobis"])


def test_the_budget_holds_the_percentile_exactly(tiny, kinds, probe):
    iv = kinds["budget"]
    budget = float(np.quantile(probe.stats[HOOK].calibrated["mahalanobis"], 0.6))
    assert iv.budget == pytest.approx(budget, rel=1e-12)
    clean = resid(tiny)
    before = _mahalanobis(probe, clean)
    for m in (3.0, 10.0, -6.0):
        steered = resid(tiny, iv.hooks(m))
        after = _mahalanobis(probe, steered)
        # s per token, recovered from the change along v
        v = iv.vector.double()
        s = ((steered - clean) @ v) / (v @ v)
        torch.testing.assert_close(steered - clean, s[:, None] * v, rtol=0, atol=1e-9)
        inside, past = before <= budget, before > budget
        assert inside.any() and past.any()
        assert torch.equal(steered[past], clean[past])  # already past the budget: s = 0
        full = (s - m).abs() < 1e-9
        binds = inside & ~full
        assert binds.any(), "the budget should bind somewhere at this strength"
        torch.testing.assert_close(after[binds], torch.full_like(after[binds], budget), rtol=1e-7, atol=0)
        assert (after[inside] <= budget * (1 + 1e-9)).all()
        assert ((s >= -1e-12) & (s <= m + 1e-12)).all() if m > 0 else ((s <= 1e-12) & (s >= m - 1e-12)).all()


def test_the_budget_is_the_largest_strength_within_it(tiny, kinds, probe):
    """Bisection on the probe's own distance gives the same per-token strength as the closed form."""
    iv = kinds["budget"]
    clean = resid(tiny)
    v = iv.vector.double()
    s = ((resid(tiny, iv.hooks(3.0)) - clean) @ v) / (v @ v)
    for t in range(1, clean.shape[0]):
        h = clean[t]
        if float(_mahalanobis(probe, h[None])[0]) > iv.budget:
            continue
        lo, hi = 0.0, 3.0
        if float(_mahalanobis(probe, (h + hi * v)[None])[0]) <= iv.budget:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if float(_mahalanobis(probe, (h + mid * v)[None])[0]) <= iv.budget:
                lo = mid
            else:
                hi = mid
        assert float(s[t]) == pytest.approx(lo, abs=1e-6)


def test_the_rotation_keeps_the_norm_and_turns_by_the_stated_angle(tiny, kinds):
    iv = kinds["rotation"]
    v = iv.direction.double() / iv.direction.double().norm()
    clean = resid(tiny)
    for m in (0.5, 1.0, -1.5):
        steered = resid(tiny, iv.hooks(m))
        torch.testing.assert_close(steered.norm(dim=-1), clean.norm(dim=-1), rtol=1e-12, atol=0)
        theta = m * iv.unit
        cos = torch.nn.functional.cosine_similarity(steered, clean, dim=-1)
        torch.testing.assert_close(cos, torch.full_like(cos, math.cos(theta)), rtol=0, atol=1e-10)
        # toward v (away for negative m): the angle to v changes by theta, within the plane of h and v
        before = torch.arccos(torch.nn.functional.cosine_similarity(clean, v[None], dim=-1))
        after = torch.arccos(torch.nn.functional.cosine_similarity(steered, v[None], dim=-1))
        expected = before - theta
        # angles are folded into [0, pi]
        expected = torch.where(
            expected < 0, -expected, torch.where(expected > math.pi, 2 * math.pi - expected, expected)
        )
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)


def test_the_rotation_unit_is_diffmeans_mean_angle(tiny, acts):
    iv = rotation(tiny, PAIRS, HOOK)
    h = torch.cat([acts.positive, acts.negative])
    angles = [
        math.acos(max(-1.0, min(1.0, float(a @ (a + acts.diffmean) / (a.norm() * (a + acts.diffmean).norm())))))
        for a in h
    ]
    assert iv.unit == pytest.approx(sum(angles) / len(angles), rel=1e-9)
    assert iv.info["theta0_degrees"] == pytest.approx(math.degrees(iv.unit))


def test_rotate_toward_a_parallel_vector_is_the_identity() -> None:
    h = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = rotate_toward(h, torch.tensor([1.0, 0.0, 0.0]), 0.7)
    assert torch.equal(out, h)
    turned = rotate_toward(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0.0, 1.0, 0.0]), math.pi / 2)
    torch.testing.assert_close(turned, torch.tensor([[0.0, 2.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_condition_gates_exactly_the_tokens_it_says(tiny, kinds):
    iv = kinds["conditional"]
    clean = resid(tiny)
    fires = torch.sigmoid(clean @ iv.weight.double() + iv.bias) > iv.tau
    if fires.all() or not fires.any():  # make the threshold split this text's tokens
        p = torch.sigmoid(clean @ iv.weight.double() + iv.bias)
        iv = Conditional(iv.inner, iv.hook, iv.weight, iv.bias, float(p.median()))
        fires = p > iv.tau
    assert fires.any() and (~fires).any()
    steered = resid(tiny, iv.hooks(2.0))
    v = iv.inner.vector.double()
    torch.testing.assert_close(steered[fires], clean[fires] + 2.0 * v, rtol=0, atol=1e-12)
    assert torch.equal(steered[~fires], clean[~fires])


def test_the_condition_reads_an_earlier_block(tiny, acts):
    """A probe at block 0 gates an edit at block 1, from the block-0 activation before any edit."""
    early = "blocks.0.hook_resid_post"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = condition_probe(tiny, PAIRS, early)
    inner = AddVector(HOOK, acts.diffmean.float())
    seen = {}

    def grab(act, hook):
        seen["h0"] = act.detach().clone()

    p = torch.sigmoid(resid_at(tiny, early) @ cp.weight.double() + cp.bias)
    iv = conditional(inner, cp, tau=float(p.median()))
    clean = resid(tiny)
    steered = resid(tiny, [*iv.hooks(1.0), (early, grab)])
    fires = torch.sigmoid(seen["h0"][0] @ iv.weight.double() + iv.bias) > iv.tau
    assert fires.any() and (~fires).any()
    assert torch.equal(steered[~fires], clean[~fires])
    torch.testing.assert_close(steered[fires], clean[fires] + inner.vector.double(), rtol=0, atol=1e-12)


def resid_at(model, hook):
    _, cache = model.run_with_cache(model.to_tokens(TEXT), names_filter=hook)
    return cache[hook][0]


def test_the_condition_probe_reports_its_firing_rates(tiny, acts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cp = condition_probe(tiny, None, HOOK, activations=acts, fires_on="negative")
    assert cp.rate_positive == pytest.approx(float(cp.fires(acts.positive).double().mean()))
    assert cp.rate_negative == pytest.approx(float(cp.fires(acts.negative).double().mean()))
    assert cp.rate_negative > cp.rate_positive  # trained to fire on the negative side


def test_a_condition_that_never_fires_warns_with_its_rate(tiny, acts):
    with pytest.warns(UserWarning, match=r"fires on only 0\.0%"):
        condition_probe(tiny, None, HOOK, activations=acts, tau=1 - 1e-12)


# ----- the contract: m = 0, positions, saving, the KV cache ---------------------------------------


@pytest.mark.parametrize("name", ["clamp", "budget", "rotation", "conditional"])
def test_m_zero_is_the_clean_model(tiny, kinds, name):
    iv = kinds[name]
    assert iv.hooks(0.0) == []
    tokens = tiny.to_tokens(TEXT)
    clean = tiny(tokens)
    with tl_steer.steer(tiny, iv, m=0.0):
        assert torch.equal(tiny(tokens), clean)
    with tl_steer.steer(tiny, iv, m=1.0):
        assert not torch.equal(tiny(tokens), clean)
    assert no_hooks_left(tiny)


@pytest.mark.parametrize("name", ["clamp", "budget", "rotation", "conditional"])
def test_the_last_prompt_policy_changes_one_position(tiny, kinds, name):
    iv = kinds[name]
    if name == "conditional":  # a gate open everywhere, so that only the policy decides
        iv = Conditional(iv.inner, iv.hook, iv.weight, iv.bias, 1e-9)
    last = type(iv).from_saved(iv.config(), iv.tensors(), {"positions": "last_prompt"})
    clean = resid(tiny)
    n = clean.shape[0]
    # the last position the kind changes at all (a budget leaves tokens past it alone)
    everywhere = (resid(tiny, iv.hooks(2.0)) != clean).any(-1)
    p = int(torch.nonzero(everywhere[: n - 2]).max())
    with tl_steer.prompt_boundary(p + 1):
        steered = resid(tiny, last.hooks(2.0, model=tiny))
    changed = (steered != clean).any(-1)
    assert changed.tolist() == [i == p for i in range(n)]


@pytest.mark.parametrize("name", ["clamp", "budget", "rotation", "conditional"])
def test_save_and_load_round_trip(tiny, kinds, name, tmp_path):
    iv = kinds[name].with_unit(1.7)
    again = tl_steer.load(tl_steer.save(iv, tmp_path / name), model=tiny)
    assert type(again) is type(iv) and again.unit == iv.unit and again.config() == iv.config()
    for key, t in iv.tensors().items():
        assert torch.equal(again.tensors()[key], t)
    torch.testing.assert_close(resid(tiny, again.hooks(0.8)), resid(tiny, iv.hooks(0.8)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["clamp", "budget", "rotation", "conditional"])
def test_cached_and_uncached_generation_agree(tiny, kinds, name):
    iv = kinds[name]
    kw = dict(max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens")
    with tl_steer.steer(tiny, iv, m=2.0):
        cached = tiny.generate("hello world, the", use_past_kv_cache=True, **kw)
        uncached = tiny.generate("hello world, the", use_past_kv_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert no_hooks_left(tiny)


def test_left_padded_batches_steer_each_row_as_alone(tiny, kinds):
    """Per-token kinds: a row's steered activations do not depend on the other rows or on padding."""
    iv = kinds["budget"]
    texts = ["hello world", "The food was wonderful and the staff"]
    tokens = tiny.to_tokens(texts, padding_side="left")
    mask = (tokens != tiny.tokenizer.pad_token_id).long()
    with tl_steer.steer(tiny, iv, m=2.0):
        alone = [tiny(tiny.to_tokens(t))[0, -1] for t in texts]
        batch = tiny(tokens, attention_mask=mask)[:, -1]
    clean = tiny(tokens, attention_mask=mask)[:, -1]
    assert not torch.allclose(batch, clean)
    for i in range(2):
        torch.testing.assert_close(batch[i], alone[i], rtol=0, atol=1e-8)


def test_linear_kinds_take_a_strength_per_row(tiny, kinds):
    clamp, rot = kinds["clamp"], kinds["rotation"]
    tokens = tiny.to_tokens([TEXT, TEXT])
    rows = tiny.run_with_hooks(tokens, fwd_hooks=clamp.row_hooks(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    for i, m in enumerate((0.5, 2.0)):
        torch.testing.assert_close(rows[i], tiny.run_with_hooks(tokens[i : i + 1], fwd_hooks=clamp.hooks(m))[0])
    with pytest.raises(ConfigError, match="linear_in_m"):
        rot.row_hooks(torch.tensor([0.5, 2.0]))
    # a Conditional is linear exactly when what it wraps is
    gated = kinds["conditional"]
    assert gated.linear_in_m and not Conditional(rot, HOOK, gated.weight, gated.bias).linear_in_m
    rows = tiny.run_with_hooks(tokens, fwd_hooks=gated.row_hooks(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    for i, m in enumerate((0.5, 2.0)):
        torch.testing.assert_close(rows[i], tiny.run_with_hooks(tokens[i : i + 1], fwd_hooks=gated.hooks(m))[0])


# ----- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_level_outside_the_open_unit_interval_is_refused(tiny, acts, probe, q):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        projection_clamp(tiny, None, HOOK, q=q, activations=acts)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        budgeted_addition(tiny, None, HOOK, probe, q=q, activations=acts)


def test_a_fit_for_another_hook_is_refused(tiny, acts, probe):
    other = "blocks.2.hook_resid_post"
    with pytest.raises(ConfigError, match="fitted at"):
        budgeted_addition(tiny, None, other, probe, activations=acts)
    with pytest.raises(HookNameError, match="fitted at"):
        projection_clamp(tiny, None, other, activations=acts)
    with pytest.raises(HookNameError, match="fitted at"):
        budgeted_addition(tiny, None, HOOK, probe, activations=acts, base=AddVector(other, acts.diffmean.float()))
    budget = budgeted_addition(tiny, None, HOOK, probe, activations=acts)
    config = dict(budget.config(), hook=other)
    with pytest.raises(HookNameError, match="fitted at"):
        BudgetedAddition.from_saved(config, budget.tensors(), {})


def test_a_fit_for_another_model_or_width_is_refused(tiny, kinds, tmp_path):
    other = make_model("llama", seed=5)
    wide = make_model("llama", d_model=48)
    for name, iv in kinds.items():
        with pytest.raises(ModelMismatchError):
            iv.check(other)
        with pytest.raises(ModelMismatchError):
            tl_steer.load(tl_steer.save(iv, tmp_path / name), model=other)
        bare = type(iv).from_saved(iv.config(), iv.tensors(), {})  # no identity recorded: the width decides
        with pytest.raises(ShapeError, match="width"):
            bare.check(wide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few reference tokens for the width
        probe48 = ManifoldProbe.fit(wide, TEXTS[:4], HOOK, k=4, progress=False)
    with pytest.raises(ModelMismatchError):
        budgeted_addition(tiny, PAIRS, HOOK, probe48)


def test_bad_tensors_and_orders_are_refused(tiny, kinds):
    clamp = kinds["clamp"]
    with pytest.raises(ShapeError):
        ProjectionClamp(HOOK, torch.zeros(3, 3), 1.0)
    with pytest.raises(tl_steer.DataError, match="zero"):
        Rotation(HOOK, torch.zeros(32))
    with pytest.raises(ConfigError, match="finite"):
        ProjectionClamp(HOOK, clamp.direction, float("inf"))
    inner = AddVector("blocks.0.hook_resid_post", clamp.direction)
    with pytest.raises(HookNameError, match="does not run before"):
        Conditional(inner, HOOK, clamp.direction, 0.0)
    with pytest.raises(ConfigError, match="another Conditional"):
        Conditional(kinds["conditional"], HOOK, clamp.direction, 0.0)
    assert no_hooks_left(tiny)


# ----- conditional steering per prompt -----------------------------------------------------------


def prompt_mean(model, iv, text):
    """The mean condition score sigmoid(w . h + b) over ``text``'s positions, on the clean model alone."""
    h = resid_at_text(model, iv.hook, text)
    return float(torch.sigmoid(h.double() @ iv.weight.double() + iv.bias).mean())


def resid_at_text(model, hook, text):
    _, cache = model.run_with_cache(model.to_tokens(text), names_filter=hook)
    return cache[hook][0]


def per_prompt(iv, tau):
    return Conditional(iv.inner, iv.hook, iv.weight, iv.bias, tau, "prompt")


def test_a_prompt_above_tau_is_steered_like_the_inner_alone_and_one_below_is_clean(tiny, kinds):
    iv = kinds["conditional"]
    mean = prompt_mean(tiny, iv, TEXT)
    clean = resid(tiny)
    alone = resid(tiny, iv.inner.hooks(2.0))
    above, below = per_prompt(iv, mean - 1e-6), per_prompt(iv, mean + 1e-6)
    assert torch.equal(resid(tiny, above.hooks(2.0)), alone)
    assert torch.equal(resid(tiny, below.hooks(2.0)), clean)
    # the per-token gate on the same text opens only at some tokens: the modes differ
    tokenwise = Conditional(iv.inner, iv.hook, iv.weight, iv.bias, mean - 1e-6)
    assert not torch.equal(resid(tiny, tokenwise.hooks(2.0)), alone)


def test_the_prompt_mean_counts_only_the_declared_prompt(tiny, kinds):
    """Teacher-forced scoring: the completion after the boundary does not enter the mean."""
    iv = kinds["conditional"]
    n = tiny.to_tokens(TEXT).shape[1]
    h = resid_at_text(tiny, iv.hook, TEXT)
    scores = torch.sigmoid(h.double() @ iv.weight.double() + iv.bias)
    p = n // 2
    head, whole = float(scores[:p].mean()), float(scores.mean())
    assert abs(head - whole) > 1e-4
    tau = (head + whole) / 2  # between the two means: the boundary decides
    gated = per_prompt(iv, tau)
    with tl_steer.prompt_boundary(p):
        steered = resid(tiny, gated.hooks(2.0))
    expected = resid(tiny, iv.inner.hooks(2.0)) if head > tau else resid(tiny)
    assert torch.equal(steered, expected)


def test_batched_rows_are_decided_independently_under_left_padding(tiny, kinds):
    iv = kinds["conditional"]
    texts = ["hello world", "The food was wonderful and the staff were rude"]
    means = [prompt_mean(tiny, iv, t) for t in texts]
    assert abs(means[0] - means[1]) > 1e-4
    # tau just beside the padded row's own mean (on the far side from the other row's): counting the
    # padding in the mean would flip that row's decision
    gated = per_prompt(iv, means[0] + (1e-6 if means[1] > means[0] else -1e-6))
    assert (means[0] > gated.tau) != (means[1] > gated.tau)
    tokens = tiny.to_tokens(texts, padding_side="left")
    mask = (tokens != tiny.tokenizer.pad_token_id).long()
    with tl_steer.steer(tiny, gated, m=2.0):
        batch = tiny(tokens, attention_mask=mask)[:, -1]
    for i, t in enumerate(texts):
        hooks = iv.inner.hooks(2.0) if means[i] > gated.tau else []
        alone = tiny.run_with_hooks(tiny.to_tokens(t), fwd_hooks=hooks)[0, -1]
        torch.testing.assert_close(batch[i], alone, rtol=0, atol=1e-8)
    assert no_hooks_left(tiny)


@pytest.mark.parametrize("side", ["above", "below"])
def test_the_prompt_decision_holds_for_the_cached_steps(tiny, kinds, side):
    iv = kinds["conditional"]
    prompt = "hello world, the"
    mean = prompt_mean(tiny, iv, prompt)
    gated = per_prompt(iv, mean - 1e-6 if side == "above" else mean + 1e-6)
    kw = dict(max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens")
    with tl_steer.steer(tiny, gated, m=2.0):
        cached = tiny.generate(prompt, use_past_kv_cache=True, **kw)
        uncached = tiny.generate(prompt, use_past_kv_cache=False, **kw)
    if side == "above":
        with tl_steer.steer(tiny, iv.inner, m=2.0):
            expected = tiny.generate(prompt, use_past_kv_cache=True, **kw)
    else:
        expected = tiny.generate(prompt, use_past_kv_cache=True, **kw)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)
    assert no_hooks_left(tiny)


def test_the_per_prompt_mode_is_saved_and_loaded(tiny, kinds, tmp_path):
    iv = kinds["conditional"]
    gated = per_prompt(iv, prompt_mean(tiny, iv, TEXT) - 1e-6)
    again = tl_steer.load(tl_steer.save(gated, tmp_path / "per_prompt"), model=tiny)
    assert isinstance(again, Conditional) and again.per == "prompt" and again.config() == gated.config()
    assert torch.equal(resid(tiny, again.hooks(2.0)), resid(tiny, iv.inner.hooks(2.0)))
    with pytest.raises(tl_steer.FileFormatError, match="per"):
        Conditional.from_saved(dict(gated.config(), per="sentence"), gated.tensors(), {})


def test_a_bad_per_prompt_mode_is_refused(tiny, kinds):
    iv = kinds["conditional"]
    with pytest.raises(ConfigError, match="'token' or 'prompt'"):
        Conditional(iv.inner, iv.hook, iv.weight, iv.bias, 0.5, "sentence")
    early = "blocks.0.hook_resid_pre"
    inner = AddVector(early, iv.inner.vector)
    with pytest.raises(HookNameError, match="before any attention"):
        Conditional(inner, early, iv.weight, iv.bias, 0.5, "prompt")
    assert no_hooks_left(tiny)
