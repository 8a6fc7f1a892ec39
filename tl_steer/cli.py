"""The ``tl-steer`` command.

``tl-steer generate``: steered completions of prompts at several strengths, side by side.

``tl-steer sweep``: build a DiffMean vector for a built-in concept (or a pairs file) on the default
model, sweep strengths on the held-out pairs, print the mean preference and utility log-odds per
strength with 95% confidence intervals, fit the validity-decay model, and write a figure and CSV tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tl_steer.errors import SaveError, TlSteerError
from tl_steer.models import HOSTS


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
    _add_generate(sub)
    return parser


def _add_model_arguments(parser: Any, *, many: bool = False) -> None:
    """The options both commands share: where the pairs come from, the layer and the model's dtype
    (``many``: --concept takes one or more names, or all, for the report's grid)."""
    source = parser.add_mutually_exclusive_group()
    if many:
        source.add_argument(
            "--concept",
            nargs="+",
            default=["sentiment"],
            metavar="CONCEPT",
            help="built-in concept(s) (default: sentiment); several, or all, run a grid (see --layers)",
        )
    else:
        source.add_argument("--concept", default="sentiment", help="built-in concept (default: sentiment)")
    source.add_argument("--pairs", help="a JSONL file of pairs (prompt, positive, negative); split 75/25")
    parser.add_argument("--layer", type=int, default=None, help="layer of blocks.L.hook_resid_post (default: middle)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="the model's dtype (default: float32); vectors and statistics stay float32/float64",
    )
    parser.add_argument(
        "--host",
        choices=HOSTS,
        default=None,
        help="the TransformerLens class to load the model as: hooked (HookedTransformer) or bridge "
        "(TransformerBridge, around the Hugging Face model); default: hooked on TransformerLens 3, bridge on 4",
    )


def _layer(model: Any, layer: int | None) -> int:
    """``--layer``, or the middle layer; a layer the model lacks is an error."""
    layer = model.cfg.n_layers // 2 if layer is None else layer
    if not 0 <= layer < model.cfg.n_layers:
        raise TlSteerError(f"--layer must be in 0..{model.cfg.n_layers - 1}, got {layer}")
    return layer


def _add_report(sub: Any) -> None:
    from tl_steer.report.pipeline import ADAPTIVE, METHODS

    report = sub.add_parser(
        "report",
        help="the whole comparison on one concept: every method, sweeps, manifold distance, capability gap",
        description=(
            "Build interventions with every method (DiffMean, SFT and SPLIT in up to three forms, COLD-Kernel, "
            "COLD-FD, an SAE feature, prompting) on the default model (or --model), sweep their strengths on held-out "
            "pairs (preference and utility log-odds), probe the distance from the clean activations, measure "
            "the capability-behaviour gap, and write report.html (figures embedded), the figures as PNG and the "
            "numbers as CSV and JSON to --out. Finished steps are cached in OUT/cache: rerun the same command "
            "after an interruption to resume. Sizes: the default takes about 7 minutes on 2 CPU cores (SFT and "
            "SPLIT as vectors only); --full is the whole comparison (about 30 minutes); --quick a smoke run."
        ),
    )
    _add_model_arguments(report, many=True)
    report.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,  # None: the size's default; an explicit list is checked (prompting needs an instruction)
        metavar="METHOD",
        help=(
            f"methods to include: {', '.join(METHODS)} (default: all with --full; without the adaptive forms "
            f"{', '.join(ADAPTIVE)} otherwise)"
        ),
    )
    report.add_argument(
        "--forms",
        nargs="+",
        choices=["vector", "lora", "local_weight"],
        default=None,
        help="SFT/SPLIT forms (default and --quick: vector; --full: all three)",
    )
    report.add_argument("--instruction", default=None, help="prompting baseline text (default: the concept's)")
    report.add_argument("--model", default=None, help="a local Hugging Face model folder (default: SmolLM2-135M)")
    report.add_argument("--sae", default=None, help="a local sae-lens SAE folder (default: the shipped one, layer 15)")
    size = report.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="a smoke run: the smallest sizes, a few minutes on 2 CPU cores"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the full comparison: 100 training and 40 test pairs, 2 epochs, all three SFT/SPLIT forms, all 265 "
        "questions (about 30 minutes on 2 CPU cores; default: 64 and 24 pairs, 1 epoch, vector forms, 64 questions, "
        "about 7 minutes)",
    )
    report.add_argument("--fresh", action="store_true", help="discard cached results in --out first")
    report.add_argument("--out", default="report", help="output directory (default: report)")
    report.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="run a grid: the comparison for every concept of --concept at each of these layers, one report "
        "with which method wins where; each cell cached in OUT/cells/CONCEPT-HOOK/",
    )
    report.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the grid's cells on Ray (pip install 'tl-steer[ray]'): no ADDRESS or 'local' starts a cluster "
        "on this machine; 'auto' joins the one `ray start` runs here; HOST:6379 or ray://HOST:10001 a remote one",
    )
    report.add_argument(
        "--ray-cpus",
        type=int,
        default=1,
        metavar="N",
        help="CPUs (and torch threads) per Ray worker; each worker loads the model once (default: 1)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            return _report(args)
        if args.command == "generate":
            return _generate(args)
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
    model = with_dtype(load_default_model(host=args.host), args.dtype)
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
    _make_out(out)
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

    many = not args.pairs and (len(args.concept) > 1 or args.concept == ["all"])
    if args.layers is not None or args.ray is not None or many:
        return _report_grid(args)
    args.concept = args.concept[0]

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
    if args.methods is not None and "prompting" in args.methods and not instruction:
        raise TlSteerError(
            "--methods prompting needs the instruction the prompting baseline puts before each prompt, and "
            f"{args.pairs} brings none: pass --instruction 'TEXT' (the built-in concepts have their own)"
        )
    model = with_dtype(_load_model(args.model, args.host), args.dtype)
    layer = _layer(model, args.layer)
    size = "quick" if args.quick else "full" if args.full else "standard"
    forms = tuple(args.forms or (("vector", "lora", "local_weight") if args.full else ("vector",)))
    chosen: dict[str, Any] = {"methods": tuple(args.methods)} if args.methods else {}
    settings = ReportSettings.make(name, layer, size=size, forms=forms, instruction=instruction, **chosen)
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


def _report_grid(args: argparse.Namespace) -> int:
    """``tl-steer report`` over a grid of concepts x layers (``--layers``, several concepts, ``--ray``)."""
    import functools

    from tl_steer.report.grid import BuiltinData, grid_cells, run_grid

    if args.pairs:
        raise TlSteerError(
            "--layers and --ray run a grid over built-in concepts (--concept NAME ... or all); a pairs file runs "
            "as a single report: drop --layers and --ray"
        )
    if args.layer is not None and args.layers is not None:
        raise TlSteerError("give --layer (one layer) or --layers (a grid of layers), not both")
    out = Path(args.out)
    _check_writable(out)
    size = "quick" if args.quick else "full" if args.full else "standard"
    forms = tuple(args.forms or (("vector", "lora", "local_weight") if args.full else ("vector",)))
    chosen: dict[str, Any] = {"methods": tuple(args.methods)} if args.methods else {}
    if args.instruction:
        chosen["instruction"] = args.instruction
    # the grid's own checks (empty, unknown concepts, methods) before the model loads; the layers after
    grid_cells(args.concept, args.layers or [0], size=size, forms=forms, **chosen)
    if args.ray is not None:
        from tl_steer.report import ray_runner

        ray_runner.import_ray()
        ray_runner.check_reachable(args.ray)
    model = with_dtype(_load_model(args.model, args.host), args.dtype)
    layers = args.layers or [_layer(model, args.layer)]
    cells = grid_cells(args.concept, layers, size=size, forms=forms, **chosen)
    start = time.perf_counter()
    result = run_grid(
        model,
        cells,
        BuiltinData(sae=args.sae),
        out,
        ray_address=args.ray,
        loader=functools.partial(grid_loader, args.model, args.dtype, args.host),
        cpus_per_worker=args.ray_cpus,
        fresh=args.fresh,
    )
    shown = result.winners[["concept", "layer", "best", "d_pref", "d_util", "separated"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:+.3f}"))
    print(f"wrote {out / 'report.html'} ({len(cells)} cells) in {time.perf_counter() - start:.0f} s")
    return 0


def grid_loader(path: str | None, dtype: str, host: str | None = None) -> Any:
    """The model as ``tl-steer report --model PATH --dtype D --host H`` loads it (a Ray worker calls this once)."""
    return with_dtype(_load_model(path, host), dtype)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser(
        "generate",
        help="steered text: the completions of prompts at several strengths m, side by side",
        description=(
            "Generate completions of PROMPT (default: the concept's first 3 held-out open prompts) on the default "
            "model, steered by a DiffMean vector of --concept/--pairs at blocks.L.hook_resid_post (or by a saved "
            "intervention, --load FILE) at each strength m, and print them side by side per prompt. Greedy unless "
            "--sample. With --judge, also score every text with the clean model: the concept probe's P(concept), "
            "the NLL per token and the repetition."
        ),
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="text(s) to continue")
    _add_model_arguments(gen)
    gen.add_argument("--load", default=None, metavar="FILE", help="a saved intervention (.safetensors) instead")
    gen.add_argument("-m", "--ms", type=float, nargs="+", default=[0.0, 1.0, 2.0], help="strengths (default: 0 1 2)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (default: 32)")
    gen.add_argument("--instruction", default=None, help="also generate with this instruction before each prompt")
    gen.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--judge", action="store_true", help="score the texts (concept probe, fluency)")
    gen.add_argument("--width", type=int, default=100, help="characters shown per completion (default: 100)")
    gen.add_argument("--csv", default=None, metavar="FILE", help="also write every text (and score) to FILE")


def _generate(args: argparse.Namespace) -> int:
    from tl_steer.analysis.gap import Condition
    from tl_steer.data import load_pairs, read_pairs
    from tl_steer.data.prompts import load_prompts, prompt_sets
    from tl_steer.generation import check_prompts, generate, side_by_side
    from tl_steer.interventions import check_grid
    from tl_steer.io import load
    from tl_steer.methods import diffmean
    from tl_steer.models import load_default_model
    from tl_steer.scoring import check_positive_int

    # Everything that can be checked without the model is checked before it loads.
    check_grid(args.ms, name="-m")
    check_positive_int("--max-new-tokens", args.max_new_tokens)
    if args.prompts:
        prompts = check_prompts(args.prompts)
    elif args.pairs or args.concept not in prompt_sets():
        known = ", ".join(prompt_sets())
        raise TlSteerError(f"give the PROMPT(s) to continue (built-in prompts exist for: {known})")
    else:
        prompts = load_prompts(args.concept, "test")[:3]
    if args.load and not Path(args.load).is_file():
        raise FileNotFoundError(f"no such intervention file: {args.load}")
    train = None
    if not args.load:
        train = read_pairs(args.pairs) if args.pairs else load_pairs(args.concept, "train")
    if args.judge and not args.pairs:
        load_pairs(args.concept, "test")  # the probe judge's concept must be a built-in one
    if args.csv:
        _check_writable(Path(args.csv).parent)

    model = with_dtype(load_default_model(host=args.host), args.dtype)
    if args.load:
        iv = load(args.load, model)
    else:
        layer = _layer(model, args.layer)
        assert train is not None
        iv = diffmean(model, train, f"blocks.{layer}.hook_resid_post")
    conditions: list[Any] = [iv]
    if args.instruction:
        conditions.append(Condition(f"{iv.method} + instruction", iv, args.instruction))
    table = generate(
        model,
        conditions,
        prompts,
        args.ms,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        seed=args.seed,
        chat=args.chat,
    )
    if args.judge:
        table = _judge_cli(model, table, args)
    print(f"{iv.method} at {', '.join(iv.hook_names)}, strengths {', '.join(f'{m:g}' for m in args.ms)}")
    print(side_by_side(table, width=args.width))
    if args.judge:
        cols = [c for c in ("concept", "nll", "rep4") if c in table.columns]
        print()
        print(table.groupby(["condition", "m"], sort=False)[cols].mean().to_string(float_format=lambda x: f"{x:.3f}"))
    if args.csv:
        _make_out(Path(args.csv).parent)  # checked above, made only now that there is something to write
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def _judge_cli(model: Any, table: Any, args: argparse.Namespace) -> Any:
    from tl_steer.data import load_pairs
    from tl_steer.judges import FluencyJudge, ProbeJudge, judge_table

    judges: list[Any] = [FluencyJudge(chat=args.chat)]
    if not args.pairs:  # a probe judge for a built-in concept (a pairs file has no held-out split to test it)
        probe = ProbeJudge.fit(
            model, load_pairs(args.concept, "train"), load_pairs(args.concept, "test"), concept=args.concept
        )
        print(repr(probe))
        judges.insert(0, probe)
    return judge_table(model, table, judges)


DTYPES = ("float32", "float16", "bfloat16")


def with_dtype(model: Any, dtype: str) -> Any:
    """The model cast to ``dtype`` (one of :data:`DTYPES`), in place; float32 leaves it as loaded."""
    import torch

    if dtype not in DTYPES:
        raise TlSteerError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model


def _load_model(path: str | None, host: str | None = None) -> Any:
    """The default model, or the Hugging Face model in the folder ``path``, as ``host`` (see --host)."""
    from tl_steer.models import bridge_from_hf, check_host_name, hooked_from_hf, load_default_model

    host = check_host_name(host)
    if path is None:
        return load_default_model(host=host)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise TlSteerError(f"--model {path!r} is not a folder; give a local Hugging Face model folder")
    # local_files_only: a folder missing a file is an error here, never a download
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    wrap = bridge_from_hf if host == "bridge" else hooked_from_hf
    return wrap(hf, AutoTokenizer.from_pretrained(path, local_files_only=True))


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
    """Refuse an output directory that cannot be made or written, without making it: a call that fails a
    later check leaves no empty directory behind (the directory is made when the first result is written)."""
    if out.exists() and not out.is_dir():
        raise TlSteerError(f"cannot write to the output directory {out}: it is a file")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TlSteerError(f"cannot write to the output directory {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TlSteerError(f"cannot write to the output directory {out}: permission denied on {existing}")


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SaveError(f"could not create the output directory {out}: {exc.strerror or exc}") from exc


if __name__ == "__main__":
    raise SystemExit(main())
