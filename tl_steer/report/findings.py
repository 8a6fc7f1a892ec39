"""What the report found, in numbers: per method, the behaviour it gained at its trained strength and what
that cost in utility and in capability, with bootstrap CIs, from the tables the run already has.

For a condition at its trained strength m_t, over the held-out pairs i and the multiple-choice items j:

    dPref = mean_i (PrefOdds_i(m_t) - PrefOdds_i(0))         behaviour gained (nats per token)
    dUtil = mean_i (UtilOdds_i(m_t) - UtilOdds_i(0))         utility change (nats per token)
    dAcc  = 100 * mean_j (correct_j(m_t) - correct_j(none))  capability change (percentage points)
    dPref / (-dUtil),  dPref / (-dAcc)                       behaviour per unit of utility / capability lost

Each mean and ratio gets a percentile-bootstrap CI: pairs and items are resampled (independently of each
other, the same resample for numerator and denominator). A ratio is given only where the loss is
significant (its CI excludes 0): without a loss there is nothing to divide by, and the method gained its
behaviour for free. The measures are defined in docs/methods.md, sections "Preference and utility" and
"Capability, A/B behaviour and the gap statistics".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from tl_steer.analysis.gap import BASELINE

N_RESAMPLES = 2000


def _paired(table: pd.DataFrame, label: str, m: float, column: str) -> np.ndarray | None:
    """Per pair, ``column`` at the grid point nearest ``m`` minus at m = 0 (None if either is missing).
    A label measured at m = 0 only (prompting) is compared with the clean model: the m = 0 rows of the
    first swept label."""
    part = table[table["label"] == label]
    grid = part["m"].unique()
    if part.empty or 0.0 not in grid:
        return None
    nearest = float(grid[np.abs(grid - m).argmin()])
    at = part[part["m"] == nearest].sort_values("pair")[column].to_numpy(np.float64)
    if len(grid) == 1:
        swept = [k for k, g in table.groupby("label", sort=False) if g["m"].nunique() > 1 and 0.0 in set(g["m"])]
        if not swept:
            return None
        part = table[table["label"] == swept[0]]
    zero = part[part["m"] == 0.0].sort_values("pair")[column].to_numpy(np.float64)
    return at - zero if at.shape == zero.shape else None


def _capability(items: pd.DataFrame | None, condition: str, m: float) -> np.ndarray | None:
    """Per multiple-choice item, correct at the gap's strength nearest ``m`` minus correct without steering."""
    if items is None:
        return None
    cap = items[items["metric"] == "capability"]
    part = cap[cap["condition"] == condition]
    base = cap[cap["condition"] == BASELINE].sort_values("item")["value"].to_numpy(np.float64)
    if part.empty or base.size == 0:
        return None
    grid = part["m"].unique()
    nearest = float(grid[np.abs(grid - m).argmin()])
    if not math.isclose(nearest, m, rel_tol=1e-6, abs_tol=1e-12):
        return None  # the gap has no point at the trained strength: no number rather than a neighbour's
    at = part[part["m"] == nearest].sort_values("item")["value"].to_numpy(np.float64)
    return at - base if at.shape == base.shape else None


def _ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _resampled_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    index = rng.integers(0, len(values), size=(N_RESAMPLES, len(values)))
    return values[index].mean(axis=1)


