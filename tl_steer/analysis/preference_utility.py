"""Preference and utility on one log-odds scale, swept over the strength m (docs/methods.md, section 2).

For a pair (q, A_p, A_n), with L the completion NLL (mean per token by default, or summed):

    PrefOdds = L_n - L_p                        = log P(A_p|q) / P(A_n|q)
    P_u      = exp(-L_p) + exp(-L_n)
    UtilOdds = log(P_u / (1 - P_u))

UtilOdds is computed in log space, log P_u = logaddexp(-L_p, -L_n); where P_u reaches 1 - eps it is
clipped to 1 - eps (eps = 1e-6 by default) and the item is counted as clipped, so the result never holds
NaN or inf.

Speed: an intervention that changes nothing before layer l gives the clean residual stream entering
layer l for every strength, so it is computed once per batch (``stop_at_layer=l``) and only the layers
from l on run for each strength (``start_at_layer=l``), with both completions of all pairs in padded
batches. The result equals the plain per-strength full forward pass (tested to 1e-5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_steer.analysis.decay import DecayFit, fit_decay
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention, check_grid
from tl_steer.positions import prompt_boundary
from tl_steer.prefix import CleanPrefix
from tl_steer.scoring import (
    Reduction,
    Tokenized,
    batches,
    max_batch_tokens,
    pad_token_id,
    scores_from_final,
    tokenize_completions,
)
from tl_steer.steering import build_hooks

DEFAULT_MS: tuple[float, ...] = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
DEFAULT_EPS = 1e-6


def log_odds(
    L_p: Float[Tensor, " n"] | np.ndarray, L_n: Float[Tensor, " n"] | np.ndarray, eps: float = DEFAULT_EPS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(PrefOdds, UtilOdds, clipped) from the NLLs of the positive and negative completions.

    UtilOdds = log P_u - log(1 - P_u) with log P_u = logaddexp(-L_p, -L_n) clipped to log(1 - eps);
    ``clipped`` marks the items where the clip was applied.
    """
    lp = np.asarray(L_p, dtype=np.float64)
    ln = np.asarray(L_n, dtype=np.float64)
    pref = ln - lp
    log_pu = np.logaddexp(-lp, -ln)
    ceiling = math.log1p(-eps)
    clipped = log_pu > ceiling
    log_pu = np.minimum(log_pu, ceiling)
    util = log_pu - np.log(-np.expm1(log_pu))
    return pref, util, clipped


def odds_frame(L_p: np.ndarray, L_n: np.ndarray, eps: float, **keys: Any) -> pd.DataFrame:
    """One row per pair: the columns ``keys`` (constants such as label and m), then pair, L_p, L_n and
    :func:`log_odds`' pref_odds, util_odds and util_clipped; the per-pair table of a strength sweep."""
    pref, util, clipped = log_odds(L_p, L_n, eps)
    return pd.DataFrame(
        {
            **keys,
            "pair": np.arange(len(L_p)),
            "L_p": L_p,
            "L_n": L_n,
            "pref_odds": pref,
            "util_odds": util,
            "util_clipped": clipped,
        }
    )


def warn_clipped(table: pd.DataFrame, eps: float) -> None:
    """Warn, at the caller of the public function calling this, when UtilOdds was clipped in ``table``."""
    if table["util_clipped"].any():
        warnings.warn(
            f"{int(table['util_clipped'].sum())} of {len(table)} items had P_u >= 1 - {eps:g}; UtilOdds clipped there",
            stacklevel=3,
        )


def with_instruction(pairs: Sequence[ContrastivePair], instruction: str | None) -> list[ContrastivePair]:
    """The pairs with ``instruction`` and a newline prepended to every prompt (the prompting baseline)."""
    if not instruction:
        return list(pairs)
    return [ContrastivePair(f"{instruction}\n{p.prompt}", p.positive, p.negative) for p in pairs]


