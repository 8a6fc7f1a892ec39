"""Manifold-distance probes: how far activations sit from the distribution of clean activations at a hook.

methods.md section 6. A :class:`ManifoldProbe` is fitted on clean runs of a model (or on any array of
activations, :meth:`ManifoldProbe.from_activations`) and then scores activations token by token, steered
or not. Distances, each available on its own (:meth:`ManifoldProbe.distances`):

- ``norm`` = |h|, and ``norm_ratio`` = |h_steered| / |h_clean| at the same position (needs the clean run).
- ``mahalanobis``: sqrt((h - mu)^T Sigma^-1 (h - mu)), where Sigma is the Ledoit-Wolf shrunk covariance
  ``(1 - s) S + s (tr S / d) I`` of the clean tokens, held in low-rank-plus-isotropic form: the top-k
  eigenpairs (U_k, lambda_k) of Sigma, and sigma^2, the mean of its remaining d - k eigenvalues, for
  everything outside that subspace. With z = h - mu:
  ``mahalanobis_inside`` = |diag(lambda_k)^-1/2 U_k^T z| (the part inside the top-k principal subspace),
  ``mahalanobis_outside`` = |z - U_k U_k^T z| / sigma (the residual outside it), and
  ``mahalanobis`` = sqrt(inside^2 + outside^2). With k = d it is the exact Mahalanobis distance under Sigma.
  Scoring costs O(d k) per token, so it scales to a large d_model.
- ``knn``: the distance from the unit vector (h - mu)/|h - mu| to its knn_k-th nearest neighbour among a
  seeded subsample of clean tokens normalised the same way (= sqrt(2 - 2 cos)); exact, by a batched matmul
  and top-k. Centring first keeps the large mean of the residual stream from making every token look alike.
- ``sae_error`` = |h - decode(encode(h))| / |h| for an attached SAE (a sae-lens ``SAE``, or any object with
  ``encode`` and ``decode``).

Calibration: every distance except the norm ratio is also given as a percentile among held-out clean tokens
(``*_pct``: 0.99 = more unusual, i.e. larger, than 99% of clean tokens; mid-rank for ties; for the norm this
is one-sided too, so an unusually small norm gets a low percentile), and
:func:`auroc` gives the AUROC of clean against steered tokens.

Fitting streams the activations in padded batches and never holds them all. Statistics are accumulated in
float64 and merged with Chan et al.'s parallel formulas (:class:`RunningMoments`), so chunks merged in any
order give the same result. Besides the mean and the scatter matrix the merge carries sum |x - mu|^2 (x - mu)
and sum |x - mu|^4, whose merges are exact as well: that is all the Ledoit-Wolf shrinkage intensity needs, so
it is computed from the streaming statistics of all reference tokens (no subsample), and equals the usual
estimator (scikit-learn's ``ledoit_wolf_shrinkage``) on the same tokens. Position 0 (the BOS token, or the
first token that serves as the attention sink) is excluded, as is padding; tokens with an outlier norm
(> ``outlier_factor`` x the median norm of the first batch) are excluded from everything and counted. A
seeded share ``holdout`` of the tokens is kept out of the statistics for calibration; the same tokens are
held out at every hook. The random draws are made per text, in the order of the texts, so the fit does not
depend on the batch size, and the subsamples keep the rows with the smallest random keys, so they do not
depend on the order in which the rows arrive.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_steer.errors import ConfigError, DataError, FileFormatError, HookNameError, ShapeError, TlSteerError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.interventions import hook_widths
from tl_steer.io import (
    check_against_model,
    check_identity_field,
    check_saved_tensors,
    read_tensors,
    read_tl_steer_header,
)
from tl_steer.models import model_identity
from tl_steer.scoring import batches, max_batch_tokens, pad_right, pad_token_id

FORMAT = "tl_steer.manifold_probe"
VERSION = 1
#: Distances that have a percentile among held-out clean tokens (``sae_error`` only with an SAE attached).
CALIBRATED: tuple[str, ...] = ("norm", "mahalanobis_inside", "mahalanobis_outside", "mahalanobis", "knn", "sae_error")
#: Every distance :meth:`ManifoldProbe.distances` can return, in table order.
DISTANCES: tuple[str, ...] = (
    "norm",
    "norm_ratio",
    "mahalanobis_inside",
    "mahalanobis_outside",
    "mahalanobis",
    "knn",
    "sae_error",
)
_CHUNK = 4096


# ----- streaming statistics ---------------------------------------------------------------------------
@dataclass(eq=False)
class RunningMoments:
    """Moments of a stream of vectors in float64, merged exactly in any order (Chan et al. 1979).

    ``n`` rows, their ``mean``, the scatter matrix ``M2 = sum (x - mean)(x - mean)^T``, and for the
    Ledoit-Wolf intensity ``T3 = sum |x - mean|^2 (x - mean)`` and ``S4 = sum |x - mean|^4``.
    """

    n: int
    mean: Float[Tensor, " d"]
    M2: Float[Tensor, "d d"]
    T3: Float[Tensor, " d"]
    S4: float

    @classmethod
    def empty(cls, d: int) -> RunningMoments:
        zeros = torch.zeros(d, dtype=torch.float64)
        return cls(0, zeros, torch.zeros(d, d, dtype=torch.float64), zeros.clone(), 0.0)

    @classmethod
    def from_batch(cls, x: Float[Tensor, "n d"]) -> RunningMoments:
        """The moments of the rows of ``x``, computed directly (two-pass, float64)."""
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ShapeError(f"expected activations of shape [n, d], got {getattr(x, 'shape', type(x).__name__)}")
        x = x.detach().to("cpu", torch.float64)
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(0)
        y = x - mean
        sq = (y * y).sum(1)
        return cls(int(x.shape[0]), mean, y.T @ y, y.T @ sq, float((sq * sq).sum()))

    @property
    def d(self) -> int:
        return int(self.mean.shape[0])

    def merge(self, other: RunningMoments) -> RunningMoments:
        """The moments of the union of both streams (a new object; neither input changes)."""
        if other.d != self.d:
            raise ShapeError(f"cannot merge statistics of width {self.d} and {other.d}")
        if other.n == 0:
            return self.copy()
        if self.n == 0:
            return other.copy()
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        M2 = self.M2 + other.M2 + torch.outer(delta, delta) * (self.n * other.n / n)
        T3 = torch.zeros_like(mean)
        S4 = 0.0
        for part in (self, other):
            shift = mean - part.mean  # x - mean = (x - part.mean) - shift
            shift2 = float(shift @ shift)
            M2_shift = part.M2 @ shift
            trace = float(part.M2.trace())
            T3 = T3 + part.T3 - trace * shift - 2.0 * M2_shift - part.n * shift2 * shift
            S4 += (
                part.S4
                + 4.0 * float(shift @ M2_shift)
                + part.n * shift2 * shift2
                - 4.0 * float(shift @ part.T3)
                + 2.0 * shift2 * trace
            )
        return RunningMoments(n, mean, M2, T3, S4)

    def update(self, x: Float[Tensor, "n d"]) -> None:
        """Add the rows of ``x`` in place."""
        merged = self.merge(RunningMoments.from_batch(x))
        self.n, self.mean, self.M2, self.T3, self.S4 = merged.n, merged.mean, merged.M2, merged.T3, merged.S4

    def copy(self) -> RunningMoments:
        return RunningMoments(self.n, self.mean.clone(), self.M2.clone(), self.T3.clone(), self.S4)

    def covariance(self) -> Float[Tensor, "d d"]:
        """The maximum-likelihood covariance ``M2 / n`` (as Ledoit and Wolf use it)."""
        if self.n == 0:
            raise DataError("no rows: the covariance is undefined")
        return self.M2 / self.n

    def ledoit_wolf(self) -> float:
        """The Ledoit-Wolf shrinkage intensity towards ``(tr S / d) I``, in [0, 1].

        With S = M2 / n, mu = tr S / d: beta = (S4 / n - |S|_F^2) / (d n), delta = |S - mu I|_F^2 / d,
        intensity = min(beta, delta) / delta (0 when beta is 0), as in scikit-learn.
        """
        if self.n < 2:
            return 1.0
        d, n = self.d, self.n
        S = self.covariance()
        trace = float(S.trace())
        mu = trace / d
        frob2 = float((S * S).sum())
        beta = (self.S4 / n - frob2) / (d * n)
        delta = (frob2 - 2.0 * mu * trace + d * mu * mu) / d
        beta = min(max(beta, 0.0), delta)
        return 0.0 if beta <= 0.0 or delta <= 0.0 else float(beta / delta)


class _Reservoir:
    """A uniform random subsample of at most ``cap`` rows: those with the smallest random keys (bottom-k
    sampling), kept sorted by key, so the sample depends on neither the order nor the batching of the rows."""

    def __init__(self, cap: int, d: int) -> None:
        self.cap = cap
        self.rows = torch.empty(0, d, dtype=torch.float32)
        self.keys = torch.empty(0, dtype=torch.float64)

    def add(self, rows: Tensor, keys: Tensor) -> None:
        if self.cap <= 0 or rows.shape[0] == 0:
            return
        if self.keys.shape[0] >= self.cap:
            keep = keys < self.keys[-1]
            rows, keys = rows[keep], keys[keep]
            if keys.shape[0] == 0:
                return
        all_keys = torch.cat([self.keys, keys.to(torch.float64)])
        all_rows = torch.cat([self.rows, rows.to(torch.float32)])
        order = torch.argsort(all_keys)[: self.cap]
        self.keys, self.rows = all_keys[order], all_rows[order]


class _Accumulator:
    """Everything the fit collects at one hook, batch by batch."""

    def __init__(self, d: int, n_reference: int, n_calibration: int, holdout: float, outlier_factor: float | None):
        self.moments = RunningMoments.empty(d)
        self.reference = _Reservoir(n_reference, d)
        self.calibration = _Reservoir(n_calibration, d)
        self.holdout = holdout
        self.outlier_factor = outlier_factor
        self.threshold: float | None = None
        self.n_outliers = 0
        self.n_holdout = 0

    def add(self, x: Tensor, draws: Tensor) -> None:
        """``x`` [n, d] activations; ``draws`` [n, 2] uniform numbers: (held out?, subsample key)."""
        x = x.detach().to("cpu")
        if x.shape[0] == 0:
            return
        norms = x.to(torch.float64).norm(dim=1)
        if self.threshold is None:
            finite = norms[torch.isfinite(norms)]
            median = float(finite.median()) if finite.numel() else math.inf
            self.threshold = math.inf if self.outlier_factor is None else self.outlier_factor * median
        ok = norms <= self.threshold  # NaN and inf norms are outliers too
        self.n_outliers += int((~ok).sum())
        hold = ok & (draws[:, 0] < self.holdout)
        train = ok & ~hold
        self.n_holdout += int(hold.sum())
        self.moments.update(x[train])
        self.reference.add(x[train], draws[train, 1])
        self.calibration.add(x[hold], draws[hold, 1])


# ----- the fitted statistics of one hook ---------------------------------------------------------------
@dataclass(eq=False)
class HookStatistics:
    """The reference statistics of one hook, and what scoring derives from them.

    ``moments``: the clean reference tokens' :class:`RunningMoments`; ``reference``: a seeded subsample of
    them (raw activations, float32) for the kNN distance; ``calibration``: a seeded subsample of the
    held-out clean tokens (float32); ``threshold``: the outlier norm; ``n_outliers``: tokens excluded
    as outliers; ``n_holdout``: tokens held out (all of them, also those beyond the calibration subsample).
    """

    hook: str
    moments: RunningMoments
    reference: Float[Tensor, "r d"]
    reference_keys: Tensor
    calibration: Float[Tensor, "c d"]
    calibration_keys: Tensor
    threshold: float
    n_outliers: int
    n_holdout: int
    # Derived by _finalize:
    shrinkage: float = float("nan")
    eigenvalues: Tensor | None = None  # all d eigenvalues of the shrunk covariance, descending
    components: Tensor | None = None  # U_k [d, k]
    component_variances: Tensor | None = None  # lambda_k [k]
    residual_variance: float = float("nan")  # sigma^2, mean of the remaining eigenvalues
    reference_unit: Tensor | None = None  # centred, normalised reference rows
    calibrated: dict[str, np.ndarray] | None = None  # sorted held-out distances per name

    @property
    def n(self) -> int:
        """Clean reference tokens in the statistics."""
        return self.moments.n

    @property
    def d(self) -> int:
        return self.moments.d

    @property
    def mean(self) -> Tensor:
        return self.moments.mean

    def covariance(self) -> Tensor:
        """The empirical (maximum-likelihood) covariance of the reference tokens, float64 [d, d]."""
        return self.moments.covariance()

    def shrunk_covariance(self) -> Tensor:
        """``(1 - s) S + s (tr S / d) I`` with the shrinkage intensity s in use."""
        S = self.covariance()
        mu = float(S.trace()) / self.d
        return (1.0 - self.shrinkage) * S + self.shrinkage * mu * torch.eye(self.d, dtype=torch.float64)


# ----- the probe ---------------------------------------------------------------------------------------
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
    def widths(self) -> dict[str, int]:
        return {h: s.d for h, s in self.stats.items()}

    def __repr__(self) -> str:
        parts = ", ".join(f"{h}: {s.n} tokens, d={s.d}" for h, s in self.stats.items())
        return f"ManifoldProbe({parts}; k={self.k}, knn_k={self.knn_k})"

    # ----- construction --------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: HookedTransformer,
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

        Warns when a hook has fewer reference tokens than 2 x its width (the covariance is then poorly
        determined; the shrinkage keeps it invertible).
        """
        names = _check_hooks(model, hooks)
        sequences = _token_lists(model, texts_or_tokens)
        _check_settings(k, knn_k, n_reference, n_calibration, holdout, outlier_factor, shrinkage)
        widths = hook_widths(model, names)
        accumulators = {h: _Accumulator(widths[h], n_reference, n_calibration, holdout, outlier_factor) for h in names}
        rng = np.random.default_rng(seed)
        draws = [torch.from_numpy(rng.random((len(s), 2))) for s in sequences]
        stop = _stop_layer(model, names)
        captured: dict[str, Tensor] = {}

        def capture(act: Tensor, hook: HookPoint) -> None:
            captured[str(hook.name)] = act.detach()

        lengths = [len(s) for s in sequences]
        pad = pad_token_id(model)
        groups = batches(lengths, batch_size, max_batch_tokens(model))
        with torch.no_grad():
            for idx in tqdm(groups, desc="manifold probe", unit="batch", disable=not progress):
                tokens = pad_right([sequences[i] for i in idx], pad, model.cfg.device or "cpu")
                captured.clear()
                model.run_with_hooks(
                    tokens, fwd_hooks=[(h, capture) for h in names], stop_at_layer=stop, return_type=None
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
            k=k,
            knn_k=knn_k,
            n_reference=n_reference,
            n_calibration=n_calibration,
            holdout=holdout,
            outlier_factor=outlier_factor,
            seed=seed,
            shrinkage=shrinkage,
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
    ) -> ManifoldProbe:
        """Fit on activations given directly: rows [n, d] (every row is a token; nothing is excluded but
        outliers), or an iterable of such chunks (streamed), or ``{hook: either}``. ``identity``
        (a :func:`tl_steer.model_identity`) records the model they came from, if any."""
        _check_settings(k, knn_k, n_reference, n_calibration, holdout, outlier_factor, shrinkage)
        streams: Mapping[str, Tensor | Iterable[Tensor]] = (
            activations if isinstance(activations, Mapping) else {hook: activations}
        )
        accumulators: dict[str, _Accumulator] = {}
        for name, stream in streams.items():
            chunks: Iterable[Tensor] = [stream] if isinstance(stream, Tensor) else stream
            rng = np.random.default_rng(seed)
            acc: _Accumulator | None = None
            for chunk in chunks:
                if not isinstance(chunk, Tensor) or chunk.ndim != 2:
                    raise ShapeError(
                        f"activations for {name!r} must be tensors of shape [n, d], got "
                        f"{tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__}"
                    )
                if acc is None:
                    acc = _Accumulator(chunk.shape[1], n_reference, n_calibration, holdout, outlier_factor)
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
            k=k,
            knn_k=knn_k,
            n_reference=n_reference,
            n_calibration=n_calibration,
            holdout=holdout,
            outlier_factor=outlier_factor,
            seed=seed,
            shrinkage=shrinkage,
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
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        tensors: dict[str, Tensor] = {}
        states: dict[str, Any] = {}
        for i, (name, s) in enumerate(self.stats.items()):
            tensors.update(
                {
                    f"{i}.mean": s.moments.mean,
                    f"{i}.M2": s.moments.M2,
                    f"{i}.T3": s.moments.T3,
                    f"{i}.S4": torch.tensor([s.moments.S4], dtype=torch.float64),
                    f"{i}.reference": s.reference,
                    f"{i}.reference_keys": s.reference_keys,
                    f"{i}.calibration": s.calibration,
                    f"{i}.calibration_keys": s.calibration_keys,
                }
            )
            states[name] = {
                "index": i,
                "n": s.moments.n,
                "n_outliers": s.n_outliers,
                "n_holdout": s.n_holdout,
                "threshold": s.threshold if math.isfinite(s.threshold) else None,
            }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "hooks": self.hooks,
            "widths": self.widths,
            "settings": {
                "k": self.k,
                "knn_k": self.knn_k,
                "n_reference": self.n_reference,
                "n_calibration": self.n_calibration,
                "holdout": self.holdout,
                "outlier_factor": self.outlier_factor,
                "seed": self.seed,
                "shrinkage": self.shrinkage,
            },
            "model_identity": self.model_identity,
            "states": states,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(path),
            metadata={"tl_steer": json.dumps(meta, allow_nan=False)},
        )
        return path

    @classmethod
    def load(cls, path: str | Path, model: HookedTransformer | None = None) -> ManifoldProbe:
        """Read a probe written by :meth:`save`. With ``model``, refuse one fitted on another model
        (:class:`~tl_steer.errors.ModelMismatchError`) or whose hooks the model lacks or has at another
        width (:class:`~tl_steer.errors.HookNameError`, :class:`~tl_steer.errors.ShapeError`)."""
        path = Path(path)
        meta = _read_metadata(path)
        hooks, widths, states, settings = _check_probe_metadata(path, meta)
        if model is not None:
            check_against_model(path, model, meta.get("model_identity"), hooks, widths)
        tensors = read_tensors(path)
        check_saved_tensors(path, tensors)
        expected: set[str] = set()
        for name in hooks:
            i, d = states[name]["index"], widths[name]
            shapes = {"mean": [d], "M2": [d, d], "T3": [d], "S4": [1], "reference": [-1, d], "calibration": [-1, d]}
            for part, shape in shapes.items():
                t = tensors.get(f"{i}.{part}")
                ok = (
                    t is not None
                    and t.ndim == len(shape)
                    and all(w in (-1, n) for w, n in zip(shape, t.shape, strict=True))
                )
                if not ok:
                    got = "missing" if t is None else f"of shape {list(t.shape)}"
                    raise FileFormatError(f"{path}: tensor '{i}.{part}' of {name!r} is {got}, expected {shape}")
            for part in ("reference", "calibration"):
                keys = tensors.get(f"{i}.{part}_keys")
                if keys is None or list(keys.shape) != [tensors[f"{i}.{part}"].shape[0]]:
                    raise FileFormatError(f"{path}: tensor '{i}.{part}_keys' of {name!r} does not match '{i}.{part}'")
            expected |= {f"{i}.{part}" for part in (*shapes, "reference_keys", "calibration_keys")}
        if set(tensors) != expected:
            raise FileFormatError(f"{path}: unexpected or missing tensors {sorted(set(tensors) ^ expected)[:8]}")
        stats = {}
        for name in hooks:
            info = states[name]
            i = info["index"]
            stats[name] = HookStatistics(
                hook=name,
                moments=RunningMoments(
                    info["n"],
                    tensors[f"{i}.mean"].double(),
                    tensors[f"{i}.M2"].double(),
                    tensors[f"{i}.T3"].double(),
                    float(tensors[f"{i}.S4"][0]),
                ),
                reference=tensors[f"{i}.reference"].float(),
                reference_keys=tensors[f"{i}.reference_keys"].double(),
                calibration=tensors[f"{i}.calibration"].float(),
                calibration_keys=tensors[f"{i}.calibration_keys"].double(),
                threshold=math.inf if info["threshold"] is None else float(info["threshold"]),
                n_outliers=info["n_outliers"],
                n_holdout=info["n_holdout"],
            )
        try:
            return cls(stats, identity=meta.get("model_identity"), **settings)
        except TlSteerError as exc:  # a setting out of range
            raise FileFormatError(f"{path}: {exc}") from exc


