"""The grid report on a local Ray cluster against the same grid in this process: wall time and overhead.

    .venv/bin/python benchmarks/grid_ray.py --model tiny                     # seconds: Ray's fixed costs
    .venv/bin/python benchmarks/grid_ray.py --model default --concepts sentiment formality --layers 10 20 \\
        --size quick --methods diffmean prompting                             # the default model's cells

Both runs start from an empty folder with the driver's model already loaded. In-process: the cells one after
the other with all of the machine's CPUs as torch threads. Ray: a local cluster of the same CPUs
(``ray.init(num_cpus=N)``), one actor of 1 CPU per CPU, each loading the model once; the time includes the
actors' start and model loads, and is given with and without the cluster's own start-up (``ray.init``).
Overhead = Ray's wall time / in-process wall time - 1. The two reports' numbers are compared (they must be
equal). Writes a markdown summary to --out (default: benchmarks/results/grid_ray.md, appended per run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def comparable(summary: dict) -> dict:
    """The grid summary's numbers without the times (train_s, runtime)."""
    cells = [
        c | {"comparison": [{k: v for k, v in row.items() if k != "train_s"} for row in c["comparison"]]}
        for c in summary["cells"]
    ]
    return json.loads(json.dumps({"winners": summary["winners"], "cells": cells}, default=float))


def largest_difference(a: object, b: object) -> float:
    """The largest absolute difference between two JSON trees of the same shape (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((largest_difference(a[k], b.get(k)) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return max((largest_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if (a == b or (a != a and b != b)) else abs(a - b)
    return 0.0 if a == b else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--concepts", nargs="+", default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--size", default="quick")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=N",
        help="override a size field of every cell, e.g. --set n_train=24 n_test=8 n_mc=16",
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--one-thread", action="store_true", help="also run in-process on 1 torch thread")
    parser.add_argument("--keep", default=None, help="keep the in-process grid report in this folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grid_ray.md"))
    args = parser.parse_args()

    import ray
    import torch

    from tl_steer.report.grid import BuiltinData, grid_cells, run_grid

    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if args.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        import test_grid

        concepts, layers = args.concepts or list(test_grid.CONCEPTS), args.layers or [1, 2]
        kwargs = dict(test_grid.SMALL) | ({"methods": tuple(args.methods)} if args.methods else {})
        cells = grid_cells(concepts, layers, size=args.size, known=test_grid.CONCEPTS, **kwargs)
        loader, data = test_grid.load_tiny, test_grid.TinyData()
        env |= {"PYTHONPATH": str(ROOT / "tests"), "TL_STEER_SHAPE_CHECKS": "0"}
    else:
        from tl_steer.cli import grid_loader

        concepts, layers = args.concepts or ["sentiment", "formality"], args.layers or [10, 20]
        kwargs = {"methods": tuple(args.methods)} if args.methods else {}
        kwargs |= {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
        cells = grid_cells(concepts, layers, size=args.size, **kwargs)
        loader, data = functools.partial(grid_loader, None, "float32"), BuiltinData()
    model = loader()
    quiet = lambda _: None  # noqa: E731
    load_start = os.getloadavg()

    torch.set_num_threads(args.cpus)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="grid_inproc_"))
    start = time.perf_counter()
    local = run_grid(model, cells, data, folder, progress=False, log=quiet)
    in_process = time.perf_counter() - start
    print(f"in-process: {in_process:.1f} s", flush=True)
    one_thread = None
    if args.one_thread:  # the tiny model runs faster on 1 thread than on 2
        torch.set_num_threads(1)
        start = time.perf_counter()
        run_grid(model, cells, data, tempfile.mkdtemp(prefix="grid_inproc1_"), progress=False, log=quiet)
        one_thread = time.perf_counter() - start
        print(f"in-process, 1 thread: {one_thread:.1f} s", flush=True)

    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="ERROR")
    started = time.perf_counter()
    remote = run_grid(
        model, cells, data, tempfile.mkdtemp(prefix="grid_ray_"), ray_address="local", loader=loader, log=quiet
    )
    done = time.perf_counter()
    ray.shutdown()
    with_start, without_start = done - start, done - started
    diff = largest_difference(comparable(remote.summary), comparable(local.summary))
    same = "identical" if diff == 0 else f"largest difference {diff:.1e}"
    print(f"Ray: {with_start:.1f} s with the cluster's start ({started - start:.1f} s), numbers: {same}")

    cell_s = [c["summary"]["runtime_s"] for c in local.cells]
    lines = [
        f"### {args.model} model: {len(concepts)} concepts x {len(layers)} layers = {len(cells)} cells, "
        f"size {args.size}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {args.cpus} CPUs; load average "
        f"{load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (other work on the machine "
        "inflates both runs). Concepts "
        f"{', '.join(concepts)}; layers {', '.join(map(str, layers))}; methods {', '.join(cells[0].methods)}; "
        f"model {model.cfg.model_name}; cell sizes {', '.join(args.set) or 'as the size gives them'}.",
        "",
        "| run | wall time (s) | overhead vs in-process |",
        "|---|---:|---:|",
        f"| in-process, {args.cpus} torch threads, cells one after the other | {in_process:.1f} | |",
        f"| Ray, {args.cpus} actors x 1 CPU, including `ray.init` ({started - start:.1f} s) | {with_start:.1f} | "
        f"{100 * (with_start / in_process - 1):+.0f}% |",
        f"| Ray, the cluster already running | {without_start:.1f} | {100 * (without_start / in_process - 1):+.0f}% |",
    ]
    if one_thread is not None:
        lines += [
            f"| in-process, 1 torch thread (reference) | {one_thread:.1f} | |",
            f"| Ray including `ray.init`, against 1 thread in-process | | "
            f"{100 * (with_start / one_thread - 1):+.0f}% |",
        ]
    lines += [
        "",
        f"In-process seconds per cell: {', '.join(f'{s:.1f}' for s in cell_s)}. "
        f"Numbers of the two reports (every cell's findings and comparison): {same}"
        + ("" if diff == 0 else " (float32 sums in another order: the workers run 1 torch thread, in-process 2)")
        + ".",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Grid report: Ray against in-process\n\nWritten by `benchmarks/grid_ray.py`.\n\n"
    old = out.read_text() if out.exists() else header
    out.write_text(old + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
