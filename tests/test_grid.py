"""The grid report on a tiny model: concepts x layers, each cell the single report's comparison, one page with
which method wins where; cells cached and resumable; bad input refused before any work; Ray never imported
without ray_address (the Ray path itself: tests/test_grid_ray.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_model, no_hooks_left
from test_gap import ITEMS
from test_split import HELD_OUT, PAIRS

from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import ConfigError, MissingDependencyError
from tl_steer.report import ReportData, grid, pipeline, run_report
from tl_steer.report.grid import grid_cells, run_grid
from tl_steer.report.grid_section import winners

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
CONCEPTS = ("tiny", "tiny_flipped")
# small cells: three steering methods (a winner and a runner-up) and prompting; no SAE, no decay fits
SMALL = dict(
    forms=("vector",),
    methods=("diffmean", "split", "cold_kernel", "prompting"),
    instruction="Be positive.",
    n_train=8,
    n_test=4,
    epochs=1,
    n_cold=4,
    n_mc=6,
    n_probe_texts=16,
    decay_fit=False,
)


def load_tiny():
    """The grid's model loader (module level, so that Ray can pickle it by reference)."""
    return make_model("llama")


@dataclass(frozen=True)
class TinyData:
    """The tiny concepts: "tiny" (the sentiment pairs) and "tiny_flipped" (the same with the sides swapped).
    ``crash_marker``: on the first call for the cell named ``crash_cell``, create the file and kill the
    process (os._exit), as a worker that dies mid-cell (tests/test_grid_ray.py)."""

    crash_marker: str | None = None
    crash_cell: tuple[str, int] = ("tiny_flipped", 2)

    def __call__(self, settings):
        if self.crash_marker and (settings.concept, settings.layer) == self.crash_cell:
            marker = Path(self.crash_marker)
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
        train, test = PAIRS, HELD_OUT
        if settings.concept == "tiny_flipped":
            train, test = ([ContrastivePair(p.prompt, p.negative, p.positive) for p in ps] for ps in (train, test))
        return ReportData(settings.concept, train[: settings.n_train], test[: settings.n_test], ITEMS, None, "")


def cells(layers=(1, 2), concepts=CONCEPTS, **kw):
    return grid_cells(list(concepts), layers, size="quick", known=CONCEPTS, **(SMALL | kw))


def comparable(summary: dict) -> dict:
    """The grid summary's numbers (every cell's findings and comparison, the winners) without the times
    (each comparison row's train_s: seconds to build the intervention)."""
    cells = [c | {"comparison": [drop_time(row) for row in c["comparison"]]} for c in summary["cells"]]
    return {"winners": summary["winners"], "cells": cells}


def drop_time(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "train_s"}


@pytest.fixture(scope="module")
def model():
    return load_tiny()


@pytest.fixture(scope="module")
def grid_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    return out, run_grid(model, cells(), TinyData(), out, progress=False, log=lambda _: None)


def test_every_cell_is_the_single_report(grid_run, model, tmp_path) -> None:
    """A cell's findings equal those of run_report on the same concept and layer, run on its own."""
    out, result = grid_run
    assert [(r["settings"]["concept"], r["settings"]["layer"]) for r in result.cells] == [
        ("tiny", 1),
        ("tiny", 2),
        ("tiny_flipped", 1),
        ("tiny_flipped", 2),
    ]
    settings = cells(layers=(2,), concepts=("tiny_flipped",))[0]
    alone = run_report(model, TinyData()(settings), settings, tmp_path, progress=False, log=lambda _: None)
    cell = result.cells[3]["summary"]
    assert cell["findings"] == json.loads(json.dumps(alone.summary["findings"], default=float))
    alone_rows = json.loads(json.dumps(alone.summary["comparison"], default=float))
    assert [drop_time(r) for r in cell["comparison"]] == [drop_time(r) for r in alone_rows]
    assert (out / "cells" / "tiny_flipped-blocks_2_hook_resid_post" / "report.html").is_file()
    assert no_hooks_left(model)


def test_the_winners_are_the_largest_gain_with_ci_separation(grid_run) -> None:
    """Per cell, the winner is the steering method (never prompting) with the largest d_pref in the cell's
    findings, and 'separated' is its CI's low end above the runner-up's high end: recomputed here from the
    cells' findings.csv files."""
    out, result = grid_run
    assert len(result.winners) == 4
    for row in result.winners.itertuples():
        found = pd.read_csv(out / "cells" / f"{row.concept}-blocks_{row.layer}_hook_resid_post" / "findings.csv")
        steered = found[found["condition"] != "prompting"].sort_values("d_pref", ascending=False)
        assert row.best == steered.iloc[0]["condition"] and row.runner_up == steered.iloc[1]["condition"]
        assert row.d_pref == pytest.approx(steered.iloc[0]["d_pref"])
        assert row.d_util == pytest.approx(steered.iloc[0]["d_util"])
        assert row.separated == bool(steered.iloc[0]["d_pref_low"] > steered.iloc[1]["d_pref_high"])


