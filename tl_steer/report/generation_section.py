"""The report's section on steered text: what every method writes, judged, beside its log-odds.

Every intervention of the report (and prompting) generates greedy completions of the concept's held-out
open prompts at m = 1 and m = 2 (in units of the strength it was made for), and the clean model once. The
texts are judged with the clean model (a probe judge fitted on the report's training pairs and tested on its
test pairs, fluency, relevance; see :mod:`tl_steer.analysis.generation_sweep`). The section shows the texts
of 3 prompts side by side (escaped, long texts cut with the whole text in a folded table), the
generation-sweep figure, the judged scores, the steering window, and the rank correlation between the
teacher-forced gains and the judged ones. Results are cached per condition under ``OUT/cache``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tl_steer.analysis.gap import BASELINE, Condition
from tl_steer.analysis.generation_sweep import GenerationSweepResult, add_combined_scores, proxy_text_correlation
from tl_steer.data.prompts import load_prompts, prompt_sets
from tl_steer.generation import generate
from tl_steer.judges import FluencyJudge, ProbeJudge, RelevanceJudge, judge_table
from tl_steer.report import html
from tl_steer.report.store import Store

if TYPE_CHECKING:
    from tl_steer.report.sections import ReportContext

#: strengths generated (m = 1 is each intervention's own strength; the clean model is m = 0)
GEN_STRENGTHS = (1.0, 2.0)
#: (prompts, new tokens) per report size
GEN_SIZES = {"quick": (3, 12), "standard": (6, 16), "full": (16, 32)}
N_SHOWN = 3  # prompts whose texts are shown side by side
CUT = 160  # characters of a text shown in the side-by-side table


def gen_size(ctx: ReportContext) -> tuple[int, int]:
    """(prompts, new tokens) for the report's size: quick, standard (fewer than 40 test pairs) or full."""
    if ctx.settings.quick:
        return GEN_SIZES["quick"]
    return GEN_SIZES["standard" if ctx.settings.n_test < 40 else "full"]


def report_prompts(ctx: ReportContext, n: int) -> list[str]:
    """The concept's held-out open prompts (built-in concepts), else the distinct prompts of the test pairs."""
    if ctx.data.name in prompt_sets():
        return load_prompts(ctx.data.name, "test")[:n]
    return list(dict.fromkeys(p.prompt for p in ctx.data.test))[:n]


def _store(ctx: ReportContext) -> Store | None:
    """The run's cache: the context's own store if it has one, else the cache folder run_report opened."""
    store = getattr(ctx, "store", None)
    if isinstance(store, Store):
        return store
    settings = ctx.out / "cache" / "settings.json"
    if settings.is_file():
        return Store(ctx.out, json.loads(settings.read_text()))
    return None


def generation_sweep_for_report(
    ctx: ReportContext, log: Callable[[str], None] = lambda _: None
) -> tuple[GenerationSweepResult, list[str]]:
    """Generate and judge (cached per condition) at the strengths :data:`GEN_STRENGTHS`."""
    n_prompts, n_new = gen_size(ctx)
    prompts = report_prompts(ctx, n_prompts)
    model, store = ctx.model, _store(ctx)
    conditions = [Condition(BASELINE)]
    for name, iv in ctx.interventions.items():
        conditions.append(Condition(name, iv, ms=GEN_STRENGTHS))
    if "prompting" in ctx.settings.methods and ctx.settings.instruction:
        conditions.append(Condition("prompting", instruction=ctx.settings.instruction))
    probe: list[ProbeJudge] = []

    def judges() -> list[Any]:
        if not probe:
            probe.append(ProbeJudge.fit(model, ctx.data.train, ctx.data.test, concept=ctx.data.name))
        return [probe[0], FluencyJudge(), RelevanceJudge()]

    def run(c: Condition) -> pd.DataFrame:
        table = generate(model, c, prompts, [0.0], max_new_tokens=n_new, batch_size=16)
        return judge_table(model, table, judges())

    def cached(key: str, compute: Any) -> Any:
        return compute() if store is None else (store.frame if key.endswith("texts") else store.record)(key, compute)

    frames = []
    for c in conditions:
        frame = cached(f"generation/{c.name}/texts", lambda c=c: run(c))
        log(f"steered text: {c.name} generated and judged")
        frame["completion"] = frame["completion"].fillna("").astype(str)  # an empty text reads back as NaN
        frames.append(frame)
    info = cached("generation/probe", lambda: judges()[0].info())
    items = pd.concat(frames, ignore_index=True)
    items.loc[items["condition"] == BASELINE, "m"] = 0.0
    result = GenerationSweepResult(add_combined_scores(items), conditions, [info, {"judge": "fluency"}])
    return result, prompts


def _proxy(ctx: ReportContext) -> pd.DataFrame:
    """PrefOdds and UtilOdds per condition and strength, with the clean model as
    'no steering' (every intervention's m = 0 row is the clean model)."""
    summary = ctx.pu.summary()
    clean = summary[(summary["m"] == 0.0) & (summary["label"] != "prompting")].head(1).assign(label=BASELINE)
    return pd.concat([clean, summary], ignore_index=True).rename(columns={"label": "condition"})


