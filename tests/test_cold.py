"""COLD-Steer: the kernel is the activation gradient, FD/JVP match a real gradient step, one perturbed pass
per forward pass, no parameter gradients, the model untouched, generation, save/load, bad input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, SENTIMENT_PAIRS, TINY_HOOK, make_model, no_hooks_left
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer import ContrastivePair, DataError, HookNameError, TlSteerError
from tl_steer.data.ab import ABItem
from tl_steer.methods.cold import (
    ColdFD,
    cold_fd,
    cold_fd_prefixes,
    cold_kernel,
    cold_kernel_prefixes,
    example_losses,
    parameters_before,
)

HOOK = TINY_HOOK
PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS[:4]]
POSITIVE_ONLY = [(p.prompt, p.positive) for p in PAIRS]
TEXTS = ["hello world, the weather is fine today.", "The food was awful"]


@pytest.fixture(scope="module")
def gpt2() -> HookedTransformer:
    return make_model("gpt2")


def right_padded(model: HookedTransformer, texts=TEXTS) -> torch.Tensor:
    return model.to_tokens(list(texts), padding_side="right")


def capture(model: HookedTransformer, tokens: torch.Tensor, name: str, fwd_hooks=()) -> torch.Tensor:
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (name, grab)], return_type=None)
    return seen["act"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def logprob(model, prompt: str, completion: str) -> torch.Tensor:
    """log p(completion | prompt), mean over completion tokens: an unbatched, hand-written version."""
    full = model.to_tokens(prompt + completion)
    p_len = model.to_tokens(prompt).shape[1]
    lp = model(full).log_softmax(-1)[0, p_len - 1 : -1]
    return lp.gather(-1, full[0, p_len:, None]).mean()


def hand_loss(model, example, beta=0.1) -> torch.Tensor:
    if isinstance(example, ContrastivePair):
        margin = logprob(model, example.prompt, example.positive) - logprob(model, example.prompt, example.negative)
        return -F.logsigmoid(beta * margin)
    return -logprob(model, *example)


# ----- losses -------------------------------------------------------------------------------------


def test_example_losses_match_hand_computation(tiny):
    for examples in (PAIRS, POSITIVE_ONLY):
        got = example_losses(tiny, examples, batch_size=3)
        with torch.no_grad():
            expected = torch.stack([hand_loss(tiny, ex) for ex in examples])
        torch.testing.assert_close(got, expected.double(), rtol=1e-9, atol=1e-12)
    # loss="nll" on pairs scores their positive completions.
    torch.testing.assert_close(example_losses(tiny, PAIRS, loss="nll"), example_losses(tiny, POSITIVE_ONLY))


# ----- COLD-Kernel: exactly the activation gradient ------------------------------------------------


@pytest.mark.parametrize("where", ["last_prompt", "completion"])
@pytest.mark.parametrize("examples", [PAIRS, POSITIVE_ONLY], ids=["dpo", "nll"])
def test_kernel_is_the_gradient_wrt_the_activation(tiny_any, where, examples):
    model = tiny_any
    eta = 0.7
    iv = cold_kernel(model, examples, HOOK, eta=eta, where=where, batch_size=3)
    # Independently: one example at a time, the activation as a leaf, the loss written by hand.
    total = torch.zeros(model.cfg.d_model, dtype=torch.float64)
    for ex in examples:
        prompt = ex.prompt if isinstance(ex, ContrastivePair) else ex[0]
        completions = [ex.positive, ex.negative] if isinstance(ex, ContrastivePair) else [ex[1]]
        leaves, lps = [], []
        for completion in completions:
            seen = {}

            def leaf(act, hook, seen=seen):
                seen["x"] = act.detach().requires_grad_(True)
                return seen["x"]

            full = model.to_tokens(prompt + completion)
            p_len = model.to_tokens(prompt).shape[1]
            logits = model.run_with_hooks(full, fwd_hooks=[(HOOK, leaf)])
            lp = logits.log_softmax(-1)[0, p_len - 1 : -1].gather(-1, full[0, p_len:, None]).mean()
            leaves.append((seen["x"], p_len, full.shape[1]))
            lps.append(lp)
        loss = -F.logsigmoid(0.1 * (lps[0] - lps[1])) if len(lps) == 2 else -lps[0]
        grads = torch.autograd.grad(loss, [x for x, _, _ in leaves])
        for grad, (_, p_len, length) in zip(grads, leaves, strict=True):
            total += grad[0, p_len - 1] if where == "last_prompt" else grad[0, p_len:length].mean(0)
    expected = -eta * total / len(examples)
    torch.testing.assert_close(iv.vector, expected, rtol=1e-8, atol=1e-12)
    assert iv.method == "cold_kernel" and iv.info["n_examples"] == len(examples)
    assert all(p.grad is None for p in model.parameters())


def test_kernel_sets_no_parameter_grad_and_restores_flags(tiny):
    model = tiny
    first = next(model.parameters())
    first.requires_grad_(False)  # a flag that differs from the others must come back as it was
    try:
        flags = [p.requires_grad for p in model.parameters()]
        cold_kernel(model, PAIRS, HOOK)
        cold_fd(model, PAIRS, HOOK, fd_method="jvp")
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())

        # Also when the forward pass raises half-way.
        def boom(act, hook):
            raise RuntimeError("boom")

        with model.hooks(fwd_hooks=[("blocks.2.hook_resid_post", boom)]):
            with pytest.raises(RuntimeError, match="boom"):
                cold_kernel(model, PAIRS, HOOK)
            with pytest.raises(RuntimeError, match="boom"):
                cold_fd(model, PAIRS, HOOK)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(p.grad is None for p in model.parameters())
        assert no_hooks_left(model)
    finally:
        first.requires_grad_(True)


# ----- COLD-FD: the change a real gradient step makes -----------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("examples", [PAIRS, POSITIVE_ONLY], ids=["dpo", "nll"])
def test_fd_and_jvp_match_a_real_gradient_step(arch, examples, request):
    model = make_model(arch) if arch != "llama" else request.getfixturevalue("tiny")
    eta = 1e-3
    fd = cold_fd(model, examples, HOOK, eta=eta, fd_method="fd", eps=1e-6, batch_size=3)
    jvp = cold_fd(model, examples, HOOK, eta=eta, fd_method="jvp", batch_size=3)
    kernel = cold_kernel(model, examples, HOOK, eta=eta)

    # The true change: take the gradient step on a copy, with the loss written by hand.
    stepped = copy.deepcopy(model)
    params = dict(stepped.named_parameters())
    theta = {k: v.detach().clone() for k, v in params.items()}
    names = parameters_before(stepped, HOOK)
    loss = sum(hand_loss(stepped, ex) for ex in examples) / len(examples)
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))

    def step(size: float) -> None:
        with torch.no_grad():
            for name in names:
                params[name].copy_(theta[name] - size * grads[name])

    # The stored g is that gradient (block parameters, and the non-zero rows of the embedding).
    for name, g in fd.grads.items():
        torch.testing.assert_close(g, grads[name], rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(fd.embed_grad, grads["embed.W_E"][fd.embed_index], rtol=1e-8, atol=1e-14)
    assert bool((grads["embed.W_E"].abs().sum(-1) > 0).sum() == fd.embed_index.numel())
    if arch == "gpt2":
        torch.testing.assert_close(fd.pos_grad, grads["pos_embed.W_pos"], rtol=1e-8, atol=1e-14)

    tokens = right_padded(model)
    clean = capture(model, tokens, HOOK)
    step(eta)
    true_change = capture(stepped, tokens, HOOK) - clean
    step(eta / 2)
    true_half = capture(stepped, tokens, HOOK) - clean
    # At raw strength 1 (unit 1): the published step -eta J g, not m = 1's scale to DiffMean's norm.
    d_fd = capture(model, tokens, HOOK, fd.with_unit(1.0).hooks(1.0, model=model)) - clean
    d_jvp = capture(model, tokens, HOOK, jvp.with_unit(1.0).hooks(1.0, model=model)) - clean
    d_kernel = capture(model, tokens, HOOK, kernel.with_unit(1.0).hooks(1.0)) - clean
    cos_fd, cos_jvp, cos_kernel = cosine(d_fd, true_change), cosine(d_jvp, true_change), cosine(d_kernel, true_change)
    print(
        f"\n[{arch}/{examples[0].__class__.__name__}] cos(fd, true)={cos_fd:.8f} cos(jvp, true)={cos_jvp:.8f} "
        f"cos(kernel, true)={cos_kernel:.4f}"
    )
    assert cos_fd >= 0.99 and cos_jvp >= 0.99
    # What is true beyond the cosine: jvp is the first-order term, so its error is O(eta^2) (halving
    # eta quarters it) and small against the change itself.
    err, err_half = (d_jvp - true_change).norm(), (d_jvp / 2 - true_half).norm()
    assert err <= 1e-2 * true_change.norm()
    assert 3.5 <= float(err / err_half) <= 4.5
    assert no_hooks_left(model)


def fp32_model(arch: str) -> HookedTransformer:
    """A tiny float32 model with GPT-2's initialisation scale (0.02)."""
    return make_model(arch, dtype=torch.float32, initializer_range=0.02)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fd_and_jvp_agree_in_float32(arch):
    model = fp32_model(arch)
    fd = cold_fd(model, PAIRS, HOOK, fd_method="fd", eps=1e-3)
    jvp = cold_fd(model, PAIRS, HOOK, fd_method="jvp")
    tokens = right_padded(model)
    clean = capture(model, tokens, HOOK)
    d_fd = capture(model, tokens, HOOK, fd.with_unit(1.0).hooks(1.0, model=model)) - clean
    d_jvp = capture(model, tokens, HOOK, jvp.with_unit(1.0).hooks(1.0, model=model)) - clean
    rel = float((d_fd - d_jvp).norm() / d_jvp.norm())
    print(f"\n[{arch} fp32] |fd - jvp| / |jvp| = {rel:.2e} (eps=1e-3)")
    assert rel <= 1e-3