def test_winners_on_made_up_findings() -> None:
    """An independent case: the largest d_pref wins, prompting never does, separation needs disjoint CIs."""

    def record(concept, rows):
        return {"settings": {"concept": concept, "layer": 3}, "hook": "blocks.3.hook_resid_post", "summary": {
            "findings": [dict(zip(("condition", "d_pref", "d_pref_low", "d_pref_high"), r, strict=True))
                         | {"d_util": -0.1, "d_util_low": -0.2, "d_util_high": 0.0} for r in rows]}}  # fmt: skip

    table = winners(
        [
            record("a", [("prompting", 9.0, 8.0, 10.0), ("x", 1.0, 0.8, 1.2), ("y", 0.5, 0.3, 0.7)]),
            record("b", [("x", 1.0, 0.5, 1.5), ("y", 1.1, 0.6, 1.6)]),
        ]
    )
    assert list(table["best"]) == ["x", "y"] and list(table["runner_up"]) == ["y", "x"]
    assert list(table["separated"]) == [True, False]


def test_the_page_has_the_summary_and_every_cell_folded(grid_run) -> None:
    out, result = grid_run
    text = (out / "report.html").read_text()
    headings = re.findall(r"<h2>([^<]+)</h2>", text)
    assert headings == ["Where each method wins", "Set-up", "Cells"]
    assert text.count("<details class='cell'>") == 4
    # each cell shows its own sections again (the single report's headings, one per cell)
    assert text.count("<h3 class='part'>Methods compared: preference and utility</h3>") == 4
    assert (out / "figures" / "grid_winners.png").stat().st_size > 0
    shown = pd.read_csv(out / "winners.csv")
    assert list(shown["concept"]) == ["tiny", "tiny", "tiny_flipped", "tiny_flipped"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["cells"]) == 4 and summary["where"] == "in-process"


def test_a_rerun_computes_nothing_and_a_new_cell_only_itself(grid_run, model, monkeypatch) -> None:
    out, first = grid_run
    ran = []
    real = grid.run_cell
    monkeypatch.setattr(
        grid, "run_cell", lambda m, d, s, f, **kw: ran.append((s.concept, s.layer)) or real(m, d, s, f, **kw)
    )
    again = run_grid(model, cells(), TinyData(), out, progress=False, log=lambda _: None)
    assert ran == [] and comparable(again.summary) == comparable(first.summary)
    # a grid with one more layer: only its two cells run (and the old ones keep their numbers)
    bigger = run_grid(model, cells(layers=(0, 1, 2)), TinyData(), out, progress=False, log=lambda _: None)
    assert sorted(ran) == [("tiny", 0), ("tiny_flipped", 0)]
    old = [c for c in bigger.summary["cells"] if c["layer"] != 0]
    assert comparable({"winners": [], "cells": old}) == comparable(first.summary | {"winners": []})


def test_a_cell_resumes_from_its_cache(grid_run, model, tmp_path, monkeypatch) -> None:
    """A cell interrupted after its interventions were built resumes without building them again."""
    one = cells(layers=(1,), concepts=("tiny",))
    original = pipeline.preference_utility
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "preference_utility", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(model, one, TinyData(), tmp_path, progress=False, log=lambda _: None)
    assert not (tmp_path / "cells" / "tiny-blocks_1_hook_resid_post" / "cell.json").exists()
    monkeypatch.setattr(pipeline, "preference_utility", original)

    def refuse(*args, **kwargs):
        raise AssertionError("rebuilt a cached intervention")

    for name in ("diffmean", "split", "cold_kernel"):
        monkeypatch.setattr(pipeline, name, refuse)
    resumed = run_grid(model, one, TinyData(), tmp_path, progress=False, log=lambda _: None)
    out, first = grid_run
    assert comparable(resumed.summary)["cells"][0] == comparable(first.summary)["cells"][0]