@dataclass
class PreferenceUtilityResult:
    """Per-pair log-odds for every strength of one or more conditions.

    ``table`` has one row per (label, m, pair): L_p, L_n, pref_odds, util_odds, util_clipped.
    """

    table: pd.DataFrame
    reduction: str
    eps: float
    _fits: dict[str, dict[str, DecayFit]] = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.table["label"]))

    def summary(self, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Per label and m: mean PrefOdds and UtilOdds with percentile-bootstrap CIs, and the clip count."""
        rows = []
        for (label, m), group in self.table.groupby(["label", "m"], sort=False):
            row: dict[str, Any] = {"label": label, "m": m, "n": len(group)}
            for col in ("pref_odds", "util_odds"):
                values = group[col].to_numpy()
                low, high = bootstrap_ci(values, seed=seed, level=level)
                row.update({col: values.mean(), f"{col}_low": low, f"{col}_high": high})
            row.update(
                {"L_p": group["L_p"].mean(), "L_n": group["L_n"].mean(), "n_clipped": int(group["util_clipped"].sum())}
            )
            rows.append(row)
        return pd.DataFrame(rows).sort_values(["label", "m"], kind="stable").reset_index(drop=True)

    def utility_range(self, within: float = 1.0) -> pd.DataFrame:
        """Per label, the strengths around m = 0 where mean UtilOdds stays within ``within`` nats of its
        m = 0 value: walking out from 0 on the grid in both directions, the last m on each side before it
        drops further (``m_low``, ``m_high``). Needs m = 0 in the grid."""
        rows = []
        summary = self.summary()
        for label in self.labels:
            part = summary[summary["label"] == label].sort_values("m")
            m, util = part["m"].to_numpy(), part["util_odds"].to_numpy()
            if 0.0 not in m:
                raise ConfigError(f"{label}: the grid has no m = 0, so there is no reference utility")
            zero = int(np.flatnonzero(m == 0.0)[0])
            floor = util[zero] - within
            low = zero
            while low > 0 and util[low - 1] >= floor:
                low -= 1
            high = zero
            while high < len(m) - 1 and util[high + 1] >= floor:
                high += 1
            rows.append({"label": label, "m_low": m[low], "m_high": m[high], "util_at_0": util[zero]})
        return pd.DataFrame(rows)

    @property
    def n_clipped(self) -> int:
        """How many (pair, m) items had P_u clipped below 1."""
        return int(self.table["util_clipped"].sum())

    def to_csv(self, path: str | Path, summary: bool = False) -> Path:
        """Write the per-pair table (or, with ``summary=True``, the per-m summary) as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.summary() if summary else self.table).to_csv(path, index=False)
        return path

    def fit_decay(self) -> dict[str, dict[str, DecayFit]]:
        """Fit the validity-decay model to the mean curves of every label.

        Returns ``{label: {"pref": DecayFit, "util": DecayFit}}``; each fit has ``params`` and ``r2``.
        """
        summary = self.summary()
        for label in self.labels:
            part = summary[summary["label"] == label]
            m = part["m"].to_numpy(dtype=np.float64)
            self._fits[label] = {
                "pref": fit_decay(m, part["pref_odds"].to_numpy(), kind="pref"),
                "util": fit_decay(m, part["util_odds"].to_numpy(), kind="util"),
            }
        return dict(self._fits)

    def plot(self, path: str | Path | None = None, *, fit: bool = False, title: str | None = None) -> Any:
        """Draw mean PrefOdds (solid) and UtilOdds (dashed) against m, with 95% CI bands, one colour per
        label; with ``fit=True`` overlay the decay-model fits (dotted). Saves a PNG if ``path`` is given
        and returns the matplotlib figure."""
        from tl_steer.analysis.plots import plot_preference_utility

        fits = (self._fits or self.fit_decay()) if fit else None
        return plot_preference_utility(self.summary(), path, fits=fits, reduction=self.reduction, title=title)

    @classmethod
    def concat(cls, results: Sequence[PreferenceUtilityResult]) -> PreferenceUtilityResult:
        """Several results (e.g. one per intervention) as one, for one table and one figure."""
        if not results:
            raise ConfigError("nothing to concatenate")
        if len({r.reduction for r in results}) > 1:
            raise ConfigError("cannot combine results computed with different reductions")
        return cls(pd.concat([r.table for r in results], ignore_index=True), results[0].reduction, results[0].eps)


