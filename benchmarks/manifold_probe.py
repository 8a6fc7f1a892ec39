"""Manifold-distance probe on the default model: the distance curve against m, its relation to UtilOdds,
probe fitting speed and scoring cost.

Settings (the numbers of docs/results.md, section 4, come from this script with its defaults):

- model: SmolLM2-135M-Instruct (tl_steer.load_default_model), float32, CPU;
- probe: hook blocks.15.hook_resid_post, fitted on the prompt + completion texts (both completions) of the
  train split of the three built-in concepts (sentiment, formality, refusal: 600 texts), k = 32,
  knn_k = 10, n_reference = 4096, holdout = 0.2, batch_size = 8, seed 0;
- intervention: DiffMean on the sentiment train pairs at the same hook (optionally also SPLIT, --split);
- sweep: m in (-4, -2, -1, 0, 1, 2, 4) on the 40 sentiment test pairs, both completions scored, with the
  isotropic and covariance-matched random baselines of the DiffMean vector's norm;
- speed: median of --repeats runs of the probe fit (tokens per second, all tokens forwarded) and of a
  plain capture pass over the same batches (what the fit costs beyond the forward pass), and the time to
  score every token of the sentiment test texts with all distances against a full forward pass over the
  same texts (ratio of medians).

Torch runs on --threads threads (default 1: on a busy 2-core machine one thread is several times faster
than two for this model). Writes docs/manifold/manifold_sweep.png, the CSVs next to it and
benchmarks/results/manifold_probe.md; prints the same markdown.

    python benchmarks/manifold_probe.py [--repeats 3] [--threads 1] [--split]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from datetime import date
from pathlib import Path

import pandas as pd
import torch

import tl_steer
from tl_steer.analysis.manifold import ManifoldProbe, _stop_layer, _token_lists
from tl_steer.analysis.manifold_sweep import manifold_sweep
from tl_steer.interventions import AddVector
from tl_steer.scoring import batches, pad_right, pad_token_id

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ("sentiment", "formality", "refusal")
MS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)


def fit_texts() -> list[str]:
    return [
        p.prompt + c for name in CONCEPTS for p in tl_steer.load_pairs(name, "train") for c in (p.positive, p.negative)
    ]


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def capture_pass(model, sequences, hook, batch_size, stop) -> list[torch.Tensor]:
    """Forward in padded batches up to ``hook``, keeping its activations (the fit's forward work alone)."""
    lengths = [len(s) for s in sequences]
    out: list[torch.Tensor] = []

    def capture(act, hook):
        out.append(act.detach())

    with torch.no_grad():
        for idx in batches(lengths, batch_size):
            tokens = pad_right([sequences[i] for i in idx], pad_token_id(model), "cpu")
            model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)], stop_at_layer=stop, return_type=None)
    return out


