"""Methods side by side on the preference-utility axes, each at the strength it was made for.

Every intervention is swept over the same strengths ``ms``; since ``m = 1`` is the strength each was made
for (its ``unit``: the median of the training grid for SFT and SPLIT, the scale to DiffMean's norm for
COLD, 1 for DiffMean; see :mod:`tl_steer.interventions`), the same m means the same thing for every
method. The table then reports, per condition:

- its ``unit`` (the raw strength at m = 1, for reference);
- PrefOdds and UtilOdds (means over pairs, with 95% bootstrap CIs) at ``m = 1``, and their change from
  m = 0;
- the strength range around 0 where mean UtilOdds stays within ``within`` (default 1) nat of its m = 0
  value (:meth:`PreferenceUtilityResult.utility_range`).

:func:`compare_methods` trains DiffMean, SFT and SPLIT in the three forms on one set of pairs and compares
them on another: the table of the SPLIT paper, measured on any model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tl_steer.analysis.plots import _pyplot, finish_figure
from tl_steer.analysis.preference_utility import PreferenceUtilityResult, preference_utility
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention
from tl_steer.methods.diffmean import diffmean
from tl_steer.methods.split import FORMS, sft, split

DEFAULT_MS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
OBJECTIVES = ("sft", "split")


def _grid(ms: Sequence[float], relative: Sequence[float] | None) -> list[float]:
    """The sorted strengths, from ``ms`` or the deprecated alias ``relative`` (which meant m / m_trained,
    now simply m); they must include 0 and 1."""
    if relative is not None:
        message = "relative= is deprecated: m = 1 is now each intervention's own strength; pass ms="
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        ms = relative
    grid = sorted({float(m) for m in ms})
    if 0.0 not in grid or 1.0 not in grid:
        raise ConfigError(f"the strengths ms must include 0 and 1 (m = 0 and the strength made for), got {list(ms)}")
    return grid


@dataclass
class ComparisonResult:
    """The sweeps of every condition and the one-row-per-condition table.

    ``sweeps`` holds the per-pair log-odds at every strength (labels are the condition names);
    ``table`` has, per condition: method, unit (the raw strength at m = 1), pref_odds (+ _low/_high)
    and util_odds (+ _low/_high) at m = 1, d_pref and d_util (change from m = 0), m_low / m_high (the
    utility range), train_s (seconds spent building the intervention, if known).
    """

    sweeps: PreferenceUtilityResult
    table: pd.DataFrame
    within: float

    def summary(self) -> pd.DataFrame:
        """The one-row-per-condition table (a copy)."""
        return self.table.copy()

    def to_csv(self, path: str | Path, summary: bool = True) -> Path:
        """Write the one-row-per-condition table (or, with ``summary=False``, the per-pair sweeps) as CSV."""
        if not summary:
            return self.sweeps.to_csv(path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(path, index=False)
        return path

    def to_markdown(self, digits: int = 3) -> str:
        """The table as markdown: PrefOdds and UtilOdds as 'mean [CI]', the utility range in units of m."""
        header = (
            "| condition | unit | PrefOdds at m = 1 [95% CI] | dPref | UtilOdds [95% CI] | dUtil "
            f"| m where UtilOdds within {self.within:g} of m = 0 |"
        )
        lines = [header, "|---|---:|---|---:|---|---:|---|"]
        f = f".{digits}f"
        for r in self.table.itertuples():
            lines.append(
                f"| {r.condition} | {r.unit:.4g} "
                f"| {r.pref_odds:{f}} [{r.pref_odds_low:{f}}, {r.pref_odds_high:{f}}] "
                f"| {r.d_pref:+{f}} | {r.util_odds:{f}} [{r.util_odds_low:{f}}, {r.util_odds_high:{f}}] "
                f"| {r.d_util:+{f}} | [{r.m_low:g}, {r.m_high:g}] |"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """PrefOdds against UtilOdds along each condition's sweep (one line per condition, marker size
        growing with |m|, a star at m = 1): up is more preference, right is more utility."""
        plt = _pyplot()
        summary = self.sweeps.summary()
        fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=120)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, row in enumerate(self.table.itertuples()):
            part = summary[summary["label"] == row.condition].sort_values("m")
            part = part[part["m"] >= 0]
            color = colors[i % len(colors)]
            ax.plot(part["util_odds"], part["pref_odds"], "-o", ms=3, color=color, lw=1, label=row.condition)
            ax.plot(row.util_odds, row.pref_odds, "*", ms=12, color=color, mec="black", mew=0.5)
        clean = summary[summary["m"] == 0]
        ax.plot(clean["util_odds"].mean(), clean["pref_odds"].mean(), "kX", ms=9, label="clean (m = 0)")
        ax.set_xlabel("UtilOdds (nats per token; right = completions more likely)")
        ax.set_ylabel("PrefOdds (nats per token; up = concept preferred)")
        ax.set_title(title or "Preference against utility as the strength grows from m = 0")
        ax.legend(fontsize=7, loc="best")
        return finish_figure(
            fig,
            path,
            "Each line: one method's sweep over its strengths m >= 0; star: at m = 1, the strength it was made for. "
            "Look for: stars up (more preference) without moving left (lost utility).",
            bottom=0.05,
        )


def compare_interventions(
    model: Host,
    interventions: Mapping[str, Intervention],
    pairs: Sequence[ContrastivePair],
    *,
    ms: Sequence[float] = DEFAULT_MS,
    within: float = 1.0,
    train_seconds: Mapping[str, float] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    relative: Sequence[float] | None = None,
) -> ComparisonResult:
    """Sweep each named intervention over the strengths ``ms`` on ``pairs`` and tabulate it at ``m = 1``,
    the strength it was made for (see the module docstring). ``ms`` must contain 0 and 1; ``relative``
    is a deprecated alias of ``ms``."""
    items = check_pairs(pairs)
    if not interventions:
        raise ConfigError("no interventions to compare; give a mapping of condition name -> intervention")
    grid = _grid(ms, relative)
    if not within > 0:
        raise ConfigError(f"within must be positive, got {within}")
    for iv in interventions.values():
        iv.check(model)
    sweeps = []
    for name, iv in interventions.items():
        sweeps.append(preference_utility(model, iv, items, grid, label=name, batch_size=batch_size, progress=progress))
    result = PreferenceUtilityResult.concat(sweeps)
    return ComparisonResult(result, tabulate_comparison(result, interventions, within, train_seconds), within)


def tabulate_comparison(
    sweeps: PreferenceUtilityResult,
    interventions: Mapping[str, Intervention],
    within: float = 1.0,
    train_seconds: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """The one-row-per-condition table of :class:`ComparisonResult` from sweeps already computed (labels
    are the condition names; each sweep must include m = 0 and m = 1)."""
    summary = sweeps.summary()
    ranges = sweeps.utility_range(within).set_index("label")
    rows = []
    for name, iv in interventions.items():
        part = summary[summary["label"] == name]
        if part.empty:
            raise ConfigError(f"no sweep for condition {name!r}")
        at = part.loc[(part["m"] - 1.0).abs().idxmin()]
        zero = part.loc[part["m"].abs().idxmin()]
        rng = ranges.loc[name]
        rows.append(
            {
                "condition": name,
                "method": iv.method,
                "unit": iv.unit,
                **{k: float(at[k]) for k in ("pref_odds", "pref_odds_low", "pref_odds_high")},
                **{k: float(at[k]) for k in ("util_odds", "util_odds_low", "util_odds_high")},
                "d_pref": float(at["pref_odds"] - zero["pref_odds"]),
                "d_util": float(at["util_odds"] - zero["util_odds"]),
                "m_low": float(rng["m_low"]),
                "m_high": float(rng["m_high"]),
                "train_s": (train_seconds or {}).get(name, float("nan")),
            }
        )
    return pd.DataFrame(rows)


def compare_methods(
    model: Host,
    train_pairs: Sequence[ContrastivePair],
    test_pairs: Sequence[ContrastivePair],
    layer: int,
    *,
    forms: Sequence[str] = FORMS,
    objectives: Sequence[str] = OBJECTIVES,
    diffmean_baseline: bool = True,
    split_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    ms: Sequence[float] = DEFAULT_MS,
    within: float = 1.0,
    progress: bool = True,
    relative: Sequence[float] | None = None,
) -> ComparisonResult:
    """Train DiffMean (at ``blocks.{layer}.hook_resid_post``), and SFT and SPLIT in every form of ``forms``
    at ``layer`` on ``train_pairs``; compare them on ``test_pairs`` with :func:`compare_interventions`.

    ``train_kwargs`` go to both trainers (epochs, batch_size, seed, ...); ``split_kwargs`` to SPLIT only
    (lambda_n, gamma, theta). Condition names are "diffmean", "sft/<form>" and "split/<form>".
    ``relative`` is a deprecated alias of ``ms``.
    """
    grid = _grid(ms, relative)
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ConfigError(f"unknown form(s) {bad or list(forms)}; valid forms: {', '.join(FORMS)}")
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        raise ConfigError(f"unknown objective(s) {bad}; valid objectives: {', '.join(OBJECTIVES)}")
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ConfigError(f"layer must be an integer in [0, {model.cfg.n_layers - 1}], got {layer!r}")
    train, test = check_pairs(train_pairs), check_pairs(test_pairs)
    common = {"progress": progress, **(train_kwargs or {})}
    interventions: dict[str, Intervention] = {}
    seconds: dict[str, float] = {}
    if diffmean_baseline:
        start = time.perf_counter()
        interventions["diffmean"] = diffmean(model, train, f"blocks.{layer}.hook_resid_post")
        seconds["diffmean"] = time.perf_counter() - start
    for form in forms:
        for objective in objectives:
            start = time.perf_counter()
            if objective == "sft":
                iv, _ = sft(model, train, layer, form, **common)  # type: ignore[arg-type]
            else:
                iv, _ = split(model, train, layer, form, **common, **(split_kwargs or {}))  # type: ignore[arg-type]
            interventions[f"{objective}/{form}"] = iv
            seconds[f"{objective}/{form}"] = time.perf_counter() - start
    return compare_interventions(
        model, interventions, test, ms=grid, within=within, train_seconds=seconds, progress=progress
    )
