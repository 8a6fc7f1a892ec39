"""Figures of the analyses (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_figure(fig: Any, path: str | Path | None, caption: str, *, bottom: float = 0.07, top: float = 1.0) -> Any:
    """Put ``caption`` (what the figure shows and what to look for) under the axes, lay the figure out, and
    save it as ``path`` (closing it) when a path is given; return the figure."""
    fig.text(0.01, 0.01, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, bottom, 1, top))
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        _pyplot().close(fig)
    return fig


def plot_preference_utility(
    summary: pd.DataFrame,
    path: str | Path | None = None,
    *,
    fits: dict[str, dict[str, Any]] | None = None,
    reduction: str = "mean",
    title: str | None = None,
) -> Any:
    """PrefOdds (solid) and UtilOdds (dashed) against m with 95% CI bands, one colour per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    unit = "nats per token" if reduction == "mean" else "nats"
    for i, label in enumerate(dict.fromkeys(summary["label"])):
        part = summary[summary["label"] == label].sort_values("m")
        color = colors[i % len(colors)]
        m = part["m"].to_numpy()
        for col, style, name in (("pref_odds", "-", "PrefOdds"), ("util_odds", "--", "UtilOdds")):
            ax.plot(m, part[col], style, marker="o", ms=3, color=color, label=f"{label}: {name}")
            ax.fill_between(m, part[f"{col}_low"], part[f"{col}_high"], color=color, alpha=0.12, lw=0)
        if fits and label in fits:
            grid = np.linspace(m.min(), m.max(), 200)
            for key, name in (("pref", "PrefOdds"), ("util", "UtilOdds")):
                fit = fits[label][key]
                ax.plot(grid, fit(grid), ":", color=color, lw=1.2, label=f"{label}: {name} fit (R²={fit.r2:.2f})")
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("steering strength m")
    ax.set_ylabel(f"log-odds ({unit})")
    ax.set_title(title or "Preference and utility log-odds against steering strength")
    ax.legend(fontsize=7, loc="best", ncol=2 if fits else 1)
    return finish_figure(
        fig,
        path,
        "Solid: PrefOdds = L_n - L_p (higher = concept preferred). Dashed: UtilOdds = log(P_u / (1 - P_u)), "
        "P_u = e^-L_p + e^-L_n.\nBands: 95% bootstrap CI over pairs. Look for: preference rising with m while "
        "utility falls away from m = 0.",
    )
