"""Where to steer with SPLIT on the default model: a SPLIT-vector layer sweep for every built-in concept.

For each concept a SPLIT vector (default settings: theta 2, 3 epochs) is trained at
``blocks.{l}.hook_resid_post`` of each layer of the grid on the first ``--train`` training pairs, and PrefOdds /
UtilOdds are scored on those pairs and on the first ``--test`` test pairs at each strength; the best layer is
chosen on the training pairs by ``LayerSweepResult.best_layer``'s rule and confirmed on the test pairs. The
heatmaps (PNG) and a markdown table go to benchmarks/results/layer_sweep_split*.

    python benchmarks/layer_sweep_split.py [--layers 5 10 15 20 25] [--train 16] [--test 12]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import tl_steer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[5, 10, 15, 20, 25])
    parser.add_argument("--ms", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--concepts", nargs="+", default=None)
    args = parser.parse_args()

    model = tl_steer.load_default_model()
    concepts = args.concepts or tl_steer.builtin_concepts()
    lines = [
        "# SPLIT-vector layer sweep on the default model",
        "",
        f"`python benchmarks/layer_sweep_split.py` on {date.today()}, {platform.machine()}: SmolLM2-135M-Instruct, "
        f"SPLIT vector (default settings) trained at blocks.L.hook_resid_post for L in {args.layers} on "
        f"{args.train} training pairs, scored at m in {args.ms} on them and on {args.test} test pairs. "
        "PrefOdds / UtilOdds in nats per token; best layer by the largest train PrefOdds gain at m = 1 with "
        "UtilOdds within 1 nat of clean.",
        "",
        "| concept | best layer (train) | test PrefOdds gain at m = 1 | test UtilOdds change | wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for concept in concepts:
        train = tl_steer.load_pairs(concept, "train")[: args.train]
        test = tl_steer.load_pairs(concept, "test")[: args.test]
        started = time.perf_counter()
        result = tl_steer.layer_sweep(
            model, "split_vector", train, args.layers, args.ms, test_pairs=test, progress=False
        )
        wall = time.perf_counter() - started
        best = result.best_layer()
        result.plot(RESULTS / f"layer_sweep_split_{concept}.png", title=f"SPLIT vector, {concept}")
        result.to_csv(RESULTS / f"layer_sweep_split_{concept}.csv")
        lines.append(
            f"| {concept} | {best.layer} | {best.test_pref_gain:+.2f} | {best.test_util_change:+.2f} | {wall:.0f} s |"
        )
        print(lines[-1], flush=True)
    (RESULTS / "layer_sweep_split.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