def md(frame: pd.DataFrame) -> str:
    """A markdown table (no tabulate dependency)."""

    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--split", action="store_true", help="also sweep a SPLIT vector (trains it: slow)")
    parser.add_argument("--skip-speed", action="store_true", help="fit once, measure no speed")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "manifold"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "manifold_probe.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    model = tl_steer.load_default_model()
    hook = f"blocks.{args.layer}.hook_resid_post"
    texts = fit_texts()
    sequences = _token_lists(model, texts)
    n_tokens = sum(len(s) for s in sequences)
    stop = _stop_layer(model, [hook])
    test = tl_steer.load_pairs("sentiment", "test")

    # ----- fitting speed -------------------------------------------------------------------------
    repeats = 1 if args.skip_speed else args.repeats
    fit_s, fit_runs, probe = timed(lambda: ManifoldProbe.fit(model, texts, hook, batch_size=8, progress=False), repeats)
    assert isinstance(probe, ManifoldProbe)
    state = probe.stats[hook]
    probe_info = probe.summary().iloc[0]
    speed: list[str] = []
    if not args.skip_speed:
        fwd_s, fwd_runs, _ = timed(lambda: capture_pass(model, sequences, hook, 8, stop), repeats)
        # ----- scoring cost against the forward pass -----------------------------------------------
        test_seqs = _token_lists(model, [p.prompt + c for p in test for c in (p.positive, p.negative)])
        test_tokens = sum(len(s) for s in test_seqs)
        acts = capture_pass(model, test_seqs, hook, 16, stop)
        lengths = [len(s) for s in test_seqs]
        groups = batches(lengths, 16)
        rows = torch.cat([a[r, 1 : lengths[i]] for a, idx in zip(acts, groups, strict=True) for r, i in enumerate(idx)])

        def full_forward() -> None:
            with torch.no_grad():
                for idx in groups:
                    model(pad_right([test_seqs[i] for i in idx], pad_token_id(model), "cpu"))  # logits included

        full_s, full_runs, _ = timed(full_forward, repeats)
        score_s, score_runs, _ = timed(lambda: probe.distances(rows, hook), repeats)
        speed = [
            "## Speed",
            "",
            "| what | median (s) | runs (s) | rate |",
            "|---|---:|---|---|",
            f"| probe fit ({n_tokens} tokens) | {fit_s:.1f} | {', '.join(f'{t:.1f}' for t in fit_runs)} | "
            f"**{n_tokens / fit_s:.0f} tokens/s** |",
            f"| capture pass alone (same batches, stop at layer {stop}) | {fwd_s:.1f} | "
            f"{', '.join(f'{t:.1f}' for t in fwd_runs)} | {n_tokens / fwd_s:.0f} tokens/s; the statistics add "
            f"{100 * (fit_s / fwd_s - 1):.0f}% |",
            f"| full forward pass with logits, sentiment test texts ({test_tokens} tokens) | {full_s:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in full_runs)} | {test_tokens / full_s:.0f} tokens/s |",
            f"| scoring all distances ({len(rows)} tokens, position 0 excluded) | {score_s:.3f} | "
            f"{', '.join(f'{t:.3f}' for t in score_runs)} | **{score_s / full_s:.3f} x the forward pass** |",
            "",
        ]

    # ----- the sweep ------------------------------------------------------------------------------
    train = tl_steer.load_pairs("sentiment", "train")
    vector = tl_steer.diffmean(model, train, hook)
    start = time.perf_counter()
    result = manifold_sweep(model, vector, test, MS, probe, texts="both", progress=False)
    results = [result]
    split_note = ""
    if args.split:
        from tl_steer.methods.split import split

        split_iv, _ = split(model, train, args.layer, "vector", progress=False)
        # m = 1 is the strength SPLIT's vector was trained for (the median of its grid): put that at m = 2.
        scale = 0.5
        split_ms = tuple(round(m * scale, 3) for m in MS)
        results.append(
            manifold_sweep(model, split_iv, test, split_ms, probe, texts="both", baselines=False, progress=False)
        )
        assert isinstance(split_iv, AddVector)
        split_note = (
            f" SPLIT (vector form, defaults, trained on the same 100 pairs; |v| = {float(split_iv.vector.norm()):.2f}) "
            f"swept at m in {split_ms} (m = 1, its trained strength, at the place of m = 2; unit {split_iv.unit:g}), "
            "without baselines."
        )
    sweep_s = time.perf_counter() - start

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    result.plot(docs / "manifold_sweep.png", title=f"DiffMean (sentiment) at {hook}: manifold distance and utility")
    summary = pd.concat([r.summary() for r in results], ignore_index=True)
    assoc = pd.concat([r.associations() for r in results], ignore_index=True)
    table = pd.concat([r.table for r in results], ignore_index=True)
    summary.to_csv(docs / "manifold_summary.csv", index=False)
    assoc.to_csv(docs / "manifold_associations.csv", index=False)
    table.to_csv(docs / "manifold_sweep.csv", index=False)

    # ----- report ---------------------------------------------------------------------------------
    curve = summary[
        ["label", "m", "norm_ratio", "mahalanobis", "mahalanobis_pct", "mahalanobis_outside_pct", "knn", "knn_pct"]
        + ["auroc_mahalanobis", "auroc_knn", "util_odds", "pref_odds"]
    ]
    wanted = ["mahalanobis", "mahalanobis_inside", "mahalanobis_outside", "knn", "norm_ratio"]
    columns = ["label", "distance", "spearman_m", "spearman_m_p", "spearman_prompts", "spearman_prompts_delta"]
    columns += ["r2_distance", "r2_norm_ratio", "r2_both", "gain_over_norm", "gain_over_norm_delta"]
    main_rows = assoc[assoc["distance"].isin(wanted)][columns]
    load = os.getloadavg()
    shown = docs.resolve().relative_to(ROOT) if docs.resolve().is_relative_to(ROOT) else docs
    lines = [
        f"# Manifold-distance probe on the default model ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only, torch threads {torch.get_num_threads()}, "
        f"load average {load[0]:.1f} (shared machine: timings are noisy).",
        f"Probe at `{hook}`: fitted on {len(texts)} clean texts (prompt + each completion of the train pairs of "
        f"{', '.join(CONCEPTS)}), {n_tokens} tokens; {state.n} reference tokens, {state.n_holdout} held out, "
        f"{state.n_outliers} outliers (threshold {state.threshold:.0f} = 10 x median norm), position 0 excluded. "
        f"k = {probe.k}, knn_k = {probe.knn_k}, Ledoit-Wolf shrinkage {state.shrinkage:.4f}, top-{probe.k} "
        f"variance share {probe_info['top_k_variance_share']:.3f}.",
        f"Sweep: DiffMean on the 100 sentiment train pairs (|v| = {float(vector.vector.norm()):.2f}), 40 sentiment "
        f"test pairs, both completions scored (mean over all tokens but position 0, then over the two texts), "
        f"m in {MS}; baselines of the same norm at the same hook and positions.{split_note} "
        f"Sweep time {sweep_s:.0f} s.",
        "",
        *speed,
        "## Distance against m (means over pairs)",
        "",
        "Percentiles (`_pct`) among held-out clean tokens; AUROC of clean against steered tokens.",
        "",
        md(curve),
        "",
        "## Distance and UtilOdds",
        "",
        "spearman_m: across the 7 per-m means; spearman_prompts: mean over m of the Spearman correlation across "
        "the 40 pairs at that m; spearman_prompts_delta: the same on the changes from m = 0 of each pair (distance "
        "and UtilOdds), over m != 0; gain_over_norm: R^2 of UtilOdds on [distance, norm ratio] minus R^2 on "
        "[norm ratio], over pairs x m; gain_over_norm_delta: the same on the changes from m = 0. `all`: the "
        "conditions pooled (m = 0 counted once).",
        "",
        md(main_rows),
        "",
        f"Figure: {shown}/manifold_sweep.png. Tables: {shown}/manifold_*.csv.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
