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
from typing import Any

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
    _add_model_arguments(sweep)
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
    _add_report(sub)
    return parser


def _add_model_arguments(parser: Any) -> None:
    """The options both commands share: where the pairs come from, the layer and the model's dtype."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--concept", default="sentiment", help="built-in concept (default: sentiment)")
    source.add_argument("--pairs", help="a JSONL file of pairs (prompt, positive, negative); split 75/25")
    parser.add_argument("--layer", type=int, default=None, help="layer of blocks.L.hook_resid_post (default: middle)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the model's dtype (default: float32); vectors and statistics stay float32/float64",
    )


def _layer(model: Any, layer: int | None) -> int:
    """``--layer``, or the middle layer; a layer the model lacks is an error."""
    layer = model.cfg.n_layers // 2 if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise TlSteerError(f"--layer must be in 0..{model.cfg.n_layers - 1}, got {layer}")
    return layer


def _add_report(sub: Any) -> None:
    from tl_steer.report.pipeline import METHODS

    report = sub.add_parser(
        "report",
        help="the whole comparison on one concept: every method, sweeps, manifold distance, capability gap",
        description=(
            "Build interventions with every method (DiffMean, SFT and SPLIT in three forms, COLD-Kernel, COLD-FD, "
            "an SAE feature, prompting) on the default model (or --model), sweep their strengths on held-out "
            "pairs (preference and utility log-odds), probe the distance from the clean activations, measure "
            "the capability-behaviour gap, and write report.html (figures embedded), the figures as PNG and the "
            "numbers as CSV and JSON to --out. Finished steps are cached in OUT/cache: rerun the same command "
            "after an interruption to resume."
        ),
    )
    _add_model_arguments(report)
    report.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to include (default: all): {', '.join(METHODS)}",
    )
    report.add_argument(
        "--forms",
        nargs="+",
        choices=["vector", "lora", "local_weight"],
        default=None,
        help="SFT/SPLIT forms (default: all three; --quick: vector)",
    )
    report.add_argument("--instruction", default=None, help="prompting baseline text (default: the concept's)")
    report.add_argument("--model", default=None, help="a local Hugging Face model folder (default: SmolLM2-135M)")
    report.add_argument("--sae", default=None, help="a local sae-lens SAE folder (default: the shipped one, layer 15)")
    report.add_argument("--quick", action="store_true", help="small sizes: a few minutes on 2 CPU cores")
    report.add_argument("--fresh", action="store_true", help="discard cached results in --out first")
    report.add_argument("--out", default="report", help="output directory (default: report)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", "the output directory")
        print(
            f"tl-steer: interrupted; finished steps are saved in {out}/cache; run the same command to resume",
            file=sys.stderr,
        )
        return 130
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
    model = with_dtype(load_default_model(), args.dtype)
    layer = _layer(model, args.layer)
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


def _report(args: argparse.Namespace) -> int:
    from tl_steer.data import load_pairs, read_pairs
    from tl_steer.data.mc import load_mc_items
    from tl_steer.data.pairs import CONCEPT_INSTRUCTIONS
    from tl_steer.report.pipeline import ReportData, ReportSettings, run_report

    out = Path(args.out)
    _check_writable(out)
    if args.pairs:
        pairs = read_pairs(args.pairs)
        if len(pairs) < 8:
            raise TlSteerError(f"{args.pairs}: {len(pairs)} pairs; the report needs at least 8 (6 train, 2 test)")
        cut = int(round(0.75 * len(pairs)))
        train, test, name = pairs[:cut], pairs[cut:], Path(args.pairs).stem
        instruction = args.instruction
    else:
        train, test, name = load_pairs(args.concept, "train"), load_pairs(args.concept, "test"), args.concept
        instruction = args.instruction or CONCEPT_INSTRUCTIONS.get(args.concept)
    model = with_dtype(_load_model(args.model), args.dtype)
    layer = _layer(model, args.layer)
    forms = tuple(args.forms or (("vector",) if args.quick else ("vector", "lora", "local_weight")))
    settings = ReportSettings.make(
        name, layer, quick=args.quick, methods=tuple(args.methods), forms=forms, instruction=instruction
    )
    if "prompting" in settings.methods and not instruction:
        print("note: no --instruction for these pairs, so the prompting baseline is left out")
    sae, note = _load_sae(args.sae, f"blocks.{layer}.hook_resid_post", "sae" in settings.methods)
    data = ReportData(
        name,
        train[: settings.n_train],
        test[: settings.n_test],
        load_mc_items()[: settings.n_mc],
        sae,
        note,
    )
    start = time.perf_counter()
    result = run_report(model, data, settings, out, fresh=args.fresh)
    print(f"wrote {out / 'report.html'} and {len(result.files) - 1} other files in {time.perf_counter() - start:.0f} s")
    return 0


DTYPES = ("float32", "float16", "bfloat16")


def with_dtype(model: Any, dtype: str) -> Any:
    """The model cast to ``dtype`` (one of :data:`DTYPES`), in place; float32 leaves it as loaded."""
    import torch

    if dtype not in DTYPES:
        raise TlSteerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model


def _load_model(path: str | None) -> Any:
    from tl_steer.models import hooked_from_hf, load_default_model

    if path is None:
        return load_default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise TlSteerError(f"--model {path!r} is not a folder; give a local Hugging Face model folder")
    # local_files_only: a folder missing a file is an error here, never a download
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return hooked_from_hf(hf, AutoTokenizer.from_pretrained(path, local_files_only=True))


def _load_sae(path: str | None, hook: str, wanted: bool) -> tuple[Any, str]:
    """The SAE to steer with, or None and a note saying why there is none."""
    if not wanted:
        return None, ""
    if path is not None:
        from sae_lens import SAE

        if not Path(path).is_dir():
            raise TlSteerError(f"--sae {path!r} is not a folder; give a folder saved by sae-lens (cfg.json + weights)")
        sae = SAE.load_from_disk(path)
    else:
        from tl_steer.default_sae import load_default_sae

        sae = load_default_sae()
    if sae.cfg.metadata.hook_name != hook:
        return None, f"SAE feature steering left out: the SAE reads {sae.cfg.metadata.hook_name}, not {hook}."
    return sae, ""


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
