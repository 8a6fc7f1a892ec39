"""The generation sweep: generate under every condition and strength, judge the texts, summarise.

For each (condition, m) over the same prompts (methods: ``docs/methods.md``, section "Judging generated
text"):

- ``concept``: the probe judge's P(concept | text) (when a :class:`~tl_steer.judges.ProbeJudge` is given);
- ``nll``, ``distinct1``, ``distinct2``, ``rep4``: fluency (:class:`~tl_steer.judges.FluencyJudge`);
- ``relevance``: PMI with the prompt, nats per token (:class:`~tl_steer.judges.RelevanceJudge`);
- ``hmean``: AxBench's combination, the per-text harmonic mean of three 0-2 scores (0 if any is 0):
  concept_2 = 2 P(concept); fluency_2 = 2 min(1, NLL_0 / NLL) (1 - rep4), with NLL_0 the clean model's NLL
  of its own text for the same prompt, so clean text scores 2 less its repetition; relevance_2 =
  2 clip(PMI / PMI_0, 0, 1), PMI_0 the clean texts' mean PMI. A score whose judge is missing is left out.

Every mean carries a percentile-bootstrap CI over prompts (samples of a prompt are averaged first). The
*steering window* of a condition is the set of strengths where the mean concept score is above its m = 0
value while the mean NLL stays within ``fluency_margin`` nats of it. :func:`proxy_text_correlation` asks
whether the teacher-forced log-odds rank (condition, m) points the way the generated text does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tl_steer.analysis.gap import BASELINE, Condition
from tl_steer.analysis.plots import _pyplot, finish_figure
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.errors import ConfigError, DataError
from tl_steer.generation import ConditionsLike, as_conditions, check_prompts, generate
from tl_steer.hosts import Host
from tl_steer.judges import FluencyJudge, Judge, ProbeJudge, RelevanceJudge, judge_table

#: the per-text columns summarised, in this order, when present
METRICS = (
    "concept",
    "nll",
    "distinct1",
    "distinct2",
    "rep4",
    "relevance",
    "hmean",
    "llm_concept",
    "llm_instruction",
    "llm_fluency",
    "llm_hmean",
)


def harmonic_scores(*scores: np.ndarray) -> np.ndarray:
    """Per row, n / sum(1 / s) over the given 0-2 score arrays: 0 where any is 0, NaN where any is NaN."""
    stacked = np.vstack([np.asarray(s, dtype=np.float64) for s in scores])
    with np.errstate(divide="ignore"):
        out = stacked.shape[0] / np.sum(1.0 / stacked, axis=0)
    out[(stacked == 0).any(axis=0)] = 0.0
    out[np.isnan(stacked).any(axis=0)] = np.nan
    return out


@dataclass
class GenerationSweepResult:
    """Judged texts (``items``: one row per condition, m, prompt, sample) and their summaries."""

    items: pd.DataFrame
    conditions: list[Condition]
    judges: list[dict[str, object]] = field(default_factory=list)
    fluency_margin: float = 0.5
    level: float = 0.95

    @property
    def probe(self) -> dict[str, object] | None:
        """The probe judge's info (concept, held-out AUROC, reliable), if one judged the texts."""
        return next((j for j in self.judges if j.get("judge") == "probe"), None)

    def metrics(self) -> list[str]:
        return [m for m in METRICS if m in self.items.columns]

    def per_prompt(self) -> pd.DataFrame:
        """Per (condition, m, item): every metric averaged over the samples of that prompt."""
        return self.items.groupby(["condition", "m", "item"], sort=False)[self.metrics()].mean().reset_index()

    def summary(self, seed: int = 0) -> pd.DataFrame:
        """Per condition and m: n prompts, mean of every metric with its bootstrap CI over prompts
        (``{metric}_low``, ``{metric}_high``), ``n_empty`` (empty texts, NaN scores), and the probe
        judge's held-out AUROC and ``probe_reliable`` flag where a probe judged the concept."""
        per = self.per_prompt()
        probe = self.probe
        rows = []
        for (cond, m), group in per.groupby(["condition", "m"], sort=False):
            raw = self.items[(self.items["condition"] == cond) & (self.items["m"] == m)]
            row: dict[str, Any] = {"condition": cond, "m": m, "n": len(group)}
            for metric in self.metrics():
                values = group[metric].to_numpy(dtype=np.float64)
                values = values[np.isfinite(values)]
                low, high = bootstrap_ci(values, seed=seed, level=self.level)
                mean = float(values.mean()) if values.size else math.nan
                row.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
            row["n_empty"] = int((raw["completion"].astype(str).str.strip() == "").sum())
            if "llm_unparsed" in raw.columns:
                row["llm_unparsed"] = int(raw["llm_unparsed"].sum())
            if probe is not None:
                row["probe_auroc"] = probe["auroc"]
                row["probe_reliable"] = probe["reliable"]
            rows.append(row)
        return pd.DataFrame(rows)

    def _reference(self, condition: str) -> tuple[float, pd.Series]:
        """The m a condition's gains are measured from (0 if in its grid) and its summary row."""
        summary = self.summary()
        part = summary[summary["condition"] == condition]
        if part.empty:
            raise ConfigError(f"no condition {condition!r}; known: {', '.join(c.name for c in self.conditions)}")
        if (part["m"] == 0.0).any():
            return 0.0, part[part["m"] == 0.0].iloc[0]
        base = summary[summary["condition"] == BASELINE]
        return 0.0, base.iloc[0]

    def steering_window(self, margin: float | None = None) -> pd.DataFrame:
        """Per steering condition: the strengths where the mean concept score is above the condition's
        m = 0 value (the clean model's when its grid lacks 0) while the mean NLL is at most ``margin`` nats
        (default ``fluency_margin``) above it; ``m_low``/``m_high`` bound them (NaN when none)."""
        margin = self.fluency_margin if margin is None else float(margin)
        if "concept" not in self.items.columns or "nll" not in self.items.columns:
            raise ConfigError("the steering window needs a probe judge (concept) and the fluency judge (nll)")
        summary = self.summary()
        rows = []
        for c in self.conditions:
            if c.intervention is None:
                continue
            _, ref = self._reference(c.name)
            part = summary[(summary["condition"] == c.name) & (summary["m"] != 0.0)].sort_values("m")
            ok = (part["concept"] > ref["concept"]) & (part["nll"] <= ref["nll"] + margin)
            inside = part.loc[ok, "m"].tolist()
            rows.append(
                {
                    "condition": c.name,
                    "ms": inside,
                    "m_low": min(inside) if inside else math.nan,
                    "m_high": max(inside) if inside else math.nan,
                    "concept_at_0": ref["concept"],
                    "nll_at_0": ref["nll"],
                    "margin": margin,
                }
            )
        return pd.DataFrame(rows)

    def gains(self) -> pd.DataFrame:
        """Per (condition, m): the mean of each metric minus the clean model's (no steering, m = 0)."""
        summary = self.summary()
        base = summary[summary["condition"] == BASELINE].iloc[0]
        out = summary[["condition", "m"]].copy()
        for metric in self.metrics():
            out[f"{metric}_gain"] = summary[metric] - base[metric]
        return out

    def to_csv(self, path: str | Path, summary: bool = False) -> Path:
        """Write the judged texts (or, with ``summary``, :meth:`summary`) as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.summary() if summary else self.items).to_csv(path, index=False)
        return path

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """Three panels against m (concept score, NLL, relevance), one line per steering condition with
        its CI band; conditions without steering are marked at m = 0."""
        plt = _pyplot()
        summary = self.summary()
        panels = [(k, label) for k, label in _PANELS if k in summary.columns]
        if not panels:
            raise ConfigError("nothing to plot: the sweep has no concept, nll or relevance column")
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (metric, label) in zip(axes[0], panels, strict=True):
            for c in self.conditions:
                part = summary[summary["condition"] == c.name].sort_values("m")
                if c.intervention is not None:
                    (line,) = ax.plot(part["m"], part[metric], "-o", ms=3, label=c.name)
                    ax.fill_between(
                        part["m"], part[f"{metric}_low"], part[f"{metric}_high"], color=line.get_color(), alpha=0.15
                    )
                else:
                    err = [
                        [part[metric].iloc[0] - part[f"{metric}_low"].iloc[0]],
                        [part[f"{metric}_high"].iloc[0] - part[metric].iloc[0]],
                    ]
                    ax.errorbar([0.0], part[metric].iloc[:1], yerr=np.nan_to_num(err), fmt="s", label=c.name)
            ax.set_xlabel("m")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        probe = self.probe
        flag = ""
        if probe is not None:
            flag = f" Probe judge held-out AUROC {probe['auroc']:.2f}" + (
                "" if probe["reliable"] else " (UNRELIABLE: under 0.8)"
            )
        if title:
            fig.suptitle(title)
        caption = (
            "Generated text judged with the clean model, mean over prompts with 95% bootstrap CI. Concept: the probe "
            "judge's P(concept | text), higher = more concept; NLL: nats per token, lower = more fluent; relevance: "
            "PMI with the prompt, nats per token, 0 = ignores it." + flag
        )
        return finish_figure(fig, path, caption, bottom=0.12, top=0.93 if title else 1.0)


_PANELS = (
    ("concept", "concept score P(concept | text)"),
    ("nll", "NLL per token (clean model)"),
    ("relevance", "relevance (PMI, nats/token)"),
)


def add_combined_scores(items: pd.DataFrame) -> pd.DataFrame:
    """``items`` with the 0-2 scores (``concept_2``, ``fluency_2``, ``relevance_2``) and their per-text
    harmonic mean ``hmean`` (see the module docstring), relative to the clean (no steering) texts."""
    out = items.copy()
    base = out[(out["condition"] == BASELINE) & (out["m"] == 0.0)]
    scores = []
    if "concept" in out.columns:
        out["concept_2"] = 2.0 * out["concept"]
        scores.append(out["concept_2"].to_numpy())
    if "nll" in out.columns:
        ref = base.groupby("item")["nll"].mean()
        nll0 = out["item"].map(ref).to_numpy(dtype=np.float64)
        nll = out["nll"].to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.minimum(1.0, nll0 / nll)
        out["fluency_2"] = 2.0 * ratio * (1.0 - out["rep4"].to_numpy(dtype=np.float64))
        scores.append(out["fluency_2"].to_numpy())
    if "relevance" in out.columns:
        pmi0 = float(np.nanmean(base["relevance"])) if len(base) else math.nan
        rel = out["relevance"].to_numpy(dtype=np.float64)
        out["relevance_2"] = 2.0 * np.clip(rel / pmi0, 0.0, 1.0) if pmi0 > 0 else np.nan
        scores.append(out["relevance_2"].to_numpy())
    if scores:
        out["hmean"] = harmonic_scores(*scores)
    return out


def generation_sweep(
    model: Host,
    conditions: ConditionsLike,
    prompts: Sequence[str],
    ms: Sequence[float] = (0.0, 1.0, 2.0),
    judges: Sequence[Judge] | None = None,
    *,
    concept: str | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    n_samples: int = 1,
    chat: bool = False,
    batch_size: int = 8,
    fluency_margin: float = 0.5,
    level: float = 0.95,
) -> GenerationSweepResult:
    """Generate under every condition and strength, judge every text, and keep the table.

    Args:
        conditions: as for :func:`tl_steer.generate`; the clean model (no steering) is added if missing:
            it is the reference of the gains and the combined score.
        prompts: at least 2 distinct prompts (relevance compares each text with another prompt).
        judges: default: fluency and relevance; pass a :class:`~tl_steer.judges.ProbeJudge` (and any
            other judge) for the concept score. Every judge is checked against the model (and
            ``concept``) before any text is generated.
        fluency_margin: nats of NLL above m = 0 that the steering window tolerates.

    Returns:
        A :class:`GenerationSweepResult`: ``summary()``, ``steering_window()``, ``gains()``, ``to_csv``, ``plot``.
    """
    prompt_list = check_prompts(prompts)
    conds = as_conditions(conditions)
    if any(c.name == BASELINE and (c.intervention is not None or c.instruction) for c in conds):
        raise ConfigError(f"the condition named {BASELINE!r} must have no intervention and no instruction")
    if all(c.name != BASELINE for c in conds):
        conds = [Condition(BASELINE), *conds]
    judge_list = list(judges) if judges is not None else [FluencyJudge(chat=chat), RelevanceJudge(chat=chat)]
    for j in judge_list:
        if not isinstance(j, Judge):
            raise ConfigError(f"judges must be Judge objects, got {type(j).__name__}")
        j.check(model, concept)
    if any(isinstance(j, RelevanceJudge) for j in judge_list) and len(set(prompt_list)) < 2:
        raise DataError("the relevance judge needs at least 2 distinct prompts")
    if not fluency_margin >= 0:
        raise ConfigError(f"fluency_margin must be >= 0, got {fluency_margin!r}")
    table = generate(
        model,
        conds,
        prompt_list,
        ms,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        seed=seed,
        n_samples=n_samples,
        chat=chat,
        batch_size=batch_size,
    )
    judged = add_combined_scores(judge_table(model, table, judge_list, concept=concept))
    return GenerationSweepResult(judged, conds, [j.info() for j in judge_list], float(fluency_margin), level)


@dataclass(frozen=True)
class TextBehavior:
    """Behaviour measured on generated text, for :func:`tl_steer.capability_behavior_gap`: the ``judge``'s
    concept score (a :class:`~tl_steer.judges.ProbeJudge`) of a greedy completion of each prompt, under the
    condition at strength m. An empty completion counts as 0: it shows no concept."""

    prompts: tuple[str, ...]
    judge: ProbeJudge
    max_new_tokens: int = 32
    batch_size: int = 16
    chat: bool = False
    #: completions already generated from ``prompts`` with these settings (greedy, the same ``max_new_tokens``,
    #: ``batch_size`` and ``chat``), by (condition name, m), e.g. by a generation sweep over the same prompts:
    #: they are judged instead of generated again (the same text: greedy decoding of the same batches)
    known: Mapping[tuple[str, float], Sequence[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(check_prompts(self.prompts)))
        if not isinstance(self.judge, ProbeJudge):
            raise ConfigError(f"TextBehavior needs a ProbeJudge, got {type(self.judge).__name__}")
        for key, texts in self.known.items():
            if len(texts) != len(self.prompts):
                raise ConfigError(
                    f"known completions for {key} number {len(texts)}, not one per prompt ({len(self.prompts)})"
                )

    def check(self, model: Host) -> None:
        """Raise before any work if the judge was fitted on another model."""
        self.judge.check(model)

    def scores(self, model: Host, condition: Condition, m: float) -> np.ndarray:
        """P(concept | text) of each prompt's completion under ``condition`` at ``m`` (one value per prompt)."""
        known = self.known.get((condition.name, float(m)))
        if known is not None:
            prompts, completions = list(self.prompts), [str(t) for t in known]
        else:
            table = generate(
                model,
                dataclasses.replace(condition, ms=None),  # this m, not the condition's own grid
                self.prompts,
                [m],
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                chat=self.chat,
            )
            prompts, completions = table["prompt"].tolist(), table["completion"].tolist()
        values = self.judge.score(model, prompts, completions)["concept"]
        return np.nan_to_num(values, nan=0.0)


