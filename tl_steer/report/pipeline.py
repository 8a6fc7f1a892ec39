"""The whole comparison behind ``tl-steer report``: build every method's intervention, sweep it, probe the
manifold distance, measure the capability-behaviour gap, and write the figures, tables and HTML.

Steps, each cached in ``DIR/cache`` (see :mod:`tl_steer.report.store`):

1. interventions: DiffMean; SFT and SPLIT (theta 2) in the forms asked for; COLD-Kernel and COLD-FD (JVP)
   from the first training pairs; the SAE feature with the largest measured PrefOdds gain among
   :func:`rank_features`' candidates (when an SAE for the hook is available). Every one gets a trained
   strength ``m_trained``: SFT/SPLIT their grid's median; the others the m at which they add DiffMean's
   norm per position, so that all are compared at equal added norm.
2. preference and utility of each on the test pairs over ``m = r * m_trained`` (and prompting, and
   the decay-model fit);
3. the manifold distance of the steered residual stream, for DiffMean and the SPLIT vector;
4. the capability-behaviour gap at 0.25, 1 and 2 x ``m_trained`` against prompting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_steer.analysis.gap import BASELINE, Condition, GapResult, capability_behavior_gap
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.analysis.manifold_sweep import manifold_sweep
from tl_steer.analysis.method_comparison import ComparisonResult, tabulate_comparison, trained_strength
from tl_steer.analysis.preference_utility import PreferenceUtilityResult, preference_utility
from tl_steer.analysis.sample_efficiency import added_norm, reference_batch
from tl_steer.data.mc import MCItem
from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import ConfigError
from tl_steer.interventions import Intervention
from tl_steer.methods.cold import cold_fd, cold_kernel
from tl_steer.methods.diffmean import diffmean
from tl_steer.methods.sae import rank_features, sae_feature
from tl_steer.methods.split import FORMS, Form, sft, split
from tl_steer.report import html
from tl_steer.report.store import Store

METHODS = ("diffmean", "sft", "split", "cold_kernel", "cold_fd", "sae", "prompting")
# Nine strengths: the decay model has nine parameters (one constraint), so fewer points would fit exactly.
RELATIVE = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# The gap's strengths: a quarter of m_trained reaches about the behaviour gain of prompting, so that the
# matched comparison has a steering point near it.
GAP_RELATIVE = (0.25, 1.0, 2.0)


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes. ``quick`` shrinks every size for a run of a few minutes."""

    concept: str
    layer: int
    methods: tuple[str, ...] = METHODS
    forms: tuple[str, ...] = FORMS
    quick: bool = False
    n_train: int = 100
    n_test: int = 40
    epochs: int = 2
    n_cold: int = 20
    n_mc: int | None = None
    n_probe_texts: int = 200
    instruction: str | None = None
    decay_fit: bool = True
    seed: int = 0

    @classmethod
    def make(cls, concept: str, layer: int, *, quick: bool = False, **kwargs: Any) -> ReportSettings:
        unknown = [m for m in kwargs.get("methods", ()) if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(METHODS)}")
        bad = [f for f in kwargs.get("forms", ()) if f not in FORMS]
        if bad:
            raise ConfigError(f"unknown form(s) {', '.join(bad)}; valid forms: {', '.join(FORMS)}")
        sizes: dict[str, Any] = (
            {"n_train": 48, "n_test": 16, "epochs": 1, "n_cold": 8, "n_mc": 40, "n_probe_texts": 96} if quick else {}
        )
        return cls(concept=concept, layer=layer, quick=quick, **(sizes | kwargs))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class ReportData:
    """The inputs of a report: pairs, multiple-choice items, the SAE (or None) and a display name."""

    name: str
    train: list[ContrastivePair]
    test: list[ContrastivePair]
    items: list[MCItem]
    sae: Any = None
    sae_note: str = ""


@dataclass
class ReportResult:
    """What the run produced: the tables (also written as CSV) and the files."""

    comparison: pd.DataFrame
    sweeps: PreferenceUtilityResult
    gap: GapResult | None
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _steps(settings: ReportSettings) -> list[str]:
    return ["interventions", "preference-utility", "manifold", "gap", "write"]