def _check_probe_metadata(
    path: Path, meta: dict[str, Any]
) -> tuple[list[str], dict[str, int], dict[str, dict[str, Any]], dict[str, Any]]:
    """The hooks, widths, per-hook states and settings of a probe file's metadata, each field checked for
    its JSON type (:class:`FileFormatError` naming the field otherwise)."""

    def bad(field: str, want: str, got: object) -> FileFormatError:
        return FileFormatError(f"{path}: manifold-probe metadata field {field!r} must be {want}, got {got!r:.200}")

    def count(v: object, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    hooks = meta.get("hooks")
    if (
        not isinstance(hooks, list)
        or not hooks
        or not all(isinstance(h, str) for h in hooks)
        or len(set(hooks)) < len(hooks)
    ):
        raise bad("hooks", "a non-empty list of distinct hook names", hooks)
    widths = meta.get("widths")
    if not isinstance(widths, dict) or set(widths) != set(hooks) or not all(count(w, 1) for w in widths.values()):
        raise bad("widths", "an object mapping each hook to a positive integer", widths)
    states = meta.get("states")
    if not isinstance(states, dict) or not set(hooks) <= set(states):
        raise bad("states", "an object with an entry for each hook", states)
    indices = []
    for name in hooks:
        info = states[name]
        if not isinstance(info, dict):
            raise bad(f"states.{name}", "an object", info)
        for key, low in (("index", 0), ("n", 1), ("n_outliers", 0), ("n_holdout", 0)):
            if not count(info.get(key), low):
                raise bad(f"states.{name}.{key}", f"an integer >= {low}", info.get(key))
        threshold = info.get("threshold", False)  # null is an infinite threshold; missing is an error
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold)
        ):
            raise bad(f"states.{name}.threshold", "a finite number or null", threshold)
        indices.append(info["index"])
    if len(set(indices)) < len(indices):
        raise bad("states", "one distinct index per hook", indices)
    settings = meta.get("settings")
    known = set(inspect.signature(ManifoldProbe.__init__).parameters) - {"self", "stats", "identity"}
    if not isinstance(settings, dict) or not set(settings) <= known:
        raise bad("settings", f"an object with keys among {sorted(known)}", settings)
    for key, value in settings.items():
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise bad(f"settings.{key}", "a number", value)
    check_identity_field(path, meta.get("model_identity"))
    return hooks, widths, states, settings


