"""The capability-behaviour gap: conditions x strengths, paired tests, matched comparison, figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_bridge, make_model, no_hooks_left
from test_split import HELD_OUT

import tl_steer
from tl_steer import AddVector
from tl_steer.analysis.capability import mc_accuracy
from tl_steer.analysis.gap import BASELINE, Condition, capability_behavior_gap, conditions_for, paired_test
from tl_steer.data.mc import MCItem
from tl_steer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ITEMS = [
    MCItem("The film was", (" wonderful", " awful", " cold"), 0),
    MCItem("The food was", (" fresh", " dirty", " wide"), 0),
    MCItem("The staff were", (" rude", " kind", " cold"), 1),
    MCItem("hello world, the weather is", (" fine", " awful", " dirty"), 0),
    MCItem("I went to the market and bought", (" bread", " tea", " world"), 0),
    MCItem("The room was", (" cold", " wide", " fresh"), 2),
]
INSTRUCTION = "Be positive."


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def model(request):
    return make_model("llama") if request.param == "hooked" else make_bridge("llama")


@pytest.fixture(scope="module")
def vector():
    return AddVector("blocks.1.hook_resid_post", torch.randn(32, generator=torch.Generator().manual_seed(1)).double())


@pytest.fixture(scope="module")
def result(model, vector):
    conditions = conditions_for({"vec": vector}, INSTRUCTION)
    conditions.append(Condition("vec, own grid", vector, ms=(2.0,)))
    return capability_behavior_gap(model, conditions, HELD_OUT, ITEMS, ms=(0, 1, 3), progress=False)


def test_scores_are_the_independent_ones(model, vector, result) -> None:
    summary = result.summary().set_index(["condition", "m", "metric"])
    for cond, m, ivs, instruction in (
        (BASELINE, 0.0, [], None),
        ("vec", 3.0, [vector], None),
        ("vec + prompting", 1.0, [vector], INSTRUCTION),
        ("prompting", 0.0, [], INSTRUCTION),
    ):
        acc = mc_accuracy(model, ITEMS, interventions=ivs, m=m, instruction=instruction).accuracy
        assert summary.loc[(cond, m, "capability"), "mean"] == pytest.approx(acc)
        pairs = (
            HELD_OUT
            if instruction is None
            else [tl_steer.ContrastivePair(f"{instruction}\n{p.prompt}", p.positive, p.negative) for p in HELD_OUT]
        )
        lp, ln = tl_steer.pair_nll(model, pairs, interventions=ivs, m=m if ivs else 1.0)
        assert summary.loc[(cond, m, "pref_odds"), "mean"] == pytest.approx(float((ln - lp).mean()), abs=1e-5)
    base = summary.loc[(BASELINE, 0.0, "pref_odds"), "mean"]
    assert summary.loc[("vec", 3.0, "pref_odds"), "gain"] == pytest.approx(
        summary.loc[("vec", 3.0, "pref_odds"), "mean"] - base
    )
    # non-steering conditions are evaluated at m = 0 only; steering ones at every m
    assert set(result.items.query("condition == 'prompting'")["m"]) == {0.0}
    assert set(result.items.query("condition == 'vec'")["m"]) == {0.0, 1.0, 3.0}
    assert set(result.items.query("condition == 'vec, own grid'")["m"]) == {0.0, 2.0}
    assert no_hooks_left(model)


def test_paired_tests_and_bonferroni(result) -> None:
    tests = result.tests()
    assert len(tests) > 0 and BASELINE not in set(tests["condition"])
    np.testing.assert_allclose(tests["p_bonferroni"], np.minimum(tests["p"] * len(tests), 1.0))
    assert set(tests.query("metric == 'capability'")["test"]) == {"mcnemar_exact"}
    assert set(tests.query("metric == 'pref_odds'")["test"]) == {"wilcoxon"}


def test_mcnemar_is_the_exact_binomial_on_discordant_items() -> None:
    x = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 1], dtype=float)
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 1], dtype=float)
    out = paired_test("capability", x, y)
    # 5 gained, 1 lost: two-sided p = 2 * P(X <= 1), X ~ Bin(6, 1/2)
    assert out["p"] == pytest.approx(2 * (math.comb(6, 0) + math.comb(6, 1)) / 2**6)
    assert out["effect"] == pytest.approx(0.4)
    d = paired_test("pref_odds", np.array([1.0, 2.0, 3.5, 4.0]), np.array([0.0, 1.5, 2.0, 4.5]))
    diff = np.array([1.0, 0.5, 1.5, -0.5])
    assert d["effect"] == pytest.approx(diff.mean() / diff.std(ddof=1))


def test_matched_picks_the_closest_gain(result) -> None:
    matched = result.matched().set_index("condition")
    summary = result.summary()
    target = float(summary.query("condition == 'prompting' and metric == 'pref_odds'")["gain"].iloc[0])
    gains = summary.query("condition == 'vec' and metric == 'pref_odds' and m != 0").set_index("m")["gain"]
    assert matched.loc["vec", "m"] == (gains - target).abs().idxmin()
    assert matched.loc["vec", "reference_gain"] == pytest.approx(target)
    assert 0 <= matched.loc["vec", "capability_p_vs_reference"] <= 1


def test_plot_and_csv(result, tmp_path) -> None:
    result.plot(tmp_path / "gap.png")
    assert (tmp_path / "gap.png").stat().st_size > 10_000
    assert len(result.to_csv(tmp_path / "gap.csv").read_text().splitlines()) == len(result.items) + 1


def test_bad_input(model, vector) -> None:
    with pytest.raises(ConfigError, match="capability_items is empty"):
        capability_behavior_gap(model, [Condition("vec", vector)], HELD_OUT, [])
    with pytest.raises(ConfigError, match="names repeat"):
        capability_behavior_gap(model, [Condition("a", vector), Condition("a")], HELD_OUT, ITEMS)
    with pytest.raises(ConfigError, match="must have no intervention"):
        capability_behavior_gap(model, [Condition(BASELINE, vector)], HELD_OUT, ITEMS)
    with pytest.raises(ConfigError, match="not an MCItem"):
        capability_behavior_gap(model, [Condition("vec", vector)], HELD_OUT, [("q", "a", "b")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="finite"):
        capability_behavior_gap(model, [Condition("vec", vector)], HELD_OUT, ITEMS, ms=(0, float("nan")))
    assert no_hooks_left(model)


def test_parts_without_zero_or_baseline(model, vector) -> None:
    part = capability_behavior_gap(
        model,
        [Condition("vec", vector, ms=(2.0,))],
        HELD_OUT,
        ITEMS,
        include_baseline=False,
        include_zero=False,
        progress=False,
    )
    assert set(part.items["condition"]) == {"vec"} and set(part.items["m"]) == {2.0}
    with pytest.raises(ConfigError, match="no conditions"):
        capability_behavior_gap(model, [], HELD_OUT, ITEMS, include_baseline=False)


def test_given_sweeps_replace_scoring_at_the_strengths_they_hold(model, vector, result) -> None:
    """Per-pair tables given in ``sweeps`` are used at the strengths they hold (the others are scored): the
    same result as scoring everything; a table that does not hold every pair is refused before any work."""
    sweep = tl_steer.preference_utility(model, vector, HELD_OUT, [1.0], label="vec", progress=False).table
    prompt = tl_steer.preference_utility(model, None, HELD_OUT, instruction=INSTRUCTION, progress=False).table
    conditions = conditions_for({"vec": vector}, INSTRUCTION)
    conditions.append(Condition("vec, own grid", vector, ms=(2.0,)))
    given = capability_behavior_gap(
        model,
        conditions,
        HELD_OUT,
        ITEMS,
        ms=(0, 1, 3),
        progress=False,
        sweeps={"vec": sweep.iloc[::-1], "prompting": prompt},  # in any row order
    )
    pd.testing.assert_frame_equal(given.items, result.items, check_exact=False, atol=1e-9, rtol=0)
    with pytest.raises(ConfigError, match="not one per behaviour pair"):
        capability_behavior_gap(model, conditions, HELD_OUT, ITEMS, progress=False, sweeps={"vec": sweep.iloc[1:]})
