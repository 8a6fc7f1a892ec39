"""SFT vs SPLIT in the three forms (vector, LoRA, local weight), with DiffMean as a baseline, on the default model.

For each concept: train on the built-in train split, evaluate on the test split the mean PrefOdds
(L_n - L_p) and the mean UtilOdds (log P_u / (1 - P_u), P_u = exp(-L_p) + exp(-L_n), computed in log space
and clipped into (eps, 1 - eps)) at m = 0 and at the strength each method is meant for: the median of
its training grid for SFT/SPLIT (``info["m_typical"]``), m = 1 for DiffMean (its natural unit: the mean
activation difference itself). L is the mean per-token completion NLL (tl_steer.pair_nll).

Run from the repository root::

    python benchmarks/split_compare.py                     # both concepts, SFT and SPLIT (theta 0.5)
    python benchmarks/split_compare.py --no-sft --theta 2  # SPLIT with a margin above the clean preference
    python benchmarks/split_compare.py --concepts sentiment --epochs 1 --n-train 32

It prints a markdown table (and writes it to --out if given). Cost: 12 trainings of 2 epochs of 100
pairs (about 14 s per epoch on a quiet 2-core machine, see split_training.py) and 16 evaluations of
40 pairs, about 10 minutes; measured 21 minutes with --threads 1 beside other jobs. On a machine
shared with other jobs use --threads 1: two torch threads waiting for busy cores ran 3-8x slower.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import tl_steer
from tl_steer.methods.split import FORMS, sft, split

EPS = 1e-6


def log_odds(lp: torch.Tensor, ln: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(PrefOdds, UtilOdds, number of items whose P_u was clipped) per pair, from mean per-token NLLs."""
    pref = ln - lp
    log_pu = torch.logaddexp(-lp.double(), -ln.double())
    lo, hi = math.log(eps), math.log1p(-eps)
    clipped = int(((log_pu < lo) | (log_pu > hi)).sum())
    log_pu = log_pu.clamp(lo, hi)
    util = log_pu - torch.log(-torch.expm1(log_pu))
    return pref.double(), util, clipped


def evaluate(model, pairs, iv, m: float) -> dict[str, float]:
    lp, ln = tl_steer.pair_nll(model, pairs, interventions=[iv] if iv is not None and m != 0 else [], m=m)
    pref, util, clipped = log_odds(lp, ln)
    n = len(pairs)
    return {
        "pref": float(pref.mean()),
        "pref_se": float(pref.std() / math.sqrt(n)),
        "util": float(util.mean()),
        "util_se": float(util.std() / math.sqrt(n)),
        "clipped": clipped,
    }


def run_concept(model, concept: str, args: argparse.Namespace) -> list[dict]:
    """Train DiffMean, SFT and SPLIT on ``concept``'s train split; evaluate them on its test split."""
    train = tl_steer.load_pairs(concept, "train")[: args.n_train]
    test = tl_steer.load_pairs(concept, "test")[: args.n_test]
    clean = evaluate(model, test, None, 0.0)
    print(f"{concept}: m=0 PrefOdds {clean['pref']:.3f} UtilOdds {clean['util']:.3f}", flush=True)
    rows = [{"concept": concept, "method": "none", "form": "-", "m": 0.0, **clean, "d_pref": 0.0, "d_util": 0.0}]

    def record(method: str, form: str, iv, m: float, seconds: float, epochs: int) -> None:
        res = evaluate(model, test, iv, m)
        row = {"concept": concept, "method": method, "form": form, "m": m, "train_s": seconds, "epochs": epochs}
        row |= res
        row["d_pref"] = res["pref"] - clean["pref"]
        row["d_util"] = res["util"] - clean["util"]
        rows.append(row)
        print(
            f"  {method:8s} {form:12s} m={m:<5g} PrefOdds {res['pref']:.3f} ({row['d_pref']:+.3f}) "
            f"UtilOdds {res['util']:.3f} ({row['d_util']:+.3f}) train {seconds:.0f}s",
            flush=True,
        )

    t = time.perf_counter()
    dm = tl_steer.diffmean(model, train, f"blocks.{args.layer}.hook_resid_post")
    record("diffmean", "vector", dm, 1.0, time.perf_counter() - t, 0)
    for form in args.forms:
        for name in ("split",) if args.no_sft else ("sft", "split"):
            t = time.perf_counter()
            common = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=False)
            if name == "sft":
                iv, _ = sft(model, train, args.layer, form, **common)
            else:
                hyper = dict(lambda_n=args.lambda_n, gamma=args.gamma, theta=args.theta)
                iv, _ = split(model, train, args.layer, form, **hyper, **common)
            record(name, form, iv, iv.info["m_typical"], time.perf_counter() - t, iv.info["epochs_run"])
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["sentiment", "formality"])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=100, help="train pairs used (of 100)")
    parser.add_argument("--n-test", type=int, default=40, help="test pairs used (of 40)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--theta", type=float, default=0.5, help="SPLIT's margin")
    parser.add_argument("--gamma", type=float, default=5.0, help="SPLIT's hinge weight")
    parser.add_argument("--lambda-n", type=float, default=0.5, help="SPLIT's weight of L_n")
    parser.add_argument("--no-sft", action="store_true", help="train SPLIT only (and DiffMean)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = tl_steer.load_default_model()
    rows = []
    for concept in args.concepts:
        rows += run_concept(model, concept, args)

    lines = [
        f"Default model, layer {args.layer}, {args.n_train} train / {args.n_test} test pairs, "
        f"{args.epochs} epochs, batch {args.batch_size} pairs, seed {args.seed}; SPLIT lambda_p 1, "
        f"lambda_n {args.lambda_n}, gamma {args.gamma}, theta {args.theta}; "
        f"PrefOdds and UtilOdds as mean (standard error) over test pairs; "
        f"total {time.perf_counter() - started:.0f} s.",
        "",
        "| concept | method | form | m | PrefOdds | dPref | UtilOdds | dUtil | P_u clipped | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train_s = f"{r['train_s']:.0f}" if "train_s" in r else "-"
        lines.append(
            f"| {r['concept']} | {r['method']} | {r['form']} | {r['m']:g} | {r['pref']:.3f} ({r['pref_se']:.3f}) "
            f"| {r['d_pref']:+.3f} | {r['util']:.3f} ({r['util_se']:.3f}) | {r['d_util']:+.3f} | {r['clipped']} "
            f"| {train_s} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
