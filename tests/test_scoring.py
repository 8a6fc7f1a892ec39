"""Teacher-forced completion NLL, checked against a plain loop over model(tokens) and log_softmax."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import no_hooks_left

import tl_steer
from tl_steer import AddVector, ConfigError, ContrastivePair, DataError
from tl_steer.scoring import tokenize_completions


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


HOOK = "blocks.1.hook_resid_post"

PROMPTS = [
    "The food was",
    "hello wor",
    "I went to the market and",
    "The film",
    "hello",
    "The weather is fine today and the world is wide, so I",
]
COMPLETIONS = [
    " wonderful and fresh.",
    "ld",
    " bought fresh bread and a cup of tea.",
    " was awful and the room was cold and dirty.",
    " world",
    " went out.",
]

# scoring returns float32 (documented), so an exact float64 reference agrees to float32 rounding.
F32 = dict(rtol=2e-6, atol=2e-6)


def split_tokens(model, prompt: str, completion: str) -> tuple[list[int], int]:
    """[bos] + ids of prompt+completion, and the first index where they differ from [bos] + ids of prompt."""
    tok = model.tokenizer
    bos = [tok.bos_token_id]
    full = bos + tok(prompt + completion, add_special_tokens=False).input_ids
    prompt_ids = bos + tok(prompt, add_special_tokens=False).input_ids
    start = 0
    while start < len(prompt_ids) and prompt_ids[start] == full[start]:
        start += 1
    return full, start


def reference_nll(
    model,
    prompts: list[str],
    completions: list[str],
    reduction: str = "mean",
    make_hook: Callable[[int], Callable] | None = None,
) -> torch.Tensor:
    """One unpadded sequence at a time; ``make_hook(start)`` gives a hook added at HOOK, if any."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        full, start = split_tokens(model, prompt, completion)
        tokens = torch.tensor([full])
        with torch.no_grad():
            if make_hook is None:
                logits = model(tokens)
            else:
                logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, make_hook(start))])
        logprobs = torch.log_softmax(logits[0].double(), dim=-1)
        total = -sum(logprobs[t - 1, full[t]] for t in range(start, len(full)))
        out.append(total / (len(full) - start) if reduction == "mean" else total)
    return torch.stack(out)


def steering_vector(model, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=model.cfg.dtype)


# ----- unsteered -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_completion_nll_matches_hand_computation(tiny_any, reduction: str) -> None:
    got = tl_steer.completion_nll(tiny_any, PROMPTS, COMPLETIONS, reduction=reduction)
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    want = reference_nll(tiny_any, PROMPTS, COMPLETIONS, reduction)
    torch.testing.assert_close(got.double(), want, **F32)
    assert (got > 0).all()


def test_batched_equals_one_at_a_time_in_input_order(tiny) -> None:
    # 21 items of many lengths: two padded batches of 16 and 5, sorted by length inside scoring.
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(21)]
    completions = [COMPLETIONS[(3 * i + 1) % len(COMPLETIONS)] + " and so on" * (i % 4) for i in range(21)]
    lengths = {len(split_tokens(tiny, p, c)[0]) for p, c in zip(prompts, completions, strict=True)}
    assert len(lengths) > 5
    batched = tl_steer.completion_nll(tiny, prompts, completions, batch_size=16)
    single = tl_steer.completion_nll(tiny, prompts, completions, batch_size=1)
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.double(), reference_nll(tiny, prompts, completions), **F32)
    # The output follows the input order: a permuted input gives the permuted output.
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(0)).tolist()
    permuted = tl_steer.completion_nll(tiny, [prompts[i] for i in perm], [completions[i] for i in perm])
    torch.testing.assert_close(permuted, batched[perm], rtol=0, atol=1e-6)
    assert len(set(batched.tolist())) > 5  # distinct values, so the order check means something


