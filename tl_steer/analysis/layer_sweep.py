"""Where to steer: PrefOdds and UtilOdds of one method's intervention at every layer of a grid, per strength m.

For each layer l of ``layers`` the method's intervention is built at the hook of that layer, and every pair is
scored at every strength of ``ms`` (PrefOdds and UtilOdds as in docs/methods.md#2-preference-and-utility;
the same NLLs as :func:`tl_steer.preference_utility` run once per layer).

Cost. An intervention at layer l leaves the residual stream entering block l clean, whatever m. So each
batch runs ONE clean forward pass, keeps the residual entering every layer of the grid (and the clean
NLL, which is m = 0 for every layer), and each (layer, m != 0) runs only blocks l.. from its residual.
With L layers in the model, a grid of layers l and k non-zero strengths costs, in blocks per batch,

    L + sum_l k (L - l)        (separate cached-prefix sweeps: sum_l [l + (k + 1)(L - l)])

DiffMean at every layer comes from one pass over the training pairs that reads all the layers' hooks at once
(:func:`diffmean_layers`), not one pass per layer.

The best layer (:meth:`LayerSweepResult.best_layer`) is chosen on the training pairs by a stated rule and
confirmed on the test pairs: the largest mean PrefOdds gain over clean at m = 1 among the layers whose mean
UtilOdds at m = 1 stays within 1 nat of clean.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from tl_steer.analysis.preference_utility import DEFAULT_EPS, _tokenize_pairs, odds_frame, warn_clipped
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.dtypes import master_dtype
from tl_steer.errors import ConfigError, DataError
from tl_steer.hookpoints import HookSite, get_act_name, validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, Intervention, check_grid
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike, prompt_boundary
from tl_steer.prefix import CleanPrefix
from tl_steer.scoring import (
    Reduction,
    Tokenized,
    batches,
    max_batch_tokens,
    nll_from_final,
    nll_from_logits,
    pad_right,
    pad_token_id,
    scores_from_final,
    tokenize_completions,
)
from tl_steer.steering import build_hooks

MethodLike = Literal["diffmean", "split_vector"] | Callable[[Host, Sequence[ContrastivePair], str], Intervention]
BestRule = Literal["max_pref_gain_within_util"]


# ----- the grid ----------------------------------------------------------------------------------------
def layer_hook(model: Host, hook: str, layer: int) -> str:
    """The hook name of ``layer`` for ``hook``: a hook kind (``"resid_post"``, ``"resid_pre"``, ``"mlp_out"``,
    ... as TransformerLens' ``get_act_name``) or a template with ``{layer}`` (``"blocks.{layer}.hook_resid_mid"``),
    validated against the model."""
    if not isinstance(hook, str) or not hook:
        raise ConfigError(f"hook must be a hook kind like 'resid_post' or a template with {{layer}}, got {hook!r}")
    if "{layer}" in hook:
        name = hook.format(layer=layer)
    elif hook.startswith("blocks."):
        raise ConfigError(
            f"hook {hook!r} names one layer; give a kind like 'resid_post' or a template like "
            "'blocks.{layer}.hook_resid_post'"
        )
    else:
        try:
            name = get_act_name(hook, layer)
        except Exception as exc:  # TransformerLens raises several kinds for an unknown kind
            raise ConfigError(f"unknown hook kind {hook!r}; use e.g. 'resid_post', 'resid_pre', 'mlp_out'") from exc
    return validate_hook(model, name)


def check_layers(model: Host, layers: object) -> list[int]:
    """``layers`` as a list of distinct block indices of the model, or a :class:`ConfigError`."""
    n_layers = model.cfg.n_layers
    if isinstance(layers, (str, bytes, numbers.Integral)):
        raise ConfigError(f"layers must be a sequence of block indices, e.g. layers=[2, 4, 6], got {layers!r}")
    try:
        values = list(layers)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigError(f"layers must be a sequence of block indices, got {type(layers).__name__}") from exc
    if not values:
        raise ConfigError(f"the layer grid is empty; give e.g. layers=[{n_layers // 3}, {2 * n_layers // 3}]")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"layers must be integers, got {value!r}")
        if not 0 <= int(value) < n_layers:
            raise ConfigError(f"layer {value} is past the model: it has {n_layers} blocks (layers 0..{n_layers - 1})")
        out.append(int(value))
    if len(set(out)) != len(out):
        repeated = sorted({v for v in out if out.count(v) > 1})
        raise ConfigError(f"the layer grid has repeated layers: {repeated}")
    return out


# ----- building the interventions -------------------------------------------------------------------------
def diffmean_layers(
    model: Host,
    pairs: Sequence[ContrastivePair],
    hooks: Sequence[str],
    *,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 16,
) -> dict[str, AddVector]:
    """DiffMean (:func:`tl_steer.diffmean`, ``reduce="mean"``) at every hook of ``hooks`` from ONE pass over
    the pairs: each batch runs once (up to the last hook's block) and every hook's activation is averaged
    over the completion tokens, v_hook = mean_i [a_hook(q_i + A_p,i) - a_hook(q_i + A_n,i)]."""
    items = check_pairs(pairs)
    names = [validate_hook(model, h) for h in hooks]
    data = tokenize_completions(
        model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items], chat=chat
    )
    n_layers = model.cfg.n_layers
    last = max((HookSite.parse(h).layer for h in names), key=lambda x: -1 if x is None else x)
    stop = last + 1 if last is not None and last + 1 < n_layers else None
    pad = pad_token_id(model)
    lengths = [len(s) for s in data.sequences]
    sums: dict[str, Tensor] = {}
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[[Tensor, HookPoint], None]:
        # Keyed by the name asked for: a bridge calls the hook with its own name (hook.name), not the alias.
        def hook_fn(act: Tensor, hook: HookPoint) -> None:
            captured[name] = act.detach()

        return hook_fn

    with torch.no_grad():
        for idx in batches(lengths, batch_size, max_batch_tokens(model)):
            tokens = pad_right([data.sequences[i] for i in idx], pad, model.cfg.device or "cpu")
            captured.clear()
            model.run_with_hooks(
                tokens, fwd_hooks=[(h, capture(h)) for h in names], stop_at_layer=stop, return_type=None
            )
            for h in names:
                acts = captured[h].double()
                if h not in sums:  # the hook's width is known once it has run
                    sums[h] = torch.zeros(len(data), acts.shape[-1], dtype=torch.float64)
                for row, i in enumerate(idx):
                    sums[h][i] = acts[row, data.starts[i] : lengths[i]].mean(0).cpu()
    n = len(items)
    out = {}
    for h in names:
        vector = (sums[h][:n] - sums[h][n:]).mean(0)
        out[h] = AddVector(
            h,
            vector.to(master_dtype(model)),
            positions=positions,
            method="diffmean",
            info={"n_pairs": n, "reduce": "mean", "chat": chat, "norm": float(vector.norm())},
            model_identity=model_identity(model),
        )
    return out


def _build(
    model: Host,
    method: MethodLike,
    pairs: list[ContrastivePair],
    hooks: list[str],
    chat: bool,
    batch_size: int,
) -> dict[str, Intervention]:
    if method == "diffmean":
        return dict(diffmean_layers(model, pairs, hooks, chat=chat, batch_size=batch_size))
    if method == "split_vector":
        from tl_steer.methods.split import split

        out_split: dict[str, Intervention] = {}
        for h in hooks:
            site = HookSite.parse(h)
            if site.layer is None or h != f"blocks.{site.layer}.hook_resid_post":
                raise ConfigError(f"method 'split_vector' trains a vector at resid_post; got hook {h!r}")
            out_split[h] = split(model, pairs, site.layer, "vector", chat=chat, progress=False)[0]
        return out_split
    if isinstance(method, str) or not callable(method):
        raise ConfigError(
            f"method must be 'diffmean' or a callable method(model, pairs, hook) -> Intervention, got {method!r}"
        )
    out: dict[str, Intervention] = {}
    for h in hooks:
        iv = method(model, pairs, h)
        if not isinstance(iv, Intervention):
            raise ConfigError(f"method({h!r}) returned {type(iv).__name__}, not an Intervention")
        out[h] = iv
    return out


# ----- scoring ------------------------------------------------------------------------------------------
def _sweep_layers(
    model: Host,
    interventions: dict[int, Intervention],
    data: Tokenized,
    grid: list[float],
    reduction: Reduction,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(clean NLL [n_items], {layer: NLL [len(grid), n_items]}) with m = 0 entries equal to the clean NLL.

    One clean pass per batch keeps the residual entering each layer's first edited block; each (layer,
    m != 0) then runs only the blocks from there (:class:`~tl_steer.prefix.CleanPrefix`)."""
    n_layers = model.cfg.n_layers
    prefixes = {layer: CleanPrefix(model, iv.first_layer(n_layers)) for layer, iv in interventions.items()}
    names = {f"blocks.{p.start}.hook_resid_pre" for p in prefixes.values() if p.start is not None}
    from_final = {layer: scores_from_final(model, [iv]) for layer, iv in interventions.items()}
    clean_from_final = scores_from_final(model, [])
    lengths = [len(s) for s in data.sequences]
    groups = batches(lengths, batch_size, max_batch_tokens(model))
    clean = np.empty(len(data), dtype=np.float64)
    out = {layer: np.empty((len(grid), len(data)), dtype=np.float64) for layer in interventions}
    steered = [m for m in grid if m != 0.0]
    bar = tqdm(
        total=len(groups) * (1 + len(steered) * len(interventions)), desc=desc, unit="pass", disable=not progress
    )
    pad = pad_token_id(model)
    with torch.no_grad():
        for idx in groups:
            tokens, starts, lens = data.batch(idx, pad, model.cfg.device or "cpu")
            with prompt_boundary(starts):
                if clean_from_final:
                    final, cache = model.run_with_cache(
                        tokens, names_filter=lambda name: name in names, stop_at_layer=n_layers
                    )
                    assert isinstance(final, Tensor)
                    clean_nll = nll_from_final(model, final, tokens, starts, lens, reduction).double().cpu().numpy()
                else:
                    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
                    assert isinstance(logits, Tensor)
                    clean_nll = nll_from_logits(logits, tokens, starts, lens, reduction).double().cpu().numpy()
                    del logits
                clean[idx] = clean_nll
                bar.update(1)
                for layer, iv in interventions.items():
                    prefix = prefixes[layer]
                    resid = cache[f"blocks.{prefix.start}.hook_resid_pre"] if prefix.start is not None else None
                    for j, m in enumerate(grid):
                        if m == 0.0:
                            out[layer][j, idx] = clean_nll
                            continue
                        hooks = build_hooks(model, [iv], m, check=False)
                        with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]
                            nll = prefix.nll(tokens, resid, starts, lens, reduction, from_final=from_final[layer])
                        out[layer][j, idx] = nll.double().cpu().numpy()
                        bar.update(1)
    bar.close()
    return clean, out


# ----- the result ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BestLayer:
    """The layer chosen on the training pairs by ``rule``, with its numbers on both splits (mean PrefOdds
    gain and mean UtilOdds change over clean at strength ``m``, nats); ``layer`` is None when no layer
    passed the rule, and the test numbers are NaN without test pairs."""

    layer: int | None
    rule: str
    m: float
    train_pref_gain: float
    train_util_change: float
    test_pref_gain: float
    test_util_change: float

    def __str__(self) -> str:
        if self.layer is None:
            return f"no layer passed the rule ({self.rule}, m={self.m:g})"
        return (
            f"layer {self.layer} (m={self.m:g}, {self.rule}): PrefOdds gain {self.train_pref_gain:+.2f} nats on "
            f"train, {self.test_pref_gain:+.2f} on test; UtilOdds change {self.train_util_change:+.2f} on train, "
            f"{self.test_util_change:+.2f} on test"
        )


@dataclass
class LayerSweepResult:
    """PrefOdds and UtilOdds per (split, layer, m, pair).

    ``table`` columns: split ("train" / "test"), layer, hook, m, pair, L_p, L_n, pref_odds, util_odds,
    util_clipped. The m = 0 rows are the clean model (the same for every layer).
    """

    table: pd.DataFrame
    method: str
    hook: str
    reduction: str
    eps: float
    interventions: dict[int, Intervention] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.table["layer"]))

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(self.table["split"]))

    def summary(self, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """Per split, layer and m: mean PrefOdds and UtilOdds, their change over clean (``pref_gain``,
        ``util_change``: mean over pairs of the per-pair difference to m = 0) with percentile-bootstrap CIs,
        and the clip count."""
        rows = []
        clean = self.table[self.table["m"] == 0.0].groupby(["split", "layer"], sort=False)
        base = {key: g.set_index("pair")[["pref_odds", "util_odds"]] for key, g in clean}
        for (split, layer, m), group in self.table.groupby(["split", "layer", "m"], sort=True):
            ref = base[(split, layer)].loc[group["pair"].to_numpy()]
            gain = group["pref_odds"].to_numpy() - ref["pref_odds"].to_numpy()
            change = group["util_odds"].to_numpy() - ref["util_odds"].to_numpy()
            row: dict[str, Any] = {"split": split, "layer": layer, "m": m, "n": len(group)}
            row.update({"pref_odds": group["pref_odds"].mean(), "util_odds": group["util_odds"].mean()})
            for name, values in (("pref_gain", gain), ("util_change", change)):
                low, high = bootstrap_ci(values, seed=seed, level=level)
                row.update({name: values.mean(), f"{name}_low": low, f"{name}_high": high})
            row["n_clipped"] = int(group["util_clipped"].sum())
            rows.append(row)
        return pd.DataFrame(rows)

    def best_layer(
        self, rule: BestRule = "max_pref_gain_within_util", *, m: float = 1.0, within: float = 1.0
    ) -> BestLayer:
        """The layer with the largest mean PrefOdds gain over clean at strength ``m`` among those whose mean
        UtilOdds at ``m`` is at most ``within`` nats below clean, chosen on the training pairs; its numbers
        on the test pairs confirm it (NaN without test pairs)."""
        if rule != "max_pref_gain_within_util":
            raise ConfigError(f"unknown rule {rule!r}; the rule is 'max_pref_gain_within_util'")
        table = self.summary()
        return choose_best_layer(table, m=m, within=within)

    def to_csv(self, path: str | Path, summary: bool = False) -> Path:
        """Write the per-pair table (or, with ``summary=True``, the per-cell summary) as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.summary() if summary else self.table).to_csv(path, index=False)
        return path

    def plot(self, path: str | Path | None = None, *, split: str = "train", title: str | None = None) -> Any:
        """Heatmaps layer x m of the mean PrefOdds gain and the mean UtilOdds change over clean (nats), side
        by side, on ``split``; saved as PNG when ``path`` is given. Returns the matplotlib figure."""
        return plot_layer_sweep(self.summary(), path, split=split, title=title or f"{self.method} at {self.hook}")


def choose_best_layer(summary: pd.DataFrame, *, m: float = 1.0, within: float = 1.0) -> BestLayer:
    """The rule of :meth:`LayerSweepResult.best_layer` applied to a summary table (columns split, layer, m,
    pref_gain, util_change)."""
    rule = f"max PrefOdds gain with UtilOdds within {within:g} nat of clean"
    train = summary[(summary["split"] == "train") & (summary["m"] == m)]
    if train.empty:
        raise ConfigError(f"the sweep has no m = {m:g} on the training pairs; add it to ms")
    ok = train[train["util_change"] >= -within]
    if ok.empty:
        nan = float("nan")
        return BestLayer(None, rule, m, nan, nan, nan, nan)
    best = ok.loc[ok["pref_gain"].idxmax()]
    layer = int(best["layer"])
    test = summary[(summary["split"] == "test") & (summary["m"] == m) & (summary["layer"] == layer)]
    t_gain = float(test["pref_gain"].iloc[0]) if not test.empty else float("nan")
    t_change = float(test["util_change"].iloc[0]) if not test.empty else float("nan")
    return BestLayer(layer, rule, m, float(best["pref_gain"]), float(best["util_change"]), t_gain, t_change)


def plot_layer_sweep(
    summary: pd.DataFrame, path: str | Path | None = None, *, split: str = "train", title: str | None = None
) -> Any:
    """Two heatmaps (rows: layer, columns: m): mean PrefOdds gain and mean UtilOdds change over clean, in
    nats, each on a colour scale centred on 0, with the value written in every cell."""
    from tl_steer.analysis.plots import _pyplot, finish_figure

    plt = _pyplot()
    part = summary[summary["split"] == split]
    if part.empty:
        raise ConfigError(f"the sweep has no {split!r} split; have {sorted(set(summary['split']))}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * part["layer"].nunique() + 2.4), dpi=120)
    for ax, col, name, cmap in (
        (axes[0], "pref_gain", "PrefOdds gain over clean (nats)", "RdBu"),
        (axes[1], "util_change", "UtilOdds change over clean (nats)", "RdBu"),
    ):
        grid = part.pivot(index="layer", columns="m", values=col).sort_index()
        values = grid.to_numpy(dtype=float)
        bound = float(np.nanmax(np.abs(values))) or 1.0
        image = ax.imshow(values, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", origin="lower")
        ax.set_xticks(range(grid.shape[1]), [f"{m:g}" for m in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(layer) for layer in grid.index])
        ax.set_xlabel("steering strength m (1 = the strength it was made for)")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        digits = 1 if bound >= 10 else 2
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.{digits}f}", ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, label="nats")
    if title:
        fig.suptitle(title, fontsize=10)
    n = int(part["n"].iloc[0])
    caption = (
        f"Mean over {n} {split} pairs of the per-pair change from the clean model (m = 0), per layer steered and "
        "strength m. Left: PrefOdds gain (blue: the positive completion gains). Right: UtilOdds change (red: the "
        "pair's completions together lose probability). A good layer is blue on the left at m > 0 and near white on "
        "the right."
    )
    return finish_figure(fig, path, caption, top=0.93 if title else 1.0)


# ----- the entry point ----------------------------------------------------------------------------------
def layer_sweep(
    model: Host,
    method: MethodLike,
    pairs: Sequence[ContrastivePair],
    layers: Sequence[int],
    ms: Sequence[float] = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0),
    *,
    hook: str = "resid_post",
    test_pairs: Sequence[ContrastivePair] | None = None,
    reduction: Reduction = "mean",
    chat: bool = False,
    batch_size: int = 16,
    eps: float = DEFAULT_EPS,
    progress: bool = True,
) -> LayerSweepResult:
    """Build ``method``'s intervention at the hook ``hook`` of every layer of ``layers`` from ``pairs``, and
    score PrefOdds and UtilOdds of ``pairs`` (split "train") and ``test_pairs`` (split "test") at every
    strength of ``ms`` (m = 0, the clean model, is always scored: it is the reference).

    Args:
        method: ``"diffmean"`` (all layers from one pass, :func:`diffmean_layers`), ``"split_vector"``
            (:func:`tl_steer.split` with ``form="vector"`` trained at each layer's resid_post, default
            settings) or a callable ``method(model, pairs, hook_name) -> Intervention``.
        hook: a hook kind (``"resid_post"``, ``"resid_pre"``, ...) or a template like
            ``"blocks.{layer}.hook_resid_mid"``.

    Raises:
        ConfigError: an empty, repeated or out-of-range layer grid, an empty or repeated strength grid, a bad
            hook or method, before any forward pass.
    """
    layer_list = check_layers(model, layers)
    grid = check_grid(ms, unique=True)
    if 0.0 not in grid:
        grid = sorted([*grid, 0.0])
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0 < eps < 1:
        raise ConfigError(f"eps must be in (0, 1), got {eps}")
    if not (method in ("diffmean", "split_vector") or (callable(method) and not isinstance(method, str))):
        raise ConfigError(
            f"method must be 'diffmean', 'split_vector' or a callable method(model, pairs, hook), got {method!r}"
        )
    if method == "split_vector" and hook != "resid_post":
        raise ConfigError(f"method 'split_vector' trains a vector at resid_post; got hook={hook!r}")
    names = {layer: layer_hook(model, hook, layer) for layer in layer_list}
    train = check_pairs(pairs)
    splits = {"train": train}
    if test_pairs is not None:
        splits["test"] = check_pairs(test_pairs)
    tokenized = {split: _tokenize_pairs(model, items, chat) for split, items in splits.items()}

    built = _build(model, method, train, list(names.values()), chat, batch_size)
    ivs = {layer: built[names[layer]] for layer in layer_list}
    for iv in ivs.values():
        build_hooks(model, [iv], 1.0)  # validate against the model before scoring
    label = ivs[layer_list[0]].method
    frames = []
    for split, items in splits.items():
        n = len(items)
        _, nll = _sweep_layers(
            model, ivs, tokenized[split], grid, reduction, batch_size, progress, f"layer sweep [{label}, {split}]"
        )
        for layer in layer_list:
            for j, m in enumerate(grid):
                L_p, L_n = nll[layer][j, :n], nll[layer][j, n:]
                if not (np.isfinite(L_p).all() and np.isfinite(L_n).all()):
                    raise DataError(f"non-finite NLL at layer {layer}, m={m} on the {split} pairs; use a smaller m")
                frames.append(odds_frame(L_p, L_n, eps, split=split, layer=layer, hook=names[layer], m=m))
    table = pd.concat(frames, ignore_index=True)
    warn_clipped(table, eps)
    return LayerSweepResult(table, label, hook, reduction, eps, ivs)


def layer_count(n_layers: int, starts: Sequence[int], n_steered: int) -> tuple[int, int]:
    """Block calls per batch: (this sweep, separate cached-prefix sweeps with m = 0 in each) for layers whose
    first edited block is ``starts`` and ``n_steered`` non-zero strengths (see the module docstring)."""
    sweep = n_layers + sum(n_steered * (n_layers - s) for s in starts)
    separate = sum(s + (n_steered + 1) * (n_layers - s) for s in starts)
    return sweep, separate


__all__ = [
    "BestLayer",
    "LayerSweepResult",
    "choose_best_layer",
    "diffmean_layers",
    "layer_count",
    "layer_hook",
    "layer_sweep",
    "plot_layer_sweep",
]
