"""Streaming statistics of clean activations: moments merged exactly in any order (Chan et al.), seeded
bottom-k subsamples, the per-hook accumulator of a fit, and the fitted :class:`HookStatistics` of one hook."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tl_steer.errors import DataError, ShapeError


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
