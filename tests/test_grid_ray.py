"""The grid's cells on a local Ray cluster (2 CPUs, started once for this module): the report equals the
in-process one number for number; a worker killed mid-cell is restarted and its cell rerun, each cell counted
once; an address where no cluster listens is refused within seconds."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from test_grid import TinyData, cells, comparable, load_tiny

from tl_steer.errors import ConfigError
from tl_steer.report.grid import run_grid

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'tl-steer[ray]'")

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs whose workers import this folder's modules (the tiny model's loader and
    data) and skip the run-time shape checks (tests/conftest.py installs them on import)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TL_STEER_SHAPE_CHECKS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("in_process")
    return run_grid(load_tiny(), cells(), TinyData(), out, progress=False, log=lambda _: None)


def test_the_ray_report_equals_the_in_process_one(cluster, in_process, tmp_path) -> None:
    lines: list[str] = []
    result = run_grid(
        load_tiny(),
        cells(),
        TinyData(),
        tmp_path,
        ray_address="local",
        loader=load_tiny,
        progress=False,
        log=lines.append,
    )
    assert comparable(result.summary) == comparable(in_process.summary)
    assert result.summary["where"] == "Ray (local), 2 worker(s)"
    assert (tmp_path / "winners.csv").read_text() == (Path(in_process.files[0])).read_text()
    # the cells' files came back to the driver: each cell's folder has its report and its cache
    for record in result.cells:
        folder = tmp_path / "cells" / f"{record['settings']['concept']}-{record['hook'].replace('.', '_')}"
        assert (folder / "report.html").is_file() and (folder / "cache" / "diffmean.safetensors").is_file()
    assert sum("done on Ray" in line for line in lines) == 4


def test_a_worker_killed_mid_cell_is_retried_once(cluster, in_process, tmp_path) -> None:
    """The data factory kills its worker (os._exit) the first time it is called for one cell; Ray restarts
    the worker, which reruns that cell. Every cell comes back once, with the in-process numbers."""
    marker = tmp_path / "killed"
    lines: list[str] = []
    data = TinyData(crash_marker=str(marker))
    result = run_grid(
        load_tiny(),
        cells(),
        data,
        tmp_path / "out",
        ray_address="local",
        loader=load_tiny,
        progress=False,
        log=lines.append,
    )
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert comparable(result.summary) == comparable(in_process.summary)
    done = [line for line in lines if "done on Ray" in line]
    assert len(done) == 4 and sum("tiny_flipped-blocks_2" in line for line in done) == 1
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("<details class='cell'>") == 4
    assert len(json.loads((tmp_path / "out" / "summary.json").read_text())["cells"]) == 4


def test_an_unreachable_address_is_refused_within_seconds(tmp_path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at {address}"):
            run_grid(load_tiny(), cells(), TinyData(), tmp_path, ray_address=address, loader=load_tiny, progress=False)
        assert time.perf_counter() - start < 10
    with pytest.raises(ConfigError, match="is not one of 'local', 'auto'"):
        run_grid(load_tiny(), cells(), TinyData(), tmp_path, ray_address="http://x:1", loader=load_tiny, progress=False)
    assert not (tmp_path / "cells").exists()


def test_cli_refuses_an_unreachable_cluster_before_the_model_loads(tmp_path, monkeypatch, capsys) -> None:
    from tl_steer import cli

    def refuse(path):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(cli, "_load_model", refuse)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    assert cli.main(["report", "--layers", "5", "--ray", f"127.0.0.1:{port}", "--out", str(tmp_path / "r")]) == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err and time.perf_counter() - start < 10
