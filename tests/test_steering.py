"""Interventions and steer(): strength, composition, hook removal, position policies, padding, KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import BRIDGE_ARCHITECTURES, make_bridge, make_model, no_hooks_left

import tl_steer
from tl_steer import AddVector, HookNameError, ShapeError, steer


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


HOOK = "blocks.1.hook_resid_post"
TEXT = "hello world, the weather is fine"


def vector(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=model.cfg.dtype)


def logits(model, tokens, **kw):
    with torch.no_grad():
        return model(tokens, **kw)


def capture(model, tokens, name, fwd_hooks=()):
    """The activation at ``name`` after ``fwd_hooks`` ran (the capture hook is added last)."""
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (name, grab)], return_type=None)
    return seen["act"]


def test_m_zero_is_clean_model_bit_for_bit(tiny_any):
    model = tiny_any
    tokens = model.to_tokens(TEXT)
    iv = AddVector(HOOK, vector(model))
    clean = logits(model, tokens)
    with steer(model, iv, m=0.0):
        steered = logits(model, tokens)
    assert torch.equal(clean, steered)
    assert iv.hooks(0.0) == []


def test_add_vector_matches_hand_written_hook(tiny_any):
    model = tiny_any
    tokens = model.to_tokens(TEXT)
    v = vector(model)
    expected = logits_with(model, tokens, [(HOOK, lambda a, hook: a + 2.5 * v)])
    with steer(model, AddVector(HOOK, v), m=2.5):
        got = logits(model, tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(got, logits(model, tokens))
    # .hooks() gives the same thing through run_with_hooks.
    got2 = logits_with(model, tokens, AddVector(HOOK, v).hooks(2.5))
    torch.testing.assert_close(got2, expected, rtol=0, atol=1e-12)


def logits_with(model, tokens, fwd_hooks):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)


def test_composition_adds_and_takes_one_strength_each(tiny):
    model = tiny
    tokens = model.to_tokens(TEXT)
    a, b = vector(model, 1), vector(model, 2)
    with steer(model, AddVector(HOOK, a), AddVector(HOOK, b), m=[2.0, -1.0]):
        both = logits(model, tokens)
    with steer(model, AddVector(HOOK, 2.0 * a - b), m=1.0):
        single = logits(model, tokens)
    torch.testing.assert_close(both, single, rtol=0, atol=1e-10)
    # Nested steer blocks compose the same way.
    with steer(model, AddVector(HOOK, a), m=2.0), steer(model, AddVector(HOOK, b), m=-1.0):
        nested = logits(model, tokens)
    torch.testing.assert_close(nested, single, rtol=0, atol=1e-10)
    assert no_hooks_left(model)


def test_hooks_removed_when_body_raises(tiny):
    model = tiny
    with pytest.raises(RuntimeError, match="boom"), steer(model, AddVector(HOOK, vector(model)), m=1.0):
        assert not no_hooks_left(model)
        raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert "generate" not in vars(model)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: AddVector("blocks.1.hook_resid_pots", vector(m)), HookNameError, "blocks.1.hook_resid_post"),
        (lambda m: AddVector(HOOK, torch.ones(m.cfg.d_model + 1)), ShapeError, "width"),
    ],
)
def test_bad_intervention_raises_before_any_hook(tiny, make, error, match):
    model = tiny
    with pytest.raises(error, match=match), steer(model, make(model), m=1.0):
        pass
    assert no_hooks_left(model)


@pytest.mark.parametrize("m", [float("nan"), float("inf"), "2"])
def test_bad_strength_raises(tiny, m):
    with pytest.raises((ValueError, TypeError)), steer(tiny, AddVector(HOOK, vector(tiny)), m=m):
        pass
    assert no_hooks_left(tiny)


def test_bad_vectors_and_policies():
    with pytest.raises(ShapeError):
        AddVector(HOOK, torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite|NaN"):
        AddVector(HOOK, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="last_prompt"):
        AddVector(HOOK, torch.ones(3), positions="completion-ish")


def test_model_identity_mismatch_is_an_error(tiny):
    other = make_model("llama", seed=5)
    iv = AddVector(HOOK, vector(tiny), model_identity=tl_steer.model_identity(tiny))
    with pytest.raises(tl_steer.ModelMismatchError), steer(other, iv):
        pass
    assert no_hooks_left(other)


# ----- position policies -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last_prompt"])
def test_policy_steers_exactly_the_selected_positions(tiny, policy):
    model = tiny
    tokens = model.to_tokens(TEXT)
    n = tokens.shape[1]
    prompt_len = 4
    v = vector(model)
    iv = AddVector(HOOK, v, positions=policy)
    clean = capture(model, tokens, HOOK)
    with tl_steer.prompt_boundary(prompt_len):
        steered = capture(model, tokens, HOOK, iv.hooks(1.5))
    delta = steered - clean
    pos = torch.arange(n)
    expected = {
        "all": pos >= 0,
        "prompt": pos < prompt_len,
        "generated": pos >= prompt_len,
        "last_prompt": pos == prompt_len - 1,
    }[policy]
    torch.testing.assert_close(delta[0, expected], (1.5 * v).expand(int(expected.sum()), -1), rtol=0, atol=1e-12)
    assert torch.equal(delta[0, ~expected], torch.zeros_like(delta[0, ~expected]))


def test_policy_per_row_prompt_lengths_and_mask(tiny):
    model = tiny
    tokens = torch.cat([model.to_tokens(TEXT)] * 2)
    v = vector(model)
    clean = capture(model, tokens, HOOK)
    with tl_steer.prompt_boundary([2, 5]):
        steered = capture(model, tokens, HOOK, AddVector(HOOK, v, positions="prompt").hooks(1.0))
    changed = (steered - clean).abs().sum(-1) > 0
    assert changed[0].nonzero().flatten().tolist() == [0, 1]
    assert changed[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    mask = torch.zeros(tokens.shape[1], dtype=torch.bool)
    mask[[1, 3]] = True
    steered = capture(model, tokens, HOOK, AddVector(HOOK, v, positions=mask).hooks(1.0))
    changed = (steered - clean).abs().sum(-1) > 0
    assert changed[0].nonzero().flatten().tolist() == [1, 3]


def test_without_boundary_the_whole_input_is_the_prompt(tiny):
    model = tiny
    tokens = model.to_tokens(TEXT)
    clean = logits(model, tokens)
    generated_only = logits_with(model, tokens, AddVector(HOOK, vector(model), positions="generated").hooks(3.0))
    assert torch.equal(clean, generated_only)


def test_policy_before_first_attention_is_refused(tiny):
    iv = AddVector("blocks.0.hook_resid_pre", vector(tiny), positions="prompt")
    with pytest.raises(HookNameError, match="before any attention"), steer(tiny, iv):
        pass
    assert no_hooks_left(tiny)


def test_left_padding_steers_each_row_like_alone(tiny_any):
    """Under left padding, last_prompt is the last real token of every row; each row's final logits
    equal those of the same prompt run alone."""
    check_left_padding(tiny_any, atol=1e-8)


@pytest.fixture(scope="module", params=BRIDGE_ARCHITECTURES)
def bridge_any(request):
    """The tiny models as TransformerBridges. The Llama is float32 here: TransformerLens 3.9's bridge gives NaN
    logits for a left-padded row of a float64 Llama (its attention mask sentinel; float32 is fine)."""
    return make_bridge(request.param, dtype=torch.float32 if request.param == "llama" else torch.float64)


def test_left_padding_and_generation_on_the_bridge(bridge_any):
    model = bridge_any
    check_left_padding(model, atol=1e-8 if model.cfg.dtype == torch.float64 else 1e-4)
    for policy in ("all", "generated", "last_prompt"):
        iv = AddVector(HOOK, vector(model, scale=6.0), positions=policy)
        with steer(model, iv, m=1.0):
            cached = generate(model, "hello world", use_past_kv_cache=True)
            uncached = generate(model, "hello world", use_past_kv_cache=False)
            # Left-padded batched generation: each row as when generated alone.
            prompts = ["hello world", "the food was awful and"]
            batch = generate(model, prompts, padding_side="left")
            alone = [generate(model, p)[0] for p in prompts]
        assert torch.equal(cached, uncached), policy
        for row, one in zip(batch, alone, strict=True):
            assert torch.equal(row[-len(one) :], one), policy
    assert no_hooks_left(model) and "generate" not in vars(model)


def check_left_padding(model, atol):
    prompts = ["hello world", "the food was awful and the room was cold"]
    tokens = model.to_tokens(prompts, padding_side="left")
    mask = (tokens != model.tokenizer.pad_token_id).long()
    iv = AddVector(HOOK, vector(model).to(model.cfg.dtype), positions="last_prompt")
    with steer(model, iv, m=2.0):
        batched = logits(model, tokens, attention_mask=mask)[:, -1]
        alone = torch.stack([logits(model, model.to_tokens(p))[0, -1] for p in prompts])
    torch.testing.assert_close(batched, alone, rtol=0, atol=atol)


# ----- generation and the KV cache ---------------------------------------------------------------


def generate(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=10, do_sample=False, verbose=False, return_type="tokens", **kw)


@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last_prompt"])
@pytest.mark.parametrize("hook", [HOOK, "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out"])
def test_cached_and_uncached_generation_agree_while_steered(tiny_any, policy, hook):
    model = tiny_any
    iv = AddVector(hook, vector(model, scale=6.0), positions=policy)
    with steer(model, iv, m=1.0):
        cached = generate(model, "hello world", use_past_kv_cache=True)
        uncached = generate(model, "hello world", use_past_kv_cache=False)
    assert torch.equal(cached, uncached)
    assert no_hooks_left(model)


def test_generated_policy_leaves_the_prompt_pass_alone(tiny):
    model = tiny
    prompt = "hello world"
    n_prompt = model.to_tokens(prompt).shape[1]
    clean = generate(model, prompt)
    iv = AddVector(HOOK, vector(model, scale=20.0), positions="generated")
    seen = []

    def record(act, hook):
        seen.append(act.shape[1])

    with steer(model, iv, m=1.0):
        # The prompt pass is unchanged, so the first new token is the clean one ...
        first = model.generate(prompt, max_new_tokens=1, do_sample=False, verbose=False, return_type="tokens")
        # ... and steering does act on the generated tokens.
        steered = generate(model, prompt)
    assert torch.equal(first[0, n_prompt], clean[0, n_prompt])
    assert not torch.equal(steered, clean)
    # Under the cache, the intervention's hook sees the prompt once, then one position per step.
    with steer(model, iv, m=1.0), model.hooks(fwd_hooks=[(HOOK, record)]):
        generate(model, prompt, use_past_kv_cache=True)
    assert seen[0] == n_prompt and set(seen[1:]) == {1}


def test_prompt_policy_under_cache_equals_full_recompute(tiny):
    """Steering the prompt only: each generated token's logits equal a teacher-forced pass over the
    whole sequence so far with the vector added at the prompt positions only."""
    model = tiny
    prompt = "hello world"
    n_prompt = model.to_tokens(prompt).shape[1]
    v = vector(model, scale=6.0)
    iv = AddVector(HOOK, v, positions="prompt")
    with steer(model, iv, m=1.0):
        out = generate(model, prompt, use_past_kv_cache=True)
    add_prompt = [(HOOK, lambda a, hook: torch.cat([a[:, :n_prompt] + v, a[:, n_prompt:]], dim=1))]
    expected = logits_with(model, out[:, :-1], add_prompt).argmax(-1)[0, n_prompt - 1 :]
    assert torch.equal(out[0, n_prompt:], expected)


# ----- the contract every kind follows: unit, hooks(m, *, model), declared capabilities ------------------
class _Tanh(tl_steer.Intervention):
    """A kind whose change is not linear in its strength: h <- h + tanh(raw) * v (a test double)."""

    kind = "test_tanh"

    def __init__(self, hook, v, **common):
        super().__init__(**common)
        self.hook, self.v = hook, v

    @property
    def hook_names(self):
        return (self.hook,)

    def _edits(self, model):
        return [(self.hook, lambda act, hook, raw: torch.tanh(torch.as_tensor(raw)) * self.v)]

    def widths(self):
        return {self.hook: int(self.v.shape[0])}

    def tensors(self):
        return {"v": self.v}

    def config(self):
        return {"hook": self.hook}

    @classmethod
    def from_saved(cls, config, tensors, common):
        return cls(config["hook"], tensors["v"], **common)


class _NeedsModel(_Tanh):
    """Adds raw * (the model's first embedding row): its edit reads the model it steers."""

    kind = "test_needs_model"
    linear_in_m = True
    needs_model = True

    def _edits(self, model):
        assert model is not None
        row = model.W_E[0].detach()
        return [(self.hook, lambda act, hook, raw: raw * row)]


def test_unit_scales_the_edit_and_m_1_is_the_unit(tiny):
    model = tiny
    tokens = model.to_tokens(TEXT)
    v = vector(model)
    with steer(model, AddVector(HOOK, v, unit=4.0), m=0.5):
        got = logits(model, tokens)
    expected = logits_with(model, tokens, [(HOOK, lambda a, hook: a + 2.0 * v)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    iv = AddVector(HOOK, v, unit=4.0)
    assert iv.raw_strength(0.5) == 2.0 and iv.hooks(0.0) == []
    twin = iv.with_unit(1.0)
    assert twin.vector is iv.vector and iv.unit == 4.0
    torch.testing.assert_close(logits_with(model, tokens, twin.hooks(2.0)), expected, rtol=0, atol=1e-12)
    assert "unit=4" in repr(iv)


@pytest.mark.parametrize("unit", [0.0, -1.0, float("nan"), float("inf"), "2", True, None])
def test_bad_unit_is_refused(unit):
    with pytest.raises(tl_steer.ConfigError, match="unit"):
        AddVector(HOOK, torch.ones(4), unit=unit)
    with pytest.raises(tl_steer.ConfigError, match="unit"):
        AddVector(HOOK, torch.ones(4)).with_unit(unit)


def test_row_hooks_refuse_a_kind_not_linear_in_m(tiny):
    iv = _Tanh(HOOK, vector(tiny))
    assert not iv.linear_in_m and AddVector.linear_in_m
    with pytest.raises(tl_steer.ConfigError, match=r"_Tanh \(kind 'test_tanh'\) does not declare linear_in_m"):
        iv.row_hooks(torch.tensor([1.0, 2.0]), model=tiny)
    # hooks(m) still works for it, with the unit applied before the edit sees the strength.
    tokens = tiny.to_tokens(TEXT)
    v = iv.v
    expected = logits_with(tiny, tokens, [(HOOK, lambda a, hook: a + torch.tanh(torch.tensor(0.6)) * v)])
    torch.testing.assert_close(logits_with(tiny, tokens, iv.with_unit(0.3).hooks(2.0)), expected)


def test_row_hooks_apply_the_unit(tiny):
    tokens = tiny.to_tokens([TEXT, TEXT])
    iv = AddVector(HOOK, vector(tiny), unit=3.0)
    batched = logits_with(tiny, tokens, iv.row_hooks(torch.tensor([1.0, -0.5]), model=tiny))
    torch.testing.assert_close(batched[0], logits_with(tiny, tokens[:1], iv.hooks(1.0))[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(batched[1], logits_with(tiny, tokens[:1], iv.hooks(-0.5))[0], rtol=0, atol=1e-10)


def test_a_kind_that_needs_the_model_gets_it_or_a_clear_error(tiny):
    iv = _NeedsModel(HOOK, vector(tiny))
    with pytest.raises(tl_steer.ConfigError, match=r"needs the model.*\.hooks\(m, model=model\)"):
        iv.hooks(1.0)
    assert iv.hooks(0.0) == []  # the clean model needs nothing
    tokens = tiny.to_tokens(TEXT)
    row = tiny.W_E[0].detach()
    expected = logits_with(tiny, tokens, [(HOOK, lambda a, hook: a + 2.0 * row)])
    torch.testing.assert_close(logits_with(tiny, tokens, iv.hooks(2.0, model=tiny)), expected, rtol=0, atol=1e-12)
    with steer(tiny, iv, m=2.0, check=False):  # steer passes the model
        torch.testing.assert_close(logits(tiny, tokens), expected, rtol=0, atol=1e-12)
    assert no_hooks_left(tiny)


def test_n_layers_is_a_deprecated_alias(tiny):
    iv = AddVector("ln_final.hook_normalized", torch.ones(tiny.cfg.d_model), positions="prompt")
    with pytest.warns(DeprecationWarning, match="n_layers"):
        old = iv.hooks(1.0, n_layers=tiny.cfg.n_layers)
    assert [name for name, _ in old] == [name for name, _ in iv.hooks(1.0, model=tiny)]
