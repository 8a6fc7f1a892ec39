"""Training time per epoch of SPLIT in each form (vector, LoRA, local weight) on the default model.

One epoch = every train pair once, both completions, forward from the steered layer and backward to the
intervention's parameters (the model is frozen, and the clean residual stream below the layer is
computed once per run, which is included in the time). SFT costs the same per step.

Run from the repository root::

    python benchmarks/split_training.py                    # sentiment, 100 pairs, layer 15, 2 epochs
    python benchmarks/split_training.py --threads 1 --n-pairs 48

Prints a markdown table. Measured (sentiment, 100 pairs = 4365 tokens per epoch, layer 15, batch 8):
about 14 s per epoch in every form with torch's 2 threads on a quiet 2-core machine, 22..24 s with
one thread; the form hardly matters (576, 8,448 and 885,312 parameters), the 15 blocks above the
layer and the unembedding dominate.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import tl_steer
from tl_steer.methods.split import FORMS, split
from tl_steer.scoring import tokenize_completions


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="sentiment")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-pairs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = tl_steer.load_default_model()
    pairs = tl_steer.load_pairs(args.concept, "train")[: args.n_pairs]
    data = tokenize_completions(
        model, [p.prompt for p in pairs] * 2, [p.positive for p in pairs] + [p.negative for p in pairs]
    )
    tokens = sum(len(s) for s in data.sequences)
    rows = []
    for form in args.forms:
        t = time.perf_counter()
        iv, history = split(
            model, pairs, args.layer, form, epochs=args.epochs, batch_size=args.batch_size, progress=False
        )
        total = time.perf_counter() - t
        n_params = sum(v.numel() for v in iv.tensors().values())
        per_epoch = total / args.epochs
        rows.append((form, n_params, len(history) // args.epochs, per_epoch, tokens / per_epoch))
        print(f"{form}: {per_epoch:.1f} s/epoch", flush=True)

    lines = [
        f"SPLIT training on the default model, layer {args.layer}, {args.concept}: {len(pairs)} pairs "
        f"({tokens} tokens per epoch, both completions), batch {args.batch_size} pairs, {args.epochs} epochs "
        f"timed; torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}.",
        "",
        "| form | parameters | steps/epoch | s/epoch | tokens/s (fwd+bwd) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {f} | {n:,} | {s} | {sec:.1f} | {tps:.0f} |" for f, n, s, sec, tps in rows]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
