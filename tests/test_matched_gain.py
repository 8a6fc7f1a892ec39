"""Matched-gain comparison: the interpolated strength, and the comparison on a tiny model against twins
whose matched strength is known in advance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SENTIMENT_PAIRS, TINY_HOOK

from tl_steer import ConfigError, ContrastivePair
from tl_steer.analysis.matched_gain import match_strength, matched_gain
from tl_steer.data.mc import mc_item
from tl_steer.interventions import AddVector


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


HOOK = TINY_HOOK
PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS[:5]]
QUESTIONS = [
    mc_item("The weather is", ["fine", "cold", "rude"], 0),
    mc_item("The food was", ["awful", "kind", "bread"], 1),
    mc_item("hello", ["world", "market", "staff"], 0),
    mc_item("The staff were", ["kind", "dirty", "today"], 2),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_match_strength_interpolates_the_first_crossing() -> None:
    ms, gains = [0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 3.0, 2.0]
    assert match_strength(ms, gains, 2.0, 1.0) == pytest.approx(1.5)
    assert match_strength(ms, gains, 0.5, 1.0) == pytest.approx(0.5)
    assert math.isnan(match_strength(ms, gains, 5.0, 1.0))
    # the negative side is walked outward from 0 too, and the positive side ignored there
    assert match_strength([-2.0, -1.0, 0.0, 1.0], [4.0, 1.0, 0.0, 9.0], 2.5, -1.0) == pytest.approx(-1.5)
    with pytest.raises(ConfigError, match="m = 0"):
        match_strength([1.0, 2.0], [1.0, 2.0], 1.5, 1.0)


@pytest.fixture(scope="module")
def vector(tiny) -> torch.Tensor:
    return torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_a_rescaled_twin_matches_at_the_rescaled_strength(tiny, vector):
    """A twin with twice the unit reaches the reference's gain at m = t / 2 and loses exactly as much."""
    ref = AddVector(HOOK, vector)
    result = matched_gain(
        tiny,
        {"diffmean": ref, "twin": ref.with_unit(2.0), "half": ref.with_unit(0.5)},
        PAIRS,
        QUESTIONS,
        ms=[0.0, 0.5, 1.0, 2.0, 4.0],
    )
    points = result.table().set_index(["method", "target"])
    for t in (1.0, 2.0):
        assert points.loc[("twin", t), "m"] == pytest.approx(t / 2, abs=1e-9)
        assert points.loc[("half", t), "m"] == pytest.approx(2 * t, abs=1e-9)
        for key in ("pref_gain", "util_change", "acc_change"):
            assert points.loc[("twin", t), key] == pytest.approx(points.loc[("diffmean", t), key], abs=1e-9)
    ratios = points.loc[("twin", 2.0), ["util_loss_ratio"]].to_numpy(dtype=float)
    assert np.all(np.isnan(ratios) | np.isclose(ratios, 1.0))
    assert "| twin" in result.to_markdown()
    assert set(result.items["method"]) == {"clean", "diffmean", "twin", "half"}


def test_a_method_that_never_reaches_the_gain_is_nan(tiny, vector):
    ref = AddVector(HOOK, vector)
    weak = AddVector(HOOK, vector, unit=1e-3)
    result = matched_gain(tiny, {"diffmean": ref, "weak": weak}, PAIRS, QUESTIONS, ms=[0.0, 1.0, 2.0])
    row = result.table().set_index(["method", "target"]).loc[("weak", 2.0)]
    assert math.isnan(row["m"]) and math.isnan(row["util_change"])
    assert not result.goal()["holds"].any()


def test_bad_input_is_refused(tiny, vector):
    ref = AddVector(HOOK, vector)
    with pytest.raises(ConfigError, match="reference"):
        matched_gain(tiny, {"other": ref}, PAIRS, QUESTIONS)
    with pytest.raises(ConfigError, match="target of 0"):
        matched_gain(tiny, {"diffmean": ref}, PAIRS, QUESTIONS, targets=(0.0, 1.0))
    with pytest.raises(ConfigError, match="not an Intervention"):
        matched_gain(tiny, {"diffmean": ref, "x": "nope"}, PAIRS, QUESTIONS)  # type: ignore[dict-item]


