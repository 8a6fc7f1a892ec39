"""Speed of multiple-choice scoring on the default model: each question's prefix shared across its options
(a KV cache) with the unembedding only where an option token is scored, against every option scored as a
full question + option sequence.

Both paths score the same questions of the built-in ``general`` set, unsteered and steered (DiffMean at a
middle layer, m = 1); runs alternate (full, shared, full, shared, ...) after a warm-up. Each run is timed with
the process's CPU clock (one torch thread: time spent waiting for a core taken by another job does not
count) and the wall clock; the ratio of the median CPU times is reported, with the wall-clock ratio and the
largest NLL difference between the paths.

    python benchmarks/mc_speed.py [--questions 60] [--repeats 3] [--layer 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import tl_steer
from tl_steer.analysis.capability import format_mc_prompt, mc_completions, mc_option_nll
from tl_steer.scoring import tokenize_completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mc_speed.md"))
    args = parser.parse_args()

    model = tl_steer.load_default_model()
    items = tl_steer.load_mc_items("general")[: args.questions]
    vector = tl_steer.diffmean(
        model, tl_steer.load_pairs("sentiment", "train")[:32], f"blocks.{args.layer}.hook_resid_post"
    )
    prompts = [format_mc_prompt(item) for item in items for _ in item.options]
    data = tokenize_completions(model, prompts, [c for item in items for c in mc_completions(item)])
    n_options = len(data)
    q_tokens, at = 0, 0
    for item in items:  # the shared question: the tokens before the first option's boundary
        q_tokens += min(data.starts[at : at + len(item.options)])
        at += len(item.options)
    o_tokens = sum(len(s) - st for s, st in zip(data.sequences, data.starts, strict=True))

    rows = []
    for label, ivs in (
        ("unsteered", []),
        (f"steered (DiffMean, blocks.{args.layer}.hook_resid_post, m = 1)", [vector]),
    ):

        def run(shared: bool, ivs: list = ivs) -> tuple[float, float, torch.Tensor]:
            cpu, wall = time.process_time(), time.perf_counter()
            nll = mc_option_nll(model, items, interventions=ivs, m=1.0, shared_prefix=shared)
            return time.process_time() - cpu, time.perf_counter() - wall, nll

        run(False), run(True)  # warm-up
        times: dict[bool, list[float]] = {False: [], True: []}
        walls: dict[bool, list[float]] = {False: [], True: []}
        nll = {}
        for _ in range(args.repeats):
            for shared in (False, True):
                seconds, wall, nll[shared] = run(shared)
                times[shared].append(seconds)
                walls[shared].append(wall)
        finite = torch.isfinite(nll[False])
        diff = float((nll[False][finite] - nll[True][finite]).abs().max())
        full, fast = statistics.median(times[False]), statistics.median(times[True])
        wall_ratio = statistics.median(walls[True]) / statistics.median(walls[False])
        rows.append(
            f"| {label} | {full:.2f} | {fast:.2f} | **{fast / full:.2f}x** | {wall_ratio:.2f}x | {diff:.1e} | "
            f"{', '.join(f'{t:.2f}' for t in times[False])} / {', '.join(f'{t:.2f}' for t in times[True])} |"
        )
        print(rows[-1], flush=True)
    lines = [
        f"# Multiple-choice scoring: shared question prefix against full sequences ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), CPU only; torch threads "
        f"{torch.get_num_threads()}. Default model, the first {len(items)} questions of the built-in `general` set "
        f"({n_options} options; questions {q_tokens / len(items):.1f} tokens on average, options "
        f"{o_tokens / n_options:.1f} scored tokens); batch size 16, median of {args.repeats} alternating runs after "
        "a warm-up.",
        "",
        "| condition | full sequences (CPU s) | shared prefix (CPU s) | ratio (CPU) | ratio (wall) "
        "| largest NLL difference | all runs (CPU s): full / shared |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