def preference_utility(
    model: Host,
    intervention: Intervention | None,
    pairs: Sequence[ContrastivePair],
    ms: Sequence[float] = DEFAULT_MS,
    *,
    label: str | None = None,
    reduction: Reduction = "mean",
    instruction: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    eps: float = DEFAULT_EPS,
    cache_prefix: bool = True,
    progress: bool = True,
) -> PreferenceUtilityResult:
    """PrefOdds and UtilOdds of every pair at every strength m of ``intervention``.

    Args:
        intervention: the intervention to sweep, or ``None`` for no steering (then only m = 0 is used).
        pairs: the contrastive pairs to score (typically a held-out split).
        ms: the strength grid; should include 0 (the reference point), negative and positive values.
        label: the name of this condition in tables and plots (default: the intervention's method).
        reduction: "mean" NLL per completion token (default) or "sum".
        instruction: text prepended (with a newline) to every prompt: the prompting baseline, and with
            an intervention, steering plus prompting.
        eps: P_u is clipped into (0, 1 - eps] for UtilOdds.
        cache_prefix: compute the clean layers before the intervention once per batch (default).
    """
    items = with_instruction(check_pairs(pairs), instruction)
    grid = _check_grid(ms if intervention is not None else [0.0])
    if not 0 < eps < 1:
        raise ConfigError(f"eps must be in (0, 1), got {eps}")
    label = label or (intervention.method if intervention is not None else ("prompting" if instruction else "clean"))
    if intervention is not None:
        build_hooks(model, [intervention], 1.0)  # validate before any work
    data = _tokenize_pairs(model, items, chat)
    L = _sweep_nll(model, intervention, data, grid, reduction, batch_size, cache_prefix, progress, label)
    n = len(items)
    frames = []
    for j, m in enumerate(grid):
        L_p, L_n = L[j, :n], L[j, n:]
        bad = ~(np.isfinite(L_p) & np.isfinite(L_n))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            hint = (
                "; float16 activations overflow past 65504: use a smaller m, or the model in bfloat16 or float32"
                if model.cfg.dtype == torch.float16
                else ""
            )
            raise DataError(f"non-finite NLL at m={m} for pair {i} (prompt {items[i].prompt!r}){hint}")
        frames.append(odds_frame(L_p, L_n, eps, label=label, m=m))
    table = pd.concat(frames, ignore_index=True)
    warn_clipped(table, eps)
    return PreferenceUtilityResult(table, reduction, eps)


def _check_grid(ms: Sequence[float]) -> list[float]:
    grid = check_grid(ms, unique=True)
    if 0.0 not in grid:
        warnings.warn("the strength grid has no m = 0: there is no clean reference point", stacklevel=3)
    return grid


def _tokenize_pairs(model: Host, items: list[ContrastivePair], chat: bool) -> Tokenized:
    n = len(items)
    try:
        return tokenize_completions(
            model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items], chat=chat
        )
    except DataError as exc:
        # tokenize_completions numbers items 0..2n-1: say which pair and which side instead.
        message = str(exc)
        if message.startswith("item "):
            i = int(message.split(":")[0].removeprefix("item "))
            side = "positive" if i < n else "negative"
            raise DataError(f"pair {i % n} ({side} completion):{message.split(':', 1)[1]}") from exc
        raise


def _sweep_nll(
    model: Host,
    intervention: Intervention | None,
    data: Tokenized,
    grid: list[float],
    reduction: Reduction,
    batch_size: int,
    cache_prefix: bool,
    progress: bool,
    label: str,
) -> np.ndarray:
    """NLL [len(grid), n_items] of every item at every strength."""
    n_layers = model.cfg.n_layers
    start = intervention.first_layer(n_layers) if intervention is not None else n_layers
    prefix = CleanPrefix(model, start, enabled=cache_prefix)
    # the unembedding only where a completion token is scored (prompts are most of each sequence)
    from_final = scores_from_final(model, [intervention] if intervention is not None else [])
    lengths = [len(s) for s in data.sequences]
    groups = batches(lengths, batch_size, max_batch_tokens(model))
    out = np.empty((len(grid), len(data)), dtype=np.float64)
    bar = tqdm(total=len(groups) * len(grid), desc=f"preference-utility [{label}]", unit="pass", disable=not progress)
    pad = pad_token_id(model)
    with torch.no_grad():
        for idx in groups:
            tokens, starts, lens = data.batch(idx, pad, model.cfg.device or "cpu")
            with prompt_boundary(starts):
                resid = prefix.residual(tokens)
                for j, m in enumerate(grid):
                    hooks = build_hooks(model, [intervention], m, check=False) if intervention is not None else []
                    with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
                        nll = prefix.nll(tokens, resid, starts, lens, reduction, from_final=from_final)
                    out[j, idx] = nll.double().cpu().numpy()
                    bar.update(1)
    bar.close()
    return out
