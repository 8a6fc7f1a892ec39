"""The grid's page: which method wins where (a table and a heatmap), the set-up, then each cell's report,
folded, with its sections as the single report shows them.

The winner of a cell is the steering method with the largest PrefOdds gain at the strength it was made for
(m = 1; prompting is a baseline, not a contender), read from the cell's findings (the bootstrap CIs of
:mod:`tl_steer.report.findings`, docs/methods.md, section "Preference and utility"). Its lead is
*separated* when its CI lies wholly above the runner-up's (``d_pref_low`` of the winner above ``d_pref_high``
of the runner-up): a conservative test, since overlapping 95% CIs can still differ.
"""

from __future__ import annotations

import html as html_lib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tl_steer.atomic import write_text
from tl_steer.hosts import Host
from tl_steer.report import html
from tl_steer.report.pipeline import ReportSettings

if TYPE_CHECKING:
    from tl_steer.report.grid import GridResult

_GRID_STYLE = """
details.cell { border: 1px solid #ddd; border-radius: 4px; padding: .3em .8em; margin: .5em 0; }
details.cell > summary { font-size: 1.05em; }
details.cell h3.part { font-size: 1.1em; border-bottom: 1px solid #eee; margin-top: 1.4em; }
details.cell figure img { max-width: 560px; }
"""


def winners(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell: the concept, layer, winning method with its PrefOdds gain and UtilOdds change at
    m = 1 (95% CIs), the runner-up's gain, and whether the winner's CI separates from the runner-up's."""
    rows = []
    for record in records:
        settings = record["settings"]
        found = pd.DataFrame(record["summary"].get("findings", []))
        row: dict[str, Any] = {"concept": settings["concept"], "layer": settings["layer"], "hook": record["hook"]}
        steered = found[(found["condition"] != "prompting") & found["d_pref"].notna()] if len(found) else found
        if len(steered):
            ranked = steered.sort_values("d_pref", ascending=False, kind="stable")
            best = ranked.iloc[0]
            row |= {"best": best["condition"]}
            row |= {
                k: float(best[k])
                for k in ("d_pref", "d_pref_low", "d_pref_high", "d_util", "d_util_low", "d_util_high")
            }
            if len(ranked) > 1:
                second = ranked.iloc[1]
                row |= {
                    "runner_up": second["condition"],
                    "runner_up_d_pref": float(second["d_pref"]),
                    "runner_up_d_pref_low": float(second["d_pref_low"]),
                    "runner_up_d_pref_high": float(second["d_pref_high"]),
                    "separated": bool(best["d_pref_low"] > second["d_pref_high"]),
                }
        rows.append(row)
    columns = [
        "concept", "layer", "hook", "best", "d_pref", "d_pref_low", "d_pref_high", "d_util", "d_util_low",
        "d_util_high", "runner_up", "runner_up_d_pref", "runner_up_d_pref_low", "runner_up_d_pref_high", "separated",
    ]  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=columns)


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def winners_shown(table: pd.DataFrame) -> pd.DataFrame:
    """The winners table as the page shows it: CIs in brackets, the separation as yes/no."""
    return pd.DataFrame(
        {
            "concept": table["concept"],
            "layer": table["layer"],
            "best method": table["best"].fillna("–"),
            "PrefOdds gain at m = 1": [_ci(r.d_pref, r.d_pref_low, r.d_pref_high) for r in table.itertuples()],
            "UtilOdds change": [_ci(r.d_util, r.d_util_low, r.d_util_high) for r in table.itertuples()],
            "runner-up": table["runner_up"].fillna("–"),
            "runner-up gain": [
                _ci(r.runner_up_d_pref, r.runner_up_d_pref_low, r.runner_up_d_pref_high) for r in table.itertuples()
            ],
            "CIs separate": ["yes" if s is True else "no" if s is False else "–" for s in table["separated"]],
        }
    )