def _cut(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= CUT else flat[: CUT - 1] + "…"


def side_by_side_table(items: pd.DataFrame, prompts: list[str], *, cut: bool = True) -> pd.DataFrame:
    """Per prompt (the first :data:`N_SHOWN`), one row per condition with its texts in columns m = 0, 1 and 2
    (m = 1: each method's own strength): the clean text under m = 0 (steering at m = 0 is the clean model:
    "″"), prompting's text under m = 0 (it has no strength)."""
    show = _cut if cut else (lambda t: str(t))
    columns = ["m = 0"] + [f"m = {r:g}" for r in GEN_STRENGTHS]
    rows = []
    for i, prompt in enumerate(prompts[:N_SHOWN]):
        part = items[(items["item"] == i) & (items["sample"] == 0)]
        for k, (cond, group) in enumerate(part.groupby("condition", sort=False)):
            texts = {
                float(m): show(t) if str(t).strip() else "(no text: it ended at once)"
                for m, t in zip(group["m"], group["completion"], strict=True)
            }
            row = {"prompt": show(prompt) if k == 0 else "", "condition": cond} | dict.fromkeys(columns, "")
            row["m = 0"] = texts.get(0.0, "″")
            for r, col in zip(GEN_STRENGTHS, columns[1:], strict=True):
                row[col] = texts.get(r, "")
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(row: pd.Series, key: str, digits: int = 2) -> str:
    if key not in row or not np.isfinite(row[key]):
        return "–"
    low, high = row.get(f"{key}_low", math.nan), row.get(f"{key}_high", math.nan)
    ci = f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) and np.isfinite(high) else ""
    return f"{row[key]:.{digits}f}{ci}"


def scores_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The judged scores per condition and strength, each with its 95% CI over prompts."""
    out = pd.DataFrame({"condition": summary["condition"], "m": summary["m"], "n": summary["n"]})
    for key, title in (
        ("concept", "concept P(concept | text)"),
        ("nll", "NLL (nats/token)"),
        ("rep4", "repeated 4-gram share"),
        ("relevance", "relevance (PMI)"),
        ("hmean", "harmonic mean (0-2)"),
    ):
        if key in summary:
            out[title] = [_fmt(r, key) for _, r in summary.iterrows()]
    return out


def generation_section(ctx: ReportContext) -> html.Section | None:
    """Steered text of every method, judged, with the proxy-vs-text rank correlation."""
    if not ctx.interventions:
        return None
    started = time.perf_counter()
    result, prompts = generation_sweep_for_report(ctx)
    summary = result.summary()
    png = ctx.figure("generation")
    result.plot(png, title=f"{ctx.data.name}: generated text judged, against m")
    window = result.steering_window()
    correlation = proxy_text_correlation(result, _proxy(ctx))
    probe = result.probe or {}
    ctx.table("generation_texts", result.items)
    ctx.table("generation_summary", summary)
    ctx.summary["generation"] = {
        "probe": probe,
        "summary": summary.to_dict(orient="records"),
        "window": window.to_dict(orient="records"),
        "proxy_vs_text": correlation.to_dict(orient="records"),
        "prompts": prompts,
        "seconds": time.perf_counter() - started,  # generating and judging (near 0 when read from the cache)
    }
    auroc = float(probe.get("auroc", math.nan))  # type: ignore[arg-type]
    validity = f"its AUROC on the {probe.get('n_test')} held-out test completions is {auroc:.3f}" + (
        "" if probe.get("reliable") else " (UNRELIABLE: under 0.8, read its scores with care)"
    )
    n_new = gen_size(ctx)[1]
    notes = [] if probe.get("reliable") else [f"The probe judge is unreliable here: held-out AUROC {auroc:.3f} < 0.8."]
    corr_rows = [
        f"{r['comparison']}: Spearman rho {r['rho']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] "
        f"over {r['n_points']} points"
        for _, r in correlation.iterrows()
    ]
    shown = window.assign(ms=[", ".join(f"{m:g}" for m in ms) or "none" for ms in window["ms"]])
    return html.Section(
        "Steered text",
        paragraphs=[
            f"Greedy completions ({n_new} new tokens at most) of {len(prompts)} held-out open prompts under every "
            "method at m = 1 and 2 (in units of the strength it was made for), prompting, and the clean model. "
            "Every text is judged with the clean model, no steering active: the concept score is a linear probe's "
            f"P(concept | text) on the mean residual stream at {probe.get('hook')} over the text's tokens, fitted "
            f"on the report's training completions; {validity}. NLL: the clean model's mean NLL per token of the "
            "text after its prompt (lower = more fluent); relevance: the PMI of the text with its prompt against "
            "another prompt (nats per token, 0 = ignores it); harmonic mean: AxBench's combination of the three "
            "on a 0-2 scale (methods: docs/methods.md, Judging generated text).",
            "Does the teacher-forced proxy predict the text? Rank correlation over every (method, strength) point: "
            + "; ".join(corr_rows)
            + ".",
        ],
        figures=[
            html.Figure(
                png,
                "Concept score, NLL and relevance of the generated texts against m (1 = each method's own "
                "strength), 95% CIs over prompts. Look for: the concept rising while the NLL stays near the "
                "clean model's.",
            )
        ],
        tables=[
            html.Table(
                "Texts of the first 3 prompts (″: the clean text above)",
                side_by_side_table(result.items, prompts),
                prose=True,
            ),
            html.Table("Judged scores per method and strength (generation_summary.csv)", scores_table(summary)),
            html.Table(
                f"Steering window: strengths where the concept score rises while the NLL stays within "
                f"{result.fluency_margin:g} nats of m = 0",
                shown[["condition", "ms", "concept_at_0", "nll_at_0"]],
            ),
            html.Table(
                "Every text in full (generation_texts.csv)",
                side_by_side_table(result.items, prompts, cut=False),
                folded=True,
                prose=True,
            ),
        ],
        notes=notes,
    )
