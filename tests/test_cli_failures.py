"""CLI calls that fail validation leave nothing behind and say what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tl_steer.models
from tl_steer import cli


@pytest.fixture(autouse=True)
def no_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("these tests must not load the default model")

    monkeypatch.setattr(tl_steer.models, "load_default_model", refuse)
    monkeypatch.setattr(cli, "_load_model", refuse)


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Item {i}:", "positive": f" good {i}", "negative": f" bad {i}"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--concept", "sarcasm"],
        ["sweep", "--concept", "sarcasm"],
        ["report", "--layer", "-100"],
    ],
    ids=["report_unknown_concept", "sweep_unknown_concept", "report_bad_layer"],
)
def test_a_failed_validation_leaves_no_out_directory(capsys, tmp_path: Path, monkeypatch, argv) -> None:
    class FakeModel:
        class cfg:  # noqa: N801
            n_layers = 4

    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    out = tmp_path / "results" / "run1"
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_prompting_with_pairs_and_no_instruction_is_refused(capsys, tmp_path: Path, pairs: Path) -> None:
    out = tmp_path / "r"
    code = cli.main(["report", "--pairs", str(pairs), "--methods", "diffmean", "prompting", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--instruction" in err and "prompting" in err
    assert not out.exists()


def test_default_methods_with_pairs_and_no_instruction_still_run(capsys, tmp_path: Path, pairs: Path, monkeypatch):
    """Without an explicit --methods, prompting is left out with a note, as before (not an error)."""
    import tl_steer.report.pipeline as pipeline

    class FakeModel:
        class cfg:  # noqa: N801
            n_layers = 4

    seen = {}

    def fake_run(model, data, settings, out, fresh=False):
        seen["methods"] = settings.methods
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    monkeypatch.setattr(cli, "_load_sae", lambda *args: (None, ""))
    monkeypatch.setattr(pipeline, "run_report", fake_run)
    assert cli.main(["report", "--pairs", str(pairs), "--quick", "--out", str(tmp_path / "r")]) == 130
    assert "prompting baseline is left out" in capsys.readouterr().out
    assert "diffmean" in seen["methods"]
