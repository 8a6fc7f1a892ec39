"""Speed of the report's three reuses on the default model, each against the path it replaced, and
(``--report``) the wall time of the full single-concept report with the time of each step.

1. Strength sweeps (preference and utility) unembed only the positions that predict a completion token,
   against the full logits of every position: DiffMean at ``blocks.L.hook_resid_post``, the 40 held-out
   pairs of a concept, the report's nine strengths.
2. Multiple-choice scoring (the capability-behaviour gap) restarts every steered scoring at the steered block
   from clean residuals kept once for the items (``MCCleanPrefix``), against today's shared-prefix path that
   runs every block each time: one scoring of all 265 built-in questions at m = 1, after the kept residuals
   were filled (as for the gap's 2nd..32nd scorings); the one-time fill is reported too.
3. The gap's behaviour on generated text judges the steered-text step's completions where they are the same
   (m = 1 and 2 of every steering condition, no steering, prompting), instead of generating them again:
   the time of one generation (16 prompts, 32 new tokens, greedy, batch 16) that is no longer run.

Runs alternate (old, new, old, new, ...) after a warm-up; each is timed with the process's CPU clock and the
wall clock; ratios are of the medians. The largest difference of the numbers between the two paths is given.

    python benchmarks/report_speed.py [--repeats 3] [--layer 15] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

import tl_steer
from tl_steer.analysis import preference_utility as pu_module
from tl_steer.analysis.capability import MCCleanPrefix, mc_option_nll, restart_layer
from tl_steer.report.pipeline import RELATIVE

RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def alternate(old: Callable[[], Any], new: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Median CPU and wall seconds of ``old`` and ``new`` over alternating runs after one warm-up each."""
    old(), new()
    runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    outs: dict[str, Any] = {}
    for _ in range(repeats):
        for key, fn in (("old", old), ("new", new)):
            cpu, wall, outs[key] = timed(fn)
            runs[key].append((cpu, wall))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in runs.items()}
    return {"med": med, "runs": runs, "out": outs}


def row(label: str, result: dict[str, Any], diff: float) -> str:
    (oc, ow), (nc, nw) = result["med"]["old"], result["med"]["new"]
    runs = " / ".join(", ".join(f"{c:.1f}" for c, _ in result["runs"][k]) for k in ("old", "new"))
    return (
        f"| {label} | {oc:.2f} | {nc:.2f} | **{nc / oc:.2f}x** | {ow:.2f} | {nw:.2f} | {nw / ow:.2f}x | {diff:.1e} "
        f"| {runs} |"
    )


def full_report(layer: int, out: str | None) -> dict[str, Any]:
    """`tl-steer report --full` in a fresh process and a fresh folder (``out``, kept, or a temporary one):
    wall time and the step times."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or tmp)
        if folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"{folder} is not empty: the full report is timed from a fresh cache")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "tl_steer.cli", "report", "--full", "--layer", str(layer), "--out", str(folder)]
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((folder / "summary.json").read_text())
    return {"wall": wall, "steps": summary.get("step_seconds", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--concept", default="sentiment")
    parser.add_argument("--report", action="store_true", help="also time the full report (about half an hour)")
    parser.add_argument("--report-out", default=None, help="keep the full report in this (new) folder")
    parser.add_argument("--out", default=str(RESULTS / "report_speed.md"))
    args = parser.parse_args()

    model = tl_steer.load_default_model()
    hook = f"blocks.{args.layer}.hook_resid_post"
    train = tl_steer.load_pairs(args.concept, "train")[:100]
    test = tl_steer.load_pairs(args.concept, "test")[:40]
    vector = tl_steer.diffmean(model, train, hook)
    rows = []

    # 1. the sweep: full logits against the scored positions only
    def sweep() -> np.ndarray:
        table = tl_steer.preference_utility(model, vector, test, list(RELATIVE), progress=False).table
        return table[["L_p", "L_n"]].to_numpy()

    def sweep_full_logits() -> np.ndarray:
        with mock.patch.object(pu_module, "scores_from_final", lambda *a, **k: False):
            return sweep()

    res = alternate(sweep_full_logits, sweep, args.repeats)
    diff = float(np.abs(res["out"]["old"] - res["out"]["new"]).max())
    rows.append(row(f"strength sweep ({len(test)} pairs x {len(RELATIVE)} strengths)", res, diff))
    print(rows[-1], flush=True)

    # 2. multiple-choice scoring, steered: every block against a restart from the kept clean residuals
    items = tl_steer.load_mc_items("general")
    clean = MCCleanPrefix(model, restart_layer(vector, model.cfg.n_layers))
    fill_cpu, fill_wall, _ = timed(lambda: mc_option_nll(model, items, interventions=[vector], clean_prefix=clean))
    res = alternate(
        lambda: mc_option_nll(model, items, interventions=[vector], m=1.0),
        lambda: mc_option_nll(model, items, interventions=[vector], m=1.0, clean_prefix=clean),
        args.repeats,
    )
    old, new = res["out"]["old"], res["out"]["new"]
    finite = torch.isfinite(old)
    diff = float((old[finite] - new[finite]).abs().max())
    rows.append(row(f"multiple choice, steered ({len(items)} questions)", res, diff))
    print(rows[-1], flush=True)

    # 3. one generation of the gap's text behaviour that is now judged from the steered-text step instead
    prompts = tl_steer.load_prompts(args.concept, "test")[:16]
    gen = [timed(lambda: tl_steer.generate(model, vector, prompts, [1.0], max_new_tokens=32, batch_size=16))]
    gen += [timed(lambda: tl_steer.generate(model, vector, prompts, [1.0], max_new_tokens=32, batch_size=16))]
    gen_cpu, gen_wall = statistics.median(c for c, _, _ in gen), statistics.median(w for _, w, _ in gen)

    lines = [
        f"# The report's reuses, each against the path it replaced ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; torch threads {torch.get_num_threads()}. "
        f"Default model, DiffMean at `{hook}` ({args.concept}, {len(train)} training pairs); median of "
        f"{args.repeats} alternating runs after a warm-up. `python benchmarks/report_speed.py"
        f"{' --report' if args.report else ''}`.",
        "",
        "| what | old (CPU s) | new (CPU s) | ratio (CPU) | old (wall s) | new (wall s) | ratio (wall) "
        "| largest difference | all runs (CPU s): old / new |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Multiple choice: filling the kept clean residuals (the first steered scoring of the items) took "
        f"{fill_cpu:.1f} CPU s ({fill_wall:.1f} s wall); every later scoring at this layer costs the 'new' column. "
        "The largest difference is of the NLL per token (nats).",
        "",
        f"Generated text: one generation of the gap's text behaviour (16 prompts, 32 new tokens, greedy, batch 16, "
        f"steered) takes {gen_cpu:.1f} CPU s ({gen_wall:.1f} s wall); the full report's gap now judges the "
        "steered-text step's completions for 22 of its 32 scorings (no steering, prompting, and m = 1 and 2 of "
        "its 10 steering conditions) instead of generating them again: the same texts (greedy decoding of the "
        "same batches, tested).",
        "",
    ]
    if args.report:
        print("timing the full report ...", flush=True)
        full = full_report(args.layer, args.report_out)
        steps = ", ".join(f"{k} {v / 60:.1f}" for k, v in full["steps"].items())
        lines += [
            "## The full single-concept report",
            "",
            f"`tl-steer report --full --layer {args.layer}` ({args.concept}; fresh cache, fresh process): "
            f"**{full['wall'] / 60:.1f} min** wall. Minutes per step: {steps}.",
            "",
        ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
