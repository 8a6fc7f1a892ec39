"""The sections of report.html, one builder each, in reading order: what was found first, then the set-up,
then per analysis its figures and, folded, its long tables (every table is also written as CSV).

A builder takes the :class:`ReportContext` (everything the run computed) and returns an
:class:`~tl_steer.report.html.Section`, or ``None`` when it has nothing to show. To add a section, write
such a function and put it into :data:`SECTIONS` where it should appear (or pass your own list to
:func:`build_sections`).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from tl_steer.analysis.gap import GapResult
from tl_steer.analysis.method_comparison import ComparisonResult
from tl_steer.analysis.plots import plot_distance_and_utility, plot_preference_utility
from tl_steer.analysis.preference_utility import PreferenceUtilityResult
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention
from tl_steer.report import findings, html
from tl_steer.report.generation_section import generation_section
from tl_steer.report.store import Store

if TYPE_CHECKING:
    from tl_steer.report.pipeline import ReportData, ReportSettings


@dataclass
class ReportContext:
    """Everything a section builder may show: the run's inputs, its results, and where files go."""

    out: Path
    model: Host
    data: ReportData
    settings: ReportSettings
    interventions: dict[str, Intervention]
    comparison: pd.DataFrame
    pu: PreferenceUtilityResult
    manifold: pd.DataFrame | None = None
    gap: GapResult | None = None
    ranking: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    store: Store | None = None  # the run's cache, for a builder that computes something of its own

    @property
    def hook(self) -> str:
        return f"blocks.{self.settings.layer}.hook_resid_post"

    @property
    def figures(self) -> Path:
        path = self.out / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def figure(self, name: str) -> Path:
        """The path of figure ``name`` (PNG), recorded among the run's files."""
        path = self.figures / f"{name}.png"
        self.files.append(path)
        return path

    def table(self, name: str, frame: pd.DataFrame) -> pd.DataFrame:
        """Write ``frame`` as ``name.csv`` (recorded among the run's files) and return it."""
        path = self.out / f"{name}.csv"
        frame.to_csv(path, index=False)
        self.files.append(path)
        return frame

    def trained(self) -> dict[str, float]:
        """Condition -> the strength it was made for: m = 1 for every intervention (its ``unit`` carries the
        method's own scale), so the report never converts strengths."""
        return dict.fromkeys(self.comparison["condition"], 1.0)


SectionBuilder = Callable[[ReportContext], "html.Section | None"]


def findings_section(ctx: ReportContext) -> html.Section | None:
    """What was found: per method, behaviour gained per unit of utility and of capability lost, with CIs."""
    items = ctx.gap.items if ctx.gap is not None else None
    table = findings.efficiency(ctx.pu.table, ctx.trained(), items, seed=ctx.settings.seed)
    ctx.table("findings", table)
    ctx.summary["findings"] = table.to_dict(orient="records")
    if table.empty:
        return None
    shown = pd.DataFrame({"condition": table["condition"]})
    columns = (
        ("d_pref", "PrefOdds gain", 2),
        ("d_util", "UtilOdds change", 2),
        ("pref_per_util", "PrefOdds per nat UtilOdds lost", 2),
        ("d_acc_pp", "accuracy change (pp)", 1),
        ("pref_per_acc_pp", "PrefOdds per pp accuracy lost", 3),
    )
    for key, title, digits in columns:
        if table[key].notna().any():
            shown[title] = [_with_ci(row, key, digits) for _, row in table.iterrows()]
    return html.Section(
        "What was found",
        paragraphs=[
            "Each method at the strength it was made for (m = 1 in the figures; prompting: the instruction "
            "alone), against the clean model, on the held-out pairs and the multiple-choice questions; 95% "
            "bootstrap CIs in brackets; PrefOdds and UtilOdds in nats per "
            "token, accuracy in percentage points (pp). A ratio is given only where the loss is significant; "
            "'–': nothing measurable was lost, or the gap did not measure this method."
        ],
        bullets=findings.headline(table),
        tables=[html.Table("", shown)],
    )


def _with_ci(row: pd.Series, key: str, digits: int) -> str:
    if math.isnan(row[key]):
        return "–"
    return f"{row[key]:+.{digits}f} [{row[f'{key}_low']:+.{digits}f}, {row[f'{key}_high']:+.{digits}f}]"


def setup_section(ctx: ReportContext) -> html.Section:
    """The model, the data, the measures and the settings of the run."""
    model, data, settings = ctx.model, ctx.data, ctx.settings
    ctx.summary |= {"settings": settings.to_json(), "data": data.name, "hook": ctx.hook}
    return html.Section(
        "Set-up",
        paragraphs=[
            f"Model {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
            f"{model.cfg.dtype}); concept {data.name!r}: {len(data.train)} training and {len(data.test)} test "
            f"pairs; steering at {ctx.hook}; {len(data.items)} multiple-choice items for capability.",
            "Preference log-odds PrefOdds = L_n - L_p and utility log-odds UtilOdds = log(P_u / (1 - P_u)) with "
            "P_u = exp(-L_p) + exp(-L_n), where L is the mean NLL per completion token (nats per token). Every "
            "intervention is swept over the strength m, where m = 1 is the strength it was made for: the median "
            "of the training grid for SFT/SPLIT and, for the others, the strength that adds DiffMean's norm per "
            "position (so that all are compared at equal added norm).",
            f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {torch.get_num_threads()} torch "
            f"threads; settings: {json.dumps(settings.to_json())}.",
        ],
        notes=[data.sae_note] if data.sae_note else [],
    )


