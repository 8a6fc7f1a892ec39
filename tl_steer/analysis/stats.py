"""Small statistics helpers shared by the analyses."""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(
    values: np.ndarray, *, seed: int = 0, level: float = 0.95, n_resamples: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (NaN, NaN for fewer than 2)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan"), float("nan")
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    res = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