def test_fd_warns_when_eps_is_lost_to_rounding():
    model = fp32_model("llama")
    with pytest.warns(UserWarning, match="lost to rounding"):
        iv = cold_fd(model, PAIRS, HOOK, fd_method="fd", eps=1e-9)
    assert iv.info["fd_rounding_error"] > 0.2


def logits_change(model: HookedTransformer, iv: ColdFD, tokens: torch.Tensor) -> torch.Tensor:
    """The change of the logits that ``iv`` makes at raw strength 1 (unit 1, so that two interventions
    whose units were measured separately are compared at the same strength)."""
    with torch.no_grad():
        clean = model(tokens)
        with tl_steer.steer(model, iv.with_unit(1.0), m=1.0):
            return model(tokens) - clean


def test_default_is_the_exact_jvp_within_one_percent_of_an_accurate_finite_difference(tiny):
    """The default of cold_fd is the exact forward-mode product; in float64 a finite difference with a small
    step is an independent, accurate estimate of the same change, and the default agrees with it to 1%."""
    model = tiny  # float64
    default = cold_fd(model, PAIRS, HOOK)
    assert default.fd_method == "jvp"
    fd = cold_fd(model, PAIRS, HOOK, fd_method="fd", eps=1e-6)
    assert fd.fd_method == "fd" and fd.eps == 1e-6
    tokens = right_padded(model)
    exact, approx = logits_change(model, default, tokens), logits_change(model, fd, tokens)
    rel = float((approx - exact).norm() / exact.norm())
    print(f"\n[tiny float64] |fd(eps=1e-6) - default| / |default| = {rel:.2e}")
    assert exact.norm() > 0 and rel <= 1e-2
    # The published setting stays one argument away, with the published step.
    assert cold_fd(model, PAIRS, HOOK, fd_method="fd").eps == 1e-6
    with pytest.raises(ValueError, match="no effect with fd_method='jvp'"):
        cold_fd(model, PAIRS, HOOK, eps=1e-3)
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())