def build_interventions(
    model: HookedTransformer, data: ReportData, settings: ReportSettings, store: Store, log: Callable[[str], None]
) -> tuple[dict[str, Intervention], dict[str, float], pd.DataFrame | None]:
    """Every method's intervention (cached), its build time, and the SAE feature ranking (if any)."""
    hook = f"blocks.{settings.layer}.hook_resid_post"
    methods = set(settings.methods)
    out: dict[str, Intervention] = {}
    seconds: dict[str, float] = {}

    def build(name: str, make: Callable[[], Intervention]) -> Intervention:
        start = time.perf_counter()
        iv = store.intervention(name, make, model)
        timing = store.record(f"time/{name}", lambda: {"seconds": time.perf_counter() - start})
        seconds[name] = float(timing["seconds"])
        out[name] = iv
        log(f"{name}: ready ({seconds[name]:.0f} s to build)")
        return iv

    dm = build("diffmean", lambda: diffmean(model, data.train, hook))
    norm = float(dm.vector.norm())  # type: ignore[attr-defined]
    reference = reference_batch(model, data.train[:4])

    def at_norm(iv: Intervention) -> Intervention:
        iv.info["m_typical"] = norm / added_norm(model, iv, *reference)
        return iv

    for form in settings.forms:
        for objective in ("sft", "split"):
            if objective in methods:
                build(f"{objective}/{form}", partial(_train, model, data.train, settings, form, objective))
    examples = data.train[: settings.n_cold]
    if "cold_kernel" in methods:
        build("cold_kernel", lambda: at_norm(cold_kernel(model, examples, hook)))
    if "cold_fd" in methods:
        # the exact forward-mode product: no epsilon to choose, and no loss of precision in fp32
        build("cold_fd", lambda: at_norm(cold_fd(model, examples, hook, method="jvp")))
    ranking = None
    if "sae" in methods and data.sae is not None:
        half = len(data.train) // 2
        n_measure = 4 if settings.quick else 8
        ranking = store.frame(
            "sae_ranking",
            lambda: rank_features(
                model, data.sae, data.train[:half], n_measure=n_measure, eval_pairs=data.train[half:], norm=norm
            ),
        )
        measured = ranking.dropna(subset=["d_pref"])
        best = int(measured.loc[measured["d_pref"].idxmax(), "feature"])
        value = norm / float(data.sae.W_dec[best].detach().norm())
        build(f"sae/{best}", lambda: sae_feature(data.sae, best, "add", value, model=model))
    return out, seconds, ranking


