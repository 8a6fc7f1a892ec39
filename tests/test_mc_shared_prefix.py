"""Multiple-choice scoring with each question's prefix shared across its options (a KV cache) and the
unembedding only where an option token is scored: equal to the full-sequence path, steered or not."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, BRIDGE_ARCHITECTURES, MC_QUESTIONS, make_bridge, make_model, no_hooks_left

from tl_steer import AddVector
from tl_steer.analysis.capability import mc_accuracy, mc_option_nll
from tl_steer.data import MCItem

ITEMS = [
    *(MCItem(*t) for t in MC_QUESTIONS),
    MCItem("The food was", ("awful", "fine"), 1),  # fewer options
    MCItem("What is the weather?", ("fine today", "cold and wet", "wide"), 0),
]


def vector(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64).to(model.cfg.dtype)


def both(model, **kwargs):
    fast = mc_option_nll(model, ITEMS, batch_size=3, **kwargs)
    slow = mc_option_nll(model, ITEMS, batch_size=5, shared_prefix=False, **kwargs)
    return fast, slow


@pytest.fixture(scope="module", params=[*sorted(ARCHITECTURES), *(f"bridge-{a}" for a in BRIDGE_ARCHITECTURES)])
def model(request):
    # The bridges share each question through Hugging Face's own KV cache (capability._bridge_shared_logprobs).
    if request.param.startswith("bridge-"):
        return make_bridge(request.param.removeprefix("bridge-"))
    return make_model(request.param)


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_unsteered_equals_the_full_sequence_path(model, one_thread, normalize):
    fast, slow = both(model, normalize=normalize)
    assert torch.isinf(fast[5, 2:]).all() and torch.isinf(fast[6, 3:]).all()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last_prompt"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"])
def test_steered_equals_the_full_sequence_path_under_every_position_policy(model, one_thread, policy, hook):
    iv = AddVector(hook, vector(model), positions=policy)
    fast, slow = both(model, interventions=[iv], m=1.5, instruction="Answer well.")
    clean, _ = both(model, instruction="Answer well.")
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    # The steering did something, so the equality is not the clean model twice.
    assert (fast[torch.isfinite(fast)] - clean[torch.isfinite(clean)]).abs().max() > 1e-3
    assert no_hooks_left(model)


def test_a_hook_after_the_blocks_falls_back_to_the_full_path(one_thread):
    model = make_model("llama")
    iv = AddVector("ln_final.hook_normalized", vector(model, scale=0.5), positions="generated")
    fast, slow = both(model, interventions=[iv])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


def test_the_unembedding_runs_only_where_an_option_token_is_scored(one_thread):
    model = make_model("gpt2")
    seen: list[int] = []
    handle = model.unembed.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0] * out.shape[1]))
    try:
        mc_option_nll(model, ITEMS, normalize="sum")
        fast = sum(seen)
        seen.clear()
        mc_option_nll(model, ITEMS, normalize="sum", shared_prefix=False)
        slow = sum(seen)
    finally:
        handle.remove()
    from tl_steer.analysis.capability import format_mc_prompt, mc_completions
    from tl_steer.scoring import tokenize_completions

    prompts = [format_mc_prompt(i) for i in ITEMS for _ in i.options]
    data = tokenize_completions(model, prompts, [c for i in ITEMS for c in mc_completions(i)])
    scored = sum(len(s) - st for s, st in zip(data.sequences, data.starts, strict=True))
    assert fast == scored  # one unembedded position per scored option token
    # the full-sequence path too (completion_nll stops after the blocks and unembeds the scored positions)
    assert slow == scored


def test_accuracy_is_the_same_on_both_paths(one_thread):
    model = make_model("llama")
    iv = AddVector("blocks.1.hook_resid_post", vector(model), positions="generated")
    a = mc_accuracy(model, ITEMS, interventions=[iv], m=1.0)
    b = mc_accuracy(model, ITEMS, interventions=[iv], m=1.0, shared_prefix=False)
    assert torch.equal(a.chosen, b.chosen) and a.accuracy == b.accuracy


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_questions_of_different_lengths_in_one_pass(one_thread, batch_size):
    # batch_size 16: all seven questions (prefixes of 4..11 tokens) in one question pass and one option pass.
    model = make_model("neox")
    iv = AddVector("blocks.1.hook_resid_post", vector(model), positions="last_prompt")
    fast = mc_option_nll(model, ITEMS, interventions=[iv], batch_size=batch_size)
    slow = mc_option_nll(model, ITEMS, interventions=[iv], shared_prefix=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)


def test_a_one_token_prompt_and_a_position_mask_take_the_full_path(one_thread):
    from tl_steer.analysis.capability import _shared_prefix_nll
    from tl_steer.scoring import Tokenized, score_tokenized

    model = make_model("gpt2")
    data = Tokenized([[5, 6, 7], [5, 8], [9, 10, 11, 12], [9, 10, 13]], [1, 1, 3, 2])
    fast = _shared_prefix_nll(model, data, [[0, 1], [2, 3]], "mean", 16)
    torch.testing.assert_close(fast, score_tokenized(model, data), rtol=0, atol=1e-5)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[3:] = True
    iv = AddVector("blocks.1.hook_resid_post", vector(model), positions=mask)
    fast, slow = both(model, interventions=[iv])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


# ----- the clean blocks before the intervention, kept across calls (MCCleanPrefix) -----------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last_prompt"])
def test_clean_prefix_equals_the_full_sequence_path(arch, policy, one_thread):
    """Scoring restarted from the kept clean residuals equals the full-sequence path, for several
    interventions and strengths through one MCCleanPrefix (the first call fills it, the later ones reuse it),
    with and without an instruction. A hook before attention restarts one block earlier: the block before
    tells it the cache offset its position policy needs."""
    from tl_steer.analysis.capability import MCCleanPrefix, restart_layer

    model = make_model(arch)
    post = AddVector("blocks.2.hook_resid_post", vector(model))
    pre = AddVector("blocks.2.hook_resid_pre", vector(model))
    assert restart_layer(post, 3) == 2 and restart_layer(pre, 3) == 1
    clean = MCCleanPrefix(model, 1)
    for seed, hook, m, instruction in [
        (0, "blocks.2.hook_resid_pre", 1.5, None),
        (1, "blocks.2.hook_resid_post", 2.0, None),
        (2, "blocks.2.hook_resid_pre", -1.0, "Answer well."),
        (3, "blocks.1.hook_resid_post", 1.0, None),
    ]:
        iv = AddVector(hook, vector(model, seed=seed), positions=policy)
        kwargs = {"interventions": [iv], "m": m, "instruction": instruction}
        fast = mc_option_nll(model, ITEMS, batch_size=3, clean_prefix=clean, **kwargs)
        slow = mc_option_nll(model, ITEMS, batch_size=5, shared_prefix=False, **kwargs)
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-4)
    assert clean._chunks  # it was used, not bypassed
    assert no_hooks_left(model)


def test_clean_prefix_runs_only_the_blocks_from_its_start(one_thread):
    """After the first call, a steered scoring through the clean prefix runs no block before its start; the
    residuals are recomputed after a weight changes in place; an intervention before the start bypasses it."""
    from tl_steer.analysis.capability import MCCleanPrefix

    model = make_model("llama")
    clean = MCCleanPrefix(model, 2)
    calls = {i: 0 for i in range(model.cfg.n_layers)}
    handles = [
        b.register_forward_hook(lambda mod, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, b in enumerate(model.blocks)
    ]
    try:
        iv = AddVector("blocks.2.hook_resid_post", vector(model))
        first = mc_option_nll(model, ITEMS, interventions=[iv], m=1.0, clean_prefix=clean)
        assert calls[0] > 0 and calls[2] > 0
        calls.update(dict.fromkeys(calls, 0))
        again = mc_option_nll(model, ITEMS, interventions=[iv], m=2.0, clean_prefix=clean)
        assert calls[0] == calls[1] == 0 and calls[2] > 0
        assert (again - first)[torch.isfinite(first)].abs().max() > 1e-3
        with torch.no_grad():
            model.blocks[0].mlp.W_out.mul_(1.5)  # the clean residual changes: what was kept is stale
        calls.update(dict.fromkeys(calls, 0))
        edited = mc_option_nll(model, ITEMS, interventions=[iv], m=2.0, clean_prefix=clean)
        assert calls[0] > 0
        torch.testing.assert_close(edited, mc_option_nll(model, ITEMS, interventions=[iv], m=2.0), rtol=0, atol=1e-6)
        early = AddVector("blocks.0.hook_resid_post", vector(model))
        assert not clean.applies(model, [early])
        torch.testing.assert_close(
            mc_option_nll(model, ITEMS, interventions=[early], clean_prefix=clean),
            mc_option_nll(model, ITEMS, interventions=[early], shared_prefix=False),
            rtol=0,
            atol=1e-4,
        )
    finally:
        for h in handles:
            h.remove()


def test_clean_prefix_is_inert_on_a_bridge(one_thread):
    from tl_steer.analysis.capability import MCCleanPrefix

    bridge = make_bridge("llama")
    clean = MCCleanPrefix(bridge, 2)
    iv = AddVector("blocks.2.hook_resid_pre", vector(bridge))
    assert clean.start is None and not clean.applies(bridge, [iv])
    fast = mc_option_nll(bridge, ITEMS, interventions=[iv], clean_prefix=clean)
    torch.testing.assert_close(
        fast, mc_option_nll(bridge, ITEMS, interventions=[iv], shared_prefix=False), rtol=0, atol=1e-4
    )
    assert not clean._chunks
