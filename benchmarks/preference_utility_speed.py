"""Speed of the preference-utility sweep: cached clean prefix (start_at_layer) against the naive
per-strength full forward pass, on the default model.

Both paths score the same pairs at the same 9 strengths with a DiffMean vector at a middle layer; runs
alternate (naive, cached, naive, ...) after one warm-up each, and the ratio of the medians is reported.
The theory for a model of L layers steered at layer l: 9 / (l/L + 9 (L - l)/L).

    python benchmarks/preference_utility_speed.py [--repeats 3] [--pairs 40] [--layer 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import tl_steer
from tl_steer.analysis.preference_utility import preference_utility


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "preference_utility_speed.md"))
    args = parser.parse_args()

    model = tl_steer.load_default_model()
    n_layers = model.cfg.n_layers
    test = tl_steer.load_pairs("sentiment", "test")[: args.pairs]
    vector = tl_steer.diffmean(model, tl_steer.load_pairs("sentiment", "train"), f"blocks.{args.layer}.hook_resid_post")
    ms = np.linspace(-4, 4, 9)

    def run(cached: bool) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        result = preference_utility(model, vector, test, ms, cache_prefix=cached, progress=False)
        return time.perf_counter() - start, result.table[["L_p", "L_n"]].to_numpy()

    run(False), run(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    tables = {}
    for _ in range(args.repeats):
        for cached in (False, True):
            seconds, tables[cached] = run(cached)
            times[cached].append(seconds)
    naive, fast = statistics.median(times[False]), statistics.median(times[True])
    theory = 9 / (args.layer / n_layers + 9 * (n_layers - args.layer) / n_layers)
    max_diff = float(np.abs(tables[False] - tables[True]).max())
    tokens = sum(
        len(model.to_tokens(p.prompt + c, prepend_bos=False)[0]) for p in test for c in (p.positive, p.negative)
    )
    lines = [
        f"# Preference-utility sweep: cached prefix against naive ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; torch threads {torch.get_num_threads()}.",
        f"Default model ({n_layers} layers), DiffMean at blocks.{args.layer}.hook_resid_post, 9 strengths, "
        f"{len(test)} sentiment test pairs ({2 * len(test)} sequences, {tokens} tokens), median of {args.repeats} "
        "alternating runs after a warm-up.",
        "",
        "| path | median time (s) | all runs (s) |",
        "|---|---:|---|",
        f"| naive: full forward per strength | {naive:.1f} | {', '.join(f'{t:.1f}' for t in times[False])} |",
        f"| cached prefix (`start_at_layer`) | {fast:.1f} | {', '.join(f'{t:.1f}' for t in times[True])} |",
        "",
        f"Speed-up: **{naive / fast:.2f}x** (theory {theory:.2f}x). "
        f"Largest difference between the two paths' NLLs: {max_diff:.2e}.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
