"""Where to steer on the default model: a DiffMean layer sweep for every built-in concept, and the speed of
one layer sweep against separate cached-prefix sweeps, one per layer.

For each concept, DiffMean is built at ``blocks.{l}.hook_resid_post`` of every layer of the grid from the
first ``--train`` training pairs (one pass for all layers), and PrefOdds / UtilOdds are scored on those
pairs and on the first ``--test`` test pairs at each strength. The best layer is chosen on the training
pairs (largest PrefOdds gain at m = 1 with UtilOdds within 1 nat of clean) and confirmed on the test pairs.
Then, once (the first concept), the test-pair sweep is timed against ``preference_utility`` run separately
per layer (each with its own cached clean prefix), with the layer-count theory beside it.

    python benchmarks/layer_sweep.py [--layers 3 6 ... 27] [--train 32] [--test 24]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import tl_steer
from tl_steer.analysis.layer_sweep import _sweep_layers, diffmean_layers, layer_count, layer_sweep
from tl_steer.analysis.preference_utility import _tokenize_pairs, preference_utility

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(range(3, 30, 3)))
    parser.add_argument("--ms", type=float, nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--test", type=int, default=24)
    parser.add_argument("--speed-pairs", type=int, default=8, help="test pairs in the timing")
    parser.add_argument("--concepts", nargs="+", default=None)
    parser.add_argument("--no-speed", action="store_true", help="skip the timing against separate sweeps")
    parser.add_argument("--speed-only", action="store_true", help="only the timing (first concept)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions of the timing")
    parser.add_argument("--out", default=str(RESULTS / "layer_sweep.md"))
    args = parser.parse_args()

    model = tl_steer.load_default_model()
    n_layers = model.cfg.n_layers
    concepts = args.concepts or tl_steer.builtin_concepts()
    lines = [
        f"# Layer sweeps: where to steer, per concept ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), CPU only; torch threads "
        f"{torch.get_num_threads()}. Default model ({n_layers} layers), DiffMean at `blocks.{{l}}.hook_resid_post` "
        f"for l in {args.layers}, built from the first {args.train} training pairs of each concept; strengths "
        f"{[float(m) for m in args.ms]}; scored on those {args.train} training pairs and the first {args.test} "
        "test pairs. Rule: the largest mean PrefOdds gain at m = 1 with mean UtilOdds within 1 nat of clean, "
        "chosen on the training pairs, confirmed on the test pairs (nats; mean per-token NLL).",
        "",
        "| concept | best layer | PrefOdds gain (train) | UtilOdds change (train) | PrefOdds gain (test) "
        "| UtilOdds change (test) | sweep time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    figures = []
    for concept in [] if args.speed_only else concepts:
        train = tl_steer.load_pairs(concept, "train")[: args.train]
        test = tl_steer.load_pairs(concept, "test")[: args.test]
        start = time.perf_counter()
        result = layer_sweep(model, "diffmean", train, args.layers, args.ms, test_pairs=test, progress=False)
        seconds = time.perf_counter() - start
        best = result.best_layer()
        result.to_csv(RESULTS / f"layer_sweep_{concept}.csv", summary=True)
        png = RESULTS / f"layer_sweep_{concept}.png"
        result.plot(png, split="test", title=f"{concept}: DiffMean at resid_post, {args.test} test pairs")
        figures.append(f"![{concept}]({png.name})")
        cells = (
            [str(best.layer), *(f"{v:+.2f}" for v in (best.train_pref_gain, best.train_util_change))]
            if best.layer is not None
            else ["none", "", ""]
        )
        test_cells = [f"{v:+.2f}" for v in (best.test_pref_gain, best.test_util_change)]
        lines.append(f"| {concept} | {' | '.join(cells)} | {' | '.join(test_cells)} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", *figures, ""]

    if not args.no_speed:
        train = tl_steer.load_pairs(concepts[0], "train")[: args.train]
        test = tl_steer.load_pairs(concepts[0], "test")[: args.speed_pairs]
        built = diffmean_layers(model, train, [f"blocks.{layer}.hook_resid_post" for layer in args.layers])
        ivs = {layer: built[f"blocks.{layer}.hook_resid_post"] for layer in args.layers}
        grid = sorted({0.0, *args.ms})
        data = _tokenize_pairs(model, test, False)

        def sweep() -> None:
            _sweep_layers(model, ivs, data, grid, "mean", 16, False, "")

        def separate() -> None:
            for iv in ivs.values():
                preference_utility(model, iv, test, grid, progress=False)

        # CPU time of this process (one torch thread): time spent waiting for a core taken by another job
        # does not count. Alternating order, after a warm-up of each.
        sweep(), separate()
        times: dict[str, list[float]] = {"sweep": [], "separate": []}
        for r in range(args.repeats):
            for name in ("sweep", "separate") if r % 2 == 0 else ("separate", "sweep"):
                start = time.process_time()
                (sweep if name == "sweep" else separate)()
                times[name].append(time.process_time() - start)
        ratios = [a / b for a, b in zip(times["sweep"], times["separate"], strict=True)]
        fast, slow = float(np.median(times["sweep"])), float(np.median(times["separate"]))
        blocks, blocks_sep = layer_count(n_layers, [iv.first_layer(n_layers) for iv in ivs.values()], len(grid) - 1)
        lines += [
            f"## Speed: one layer sweep against {len(ivs)} separate cached-prefix sweeps",
            "",
            f"{concepts[0]}, {len(test)} test pairs, {len(ivs)} layers x {len(grid)} strengths (m = 0 included), "
            f"{args.repeats} alternating repetitions after a warm-up, CPU time of the process (one torch thread).",
            "",
            "| path | CPU times (s) |",
            "|---|---|",
            f"| layer sweep (one clean pass per batch) | {', '.join(f'{t:.1f}' for t in times['sweep'])} |",
            f"| separate `preference_utility` per layer | {', '.join(f'{t:.1f}' for t in times['separate'])} |",
            "",
            f"Ratio of the medians: **{fast / slow:.2f}x** (paired ratios {', '.join(f'{x:.2f}' for x in ratios)}; "
            f"layer-count theory, blocks only: {blocks}/{blocks_sep} = "
            f"{blocks / blocks_sep:.2f}x; the unembedding at every pass brings the measured ratio closer to 1).",
            "",
        ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