# ----- helpers ---------------------------------------------------------------------------------------
def auroc(clean: np.ndarray | Sequence[float], steered: np.ndarray | Sequence[float]) -> float:
    """AUROC of telling steered from clean tokens by a distance: P(steered > clean) + P(tie) / 2, i.e. the
    Mann-Whitney U of the steered sample over n_clean x n_steered. 0.5: indistinguishable. NaNs dropped."""
    from scipy.stats import mannwhitneyu

    a = np.asarray(clean, dtype=np.float64).ravel()
    b = np.asarray(steered, dtype=np.float64).ravel()
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = mannwhitneyu(b, a, alternative="two-sided", method="asymptotic")
    return float(result.statistic) / (a.size * b.size)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _mahalanobis(state: HookStatistics, rows: Tensor) -> dict[str, np.ndarray]:
    assert state.components is not None and state.component_variances is not None
    z = rows - state.mean
    proj = z @ state.components
    inside2 = (proj * proj / state.component_variances).sum(1)
    if state.components.shape[1] < state.d:
        rest = ((z * z).sum(1) - (proj * proj).sum(1)).clamp_min(0.0)
        outside2 = rest / state.residual_variance
    else:
        outside2 = torch.zeros_like(inside2)
    return {
        "mahalanobis_inside": inside2.sqrt().numpy(),
        "mahalanobis_outside": outside2.sqrt().numpy(),
        "mahalanobis": (inside2 + outside2).sqrt().numpy(),
    }


