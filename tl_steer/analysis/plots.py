"""Figures of the analyses (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import textwrap
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
    """Put ``caption`` (what the figure shows and what to look for) under the axes, wrapped to the figure's
    width, lay the figure out (leaving at least ``bottom`` of the height for the caption), and save it as
    ``path`` (closing it) when a path is given; return the figure."""
    width = max(40, int(fig.get_figwidth() * 72 / (7 * 0.56)))  # characters of 7 pt text across the figure
    lines = [wrapped for line in caption.split("\n") for wrapped in textwrap.wrap(line, width) or [""]]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom")
    bottom = max(bottom, (len(lines) * 8.5 + 8) / (fig.get_figheight() * 72))
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
    xlabel: str = "steering strength m",
    columns: int = 4,
) -> Any:
    """PrefOdds (solid) and UtilOdds (dashed) against m with 95% CI bands: one panel per label, shared axes.

    A label measured at one strength only (prompting: m = 0) has no curve; it is drawn as horizontal
    reference lines in every panel instead.
    """
    plt = _pyplot()
    labels = list(dict.fromkeys(summary["label"]))
    swept = [label for label in labels if summary.loc[summary["label"] == label, "m"].nunique() > 1]
    references = [label for label in labels if label not in swept]
    panels = swept or labels
    nrows = -(-len(panels) // columns)
    ncols = -(-len(panels) // nrows)  # balanced rows: 6 panels as 2 x 3, not 4 + 2
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(2.6 * ncols + 0.8, 6.5), max(2.2 * nrows + 1.1, 4.2)),
        dpi=120,
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    unit = "nats per token" if reduction == "mean" else "nats"
    pref_color, util_color = "#1f77b4", "#d62728"
    for ax, label in zip(axes.flat, panels, strict=False):
        part = summary[summary["label"] == label].sort_values("m")
        m = part["m"].to_numpy()
        for col, style, color in (("pref_odds", "-", pref_color), ("util_odds", "--", util_color)):
            ax.plot(m, part[col], style, marker="o", ms=2.5, lw=1.4, color=color)
            ax.fill_between(m, part[f"{col}_low"], part[f"{col}_high"], color=color, alpha=0.15, lw=0)
        if fits and label in fits:
            grid = np.linspace(m.min(), m.max(), 200)
            for key, color in (("pref", pref_color), ("util", util_color)):
                fit = fits[label][key]
                ax.plot(grid, fit(grid), ":", color=color, lw=1.1)
            ax.text(
                0.03,
                0.04,
                f"fit R²: PrefOdds {fits[label]['pref'].r2:.2f}, UtilOdds {fits[label]['util'].r2:.2f}",
                transform=ax.transAxes,
                fontsize=7,
            )
        for ref in references:
            row = summary[summary["label"] == ref].iloc[0]
            for col, color in (("pref_odds", pref_color), ("util_odds", util_color)):
                ax.axhline(float(row[col]), color=color, lw=0.8, ls=(0, (1, 2)), alpha=0.8)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_title(str(label), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    # axis labels on the outer panels only (the axes are shared); the last panel of each column carries
    # the x label, so that a short last row still shows it
    for k, ax in enumerate(list(axes.flat)[: len(panels)]):
        if k + ncols >= len(panels):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel, fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel(f"log-odds ({unit})", fontsize=8)
    handles = [
        plt.Line2D([], [], color=pref_color, lw=1.4, label="PrefOdds"),
        plt.Line2D([], [], color=util_color, lw=1.4, ls="--", label="UtilOdds"),
    ]
    handles += [
        plt.Line2D([], [], color="black", lw=0.8, ls=(0, (1, 2)), label=f"{ref} (no steering)") for ref in references
    ]
    if fits:
        handles.append(plt.Line2D([], [], color="black", lw=1.1, ls=":", label="decay-model fit"))
    if ncols > 2:
        fig.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles), frameon=False)
    else:  # a narrow figure: the legend inside, where it does not meet the title
        axes.flat[0].legend(handles=handles, loc="best", fontsize=7)
    fig.suptitle(title or "Preference and utility log-odds against steering strength", x=0.01, ha="left", fontsize=11)
    return finish_figure(
        fig,
        path,
        "Solid: PrefOdds = L_n - L_p (higher = concept preferred). Dashed: UtilOdds = log(P_u / (1 - P_u)), "
        "P_u = e^-L_p + e^-L_n.\nBands: 95% bootstrap CI over pairs. Look for: preference rising with m while "
        "utility stays near its value at m = 0.",
        bottom=0.1 if nrows == 1 else 0.06,
        top=1.0,  # tight_layout leaves room for the title, and the legend sits beside it
    )


def plot_distance_and_utility(frame: pd.DataFrame, path: str | Path | None = None, *, xlabel: str = "m") -> Any:
    """Two panels against the strength (column ``r`` if there is one, else ``m``): the steered activations'
    Mahalanobis distance percentile among clean tokens, and UtilOdds; one line per label (a manifold
    sweep's summary)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    label_col = "label" if "label" in frame else frame.columns[0]
    for label, part in frame.groupby(label_col, sort=False):
        r = part["r" if "r" in part else "m"].to_numpy()
        dist_col = next((c for c in part.columns if "mahalanobis" in c and "pct" in c), None)
        if dist_col is not None:
            a.plot(r, part[dist_col], "-o", ms=3, label=str(label))
        if "util_odds" in part:
            b.plot(r, part["util_odds"], "-o", ms=3, label=str(label))
    a.set_xlabel(xlabel)
    a.set_ylabel("distance percentile among clean tokens (0-1)")
    b.set_xlabel(xlabel)
    b.set_ylabel("UtilOdds (nats per token)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle("Distance from the clean activations and utility against strength")
    caption = (
        "Left: Mahalanobis distance (Ledoit-Wolf) of the steered residual stream, as a percentile among held-out "
        "clean tokens (0.5 = typical). Right: UtilOdds. Look for: utility falling where the distance rises."
    )
    return finish_figure(fig, path, caption, bottom=0.06, top=0.95)