def test_bad_input_is_refused_before_any_work(model, tmp_path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(grid, "run_cell", refuse)
    with pytest.raises(ConfigError, match="tiny-llama-0 has 3 layers, so layers must be in 0..2"):
        run_grid(model, cells(layers=(1, 3)), TinyData(), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="the grid is empty"):
        cells(layers=())
    with pytest.raises(ConfigError, match="the grid is empty"):
        run_grid(model, [], TinyData(), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown concept.*nonsense; choose among tiny, tiny_flipped or 'all'"):
        cells(concepts=("tiny", "nonsense"))
    assert [c.concept for c in grid_cells("all", [1], known=CONCEPTS, **SMALL)] == list(CONCEPTS)
    with pytest.raises(ConfigError, match="valid methods"):
        cells(methods=("diffmean", "magic"))
    with pytest.raises(ConfigError, match="repeats cell"):
        run_grid(model, cells() + cells(), TinyData(), tmp_path, progress=False)
    assert not (tmp_path / "cells").exists()
    # a cache of another grid's settings (here the epochs) is refused, naming the key that differs
    folder = tmp_path / "cells" / "tiny-blocks_1_hook_resid_post" / "cache"
    folder.mkdir(parents=True)
    other = pipeline.cache_key(model, "tiny", cells(epochs=2)[0])
    (folder / "settings.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"other settings \(epochs differ\)"):
        run_grid(model, cells(), TinyData(), tmp_path, progress=False)
    # ... and so is one of another model
    other = pipeline.cache_key(model, "tiny", cells()[0]) | {"model": "another-model"}
    (folder / "settings.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"other settings \(model differ\)"):
        run_grid(model, cells(), TinyData(), tmp_path, progress=False)
    assert no_hooks_left(model)


def test_ray_address_without_a_loader_or_without_ray(model, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="needs loader="):
        run_grid(model, cells(), TinyData(), tmp_path, ray_address="local", progress=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tl-steer\[ray\]'"):
        run_grid(model, cells(), TinyData(), tmp_path, ray_address="local", loader=load_tiny, progress=False)
    assert not (tmp_path / "cells").exists()


def test_without_ray_address_ray_is_never_imported(tmp_path) -> None:
    """A grid run in a fresh process (the CLI's modules imported too) leaves `ray` out of sys.modules."""
    script = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import tl_steer, tl_steer.cli, tl_steer.report.grid
from test_grid import TinyData, cells, load_tiny
from tl_steer.report.grid import run_grid
run_grid(load_tiny(), cells(layers=(1,), concepts=("tiny",), methods=("diffmean",)), TinyData(), {str(tmp_path)!r},
         progress=False, log=lambda _: None)
assert (__import__("pathlib").Path({str(tmp_path)!r}) / "report.html").is_file()
print("ray imported:", "ray" in sys.modules)
"""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TL_STEER_SHAPE_CHECKS": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ray imported: False" in done.stdout


# ----- the command line ----------------------------------------------------------------------------------


class FakeModel:
    class cfg:  # noqa: N801
        n_layers = 30
        model_name = "fake-30"


def refuse(*args, **kwargs):
    raise AssertionError("got past the checks")


def test_cli_runs_the_grid_of_every_concept_and_layer(tmp_path, monkeypatch) -> None:
    from tl_steer import cli

    seen = {}

    def fake_run_grid(model, cells, data, out, **kw):
        seen.update(cells=[(c.concept, c.layer, c.quick, c.methods) for c in cells], ray=kw["ray_address"])
        raise KeyboardInterrupt  # stop here: the cells are what this test checks

    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    monkeypatch.setattr(grid, "run_grid", fake_run_grid)
    assert cli.main(["report", "--concept", "all", "--layers", "5", "10", "--quick", "--out", str(tmp_path)]) == 130
    concepts = grid.builtin_concepts()
    assert [(c, layer) for c, layer, *_ in seen["cells"]] == [(c, layer) for c in concepts for layer in (5, 10)]
    assert all(quick and methods == pipeline.DEFAULT_METHODS["quick"] for *_, quick, methods in seen["cells"])
    assert seen["ray"] is None
    # two concepts and no --layers: a grid at the middle layer
    assert cli.main(["report", "--concept", "sentiment", "formality", "--out", str(tmp_path)]) == 130
    assert [c[:2] for c in seen["cells"]] == [("sentiment", 15), ("formality", 15)]


def test_cli_grid_bad_input(tmp_path, monkeypatch, capsys) -> None:
    from tl_steer import cli

    monkeypatch.setattr(cli, "_load_model", refuse)  # every check below comes before the model loads
    out = tmp_path / "r"
    assert cli.main(["report", "--concept", "sentiment", "sarcasm", "--layers", "5", "--out", str(out)]) == 2
    assert "unknown concept(s) sarcasm; choose among" in capsys.readouterr().err
    assert cli.main(["report", "--layer", "3", "--layers", "5", "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["report", "--pairs", "x.jsonl", "--layers", "5", "--out", str(out)]) == 2
    assert "built-in concepts" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_load_model", lambda path, host=None: FakeModel())
    monkeypatch.setattr(grid, "run_cell", refuse)
    assert cli.main(["report", "--layers", "5", "30", "--quick", "--out", str(out)]) == 2
    assert "layer(s) 30 past the model: fake-30 has 30 layers" in capsys.readouterr().err
    assert not out.exists()


def test_grid_cells_take_the_report_commands_forms_and_instructions() -> None:
    """As `tl-steer report` does: SFT/SPLIT as vectors unless the size is full; a built-in concept's own
    prompting instruction unless one is given."""
    quick, full = grid_cells(["sentiment"], [3], size="quick"), grid_cells(["sentiment"], [3], size="full")
    assert quick[0].forms == ("vector",) and full[0].forms == ("vector", "lora", "local_weight")
    assert quick[0].instruction == grid.CONCEPT_INSTRUCTIONS["sentiment"]
    assert grid_cells(["sentiment"], [3], instruction="Be nice.")[0].instruction == "Be nice."
    assert quick[0] == pipeline.ReportSettings.make(
        "sentiment", 3, size="quick", forms=("vector",), instruction=grid.CONCEPT_INSTRUCTIONS["sentiment"]
    )