def _knn(state: HookStatistics, rows: Tensor, knn_k: int) -> np.ndarray:
    assert state.reference_unit is not None
    ref = state.reference_unit
    if ref.shape[0] == 0:
        return np.full(rows.shape[0], np.nan)
    kk = min(knn_k, ref.shape[0])
    out = np.empty(rows.shape[0], dtype=np.float64)
    for start in range(0, rows.shape[0], _CHUNK):
        q = _unit(rows[start : start + _CHUNK] - state.mean).to(torch.float32)
        cos = torch.topk(q @ ref.T, kk, dim=1).values[:, -1].to(torch.float64)
        out[start : start + _CHUNK] = (2.0 - 2.0 * cos).clamp_min(0.0).sqrt().numpy()
    return out


def _sae_error(sae: Any, rows: Tensor) -> np.ndarray:
    params = next(iter(sae.parameters()), None) if hasattr(sae, "parameters") else None
    dtype = params.dtype if params is not None else torch.float32
    device = params.device if params is not None else torch.device("cpu")
    out = np.empty(rows.shape[0], dtype=np.float64)
    with torch.no_grad():
        for start in range(0, rows.shape[0], _CHUNK):
            x = rows[start : start + _CHUNK].to(device=device, dtype=dtype)
            rec = sae.decode(sae.encode(x))
            err = (x - rec).to(torch.float64).norm(dim=1) / x.to(torch.float64).norm(dim=1).clamp_min(1e-30)
            out[start : start + _CHUNK] = err.cpu().numpy()
    return out


