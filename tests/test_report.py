"""tl-steer report on a tiny model: every step runs, the files exist, a rerun resumes from the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import make_model, no_hooks_left
from test_gap import ITEMS
from test_sae_steering import make_sae
from test_split import HELD_OUT, PAIRS

from tl_steer.errors import ConfigError
from tl_steer.report import ReportData, ReportSettings, pipeline, run_report
from tl_steer.report.html import Figure, Section, render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def settings(**kw):
    # no decay fits: on a random model's flat curves each takes ~10 s of SLSQP (2 s on the default model)
    base = dict(forms=("vector",), n_train=8, n_test=4, epochs=1, n_cold=4, n_mc=6, n_probe_texts=16, decay_fit=False)
    return ReportSettings.make("tiny", 1, instruction="Be positive.", **(base | kw))


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
    # the non-trained methods are scaled to add DiffMean's norm at m_trained
    row = result.comparison.set_index("condition").loc["cold_kernel"]
    assert row["m_trained"] > 0
    text = (out / "report.html").read_text()
    for title in ("Overview", "Methods compared", "manifold probe", "Capability-behaviour gap", "SAE feature"):
        assert title in text
    assert text.count("data:image/png;base64,") == 4
    for name in ("comparison.csv", "preference_utility.csv", "gap_summary.csv", "manifold.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hook"] == "blocks.1.hook_resid_post" and len(summary["comparison"]) == 6
    assert no_hooks_left(model)


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
    assert attrs["figures"] == "4" and attrs["figures-loaded"] == "4", attrs
    assert attrs["empty-sections"] == "0", attrs
    assert dom.count("<section") == 5 and dom.count("<figcaption>") == 4


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
