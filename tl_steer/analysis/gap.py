"""The capability-behaviour gap: what a gain in behaviour costs in task accuracy, per condition and strength.

Conditions are no steering, prompting (an instruction before every prompt), steering (any intervention,
swept over m) and steering plus prompting. For each (condition, m), on the same items:

- behaviour: PrefOdds = L_n - L_p per held-out pair (and, where A/B items are given, the share of items
  where the behaviour's letter is the more probable answer; and, with ``text``, the probe judge's
  P(concept | text) of generated completions, ``text_behavior``);
- utility: UtilOdds = log(P_u / (1 - P_u)), P_u = exp(-L_p) + exp(-L_n) per pair;
- capability: multiple-choice accuracy, each option scored by its likelihood (no text parsing, so format
  failures are not counted as lost knowledge).

Each gets a mean with a percentile-bootstrap 95% CI. Every (condition, m) is tested against no steering,
paired by item: behaviour and utility with the Wilcoxon signed-rank test (effect size: paired Cohen's
d_z = mean difference / SD of differences), capability with the exact McNemar test (the binomial test on
the discordant items; effect size: the accuracy difference); p-values are Bonferroni-corrected over all
the tests of the result. :meth:`GapResult.matched` compares each steering condition with prompting at the
strength whose behaviour gain is closest to prompting's: the gap as published.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from tl_steer.analysis.ab import ab_scores
from tl_steer.analysis.capability import MCCleanPrefix, mc_accuracy
from tl_steer.analysis.plots import _pyplot, finish_figure
from tl_steer.analysis.preference_utility import preference_utility
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.ab import ABItem, check_ab_items
from tl_steer.data.mc import MCItem
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention, check_grid

if TYPE_CHECKING:
    from tl_steer.analysis.generation_sweep import TextBehavior

BASELINE = "no steering"


@dataclass(frozen=True)
class Condition:
    """One way of getting the behaviour: an intervention swept over m, an instruction, both, or neither.

    ``ms``, if given, replaces the analysis' strength grid for this condition (methods differ in scale:
    a SPLIT vector is trained for m around 11, DiffMean's unit is m = 1).
    """

    name: str
    intervention: Intervention | None = None
    instruction: str | None = None
    ms: tuple[float, ...] | None = None

    @property
    def steers(self) -> bool:
        return self.intervention is not None


def conditions_for(
    steering: dict[str, Intervention], instruction: str | None, *, with_prompting: bool = True
) -> list[Condition]:
    """The standard set: no steering, prompting with ``instruction``, each intervention, and (with
    ``with_prompting``) each intervention plus the instruction."""
    out = [Condition(BASELINE)]
    if instruction:
        out.append(Condition("prompting", instruction=instruction))
    for name, iv in steering.items():
        out.append(Condition(name, iv))
        if instruction and with_prompting:
            out.append(Condition(f"{name} + prompting", iv, instruction))
    return out


@dataclass
class GapResult:
    """Per-item scores (``items``: condition, m, metric, item, value) and their ``summary``/``tests``."""

    items: pd.DataFrame
    conditions: list[Condition]
    level: float = 0.95

    def summary(self) -> pd.DataFrame:
        """Per condition, m and metric: n, mean, CI low/high; and ``gain``, the mean minus no steering's."""
        rows = []
        base = self._values(BASELINE, 0.0)
        for (cond, m, metric), group in self.items.groupby(["condition", "m", "metric"], sort=False):
            values = group["value"].to_numpy()
            low, high = bootstrap_ci(values, level=self.level)
            ref = base.get(metric)
            gain = values.mean() - ref.mean() if ref is not None else math.nan
            rows.append(
                {"condition": cond, "m": m, "metric": metric, "n": len(values), "mean": values.mean()}
                | {"low": low, "high": high, "gain": gain}
            )
        return pd.DataFrame(rows)

    def _values(self, condition: str, m: float) -> dict[str, np.ndarray]:
        part = self.items[(self.items["condition"] == condition) & (self.items["m"] == m)]
        return {k: g.sort_values("item")["value"].to_numpy() for k, g in part.groupby("metric")}

    def tests(self) -> pd.DataFrame:
        """Every (condition, m) other than no steering against no steering, paired by item, per metric:
        the test, its statistic, raw and Bonferroni-corrected p-value, effect size, and significance."""
        base = self._values(BASELINE, 0.0)
        rows = []
        for (cond, m), _ in self.items.groupby(["condition", "m"], sort=False):
            if cond == BASELINE:
                continue
            values = self._values(cond, m)
            for metric, x in values.items():
                if metric in base:
                    rows.append({"condition": cond, "m": m, "metric": metric, **paired_test(metric, x, base[metric])})
        table = pd.DataFrame(rows)
        if not table.empty:
            table["p_bonferroni"] = np.minimum(table["p"] * len(table), 1.0)
            table["significant"] = table["p_bonferroni"] < 1 - self.level
        return table

    def matched(self, reference: str = "prompting", metric: str = "pref_odds") -> pd.DataFrame:
        """Each steering condition at the m whose mean ``metric`` gain is closest to ``reference``'s gain,
        beside the reference: behaviour gain, capability change (accuracy minus no steering's) with its
        McNemar p-value against the reference (uncorrected; one test per row), and utility change."""
        summary = self.summary()
        ref_rows = summary[(summary["condition"] == reference) & (summary["metric"] == metric)]
        if ref_rows.empty:
            raise ConfigError(f"no condition {reference!r} with metric {metric!r} to match against")
        target = float(ref_rows["gain"].iloc[0])
        ref_m = float(ref_rows["m"].iloc[0])
        ref_values = self._values(reference, ref_m)
        rows = []
        for cond in self.conditions:
            if not cond.steers:
                continue
            part = summary[(summary["condition"] == cond.name) & (summary["metric"] == metric) & (summary["m"] != 0)]
            if part.empty:
                continue
            best = part.loc[(part["gain"] - target).abs().idxmin()]
            values = self._values(cond.name, float(best["m"]))
            row = {"condition": cond.name, "m": float(best["m"]), "behaviour_gain": float(best["gain"])}
            row["reference_gain"] = target
            for key in ("capability", "util_odds"):
                if key in values:
                    pick = summary[
                        (summary["condition"] == cond.name) & (summary["m"] == best["m"]) & (summary["metric"] == key)
                    ]
                    ref_pick = summary[
                        (summary["condition"] == reference) & (summary["m"] == ref_m) & (summary["metric"] == key)
                    ]
                    row[f"{key}_change"] = float(pick["gain"].iloc[0])
                    row[f"{key}_change_reference"] = float(ref_pick["gain"].iloc[0])
                    row[f"{key}_p_vs_reference"] = paired_test(key, values[key], ref_values[key])["p"]
            rows.append(row)
        return pd.DataFrame(rows)

    def to_csv(self, path: str | Path, summary: bool = False) -> Path:
        """Write the per-item table (or, with ``summary=True``, :meth:`summary`) as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.summary() if summary else self.items).to_csv(path, index=False)
        return path

    def plot(
        self,
        path: str | Path | None = None,
        *,
        metric: str = "pref_odds",
        title: str | None = None,
        strength: Callable[[str, float], float] | None = None,
    ) -> Any:
        """Behaviour gain (x) against capability change (y), one line per steering condition across m,
        one point per non-steering condition, 95% CIs as error bars: up and right is better. Colour tells
        the condition, the marker the strength (``strength(condition, m)`` converts m for the legend, e.g.
        into units of the condition's trained strength); points carry no text, so nothing overlaps. When
        behaviour was also measured on generated text (``text_behavior``), a second panel shows it."""
        plt = _pyplot()
        summary = self.summary()
        # behaviour from generated text (``text_behavior``), when measured, gets a panel beside PrefOdds
        metrics = [metric]
        if metric == "pref_odds" and "text_behavior" in set(summary["metric"]):
            metrics.append("text_behavior")
        width = 9.2 + 5.2 * (len(metrics) - 1)
        fig, axes = plt.subplots(1, len(metrics), figsize=(width, 5.4), dpi=120, squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        convert = strength or (lambda _name, m: m)
        shown = {
            round(convert(c.name, float(m)), 6)
            for c in self.conditions
            if c.steers
            for m in summary.loc[summary["condition"] == c.name, "m"]
        }
        # one marker per strength when there are few distinct strengths; else by rank within the condition
        by_value = len(shown) <= len(_MARKERS)
        values = sorted(shown)
        for panel, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
            condition_handles, strengths_used = [], set()
            for i, cond in enumerate(self.conditions):
                part = summary[summary["condition"] == cond.name]
                x = part[part["metric"] == metric].set_index("m")
                y = part[part["metric"] == "capability"].set_index("m")
                if x.empty or y.empty:
                    continue
                ms = sorted(set(x.index) & set(y.index))
                x, y = x.loc[ms], y.loc[ms]
                color = colors[i % len(colors)]
                ax.errorbar(
                    x["gain"],
                    100 * y["gain"],
                    xerr=[x["mean"] - x["low"], x["high"] - x["mean"]],
                    yerr=[100 * (y["mean"] - y["low"]), 100 * (y["high"] - y["mean"])],
                    fmt="-" if cond.steers else "none",
                    lw=1,
                    elinewidth=0.8,
                    capsize=2,
                    alpha=0.85,
                    color=color,
                )
                for k, (m, gx, gy) in enumerate(zip(ms, x["gain"], y["gain"], strict=True)):
                    if cond.steers:
                        key = values.index(round(convert(cond.name, float(m)), 6)) if by_value else k
                        marker = _MARKERS[key % len(_MARKERS)]
                        strengths_used.add(key)
                    else:
                        marker = "s"
                    ax.plot(gx, 100 * gy, marker, ms=6, color=color, mec="black", mew=0.4, zorder=3)
                condition_handles.append(
                    plt.Line2D([], [], color=color, marker="s" if not cond.steers else None, label=cond.name)
                )
            ax.axhline(0, color="grey", lw=0.6)
            ax.axvline(0, color="grey", lw=0.6)
            unit = _BEHAVIOUR_UNITS.get(metric, f"{metric} gain")
            ax.set_xlabel(f"behaviour: {unit} over no steering")
            ax.set_ylabel("capability: accuracy change (percentage points)")
            if panel == 0:
                ax.set_title(title or "Capability-behaviour gap: what each behaviour gain costs in accuracy")
            if panel < len(metrics) - 1:
                continue
            strength_handles = [
                plt.Line2D(
                    [],
                    [],
                    ls="none",
                    marker=_MARKERS[k % len(_MARKERS)],
                    color="grey",
                    mec="black",
                    mew=0.4,
                    label=f"m = {values[k]:.3g}" if by_value else f"strength {k + 1} (of the condition's, rising)",
                )
                for k in sorted(strengths_used)
            ]
            # one legend outside the axes (two would not both count in the layout): conditions, then strengths
            ax.legend(
                handles=condition_handles + strength_handles,
                title="colour: condition\nmarker: strength",
                fontsize=7,
                title_fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
            )
        return finish_figure(
            fig,
            path,
            "Lines: steering across strengths m (marker: strength); squares: prompting and no steering. Bars: 95% "
            "bootstrap CIs.\nLook for: steering points below prompting's at the same behaviour gain (the gap).",
            bottom=0.07,
        )


# The x axis of the gap figure per behaviour metric.
_BEHAVIOUR_UNITS = {
    "pref_odds": "PrefOdds gain (nats per token)",
    "text_behavior": "generated text: P(concept | text) gain (probe judge)",
}

# Markers for the strengths of the gap figure, in increasing order of strength.
_MARKERS = ("o", "^", "D", "v", "P", "X")


def paired_test(metric: str, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """A paired test of ``x`` against ``y`` (same items, same order).

    Capability (0/1 per item): exact McNemar, i.e. a two-sided binomial test of the discordant items,
    effect = accuracy difference. Anything else: Wilcoxon signed-rank, effect = d_z = mean(x - y) / sd(x - y).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ConfigError(f"paired test needs the same items on both sides, got {x.shape} and {y.shape}")
    if metric in ("capability", "ab_accuracy"):
        gained = int(((x == 1) & (y == 0)).sum())
        lost = int(((x == 0) & (y == 1)).sum())
        p = stats.binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
        return {
            "test": "mcnemar_exact",
            "statistic": float(gained - lost),
            "p": float(p),
            "effect": x.mean() - y.mean(),
        }
    diff = x - y
    if np.allclose(diff, 0):
        return {"test": "wilcoxon", "statistic": 0.0, "p": 1.0, "effect": 0.0}
    res = stats.wilcoxon(x, y)
    sd = diff.std(ddof=1)
    return {
        "test": "wilcoxon",
        "statistic": float(res.statistic),
        "p": float(res.pvalue),
        "effect": float(diff.mean() / sd) if sd > 0 else math.inf * np.sign(diff.mean()),
    }


def _with_instruction_ab(items: Sequence[ABItem], instruction: str | None) -> list[ABItem]:
    if not instruction:
        return list(items)
    return [dataclasses.replace(it, question=f"{instruction}\n{it.question}") for it in items]


def capability_behavior_gap(
    model: Host,
    conditions: Sequence[Condition],
    behavior_pairs: Sequence[ContrastivePair],
    capability_items: Sequence[MCItem],
    ms: Sequence[float] = (0.0, 1.0, 2.0, 4.0),
    *,
    ab_items: Sequence[ABItem] | None = None,
    text: TextBehavior | None = None,
    batch_size: int = 16,
    level: float = 0.95,
    include_baseline: bool = True,
    include_zero: bool = True,
    progress: bool = True,
    clean_prefix: MCCleanPrefix | None = None,
    sweeps: Mapping[str, pd.DataFrame] | None = None,
) -> GapResult:
    """Behaviour, utility and capability of every condition (steering ones at every m of ``ms``, the
    others at m = 0) on the same items; see the module docstring. A condition named "no steering"
    (no intervention, no instruction) is added if missing: it is the reference of every test.

    ``include_baseline=False`` leaves it out, and ``include_zero=False`` the m = 0 point of the steering
    conditions (for computing conditions in parts and joining their ``items`` tables; the tests need the
    baseline back in the joined result).

    ``text`` (a :class:`~tl_steer.analysis.generation_sweep.TextBehavior`) adds behaviour measured on generated
    text, as the feature-steering gap study measures it: metric ``text_behavior``, the probe judge's
    P(concept | text) of a greedy completion of each of its prompts, beside PrefOdds.

    The multiple-choice items are scored with the clean blocks before the interventions computed once for
    all conditions and strengths (a :class:`~tl_steer.analysis.capability.MCCleanPrefix` starting at the
    earliest :func:`~tl_steer.analysis.capability.restart_layer` of any condition); pass ``clean_prefix`` to
    share one across calls on the same items.

    ``sweeps`` holds per-pair preference-utility tables already computed on ``behavior_pairs`` (a
    :class:`~tl_steer.PreferenceUtilityResult`'s ``table``, by condition name, with the same instruction):
    behaviour and utility at the strengths they hold are taken from them instead of scored again."""
    pairs = check_pairs(behavior_pairs)
    items = list(capability_items)
    if not items:
        raise ConfigError("capability_items is empty; give multiple-choice items (e.g. load_mc_items())")
    for i, it in enumerate(items):
        if not isinstance(it, MCItem):
            raise ConfigError(f"capability_items[{i}] is a {type(it).__name__}, not an MCItem")
    ab = check_ab_items(ab_items) if ab_items is not None else None
    if text is not None:
        from tl_steer.analysis.generation_sweep import TextBehavior

        if not isinstance(text, TextBehavior):
            raise ConfigError(f"text must be a TextBehavior, got {type(text).__name__}")
        text.check(model)
    grid = sorted(set(check_grid(ms)) | {0.0})
    conds = list(conditions)
    if not conds and not include_baseline:
        raise ConfigError("no conditions to evaluate")
    names = [c.name for c in conds]
    if len(set(names)) != len(names):
        raise ConfigError(f"condition names repeat: {names}")
    if BASELINE not in names and include_baseline:
        conds.insert(0, Condition(BASELINE))
    elif any(c.name == BASELINE and (c.steers or c.instruction) for c in conds):
        raise ConfigError(f"the condition named {BASELINE!r} must have no intervention and no instruction")
    grids: dict[str, list[float]] = {}
    for c in conds:
        if c.intervention is not None:
            c.intervention.check(model)
        own = grid if c.ms is None else sorted(set(check_grid(c.ms, name=f"{c.name}.ms")) | {0.0})
        if not include_zero:
            own = [m for m in own if m != 0.0]
        grids[c.name] = own if c.steers else [0.0]
    if clean_prefix is None:
        clean_prefix = MCCleanPrefix.for_interventions(model, [c.intervention for c in conds])
    frames = []
    jobs = [(c, m) for c in conds for m in grids[c.name]]
    bar = tqdm(jobs, desc="capability-behaviour gap", disable=not progress)
    for c in conds:  # tables given for a condition must hold every behaviour pair at each m they hold
        given = (sweeps or {}).get(c.name)
        if given is None:
            continue
        for m in grids[c.name]:
            n_given = int((given["m"] == m).sum())
            if n_given not in (0, len(pairs)):
                raise ConfigError(
                    f"sweeps[{c.name!r}] has {n_given} rows at m = {m:g}, not one per behaviour pair ({len(pairs)})"
                )
    own_sweeps: dict[str, pd.DataFrame] = {}
    for c in conds:  # one cached-prefix sweep per condition gives behaviour and utility at every m
        given = (sweeps or {}).get(c.name)
        todo = grids[c.name] if given is None else [m for m in grids[c.name] if not (given["m"] == m).any()]
        parts = [] if given is None else [given[given["m"].isin(grids[c.name])]]
        if todo:
            with warnings.catch_warnings():
                # without m = 0 (include_zero=False) the reference is the separate no-steering condition
                warnings.filterwarnings("ignore", message="the strength grid has no m = 0")
                parts.append(
                    preference_utility(
                        model,
                        c.intervention,
                        pairs,
                        todo,
                        label=c.name,
                        instruction=c.instruction,
                        batch_size=batch_size,
                        progress=False,
                    ).table
                )
        own_sweeps[c.name] = pd.concat(parts, ignore_index=True)
    for c, m in bar:
        bar.set_postfix_str(f"{c.name}, m={m:g}")
        ivs = [c.intervention] if c.intervention is not None and m != 0 else []
        sweep = own_sweeps[c.name][own_sweeps[c.name]["m"] == m].sort_values("pair")
        metrics = {
            "pref_odds": sweep["pref_odds"].to_numpy(),
            "util_odds": sweep["util_odds"].to_numpy(),
            "capability": mc_accuracy(
                model,
                items,
                interventions=ivs,
                m=m,
                instruction=c.instruction,
                batch_size=batch_size,
                clean_prefix=clean_prefix,
            )
            .correct.numpy()
            .astype(np.float64),
        }
        if ab is not None:
            scores = ab_scores(model, ivs or None, _with_instruction_ab(ab, c.instruction), m=m, batch_size=batch_size)
            metrics["ab_accuracy"] = (scores > 0).numpy().astype(np.float64)
        if text is not None:
            metrics["text_behavior"] = text.scores(model, c, m)
        for metric, values in metrics.items():
            frames.append(
                pd.DataFrame(
                    {"condition": c.name, "m": m, "metric": metric, "item": np.arange(len(values)), "value": values}
                )
            )
    return GapResult(pd.concat(frames, ignore_index=True), conds, level)
