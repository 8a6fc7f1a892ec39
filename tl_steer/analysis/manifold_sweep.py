"""Manifold distance against steering strength, joined with the preference-utility sweep (docs/methods.md, sec. 9).

:func:`manifold_sweep` steers the texts of contrastive pairs at every strength m, scores the activations at
a probe's hook token by token with a :class:`~tl_steer.analysis.manifold.ManifoldProbe`, averages the
distances over each text, and joins them with :func:`~tl_steer.analysis.preference_utility.preference_utility`
for the same m. It tests the claim of docs/methods.md, section 9, that utility log-odds fall as the manifold
distance rises, three ways (:meth:`ManifoldSweepResult.associations`):

- ``spearman_m``: Spearman correlation across m of the per-m means of the distance and of UtilOdds;
- ``spearman_prompts``: because both move with |m|, also across prompts at fixed m (the mean over m of
  the per-m Spearman correlation across pairs);
- ``gain_over_norm``: R^2 of UtilOdds on [distance, norm ratio] minus R^2 on [norm ratio] alone, over
  all pairs x m (ordinary least squares with an intercept): what the distance explains beyond how much
  the steering changed the activation norm.

Baselines (``baselines=True``): the same sweep with two :class:`~tl_steer.interventions.AddVector`
interventions of the same norm at the same hook and positions: a random direction drawn isotropically,
and one drawn from the clean covariance at that hook (N(0, S), then rescaled), so one can see whether a
learned direction stays nearer the clean distribution than a random one of its size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from tl_steer.analysis.manifold import CALIBRATED, ManifoldProbe, _stop_layer, auroc
from tl_steer.analysis.preference_utility import DEFAULT_EPS, PreferenceUtilityResult, preference_utility
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, ShapeError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, Intervention, check_grid, check_identity, hook_widths
from tl_steer.models import model_identity
from tl_steer.positions import PositionPolicy, prompt_boundary
from tl_steer.prefix import CleanPrefix
from tl_steer.scoring import Tokenized, batches, max_batch_tokens, pad_right, pad_token_id, tokenize_completions
from tl_steer.steering import build_hooks

ISOTROPIC = "random_isotropic"
COVARIANCE = "random_covariance"
Texts = Literal["positive", "both"]


def random_baselines(
    probe: ManifoldProbe,
    norm: float,
    *,
    hook: str | None = None,
    positions: PositionPolicy | str = "all",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    identity: dict[str, Any] | None = None,
) -> list[AddVector]:
    """Two random :class:`AddVector` baselines of norm ``norm`` at ``hook`` (a hook of the probe):

    ``random_isotropic``: a direction uniform on the sphere (a standard normal vector, normalised);
    ``random_covariance``: a draw from N(0, S), S the probe's clean empirical covariance at the hook,
    rescaled to ``norm``, so it points where clean activations vary most. Seeded.
    """
    name = probe._resolve_hook(hook)
    state = probe.stats[name]
    if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm >= 0):
        raise ConfigError(f"the baseline norm must be a finite number >= 0, got {norm!r}")
    g = torch.Generator().manual_seed(seed)
    iso = torch.randn(state.d, generator=g, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(state.covariance())
    z = torch.randn(state.d, generator=g, dtype=torch.float64)
    cov = evecs @ (evals.clamp_min(0.0).sqrt() * z)
    out = []
    for label, v in ((ISOTROPIC, iso), (COVARIANCE, cov)):
        vector = (v * (norm / float(v.norm()))).to(dtype)
        out.append(
            AddVector(
                name,
                vector,
                positions=positions,
                method=label,
                info={"baseline": True, "norm": float(norm), "seed": seed},
                model_identity=identity,
            )
        )
    return out


@dataclass
class ManifoldSweepResult:
    """Distances per pair and m for every condition, with the preference-utility results of the same m.

    ``table``: one row per (label, m, pair): the mean over the pair's tokens (position 0 excluded) of every
    distance and of its percentile (``*_pct``), ``n_tokens``, and L_p, L_n, pref_odds, util_odds,
    util_clipped from the preference-utility sweep. ``tokens``: one row per steered token (label, m, text,
    pair, side, position, every distance and percentile); ``clean_tokens``: the same for the clean run.
    ``baselines``: for each baseline label, its hook and norm.
    """

    table: pd.DataFrame
    tokens: pd.DataFrame
    clean_tokens: pd.DataFrame
    hook: str
    distances: list[str]
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    preference: PreferenceUtilityResult | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.table["label"]))

    def summary(self) -> pd.DataFrame:
        """Per label and m: the mean over pairs of every distance, percentile, PrefOdds and UtilOdds, and
        the AUROC of clean against steered tokens for every distance (``auroc_<distance>``)."""
        value_cols = [c for c in self.table.columns if c in self.distances or c.endswith("_pct")]
        rows = []
        for (label, m), group in self.table.groupby(["label", "m"], sort=False):
            row: dict[str, Any] = {"label": label, "m": m, "n": len(group)}
            row.update({c: float(group[c].mean()) for c in value_cols})
            row.update({c: float(group[c].mean()) for c in ("pref_odds", "util_odds")})
            steered = self.tokens[(self.tokens["label"] == label) & (self.tokens["m"] == m)]
            for name in self.distances:
                if name == "norm_ratio":  # the clean tokens' ratio is 1 by definition: no AUROC
                    continue
                row[f"auroc_{name}"] = auroc(self.clean_tokens[name].to_numpy(), steered[name].to_numpy())
            rows.append(row)
        return pd.DataFrame(rows).sort_values(["label", "m"], kind="stable").reset_index(drop=True)

    def associations(self, distances: Sequence[str] | None = None) -> pd.DataFrame:
        """How each distance goes with UtilOdds, per label and pooled over labels (``label == "all"``).

        Columns: ``spearman_m`` (and its p-value ``spearman_m_p``) across m of the per-m means (pooled:
        across the per-(label, m) means); ``spearman_prompts``, the mean over m of the Spearman correlation
        across pairs at that m (``n_m`` values of m where it is defined); ``r2_distance``, ``r2_norm_ratio``,
        ``r2_both``: R^2 of UtilOdds on [distance], [norm ratio], [distance, norm ratio] over pairs x m; and
        ``gain_over_norm`` = r2_both - r2_norm_ratio; ``spearman_prompts_delta``: like spearman_prompts but of the
        changes from m = 0 of the same pair (distance(m) - distance(0) against UtilOdds(m) - UtilOdds(0), over
        m != 0), which removes what makes some texts unusual or hard to begin with (NaN without m = 0); and
        ``gain_over_norm_delta``, the gain in R^2 on those changes (UtilOdds change on [distance change, norm
        ratio] against [norm ratio]).
        """
        names = list(distances) if distances is not None else list(self.distances)
        missing = [n for n in names if n not in self.table.columns]
        if missing:
            raise ConfigError(f"unknown distance(s) {missing}; this sweep has {self.distances}")
        rows = []
        parts = [(label, self.table[self.table["label"] == label]) for label in self.labels]
        if len(parts) > 1:
            # Pooled: the clean rows (m = 0) are the same for every label; count them once.
            first = self.labels[0]
            pooled = self.table[(self.table["m"] != 0.0) | (self.table["label"] == first)]
            parts.append(("all", pooled))
        for label, part in parts:
            means = part.groupby(["label", "m"], sort=False)[[*names, "util_odds"]].mean()
            for name in names:
                rho_m, p_m = _spearman(means[name].to_numpy(), means["util_odds"].to_numpy())
                per_m = [
                    _spearman(g[name].to_numpy(), g["util_odds"].to_numpy())[0]
                    for _, g in part.groupby(["label", "m"], sort=False)
                ]
                defined = [r for r in per_m if np.isfinite(r)]
                deltas = self._deltas(part, name)
                per_m_delta = [
                    r
                    for _, g in deltas.groupby(["label", "m"], sort=False)
                    if np.isfinite(r := _spearman(g["d_delta"].to_numpy(), g["u_delta"].to_numpy())[0])
                ]
                du, dd, dn = (deltas[c].to_numpy(dtype=np.float64) for c in ("u_delta", "d_delta", "norm_ratio"))
                gain_delta = _r2(du, dd, dn) - _r2(du, dn)
                y = part["util_odds"].to_numpy()
                x_d, x_n = part[name].to_numpy(), part["norm_ratio"].to_numpy()
                r2_d, r2_n, r2_both = _r2(y, x_d), _r2(y, x_n), _r2(y, x_d, x_n)
                rows.append(
                    {
                        "label": label,
                        "distance": name,
                        "spearman_m": rho_m,
                        "spearman_m_p": p_m,
                        "spearman_prompts": float(np.mean(defined)) if defined else float("nan"),
                        "n_m": len(defined),
                        "spearman_prompts_delta": float(np.mean(per_m_delta)) if per_m_delta else float("nan"),
                        "r2_distance": r2_d,
                        "r2_norm_ratio": r2_n,
                        "r2_both": r2_both,
                        "gain_over_norm": r2_both - r2_n,
                        "gain_over_norm_delta": gain_delta,
                    }
                )
        return pd.DataFrame(rows)

    def _deltas(self, part: pd.DataFrame, name: str) -> pd.DataFrame:
        """The rows of ``part`` with m != 0, with the changes of ``name`` and of UtilOdds from the same pair's
        m = 0 row of the same label (``d_delta``, ``u_delta``)."""
        frames = []
        for (label, m), group in part.groupby(["label", "m"], sort=False):
            clean = self.table[(self.table["label"] == label) & (self.table["m"] == 0.0)]
            if m == 0.0 or clean.empty:
                continue
            both = group.merge(clean[["pair", name, "util_odds"]], on="pair", suffixes=("", "_0"))
            frames.append(
                pd.DataFrame(
                    {
                        "label": label,
                        "m": m,
                        "d_delta": (both[name] - both[f"{name}_0"]).to_numpy(),
                        "u_delta": (both["util_odds"] - both["util_odds_0"]).to_numpy(),
                        "norm_ratio": both["norm_ratio"].to_numpy(),
                    }
                )
            )
        columns = ["label", "m", "d_delta", "u_delta", "norm_ratio"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def to_csv(
        self,
        path: str | Path,
        what: Literal["table", "summary", "associations", "tokens"] = "table",
        *,
        summary: bool = False,
    ) -> Path:
        """Write the per-pair table, the summary, the associations or the per-token table as CSV
        (``summary=True`` is ``what="summary"``, as in the other result classes)."""
        what = "summary" if summary else what
        frames: dict[str, Any] = {
            "table": lambda: self.table,
            "summary": self.summary,
            "associations": self.associations,
            "tokens": lambda: self.tokens,
        }
        if what not in frames:
            raise ConfigError(f"what must be one of {sorted(frames)}, got {what!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[what]().to_csv(path, index=False)
        return path

    def plot(self, path: str | Path | None = None, *, distance: str = "mahalanobis", title: str | None = None) -> Any:
        """Left: the mean percentile of ``distance`` (solid) and of the kNN distance (dashed) against m, per
        condition. Right: UtilOdds against ``distance`` (faint: pairs; markers: per-m means, labelled with m).
        Saves a PNG if ``path`` is given; returns the matplotlib figure."""
        from tl_steer.analysis.plots import _pyplot, finish_figure

        if distance not in self.distances or f"{distance}_pct" not in self.table.columns:
            raise ConfigError(f"distance must be one of the calibrated distances {self.distances}, got {distance!r}")
        plt = _pyplot()
        summary = self.summary()
        assoc = self.associations([distance])
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        unit = _UNITS.get(distance, "")
        for i, label in enumerate(self.labels):
            color = colors[i % len(colors)]
            part = summary[summary["label"] == label].sort_values("m")
            m = part["m"].to_numpy()
            left.plot(m, part[f"{distance}_pct"], "-", marker="o", ms=3, color=color, label=f"{label}: {distance}")
            if distance != "knn" and "knn_pct" in part:
                left.plot(m, part["knn_pct"], "--", marker="s", ms=3, color=color, label=f"{label}: knn")
            pairs = self.table[self.table["label"] == label]
            right.scatter(pairs[distance], pairs["util_odds"], s=4, alpha=0.15, color=color, lw=0)
            row = assoc[(assoc["label"] == label)].iloc[0]
            right.plot(
                part[distance],
                part["util_odds"],
                "-",
                marker="o",
                ms=4,
                color=color,
                label=f"{label} (Spearman across m {row['spearman_m']:+.2f}, "
                f"across prompts {row['spearman_prompts']:+.2f})",
            )
            for x, y, mm in zip(part[distance], part["util_odds"], m, strict=True):
                right.annotate(f"{mm:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=color)
        left.axhline(0.5, color="grey", lw=0.6)
        left.axvline(0.0, color="grey", lw=0.6)
        left.set_ylim(0, 1.02)
        left.set_xlabel("steering strength m")
        left.set_ylabel("percentile among held-out clean tokens (0-1)")
        left.set_title(f"Distance from the clean activations at {self.hook}", fontsize=9)
        left.legend(fontsize=6, loc="best")
        values = self.table[distance].to_numpy()
        if np.nanmin(values) > 0 and np.nanmax(values) / np.nanmin(values) > 30:
            right.set_xscale("log")
        right.set_xlabel(f"{distance} ({unit}; mean over the text's tokens)")
        right.set_ylabel("UtilOdds = log(P_u / (1 - P_u)) (nats)")
        right.set_title("Utility log-odds against distance", fontsize=9)
        right.legend(fontsize=6, loc="best")
        fig.suptitle(title or "Manifold distance of steered activations, and utility", fontsize=11)
        return finish_figure(
            fig,
            path,
            "Left: mean over pairs of the per-token percentile; 0.5 = a typical clean token, 0.99 = more unusual "
            "than 99% of held-out clean tokens. Baselines: random directions of the intervention's norm\n(isotropic; "
            "drawn from the clean covariance), same hook and positions. Right: faint dots are pairs, markers the "
            "means per m (labelled with m). Look for: UtilOdds falling as the distance rises.",
            bottom=0.06,
            top=0.96,
        )


_UNITS = {
    "mahalanobis": "whitened units",
    "mahalanobis_inside": "whitened units",
    "mahalanobis_outside": "whitened units",
    "knn": "unit-vector distance, 0-2",
    "norm": "activation units",
    "norm_ratio": "ratio",
    "sae_error": "fraction of |h|",
}


def manifold_sweep(
    model: Host,
    intervention: Intervention,
    pairs: Sequence[ContrastivePair],
    ms: Sequence[float],
    probe: ManifoldProbe,
    *,
    hook: str | None = None,
    baselines: bool = True,
    seed: int = 0,
    texts: Texts = "positive",
    label: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> ManifoldSweepResult:
    """Distances from the clean activations at every strength m, joined with preference and utility.

    Args:
        intervention: the intervention to sweep (any kind; it may act before, at or after the hook).
        pairs: the contrastive pairs; their texts are scored and their log-odds computed.
        ms: the strength grid (include 0).
        probe: a fitted :class:`ManifoldProbe` of this model.
        hook: where to measure (a hook of the probe; default its only hook).
        baselines: also sweep the two random baselines (:func:`random_baselines`, seeded with ``seed``).
            They go where the intervention acts, with its norm, when it is an :class:`AddVector` at a
            hook of the probe; otherwise at ``hook``, with the mean per-token displacement the intervention
            causes there at m = 1.
        texts: which texts' activations are scored: prompt + positive completion ("positive") or both
            completions ("both", averaged per pair). All tokens but position 0 count.
        label: the intervention's name in the tables (default: its method).
        chat, batch_size, progress: as in :func:`~tl_steer.analysis.preference_utility.preference_utility`.
    """
    items = check_pairs(pairs)
    grid = check_grid(ms, unique=True)
    if texts not in ("positive", "both"):
        raise ConfigError(f"texts must be 'positive' or 'both', got {texts!r}")
    name = probe._resolve_hook(hook)
    if probe.model_identity:
        check_identity(probe.model_identity, model)
    validate_hook(model, name)
    width = hook_widths(model, [name])[name]
    if width != probe.stats[name].d:
        raise ShapeError(f"the probe has width {probe.stats[name].d} at {name!r}, but the model has {width}")
    build_hooks(model, [intervention], 1.0)  # validate before any work
    label = label or intervention.method

    prompts = [p.prompt for p in items]
    completions = [p.positive for p in items]
    sides = ["positive"] * len(items)
    if texts == "both":
        prompts, completions = prompts * 2, completions + [p.negative for p in items]
        sides += ["negative"] * len(items)
    data = tokenize_completions(model, prompts, completions, chat=chat)
    owners = np.arange(len(data)) % len(items)

    conditions: list[tuple[str, Intervention]] = [(label, intervention)]
    info: dict[str, dict[str, Any]] = {}
    if baselines:
        if isinstance(intervention, AddVector) and intervention.hook in probe.stats:
            b_hook, norm = intervention.hook, float(intervention.vector.norm())
        else:
            b_hook, norm = name, _mean_displacement(model, intervention, data, name, batch_size)
        for iv in random_baselines(
            probe,
            norm,
            hook=b_hook,
            positions=intervention.positions,
            seed=seed,
            dtype=model.cfg.dtype,
            identity=model_identity(model),
        ):
            if iv.method == label:
                raise ConfigError(f"the label {label!r} is taken by a baseline; pass another label")
            conditions.append((iv.method, iv))
            info[iv.method] = {"hook": b_hook, "norm": norm}

    tokens, clean_tokens = _score_tokens(model, probe, name, data, conditions, grid, batch_size, progress)
    for frame in (tokens, clean_tokens):
        frame["pair"] = owners[frame["text"].to_numpy()]
        frame["side"] = np.asarray(sides)[frame["text"].to_numpy()]
    distances = [d for d in ("norm", "norm_ratio", *CALIBRATED) if d in tokens.columns]
    distances = list(dict.fromkeys(distances))
    values = [c for c in tokens.columns if c in distances or c.endswith("_pct")]
    per_text = tokens.groupby(["label", "m", "text"], sort=False)[values].mean()
    per_text["n_tokens"] = tokens.groupby(["label", "m", "text"], sort=False).size()
    per_text = per_text.reset_index()
    per_text["pair"] = owners[per_text["text"].to_numpy()]
    per_pair = per_text.groupby(["label", "m", "pair"], sort=False)[[*values, "n_tokens"]].mean().reset_index()

    preference = _preference(model, conditions, items, grid, chat, batch_size, progress)
    table = per_pair.merge(preference.table, on=["label", "m", "pair"], how="inner", validate="one_to_one")
    return ManifoldSweepResult(
        table=table,
        tokens=tokens,
        clean_tokens=clean_tokens,
        hook=name,
        distances=distances,
        baselines=info,
        preference=preference,
    )


def _preference(
    model: Host,
    conditions: list[tuple[str, Intervention]],
    items: list[ContrastivePair],
    grid: list[float],
    chat: bool,
    batch_size: int,
    progress: bool,
) -> PreferenceUtilityResult:
    """preference_utility for every condition; m = 0 (the clean model) is computed once and shared."""
    results: list[pd.DataFrame] = []
    for j, (lab, iv) in enumerate(conditions):
        share = j > 0 and 0.0 in grid
        own = [m for m in grid if not (share and m == 0.0)]
        parts = []
        if own:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="the strength grid has no m = 0")
                parts.append(
                    preference_utility(
                        model, iv, items, own, label=lab, chat=chat, batch_size=batch_size, progress=progress
                    ).table
                )
        if share:
            first = results[0]
            parts.append(first[first["m"] == 0.0].assign(label=lab))
        table = pd.concat(parts, ignore_index=True)
        order = {m: i for i, m in enumerate(grid)}
        table = table.sort_values(["m", "pair"], key=lambda c: c.map(order) if c.name == "m" else c, kind="stable")
        results.append(table.reset_index(drop=True))
    # preference_utility's defaults: mean NLL per token, eps = DEFAULT_EPS.
    return PreferenceUtilityResult(pd.concat(results, ignore_index=True), "mean", DEFAULT_EPS)


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    result = spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def _r2(y: np.ndarray, *xs: np.ndarray) -> float:
    """R^2 of the least-squares fit of y on [1, *xs] (NaN rows dropped)."""
    X = np.column_stack([np.ones_like(y), *xs])
    ok = np.isfinite(y) & np.isfinite(X).all(1)
    X, y = X[ok], y[ok]
    if y.size < X.shape[1] + 1:
        return float("nan")
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0.0:
        return float("nan")
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return 1.0 - float(((y - X @ coef) ** 2).sum()) / total


class _Runner:
    """Runs texts in padded batches up to ``hook`` and captures the activation there, reusing the clean
    prefix before the first layer any condition touches (``start_at_layer``)."""

    def __init__(self, model: Host, hook: str, first_layer: int) -> None:
        self.model = model
        self.hook = hook
        n_layers = model.cfg.n_layers
        self.clean_prefix = CleanPrefix(model, min(first_layer, HookSite.parse(hook).first_layer(n_layers)))
        self.stop = _stop_layer(model, [hook])
        self.captured: list[Tensor] = []

    def _capture(self, act: Tensor, hook: HookPoint) -> None:
        self.captured.append(act.detach())

    def prefix(self, tokens: Tensor) -> Tensor | None:
        return self.clean_prefix.residual(tokens)

    def run(self, tokens: Tensor, resid: Tensor | None, hooks: list[Any]) -> Tensor:
        self.captured.clear()
        with self.model.hooks(fwd_hooks=[*hooks, (self.hook, self._capture)]):
            self.clean_prefix.forward(tokens, resid, stop_at_layer=self.stop, return_type=None)
        return self.captured[-1]


def _score_tokens(
    model: Host,
    probe: ManifoldProbe,
    hook: str,
    data: Tokenized,
    conditions: list[tuple[str, Intervention]],
    grid: list[float],
    batch_size: int,
    progress: bool,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_layers = model.cfg.n_layers
    runner = _Runner(model, hook, min(iv.first_layer(n_layers) for _, iv in conditions))
    lengths = [len(s) for s in data.sequences]
    groups = batches(lengths, batch_size, max_batch_tokens(model))
    pad = pad_token_id(model)
    frames: list[pd.DataFrame] = []
    clean_frames: list[pd.DataFrame] = []
    steered = [m for m in grid if m != 0.0]
    bar = tqdm(total=len(groups) * (1 + len(conditions) * len(steered)), desc="manifold sweep", disable=not progress)

    def rows_of(act: Tensor, idx: list[int]) -> Tensor:
        return torch.cat([act[r, 1 : lengths[i]] for r, i in enumerate(idx)])

    with torch.no_grad():
        for idx in groups:
            tokens = pad_right([data.sequences[i] for i in idx], pad, model.cfg.device or "cpu")
            starts = torch.as_tensor([data.starts[i] for i in idx], device=tokens.device)
            text = np.concatenate([np.full(lengths[i] - 1, i) for i in idx])
            position = np.concatenate([np.arange(1, lengths[i]) for i in idx])
            with prompt_boundary(starts):
                resid = runner.prefix(tokens)
                clean = rows_of(runner.run(tokens, resid, []), idx)
                bar.update(1)
                clean_values = probe.with_percentiles(probe.distances(clean, hook, clean=clean), hook)
                clean_frame = pd.DataFrame({"text": text, "position": position, **clean_values})
                clean_frames.append(clean_frame)
                for lab, iv in conditions:
                    if 0.0 in grid:
                        frames.append(clean_frame.assign(label=lab, m=0.0))
                    for m in steered:
                        hooks = build_hooks(model, [iv], m, check=False)
                        act = rows_of(runner.run(tokens, resid, hooks), idx)
                        values = probe.with_percentiles(probe.distances(act, hook, clean=clean), hook)
                        frames.append(
                            pd.DataFrame({"label": lab, "m": m, "text": text, "position": position, **values})
                        )
                        bar.update(1)
    bar.close()
    tokens_table = pd.concat(frames, ignore_index=True)
    front = ["label", "m", "text", "position"]
    tokens_table = tokens_table[front + [c for c in tokens_table.columns if c not in front]]
    order = {m: j for j, m in enumerate(grid)}
    labels = {lab: j for j, (lab, _) in enumerate(conditions)}
    tokens_table["_label"] = tokens_table["label"].map(labels)
    tokens_table["_m"] = tokens_table["m"].map(order)
    tokens_table = tokens_table.sort_values(["_label", "_m", "text", "position"], kind="stable")
    tokens_table = tokens_table.drop(columns=["_label", "_m"]).reset_index(drop=True)
    return tokens_table, pd.concat(clean_frames, ignore_index=True)


def _mean_displacement(model: Host, intervention: Intervention, data: Tokenized, hook: str, batch_size: int) -> float:
    """The mean |h(m=1) - h(m=0)| at ``hook`` over the tokens (not position 0) the intervention changes."""
    runner = _Runner(model, hook, intervention.first_layer(model.cfg.n_layers))
    lengths = [len(s) for s in data.sequences]
    pad = pad_token_id(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in batches(lengths, batch_size, max_batch_tokens(model)):
            tokens = pad_right([data.sequences[i] for i in idx], pad, model.cfg.device or "cpu")
            starts = torch.as_tensor([data.starts[i] for i in idx], device=tokens.device)
            with prompt_boundary(starts):
                resid = runner.prefix(tokens)
                clean = runner.run(tokens, resid, [])
                steered = runner.run(tokens, resid, build_hooks(model, [intervention], 1.0, check=False))
            shift = torch.cat([(steered - clean)[r, 1 : lengths[i]] for r, i in enumerate(idx)]).double().norm(dim=1)
            moved = shift[shift > 1e-6 * clean.double().norm(dim=-1).mean()]
            total += float(moved.sum())
            count += int(moved.numel())
    if count == 0:
        raise ConfigError(f"the intervention does not change the activations at {hook!r} at m = 1; no baseline norm")
    return total / count


__all__ = ["ManifoldSweepResult", "manifold_sweep", "random_baselines"]
