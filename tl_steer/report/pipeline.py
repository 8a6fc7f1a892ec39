"""The whole comparison behind ``tl-steer report``: build every method's intervention, sweep it, probe the
manifold distance, measure the capability-behaviour gap, and write the figures, tables and HTML.

Steps, each cached in ``DIR/cache`` (see :mod:`tl_steer.report.store`):

1. interventions: DiffMean; SFT and SPLIT (theta 2) in the forms asked for; COLD-Kernel and COLD-FD (JVP)
   from the first training pairs; the SAE feature with the largest measured PrefOdds gain among
   :func:`rank_features`' candidates (when an SAE for the hook is available). For each, ``m = 1`` is the
   strength it was made for (its ``unit``): SFT/SPLIT their grid's median; COLD the scale at which it
   adds DiffMean's norm on its examples; the SAE feature's coefficient adds DiffMean's norm; so all are
   compared at the same m. With ``--full`` (or ``--methods``), the adaptive forms around DiffMean's vector:
   projection clamp, probe-budgeted addition, rotation, and DiffMean gated by a condition probe.
2. preference and utility of each on the test pairs over the strengths ``RELATIVE`` (and prompting, and
   the decay-model fit);
3. the manifold distance of the steered residual stream, for DiffMean and the SPLIT vector;
4. steered text: every condition's greedy completions of held-out prompts at m = 1 and 2, judged
   (:mod:`tl_steer.report.generation_section`);
5. the capability-behaviour gap at m = 0.25, 1 and 2 against prompting (behaviour and utility at m = 1 and 2
   taken from step 2's sweeps), its multiple-choice items scored with the clean blocks before the steered
   layer run once for all conditions; with the full size
   (``gap_text``), behaviour is also measured on generated text (the concept judge's score of greedy
   completions of held-out prompts), beside PrefOdds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from tqdm.auto import tqdm

from tl_steer.analysis.capability import MCCleanPrefix
from tl_steer.analysis.gap import BASELINE, Condition, GapResult, capability_behavior_gap
from tl_steer.analysis.generation_sweep import GenerationSweepResult, TextBehavior
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.analysis.manifold_sweep import manifold_sweep
from tl_steer.analysis.method_comparison import tabulate_comparison
from tl_steer.analysis.preference_utility import PreferenceUtilityResult, preference_utility
from tl_steer.data.mc import MCItem
from tl_steer.data.pairs import ContrastivePair
from tl_steer.data.prompts import load_prompts, prompt_sets
from tl_steer.errors import ConfigError
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, Intervention
from tl_steer.judges.probe import ProbeJudge
from tl_steer.methods.adaptive import (
    ConceptActivations,
    budgeted_addition,
    concept_activations,
    condition_probe,
    conditional,
    projection_clamp,
    rotation,
)
from tl_steer.methods.cold import cold_fd, cold_kernel
from tl_steer.methods.diffmean import diffmean
from tl_steer.methods.sae import rank_features, sae_feature
from tl_steer.methods.split import FORMS, Form, sft, split
from tl_steer.report import html
from tl_steer.report.generation_section import gen_size, generation_sweep_for_report
from tl_steer.report.sections import ReportContext, build_sections
from tl_steer.report.store import Store

#: The adaptive forms (docs/methods.md, section "Adaptive steering"), each fitted around DiffMean's vector.
ADAPTIVE = ("clamp", "budget", "rotation", "conditional")
METHODS = ("diffmean", "sft", "split", "cold_kernel", "cold_fd", "sae", *ADAPTIVE, "prompting")
#: The methods of a run that names none: every method for "full"; the smaller sizes leave the adaptive forms
#: out (about a minute each on 2 cores), which ``--methods`` adds back.
DEFAULT_METHODS: dict[str, tuple[str, ...]] = {
    "quick": tuple(m for m in METHODS if m not in ADAPTIVE),
    "standard": tuple(m for m in METHODS if m not in ADAPTIVE),
    "full": METHODS,
}
# Nine strengths: the decay model has nine parameters (one constraint), so fewer points would fit exactly.
RELATIVE = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
# The gap's strengths: m = 0.25 reaches about the behaviour gain of prompting, so that the
# matched comparison has a steering point near it.
GAP_RELATIVE = (0.25, 1.0, 2.0)
# prompts and new tokens of the gap's behaviour on generated text (settings.gap_text)
GAP_TEXT_PROMPTS, GAP_TEXT_TOKENS = 16, 32
# Rows per scoring pass of the sweeps, the manifold sweeps and the gap (questions per pass of its multiple-choice
# scoring): TransformerLens copies its weights in every pass, so fewer, larger passes are faster on a CPU (the
# preference-utility sweep 0.82x, the gap's multiple choice 0.91x of batch 16 on the default model); the
# numbers are the same to float rounding. The logits budget still splits a pass of long sequences.
SCORING_BATCH = 64

# The sizes of `tl-steer report`: "quick", a smoke run of a few minutes; "standard", the default, about
# 7 minutes on 2 CPU cores (vector forms only); "full", the whole comparison (the field defaults below).
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "n_train": 48,
        "n_test": 16,
        "epochs": 1,
        "n_cold": 8,
        "n_mc": 40,
        "n_probe_texts": 96,
        "gap_text": False,
    },
    "standard": {
        "n_train": 64,
        "n_test": 24,
        "epochs": 1,
        "n_cold": 12,
        "n_mc": 64,
        "n_probe_texts": 128,
        "gap_text": False,
    },
    "full": {},
}


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes (the defaults: the full comparison). ``quick`` marks the smallest of the
    :data:`SIZES`, which also measures fewer SAE candidates and skips the manifold's random baselines."""

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
    #: the gap also measures behaviour on generated text (the concept judge's score of greedy completions of
    #: GAP_TEXT_PROMPTS held-out prompts at every gap strength); the full size does, the smaller ones do not
    gap_text: bool = True
    seed: int = 0

    @classmethod
    def make(
        cls, concept: str, layer: int, *, quick: bool = False, size: str | None = None, **kwargs: Any
    ) -> ReportSettings:
        """Settings of one of the :data:`SIZES` (``quick=True`` is ``size="quick"``; default: "full"),
        with any field given in ``kwargs`` overriding it."""
        size = size or ("quick" if quick else "full")
        if size not in SIZES:
            raise ConfigError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
        unknown = [m for m in kwargs.get("methods", ()) if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid methods: {', '.join(METHODS)}")
        bad = [f for f in kwargs.get("forms", ()) if f not in FORMS]
        if bad:
            raise ConfigError(f"unknown form(s) {', '.join(bad)}; valid forms: {', '.join(FORMS)}")
        defaults = SIZES[size] | {"methods": DEFAULT_METHODS[size]}
        return cls(concept=concept, layer=layer, quick=size == "quick", **(defaults | kwargs))

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
    #: the sections of report.html, for a page that shows them again (the grid report)
    sections: list[html.Section] = field(default_factory=list)


def _steps(settings: ReportSettings) -> list[str]:
    return ["interventions", "preference-utility", "manifold", "steered text", "gap", "write"]


def _known_texts(result: GenerationSweepResult, prompts: list[str], tokens: int) -> dict[str, Any]:
    """The steered-text step's greedy completions, for the gap's behaviour on generated text
    (``TextBehavior.known``): the prompts, the new-token count, and by (condition, m) the first sample's
    completion of every prompt."""
    items = result.items[result.items["sample"] == 0].sort_values("item")
    texts = {
        (str(cond), float(m)): tuple(group["completion"].fillna("").astype(str))
        for (cond, m), group in items.groupby(["condition", "m"], sort=False)
        if len(group) == len(prompts)
    }
    return {"prompts": tuple(prompts), "tokens": tokens, "texts": texts}


def build_interventions(
    model: Host, data: ReportData, settings: ReportSettings, store: Store, log: Callable[[str], None]
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

    for form in settings.forms:
        for objective in ("sft", "split"):
            if objective in methods:
                build(f"{objective}/{form}", partial(_train, model, data.train, settings, form, objective))
    examples = data.train[: settings.n_cold]
    if "cold_kernel" in methods:
        build("cold_kernel", lambda: cold_kernel(model, examples, hook))
    if "cold_fd" in methods:
        # the exact forward-mode product: no epsilon to choose, and no loss of precision in fp32
        build("cold_fd", lambda: cold_fd(model, examples, hook))
    _build_adaptive(model, data, hook, cast(AddVector, dm), methods, build)
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


def _build_adaptive(
    model: Host,
    data: ReportData,
    hook: str,
    base: AddVector,
    methods: set[str],
    build: Callable[[str, Callable[[], Intervention]], Intervention],
) -> None:
    """The adaptive forms asked for, around DiffMean's vector ``base``: the projection clamp (target: the
    median projection of the positive tokens), the budgeted addition (within the clean 95th percentile of a
    Mahalanobis probe fitted on the training texts), the rotation, and DiffMean gated by a condition probe that
    fires where the activation reads as the negative side. One pass over the training completions serves all;
    it runs only when a form is not already cached."""
    if not methods & set(ADAPTIVE):
        return

    @functools.cache
    def acts() -> ConceptActivations:
        return concept_activations(model, data.train, hook)

    if "clamp" in methods:
        build("clamp", lambda: projection_clamp(model, None, hook, base=base, activations=acts()))
    if "budget" in methods:

        def budget() -> Intervention:
            texts = [p.prompt + c for p in data.train for c in (p.positive, p.negative)]
            probe = ManifoldProbe.fit(model, texts, hook, k=32, progress=False)
            return budgeted_addition(model, None, hook, probe, base=base, activations=acts())

        build("budget", budget)
    if "rotation" in methods:
        build("rotation", lambda: rotation(model, None, hook, base=base, activations=acts()))
    if "conditional" in methods:

        def gated() -> Intervention:
            probe = condition_probe(model, None, hook, activations=acts(), fires_on="negative")
            return conditional(base, probe)

        build("conditional", gated)


def run_report(
    model: Host,
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
    keyed = cache_key(model, data.name, settings)
    store = Store(out, keyed)
    if fresh:
        store.clear()
        store = Store(out, keyed)
    bar = tqdm(_steps(settings), desc="tl-steer report", disable=not progress, unit="step")
    files: list[Path] = []
    step_seconds: dict[str, float] = {}
    last = [started]

    def lap() -> float:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        return seconds

    bar.set_postfix_str("building interventions")
    interventions, seconds, ranking = build_interventions(model, data, settings, store, log)
    step_seconds["interventions"] = lap()
    bar.update()

    bar.set_postfix_str("preference and utility")
    sweeps = []
    for name, iv in interventions.items():
        ms = list(RELATIVE)
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
                        model,
                        None,
                        data.test,
                        instruction=settings.instruction,
                        label="prompting",
                        batch_size=SCORING_BATCH,
                        progress=False,
                    ).table
                ),
            )
        )
    log(f"preference and utility: {len(sweeps)} conditions swept")
    pu = PreferenceUtilityResult(pd.concat(sweeps, ignore_index=True), "mean", 1e-6)
    steered = PreferenceUtilityResult(pu.table[pu.table["label"].isin(list(interventions))], "mean", 1e-6)
    comparison = tabulate_comparison(steered, interventions, train_seconds=seconds)
    step_seconds["preference-utility"] = lap()
    bar.update()

    bar.set_postfix_str("manifold distance")
    manifold = _manifold(model, data, settings, interventions, store, hook)
    log("manifold distance: done")
    step_seconds["manifold"] = lap()
    bar.update()

    context = ReportContext(
        out, model, data, settings, interventions, comparison, pu, manifold, None, ranking, files, store=store
    )
    bar.set_postfix_str("steered text")
    # generated and judged here, one progress line per condition, and cached: the section reads the cache
    generated = generation_sweep_for_report(context, log) if interventions else None
    step_seconds["steered text"] = lap()
    bar.update()

    bar.set_postfix_str("capability-behaviour gap")
    # the gap's behaviour on generated text judges the steered-text step's completions where they are the same
    known = _known_texts(*generated, gen_size(context)[1]) if generated is not None else {}
    by_label = {str(label): table for label, table in pu.table.groupby("label", sort=False)}
    context.gap = gap = _gap(model, data, settings, interventions, store, log, known, by_label) if data.items else None
    step_seconds["gap"] = lap()
    bar.update()

    bar.set_postfix_str("writing")
    sections = build_sections(context)
    summary = context.summary
    summary["runtime_s"] = time.perf_counter() - started
    # seconds of each step in this run (near 0 where it was read from the cache); writing is the rest
    summary["step_seconds"] = step_seconds | {"write": summary["runtime_s"] - sum(step_seconds.values())}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    files.append(out / "summary.json")
    title = f"tl_steer report: {data.name}, {hook}, {model.cfg.model_name}"
    files.append(html.write(out / "report.html", title, sections))
    bar.update()
    bar.close()
    return ReportResult(comparison, pu, gap, files, summary, sections)


