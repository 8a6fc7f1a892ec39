"""The validity-decay model of preference and utility curves (docs/methods.md, section 3).

    D(m) = [1 + (m - m_plus)^2 / L_plus]^(-p_plus)       for m >= 0
    D(m) = [1 + (m - m_minus)^2 / L_minus]^(-p_minus)    for m < 0,   with D continuous at m = 0
    PrefOdds(m) ~ (alpha * m + beta) * D(m) + b
    UtilOdds(m) ~ beta * D(m) + b

Fitted by least squares with SLSQP under the equality constraint D_plus(0) = D_minus(0), in units where
max |m| = 1 (for conditioning), from several starting points; the best fit is reported in the original
units of m.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import minimize

from tl_steer.errors import ConfigError

Kind = Literal["pref", "util"]
_DECAY = ("m_plus", "L_plus", "p_plus", "m_minus", "L_minus", "p_minus")


@dataclass(frozen=True)
class DecayFit:
    """A fitted curve: its parameters (original units of m), R^2 and the kind ("pref" or "util")."""

    kind: str
    params: dict[str, float]
    r2: float

    def __call__(self, m: np.ndarray | float) -> np.ndarray:
        p = self.params
        return curve(np.asarray(m, dtype=np.float64), p, self.kind)


def decay(
    m: np.ndarray, m_plus: float, L_plus: float, p_plus: float, m_minus: float, L_minus: float, p_minus: float
) -> np.ndarray:
    """D(m), the piecewise rational-quadratic validity decay."""
    plus = (1 + (m - m_plus) ** 2 / L_plus) ** (-p_plus)
    minus = (1 + (m - m_minus) ** 2 / L_minus) ** (-p_minus)
    return np.where(m >= 0, plus, minus)


def curve(m: np.ndarray, params: dict[str, float], kind: str) -> np.ndarray:
    """The model curve of ``kind`` at strengths m."""
    d = decay(m, *(params[k] for k in _DECAY))
    if kind == "pref":
        return (params["alpha"] * m + params["beta"]) * d + params["b"]
    return params["beta"] * d + params["b"]


def _names(kind: str) -> list[str]:
    return (["alpha"] if kind == "pref" else []) + ["beta", "b", *_DECAY]


def fit_decay(m: np.ndarray, y: np.ndarray, kind: Kind = "pref") -> DecayFit:
    """Fit the decay model of ``kind`` to the points (m, y); return parameters and R^2."""
    m = np.asarray(m, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if kind not in ("pref", "util"):
        raise ConfigError(f"kind must be 'pref' or 'util', got {kind!r}")
    names = _names(kind)
    if m.shape != y.shape or m.ndim != 1:
        raise ConfigError("m and y must be 1-D arrays of the same length")
    if len(m) < len(names) // 2 + 1 or not (m > 0).any() or not (m < 0).any():
        raise ConfigError(f"a decay fit needs strengths on both sides of 0 and at least {len(names) // 2 + 1} points")
    scale = float(np.abs(m).max())
    x = m / scale
    idx = {n: i for i, n in enumerate(names)}

    def unpack(theta: np.ndarray) -> dict[str, float]:
        return {n: float(theta[i]) for n, i in idx.items()}

    def sse(theta: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            r = curve(x, unpack(theta), kind) - y
        value = float(r @ r)
        return value if np.isfinite(value) else 1e30

    def continuity(theta: np.ndarray) -> float:
        p = unpack(theta)
        # log D_plus(0) - log D_minus(0) = 0
        return float(
            -p["p_plus"] * np.log1p(p["m_plus"] ** 2 / p["L_plus"])
            + p["p_minus"] * np.log1p(p["m_minus"] ** 2 / p["L_minus"])
        )

    spread = float(y.max() - y.min()) or 1.0
    bounds = []
    for n in names:
        if n.startswith("L_"):
            bounds.append((1e-4, 1e4))
        elif n.startswith("p_"):
            bounds.append((1e-3, 50.0))
        elif n.startswith("m_"):
            bounds.append((-5.0, 5.0))
        else:
            bounds.append((-100 * spread - 100, 100 * spread + 100))
    y0 = float(np.interp(0.0, x, y))
    slope = float(np.polyfit(x[np.abs(x) <= 0.5], y[np.abs(x) <= 0.5], 1)[0]) if (np.abs(x) <= 0.5).sum() >= 2 else 0.0
    constraint = [{"type": "eq", "fun": continuity}]

    def solve(theta0: np.ndarray, maxiter: int) -> tuple[float, np.ndarray]:
        res = minimize(
            sse,
            theta0,
            method="SLSQP",
            bounds=bounds,
            constraints=constraint,
            options={"maxiter": maxiter, "ftol": 1e-14},
        )
        feasible = abs(continuity(res.x)) < 1e-6
        return (float(res.fun) if feasible else float("inf")), res.x

    # Screen many starting points briefly, then polish the best two.
    screened = []
    for b0, width, power, shift in itertools.product(
        (float(y.min()), float(y.mean())), (0.1, 1.0), (0.5, 2.0), (0.0, 0.3)
    ):
        start = {
            "alpha": slope,
            "beta": y0 - b0,
            "b": b0,
            "m_plus": shift,
            "L_plus": width,
            "p_plus": power,
            "m_minus": -shift,
            "L_minus": width,
            "p_minus": power,
        }
        screened.append(solve(np.array([start[n] for n in names]), maxiter=60))
    screened.sort(key=lambda item: item[0])
    polished = [solve(theta, maxiter=3000) for _, theta in screened[:2]]
    finite = [item for item in polished + screened if np.isfinite(item[0])]
    best = min(finite, key=lambda item: item[0]) if finite else None
    if best is None:
        raise RuntimeError("the decay fit did not converge from any starting point")
    params = unpack(best[1])
    # Back to the original units of m: x = m / scale.
    params["m_plus"] *= scale
    params["m_minus"] *= scale
    params["L_plus"] *= scale**2
    params["L_minus"] *= scale**2
    if kind == "pref":
        params["alpha"] /= scale
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - best[0] / total if total > 0 else 1.0
    return DecayFit(kind=kind, params=params, r2=r2)