def test_a_coarse_sweep_is_refined_until_the_gain_matches(tiny, vector):
    """With only m = 0 and 8 in its grid, the half-unit twin's interpolated strength is off; the measured
    refinement brings the gain within tol of the reference's, near the exact answer m = 2 t."""
    ref = AddVector(HOOK, vector)
    half = ref.with_unit(0.5)
    coarse = matched_gain(
        tiny, {"diffmean": ref, "half": half}, PAIRS, QUESTIONS, ms={"diffmean": [0.0], "half": [0.0, 8.0]}, refine=0
    )
    fine = matched_gain(
        tiny, {"diffmean": ref, "half": half}, PAIRS, QUESTIONS, ms={"diffmean": [0.0], "half": [0.0, 8.0]}, tol=0.01
    )
    for t in (1.0, 2.0):
        rough = coarse.table().set_index(["method", "target"]).loc[("half", t)]
        row = fine.table().set_index(["method", "target"]).loc[("half", t)]
        assert abs(row["pref_gain"] - row["reference_gain"]) <= 0.01 * abs(row["reference_gain"])
        assert abs(row["m"] - 2 * t) < abs(rough["m"] - 2 * t)


# ----- generated text at the matched strengths ---------------------------------------------------

TEXT_PROMPTS = ("hello world, the", "I went to the market and", "The film", "The food was")


@pytest.fixture(scope="module")
def text_behavior(tiny):
    from tl_steer.analysis.generation_sweep import TextBehavior
    from tl_steer.judges import ProbeJudge

    judge = ProbeJudge.fit(tiny, PAIRS, PAIRS[:4], concept="toy")
    return TextBehavior(TEXT_PROMPTS, judge, max_new_tokens=5)


def _judged(tiny, text, iv, m):
    """Independent computation: generate, then judge each completion on the clean model."""
    from tl_steer import generate
    from tl_steer.judges import FluencyJudge

    table = generate(tiny, iv, list(TEXT_PROMPTS), [m], max_new_tokens=5).sort_values("item")
    prompts, completions = table["prompt"].tolist(), table["completion"].tolist()
    concept = np.nan_to_num(text.judge.score(tiny, prompts, completions)["concept"], nan=0.0)
    return concept, FluencyJudge().score(tiny, prompts, completions)["nll"]


def test_generated_text_is_judged_at_the_matched_strengths(tiny, vector, text_behavior):
    ref = AddVector(HOOK, 3 * vector)
    result = matched_gain(
        tiny,
        {"diffmean": ref, "twin": ref.with_unit(2.0)},
        PAIRS,
        QUESTIONS,
        ms=[0.0, 0.5, 1.0, 2.0, 4.0],
        text=text_behavior,
    )
    points = result.table().set_index(["method", "target"])
    clean_text, clean_nll = _judged(tiny, text_behavior, None, 0.0)
    for t in (1.0, 2.0):
        text, nll = _judged(tiny, text_behavior, ref, t)  # the twin at m = t / 2 is the reference at t
        for method in ("diffmean", "twin"):
            got = result.items[(result.items["method"] == method) & (result.items["target"] == t)]
            for metric, expected in (("text_behavior", text), ("fluency_nll", nll)):
                values = got[got["metric"] == metric].sort_values("item")["value"].to_numpy()
                np.testing.assert_allclose(values, expected, atol=1e-6)
            row = points.loc[(method, t)]
            assert row["text_change"] == pytest.approx(float(np.mean(text - clean_text)), abs=1e-6)
            ok = np.isfinite(nll) & np.isfinite(clean_nll)
            assert ok.any()
            assert row["fluency_change"] == pytest.approx(float(np.mean(nll[ok] - clean_nll[ok])), abs=1e-6)
            for key in ("text", "fluency"):
                low, high = row[f"{key}_low"], row[f"{key}_high"]
                assert np.isnan(low) or low - 1e-9 <= row[f"{key}_change"] <= high + 1e-9
        # the twin's texts are the reference's: nothing to tell them apart
        assert points.loc[("twin", t), "text_p_vs_ref"] == pytest.approx(1.0)
    assert not np.allclose(points.loc[("diffmean", 2.0), ["text_change", "fluency_change"]].to_numpy(float), 0.0)
    clean = result.items[result.items["method"] == "clean"]
    np.testing.assert_allclose(
        clean[clean["metric"] == "text_behavior"].sort_values("item")["value"].to_numpy(), clean_text, atol=1e-12
    )
    assert "text_change" in result.to_markdown() and "fluency_loss_ratio" in result.to_markdown()


def test_text_must_be_a_text_behavior(tiny, vector):
    with pytest.raises(ConfigError, match="TextBehavior"):
        matched_gain(tiny, {"diffmean": AddVector(HOOK, vector)}, PAIRS, QUESTIONS, text="nope")  # type: ignore[arg-type]