def cache_key(model: Host, data_name: str, settings: ReportSettings) -> dict[str, Any]:
    """What a report's cache is keyed by (kept in ``cache/settings.json``): the settings but the methods and
    forms, the data's name, the model's name, and its dtype when not float32."""
    # Every cached result is per method, so a rerun may add or drop methods and forms; any other change
    # (data, sizes, layer, model) would mix results of two configurations.
    keyed = {k: v for k, v in settings.to_json().items() if k not in ("methods", "forms")}
    keyed |= {"data": data_name, "model": model.cfg.model_name}
    # Caches of tl_steer 0.1 swept raw strengths (m = r x m_trained); this key refuses to mix them in.
    keyed["m"] = "m = 1 is each intervention's unit"
    if model.cfg.dtype != torch.float32:  # only then, so that caches of float32 runs stay valid
        keyed["dtype"] = str(model.cfg.dtype).removeprefix("torch.")
    return keyed


def _manifold(
    model: Host,
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
        ms = list(RELATIVE)
        baselines = name == "diffmean" and not settings.quick
        frame = store.frame(
            f"manifold/{name}", partial(_manifold_sweep, model, iv, data.test, ms, probe, name, baselines)
        )
        frame.insert(2, "r", frame["m"])  # m is relative to each one's unit; the random baselines share the grid
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _gap(
    model: Host,
    data: ReportData,
    settings: ReportSettings,
    interventions: dict[str, Intervention],
    store: Store,
    log: Callable[[str], None] = print,
    known: dict[str, Any] | None = None,
    sweeps: dict[str, pd.DataFrame] | None = None,
) -> GapResult:
    conditions: list[Condition] = [Condition(BASELINE)]
    if "prompting" in settings.methods and settings.instruction:
        conditions.append(Condition("prompting", instruction=settings.instruction))
    for name, iv in interventions.items():
        if name.startswith("sft/") or (name.startswith("split/") and name != "split/vector"):
            continue  # one SPLIT form stands for the trained interventions; the gap is about kinds of control
        ms = tuple(GAP_RELATIVE)
        conditions.append(Condition(name, iv, ms=ms))
        if name == "diffmean" and settings.instruction:
            conditions.append(Condition("diffmean + prompting", iv, settings.instruction, ms=ms))
    frames = []

    @functools.cache
    def text() -> TextBehavior | None:
        """Behaviour on generated text (fitted only when a gap entry is not cached yet)."""
        if not settings.gap_text:
            return None
        prompts = (
            load_prompts(data.name, "test")
            if data.name in prompt_sets()
            else list(dict.fromkeys(p.prompt for p in data.test))
        )
        judge = ProbeJudge.fit(model, data.train, data.test, concept=data.name)
        shown = tuple(prompts[:GAP_TEXT_PROMPTS])
        # the steered-text step generated the same texts where prompts and length agree (both greedy, batch 16)
        same = known is not None and known.get("prompts") == shown and known.get("tokens") == GAP_TEXT_TOKENS
        texts = known["texts"] if known is not None and same else {}
        return TextBehavior(shown, judge, max_new_tokens=GAP_TEXT_TOKENS, known=texts)

    # the clean blocks before the steered layer, run once for every condition's multiple-choice scoring
    clean = MCCleanPrefix.for_interventions(model, [c.intervention for c in conditions])
    for c in conditions:
        # one cache entry per strength, so that a rerun with more strengths computes only the new ones
        for m in c.ms or (0.0,):
            one = dataclasses.replace(c, ms=(m,)) if c.steers else c
            key = f"gap/{c.name}@{m:g}" if c.intervention else f"gap/{c.name}"
            frames.append(store.frame(key, partial(_gap_items, model, one, data.test, data.items, text, clean, sweeps)))
        log(f"capability-behaviour gap: {c.name} scored")
    return GapResult(pd.concat(frames, ignore_index=True), conditions)


def _train(
    model: Host, train: list[ContrastivePair], settings: ReportSettings, form: str, objective: str
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


def _sweep(model: Host, iv: Intervention, pairs: list[ContrastivePair], ms: list[float], name: str) -> pd.DataFrame:
    return preference_utility(model, iv, pairs, ms, label=name, batch_size=SCORING_BATCH, progress=False).table


def _manifold_sweep(
    model: Host,
    iv: Intervention,
    pairs: list[ContrastivePair],
    ms: list[float],
    probe: ManifoldProbe,
    name: str,
    baselines: bool,
) -> pd.DataFrame:
    return manifold_sweep(
        model, iv, pairs, ms, probe, label=name, baselines=baselines, batch_size=SCORING_BATCH, progress=False
    ).summary()


def _gap_items(
    model: Host,
    condition: Condition,
    pairs: list[ContrastivePair],
    items: list[MCItem],
    text: Callable[[], TextBehavior | None] = lambda: None,
    clean: MCCleanPrefix | None = None,
    sweeps: dict[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    baseline = condition.name == BASELINE
    return capability_behavior_gap(
        model,
        [] if baseline else [condition],
        pairs,
        items,
        include_baseline=baseline,
        include_zero=False,
        batch_size=SCORING_BATCH,
        progress=False,
        text=text(),
        clean_prefix=clean,
        sweeps=sweeps,  # the strength sweeps' rows at the gap's strengths (m = 1 and 2; prompting)
    ).items


__all__ = ["METHODS", "SIZES", "ReportData", "ReportResult", "ReportSettings", "run_report"]