def find_merging_split(tokenizer) -> tuple[str, str]:
    """A (prompt, completion) whose tokens merge across the boundary; "hello wor" + "ld" first."""
    candidates = [("hello wor", "ld")]
    for text in ["hello world, the world is wide", "The film was wonderful", "bought fresh bread"]:
        candidates += [(text[:i], text[i:]) for i in range(1, len(text))]
    for prompt, completion in candidates:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        f = tokenizer(prompt + completion, add_special_tokens=False).input_ids
        if f[: len(p)] != p:
            return prompt, completion
    raise AssertionError("the test tokenizer merges no token across any boundary tried")


def test_boundary_on_token_ids_when_tokens_merge(tiny) -> None:
    tok = tiny.tokenizer
    prompt, completion = find_merging_split(tok)
    assert (prompt, completion) == ("hello wor", "ld")
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    f_ids = tok(prompt + completion, add_special_tokens=False).input_ids
    assert p_ids[-1] != f_ids[-1]  # "wor" vs the merged " world"
    assert f_ids[: len(p_ids)] != p_ids  # the full tokenization does not extend the prompt's
    first_diff = next(i for i, (a, b) in enumerate(zip(p_ids, f_ids, strict=False)) if a != b)

    data = tokenize_completions(tiny, [prompt], [completion])
    assert data.sequences == [[tok.bos_token_id, *f_ids]]
    assert data.starts == [1 + first_diff]  # +1 for BOS
    assert data.starts[0] < 1 + len(p_ids)  # the merged token counts as completion
    # The merged token (" world") is scored, given the tokens before it.
    nll = tl_steer.completion_nll(tiny, [prompt], [completion], reduction="sum")
    tokens = torch.tensor(data.sequences)
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny(tokens)[0], -1)
    want = -sum(logprobs[t - 1, tokens[0, t]] for t in range(data.starts[0], tokens.shape[1]))
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll.double(), want.reshape(1), **F32)
    torch.testing.assert_close(nll.double(), reference_nll(tiny, [prompt], [completion], "sum"), **F32)


def test_boundary_without_merge_is_prompt_length(tiny) -> None:
    tok = tiny.tokenizer
    data = tokenize_completions(tiny, ["The food was"], [" wonderful and fresh."])
    assert data.starts == [1 + len(tok("The food was", add_special_tokens=False).input_ids)]
    assert data.sequences[0][0] == tok.bos_token_id


def test_sum_is_mean_times_token_count(tiny) -> None:
    mean = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS, reduction="mean")
    total = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS, reduction="sum")
    data = tokenize_completions(tiny, PROMPTS, COMPLETIONS)
    counts = torch.tensor([len(s) - st for s, st in zip(data.sequences, data.starts, strict=True)], dtype=torch.float32)
    assert (counts >= 1).all() and len(set(counts.tolist())) > 2
    counts_by_hand = torch.tensor(
        [len(f) - s for f, s in (split_tokens(tiny, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True))],
        dtype=torch.float32,
    )
    assert torch.equal(counts, counts_by_hand)
    torch.testing.assert_close(total, mean * counts, rtol=1e-6, atol=1e-6)


# ----- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["", " ", "  \n"])
def test_empty_completion_names_the_item(tiny, empty: str) -> None:
    with pytest.raises(DataError, match="item 1") as info:
        tl_steer.completion_nll(tiny, ["The food was", "hello", "The film"], [" good", empty, " bad"])
    assert repr(empty) in str(info.value)
    assert no_hooks_left(tiny)


def test_mismatched_lengths(tiny) -> None:
    with pytest.raises(DataError, match="2 prompts but 1 completions"):
        tl_steer.completion_nll(tiny, ["a", "b"], [" c"])
    with pytest.raises(DataError, match="1 prompts but 3 completions"):
        tokenize_completions(tiny, ["a"], [" b", " c", " d"])


@pytest.mark.parametrize("reduction", ["max", "Mean", "", None])
def test_bad_reduction(tiny, reduction: object) -> None:
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        tl_steer.completion_nll(tiny, ["The food was"], [" good"], reduction=reduction)  # type: ignore[arg-type]


def test_bad_batch_size(tiny) -> None:
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        tl_steer.completion_nll(tiny, ["The food was"], [" good"], batch_size=0)


# ----- pairs ---------------------------------------------------------------------------------------

