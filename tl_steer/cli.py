"""The ``tl-steer`` command.

``tl-steer sweep``: build a DiffMean vector for a built-in concept (or a pairs file) on the default
model, sweep strengths on the held-out pairs, print the mean preference and utility log-odds per
strength with 95% confidence intervals, fit the validity-decay model, and write a figure and CSV tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tl_steer.errors import TlSteerError


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("the list of strengths is empty")
    if not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"strengths must be finite, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-steer",
        description="Steer a TransformerLens model at its hook points and measure what the steering cost.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser(
        "sweep",
        help="DiffMean on a concept: preference and utility log-odds per strength on held-out pairs",
        description=(
            "Build a DiffMean (CAA) vector from a concept's training pairs on the default model "
            "(SmolLM2-135M-Instruct, offline), add m times it at one layer's residual stream, and print "
            "the mean preference log-odds PrefOdds = L_n - L_p (mean token NLL of the negative minus the "
            "positive completion) and utility log-odds UtilOdds = log(P_u / (1 - P_u)), P_u = exp(-L_p) + "
            "exp(-L_n), on the held-out pairs for each strength m; fit the validity-decay model and write a "
            "figure and CSV tables to --out."
        ),
    )
    source = sweep.add_mutually_exclusive_group()
    source.add_argument("--concept", default="sentiment", help="built-in concept (default: sentiment)")
    source.add_argument("--pairs", help="a JSONL file of pairs (prompt, positive, negative); split 75/25")
    sweep.add_argument("--layer", type=int, default=None, help="layer of blocks.L.hook_resid_post (default: middle)")
    sweep.add_argument(
        "--ms",
        type=_floats,
        default=[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0],
        help="strengths, e.g. -2,-1,0,1,2",
    )
    sweep.add_argument("--n-train", type=int, default=None, help="use only the first N training pairs")
    sweep.add_argument("--n-test", type=int, default=None, help="use only the first N test pairs")
    sweep.add_argument("--out", default="out", help="directory for the figure and CSV tables (default: out)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return _sweep(args)
    except (TlSteerError, FileNotFoundError) as exc:
        print(f"tl-steer: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _sweep(args: argparse.Namespace) -> int:
    from tl_steer.analysis.preference_utility import preference_utility
    from tl_steer.data import load_pairs, read_pairs
    from tl_steer.methods import diffmean
    from tl_steer.models import load_default_model

    if args.pairs:
        pairs = read_pairs(args.pairs)
        cut = max(1, int(round(0.75 * len(pairs))))
        train, test = pairs[:cut], pairs[cut:] or pairs[:cut]
        name = args.pairs
    else:
        train, test, name = load_pairs(args.concept, "train"), load_pairs(args.concept, "test"), args.concept
    train = train[: args.n_train] if args.n_train else train
    test = test[: args.n_test] if args.n_test else test
    out = Path(args.out)
    _check_writable(out)

    start = time.perf_counter()
    model = load_default_model()
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    if not 0 <= layer < model.cfg.n_layers:
        raise TlSteerError(f"--layer must be in 0..{model.cfg.n_layers - 1}, got {layer}")
    hook = f"blocks.{layer}.hook_resid_post"
    print(f"model {model.cfg.model_name}, concept {name!r}: {len(train)} train / {len(test)} test pairs, hook {hook}")
    vector = diffmean(model, train, hook)
    print(f"DiffMean vector norm {vector.info['norm']:.2f}")

    result = preference_utility(model, vector, test, args.ms)
    summary = result.summary(seed=args.seed)
    columns = ["m", "pref_odds", "pref_odds_low", "pref_odds_high", "util_odds", "util_odds_low", "util_odds_high"]
    print()
    print("Mean preference and utility log-odds (nats per token) on held-out pairs, 95% bootstrap CI")
    print(summary[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if result.n_clipped:
        print(f"({result.n_clipped} items had P_u clipped below 1)")
    fit_note = ""
    try:
        fits = result.fit_decay()["diffmean"]
        fit_note = f"decay-model fit: R^2 {fits['pref'].r2:.3f} (PrefOdds), {fits['util'].r2:.3f} (UtilOdds)"
        print(fit_note)
    except (ValueError, RuntimeError) as exc:
        print(f"decay-model fit skipped: {exc}")
    result.to_csv(out / "preference_utility.csv")
    result.to_csv(out / "preference_utility_summary.csv", summary=True)
    result.plot(out / "preference_utility.png", fit=bool(fit_note), title=f"DiffMean on '{name}', {hook}")
    print(f"wrote {out / 'preference_utility.png'} and the CSV tables in {out}/")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tl_steer_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TlSteerError(f"cannot write to the output directory {out}: {exc.strerror or exc}") from exc


if __name__ == "__main__":
    raise SystemExit(main())