def plot_winners(table: pd.DataFrame, path: Path) -> Path:
    """Two small heatmaps, concepts x layers: the winner's PrefOdds gain (annotated with its name; * where
    its CI separates from the runner-up's) and its UtilOdds change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concepts = list(dict.fromkeys(table["concept"]))
    layers = sorted(set(table["layer"]))
    grids = {k: np.full((len(concepts), len(layers)), np.nan) for k in ("d_pref", "d_util")}
    names: dict[tuple[int, int], str] = {}
    for r in table.itertuples():
        i, j = concepts.index(r.concept), layers.index(r.layer)
        for key in grids:
            grids[key][i, j] = getattr(r, key)
        if isinstance(r.best, str):
            names[i, j] = r.best.replace("/vector", "") + ("*" if r.separated is True else "")
    width = max(4.0, 1.1 * len(layers) + 1.6)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 0.55 * len(concepts) + 1.6), squeeze=False)
    panels = (("d_pref", "winner's PrefOdds gain at m = 1", "viridis"), ("d_util", "its UtilOdds change", "RdBu"))
    for ax, (key, title, cmap) in zip(axes[0], panels, strict=True):
        values = grids[key]
        finite = values[np.isfinite(values)]
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        limits = {"vmin": -bound, "vmax": bound} if key == "d_util" else {}
        image = ax.imshow(values, cmap=cmap, aspect="auto", **limits)
        fig.colorbar(image, ax=ax, fraction=0.05, label="nats per token")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(concepts)), concepts)
        ax.set_xlabel("layer (hook_resid_post)")
        ax.set_title(title, fontsize=10)
        for (i, j), name in names.items():
            if np.isfinite(values[i, j]):
                label = f"{name}\n{values[i, j]:+.2f}" if key == "d_pref" else f"{values[i, j]:+.2f}"
                ax.text(j, i, label, ha="center", va="center", fontsize=7, color="black",
                        bbox={"facecolor": "white", "alpha": 0.6, "lw": 0, "pad": 1})  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _body(section: html.Section) -> str:
    """A section's content as html.render shows it, under an h3 heading (inside a cell's fold)."""
    parts = [f"<h3 class='part'>{html_lib.escape(section.title)}</h3>"]
    parts += [f"<p>{html_lib.escape(p)}</p>" for p in section.paragraphs]
    if section.bullets:
        parts.append(
            "<ul class='findings'>" + "".join(f"<li>{html_lib.escape(b)}</li>" for b in section.bullets) + "</ul>"
        )
    parts += [f"<p class='note'>{html_lib.escape(n)}</p>" for n in section.notes]
    parts += [html._figure(f) for f in section.figures if Path(f.path).is_file()]
    parts += [html._table(t) for t in section.shown_tables()]
    return "\n".join(parts)


def render_grid(title: str, top: list[html.Section], cells: list[tuple[str, list[html.Section]]]) -> str:
    """The grid's page: the ``top`` sections as html.render shows them, then one folded block per cell."""
    page = html.render(title, [*top, html.Section("Cells", paragraphs=["@CELLS@"])])
    blocks = []
    for summary, sections in cells:
        inner = "\n".join(_body(s) for s in sections if not s.empty)
        blocks.append(f"<details class='cell'><summary>{html_lib.escape(summary)}</summary>{inner}</details>")
    intro = "Each cell's own report (also in cells/&lt;cell&gt;/report.html), folded: click a cell to open it."
    page = page.replace("<p>@CELLS@</p>", f"<p>{intro}</p>" + "\n".join(blocks), 1)
    return page.replace("</style>", _GRID_STYLE + "</style>", 1)


def write_grid_report(
    out: Path,
    model: Host,
    cells: Sequence[ReportSettings],
    records: list[dict[str, Any]],
    folders: dict[str, Path],
    *,
    where: str,
    started: float,
) -> GridResult:
    """Write the grid's page, winners.csv, summary.json and the heatmap; return the :class:`GridResult`."""
    from tl_steer.report.grid import GridResult, cell_name, section_from_json

    table = winners(records)
    files = []
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "winners.csv", index=False)
    files.append(out / "winners.csv")
    png = plot_winners(table, figures / "grid_winners.png")
    files.append(png)
    concepts = list(dict.fromkeys(c.concept for c in cells))
    layers = sorted({c.layer for c in cells})
    first = cells[0]
    summary_section = html.Section(
        "Where each method wins",
        paragraphs=[
            f"{len(concepts)} concept(s) x {len(layers)} layer(s) = {len(cells)} cells. Per cell, the steering "
            "method with the largest PrefOdds gain at the strength it was made for (m = 1), on the cell's "
            "held-out pairs, with its 95% bootstrap CI, its UtilOdds change (the utility it cost; nats per "
            "token) and the runner-up. 'CIs separate': the winner's CI lies wholly above the runner-up's "
            "(a conservative test of its lead); otherwise the two are not told apart at this size."
        ],
        figures=[
            html.Figure(
                png,
                "Left: the winner's PrefOdds gain per concept and layer (label: the winner; *: its CI separates "
                "from the runner-up's). Right: its UtilOdds change (blue: utility kept or gained, red: lost). "
                "Look for: a layer band where one method wins with little utility lost.",
            )
        ],
        tables=[html.Table("Winners per cell (winners.csv)", winners_shown(table))],
    )
    settings_shown = {k: v for k, v in first.to_json().items() if k not in ("concept", "layer", "instruction")}
    setup = html.Section(
        "Set-up",
        paragraphs=[
            f"Model {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}); concepts "
            f"{', '.join(concepts)}; layers {', '.join(map(str, layers))} (blocks.L.hook_resid_post); cells run "
            f"{where}; page written {time.strftime('%Y-%m-%d %H:%M')}.",
            f"Every cell's settings but its concept, layer and instruction: {json.dumps(settings_shown)}.",
        ],
    )
    blocks = []
    for settings, record in zip(cells, records, strict=True):
        folder = folders[cell_name(settings)]
        sections = [section_from_json(s, folder) for s in record["sections"]]
        row = table[(table["concept"] == settings.concept) & (table["layer"] == settings.layer)].iloc[0]
        best = f"best: {row['best']} ({row['d_pref']:+.2f})" if isinstance(row["best"], str) else "no winner"
        blocks.append((f"{settings.concept} at {record['hook']}: {best}", sections))
    title = f"tl_steer grid report: {len(concepts)} concept(s) x {len(layers)} layer(s), {model.cfg.model_name}"
    page = render_grid(title, [summary_section, setup], blocks)
    files.append(write_text(out / "report.html", page, what="the grid report"))
    runtime = time.perf_counter() - started
    summary = {
        "model": model.cfg.model_name,
        "where": where,
        "runtime_s": runtime,
        "winners": table.to_dict(orient="records"),
        "cells": [
            {"concept": r["settings"]["concept"], "layer": r["settings"]["layer"], "hook": r["hook"]}
            | {k: r["summary"].get(k) for k in ("findings", "comparison")}
            for r in records
        ],
    }
    files.append(
        write_text(out / "summary.json", json.dumps(summary, indent=1, default=float), what="the grid summary")
    )
    return GridResult(table, records, files, summary)


__all__ = ["plot_winners", "render_grid", "winners", "winners_shown", "write_grid_report"]