@pytest.mark.default_model
def test_default_model_published_eps_is_far_from_the_jvp(default_model):
    """On the default model in float32 the published step (eps = 1e-6) is far from the exact JVP in the
    steered logits' change, and eps = 1e-3 is close: the reason the default is the JVP. Prints the numbers
    the README quotes."""
    model = default_model
    pairs = tl_steer.load_pairs("sentiment", "train")[:2]
    hook = "blocks.15.hook_resid_post"
    tokens = model.to_tokens(["I tried the new bakery and", "The weather today is"], padding_side="right")
    exact = logits_change(model, cold_fd(model, pairs, hook), tokens)
    rels = {}
    for eps in (1e-6, 1e-3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the rounding warning at 1e-6 is the point here
            fd = cold_fd(model, pairs, hook, fd_method="fd", eps=eps)
        rels[eps] = float((logits_change(model, fd, tokens) - exact).norm() / exact.norm())
    print(f"\n[default model fp32] |fd - jvp| / |jvp| of the steered logits' change: {rels}")
    assert rels[1e-6] > 0.1 and rels[1e-3] < 0.02


def test_one_perturbed_partial_pass_per_forward_whatever_n(tiny):
    model = tiny
    tokens = right_padded(model, TEXTS + ["The staff were kind"])
    for method in ("fd", "jvp"):
        for n_examples, iv in cold_fd_prefixes(model, PAIRS, HOOK, [1, len(PAIRS)], method=method):
            calls = [0] * model.cfg.n_layers

            def count(i: int, calls: list[int] = calls):
                return lambda *_: calls.__setitem__(i, calls[i] + 1)

            handles = [block.register_forward_hook(count(i)) for i, block in enumerate(model.blocks)]
            try:
                with tl_steer.steer(model, iv, m=1.0), torch.no_grad():
                    model(tokens)
            finally:
                for h in handles:
                    h.remove()
            assert iv.n_perturbed_passes == 1
            # Blocks 0..1 run in the normal pass and in the one perturbed pass; block 2 once.
            assert calls == [2, 2, 1], (method, n_examples, calls)


def test_model_unchanged_and_no_hooks_left(tiny):
    model = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iv = cold_fd(model, PAIRS, HOOK)
    with tl_steer.steer(model, iv, m=2.0):
        tl_steer.completion_nll(model, ["The film was"], [" wonderful"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks_left(model)


def test_perturbed_pass_sees_no_other_hooks_and_triggers_none(tiny):
    """A recording hook before the COLD-FD hook records the normal pass only (the perturbed pass runs
    with hooks suspended), and jvp composes with an earlier intervention without being changed by it."""
    model = tiny
    tokens = right_padded(model)
    jvp = cold_fd(model, PAIRS, HOOK, fd_method="jvp")
    seen = []
    with tl_steer.steer(model, jvp, m=1.0), torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: seen.append(a))])
    assert len(seen) == 1
    # jvp's dZ does not depend on an intervention before it.
    clean = capture(model, tokens, HOOK)
    alone = capture(model, tokens, HOOK, jvp.hooks(1.0, model=model)) - clean
    shift = tl_steer.AddVector("blocks.0.hook_resid_post", torch.ones(model.cfg.d_model, dtype=torch.float64))
    shifted = capture(model, tokens, HOOK, shift.hooks(1.0))
    both = capture(model, tokens, HOOK, [*shift.hooks(1.0), *jvp.hooks(1.0, model=model)]) - shifted
    torch.testing.assert_close(both, alone, rtol=1e-10, atol=1e-12)