def spearman_ci(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Spearman's rank correlation of paired values and a percentile-bootstrap CI over the pairs
    (resamples where either side is constant are skipped). NaN for fewer than 3 pairs."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3:
        return math.nan, math.nan, math.nan
    rho = float(stats.spearmanr(a, b).statistic)
    idx = np.random.default_rng(seed).integers(0, a.size, (n_resamples, a.size))
    # Spearman's rho of each resample = Pearson's r of its ranks (ties averaged), all resamples at once
    ra, rb = stats.rankdata(a[idx], axis=1), stats.rankdata(b[idx], axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    ok = denom > 0  # resamples where either side is constant have no rank correlation
    boots = (ra * rb).sum(axis=1)[ok] / denom[ok]
    if not boots.size:
        return rho, math.nan, math.nan
    tail = (1 - level) / 2 * 100
    return rho, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def proxy_text_correlation(
    text: GenerationSweepResult | pd.DataFrame, proxy: pd.DataFrame, *, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Does the teacher-forced proxy rank (condition, m) points as the generated text does?

    ``proxy`` has one row per (condition, m) with columns ``condition`` (or ``label``), ``m``,
    ``pref_odds`` and ``util_odds`` (e.g. :meth:`PreferenceUtilityResult.summary` of each condition,
    labelled with the sweep's condition names). The gains of both sides are taken from each condition's
    m = 0 row (the clean model's for conditions without m = 0 in the grid). Returns two rows: Spearman's rho
    (with a bootstrap CI over the points) between the PrefOdds gain and the concept-score gain, and between
    the UtilOdds change and the fluency change (minus the NLL change, so that agreement is positive).
    """
    summary = text.summary() if isinstance(text, GenerationSweepResult) else text
    proxy = proxy.rename(columns={"label": "condition"})
    missing = {"condition", "m", "pref_odds", "util_odds"} - set(proxy.columns)
    if missing:
        raise DataError(f"the proxy table lacks the columns {sorted(missing)}")
    merged = summary.merge(proxy[["condition", "m", "pref_odds", "util_odds"]], on=["condition", "m"], how="inner")
    if merged.empty:
        raise DataError("no (condition, m) point is in both the generation sweep and the proxy table")
    if isinstance(text, GenerationSweepResult):
        steering = {c.name for c in text.conditions if c.intervention is not None}
    else:  # a summary table: a condition swept over m != 0 steers
        steering = set(summary.loc[summary["m"] != 0.0, "condition"])
    gain, is_ref = _gains_from_reference(
        merged, ["pref_odds", "util_odds", *(c for c in ("concept", "nll") if c in merged)], steering
    )
    moved = gain[~is_ref]
    rows = []
    pairs = [
        ("PrefOdds gain vs concept gain", "pref_odds", "concept", 1.0),
        ("UtilOdds change vs fluency change (-NLL)", "util_odds", "nll", -1.0),
    ]
    for name, a, b, sign in pairs:
        if b not in gain.columns:
            continue
        rho, low, high = spearman_ci(moved[a], sign * moved[b], level=level, seed=seed)
        rows.append({"comparison": name, "n_points": int(len(moved)), "rho": rho, "low": low, "high": high})
    return pd.DataFrame(rows)


def _gains_from_reference(
    table: pd.DataFrame, columns: list[str], steering: set[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Each column minus its reference: a steering condition's own m = 0 row when its grid has one, else
    the no-steering row. Also returns which rows are references themselves (no gain to rank)."""
    out = table.copy()
    is_ref = np.zeros(len(table), dtype=bool)
    base = table[table["condition"] == BASELINE]
    for cond, part in table.groupby("condition", sort=False):
        zero = part[part["m"] == 0.0]
        if cond == BASELINE:
            ref = part.iloc[0]
        elif cond in steering and len(zero):
            ref = zero.iloc[0]
        else:
            ref = base.iloc[0] if len(base) else None
        for col in columns:
            out.loc[part.index, col] = part[col] - (ref[col] if ref is not None else math.nan)
        if cond == BASELINE or cond in steering:
            is_ref[table.index.get_indexer(zero.index)] = True
    return out, is_ref
