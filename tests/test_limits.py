"""Limits: prompts longer than the context, batches larger than memory allows, long strength grids.

Each is either handled (chunked, and then the answer is the same as unchunked) or refused before any
work with an error that says what to change; never a crash inside torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import make_model
from test_state_leaks import counting

import tl_steer
from tl_steer import ABItem, ContrastivePair, MCItem
from tl_steer.errors import ConfigError, DataError
from tl_steer.scoring import batches, max_batch_tokens


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
PAIRS = [
    ContrastivePair("The film was", " wonderful and kind", " awful and cold"),
    ContrastivePair("The food was", " fresh and fine", " awful and dirty"),
    ContrastivePair("The staff were kind and the weather", " was fine today", " was cold and wide"),
]
LONG_TEXT = "hello world, the weather is fine today. " * 40  # ~ 400 tokens; the tiny models hold 128


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.fixture(scope="module")
def vector(model):
    return tl_steer.diffmean(model, PAIRS, HOOK)


def test_too_long_prompts_are_refused_by_every_entry_point(model, vector) -> None:
    long_pair = ContrastivePair(LONG_TEXT, " fine", " cold")
    calls = {
        "pair_nll": lambda: tl_steer.pair_nll(model, [long_pair]),
        "completion_nll": lambda: tl_steer.completion_nll(model, ["a"], [LONG_TEXT]),
        "preference_utility": lambda: tl_steer.preference_utility(model, vector, [long_pair], progress=False),
        "diffmean": lambda: tl_steer.diffmean(model, [long_pair], HOOK),
        "split": lambda: tl_steer.split(model, [long_pair] * 2, 1, epochs=1, batch_size=2, progress=False),
        "cold_kernel": lambda: tl_steer.cold_kernel(model, [long_pair], HOOK),
        "cold_fd": lambda: tl_steer.cold_fd(model, [long_pair], HOOK),
        "mc_accuracy": lambda: tl_steer.mc_accuracy(model, [MCItem(LONG_TEXT, (" fine", " cold"), 0)]),
        "ab_accuracy": lambda: tl_steer.ab_accuracy(model, None, [ABItem(LONG_TEXT, "fine", "cold", "A")]),
        "probe fit": lambda: tl_steer.ManifoldProbe.fit(model, [LONG_TEXT], HOOK, progress=False),
    }
    for name, call in calls.items():
        with pytest.raises(DataError, match=r"exceed the model's context of 128") as info:
            call()
        assert "tokens" in str(info.value), name


def test_generation_past_the_context_is_refused_before_it_starts(model, vector) -> None:
    prompt = "hello world " * 10
    n = model.to_tokens(prompt, truncate=False).shape[1]
    assert n < 100
    with tl_steer.steer(model, vector, m=1.0):
        with pytest.raises(DataError, match=rf"{n} prompt tokens \+ max_new_tokens=100 .* context of 128"):
            model.generate(prompt, max_new_tokens=100, verbose=False)
        # Up to the context, generation works (the same limit also holds for token-id input).
        out = model.generate(model.to_tokens(prompt), max_new_tokens=128 - n, verbose=False, do_sample=False)
    assert out.shape[1] == 128


def test_batches_respect_rows_and_token_budget() -> None:
    lengths = [5, 50, 7, 50, 3, 40, 40, 1]
    groups = batches(lengths, 3, max_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= 3
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 100
    # Without a budget: fixed-size chunks of the longest-first order, as before.
    assert batches(lengths, 3) == [[1, 3, 5], [6, 2, 0], [4, 7]]
    # A sequence longer than the budget gets a batch of its own rather than an error.
    assert batches([300, 2, 2], 8, max_tokens=10) == [[0], [1, 2]]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8", None])
def test_bad_batch_size_is_a_config_error(model, bad) -> None:
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
        tl_steer.pair_nll(model, PAIRS, batch_size=bad)


def test_a_huge_batch_is_chunked_by_the_logits_budget(model, vector) -> None:
    pairs = PAIRS * 20
    reference = tl_steer.pair_nll(model, pairs, interventions=[vector], m=2.0, batch_size=4)
    with counting(model, None) as unlimited:
        big = tl_steer.pair_nll(model, pairs, interventions=[vector], m=2.0, batch_size=10**9)
    # 64 KiB of float32 logits for a 300-token vocabulary: 54 padded tokens per pass, so ~ 4 rows.
    with tl_steer.logits_budget(64 * 1024), counting(model, None) as chunked:
        assert max_batch_tokens(model) == 64 * 1024 // (4 * model.cfg.d_vocab)
        small = tl_steer.pair_nll(model, pairs, interventions=[vector], m=2.0, batch_size=10**9)
    n_layers = model.cfg.n_layers
    assert unlimited.calls == n_layers  # the 120 sequences fit the default budget: one pass
    assert chunked.calls >= n_layers * 120 * 6 // max_batch_tokens(model)  # >= rows x shortest / budget
    # Scores are float32: another batch composition changes only the summation order (~1e-6).
    for got in (big, small):
        torch.testing.assert_close(got[0], reference[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], reference[1], rtol=0, atol=1e-5)
    # The budget is restored after the block, and a bad one is refused.
    assert max_batch_tokens(model) == (1 << 30) // (4 * model.cfg.d_vocab)
    for bad in (0, -5, 1.5, "1GB"):
        with pytest.raises(ConfigError, match="logits budget"), tl_steer.logits_budget(bad):  # type: ignore[arg-type]
            pass


def test_preference_utility_chunks_under_a_small_budget_with_identical_results(model, vector) -> None:
    ms = (-1.0, 0.0, 2.0)
    full = tl_steer.preference_utility(model, vector, PAIRS * 4, ms, progress=False).table
    with tl_steer.logits_budget(16 * 1024):
        small = tl_steer.preference_utility(model, vector, PAIRS * 4, ms, batch_size=64, progress=False).table
    np.testing.assert_allclose(small["pref_odds"], full["pref_odds"], rtol=0, atol=1e-5)


def test_a_grid_of_thousands_of_strengths_costs_one_pass_per_strength(model, vector) -> None:
    pairs = PAIRS[:2]
    tl_steer.preference_utility(model, vector, pairs, (0, 1), progress=False)  # warm-up: hook-width cache
    with counting(model, None) as small:
        tl_steer.preference_utility(model, vector, pairs, np.linspace(-3, 3, 101).round(9), progress=False)
    grid = np.linspace(-3, 3, 2001).round(9)  # includes m = 0
    with counting(model, None) as big:
        result = tl_steer.preference_utility(model, vector, pairs, grid, progress=False)
    # The clean prefix (block 0, before the edited block 1) runs once per batch; each strength reruns
    # blocks 1 and 2 once per batch, and nothing else.
    assert small.calls == 1 + 2 * 101
    assert big.calls == 1 + 2 * 2001
    table = result.table
    assert len(table) == 2001 * len(pairs)
    assert np.isfinite(table["pref_odds"]).all()
    # PrefOdds is a smooth function of m: neighbours on the fine grid differ little.
    by_m = table.groupby("m")["pref_odds"].mean().to_numpy()
    assert np.abs(np.diff(by_m)).max() < 0.05 * (by_m.max() - by_m.min() + 1e-12)


@pytest.mark.parametrize(
    ("ms", "match"),
    [
        (2.0, "must be a sequence of strengths"),
        ("0,1", "must be a sequence of strengths"),
        ([], "is empty"),
        ([0, float("nan")], r"ms\[1\]: the strength m must be finite"),
        ([0, float("inf")], r"ms\[1\]: the strength m must be finite"),
        ([0, "1"], r"ms\[1\]: the strength m must be a real number"),
        ([0, 1, 1], "repeated values"),
    ],
)
def test_bad_grids_are_config_errors(model, vector, ms, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tl_steer.preference_utility(model, vector, PAIRS, ms, progress=False)


def test_numpy_strengths_and_grids_are_accepted(model, vector) -> None:
    grid = np.array([0.0, 1.0], dtype=np.float32)
    result = tl_steer.preference_utility(model, vector, PAIRS, grid, progress=False)
    assert sorted(result.table["m"].unique()) == [0.0, 1.0]
    with tl_steer.steer(model, vector, m=np.float32(2.0)):
        steered = model("The film was")
    with tl_steer.steer(model, vector, m=2.0):
        torch.testing.assert_close(model("The film was"), steered)


def test_extreme_strengths_give_a_clear_error_or_finite_numbers(model, vector) -> None:
    # A huge but finite m either scores (normalisation keeps logits finite) or says which m broke.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = tl_steer.preference_utility(model, vector, PAIRS, (0.0, 1e30), progress=False)
        except DataError as exc:
            assert "non-finite NLL at m=1e+30" in str(exc)
        else:
            assert np.isfinite(result.table["pref_odds"]).all()
