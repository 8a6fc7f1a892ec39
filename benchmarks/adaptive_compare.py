"""Adaptive steering against constant DiffMean at matched behaviour gain, on the default model.

For each built-in concept (sentiment, formality, refusal) at blocks.15.hook_resid_post: DiffMean and the four
adaptive forms (projection clamp, probe-budgeted addition, rotation, conditional DiffMean) are fitted on the
first --n-train train pairs; :func:`tl_steer.analysis.matched_gain.matched_gain` sweeps each on the first
--n-test test pairs, finds the strengths whose PrefOdds gain matches DiffMean's at m = 1 and m = 2, and measures
UtilOdds and multiple-choice accuracy (the first --n-mc questions of the general set) there, with paired
tests against DiffMean. The ManifoldProbe of the budget is fitted once on the prompt + completion texts of the
three concepts' train splits.

Run from the repository root::

    python benchmarks/adaptive_compare.py --threads 1 --out benchmarks/results/adaptive_compare.md

or one process per concept, then the merge::

    out=benchmarks/results/adaptive_compare.md
    for c in sentiment formality refusal; do
        python benchmarks/adaptive_compare.py --threads 1 --concepts $c --part --out $out &
    done; wait
    python benchmarks/adaptive_compare.py --merge --out $out

It writes the markdown (to --out) and, beside it, one figure and one CSV of matched points per concept.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import tl_steer
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.analysis.matched_gain import matched_gain
from tl_steer.methods.adaptive import (
    budgeted_addition,
    concept_activations,
    condition_probe,
    conditional,
    projection_clamp,
    rotation,
)

GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
WIDE = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)  # forms that act on fewer tokens or less per token


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--concepts", nargs="+", default=["sentiment", "formality", "refusal"])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--n-mc", type=int, default=48)
    parser.add_argument("--clamp-q", type=float, default=0.5)
    parser.add_argument("--budget-q", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--part",
        action="store_true",
        help="only write each concept's results beside --out (to run concepts in parallel processes)",
    )
    parser.add_argument("--merge", action="store_true", help="only write --out from the parts written before")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = tl_steer.load_default_model()
    hook = f"blocks.{args.layer}.hook_resid_post"
    texts = [
        p.prompt + c
        for concept in ("sentiment", "formality", "refusal")
        for p in tl_steer.load_pairs(concept, "train")
        for c in (p.positive, p.negative)
    ]
    probe = ManifoldProbe.fit(model, texts, hook, k=32, progress=False)
    questions = tl_steer.load_mc_items()[: args.n_mc]
    sections, goal_rows, fit_rows = [], [], []
    for concept in args.concepts:
        t0 = time.perf_counter()
        train = tl_steer.load_pairs(concept, "train")[: args.n_train]
        test = tl_steer.load_pairs(concept, "test")[: args.n_test]
        acts = concept_activations(model, train, hook)
        base = tl_steer.diffmean(model, train, hook)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cond = condition_probe(model, None, hook, activations=acts, fires_on="negative")
        conditions = {
            "diffmean": base,
            "clamp": projection_clamp(model, None, hook, q=args.clamp_q, base=base, activations=acts),
            "budget": budgeted_addition(model, None, hook, probe, q=args.budget_q, base=base, activations=acts),
            "rotation": rotation(model, None, hook, base=base, activations=acts),
            "conditional": conditional(base, cond),
        }
        fit_rows.append(
            {
                "concept": concept,
                "clamp target (q)": f"{conditions['clamp'].info['target']:.2f} ({args.clamp_q:g})",
                "median proj. pos / neg": f"{conditions['clamp'].info['median_positive_projection']:.2f} / "
                f"{conditions['clamp'].info['median_negative_projection']:.2f}",
                "budget D_q (q)": f"{conditions['budget'].info['budget']:.2f} ({args.budget_q:g})",
                "train tokens past budget": f"{conditions['budget'].info['share_of_concept_tokens_past_budget']:.1%}",
                "rotation theta_0": f"{conditions['rotation'].info['theta0_degrees']:.2f} deg",
                "condition fires on neg / pos tokens": f"{cond.rate_negative:.1%} / {cond.rate_positive:.1%}",
                "probe warnings": len(caught),
            }
        )
        ms = {name: (GRID if name in ("diffmean", "clamp", "rotation") else WIDE) for name in conditions}
        result = matched_gain(model, conditions, test, questions, ms=ms, batch_size=args.batch_size)
        if args.out is not None:
            result.plot(args.out.with_name(f"adaptive_compare_{concept}.png"), title=f"{concept}: matched gain")
            result.points.to_csv(args.out.with_name(f"adaptive_compare_{concept}.csv"), index=False)
        goal = result.goal(2.0)
        goal.insert(0, "concept", concept)
        goal_rows.append(goal)
        sections.append(f"### {concept}\n\n{result.to_markdown()}\n\n({time.perf_counter() - t0:.0f} s)\n")
        print(sections[-1], flush=True)
        if args.out is not None:
            part = {"fit": fit_rows[-1], "goal": goal.to_dict("records"), "section": sections[-1]}
            args.out.with_name(f"adaptive_compare_{concept}.json").write_text(json.dumps(part), encoding="utf-8")
    if args.part:
        return "\n".join(sections)
    return write(args, fit_rows, goal_rows, sections, time.perf_counter() - started)


def merge(args: argparse.Namespace) -> str:
    """The report from the per-concept parts written by earlier --part runs."""
    fit_rows, goal_rows, sections = [], [], []
    for concept in args.concepts:
        part = json.loads(args.out.with_name(f"adaptive_compare_{concept}.json").read_text(encoding="utf-8"))
        fit_rows.append(part["fit"])
        goal_rows.append(pd.DataFrame(part["goal"]))
        sections.append(part["section"])
    return write(args, fit_rows, goal_rows, sections, None)


def write(
    args: argparse.Namespace,
    fit_rows: list[dict[str, object]],
    goal_rows: list[pd.DataFrame],
    sections: list[str],
    seconds: float | None,
) -> str:
    hook = f"blocks.{args.layer}.hook_resid_post"
    goals = pd.concat(goal_rows, ignore_index=True)
    per_method = goals.groupby("method")["holds"].sum()
    holding = [m for m, n in per_method.items() if n >= 2]
    verdict = (
        f"**Goal holds** for {', '.join(holding)}: at matched gain to DiffMean at m = 2, it loses half or less of "
        "DiffMean's UtilOdds and accuracy loss on at least two of the three concepts."
        if holding
        else "**Goal does not hold**: no adaptive form loses half or less of DiffMean's UtilOdds and accuracy loss at "
        "matched gain to DiffMean at m = 2 on two of the three concepts."
    )
    text = "\n".join(
        [
            "# Adaptive steering at matched behaviour gain",
            "",
            f"Default model, `{hook}`; {args.n_train} train pairs per concept for fitting, {args.n_test} test pairs,",
            f"{args.n_mc} multiple-choice questions (general set). Sweep grids: {list(GRID)} (DiffMean, clamp,",
            f"rotation), {list(WIDE)} (budget, conditional). `m`: the matched strength (NaN: the grid never reaches",
            "the gain); `pref_gain`: the PrefOdds gain reached there; `*_change`: mean paired change against the",
            "clean model with its 95% bootstrap CI; `*_p_vs_ref`: paired test against DiffMean at the same target",
            "(Wilcoxon for UtilOdds, exact McNemar for accuracy, uncorrected); `*_loss_ratio`: the method's loss",
            "over DiffMean's (NaN where DiffMean loses nothing). Produced by `benchmarks/adaptive_compare.py`.",
            "",
            "## Fitted forms",
            "",
            pd.DataFrame(fit_rows).to_markdown(index=False),
            "",
            "## Goal (at DiffMean's gain at m = 2: loss ratio <= 0.5 in both UtilOdds and accuracy)",
            "",
            goals.to_markdown(index=False),
            "",
            verdict,
            "",
            "## Matched points",
            "",
            "Figures of the matched points: `adaptive_compare_<concept>.png` beside this file; the points as CSV:",
            "`adaptive_compare_<concept>.csv`.",
            "",
            *sections,
            "" if seconds is None else f"Total time: {seconds:.0f} s.",
            "",
        ]
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    print(main())