def methods_section(ctx: ReportContext) -> html.Section:
    """Preference against utility per method (figures), the per-method table, the decay-model fits."""
    comparison, pu, name = ctx.comparison, ctx.pu, ctx.data.name
    comp = ComparisonResult(
        PreferenceUtilityResult(pu.table[pu.table["label"].isin(comparison["condition"])], "mean", 1e-6),
        comparison,
        1.0,
    )
    comp_png = ctx.figure("comparison")
    comp.plot(comp_png, title=f"{name}: preference against utility, {ctx.hook}")
    rel = pu.table
    rel_result = PreferenceUtilityResult(rel, "mean", 1e-6)
    sweep_png = ctx.figure("preference_utility")
    # panels in the table's order (DiffMean, then SFT/SPLIT by form, ...), not alphabetical
    order = {label: i for i, label in enumerate([*comparison["condition"], *rel_result.labels])}
    sweep = rel_result.summary()
    sweep = sweep.iloc[sweep["label"].map(order).argsort(kind="stable")]
    plot_preference_utility(
        sweep,
        sweep_png,
        title=f"{name}: log-odds against strength, one panel per method",
        xlabel="m (1 = the strength the method was made for)",
    )
    fits = _decay_fits(rel, rel_result.labels) if ctx.settings.decay_fit else []
    prompting = pu.table.loc[pu.table["label"] == "prompting", ["pref_odds", "util_odds"]].mean().to_frame().T
    prompting = prompting.dropna()
    columns = ["condition", "unit", "pref_odds", "d_pref", "util_odds", "d_util", "m_low", "m_high"]
    columns.append("train_s")
    shown = comparison[[c for c in columns if c in comparison]]
    ctx.table("preference_utility", pu.table)
    ctx.summary["comparison"] = comparison.to_dict(orient="records")
    return html.Section(
        "Methods compared: preference and utility",
        paragraphs=[
            "Each row of the table: the intervention at the strength it was made for (m = 1; unit: the raw "
            "strength that m = 1 stands for), mean PrefOdds and UtilOdds over the test pairs and their change "
            "from m = 0; [m_low, m_high]: the strengths around 0 where UtilOdds stays within 1 nat of its clean "
            "value; train_s: seconds to build it."
        ]
        + (
            [
                f"Prompting ({ctx.settings.instruction!r}) without steering: PrefOdds "
                f"{float(prompting['pref_odds'].iloc[0]):.3f}, UtilOdds {float(prompting['util_odds'].iloc[0]):.3f}."
            ]
            if len(prompting)
            else []
        ),
        figures=[
            html.Figure(
                comp_png,
                "Preference against utility (nats per token) along each method's sweep; star: at the strength "
                "it was made for (m = 1). "
                "Look for: stars high (preference) and far right (utility kept).",
            ),
            html.Figure(
                sweep_png,
                "PrefOdds (solid) and UtilOdds (dashed), nats per token, against m (1 = the "
                "strength each method was made for), 95% CI bands; one panel per method, shared axes. Look "
                "for: preference rising with m while utility stays near its value at m = 0.",
            ),
        ],
        tables=[
            html.Table("Per method at its trained strength (comparison.csv)", ctx.table("comparison", shown)),
            html.Table(
                "Decay-model fits (8 free parameters for 9 strengths: an R^2 near 1 is "
                "expected and is no evidence on its own; the parameters are in decay_fits.csv)",
                ctx.table("decay_fits", pd.DataFrame(fits)).iloc[:, :3],
                folded=True,
            ),
        ],
    )


def _decay_fits(rel: pd.DataFrame, labels: Sequence[str]) -> list[dict[str, Any]]:
    fits: list[dict[str, Any]] = []
    for label in labels:
        if label == "prompting":
            continue
        try:
            fit = PreferenceUtilityResult(rel[rel["label"] == label], "mean", 1e-6).fit_decay()[label]
            params = {f"{kind}_{k}": v for kind in ("pref", "util") for k, v in fit[kind].params.items()}
            fits.append({"condition": label, "R2 PrefOdds": fit["pref"].r2, "R2 UtilOdds": fit["util"].r2} | params)
        except (ValueError, RuntimeError) as exc:
            fits.append({"condition": label, "R2 PrefOdds": math.nan, "R2 UtilOdds": math.nan, "note": str(exc)})
    return fits


