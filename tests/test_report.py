"""tl-steer report on a tiny model: every step runs, the files exist, a rerun resumes from the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import partial

import numpy as np
import pandas as pd
import pytest
from conftest import make_model, no_hooks_left
from test_gap import ITEMS
from test_sae_steering import make_sae
from test_split import HELD_OUT, PAIRS

from tl_steer.errors import ConfigError
from tl_steer.report import ReportData, ReportSettings, findings, pipeline, run_report
from tl_steer.report.html import Figure, Section, Table, render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


# no decay fits: on a random model's flat curves each takes ~10 s of SLSQP (2 s on the default model)
BASE = dict(
    forms=("vector",),
    methods=pipeline.DEFAULT_METHODS["standard"],
    n_train=8,
    n_test=4,
    epochs=1,
    n_cold=4,
    n_mc=6,
    n_probe_texts=16,
    decay_fit=False,
)


def settings(**kw):
    return ReportSettings.make("tiny", 1, instruction="Be positive.", **(BASE | kw))


def data():
    return ReportData("tiny", PAIRS, HELD_OUT, ITEMS, make_sae(), "")


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, run_report(model, data(), settings(), out, progress=False, log=lambda _: None)


def test_every_method_and_section_is_there(report, model) -> None:
    out, result = report
    conditions = list(result.comparison["condition"])
    assert conditions[:5] == ["diffmean", "sft/vector", "split/vector", "cold_kernel", "cold_fd"]
    assert conditions[5].startswith("sae/") and len(conditions) == 6
    assert "prompting" in set(result.sweeps.table["label"])
    # COLD's unit scales it to add DiffMean's norm (on its own examples) at m = 1
    row = result.comparison.set_index("condition").loc["cold_kernel"]
    assert row["unit"] > 1 and "m_trained" not in result.comparison
    text = (out / "report.html").read_text()
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    assert headings == [  # the findings open the report
        "What was found",
        "Set-up",
        "Methods compared: preference and utility",
        "Steered text",
        "Distance from the clean activations (manifold probe)",
        "Capability-behaviour gap",
        "Choosing the SAE feature",
    ]
    assert text.count("data:image/png;base64,") == 5
    for name in ("comparison.csv", "preference_utility.csv", "gap_summary.csv", "manifold.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hook"] == "blocks.1.hook_resid_post" and len(summary["comparison"]) == 6
    assert len(summary["findings"]) == 7 and (out / "findings.csv").stat().st_size > 0
    steps = summary["step_seconds"]  # where the time went, step by step: they add up to the run time
    assert list(steps) == ["interventions", "preference-utility", "manifold", "steered text", "gap", "write"]
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) == pytest.approx(summary["runtime_s"])
    assert no_hooks_left(model)


def test_the_findings_match_the_sweeps_and_the_gap(report) -> None:
    """The summary's behaviour gain at the trained strength is the comparison table's d_pref, and its
    accuracy change is the gap summary's, computed by other code paths."""
    out, result = report
    found = pd.read_csv(out / "findings.csv").set_index("condition")
    table = result.comparison.set_index("condition")
    assert list(found.index) == [*table.index, "prompting"]
    steered = found.loc[table.index]
    assert steered["d_pref"].to_numpy() == pytest.approx(table["d_pref"].to_numpy(), abs=1e-6)
    assert steered["d_util"].to_numpy() == pytest.approx(table["d_util"].to_numpy(), abs=1e-6)
    # prompting: its PrefOdds minus the clean model's (any sweep's m = 0)
    sweeps = result.sweeps.table
    clean = sweeps[(sweeps["label"] == "diffmean") & (sweeps["m"] == 0)]["pref_odds"].mean()
    prompted = sweeps[sweeps["label"] == "prompting"]["pref_odds"].mean()
    assert found.loc["prompting", "d_pref"] == pytest.approx(prompted - clean)
    gsum = result.gap.summary()
    cap = gsum[(gsum["condition"] == "diffmean") & (gsum["metric"] == "capability")]
    at = cap.loc[(cap["m"] - 1.0).abs().idxmin(), "gain"]
    assert found.loc["diffmean", "d_acc_pp"] == pytest.approx(100 * at)
    assert found["d_acc_pp"].isna().sum() == 1  # sft/vector: the gap measures one trained form only


