"""The :class:`ManifoldProbe`: reference statistics of clean activations at one or more hooks, fitted from
a model's clean runs or from activations, and per-token distances from them with their percentiles among
held-out clean tokens (definitions in :mod:`tl_steer.analysis.manifold`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from tl_steer.analysis.manifold.distances import CALIBRATED, DISTANCES, _knn, _mahalanobis, _sae_error, _unit
from tl_steer.analysis.manifold.files import load_probe, save_probe
from tl_steer.analysis.manifold.inputs import ProbeSettings, _check_hooks, _check_settings, _stop_layer, _token_lists
from tl_steer.analysis.manifold.moments import HookStatistics, _Accumulator
from tl_steer.config import resolve
from tl_steer.errors import ConfigError, DataError, HookNameError, ShapeError
from tl_steer.hosts import Host
from tl_steer.interventions import hook_widths
from tl_steer.models import model_identity
from tl_steer.scoring import batches, max_batch_tokens, pad_right, pad_token_id


class ManifoldProbe:
    """Reference statistics of clean activations at one or more hooks, and per-token distances from them.

    Build it with :meth:`fit` (from a model and clean texts) or :meth:`from_activations`; score with
    :meth:`score` (a per-token table) or :meth:`distances` (arrays); save with :meth:`save`, read with
    :meth:`load`. See the module docstring for the definitions.
    """

    def __init__(
        self,
        stats: Mapping[str, HookStatistics],
        *,
        k: int = 32,
        knn_k: int = 10,
        n_reference: int = 4096,
        n_calibration: int = 4096,
        holdout: float = 0.2,
        outlier_factor: float | None = 10.0,
        seed: int = 0,
        shrinkage: float | None = None,
        identity: dict[str, Any] | None = None,
    ) -> None:
        _check_settings(k, knn_k, n_reference, n_calibration, holdout, outlier_factor, shrinkage)
        if not stats:
            raise ConfigError("a ManifoldProbe needs statistics for at least one hook")
        self.stats: dict[str, HookStatistics] = dict(stats)
        self.k = int(k)
        self.knn_k = int(knn_k)
        self.n_reference = int(n_reference)
        self.n_calibration = int(n_calibration)
        self.holdout = float(holdout)
        self.outlier_factor = None if outlier_factor is None else float(outlier_factor)
        self.seed = int(seed)
        self.shrinkage = None if shrinkage is None else float(shrinkage)
        self.model_identity = identity
        self.saes: dict[str, Any] = {}
        for state in self.stats.values():
            self._finalize(state)

    @property
    def hooks(self) -> list[str]:
        return list(self.stats)

    @property
    def settings(self) -> ProbeSettings:
        """The settings of this probe as one :class:`ProbeSettings`."""
        return ProbeSettings(
            k=self.k,
            knn_k=self.knn_k,
            n_reference=self.n_reference,
            n_calibration=self.n_calibration,
            holdout=self.holdout,
            outlier_factor=self.outlier_factor,
            seed=self.seed,
            shrinkage=self.shrinkage,
        )

    @property
    def widths(self) -> dict[str, int]:
        return {h: s.d for h, s in self.stats.items()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{h}: {s.n} tokens, d={s.d}" for h, s in self.stats.items())
        return f"ManifoldProbe({parts}; k={self.k}, knn_k={self.knn_k})"

    # ----- construction --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: Host,
        texts_or_tokens: str | Sequence[str] | Sequence[Sequence[int]] | Tensor,
        hooks: str | Sequence[str],
        *,
        k: int = 32,
        knn_k: int = 10,
        n_reference: int = 4096,
        n_calibration: int = 4096,
        holdout: float = 0.2,
        batch_size: int = 8,
        seed: int = 0,
        outlier_factor: float | None = 10.0,
        shrinkage: float | None = None,
        sae: Any | Mapping[str, Any] | None = None,
        progress: bool = True,
        settings: ProbeSettings | None = None,
    ) -> ManifoldProbe:
        """Fit reference statistics on clean runs of ``model`` over ``texts_or_tokens``.

        Args:
            texts_or_tokens: texts (a BOS token is prepended when ``model.cfg.default_prepend_bos``), lists
                of token ids, or a 2-D tensor of token ids without padding.
            hooks: one hook name or several; the forward pass stops after the last one's block.
            k: the dimension of the principal subspace of the Mahalanobis distance (at most d_model).
            knn_k: which nearest neighbour the kNN distance measures to.
            n_reference: size of the seeded subsample of reference tokens kept for the kNN distance.
            n_calibration: size of the seeded subsample of held-out tokens kept for the percentiles.
            holdout: the share of tokens held out of the statistics for calibration.
            seed: seeds the held-out draw and the subsamples.
            outlier_factor: tokens whose norm exceeds this many times the median norm of the first batch are
                excluded and counted (``None``: keep all).
            shrinkage: a fixed shrinkage intensity in [0, 1] instead of the Ledoit-Wolf estimate.
            sae: an SAE to calibrate the reconstruction error with (one hook), or ``{hook: sae}``.
            settings: k .. shrinkage as one :class:`ProbeSettings` (the keywords must then keep their defaults).

        Warns when a hook has fewer reference tokens than 2 x its width (the covariance is then poorly
        determined; the shrinkage keeps it invertible).
        """
        names = _check_hooks(model, hooks)
        sequences = _token_lists(model, texts_or_tokens)
        s = resolve(
            settings,
            ProbeSettings(
                k=k,
                knn_k=knn_k,
                n_reference=n_reference,
                n_calibration=n_calibration,
                holdout=holdout,
                outlier_factor=outlier_factor,
                seed=seed,
                shrinkage=shrinkage,
            ),
            "settings",
        ).check()
        widths = hook_widths(model, names)
        accumulators = {
            h: _Accumulator(widths[h], s.n_reference, s.n_calibration, s.holdout, s.outlier_factor) for h in names
        }
        rng = np.random.default_rng(s.seed)
        draws = [torch.from_numpy(rng.random((len(s), 2))) for s in sequences]
        stop = _stop_layer(model, names)
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Callable[[Tensor, HookPoint], None]:
            # Keyed by the name asked for: a bridge calls the hook with its own name, not the alias.
            def hook_fn(act: Tensor, hook: HookPoint) -> None:
                captured[name] = act.detach()

            return hook_fn

        lengths = [len(s) for s in sequences]
        pad = pad_token_id(model)
        groups = batches(lengths, batch_size, max_batch_tokens(model))
        with torch.no_grad():
            for idx in tqdm(groups, desc="manifold probe", unit="batch", disable=not progress):
                tokens = pad_right([sequences[i] for i in idx], pad, model.cfg.device or "cpu")
                captured.clear()
                model.run_with_hooks(
                    tokens, fwd_hooks=[(h, capture(h)) for h in names], stop_at_layer=stop, return_type=None
                )
                u = torch.cat([draws[i][1:] for i in idx])
                for h in names:
                    act = captured[h]
                    if act.ndim != 3:
                        raise ShapeError(
                            f"{h!r} has activations of shape {tuple(act.shape)}; a manifold probe needs a "
                            "hook with activations [batch, pos, d] (e.g. a residual stream or an MLP output)"
                        )
                    rows = torch.cat([act[r, 1 : lengths[i]] for r, i in enumerate(idx)])
                    accumulators[h].add(rows, u)
        probe = cls._from_accumulators(
            accumulators,
            **asdict(s),
            identity=model_identity(model),
        )
        probe._attach_saes(sae)
        return probe

    @classmethod
    def from_activations(
        cls,
        activations: Tensor | Iterable[Tensor] | Mapping[str, Tensor | Iterable[Tensor]],
        *,
        hook: str = "activations",
        k: int = 32,
        knn_k: int = 10,
        n_reference: int = 4096,
        n_calibration: int = 4096,
        holdout: float = 0.2,
        seed: int = 0,
        outlier_factor: float | None = 10.0,
        shrinkage: float | None = None,
        sae: Any | Mapping[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        settings: ProbeSettings | None = None,
    ) -> ManifoldProbe:
        """Fit on activations given directly: rows [n, d] (every row is a token; nothing is excluded but
        outliers), or an iterable of such chunks (streamed), or ``{hook: either}``. ``identity``
        (a :func:`tl_steer.model_identity`) records the model they came from, if any; ``settings`` as in
        :meth:`fit`."""
        s = resolve(
            settings,
            ProbeSettings(
                k=k,
                knn_k=knn_k,
                n_reference=n_reference,
                n_calibration=n_calibration,
                holdout=holdout,
                outlier_factor=outlier_factor,
                seed=seed,
                shrinkage=shrinkage,
            ),
            "settings",
        ).check()
        streams: Mapping[str, Tensor | Iterable[Tensor]] = (
            activations if isinstance(activations, Mapping) else {hook: activations}
        )
        accumulators: dict[str, _Accumulator] = {}
        for name, stream in streams.items():
            chunks: Iterable[Tensor] = [stream] if isinstance(stream, Tensor) else stream
            rng = np.random.default_rng(s.seed)
            acc: _Accumulator | None = None
            for chunk in chunks:
                if not isinstance(chunk, Tensor) or chunk.ndim != 2:
                    raise ShapeError(
                        f"activations for {name!r} must be tensors of shape [n, d], got "
                        f"{tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__}"
                    )
                if acc is None:
                    acc = _Accumulator(chunk.shape[1], s.n_reference, s.n_calibration, s.holdout, s.outlier_factor)
                elif chunk.shape[1] != acc.moments.d:
                    raise ShapeError(f"chunks of width {acc.moments.d} and {chunk.shape[1]} for {name!r}")
                acc.add(chunk, torch.from_numpy(rng.random((chunk.shape[0], 2))))
            if acc is None:
                raise DataError(f"no activations for {name!r}")
            accumulators[name] = acc
        if not accumulators:
            raise DataError("no activations given")
        probe = cls._from_accumulators(
            accumulators,
            **asdict(s),
            identity=identity,
        )
        probe._attach_saes(sae)
        return probe

    @classmethod
    def _from_accumulators(cls, accumulators: Mapping[str, _Accumulator], **settings: Any) -> ManifoldProbe:
        stats = {}
        for name, acc in accumulators.items():
            n, d = acc.moments.n, acc.moments.d
            if n < 2:
                raise DataError(
                    f"only {n} clean reference token(s) at {name!r} (after excluding position 0, padding, "
                    f"{acc.n_outliers} outlier(s) and {acc.n_holdout} held-out token(s)); give more or longer texts"
                )
            if n < 2 * d:
                warnings.warn(
                    f"only {n} clean reference tokens at {name!r} for width {d}: fewer than 2 x d = {2 * d} "
                    "needed for a stable covariance estimate (the shrinkage keeps it invertible, but "
                    "distances will be noisy); give more text",
                    UserWarning,
                    stacklevel=3,
                )
            if acc.n_holdout == 0:
                warnings.warn(
                    f"no held-out tokens at {name!r}: the percentiles are undefined (NaN); use holdout > 0",
                    UserWarning,
                    stacklevel=3,
                )
            stats[name] = HookStatistics(
                hook=name,
                moments=acc.moments,
                reference=acc.reference.rows,
                reference_keys=acc.reference.keys,
                calibration=acc.calibration.rows,
                calibration_keys=acc.calibration.keys,
                threshold=math.inf if acc.threshold is None else acc.threshold,
                n_outliers=acc.n_outliers,
                n_holdout=acc.n_holdout,
            )
        return cls(stats, **settings)

    def _finalize(self, state: HookStatistics) -> None:
        """Derive the shrunk covariance's eigenpairs, the normalised reference set and the calibration."""
        d = state.d
        state.shrinkage = state.moments.ledoit_wolf() if self.shrinkage is None else self.shrinkage
        evals, evecs = torch.linalg.eigh(state.shrunk_covariance())
        evals, evecs = evals.flip(0), evecs.flip(1)
        floor = max(float(evals[0]), 1e-300) * 1e-12  # a singular covariance (shrinkage 0, n < d)
        evals = evals.clamp_min(floor)
        kk = min(self.k, d)
        state.eigenvalues = evals
        state.components = evecs[:, :kk].contiguous()
        state.component_variances = evals[:kk].clone()
        state.residual_variance = float(evals[kk:].mean()) if kk < d else float("nan")
        state.reference_unit = _unit(state.reference.to(torch.float64) - state.mean).to(torch.float32)
        self._calibrate(state)

    def _calibrate(self, state: HookStatistics) -> None:
        if state.calibration.shape[0] == 0:
            state.calibrated = {}
            return
        values = self._raw_distances(state, state.calibration.to(torch.float64), None)
        state.calibrated = {name: np.sort(v) for name, v in values.items() if name in CALIBRATED}

    # ----- SAE -----------------------------------------------------------------------------------
    def attach_sae(self, sae: Any, hook: str | None = None) -> None:
        """Score the reconstruction error of ``sae`` at ``hook`` too, calibrated on the held-out tokens.

        ``sae`` is a sae-lens ``SAE`` or any object with ``encode(x)`` and ``decode(features)``; its input
        width (``sae.cfg.d_in`` where present) must be the hook's width. A sae-lens SAE whose recorded hook
        name differs from ``hook`` is accepted with a warning.
        """
        name = self._resolve_hook(hook)
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise TypeError(f"an SAE needs encode and decode methods; got {type(sae).__name__}")
        cfg = getattr(sae, "cfg", None)
        d_in = getattr(cfg, "d_in", None)
        if d_in is not None and int(d_in) != self.stats[name].d:
            raise ShapeError(f"the SAE reads width {d_in}, but {name!r} has width {self.stats[name].d}")
        metadata = getattr(cfg, "metadata", None)
        sae_hook = getattr(metadata, "hook_name", None)
        if isinstance(sae_hook, str) and sae_hook and sae_hook != name:
            warnings.warn(f"the SAE was trained at {sae_hook!r}, not at {name!r}", UserWarning, stacklevel=2)
        self.saes[name] = sae
        self._calibrate(self.stats[name])

    def _attach_saes(self, sae: Any | Mapping[str, Any] | None) -> None:
        if sae is None:
            return
        items = sae.items() if isinstance(sae, Mapping) else [(None, sae)]
        for hook, one in items:
            self.attach_sae(one, hook)

    # ----- distances -----------------------------------------------------------------------------
    def _resolve_hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.stats) != 1:
                raise HookNameError(f"this probe has several hooks ({', '.join(self.stats)}); say which with hook=")
            return next(iter(self.stats))
        if hook not in self.stats:
            raise HookNameError(f"this probe has no statistics at {hook!r}; it was fitted at {', '.join(self.stats)}")
        return hook

    def _rows(self, h: Tensor, name: str, what: str = "activations") -> Tensor:
        if not isinstance(h, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(h).__name__}")
        d = self.stats[name].d
        if h.ndim == 0 or h.shape[-1] != d:
            raise ShapeError(
                f"{what} of shape {tuple(h.shape)} do not fit the probe at {name!r}, which has width {d}; "
                "were they taken at another hook or from another model?"
            )
        return h.detach().reshape(-1, d).to("cpu", torch.float64)

    def mahalanobis(self, h: Float[Tensor, "... d"], hook: str | None = None) -> dict[str, np.ndarray]:
        """``{"mahalanobis_inside", "mahalanobis_outside", "mahalanobis"}`` per row of ``h``."""
        name = self._resolve_hook(hook)
        return _mahalanobis(self.stats[name], self._rows(h, name))

    def knn_distance(self, h: Float[Tensor, "... d"], hook: str | None = None) -> np.ndarray:
        """Distance of each centred, normalised row to its ``knn_k``-th nearest reference token."""
        name = self._resolve_hook(hook)
        return _knn(self.stats[name], self._rows(h, name), self.knn_k)

    def sae_error(self, h: Float[Tensor, "... d"], hook: str | None = None) -> np.ndarray:
        """|h - decode(encode(h))| / |h| per row, with the attached SAE (see :meth:`attach_sae`)."""
        name = self._resolve_hook(hook)
        if name not in self.saes:
            raise ConfigError(f"no SAE attached at {name!r}; call attach_sae first")
        return _sae_error(self.saes[name], self._rows(h, name))

    def distances(
        self,
        h: Float[Tensor, "... d"],
        hook: str | None = None,
        clean: Float[Tensor, "... d"] | None = None,
    ) -> dict[str, np.ndarray]:
        """Every distance per row of ``h`` (flattened over leading dims), float64 arrays: norm, norm_ratio
        (with ``clean`` of the same shape), the three Mahalanobis parts, knn, and sae_error (with an SAE)."""
        name = self._resolve_hook(hook)
        rows = self._rows(h, name)
        clean_rows = None
        if clean is not None:
            if not isinstance(clean, Tensor) or clean.shape != h.shape:
                raise ShapeError(
                    f"clean activations of shape {tuple(getattr(clean, 'shape', ()))} do not match the steered "
                    f"ones {tuple(h.shape)}"
                )
            clean_rows = self._rows(clean, name, "clean activations")
        return self._raw_distances(self.stats[name], rows, clean_rows)

    def _raw_distances(self, state: HookStatistics, rows: Tensor, clean: Tensor | None) -> dict[str, np.ndarray]:
        norm = rows.norm(dim=1)
        out: dict[str, np.ndarray] = {"norm": norm.numpy()}
        if clean is not None:
            out["norm_ratio"] = (norm / clean.norm(dim=1)).numpy()
        out.update(_mahalanobis(state, rows))
        out["knn"] = _knn(state, rows, self.knn_k)
        if state.hook in self.saes:
            out["sae_error"] = _sae_error(self.saes[state.hook], rows)
        return {name: out[name] for name in DISTANCES if name in out}

    def percentile(self, name: str, values: np.ndarray | Tensor, hook: str | None = None) -> np.ndarray:
        """The share of held-out clean tokens with a smaller ``name`` distance (ties count half)."""
        state = self.stats[self._resolve_hook(hook)]
        reference = (state.calibrated or {}).get(name)
        if name not in CALIBRATED:
            raise ConfigError(f"{name!r} has no calibration; calibrated distances: {', '.join(CALIBRATED)}")
        v = np.asarray(values, dtype=np.float64)
        if reference is None or reference.size == 0:
            return np.full(v.shape, np.nan)
        below = np.searchsorted(reference, v, side="left")
        at_or_below = np.searchsorted(reference, v, side="right")
        pct = (below + at_or_below) / (2.0 * reference.size)
        return np.where(np.isnan(v), np.nan, pct)

    def with_percentiles(self, values: Mapping[str, np.ndarray], hook: str | None = None) -> dict[str, np.ndarray]:
        """``values`` (from :meth:`distances`) with a ``<name>_pct`` entry after each calibrated distance."""
        name = self._resolve_hook(hook)
        out: dict[str, np.ndarray] = {}
        for key, v in values.items():
            out[key] = v
            if key in CALIBRATED:
                out[f"{key}_pct"] = self.percentile(key, v, name)
        return out

    def score(
        self,
        activations: Tensor | Mapping[str, Tensor] | Any,
        clean: Tensor | Mapping[str, Tensor] | Any | None = None,
        *,
        hook: str | None = None,
        mask: Bool[Tensor, "batch pos"] | None = None,
        skip_first: bool = True,
    ) -> pd.DataFrame:
        """A table with one row per token: every distance and its percentile among held-out clean tokens.

        Args:
            activations: a tensor [batch, pos, d] or [n, d] at ``hook`` (default: the probe's only hook),
                or a mapping / TransformerLens ``ActivationCache`` holding the probe's hooks.
            clean: the clean activations at the same positions, same structure; adds ``norm_ratio``.
            mask: [batch, pos], True at the tokens to score (e.g. not padding); for 3-D inputs.
            skip_first: leave out position 0 (BOS / attention sink), as the fit does; for 3-D inputs.

        Columns: hook, row, position (missing for [n, d] inputs), norm, norm_pct, norm_ratio (with clean),
        mahalanobis_inside(_pct), mahalanobis_outside(_pct), mahalanobis(_pct), knn(_pct),
        sae_error(_pct) (with an SAE), and outlier (norm above the fit's outlier threshold).
        """
        acts = self._hook_dict(activations, hook)
        cleans = self._hook_dict(clean, hook, required=list(acts)) if clean is not None else {}
        frames = []
        for name, h in acts.items():
            if not isinstance(h, Tensor):
                raise TypeError(f"activations at {name!r} must be a tensor, got {type(h).__name__}")
            c = cleans.get(name)
            if c is not None and (not isinstance(c, Tensor) or c.shape != h.shape):
                raise ShapeError(
                    f"clean activations at {name!r} of shape {tuple(getattr(c, 'shape', ()))} do not match "
                    f"{tuple(h.shape)}"
                )
            self._rows(h[:0] if h.ndim else h, name)  # width check before any work
            if h.ndim == 3:
                keep = torch.ones(h.shape[:2], dtype=torch.bool)
                if mask is not None:
                    if mask.shape != h.shape[:2]:
                        raise ShapeError(f"mask of shape {tuple(mask.shape)} does not fit activations {tuple(h.shape)}")
                    keep &= mask.to("cpu", torch.bool)
                if skip_first:
                    keep[:, 0] = False
                row_idx, pos_idx = torch.nonzero(keep, as_tuple=True)
                sel = h.detach().to("cpu")[row_idx, pos_idx]
                sel_clean = c.detach().to("cpu")[row_idx, pos_idx] if c is not None else None
                index = {"row": row_idx.numpy(), "position": pd.array(pos_idx.numpy(), dtype="Int64")}
            elif h.ndim == 2:
                sel, sel_clean = h, c
                index = {"row": np.arange(h.shape[0]), "position": pd.array([pd.NA] * h.shape[0], dtype="Int64")}
            else:
                raise ShapeError(f"activations must be [batch, pos, d] or [n, d], got shape {tuple(h.shape)}")
            values = self.distances(sel, name, sel_clean)
            columns = self.with_percentiles(values, name)
            columns["outlier"] = values["norm"] > self.stats[name].threshold
            frames.append(pd.DataFrame({"hook": name, **index, **columns}))
        return pd.concat(frames, ignore_index=True)

    def _hook_dict(self, value: Any, hook: str | None, required: list[str] | None = None) -> dict[str, Any]:
        if isinstance(value, Tensor):
            return {self._resolve_hook(hook): value}
        if hasattr(value, "keys") and hasattr(value, "__getitem__"):
            keys = set(value.keys())
            wanted = required or ([self._resolve_hook(hook)] if hook is not None else [h for h in self.stats])
            found = {h: value[h] for h in wanted if h in keys}
            missing = [h for h in (required or []) if h not in keys]
            if missing or not found:
                raise HookNameError(
                    f"no activations at {', '.join(missing or wanted)} in the given cache or mapping "
                    f"(it holds {', '.join(sorted(map(str, keys))[:8]) or 'nothing'})"
                )
            return found
        raise TypeError(f"expected a tensor, a mapping of hook names to tensors or an ActivationCache, got {value!r}")

    def summary(self) -> pd.DataFrame:
        """One row per hook: token counts, shrinkage, variance captured by the top-k subspace."""
        rows = []
        for name, s in self.stats.items():
            evals = s.eigenvalues if s.eigenvalues is not None else torch.zeros(1)
            kk = min(self.k, s.d)
            rows.append(
                {
                    "hook": name,
                    "d": s.d,
                    "n_reference_tokens": s.n,
                    "n_holdout": s.n_holdout,
                    "n_calibration": int(s.calibration.shape[0]),
                    "n_knn_reference": int(s.reference.shape[0]),
                    "n_outliers": s.n_outliers,
                    "outlier_threshold": s.threshold,
                    "shrinkage": s.shrinkage,
                    "k": kk,
                    "top_k_variance_share": float(evals[:kk].sum() / evals.sum()),
                    "residual_variance": s.residual_variance,
                    "sae": name in self.saes,
                }
            )
        return pd.DataFrame(rows)

    # ----- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the probe to one safetensors file (``.safetensors`` appended if missing), with its settings
        in JSON metadata. Attached SAEs are not saved: attach them again after :meth:`load`."""
        return save_probe(self, path)

    @classmethod
    def load(cls, path: str | Path, model: Host | None = None) -> ManifoldProbe:
        """Read a probe written by :meth:`save`. With ``model``, refuse one fitted on another model
        (:class:`~tl_steer.errors.ModelMismatchError`) or whose hooks the model lacks or has at another
        width (:class:`~tl_steer.errors.HookNameError`, :class:`~tl_steer.errors.ShapeError`)."""
        path = Path(path)
        return load_probe(cls, path, model)