def efficiency(
    pairs_table: pd.DataFrame,
    trained: Mapping[str, float],
    gap_items: pd.DataFrame | None = None,
    *,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per condition of ``trained`` (name -> trained strength m_t), then one per condition measured
    without steering (prompting, at m = 0, against the clean model): dPref, dUtil, dAcc and the two
    ratios of the module docstring, each with ``_low``/``_high`` CI columns (NaN where not measured or,
    for a ratio, where the loss is not significant).

    ``pairs_table``: per-pair PrefOdds/UtilOdds (columns label, m, pair, pref_odds, util_odds), every label
    swept through m = 0; ``gap_items``: the gap's per-item scores (condition, m, metric, item, value).
    """
    rng = np.random.default_rng(seed)
    rows = []
    unsteered = [k for k, g in pairs_table.groupby("label", sort=False) if set(g["m"]) == {0.0} and k not in trained]
    for name, m_t in {**trained, **dict.fromkeys(unsteered, 0.0)}.items():
        d_pref = _paired(pairs_table, name, m_t, "pref_odds")
        d_util = _paired(pairs_table, name, m_t, "util_odds")
        if d_pref is None or d_util is None or d_pref.size < 2:
            continue
        # the same resampled pairs for both: the ratio's CI keeps their correlation
        index = rng.integers(0, len(d_pref), size=(N_RESAMPLES, len(d_pref)))
        pref_b, util_b = d_pref[index].mean(axis=1), d_util[index].mean(axis=1)
        row: dict[str, float | str] = {"condition": name, "m": float(m_t)}
        row |= _with_ci("d_pref", d_pref.mean(), pref_b, level)
        row |= _with_ci("d_util", d_util.mean(), util_b, level)
        row |= _ratio("pref_per_util", d_pref.mean(), pref_b, d_util.mean(), util_b, level)
        d_acc = _capability(gap_items, name, m_t)
        if d_acc is not None and d_acc.size >= 2:
            acc_b = 100 * _resampled_means(d_acc, rng)
            row |= _with_ci("d_acc_pp", 100 * d_acc.mean(), acc_b, level)
            row |= _ratio("pref_per_acc_pp", d_pref.mean(), pref_b, 100 * d_acc.mean(), acc_b, level)
        rows.append(row)
    columns = ["condition", "m"] + [
        f"{k}{s}"
        for k in ("d_pref", "d_util", "pref_per_util", "d_acc_pp", "pref_per_acc_pp")
        for s in ("", "_low", "_high")
    ]
    return pd.DataFrame(rows).reindex(columns=columns)


def _with_ci(name: str, value: float, samples: np.ndarray, level: float) -> dict[str, float]:
    low, high = _ci(samples, level)
    return {name: float(value), f"{name}_low": low, f"{name}_high": high}


def _ratio(
    name: str, gain: float, gain_b: np.ndarray, change: float, change_b: np.ndarray, level: float
) -> dict[str, float]:
    """gain / (-change) with its CI where the loss (-change) is significant, else NaN."""
    _, high = _ci(change_b, level)
    if not high < 0:
        return {name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan}
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = gain_b / -change_b
    return _with_ci(name, gain / -change, samples, level)


def _fmt(row: pd.Series, key: str, digits: int = 2, unit: str = "") -> str:
    return f"{row[key]:+.{digits}f}{unit} [{row[f'{key}_low']:+.{digits}f}, {row[f'{key}_high']:+.{digits}f}]"


def headline(table: pd.DataFrame) -> list[str]:
    """Three sentences with numbers: the largest behaviour gain; per unit of utility lost; per percentage
    point of accuracy lost (each naming the methods that lost nothing measurable)."""
    if table.empty:
        return []
    lines = []
    best = table.loc[table["d_pref"].idxmax()]
    lines.append(
        f"Largest behaviour gain (each method at m = 1, its trained strength): {best['condition']}, PrefOdds "
        f"{_fmt(best, 'd_pref')} nats per token (95% CI), with UtilOdds {_fmt(best, 'd_util')}."
    )
    for key, change, what, unit, short in (
        ("pref_per_util", "d_util", "utility", "nat of UtilOdds", "nat"),
        ("pref_per_acc_pp", "d_acc_pp", "accuracy", "percentage point of accuracy", "point"),
    ):
        measured = table.dropna(subset=[change])
        if measured.empty:
            continue
        # methods that gained behaviour (CI above 0) and lost nothing measurable
        free = measured[(measured[f"{change}_high"] >= 0) & (measured["d_pref_low"] > 0)]
        free = free.sort_values("d_pref", ascending=False)
        costly = measured.dropna(subset=[key])
        parts = []
        if not free.empty:
            names = ", ".join(f"{r['condition']} ({r['d_pref']:+.2f})" for _, r in free.iterrows())
            parts.append(
                f"Gained behaviour with no measurable loss of {what} (CI of the change reaches 0), by PrefOdds "
                f"gain: {names}."
            )
        if not costly.empty:
            top = costly.loc[costly[key].idxmax()]
            # the ranking is only as sharp as the CIs: name the others whose CI reaches the top's
            close = costly[(costly["condition"] != top["condition"]) & (costly[f"{key}_high"] >= top[f"{key}_low"])]
            tie = f" (CIs overlap with {', '.join(close['condition'])})" if len(close) else ""
            parts.append(
                f"Of those that lost {what}, most behaviour per {unit} lost: {top['condition']}, "
                f"{_fmt(top, key)} nats of PrefOdds per {short} lost{tie}."
            )
        if parts:
            lines.append(" ".join(parts))
    return lines


__all__ = ["efficiency", "headline"]