def test_the_gap_table_is_conditions_by_strengths(report) -> None:
    out, result = report
    text = (out / "report.html").read_text()
    text = text[text.index("<h2>Capability-behaviour gap</h2>") :]  # the steered-text section has m columns too
    # the compact table: one row per condition, one column per strength (m = 1: each method's own strength)
    header = re.search(r"<th>condition</th>((?:\s*<th>m = [^<]+</th>)+)", text)
    assert header is not None
    assert re.findall(r"<th>(m = [^<]+)</th>", header.group(1)) == ["m = 0", "m = 0.25", "m = 1", "m = 2"]
    assert "<details><summary>Every metric with its CI" in text


def test_rerun_resumes_from_the_cache(report, model, monkeypatch) -> None:
    """A second run computes nothing again: every step's function is replaced by one that fails."""
    out, first = report

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached step")

    for name in ("diffmean", "sft", "split", "cold_kernel", "cold_fd", "rank_features", "sae_feature"):
        monkeypatch.setattr(pipeline, name, refuse)
    for name in ("preference_utility", "manifold_sweep", "capability_behavior_gap"):
        monkeypatch.setattr(pipeline, name, refuse)
    monkeypatch.setattr(pipeline.ManifoldProbe, "fit", refuse)
    again = run_report(model, data(), settings(), out, progress=False, log=lambda _: None)
    assert list(again.comparison["condition"]) == list(first.comparison["condition"])
    assert again.comparison["pref_odds"].tolist() == pytest.approx(first.comparison["pref_odds"].tolist())
    with pytest.raises(ConfigError, match="other settings .*epochs"):
        run_report(model, data(), settings(epochs=2), out, progress=False)


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="valid methods: diffmean, sft, split"):
        ReportSettings.make("x", 1, methods=("diffmean", "magic"))
    with pytest.raises(ConfigError, match="valid forms"):
        ReportSettings.make("x", 1, forms=("matrix",))


