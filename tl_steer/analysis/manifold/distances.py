"""The probe's distances from the statistics of one hook (Mahalanobis in low-rank-plus-isotropic form, kNN
on centred unit vectors, SAE reconstruction error), and the AUROC of clean against steered tokens."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tl_steer.analysis.manifold.moments import HookStatistics

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