def _check_settings(
    k: int,
    knn_k: int,
    n_reference: int,
    n_calibration: int,
    holdout: float,
    outlier_factor: float | None,
    shrinkage: float | None,
) -> None:
    for name, value, minimum in (("k", k, 1), ("knn_k", knn_k, 1), ("n_reference", n_reference, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(n_calibration, bool) or not isinstance(n_calibration, int) or n_calibration < 0:
        raise ConfigError(f"n_calibration must be an integer >= 0, got {n_calibration!r}")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout!r}")
    if outlier_factor is not None and not outlier_factor > 1.0:
        raise ConfigError(f"outlier_factor must be > 1 (or None), got {outlier_factor!r}")
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be in [0, 1] (or None for Ledoit-Wolf), got {shrinkage!r}")


def _check_hooks(model: HookedTransformer, hooks: str | Sequence[str]) -> list[str]:
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise HookNameError("give at least one hook name, e.g. 'blocks.6.hook_resid_post'")
    for name in names:
        validate_hook(model, name)
    return list(dict.fromkeys(names))


def _stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook, or None for the whole model."""
    n_layers = model.cfg.n_layers
    stop = 0
    for name in hooks:
        site = HookSite.parse(name)
        if site.layer is not None:
            stop = max(stop, site.layer + 1)
        elif site.first_layer(n_layers) >= n_layers:
            return None
    return None if stop >= n_layers else stop


def _token_lists(
    model: HookedTransformer, texts_or_tokens: str | Sequence[str] | Sequence[Sequence[int]] | Tensor
) -> list[list[int]]:
    """Token id lists from texts, lists of ids or a 2-D tensor of ids; raise DataError if nothing is left."""
    items: list[Any]
    if isinstance(texts_or_tokens, str):
        items = [texts_or_tokens]
    elif isinstance(texts_or_tokens, Tensor):
        if texts_or_tokens.ndim not in (1, 2) or texts_or_tokens.is_floating_point():
            raise ShapeError(
                f"token ids must be an integer tensor [pos] or [batch, pos], got {tuple(texts_or_tokens.shape)}"
            )
        items = [texts_or_tokens] if texts_or_tokens.ndim == 1 else list(texts_or_tokens)
    else:
        try:
            items = list(texts_or_tokens)
        except TypeError as exc:
            raise DataError(f"expected texts or token ids, got {type(texts_or_tokens).__name__}") from exc
    if not items:
        raise DataError("no texts to fit the probe on; give clean texts or token ids")
    tokenizer = model.tokenizer
    sequences: list[list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("texts need a model with a tokenizer; pass token ids instead")
            bos = (
                [tokenizer.bos_token_id] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
            )
            ids = bos + list(tokenizer(item, add_special_tokens=False).input_ids)
        elif isinstance(item, Tensor):
            ids = [int(t) for t in item.reshape(-1).tolist()]
        else:
            try:
                ids = [int(t) for t in item]
            except (TypeError, ValueError) as exc:
                raise DataError(f"item {i} is neither a text nor a list of token ids: {item!r}") from exc
        if len(ids) > model.cfg.n_ctx:
            raise DataError(f"item {i}: {len(ids)} tokens exceed the model's context of {model.cfg.n_ctx}; shorten it")
        if len(ids) >= 2:  # position 0 is excluded: a text of one token adds nothing
            sequences.append(ids)
    if not sequences:
        raise DataError(
            "no tokens left to fit the probe on: position 0 of every text is excluded, so give texts of at "
            "least two tokens"
        )
    return sequences


def _read_metadata(path: str | Path) -> dict[str, Any]:
    return read_tl_steer_header(path, FORMAT, VERSION, "manifold probe")


__all__ = ["CALIBRATED", "DISTANCES", "HookStatistics", "ManifoldProbe", "RunningMoments", "auroc"]