PAIRS = [
    ContrastivePair("The food was", " wonderful and fresh.", " awful and stale."),
    ContrastivePair("hello wor", "ld, the world is wide", "ld is cold"),
    ContrastivePair("The staff were", " kind and friendly.", " rude and the room was dirty."),
    ContrastivePair("I went to the market and", " bought fresh bread.", " bought stale bread."),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pair_nll_is_completion_nll_of_each_side(tiny, reduction: str) -> None:
    lp, ln = tl_steer.pair_nll(tiny, PAIRS, reduction=reduction)
    prompts = [p.prompt for p in PAIRS]
    want_p = tl_steer.completion_nll(tiny, prompts, [p.positive for p in PAIRS], reduction=reduction)
    want_n = tl_steer.completion_nll(tiny, prompts, [p.negative for p in PAIRS], reduction=reduction)
    assert lp.shape == ln.shape == (len(PAIRS),)
    torch.testing.assert_close(lp, want_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(ln, want_n, rtol=0, atol=1e-6)
    torch.testing.assert_close(lp.double(), reference_nll(tiny, prompts, [p.positive for p in PAIRS], reduction), **F32)
    assert not torch.allclose(lp, ln)  # the two sides really differ, so a swap would be caught


def test_pair_nll_steered_matches_completion_nll_steered(tiny) -> None:
    iv = AddVector(HOOK, steering_vector(tiny, seed=3))
    lp, ln = tl_steer.pair_nll(tiny, PAIRS, interventions=[iv], m=-1.5)
    prompts = [p.prompt for p in PAIRS]
    want_n = tl_steer.completion_nll(tiny, prompts, [p.negative for p in PAIRS], interventions=[iv], m=-1.5)
    torch.testing.assert_close(ln, want_n, rtol=0, atol=1e-6)
    assert not torch.allclose(lp, tl_steer.pair_nll(tiny, PAIRS)[0])


def test_pair_nll_empty(tiny) -> None:
    with pytest.raises(DataError, match="empty"):
        tl_steer.pair_nll(tiny, [])


# ----- while steered -------------------------------------------------------------------------------


def test_steered_nll_matches_hand_written_hook(tiny_any) -> None:
    model = tiny_any
    v = steering_vector(model)
    iv = AddVector(HOOK, v)

    def add_all(start: int) -> Callable:
        return lambda act, hook: act + 2.0 * v

    got = tl_steer.completion_nll(model, PROMPTS, COMPLETIONS, interventions=[iv], m=2.0)
    want = reference_nll(model, PROMPTS, COMPLETIONS, make_hook=add_all)
    torch.testing.assert_close(got.double(), want, **F32)
    assert no_hooks_left(model)
    clean = tl_steer.completion_nll(model, PROMPTS, COMPLETIONS)
    assert (got - clean).abs().max() > 1e-3  # the steering did something
    assert torch.equal(tl_steer.completion_nll(model, PROMPTS, COMPLETIONS, interventions=[iv], m=0.0), clean)


def test_generated_positions_steer_only_the_completion(tiny) -> None:
    v = steering_vector(tiny, seed=1)
    m = 1.5
    iv = AddVector(HOOK, v, positions="generated")

    def add_from(start: int) -> Callable:
        def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
            act = act.clone()
            act[:, start:] += m * v
            return act

        return hook

    # Batched with right padding and a different boundary per row.
    got = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS, interventions=[iv], m=m)
    want = reference_nll(tiny, PROMPTS, COMPLETIONS, make_hook=add_from)
    torch.testing.assert_close(got.double(), want, **F32)
    one = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS, interventions=[iv], m=m, batch_size=1)
    torch.testing.assert_close(one, got, rtol=0, atol=1e-6)
    assert no_hooks_left(tiny)
    # It is neither the clean model nor steering every position.
    everywhere = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS, interventions=[AddVector(HOOK, v)], m=m)
    clean = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS)
    assert (got - clean).abs().max() > 1e-3
    assert (got - everywhere).abs().max() > 1e-3


