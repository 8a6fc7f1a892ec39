"""The analyses on a TransformerBridge against a HookedTransformer, on the default model (same weights).

A bridge runs Hugging Face's forward, so it cannot restart a pass at a later block (no ``start_at_layer``):
the preference-utility sweep and the layer sweep run every pass from the embedding there. Multiple-choice
scoring shares each question's keys and values on both hosts (TransformerLens' cache on a HookedTransformer,
Hugging Face's on a bridge). This measures what the bridge's full passes cost, and checks that the results
agree:

- preference-utility sweep (DiffMean at one layer, 9 strengths): HookedTransformer with the cached clean
  prefix (its default), HookedTransformer with full passes, bridge;
- MC option NLL (steered): shared question prefix (the default) on either host, and full sequences on either
  host;
- layer sweep (DiffMean at a few layers, 3 strengths): HookedTransformer, bridge.

Runs alternate between the paths after one warm-up each; the median is reported.

    python benchmarks/bridge_analyses.py [--repeats 2] [--pairs 12] [--mc 24] [--layer 15] [--sweep-layers 10,15,20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tl_steer


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def race(paths: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each path once as a warm-up, then ``repeats`` alternating rounds; (times, last result) per path."""
    results = {name: fn() for name, fn in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    return times, results


def rows(times: dict[str, list[float]], reference: str) -> list[str]:
    ref = statistics.median(times[reference])
    out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        out.append(f"| {name} | {med:.2f} | {med / ref:.2f}x | {', '.join(f'{t:.2f}' for t in ts)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--mc", type=int, default=24)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--sweep-layers", default="10,15,20")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bridge_analyses.md"))
    args = parser.parse_args()

    hooked = tl_steer.load_default_model(host="hooked")
    bridge = tl_steer.load_default_model(host="bridge")
    n_layers = hooked.cfg.n_layers
    hook = f"blocks.{args.layer}.hook_resid_post"
    train = tl_steer.load_pairs("sentiment", "train")
    test = tl_steer.load_pairs("sentiment", "test")[: args.pairs]
    vector = tl_steer.diffmean(hooked, train, hook)
    vector_bridge = tl_steer.diffmean(bridge, train, hook)
    dm_diff = float(((vector.vector - vector_bridge.vector).norm() / vector.vector.norm()).item())
    ms = np.linspace(-4, 4, 9)
    items = tl_steer.load_mc_items("general")[: args.mc]
    layers = [int(x) for x in args.sweep_layers.split(",")]

    def pu(model: Any, cached: bool) -> Callable[[], np.ndarray]:
        return lambda: (
            tl_steer.preference_utility(model, vector, test, ms, cache_prefix=cached, progress=False)
            .table[["L_p", "L_n"]]
            .to_numpy()
        )

    def mc(model: Any, shared: bool) -> Callable[[], torch.Tensor]:
        return lambda: tl_steer.mc_option_nll(model, items, interventions=[vector], m=2.0, shared_prefix=shared)

    def ls(model: Any) -> Callable[[], np.ndarray]:
        return lambda: (
            tl_steer.layer_sweep(model, "diffmean", test, layers, (-2.0, 0.0, 2.0), progress=False)
            .table[["L_p", "L_n"]]
            .to_numpy()
        )

    pu_times, pu_out = race(
        {
            "HookedTransformer, cached prefix": pu(hooked, True),
            "HookedTransformer, full passes": pu(hooked, False),
            "TransformerBridge (full passes)": pu(bridge, True),
        },
        args.repeats,
    )
    mc_times, mc_out = race(
        {
            "HookedTransformer, shared prefix": mc(hooked, True),
            "HookedTransformer, full sequences": mc(hooked, False),
            "TransformerBridge, shared prefix": mc(bridge, True),
            "TransformerBridge, full sequences": mc(bridge, False),
        },
        args.repeats,
    )
    ls_times, ls_out = race({"HookedTransformer": ls(hooked), "TransformerBridge": ls(bridge)}, args.repeats)

    def max_diff(a: Any, b: Any) -> float:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        finite = np.isfinite(a) & np.isfinite(b)
        return float(np.abs(a[finite] - b[finite]).max())

    pu_diff = max_diff(pu_out["HookedTransformer, cached prefix"], pu_out["TransformerBridge (full passes)"])
    mc_diff = max_diff(mc_out["HookedTransformer, shared prefix"], mc_out["TransformerBridge, shared prefix"])
    ls_diff = max_diff(ls_out["HookedTransformer"], ls_out["TransformerBridge"])
    tokens = sum(len(hooked.to_tokens(p.prompt + c)[0]) for p in test for c in (p.positive, p.negative))
    header = ["| path | median (s) | vs first row | all runs (s) |", "|---|---:|---:|---|"]
    lines = [
        f"# Analyses on a TransformerBridge against a HookedTransformer ({date.today()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only; torch threads {torch.get_num_threads()}. "
        f"Default model ({n_layers} layers, float32) loaded as both hosts (same weights). Median of "
        f"{args.repeats} alternating runs after a warm-up each. DiffMean built on either host agrees to "
        f"{dm_diff:.1e} (relative norm of the difference).",
        "",
        f"## Preference-utility sweep: DiffMean at `{hook}`, 9 strengths, {len(test)} sentiment test pairs "
        f"({2 * len(test)} sequences, {tokens} tokens)",
        "",
        *header,
        *rows(pu_times, "HookedTransformer, cached prefix"),
        "",
        f"Largest difference in NLL between the hosts: {pu_diff:.1e}.",
        "",
        f"## MC option NLL: {len(items)} general-knowledge questions (4 options), steered at m = 2",
        "",
        *header,
        *rows(mc_times, "HookedTransformer, shared prefix"),
        "",
        f"Largest difference in NLL between the hosts: {mc_diff:.1e}.",
        "",
        f"## Layer sweep: DiffMean at layers {layers}, strengths (-2, 0, 2), {len(test)} pairs",
        "",
        *header,
        *rows(ls_times, "HookedTransformer"),
        "",
        f"Largest difference in NLL between the hosts: {ls_diff:.1e}.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