def test_padding_and_batching_do_not_change_dz(gpt2):
    model = gpt2
    iv = cold_fd(model, PAIRS, HOOK, fd_method="jvp", eta=0.1)
    batch = right_padded(model)
    clean = capture(model, batch, HOOK)
    steered = capture(model, batch, HOOK, iv.hooks(1.0, model=model))
    for row, text in enumerate(TEXTS):
        single = model.to_tokens(text)
        n = single.shape[1]
        alone = capture(model, single, HOOK, iv.hooks(1.0, model=model)) - capture(model, single, HOOK)
        torch.testing.assert_close((steered - clean)[row, :n], alone[0], rtol=1e-9, atol=1e-12)


def test_prefixes_equal_separate_runs(tiny):
    model = tiny
    fds = dict(cold_fd_prefixes(model, PAIRS, HOOK, [1, 3], batch_size=2))
    kernels = dict(cold_kernel_prefixes(model, PAIRS, HOOK, [3, 1], batch_size=2))
    assert sorted(fds) == [1, 3] and sorted(kernels) == [1, 3]
    for n in (1, 3):
        alone = cold_fd(model, PAIRS[:n], HOOK)
        for name, g in alone.grads.items():
            torch.testing.assert_close(fds[n].grads[name], g, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(fds[n].embed_grad, alone.embed_grad, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(kernels[n].vector, cold_kernel(model, PAIRS[:n], HOOK).vector, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="between 1 and"):
        next(cold_fd_prefixes(model, PAIRS, HOOK, [5]))


# ----- position policies and generation -----------------------------------------------------------


def test_position_policy_limits_the_steered_positions(tiny):
    model = tiny
    tokens = model.to_tokens("hello world, the weather is fine")
    iv = cold_fd(model, PAIRS, HOOK, fd_method="jvp", positions="last_prompt")
    clean = capture(model, tokens, HOOK)
    with tl_steer.prompt_boundary(4):
        steered = capture(model, tokens, HOOK, iv.hooks(1.0, model=model))
    changed = (steered - clean).abs().amax(-1)[0] > 0
    assert changed.tolist() == [i == 3 for i in range(tokens.shape[1])]


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_generation_cached_equals_uncached_when_steering_the_prompt(tiny_any, method):
    model = tiny_any
    # eta = 1.5 at m = 3 changes the greedy tokens on every tiny architecture (eta = 0.5 left the folded
    # GPT-2's unchanged).
    # At unit 1, the raw step, whose size eta sets (m = 1 would be DiffMean's norm, whatever eta).
    iv = cold_fd(model, PAIRS, HOOK, method=method, eta=1.5, positions="prompt").with_unit(1.0)
    kw = dict(max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens")
    clean = model.generate("hello world, the", **kw)
    out = {}
    for cache in (True, False):
        with tl_steer.steer(model, iv, m=3.0):
            out[cache] = model.generate("hello world, the", use_past_kv_cache=cache, **kw)
    assert torch.equal(out[True], out[False])
    assert not torch.equal(out[True], clean)  # it does steer
    # Batched, left-padded prompts give the same tokens as one prompt at a time.
    prompts = ["hello world, the", "The food was awful and the"]
    with tl_steer.steer(model, iv, m=3.0):
        batched = model.generate(prompts, max_new_tokens=5, do_sample=False, verbose=False, return_type="tokens")
        singles = [model.generate(p, **{**kw, "max_new_tokens": 5})[0, -5:] for p in prompts]
    assert torch.equal(batched[:, -5:], torch.stack(singles))
    assert no_hooks_left(model)


def test_generation_other_policies_need_the_uncached_path(tiny):
    model = tiny
    iv = cold_fd(model, PAIRS, HOOK, fd_method="jvp", positions="all")
    with pytest.raises(TlSteerError, match="use_past_kv_cache=False"), tl_steer.steer(model, iv, m=1.0):
        model.generate("hello world, the", max_new_tokens=3, verbose=False)
    assert no_hooks_left(model) and "generate" not in vars(model)
    with tl_steer.steer(model, iv, m=1.0):
        model.generate("hello world, the", max_new_tokens=3, verbose=False, use_past_kv_cache=False)


def test_kernel_vector_generation_cached_equals_uncached(tiny):
    model = tiny
    iv = cold_kernel(model, PAIRS, HOOK, eta=50.0, positions="prompt")
    kw = dict(max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
    with tl_steer.steer(model, iv, m=1.0):
        a = model.generate("hello world, the", use_past_kv_cache=True, **kw)
        b = model.generate("hello world, the", use_past_kv_cache=False, **kw)
    assert torch.equal(a, b)


# ----- strength, save / load -------------------------------------------------------------------------


def test_m_zero_is_clean_and_m_scales(tiny):
    model = tiny
    tokens = right_padded(model)
    iv = cold_fd(model, PAIRS, HOOK, fd_method="jvp")
    assert iv.hooks(0.0) == []
    clean = capture(model, tokens, HOOK)
    one = capture(model, tokens, HOOK, iv.hooks(1.0, model=model)) - clean
    three = capture(model, tokens, HOOK, iv.hooks(3.0, model=model)) - clean
    torch.testing.assert_close(three, 3 * one, rtol=1e-10, atol=1e-12)


def test_save_and_load_round_trip(tiny_any, tmp_path):
    model = tiny_any
    iv = cold_fd(model, PAIRS, HOOK, eta=0.3, fd_method="fd", eps=1e-5, positions="prompt")
    path = tl_steer.save(iv, tmp_path / "cold")
    loaded = tl_steer.load(path, model)
    assert isinstance(loaded, ColdFD)
    assert (loaded.eta, loaded.eps, loaded.fd_method, loaded.positions.kind) == (0.3, 1e-5, "fd", "prompt")
    tokens = right_padded(model)
    with tl_steer.steer(model, iv, m=2.0), torch.no_grad():
        expected = model(tokens)
    with tl_steer.steer(model, loaded, m=2.0), torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.unit == iv.unit != 1.0
    # with_positions shares the tensors and the unit.
    twin = iv.with_positions("all")
    assert twin.positions.kind == "all" and twin.unit == iv.unit
    assert twin.grads["blocks.0.attn.W_Q"].data_ptr() == iv.grads["blocks.0.attn.W_Q"].data_ptr()
    # Loaded without a model, it needs one to build its hooks, and gets it from steer, even unchecked.
    unchecked = tl_steer.load(path)
    with pytest.raises(TlSteerError, match=r"needs the model.*model=model"):
        unchecked.hooks(1.0)
    with tl_steer.steer(model, unchecked, m=2.0, check=False), torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
    with tl_steer.steer(model, tl_steer.load(path), m=2.0), torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=0)
    # Another model does not fit.
    with pytest.raises(ValueError):
        tl_steer.load(path, make_model("gpt2", seed=1, d_model=16))


# ----- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [cold_kernel, cold_fd], ids=["kernel", "fd"])
def test_bad_input(tiny, build):
    model = tiny
    with pytest.raises(DataError, match="at least one example"):
        build(model, [], HOOK)
    with pytest.raises(DataError, match="empty"):
        build(model, [("The film was", "")], HOOK)
    with pytest.raises(DataError, match="empty"):
        build(model, [("The film was", "   ")], HOOK)
    with pytest.raises(DataError, match="needs pairs"):
        build(model, POSITIVE_ONLY, HOOK, loss="dpo")
    with pytest.raises(DataError, match="mix"):
        build(model, [PAIRS[0], POSITIVE_ONLY[1]], HOOK)
    with pytest.raises(DataError, match="ContrastivePair"):
        build(model, [ABItem("q?", "yes", "no", "A")], HOOK)
    for hook in ("ln_final.hook_scale", "hook_embed", "unembed"):
        with pytest.raises(HookNameError):
            build(model, PAIRS, hook)
    with pytest.raises(HookNameError, match="inside a block"):
        build(model, PAIRS, "ln_final.hook_normalized")
    for value in (0.0, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="eta"):
            build(model, PAIRS, HOOK, eta=value)
    with pytest.raises(ValueError, match="loss"):
        build(model, PAIRS, HOOK, loss="kl")
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())


def test_bad_input_fd_specific(tiny):
    model = tiny
    for value in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            cold_fd(model, PAIRS, HOOK, fd_method="fd", eps=value)
    with pytest.raises(HookNameError, match="at least one block"):
        cold_fd(model, PAIRS, "blocks.0.hook_resid_pre")
    with pytest.raises(HookNameError, match="resid"):
        cold_fd(model, PAIRS, "blocks.1.attn.hook_z")
    with pytest.raises(ValueError, match="method"):
        cold_fd(model, PAIRS, HOOK, method="central")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        cold_fd(model, PAIRS, HOOK, fd_method="fd", method="fd")
    assert cold_fd(model, PAIRS, HOOK, method="fd").fd_method == "fd"  # the old name of fd_method still works
    with pytest.raises(ValueError, match="where"):
        cold_kernel(model, PAIRS, HOOK, where="everywhere")  # type: ignore[arg-type]


def test_fd_needs_the_pass_to_start_at_block_0(tiny):
    model = tiny
    iv = cold_fd(model, PAIRS, HOOK, fd_method="jvp")
    assert iv.first_layer(model.cfg.n_layers) == 0
    resid = model(model.to_tokens("hello world"), stop_at_layer=1)
    with pytest.raises(TlSteerError, match="block 0"), tl_steer.steer(model, iv, m=1.0), torch.no_grad():
        model(resid, start_at_layer=1)
    assert no_hooks_left(model)


# ----- sample efficiency (tiny smoke run) ------------------------------------------------------------


def test_sample_efficiency_table(tiny):
    from tl_steer.analysis.sample_efficiency import sample_efficiency

    items = [
        ABItem("Is it fine?", "fine", "cold", "A"),
        ABItem("Was it kind?", "awful", "kind", "B"),
        ABItem("The bread?", "fresh", "awful", "A"),
        ABItem("The room?", "dirty", "fine", "B"),
    ]
    table = sample_efficiency(
        tiny,
        "sentiment",
        ns=(1, 2),
        seeds=(0,),
        hook=HOOK,
        m={"diffmean": 1.0, "cold_kernel": 10.0, "cold_fd": 1.0},
        train_items=items,
        test_items=items[:2],
        test_pairs=PAIRS[:2],
    )
    assert list(table.columns) == ["method", "N", "seed", "m", "ab_accuracy", "ab_margin", "pref_odds"]
    assert len(table) == 1 + 3 * 2
    assert table["N"].tolist() == [0, 1, 2, 1, 2, 1, 2]
    assert set(table["method"]) == {"none", "diffmean", "cold_kernel", "cold_fd"}
    assert table["ab_accuracy"].between(0, 1).all()
    assert no_hooks_left(tiny)


def test_sample_efficiency_on_pairs_and_bad_settings(tiny):
    from tl_steer.analysis.sample_efficiency import sample_efficiency, summarize

    items = [ABItem("Is it fine?", "fine", "cold", "A"), ABItem("Was it kind?", "awful", "kind", "B")]
    common = dict(hook=HOOK, test_items=items, test_pairs=PAIRS[:2], seeds=(0,), baseline=False)
    table = sample_efficiency(
        tiny, "sentiment", ns=(1, 3), methods=("cold_kernel",), train_on="pairs", train_pairs=PAIRS, **common
    )
    assert table["N"].tolist() == [1, 3] and set(table["method"]) == {"cold_kernel"}
    assert summarize(table)["n_seeds"].tolist() == [1, 1]
    # Equal-norm mode: every intervention adds `norm` per position (measured on 4 training examples).
    from tl_steer.analysis.sample_efficiency import added_norm, reference_batch

    equal = sample_efficiency(tiny, "sentiment", ns=(2,), norm=3.0, train_on="pairs", train_pairs=PAIRS, **common)
    reference = reference_batch(tiny, PAIRS)
    order = np.random.default_rng(0).permutation(len(PAIRS))
    for row in equal.itertuples():
        if row.method == "cold_fd":
            iv = cold_fd(tiny, [PAIRS[i] for i in order[:2]], HOOK, fd_method="fd", eps=1e-3)
            assert row.m * added_norm(tiny, iv, *reference) == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="more examples"):
        sample_efficiency(tiny, "sentiment", ns=(5,), train_on="pairs", train_pairs=PAIRS, **common)
    with pytest.raises(ValueError, match="unknown method"):
        sample_efficiency(tiny, "sentiment", methods=("caa",), train_pairs=PAIRS, **common)
    with pytest.raises(ValueError, match="train_on"):
        sample_efficiency(tiny, "sentiment", train_on="both", train_pairs=PAIRS, **common)


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_dz_is_kept_per_input_across_strengths(tiny, method):
    """dZ(x) does not depend on m: a second pass over the same tokens at another strength runs no perturbed
    pass and equals the pass with the memo off; other tokens, or weights edited in place, run it again."""
    model = tiny
    tokens = right_padded(model, TEXTS)
    iv = cold_fd(model, PAIRS, HOOK, method=method, eps=1e-6 if method == "fd" else None)
    off = cold_fd(model, PAIRS, HOOK, method=method, eps=1e-6 if method == "fd" else None)
    off.memo_bytes = 0
    clean = model(tokens).detach()
    with torch.no_grad():
        for m in (1.0, 2.5):
            passes = iv.n_perturbed_passes
            with tl_steer.steer(model, iv, m=m):
                kept = model(tokens)
            assert iv.n_perturbed_passes == passes + (1 if m == 1.0 else 0)
            with tl_steer.steer(model, off, m=m):
                fresh = model(tokens)
            torch.testing.assert_close(kept, fresh, rtol=0, atol=0)
            assert (kept - clean).abs().max() > 1e-3
        passes = iv.n_perturbed_passes
        with tl_steer.steer(model, iv, m=1.0):
            model(right_padded(model, ["Something else entirely"]))  # other tokens
        assert iv.n_perturbed_passes == passes + 1
        weight = model.blocks[0].attn.W_Q
        saved = weight.clone()
        try:
            weight.mul_(1.1)
            with tl_steer.steer(model, iv, m=1.0):
                model(tokens)
            assert iv.n_perturbed_passes == passes + 2
        finally:
            weight.copy_(saved)
    assert no_hooks_left(model)