# ----- unembedding only the scored positions ------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_from_final_equals_full_logits(tiny_any, reduction):
    """The NLL from the final residual, unembedded at the scored positions only, equals the NLL from the
    full logits (every architecture's final norm; a soft cap on the llama)."""
    from tl_steer.scoring import nll_from_final, nll_from_logits, pad_token_id

    model = tiny_any
    data = tokenize_completions(model, PROMPTS, COMPLETIONS)
    tokens, starts, lens = data.batch(list(range(len(data))), pad_token_id(model), "cpu")
    with torch.no_grad():
        expected = nll_from_logits(model(tokens), tokens, starts, lens, reduction)
        final = model(tokens, stop_at_layer=model.cfg.n_layers)
        got = nll_from_final(model, final, tokens, starts, lens, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # both take log_softmax in float32
    assert (expected > 0).all()


def test_nll_from_final_applies_soft_cap(tiny_any):
    """A model with a logit soft cap: the scored-positions path applies it (a cap of 0.5 moves the NLL a lot)."""
    from tl_steer.scoring import nll_from_final, nll_from_logits, pad_token_id

    tiny = tiny_any
    data = tokenize_completions(tiny, PROMPTS, COMPLETIONS)
    tokens, starts, lens = data.batch(list(range(len(data))), pad_token_id(tiny), "cpu")
    old = tiny.cfg.output_logits_soft_cap
    try:
        with torch.no_grad():
            uncapped = nll_from_final(tiny, tiny(tokens, stop_at_layer=tiny.cfg.n_layers), tokens, starts, lens)
            tiny.cfg.output_logits_soft_cap = 0.5
            capped = nll_from_final(tiny, tiny(tokens, stop_at_layer=tiny.cfg.n_layers), tokens, starts, lens)
            full = nll_from_logits(tiny(tokens), tokens, starts, lens)
    finally:
        tiny.cfg.output_logits_soft_cap = old
    torch.testing.assert_close(capped, full, rtol=1e-6, atol=1e-6)
    assert (capped - uncapped).abs().max() > 1e-3


def test_sweep_with_a_hook_after_the_last_block_unembeds_everywhere(tiny):
    """An intervention on the final norm's output cannot use the scored-positions path (the hook would see
    only those positions): preference_utility then scores from the full logits, and agrees with
    completion_nll under steer at every strength."""
    from tl_steer.scoring import scores_from_final

    hook = "ln_final.hook_normalized"
    vec = AddVector(
        hook, torch.randn(tiny.cfg.d_model, dtype=tiny.cfg.dtype, generator=torch.Generator().manual_seed(3))
    )
    assert not scores_from_final(tiny, [vec])
    pairs = [ContrastivePair(p, c, " no.") for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    table = tl_steer.preference_utility(tiny, vec, pairs, [0.0, 1.5], progress=False).table
    for m in (0.0, 1.5):
        with tl_steer.steer(tiny, vec, m=m):
            want = tl_steer.completion_nll(tiny, PROMPTS, COMPLETIONS)
        got = table[table["m"] == m].sort_values("pair")["L_p"].to_numpy()
        torch.testing.assert_close(torch.as_tensor(got, dtype=want.dtype), want, rtol=1e-5, atol=1e-5)


def test_a_users_hook_on_the_final_norm_sees_every_position(tiny_any):
    """A hook the user put on the final norm (outside tl_steer) keeps seeing the whole sequence: scoring
    falls back to the full logits, and its edit counts."""
    from tl_steer.scoring import scores_from_final

    model = tiny_any
    assert scores_from_final(model, [])
    seen: list[tuple[int, ...]] = []

    def double(act, hook):
        seen.append(tuple(act.shape))
        return 2 * act

    plain = tl_steer.completion_nll(model, PROMPTS, COMPLETIONS)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", double)]):
        assert not scores_from_final(model, [])
        doubled = tl_steer.completion_nll(model, PROMPTS, COMPLETIONS)
    assert seen and all(shape[1] > 1 for shape in seen)
    assert (doubled - plain).abs().max() > 1e-3
    assert scores_from_final(model, [])
