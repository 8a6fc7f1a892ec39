"""SFT vs SPLIT in the three forms (vector, LoRA, local weight), with DiffMean as a baseline, on the default model.

A thin driver of :func:`tl_steer.compare_methods`: for each concept it trains on the built-in train split and
sweeps every condition on the test split over m in -1, -0.5, 0, 0.5, 1, 1.5, 2, where m = 1 is the strength
each was made for (its unit: the median of the training grid for SFT/SPLIT, 1 for DiffMean). The table gives
mean PrefOdds and UtilOdds (nats per token, 95% bootstrap CI over the test pairs) at m = 1, their change from m = 0,
and the strength range around 0 where UtilOdds stays within 1 of its m = 0 value.

Run from the repository root::

    python benchmarks/split_compare.py --threads 1 --out benchmarks/results/split_compare.md
    python benchmarks/split_compare.py --concepts sentiment --epochs 1 --n-train 32 --theta 0.5

It writes the markdown table (to --out, if given) and, beside it, one figure per concept
(PrefOdds against UtilOdds along each sweep). On a machine shared with other jobs use --threads 1: two
torch threads waiting for busy cores ran 3-8x slower.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tl_steer
from tl_steer.methods.split import FORMS


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["sentiment", "formality"])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=100, help="train pairs used (of 100)")
    parser.add_argument("--n-test", type=int, default=40, help="test pairs used (of 40)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--theta", type=float, default=2.0, help="SPLIT's margin (published: 0.3-0.6)")
    parser.add_argument("--gamma", type=float, default=5.0, help="SPLIT's hinge weight")
    parser.add_argument("--lambda-n", type=float, default=0.5, help="SPLIT's weight of L_n")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here, the figures beside it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = tl_steer.load_default_model()
    sections = []
    for concept in args.concepts:
        result = tl_steer.compare_methods(
            model,
            tl_steer.load_pairs(concept, "train")[: args.n_train],
            tl_steer.load_pairs(concept, "test")[: args.n_test],
            args.layer,
            forms=args.forms,
            train_kwargs={"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed},
            split_kwargs={"lambda_n": args.lambda_n, "gamma": args.gamma, "theta": args.theta},
            progress=False,
        )
        train_s = ", ".join(f"{r.condition} {r.train_s:.0f} s" for r in result.table.itertuples())
        sections.append(f"### {concept}\n\n{result.to_markdown()}\n\nTraining time: {train_s}.")
        print(sections[-1], flush=True)
        if args.out is not None:
            figure = args.out.with_name(f"{args.out.stem}_{concept}.png")
            result.plot(figure, title=f"{concept}: preference against utility, layer {args.layer}")
            result.table.to_csv(args.out.with_name(f"{args.out.stem}_{concept}.csv"), index=False)

    head = (
        f"Default model, layer {args.layer}, {args.n_train} train / {args.n_test} test pairs, {args.epochs} epochs, "
        f"batch {args.batch_size} pairs, seed {args.seed}; SPLIT lambda_p 1, lambda_n {args.lambda_n}, "
        f"gamma {args.gamma}, theta {args.theta}; {torch.get_num_threads()} torch thread(s); "
        f"total {time.perf_counter() - started:.0f} s."
    )
    text = "\n\n".join([head, *sections])
    if args.out is not None:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