def run_report(
    model: HookedTransformer,
    data: ReportData,
    settings: ReportSettings,
    out: str | Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ReportResult:
    """Run every step (resuming from ``out/cache``) and write ``out/report.html``, the figures (PNG), the
    tables (CSV) and ``out/summary.json``."""
    started = time.perf_counter()
    out = Path(out)
    hook = f"blocks.{settings.layer}.hook_resid_post"
    if not 0 <= settings.layer < model.cfg.n_layers:
        raise ConfigError(f"layer must be in 0..{model.cfg.n_layers - 1}, got {settings.layer}")
    # Every cached result is per method, so a rerun may add or drop methods and forms; any other change
    # (data, sizes, layer, model) would mix results of two configurations.
    keyed = {k: v for k, v in settings.to_json().items() if k not in ("methods", "forms")}
    keyed |= {"data": data.name, "model": model.cfg.model_name}
    if model.cfg.dtype != torch.float32:  # only then, so that caches of float32 runs stay valid
        keyed["dtype"] = str(model.cfg.dtype).removeprefix("torch.")
    store = Store(out, keyed)
    if fresh:
        store.clear()
        store = Store(out, keyed)
    bar = tqdm(_steps(settings), desc="tl-steer report", disable=not progress, unit="step")
    files: list[Path] = []

    bar.set_postfix_str("building interventions")
    interventions, seconds, ranking = build_interventions(model, data, settings, store, log)
    bar.update()

    bar.set_postfix_str("preference and utility")
    sweeps = []
    for name, iv in interventions.items():
        ms = [r * trained_strength(iv) for r in RELATIVE]
        sweeps.append(
            store.frame(
                f"sweep/{name}",
                partial(_sweep, model, iv, data.test, ms, name),
            )
        )
    if "prompting" in settings.methods and settings.instruction:
        sweeps.append(
            store.frame(
                "sweep/prompting",
                lambda: (
                    preference_utility(
                        model, None, data.test, instruction=settings.instruction, label="prompting", progress=False
                    ).table
                ),
            )
        )
    log(f"preference and utility: {len(sweeps)} conditions swept")
    pu = PreferenceUtilityResult(pd.concat(sweeps, ignore_index=True), "mean", 1e-6)
    steered = PreferenceUtilityResult(pu.table[pu.table["label"].isin(list(interventions))], "mean", 1e-6)
    comparison = tabulate_comparison(steered, interventions, train_seconds=seconds)
    bar.update()

    bar.set_postfix_str("manifold distance")
    manifold = _manifold(model, data, settings, interventions, store, hook)
    log("manifold distance: done")
    bar.update()

    bar.set_postfix_str("capability-behaviour gap")
    gap = _gap(model, data, settings, interventions, store, log) if data.items else None
    bar.update()

    bar.set_postfix_str("writing")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    sections, summary = _write(out, figures, model, data, settings, comparison, pu, manifold, gap, ranking, files)
    summary["runtime_s"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    files.append(out / "summary.json")
    title = f"tl_steer report: {data.name}, {hook}, {model.cfg.model_name}"
    files.append(html.write(out / "report.html", title, sections))
    bar.update()
    bar.close()
    return ReportResult(comparison, pu, gap, files, summary)


def _manifold(
    model: HookedTransformer,
    data: ReportData,
    settings: ReportSettings,
    interventions: dict[str, Intervention],
    store: Store,
    hook: str,
) -> pd.DataFrame | None:
    targets = [n for n in ("diffmean", "split/vector") if n in interventions]
    if not targets:
        return None
    texts = [p.prompt + c for p in data.train for c in (p.positive, p.negative)][: settings.n_probe_texts]
    probe_path = store.cache / "manifold_probe.safetensors"
    if probe_path.exists():
        probe = ManifoldProbe.load(probe_path, model=model)
    else:
        probe = ManifoldProbe.fit(model, texts, hook, progress=False)
        probe.save(probe_path)
    frames = []
    for name in targets:
        iv = interventions[name]
        ms = [r * trained_strength(iv) for r in RELATIVE]
        baselines = name == "diffmean" and not settings.quick
        frame = store.frame(
            f"manifold/{name}", partial(_manifold_sweep, model, iv, data.test, ms, probe, name, baselines)
        )
        frame.insert(2, "r", frame["m"] / trained_strength(iv))  # the random baselines share the sweep's grid
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _gap(
    model: HookedTransformer,
    data: ReportData,
    settings: ReportSettings,
    interventions: dict[str, Intervention],
    store: Store,
    log: Callable[[str], None] = print,
) -> GapResult:
    conditions: list[Condition] = [Condition(BASELINE)]
    if "prompting" in settings.methods and settings.instruction:
        conditions.append(Condition("prompting", instruction=settings.instruction))
    for name, iv in interventions.items():
        if name.startswith("sft/") or (name.startswith("split/") and name != "split/vector"):
            continue  # one SPLIT form stands for the trained interventions; the gap is about kinds of control
        ms = tuple(r * trained_strength(iv) for r in GAP_RELATIVE)
        conditions.append(Condition(name, iv, ms=ms))
        if name == "diffmean" and settings.instruction:
            conditions.append(Condition("diffmean + prompting", iv, settings.instruction, ms=ms))
    frames = []
    for c in conditions:
        # one cache entry per strength, so that a rerun with more strengths computes only the new ones
        for m in c.ms or (0.0,):
            one = dataclasses.replace(c, ms=(m,)) if c.steers else c
            key = f"gap/{c.name}@{m / trained_strength(c.intervention):g}" if c.intervention else f"gap/{c.name}"
            frames.append(store.frame(key, partial(_gap_items, model, one, data.test, data.items)))
        log(f"capability-behaviour gap: {c.name} scored")
    return GapResult(pd.concat(frames, ignore_index=True), conditions)


def _train(
    model: HookedTransformer, train: list[ContrastivePair], settings: ReportSettings, form: str, objective: str
) -> Intervention:
    shape = cast(Form, form)
    if objective == "sft":
        iv, _ = sft(model, train, settings.layer, shape, epochs=settings.epochs, seed=settings.seed, progress=False)
    else:
        # theta above the clean model's preference, so that the hinge acts (see tl_steer.split)
        iv, _ = split(
            model, train, settings.layer, shape, theta=2.0, epochs=settings.epochs, seed=settings.seed, progress=False
        )
    return iv


def _sweep(
    model: HookedTransformer, iv: Intervention, pairs: list[ContrastivePair], ms: list[float], name: str
) -> pd.DataFrame:
    return preference_utility(model, iv, pairs, ms, label=name, progress=False).table


def _manifold_sweep(
    model: HookedTransformer,
    iv: Intervention,
    pairs: list[ContrastivePair],
    ms: list[float],
    probe: ManifoldProbe,
    name: str,
    baselines: bool,
) -> pd.DataFrame:
    return manifold_sweep(model, iv, pairs, ms, probe, label=name, baselines=baselines, progress=False).summary()


def _gap_items(
    model: HookedTransformer, condition: Condition, pairs: list[ContrastivePair], items: list[MCItem]
) -> pd.DataFrame:
    baseline = condition.name == BASELINE
    return capability_behavior_gap(
        model,
        [] if baseline else [condition],
        pairs,
        items,
        include_baseline=baseline,
        include_zero=False,
        progress=False,
    ).items


def _write(
    out: Path,
    figures: Path,
    model: HookedTransformer,
    data: ReportData,
    settings: ReportSettings,
    comparison: pd.DataFrame,
    pu: PreferenceUtilityResult,
    manifold: pd.DataFrame | None,
    gap: GapResult | None,
    ranking: pd.DataFrame | None,
    files: list[Path],
) -> tuple[list[html.Section], dict[str, Any]]:
    hook = f"blocks.{settings.layer}.hook_resid_post"
    summary: dict[str, Any] = {"settings": settings.to_json(), "data": data.name, "hook": hook}

    def table(name: str, frame: pd.DataFrame) -> pd.DataFrame:
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
        files.append(path)
        return frame

    overview = html.Section(
        "Overview",
        paragraphs=[
            f"Model {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
            f"{model.cfg.dtype}); concept {data.name!r}: {len(data.train)} training and {len(data.test)} test "
            f"pairs; steering at {hook}; {len(data.items)} multiple-choice items for capability.",
            "Preference log-odds PrefOdds = L_n - L_p and utility log-odds UtilOdds = log(P_u / (1 - P_u)) with "
            "P_u = exp(-L_p) + exp(-L_n), where L is the mean NLL per completion token (nats per token). Every "
            "intervention is swept over m = r x m_trained; m_trained is the median of the training grid for "
            "SFT/SPLIT and, for the others, the strength that adds DiffMean's norm per position.",
            f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {torch.get_num_threads()} torch "
            f"threads; settings: {json.dumps(settings.to_json())}.",
        ],
        notes=[data.sae_note] if data.sae_note else [],
    )
    sections = [overview]

    comp = ComparisonResult(
        PreferenceUtilityResult(pu.table[pu.table["label"].isin(comparison["condition"])], "mean", 1e-6),
        comparison,
        1.0,
    )
    comp_png = figures / "comparison.png"
    comp.plot(comp_png, title=f"{data.name}: preference against utility, {hook}")
    rel = pu.table.copy()
    scale = dict(zip(comparison["condition"], comparison["m_trained"], strict=True))
    rel["m"] = [
        m / scale.get(label, 1.0) if label in scale else m for label, m in zip(rel["label"], rel["m"], strict=True)
    ]
    rel_result = PreferenceUtilityResult(rel, "mean", 1e-6)
    sweep_png = figures / "preference_utility.png"
    rel_result.plot(sweep_png, title=f"{data.name}: log-odds against relative strength m / m_trained")
    fits = []
    for label in rel_result.labels if settings.decay_fit else []:
        if label == "prompting":
            continue
        try:
            fit = PreferenceUtilityResult(rel[rel["label"] == label], "mean", 1e-6).fit_decay()[label]
            params = {f"{kind}_{k}": v for kind in ("pref", "util") for k, v in fit[kind].params.items()}
            fits.append({"condition": label, "R2 PrefOdds": fit["pref"].r2, "R2 UtilOdds": fit["util"].r2} | params)
        except (ValueError, RuntimeError) as exc:
            fits.append({"condition": label, "R2 PrefOdds": math.nan, "R2 UtilOdds": math.nan, "note": str(exc)})
    # two means; the bootstrapped summary of every condition is not needed for them
    prompting = pu.table.loc[pu.table["label"] == "prompting", ["pref_odds", "util_odds"]].mean().to_frame().T
    prompting = prompting.dropna()
    shown = comparison[
        ["condition", "m_trained", "pref_odds", "d_pref", "util_odds", "d_util", "m_low", "m_high", "train_s"]
    ]
    section = html.Section(
        "Methods compared: preference and utility",
        paragraphs=[
            "Each row: the intervention at the strength it was made for (m_trained), mean PrefOdds and UtilOdds "
            "over the test pairs and their change from m = 0; [m_low, m_high]: the strengths around 0 where "
            "UtilOdds stays within 1 nat of its clean value; train_s: seconds to build the intervention."
        ]
        + (
            [
                f"Prompting ({settings.instruction!r}) without steering: PrefOdds "
                f"{float(prompting['pref_odds'].iloc[0]):.3f}, UtilOdds {float(prompting['util_odds'].iloc[0]):.3f}."
            ]
            if len(prompting)
            else []
        ),
        tables=[
            ("", table("comparison", shown)),
            (
                "Decay-model fits on m / m_trained (8 free parameters for 9 strengths: an R^2 near 1 is "
                "expected and is no evidence on its own; the parameters are in decay_fits.csv)",
                table("decay_fits", pd.DataFrame(fits)).iloc[:, :3],
            ),
        ],
        figures=[
            html.Figure(
                comp_png,
                "Preference against utility along each method's sweep; star: at m_trained. "
                "Look for: stars high (preference) and far right (utility kept).",
            ),
            html.Figure(
                sweep_png,
                "PrefOdds (solid) and UtilOdds (dashed) against m / m_trained with 95% CIs. "
                "Look for: preference rising with m while utility falls away from m = 0.",
            ),
        ],
    )
    sections.append(section)
    files += [comp_png, sweep_png]
    table("preference_utility", pu.table)
    summary["comparison"] = comparison.to_dict(orient="records")

    if manifold is not None:
        png = figures / "manifold.png"
        _plot_manifold(manifold, png)
        files.append(png)
        sections.append(
            html.Section(
                "Distance from the clean activations (manifold probe)",
                paragraphs=[
                    "Mahalanobis distance (Ledoit-Wolf) of the steered residual stream at the hook, as the "
                    "percentile among held-out clean tokens (0.5 = typical clean token), with UtilOdds, per strength."
                ],
                tables=[("", table("manifold", manifold))],
                figures=[
                    html.Figure(
                        png,
                        "Distance percentile (left) and UtilOdds (right) against m / m_trained. "
                        "Look for: whether utility falls where the distance rises.",
                    )
                ],
            )
        )
    if gap is not None:
        png = figures / "capability_gap.png"
        gap.plot(png, title=f"{data.name}: capability-behaviour gap")
        files.append(png)
        gsum = gap.summary()
        tests = gap.tests()
        matched = gap.matched() if "prompting" in set(gsum["condition"]) else pd.DataFrame()
        sections.append(
            html.Section(
                "Capability-behaviour gap",
                paragraphs=[
                    f"Capability: accuracy on {len(data.items)} multiple-choice questions, each option scored by its "
                    "likelihood. Behaviour: PrefOdds gain over no steering. Paired tests against no steering "
                    "(Wilcoxon for log-odds, exact McNemar for accuracy), Bonferroni-corrected."
                ],
                tables=[
                    ("Per condition and strength", table("gap_summary", gsum)),
                    ("Matched to prompting's behaviour gain", table("gap_matched", matched)),
                    ("Tests against no steering", table("gap_tests", tests)),
                ],
                figures=[
                    html.Figure(
                        png,
                        "Behaviour gain against accuracy change, 95% CIs. Look for: steering "
                        "below prompting at the same behaviour gain (the gap).",
                    )
                ],
            )
        )
        summary["gap_matched"] = matched.to_dict(orient="records")
    if ranking is not None:
        measured = ranking.dropna(subset=["d_pref"])
        sections.append(
            html.Section(
                "Choosing the SAE feature",
                paragraphs=[
                    "Input score: AUROC of the feature's activation for positive against negative completions. "
                    "Output score: logit lens of its decoder direction onto the concept's tokens. d_pref: the "
                    "measured PrefOdds change when the feature alone is added at DiffMean's norm."
                ],
                tables=[("Measured candidates", table("sae_candidates", measured))],
            )
        )
    return sections, summary


def _plot_manifold(frame: pd.DataFrame, path: Path) -> None:
    from tl_steer.analysis.plots import _pyplot, finish_figure

    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    label_col = "label" if "label" in frame else frame.columns[0]
    for label, part in frame.groupby(label_col, sort=False):
        r = part["r"].to_numpy()
        dist_col = next((c for c in part.columns if "mahalanobis" in c and "pct" in c), None)
        if dist_col is not None:
            a.plot(r, part[dist_col], "-o", ms=3, label=str(label))
        if "util_odds" in part:
            b.plot(r, part["util_odds"], "-o", ms=3, label=str(label))
    a.set_xlabel("m / m_trained")
    a.set_ylabel("Mahalanobis distance percentile among clean tokens")
    b.set_xlabel("m / m_trained")
    b.set_ylabel("UtilOdds (nats per token)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle("Distance from the clean activations and utility against strength")
    finish_figure(fig, path, "Look for: utility falling where the distance rises.", bottom=0.04, top=0.95)


__all__ = ["METHODS", "ReportData", "ReportResult", "ReportSettings", "run_report"]
