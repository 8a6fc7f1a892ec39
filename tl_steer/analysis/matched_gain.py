"""Steering methods compared at matched behaviour gain (``docs/methods.md``, section "Adaptive steering").

Methods differ in what their strength m means, so comparing them at equal m compares different amounts of
behaviour. Here every method is compared at the strength that gives the same PrefOdds gain as a reference
(constant DiffMean) at its m = t, for each target t (by default 1, the strength it was made for, and 2):

1. each method's PrefOdds sweep over its grid ``ms`` (mean over the pairs, gain = minus the m = 0 mean);
2. its matched strength m*(t): walking the grid outward from 0 on the side of t, the first grid segment
   whose gain reaches the reference's gain at t, linearly interpolated in m; NaN where no strength of the
   grid reaches it;
3. at m*(t), on the same items, measured again exactly: PrefOdds (the matched gain actually reached),
   UtilOdds per pair, and multiple-choice accuracy per question (``tl_steer.analysis.capability``);
4. per method and target, each change against the clean model with a percentile-bootstrap CI of the mean
   paired difference, and against the reference at the same target with the gap analysis' paired tests
   (:func:`tl_steer.analysis.gap.paired_test`: Wilcoxon for UtilOdds, exact McNemar for accuracy);
5. optionally (``text``, a :class:`~tl_steer.analysis.generation_sweep.TextBehavior`), at m*(t) a greedy
   completion of each of its prompts, judged on the clean model: the probe judge's P(concept | text)
   (``text``, an empty completion counts as 0) and the :class:`~tl_steer.judges.FluencyJudge`'s NLL per
   completion token (``fluency``, nats: up = less fluent; an empty completion has none and is left out of
   that metric's pairs), with the same CIs and Wilcoxon tests against the clean model and the reference.

The loss ratio of a method is its loss (minus its change) over the reference's loss at the same target: a
ratio of 0.5 or less in both UtilOdds and accuracy means it loses half or less of what constant addition
loses for the same behaviour. For fluency the loss is the NLL increase.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tl_steer.analysis.capability import mc_accuracy
from tl_steer.analysis.gap import paired_test
from tl_steer.analysis.plots import _pyplot, finish_figure
from tl_steer.analysis.preference_utility import preference_utility
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.mc import MCItem, check_mc_items
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention, check_grid

if TYPE_CHECKING:
    from tl_steer.analysis.generation_sweep import TextBehavior

DEFAULT_MS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def match_strength(ms: Sequence[float], gains: Sequence[float], target_gain: float, side: float) -> float:
    """The strength at which the piecewise-linear curve (ms, gains) first reaches ``target_gain``, walking
    outward from m = 0 on the side of ``side`` (its sign); NaN if the grid never reaches it.

    ``ms`` must include 0 (gain 0 there by definition of a gain)."""
    pairs = sorted(
        (abs(m), g)
        for m, g in zip(ms, gains, strict=True)
        if m == 0 or math.copysign(1.0, m) == math.copysign(1.0, side)
    )
    if not pairs or pairs[0][0] != 0:
        raise ConfigError("the strength grid must include m = 0 to match gains from")
    sign = 1.0 if side >= 0 else -1.0
    for (m0, g0), (m1, g1) in zip(pairs, pairs[1:], strict=False):
        lo, hi = min(g0, g1), max(g0, g1)
        if lo <= target_gain <= hi:
            frac = 0.0 if g1 == g0 else (target_gain - g0) / (g1 - g0)
            return sign * (m0 + frac * (m1 - m0))
    return math.nan


@dataclass
class MatchedGainResult:
    """``sweeps``: method, m, mean PrefOdds gain and UtilOdds change along each sweep. ``points``: one row per
    method and target (see :meth:`table`). ``items``: method, target, m, metric (pref_odds, util_odds,
    capability; with ``text`` also text_behavior and fluency_nll), item, value at the matched points, with the
    clean model as method "clean", target 0."""

    sweeps: pd.DataFrame
    points: pd.DataFrame
    items: pd.DataFrame
    reference: str
    targets: tuple[float, ...]
    level: float = 0.95

    def table(self) -> pd.DataFrame:
        """The matched points: method, target, m, pref_gain (reached at m), util_change and acc_change
        (against the clean model, with CIs), their p-values against the reference at the same target, and
        the loss ratios (method's loss / reference's loss); with ``text``, also text_change and fluency_change
        (generated text's concept score and NLL per token) with the same CIs, p-values and a fluency loss
        ratio."""
        return self.points.copy()

    def goal(self, target: float | None = None, ratio: float = 0.5) -> pd.DataFrame:
        """Per non-reference method at ``target`` (default: the largest): whether its UtilOdds and accuracy
        losses are both at most ``ratio`` times the reference's (a loss the reference does not have, <= 0,
        must then not be exceeded: the method's loss must be <= 0 too)."""
        t = max(self.targets) if target is None else float(target)
        rows = []
        ref = self.points[(self.points["method"] == self.reference) & (self.points["target"] == t)].iloc[0]
        for _, row in self.points[(self.points["target"] == t) & (self.points["method"] != self.reference)].iterrows():
            ok = []
            for key in ("util", "acc"):
                loss, ref_loss = -row[f"{key}_change"], -ref[f"{key}_change"]
                bound = ratio * ref_loss if ref_loss > 0 else 0.0
                ok.append(bool(np.isfinite(loss) and loss <= bound))
            rows.append(
                {"method": row["method"], "target": t, "util_ok": ok[0], "acc_ok": ok[1], "holds": ok[0] and ok[1]}
            )
        return pd.DataFrame(rows)

    def to_markdown(self, digits: int = 3) -> str:
        cols = [
            "method",
            "target",
            "m",
            "pref_gain",
            "util_change",
            "util_ci",
            "util_p_vs_ref",
            "util_loss_ratio",
            "acc_change",
            "acc_ci",
            "acc_p_vs_ref",
            "acc_loss_ratio",
            "max_sweep_gain",
        ]
        table = self.points.copy()
        extra = [key for key in ("text", "fluency") if f"{key}_change" in table.columns]
        for key in extra:
            table[f"{key}_ci"] = [
                f"[{a:.{digits}f}, {b:.{digits}f}]"
                for a, b in zip(table[f"{key}_low"], table[f"{key}_high"], strict=True)
            ]
            cols.insert(-1, f"{key}_change")
            cols.insert(-1, f"{key}_ci")
            cols.insert(-1, f"{key}_p_vs_ref")
        if extra:
            cols.insert(-1, "fluency_loss_ratio")
        table["util_ci"] = [
            f"[{a:.{digits}f}, {b:.{digits}f}]" for a, b in zip(table["util_low"], table["util_high"], strict=True)
        ]
        table["acc_ci"] = [
            f"[{a:.{digits}f}, {b:.{digits}f}]" for a, b in zip(table["acc_low"], table["acc_high"], strict=True)
        ]
        return table[cols].to_markdown(index=False, floatfmt=f".{digits}f")

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """UtilOdds change (left) and accuracy change (right) at the matched points, one marker per method
        and target, against the PrefOdds gain reached."""
        plt = _pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        markers = ("o", "s", "^", "D", "v", "P", "X")
        for i, (method, group) in enumerate(self.points.groupby("method", sort=False)):
            for ax, key in zip(axes, ("util", "acc"), strict=True):
                y = group[f"{key}_change"].to_numpy()
                err = np.vstack([y - group[f"{key}_low"].to_numpy(), group[f"{key}_high"].to_numpy() - y])
                ax.errorbar(
                    group["pref_gain"],
                    y,
                    yerr=np.abs(err),
                    marker=markers[i % len(markers)],
                    ls="-",
                    label=method,
                    capsize=3,
                )
        axes[0].set_ylabel("UtilOdds change vs clean")
        axes[1].set_ylabel("accuracy change vs clean")
        for ax in axes:
            ax.set_xlabel("PrefOdds gain reached (matched)")
            ax.axhline(0.0, color="grey", lw=0.8)
        axes[0].legend(fontsize=8)
        if title:
            fig.suptitle(title)
        return finish_figure(
            fig,
            path,
            f"Each method at the strengths matching {self.reference}'s PrefOdds gain at m = "
            f"{', '.join(f'{t:g}' for t in self.targets)} (left to right). Bars: {self.level:.0%} bootstrap CIs of "
            "the paired change.\nLook for: points above the reference's at the same gain "
            "(less utility or accuracy lost).",
            bottom=0.12,
        )


def matched_gain(
    model: Host,
    conditions: Mapping[str, Intervention],
    pairs: Sequence[ContrastivePair],
    mc_items: Sequence[MCItem],
    *,
    reference: str = "diffmean",
    targets: Sequence[float] = (1.0, 2.0),
    ms: Sequence[float] | Mapping[str, Sequence[float]] = DEFAULT_MS,
    batch_size: int = 16,
    level: float = 0.95,
    refine: int = 3,
    tol: float = 0.05,
    progress: bool = False,
    text: TextBehavior | None = None,
) -> MatchedGainResult:
    """Compare ``conditions`` (name -> intervention, the ``reference`` among them) at matched PrefOdds gain
    on ``pairs`` (held-out contrastive pairs) and ``mc_items``; see the module docstring.

    ``ms``: the sweep grid (one for all, or per condition name); 0 is added. The reference is also measured
    at every target exactly. ``refine``: at most this many further PrefOdds passes per matched point, each
    adding the measured point to the curve and interpolating again, until the gain reached is within
    ``tol`` (relative) of the reference's. ``text``: also judge generated text at each matched point (step 5
    of the module docstring; the clean model's completions are the paired baseline).
    """
    items = check_pairs(pairs)
    questions = check_mc_items(mc_items)
    if not conditions:
        raise ConfigError("give at least the reference condition")
    if reference not in conditions:
        raise ConfigError(f"the reference {reference!r} is not among the conditions {sorted(conditions)}")
    target_list = tuple(check_grid(targets, name="targets", unique=True))
    if 0.0 in target_list:
        raise ConfigError("a target of 0 matches nothing: give targets like (1, 2)")
    for name, iv in conditions.items():
        if not isinstance(iv, Intervention):
            raise ConfigError(f"condition {name!r} is a {type(iv).__name__}, not an Intervention")
        iv.check(model)
    if text is not None:
        from tl_steer.analysis.generation_sweep import TextBehavior

        if not isinstance(text, TextBehavior):
            raise ConfigError(f"text must be a TextBehavior, got {type(text).__name__}")
        text.check(model)
    grids = {}
    for name in conditions:
        raw = ms[name] if isinstance(ms, Mapping) else ms
        grid = set(check_grid(raw, name=f"ms[{name!r}]" if isinstance(ms, Mapping) else "ms")) | {0.0}
        if name == reference:
            grid |= set(target_list)
        grids[name] = sorted(grid)

    sweeps, sweep_rows = {}, []
    for name, iv in conditions.items():
        table = preference_utility(
            model, iv, items, grids[name], label=name, batch_size=batch_size, progress=progress
        ).table
        sweeps[name] = table
        base = table[table["m"] == 0.0]
        for m, group in table.groupby("m"):
            sweep_rows.append(
                {
                    "method": name,
                    "m": float(m),
                    "pref_gain": group["pref_odds"].mean() - base["pref_odds"].mean(),
                    "util_change": group["util_odds"].mean() - base["util_odds"].mean(),
                }
            )
    sweep_frame = pd.DataFrame(sweep_rows)
    clean_table = sweeps[reference][sweeps[reference]["m"] == 0.0].sort_values("pair")
    clean_pref, clean_util = clean_table["pref_odds"].to_numpy(), clean_table["util_odds"].to_numpy()
    clean_acc = mc_accuracy(model, questions, batch_size=batch_size).correct.numpy().astype(np.float64)
    clean_metrics = {"pref_odds": clean_pref, "util_odds": clean_util, "capability": clean_acc}
    if text is not None:
        clean_metrics |= _text_metrics(model, text, None, 0.0)
    frames = [_item_frame("clean", 0.0, 0.0, clean_metrics)]

    ref_gain = {}
    ref_sweep = sweep_frame[sweep_frame["method"] == reference]
    for t in target_list:
        ref_gain[t] = float(ref_sweep.loc[ref_sweep["m"] == t, "pref_gain"].iloc[0])

    values: dict[tuple[str, float], dict[str, np.ndarray]] = {}
    matched_m: dict[tuple[str, float], float] = {}
    clean_mean = float(clean_pref.mean())

    def measure(name: str, m: float) -> pd.DataFrame:
        if m in grids[name]:
            return sweeps[name][sweeps[name]["m"] == m].sort_values("pair")
        with warnings.catch_warnings():
            # one strength, compared with the clean point of the sweep
            warnings.filterwarnings("ignore", message="the strength grid has no m = 0")
            return preference_utility(
                model, conditions[name], items, [m], label=name, batch_size=batch_size, progress=progress
            ).table

    for name, iv in conditions.items():
        part = sweep_frame[sweep_frame["method"] == name]
        for t in target_list:
            curve_m, curve_gain = part["m"].tolist(), part["pref_gain"].tolist()
            m_star = t if name == reference else match_strength(curve_m, curve_gain, ref_gain[t], t)
            at = measure(name, m_star) if math.isfinite(m_star) else None
            # The sweep is coarse and the gain not linear in m: measure at the interpolated strength, add the
            # point to the curve and interpolate again, until the gain is within tol of the reference's.
            for _ in range(refine if name != reference else 0):
                if at is None:
                    break
                gain = float(at["pref_odds"].mean()) - clean_mean
                if abs(gain - ref_gain[t]) <= tol * abs(ref_gain[t]):
                    break
                curve_m.append(m_star)
                curve_gain.append(gain)
                m_star = match_strength(curve_m, curve_gain, ref_gain[t], t)
                at = measure(name, m_star) if math.isfinite(m_star) else None
            matched_m[(name, t)] = m_star
            if at is None:
                continue
            acc = mc_accuracy(model, questions, interventions=[iv], m=m_star, batch_size=batch_size)
            metrics = {
                "pref_odds": at["pref_odds"].to_numpy(),
                "util_odds": at["util_odds"].to_numpy(),
                "capability": acc.correct.numpy().astype(np.float64),
            }
            if text is not None:
                metrics |= _text_metrics(model, text, iv, m_star)
            values[(name, t)] = metrics
            frames.append(_item_frame(name, t, m_star, metrics))

    rows = []
    for name in conditions:
        for t in target_list:
            m_star = matched_m[(name, t)]
            row: dict[str, Any] = {"method": name, "target": t, "m": m_star, "reference_gain": ref_gain[t]}
            got = values.get((name, t))
            ref = values.get((reference, t))
            if got is None:
                rows.append(row | {k: math.nan for k in _point_keys(text is not None)})
                continue
            row["pref_gain"] = float((got["pref_odds"] - clean_pref).mean())
            compared = [("util", "util_odds"), ("acc", "capability")]
            if text is not None:
                compared += [("text", "text_behavior"), ("fluency", "fluency_nll")]
            for key, metric in compared:
                clean = clean_metrics[metric]
                # fluency has no value for an empty completion: such items leave that metric's pairs
                ok = np.isfinite(got[metric]) & np.isfinite(clean)
                diff = got[metric][ok] - clean[ok]
                row[f"{key}_change"] = float(diff.mean()) if diff.size else math.nan
                row[f"{key}_low"], row[f"{key}_high"] = bootstrap_ci(diff, level=level)
                row[f"{key}_p_vs_clean"] = (
                    paired_test(metric, got[metric][ok], clean[ok])["p"] if diff.size else math.nan
                )
                row[f"{key}_p_vs_ref"] = math.nan
                if ref is not None and name != reference:
                    both = np.isfinite(got[metric]) & np.isfinite(ref[metric])
                    if both.any():
                        row[f"{key}_p_vs_ref"] = paired_test(metric, got[metric][both], ref[metric][both])["p"]
            rows.append(row)
    points = pd.DataFrame(rows)
    best = sweep_frame.groupby("method", sort=False)["pref_gain"].max()
    points["max_sweep_gain"] = [float(best[name]) for name in points["method"]]
    for key in ("util", "acc"):
        ref_loss = {
            t: -float(points.loc[(points["method"] == reference) & (points["target"] == t), f"{key}_change"].iloc[0])
            for t in target_list
        }
        points[f"{key}_loss_ratio"] = [
            (-c / ref_loss[t]) if ref_loss[t] > 0 else math.nan
            for c, t in zip(points[f"{key}_change"], points["target"], strict=True)
        ]
    if text is not None:  # fluency's loss is the NLL increase
        ref_rise = {
            t: float(points.loc[(points["method"] == reference) & (points["target"] == t), "fluency_change"].iloc[0])
            for t in target_list
        }
        points["fluency_loss_ratio"] = [
            (c / ref_rise[t]) if ref_rise[t] > 0 else math.nan
            for c, t in zip(points["fluency_change"], points["target"], strict=True)
        ]
    return MatchedGainResult(sweep_frame, points, pd.concat(frames, ignore_index=True), reference, target_list, level)


def _point_keys(with_text: bool) -> list[str]:
    keys = ("util", "acc", "text", "fluency") if with_text else ("util", "acc")
    return [f"{k}_{s}" for k in keys for s in ("change", "low", "high", "p_vs_clean", "p_vs_ref")] + ["pref_gain"]


def _text_metrics(model: Host, text: TextBehavior, iv: Intervention | None, m: float) -> dict[str, np.ndarray]:
    """Greedy completions of ``text.prompts`` under ``iv`` at ``m`` (``None``: the clean model), judged on the
    clean model: the probe judge's P(concept | text) (empty completion: 0) and the fluency judge's NLL per
    completion token (empty completion: NaN)."""
    from tl_steer.generation import generate
    from tl_steer.judges import FluencyJudge

    steered = iv is not None and m != 0.0
    table = generate(
        model,
        iv if steered else None,
        text.prompts,
        [m if steered else 0.0],
        max_new_tokens=text.max_new_tokens,
        batch_size=text.batch_size,
        chat=text.chat,
    ).sort_values("item")
    prompts, completions = table["prompt"].tolist(), table["completion"].tolist()
    concept = text.judge.score(model, prompts, completions)["concept"]
    nll = FluencyJudge(chat=text.chat, batch_size=text.batch_size).score(model, prompts, completions)["nll"]
    return {"text_behavior": np.nan_to_num(np.asarray(concept, dtype=np.float64), nan=0.0), "fluency_nll": nll}


def _item_frame(method: str, target: float, m: float, metrics: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.concat(
        [
            pd.DataFrame(
                {"method": method, "target": target, "m": m, "metric": k, "item": np.arange(len(v)), "value": v}
            )
            for k, v in metrics.items()
        ],
        ignore_index=True,
    )


__all__ = ["DEFAULT_MS", "MatchedGainResult", "match_strength", "matched_gain"]