def manifold_section(ctx: ReportContext) -> html.Section | None:
    """Distance of the steered activations from the clean ones, with utility, per strength."""
    if ctx.manifold is None:
        return None
    png = ctx.figure("manifold")
    plot_distance_and_utility(ctx.manifold, png, xlabel="m (1 = the strength the method was made for)")
    return html.Section(
        "Distance from the clean activations (manifold probe)",
        paragraphs=[
            "Mahalanobis distance (Ledoit-Wolf) of the steered residual stream at the hook, as the "
            "percentile among held-out clean tokens (0.5 = typical clean token), with UtilOdds, per strength."
        ],
        figures=[
            html.Figure(
                png,
                "Distance percentile (left) and UtilOdds in nats per token (right) against m. "
                "Look for: whether utility falls where the distance rises.",
            )
        ],
        tables=[html.Table("Every distance per strength (manifold.csv)", ctx.table("manifold", ctx.manifold), True)],
    )


def gap_wide(ctx: ReportContext, summary: pd.DataFrame) -> pd.DataFrame:
    """The gap summary as conditions x strengths; each cell 'PrefOdds gain / accuracy change (pp)'."""
    cells: dict[str, dict[float, str]] = {}
    for (cond, m), part in summary.groupby(["condition", "m"], sort=False):
        gains = part.set_index("metric")["gain"]
        pref, acc = gains.get("pref_odds", math.nan), 100 * gains.get("capability", math.nan)
        cells.setdefault(str(cond), {})[round(float(m), 6)] = f"{pref:+.2f} / {acc:+.1f}"
    strengths = sorted({m for row in cells.values() for m in row})
    rows = [{"condition": c} | {f"m = {m:.3g}": row.get(m, "") for m in strengths} for c, row in cells.items()]
    return pd.DataFrame(rows)


def gap_section(ctx: ReportContext) -> html.Section | None:
    """The capability-behaviour gap: figure, a compact conditions x strengths table, the matched
    comparison with prompting (when there is prompting), and the long tables folded."""
    gap = ctx.gap
    if gap is None:
        return None
    png = ctx.figure("capability_gap")
    gap.plot(png, title=f"{ctx.data.name}: capability-behaviour gap")
    gsum = gap.summary()
    tests = gap.tests()
    matched = gap.matched() if "prompting" in set(gsum["condition"]) else pd.DataFrame()
    ctx.summary["gap_matched"] = matched.to_dict(orient="records")
    return html.Section(
        "Capability-behaviour gap",
        paragraphs=[
            f"Capability: accuracy on {len(ctx.data.items)} multiple-choice questions, each option scored by its "
            "likelihood. Behaviour: PrefOdds gain over no steering. Paired tests against no steering "
            "(Wilcoxon for log-odds, exact McNemar for accuracy), Bonferroni-corrected."
        ],
        figures=[
            html.Figure(
                png,
                "Behaviour gain (nats per token) against accuracy change (percentage points), 95% CIs; colour: "
                "condition, marker: strength. Look for: steering below prompting at the same behaviour gain "
                "(the gap).",
            )
        ],
        tables=[
            html.Table(
                "Per condition and strength: PrefOdds gain (nats per token) / accuracy change (pp); m = 1 is "
                "the strength each method was made for",
                gap_wide(ctx, gsum),
            ),
            html.Table("Matched to prompting's behaviour gain (gap_matched.csv)", ctx.table("gap_matched", matched)),
            html.Table("Every metric with its CI (gap_summary.csv)", ctx.table("gap_summary", gsum), True),
            html.Table("Tests against no steering (gap_tests.csv)", ctx.table("gap_tests", tests), True),
        ],
    )


def sae_section(ctx: ReportContext) -> html.Section | None:
    """How the SAE feature was chosen."""
    if ctx.ranking is None:
        return None
    measured = ctx.ranking.dropna(subset=["d_pref"])
    return html.Section(
        "Choosing the SAE feature",
        paragraphs=[
            "Input score: AUROC of the feature's activation for positive against negative completions. "
            "Output score: logit lens of its decoder direction onto the concept's tokens. d_pref: the "
            "measured PrefOdds change when the feature alone is added at DiffMean's norm."
        ],
        tables=[html.Table("Measured candidates (sae_candidates.csv)", ctx.table("sae_candidates", measured), True)],
    )


# The report's sections in reading order; each builder is independent of the others, so a new one (say,
# steered text) goes in with one line here.
SECTIONS: list[SectionBuilder] = [
    findings_section,
    setup_section,
    methods_section,
    generation_section,
    manifold_section,
    gap_section,
    sae_section,
]


def build_sections(ctx: ReportContext, builders: Sequence[SectionBuilder] = SECTIONS) -> list[html.Section]:
    """Run each builder in order; those with nothing to show (None) are left out."""
    return [section for build in builders if (section := build(ctx)) is not None]


__all__ = ["SECTIONS", "ReportContext", "SectionBuilder", "build_sections", "gap_wide"]
