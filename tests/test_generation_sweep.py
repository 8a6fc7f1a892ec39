"""The generation sweep: combined scores, CIs, the steering window, proxy-vs-text correlation, end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import no_hooks_left
from scipy import stats

import tl_steer
from tl_steer import AddVector, Condition, ConfigError, ContrastivePair
from tl_steer.analysis.generation_sweep import (
    GenerationSweepResult,
    add_combined_scores,
    generation_sweep,
    harmonic_scores,
    proxy_text_correlation,
    spearman_ci,
)
from tl_steer.judges import FluencyJudge, ProbeJudge, RelevanceJudge

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def test_harmonic_scores_against_hand_values():
    a, b, c = np.array([2.0, 1.0, 0.0, np.nan]), np.array([2.0, 2.0, 2.0, 1.0]), np.array([2.0, 0.5, 1.0, 1.0])
    expected = [2.0, 3 / (1 + 0.5 + 2), 0.0, np.nan]
    np.testing.assert_allclose(harmonic_scores(a, b, c), expected, equal_nan=True)


def _items(rows):
    return pd.DataFrame(rows, columns=["condition", "m", "item", "completion", "concept", "nll", "rep4", "relevance"])


def test_combined_scores_by_hand():
    items = _items(
        [
            ("no steering", 0.0, 0, " a", 0.25, 2.0, 0.0, 0.4),
            ("no steering", 0.0, 1, " b", 0.5, 4.0, 0.0, 0.2),
            ("vec", 1.0, 0, " c", 0.75, 4.0, 0.5, 0.6),
            ("vec", 1.0, 1, " d", 0.9, 2.0, 0.0, -0.1),
        ]
    )
    out = add_combined_scores(items)
    # PMI_0 = mean(0.4, 0.2) = 0.3; NLL_0 per item = 2.0, 4.0
    np.testing.assert_allclose(out["concept_2"], [0.5, 1.0, 1.5, 1.8])
    np.testing.assert_allclose(out["fluency_2"], [2.0, 2.0, 2.0 * (2 / 4) * 0.5, 2.0])
    np.testing.assert_allclose(out["relevance_2"], [2.0, 2 * 0.2 / 0.3, 2.0, 0.0])
    expected = [3 / (1 / 0.5 + 1 / 2 + 1 / 2), 3 / (1 + 1 / 2 + 0.3 / 0.4), 3 / (1 / 1.5 + 1 / 0.5 + 1 / 2), 0.0]
    np.testing.assert_allclose(out["hmean"], expected)


def _synthetic(n=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for cond, ms in (("no steering", [0.0]), ("vec", [0.0, 1.0, 2.0, 3.0])):
        for m in ms:
            for i in range(n):
                concept = min(1.0, 0.2 + 0.2 * m + 0.05 * rng.standard_normal())
                nll = 2.0 + (0.2 * m if m < 3 else 2.0) + 0.1 * rng.standard_normal()
                rows.append((cond, m, i, " text", concept, nll, 0.0, 0.3 + 0.05 * rng.standard_normal()))
    items = add_combined_scores(_items(rows))
    conds = [Condition("no steering"), Condition("vec", AddVector(HOOK, torch.ones(4)))]
    return GenerationSweepResult(items, conds, [{"judge": "probe", "auroc": 0.7, "reliable": False}])


def test_summary_means_and_cis_against_normal_approximation():
    res = _synthetic()
    summary = res.summary()
    assert len(summary) == 5 and (summary["n"] == 200).all()
    for _, row in summary.iterrows():
        values = res.items[(res.items.condition == row.condition) & (res.items.m == row.m)]["concept"].to_numpy()
        assert row["concept"] == pytest.approx(values.mean())
        half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
        assert row["concept_low"] == pytest.approx(values.mean() - half, abs=0.25 * half)
        assert row["concept_high"] == pytest.approx(values.mean() + half, abs=0.25 * half)
    # the unreliable probe judge is flagged beside its scores
    assert (summary["probe_auroc"] == 0.7).all() and not summary["probe_reliable"].any()


def test_steering_window():
    res = _synthetic()
    window = res.steering_window(margin=0.5)
    row = window.iloc[0]
    # concept rises at m = 1, 2, 3; NLL rises by 0.2 m (0.2, 0.4) and by 2.0 at m = 3: outside the margin
    assert row["ms"] == [1.0, 2.0] and row["m_low"] == 1.0 and row["m_high"] == 2.0
    assert res.steering_window(margin=0.3).iloc[0]["ms"] == [1.0]
    assert res.steering_window(margin=3.0).iloc[0]["ms"] == [1.0, 2.0, 3.0]


def test_spearman_ci_against_ranks_by_hand():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(30), rng.standard_normal(30)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    rho, low, high = spearman_ci(x, y)
    assert rho == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert low < rho < high
    # the vectorised bootstrap against scipy's spearmanr on each resample of the same draw
    idx = np.random.default_rng(0).integers(0, 30, (2000, 30))
    boots = [stats.spearmanr(x[i], y[i]).statistic for i in idx]
    assert (low, high) == pytest.approx((np.percentile(boots, 2.5), np.percentile(boots, 97.5)), abs=1e-12)
    assert spearman_ci(x, 2 * x + 1)[0] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in spearman_ci([1, 2], [2, 3]))


def test_proxy_text_correlation_ranks_gains_and_includes_prompting():
    text = pd.DataFrame(
        {
            "condition": ["no steering", "prompting", "a", "a", "a", "b", "b"],
            "m": [0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 2.0],
            "concept": [0.2, 0.3, 0.2, 0.4, 0.6, 0.5, 0.9],
            "nll": [2.0, 2.1, 2.0, 2.2, 2.5, 2.3, 3.0],
        }
    )
    proxy = pd.DataFrame(
        {
            "label": ["no steering", "prompting", "a", "a", "a", "b", "b"],
            "m": [0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 2.0],
            "pref_odds": [0.5, 0.6, 0.5, 1.0, 1.5, 1.2, 2.0],
            "util_odds": [-2.0, -2.05, -2.0, -2.1, -2.4, -2.2, -2.9],
        }
    )
    out = proxy_text_correlation(text, proxy).set_index("comparison")
    pref = out.loc["PrefOdds gain vs concept gain"]
    # points: prompting (from no steering), a@1, a@2, b@1, b@2 (b has no m = 0: gains from no steering)
    assert pref["n_points"] == 5
    gains_p = [0.1, 0.5, 1.0, 0.7, 1.5]
    gains_c = [0.1, 0.2, 0.4, 0.3, 0.7]
    assert pref["rho"] == pytest.approx(stats.spearmanr(gains_p, gains_c).statistic)
    assert pref["rho"] == pytest.approx(1.0)
    util = out.loc["UtilOdds change vs fluency change (-NLL)"]
    assert util["rho"] == pytest.approx(1.0)
    reversed_proxy = proxy.assign(pref_odds=-proxy["pref_odds"])
    assert proxy_text_correlation(text, reversed_proxy).iloc[0]["rho"] == pytest.approx(-1.0)


def _pairs():
    good = [" the film was wonderful and the staff were kind", " fresh bread and a cup of tea, wonderful"]
    bad = [" the food was awful and the room was cold and dirty", " the room was dirty and the food was awful"]
    prompts = ["hello world,", "I went to the market and", "The weather is", "we bought"]
    return [ContrastivePair(prompts[i % 4], good[i % 2], bad[(i // 2) % 2]) for i in range(8)]


def test_generation_sweep_end_to_end(tiny, tmp_path):
    probe = ProbeJudge.fit(tiny, _pairs(), _pairs()[:4], concept="toy")
    g = torch.Generator().manual_seed(0)
    iv = AddVector(HOOK, 3 * torch.randn(tiny.cfg.d_model, generator=g, dtype=torch.float64), method="vec")
    conds = [iv, Condition("prompting", instruction="The weather is fine."), Condition("vec + prompting", iv, "Hi.")]
    prompts = ["hello world, the", "I went to the market and", "The film", "The food was"]
    res = generation_sweep(
        tiny, conds, prompts, [0.0, 2.0], [probe, FluencyJudge(), RelevanceJudge()], concept="toy", max_new_tokens=6
    )
    summary = res.summary()
    # no steering is added first; 1 + 2 + 1 + 2 (condition, m) points
    assert summary["condition"].tolist()[0] == "no steering" and len(summary) == 6
    assert {"concept", "concept_low", "nll", "relevance", "hmean", "probe_auroc", "n_empty"} <= set(summary.columns)
    assert len(res.items) == 6 * 4
    window = res.steering_window()
    assert window["condition"].tolist() == ["vec", "vec + prompting"]
    fig_path = res.plot(tmp_path / "gen.png") and tmp_path / "gen.png"
    assert fig_path.stat().st_size > 1000
    assert len(pd.read_csv(res.to_csv(tmp_path / "items.csv"))) == 24
    assert len(pd.read_csv(res.to_csv(tmp_path / "summary.csv", summary=True))) == 6
    assert no_hooks_left(tiny)


def test_generation_sweep_checks_judges_before_generating(tiny):
    probe = ProbeJudge.fit(tiny, _pairs(), _pairs()[:4], concept="toy")
    iv = AddVector(HOOK, torch.ones(tiny.cfg.d_model, dtype=torch.float64))
    called = []
    original = tiny.generate
    tiny.generate = lambda *a, **k: called.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        with pytest.raises(ConfigError, match="fitted for the concept"):
            generation_sweep(tiny, iv, ["a b", "c d"], [1.0], [probe], concept="sentiment")
        with pytest.raises(ConfigError, match="must have no intervention"):
            generation_sweep(tiny, Condition("no steering", iv), ["a b", "c d"], [1.0])
        with pytest.raises(Exception, match="2 distinct prompts"):
            generation_sweep(tiny, iv, ["a b", "a b"], [1.0])
        with pytest.raises(ConfigError, match="Judge"):
            generation_sweep(tiny, iv, ["a b", "c d"], [1.0], ["fluency"])  # type: ignore[list-item]
    finally:
        del tiny.generate
    assert called == []


# ----- the report's section on steered text ---------------------------------------------------------------


def _context(tiny, out, quick=True):
    import tl_steer
    from tl_steer.analysis.preference_utility import preference_utility
    from tl_steer.report import ReportData, ReportSettings
    from tl_steer.report.pipeline import RELATIVE
    from tl_steer.report.sections import ReportContext
    from tl_steer.report.store import Store

    train = _pairs()
    test = [
        ContrastivePair(p, " fine and wonderful", " cold and dirty") for p in ("The film", "The food was", "I went")
    ]
    settings = ReportSettings.make("tiny", 1, quick=quick, methods=("diffmean", "prompting"), instruction="Be kind.")
    data = ReportData("tiny", train, test, [], None, "")
    dm = tl_steer.diffmean(tiny, train, HOOK)
    pu = preference_utility(tiny, dm, test, RELATIVE, progress=False)
    prompting = preference_utility(tiny, None, test, instruction="Be kind.", label="prompting", progress=False)
    pu.table = pd.concat([pu.table, prompting.table], ignore_index=True)
    Store(out, {"run": "test"})  # the cache folder run_report opens
    return ReportContext(out, tiny, data, settings, {"diffmean": dm}, pd.DataFrame({"condition": ["diffmean"]}), pu)


def test_report_section_shows_texts_scores_and_the_correlation(tiny, tmp_path):
    from tl_steer.report import html
    from tl_steer.report.generation_section import _cut, generation_section, generation_sweep_for_report

    ctx = _context(tiny, tmp_path)
    section = generation_section(ctx)
    assert section is not None and section.title == "Steered text"
    texts = section.shown_tables()[0].frame
    # 3 prompts x (no steering, diffmean, prompting)
    assert len(texts) == 9 and texts["condition"].tolist()[:3] == ["no steering", "diffmean", "prompting"]
    items = pd.read_csv(tmp_path / "generation_texts.csv").fillna({"completion": ""})
    clean = items[items["condition"] == "no steering"].sort_values("item")["completion"].tolist()
    assert texts.loc[0, "m = 0"] == _cut(clean[0]) and texts.loc[1, "m = 0"] == "″"
    steered = items[(items["condition"] == "diffmean") & (items["m"] == 2.0)].sort_values("item")
    assert len(steered) == 3 and set(items["m"]) == {0.0, 1.0, 2.0}
    assert "Spearman rho" in section.paragraphs[1] and "AUROC" in section.paragraphs[0]
    assert (tmp_path / "figures" / "generation.png").stat().st_size > 1000
    assert "generation" in ctx.summary and len(ctx.summary["generation"]["proxy_vs_text"]) == 2
    page = html.render("t", [section])
    assert page.count("<table") == 4 and page.count("<details>") == 1  # the full texts are folded
    # a rerun reads every condition from the cache: no generation
    called = []
    original = tiny.generate
    tiny.generate = lambda *a, **k: called.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        again, _ = generation_sweep_for_report(_context(tiny, tmp_path))
    finally:
        del tiny.generate
    assert called == []
    assert again.items["completion"].tolist() == items["completion"].tolist()


def test_report_section_escapes_hostile_text():
    from tl_steer.report import html
    from tl_steer.report.generation_section import side_by_side_table

    items = pd.DataFrame(
        {
            "condition": ["no steering", "vec", "vec"],
            "m": [0.0, 1.0, 2.0],
            "item": [0, 0, 0],
            "sample": [0, 0, 0],
            "completion": ["<script>alert(1)</script>", "a & b", "x" * 500],
        }
    )
    table = side_by_side_table(items, ["<b>prompt</b>"])
    assert table.loc[1, "m = 0"] == "″" and len(table.loc[1, "m = 2"]) == 160
    assert len(side_by_side_table(items, ["p"], cut=False).loc[1, "m = 2"]) == 500
    page = html.render("t", [html.Section("s", tables=[html.Table("", table)])])
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>prompt" not in page


# ----- behaviour from generated text in the capability-behaviour gap ---------------------------------------


def test_gap_takes_behaviour_from_generated_text(tiny):
    from test_gap import ITEMS

    from tl_steer import capability_behavior_gap, generate
    from tl_steer.analysis.generation_sweep import TextBehavior

    probe = ProbeJudge.fit(tiny, _pairs(), _pairs()[:4], concept="toy")
    g = torch.Generator().manual_seed(0)
    iv = AddVector(HOOK, 3 * torch.randn(tiny.cfg.d_model, generator=g, dtype=torch.float64), method="vec")
    prompts = ("hello world, the", "I went to the market and", "The film")
    text = TextBehavior(prompts, probe, max_new_tokens=5)
    conds = [Condition("vec", iv, ms=(2.0,)), Condition("prompting", instruction="Be kind.")]
    result = capability_behavior_gap(tiny, conds, _pairs()[:4], ITEMS[:4], text=text, progress=False)
    summary = result.summary()
    rows = summary[summary["metric"] == "text_behavior"]
    # no steering, vec at m = 0 and 2, prompting; one value per prompt
    assert len(rows) == 4 and (rows["n"] == 3).all()
    # independent computation: generate, then the probe's score of each text
    table = generate(tiny, iv, list(prompts), [2.0], max_new_tokens=5)
    expected = probe.score(tiny, list(prompts), table["completion"].tolist())["concept"]
    got = result.items[(result.items["metric"] == "text_behavior") & (result.items["condition"] == "vec")]
    np.testing.assert_allclose(got[got["m"] == 2.0].sort_values("item")["value"], np.nan_to_num(expected), atol=1e-12)
    assert "text_behavior" in set(result.tests()["metric"])
    fig = result.plot()  # both behaviours in the figure, one panel each
    assert [ax.get_xlabel().split()[1] for ax in fig.axes] == ["PrefOdds", "generated"]
    # the judge must fit the model, checked before any work
    from conftest import make_model

    other = make_model("llama", seed=1)
    with pytest.raises(tl_steer.ModelMismatchError):
        capability_behavior_gap(other, [], _pairs()[:4], ITEMS[:4], text=text, progress=False)


def test_text_behaviour_judges_known_completions_instead_of_generating(tiny):
    """``known`` completions are judged as given (the same scores as generating them), and must number one
    per prompt."""
    from tl_steer import generate
    from tl_steer.analysis.generation_sweep import TextBehavior

    probe = ProbeJudge.fit(tiny, _pairs(), _pairs()[:4], concept="toy")
    prompts = ("hello world, the", "I went to the market and", "The film")
    texts = tuple(generate(tiny, None, list(prompts), [0.0], max_new_tokens=5, batch_size=16)["completion"])
    fresh = TextBehavior(prompts, probe, max_new_tokens=5)
    known = TextBehavior(prompts, probe, max_new_tokens=5, known={("no steering", 0.0): texts})
    clean = Condition("no steering")
    np.testing.assert_allclose(known.scores(tiny, clean, 0.0), fresh.scores(tiny, clean, 0.0), atol=1e-12)
    other = TextBehavior(prompts, probe, known={("no steering", 0.0): ("a dog", "a cat", "a bird")})
    assert not np.allclose(other.scores(tiny, clean, 0.0), fresh.scores(tiny, clean, 0.0))
    with pytest.raises(ConfigError, match="one per prompt"):
        TextBehavior(prompts, probe, known={("x", 1.0): ("only one",)})