def test_html_escapes_and_embeds(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(tmp_path / "f.png")
    text = render("<T>", [Section("A & B", ["x < y"], figures=[Figure(tmp_path / "f.png", "what <to> see")])])
    assert "<T>" not in text and "&lt;T&gt;" in text and "x &lt; y" in text
    assert "data:image/png;base64," in text and "what &lt;to&gt; see" in text


def test_a_section_with_nothing_to_show_prints_no_heading() -> None:
    empty = pd.DataFrame()
    text = render(
        "T",
        [
            Section("Nothing here", tables=[("Matched to prompting's behaviour gain", empty)]),
            Section(
                "Kept", ["text"], tables=[Table("An empty table", empty), Table("Long", pd.DataFrame({"a": [1]}), True)]
            ),
        ],
    )
    assert "Nothing here" not in text and "Matched to prompting" not in text and "An empty table" not in text
    assert "Kept" in text and "<details><summary>Long (1 rows)</summary>" in text
    assert "class='table-wrap'" in text


def test_without_prompting_the_matched_table_is_left_out(model, tmp_path) -> None:
    """No prompting baseline: nothing to match, so neither the table nor its heading is printed, and the
    findings have no prompting row."""
    plain = ReportSettings.make("tiny", 1, **(BASE | {"methods": ("diffmean",), "instruction": None}))
    result = run_report(model, data(), plain, tmp_path, progress=False, log=lambda _: None)
    text = (tmp_path / "report.html").read_text()
    assert "Capability-behaviour gap" in text and "Matched to prompting" not in text
    assert list(pd.read_csv(tmp_path / "findings.csv")["condition"]) == ["diffmean"]
    assert list(result.comparison["condition"]) == ["diffmean"]


def _pairs_table(gains: dict[str, tuple[list[float], list[float]]]) -> pd.DataFrame:
    """Per label, m = 0 with zeros and m = 2 with the given per-pair PrefOdds and UtilOdds changes."""
    rows = []
    for label, (pref, util) in gains.items():
        for i, (p, u) in enumerate(zip(pref, util, strict=True)):
            rows.append({"label": label, "m": 0.0, "pair": i, "pref_odds": 0.0, "util_odds": -3.0})
            rows.append({"label": label, "m": 2.0, "pair": i, "pref_odds": p, "util_odds": -3.0 + u})
    return pd.DataFrame(rows)


def test_findings_ratio_only_where_something_is_lost() -> None:
    table = _pairs_table(
        {
            "costly": ([1.0, 1.2, 0.8, 1.0], [-0.5, -0.6, -0.4, -0.5]),
            "free": ([0.5, 0.7, 0.3, 0.5], [0.1, -0.1, 0.2, 0.0]),
        }
    )
    found = findings.efficiency(table, {"costly": 2.0, "free": 2.0}).set_index("condition")
    assert found.loc["costly", "d_pref"] == pytest.approx(1.0) and found.loc["costly", "d_util"] == pytest.approx(-0.5)
    assert found.loc["costly", "pref_per_util"] == pytest.approx(2.0)
    assert found.loc["costly", "pref_per_util_low"] <= 2.0 <= found.loc["costly", "pref_per_util_high"]
    assert pd.isna(found.loc["free", "pref_per_util"])  # utility not lost: no ratio
    assert found["d_acc_pp"].isna().all()  # no gap items given
    lines = findings.headline(found.reset_index())
    assert lines[0].startswith(
        "Largest behaviour gain (each method at m = 1, its trained strength): costly, PrefOdds +1.00"
    )
    # nothing gained and nothing lost: no sentence about it, rather than an empty one
    flat = findings.efficiency(_pairs_table({"flat": ([0.1, -0.1, 0.0], [0.1, -0.1, 0.0])}), {"flat": 2.0})
    assert len(findings.headline(flat)) == 1
    assert "no measurable loss of utility" in lines[1] and "free (+0.50)" in lines[1]
    assert "most behaviour per nat of UtilOdds lost: costly, +2.00" in lines[1] and "overlap" not in lines[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_a_headless_browser(report, tmp_path) -> None:
    """Chromium loads report.html offline; every figure decodes and every section has content."""
    if CHROMIUM is None:
        message = "Chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("TL_STEER_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    out, _ = report
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    run = subprocess.run(
        [CHROMIUM, *flags, (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120
    )
    dom = run.stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, run.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs["figures"] == "5" and attrs["figures-loaded"] == "5", attrs
    assert attrs["empty-sections"] == "0", attrs
    assert dom.count("<section") == 7 and dom.count("<figcaption>") == 5
    # the long tables are folded (every steered text in full, manifold, gap summary, gap tests, SAE candidates;
    # no decay fits here), and no table, however wide, makes the page scroll sideways
    assert attrs["folded"] == "5", attrs
    assert attrs["scrolls-sideways"] == "0", attrs


def test_an_unreadable_cache_says_how_to_start_over(tmp_path) -> None:
    from tl_steer.report.store import Store

    store = Store(tmp_path, {"a": 1})
    assert store.record("step", lambda: {"x": 1}) == {"x": 1}
    store.frame("table", lambda: __import__("pandas").DataFrame({"x": [1]}))
    (tmp_path / "cache" / "step.json").write_text('{"x": ')  # a crash mid-write by another tool
    (tmp_path / "cache" / "table.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"step.json is unreadable .*--fresh"):
        store.record("step", lambda: {"x": 2})
    with pytest.raises(ConfigError, match=r"table.csv is unreadable .*--fresh"):
        store.frame("table", lambda: None)
    (tmp_path / "cache" / "settings.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match=r"settings.json is unreadable .*--fresh"):
        Store(tmp_path, {"a": 1})


@pytest.mark.parametrize(
    ("flags", "n_train", "epochs", "forms", "n_mc"),
    [
        ([], 64, 1, ("vector",), 64),  # the default: about 10 minutes
        (["--quick"], 48, 1, ("vector",), 40),
        (["--full"], 100, 2, ("vector", "lora", "local_weight"), None),
    ],
)
def test_report_sizes_of_the_command(tmp_path, monkeypatch, flags, n_train, epochs, forms, n_mc) -> None:
    from tl_steer import cli

    class FakeModel:
        class cfg:  # noqa: N801
            n_layers = 4

    seen = {}

    def record(model, data, settings, out, **kwargs):
        seen.update(settings=settings, data=data)
        raise KeyboardInterrupt  # stop there: nothing to compute

    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    monkeypatch.setattr(cli, "_load_sae", lambda *args: (None, ""))
    monkeypatch.setattr(pipeline, "run_report", record)
    assert cli.main(["report", *flags, "--out", str(tmp_path / "r")]) == 130
    s = seen["settings"]
    assert (s.n_train, s.epochs, s.forms, s.n_mc) == (n_train, epochs, forms, n_mc)
    assert len(seen["data"].train) == n_train and s.quick == (flags == ["--quick"])


def test_quick_and_full_are_exclusive(capsys) -> None:
    from tl_steer import cli

    with pytest.raises(SystemExit):
        cli.main(["report", "--quick", "--full"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_preference_utility_figure_has_one_panel_per_method() -> None:
    from tl_steer.analysis.plots import plot_preference_utility

    rows = []
    for k, label in enumerate(("a", "b", "c")):
        for m in (-1.0, 0.0, 1.0, 2.0):
            rows.append({"label": label, "m": m, "pref_odds": k + m, "util_odds": -3 - m * m})
    rows.append({"label": "prompting", "m": 0.0, "pref_odds": 0.7, "util_odds": -2.5})
    summary = pd.DataFrame(rows)
    for col in ("pref_odds", "util_odds"):
        summary[f"{col}_low"], summary[f"{col}_high"] = summary[col] - 0.1, summary[col] + 0.1
    fig = plot_preference_utility(summary, xlabel="m (1 = made for)")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["a", "b", "c"]  # prompting is no panel of its own
    assert len({ax.get_ylim() for ax in panels}) == 1  # shared axes
    assert all(ax.get_xlabel() == "m (1 = made for)" for ax in panels)  # one row: each panel is a bottom one
    assert panels[0].get_ylabel() == "log-odds (nats per token)"
    for ax in panels:  # two curves and, as reference lines, prompting's PrefOdds and UtilOdds
        flat = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1]
        assert {round(float(line.get_ydata()[0]), 3) for line in flat} >= {0.7, -2.5}
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_gap_figure_shows_strengths_by_marker_without_point_labels() -> None:
    import matplotlib.pyplot as plt

    from tl_steer.analysis.gap import BASELINE, Condition, GapResult

    rows = []
    for cond, ms in ((BASELINE, (0.0,)), ("prompting", (0.0,)), ("a", (0.5, 2.0, 4.0)), ("b", (1.0, 4.0, 8.0))):
        for m in ms:
            for item in range(6):
                rows.append({"condition": cond, "m": m, "metric": "pref_odds", "item": item, "value": m + item / 10})
                rows.append({"condition": cond, "m": m, "metric": "capability", "item": item, "value": item % 2})
    conditions = [Condition(BASELINE), Condition("prompting", instruction="x")]
    conditions += [Condition("a", object(), ms=(0.5, 2.0, 4.0)), Condition("b", object(), ms=(1.0, 4.0, 8.0))]  # type: ignore[arg-type]
    unit = {"a": 2.0, "b": 4.0}
    fig = GapResult(pd.DataFrame(rows), conditions).plot(strength=lambda name, m: m / unit.get(name, 1.0))
    ax = fig.axes[0]
    assert not ax.texts  # no point labels to overlap
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [BASELINE, "prompting", "a", "b", "m = 0.25", "m = 1", "m = 2"]
    assert "percentage points" in ax.get_ylabel() and "nats per token" in ax.get_xlabel()
    plt.close(fig)


def test_the_adaptive_forms_run_in_the_report(model, tmp_path) -> None:
    """``--full`` (and ``--methods``) add the four adaptive forms: each is built, swept and measured in the
    gap like any other intervention, and its m = 1 row in the comparison equals its own sweep at m = 1."""
    assert set(pipeline.ADAPTIVE) <= set(ReportSettings.make("tiny", 1).methods)  # the full size has them
    assert not set(pipeline.ADAPTIVE) & set(ReportSettings.make("tiny", 1, size="standard").methods)
    methods = ("diffmean", *pipeline.ADAPTIVE)
    result = run_report(model, data(), settings(methods=methods), tmp_path, progress=False, log=lambda _: None)
    assert list(result.comparison["condition"]) == list(methods)
    sweep = result.sweeps.table
    for name in pipeline.ADAPTIVE:
        row = result.comparison.set_index("condition").loc[name]
        at_one = sweep[(sweep["label"] == name) & (sweep["m"] == 1.0)]["pref_odds"].mean()
        assert row["pref_odds"] == pytest.approx(at_one, abs=1e-6)
    assert result.gap is not None and set(pipeline.ADAPTIVE) <= set(result.gap.summary()["condition"].astype(str))
    assert no_hooks_left(model)


def test_the_full_gap_measures_behaviour_on_generated_text(model, tmp_path) -> None:
    """With ``gap_text`` (the full size's default), the gap's items gain the concept judge's score of greedy
    completions at every strength; its mean equals the same judge and generation run outside the report."""
    from tl_steer.analysis.gap import Condition
    from tl_steer.analysis.generation_sweep import TextBehavior
    from tl_steer.judges.probe import ProbeJudge

    assert ReportSettings.make("tiny", 1).gap_text and not ReportSettings.make("tiny", 1, size="standard").gap_text
    result = run_report(
        model,
        data(),
        settings(methods=("diffmean",), gap_text=True),
        tmp_path,
        progress=False,
        log=lambda _: None,
    )
    assert result.gap is not None
    items = result.gap.items
    text = items[items["metric"] == "text_behavior"]
    assert set(text["condition"]) == {"no steering", "diffmean", "diffmean + prompting"}
    judge = ProbeJudge.fit(model, PAIRS, HELD_OUT, concept="tiny")
    prompts = tuple(dict.fromkeys(p.prompt for p in HELD_OUT))[: pipeline.GAP_TEXT_PROMPTS]
    behaviour = TextBehavior(prompts, judge, max_new_tokens=pipeline.GAP_TEXT_TOKENS)
    direct = behaviour.scores(model, Condition("diffmean", tl_steer_load_diffmean(tmp_path)), 1.0)
    at_one = text[(text["condition"] == "diffmean") & (text["m"] == 1.0)]["value"]
    assert at_one.mean() == pytest.approx(float(direct.mean()), abs=1e-6)
    assert no_hooks_left(model)


def test_the_gap_judges_the_steered_text_steps_completions(model, tmp_path, monkeypatch) -> None:
    """Where the gap's text prompts and length are the steered-text step's (as in the full size), the gap
    judges that step's completions instead of generating them again: fewer generate calls, the same scores
    as generating them (greedy decoding of the same batches)."""
    from tl_steer.analysis import generation_sweep
    from tl_steer.analysis.gap import Condition
    from tl_steer.analysis.generation_sweep import TextBehavior
    from tl_steer.judges.probe import ProbeJudge
    from tl_steer.report.generation_section import GEN_SIZES

    n_prompts, n_new = GEN_SIZES["standard"]  # the tiny settings' steered-text size
    monkeypatch.setattr(pipeline, "GAP_TEXT_PROMPTS", n_prompts)
    monkeypatch.setattr(pipeline, "GAP_TEXT_TOKENS", n_new)
    calls: list[tuple[str, ...]] = []
    real = generation_sweep.generate

    def counting(model, condition, prompts, ms, **kwargs):
        calls.append((condition.name, *map(str, ms)))
        return real(model, condition, prompts, ms, **kwargs)

    monkeypatch.setattr(generation_sweep, "generate", counting)
    run = partial(run_report, model, data(), settings(methods=("diffmean",), gap_text=True), tmp_path)
    result = run(progress=False, log=lambda _: None)
    # no steering (m = 0) and diffmean at m = 1 and 2 come from the steered-text step; the rest is generated
    assert sorted(calls) == sorted(
        [("diffmean", "0.25"), *(("diffmean + prompting", m) for m in ("0.25", "1.0", "2.0"))]
    )
    judge = ProbeJudge.fit(model, PAIRS, HELD_OUT, concept="tiny")
    prompts = tuple(dict.fromkeys(p.prompt for p in HELD_OUT))[:n_prompts]
    behaviour = TextBehavior(prompts, judge, max_new_tokens=n_new)
    assert result.gap is not None
    text = result.gap.items[result.gap.items["metric"] == "text_behavior"]
    vector = tl_steer_load_diffmean(tmp_path)
    for m in (1.0, 2.0):
        direct = behaviour.scores(model, Condition("diffmean", vector), m)
        got = text[(text["condition"] == "diffmean") & (text["m"] == m)].sort_values("item")["value"]
        np.testing.assert_allclose(got.to_numpy(), direct, atol=1e-9)
    assert no_hooks_left(model)


def tl_steer_load_diffmean(out):
    """The report's cached DiffMean intervention, read back from its cache."""
    import tl_steer

    return tl_steer.load(next((out / "cache").rglob("diffmean*.safetensors")))
