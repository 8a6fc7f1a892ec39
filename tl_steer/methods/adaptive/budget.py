"""Probe-budgeted addition: add the steering vector per token only as far as a ManifoldProbe's Mahalanobis
distance allows (``docs/methods.md``, section "Adaptive steering")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import ConfigError, DataError, ShapeError
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, EditEntry, Intervention, check_identity
from tl_steer.methods.adaptive._fit import (
    ConceptActivations,
    base_vector,
    check_direction,
    check_fitted_for,
    check_hook_name,
    check_level,
    check_scalar,
    resolve_activations,
)
from tl_steer.positions import PositionsLike


class BudgetedAddition(Intervention):
    """h' = h + s v per token, s the largest value in [0, raw] (in [raw, 0] for raw < 0) with D(h + s v) <= D_q.

    D(x)^2 = (x - mu)^T S^-1 (x - mu) is a ManifoldProbe's Mahalanobis distance, with S^-1 in its
    low-rank-plus-isotropic form U diag(1/lambda) U^T + (I - U U^T) / sigma^2, and D_q = ``budget``, its
    clean q-percentile. Along v the distance is a quadratic in s,

        D(h + s v)^2 = D(h)^2 + 2 s (h - mu)^T S^-1 v + s^2 v^T S^-1 v,

    so s is the root of D(h + s v)^2 = D_q^2 on the side of raw, capped at raw: where the cap binds the
    token gets the full raw v, elsewhere it lands on the budget exactly. A token already past the budget
    gets s = 0. Not linear in m. With unit 1 and v DiffMean's vector, m = 1 adds at most DiffMean at m = 1.
    Build it with :func:`budgeted_addition`.
    """

    kind = "budgeted_addition"

    def __init__(
        self,
        hook: str,
        vector: Float[Tensor, " d"],
        mean: Float[Tensor, " d"],
        components: Float[Tensor, "d k"],
        variances: Float[Tensor, " k"],
        residual_variance: float,
        budget: float,
        *,
        q: float,
        probe_hook: str,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.hook = check_hook_name(hook)
        check_fitted_for(probe_hook, self.hook, "the budget's ManifoldProbe")
        self.probe_hook = probe_hook
        self.vector = check_direction(vector, "the budgeted vector")
        d = int(self.vector.shape[0])
        for name, t, shape in (("mean", mean, (d,)), ("variances", variances, None)):
            if not isinstance(t, Tensor) or (shape is not None and tuple(t.shape) != shape) or t.ndim != 1:
                raise ShapeError(f"the budget's {name} must be a 1-D tensor{f' of width {d}' if shape else ''}")
        if (
            not isinstance(components, Tensor)
            or components.ndim != 2
            or tuple(components.shape) != (d, variances.shape[0])
        ):
            raise ShapeError(
                f"the budget's components must have shape [{d}, {variances.shape[0]}] (width, k); got "
                f"{tuple(components.shape) if isinstance(components, Tensor) else type(components).__name__}"
            )
        if not all(torch.isfinite(t).all() for t in (mean, components, variances)) or not (variances > 0).all():
            raise DataError("the budget's statistics must be finite, with positive variances")
        k = int(variances.shape[0])
        sigma2 = check_scalar(residual_variance, "the budget's residual variance") if k < d else math.nan
        if k < d and not sigma2 > 0:
            raise DataError(f"the budget's residual variance must be finite and > 0, got {residual_variance!r}")
        self.mean = mean.detach().to(torch.float64).clone()
        self.components = components.detach().to(torch.float64).clone()
        self.variances = variances.detach().to(torch.float64).clone()
        self.residual_variance = sigma2
        self.budget = check_scalar(budget, "the budget D_q")
        if self.budget <= 0:
            raise ConfigError(f"the budget D_q must be > 0, got {self.budget}")
        self.q = check_level(q)

    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def squared_distance(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
        """D(h)^2, float64, exactly as the ManifoldProbe computes its Mahalanobis distance."""
        z = h.to(torch.float64) - self.mean.to(h.device)
        proj = z @ self.components.to(h.device)
        inside = (proj * proj / self.variances.to(h.device)).sum(-1)
        if self.components.shape[1] == self.components.shape[0]:
            return inside
        rest = ((z * z).sum(-1) - (proj * proj).sum(-1)).clamp_min(0.0)
        return inside + rest / self.residual_variance

    def _precision_times(self, v: Tensor) -> Tensor:
        """S^-1 v in the low-rank-plus-isotropic form."""
        coef = self.components.T @ v
        out = self.components @ (coef / self.variances)
        if self.components.shape[1] < self.components.shape[0]:
            out = out + (v - self.components @ coef) / self.residual_variance
        return out

    def strengths(self, h: Float[Tensor, "... d"], raw: float) -> Float[Tensor, "..."]:
        """The per-token s of the class docstring (float64)."""
        v = self.vector.to(torch.float64)
        w = self._precision_times(v).to(h.device)
        c = float(v @ self._precision_times(v))
        a = self.squared_distance(h)
        b = (h.to(torch.float64) - self.mean.to(h.device)) @ w
        slack = self.budget**2 - a  # >= 0 where the token is within the budget
        root = (b * b + c * slack.clamp_min(0.0)).sqrt()
        s = ((-b + root) / c).clamp(0.0, raw) if raw >= 0 else ((-b - root) / c).clamp(raw, 0.0)
        return torch.where(slack >= 0, s, torch.zeros_like(s))

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        def edit(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
            s = self.strengths(activation, float(raw))
            return s[..., None] * self.vector.to(device=activation.device, dtype=torch.float64)

        return [(self.hook, edit)]

    def widths(self) -> dict[str, int]:
        return {self.hook: int(self.vector.shape[0])}

    def tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector, "mean": self.mean, "components": self.components, "variances": self.variances}

    def config(self) -> dict[str, Any]:
        sigma2 = None if math.isnan(self.residual_variance) else self.residual_variance
        return {
            "hook": self.hook,
            "probe_hook": self.probe_hook,
            "residual_variance": sigma2,
            "budget": self.budget,
            "q": self.q,
        }

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> BudgetedAddition:
        sigma2 = config["residual_variance"]
        return cls(
            config["hook"],
            tensors["vector"],
            tensors["mean"],
            tensors["components"],
            tensors["variances"],
            math.nan if sigma2 is None else sigma2,
            config["budget"],
            q=config["q"],
            probe_hook=config["probe_hook"],
            **common,
        )


def budgeted_addition(
    model: Host,
    pairs: Sequence[ContrastivePair] | None,
    hook: str,
    probe: ManifoldProbe,
    *,
    q: float = 0.95,
    base: AddVector | None = None,
    activations: ConceptActivations | None = None,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 16,
) -> BudgetedAddition:
    """A :class:`BudgetedAddition` of DiffMean's vector (``base``'s, or computed from ``pairs``) within the
    clean ``q``-percentile of ``probe``'s Mahalanobis distance at ``hook``.

    ``probe`` must have been fitted on ``model`` at ``hook`` (another hook, model or width is refused) with
    held-out calibration tokens (``holdout > 0``). ``info`` records D_q and the share of the concept's
    training tokens (positive and negative completions) already past it.
    """
    level = check_level(q)
    check_hook_name(hook)
    if not isinstance(probe, ManifoldProbe):
        raise ConfigError(f"probe must be a ManifoldProbe, got {type(probe).__name__}")
    if hook not in probe.stats:
        raise ConfigError(
            f"the ManifoldProbe was fitted at {', '.join(probe.stats)}, not at {hook!r}; fit one at {hook!r}"
        )
    if probe.model_identity is not None:
        check_identity(probe.model_identity, model)
    state = probe.stats[hook]
    calibrated = (state.calibrated or {}).get("mahalanobis")
    if calibrated is None or calibrated.size == 0:
        raise ConfigError("the ManifoldProbe has no held-out calibration tokens; fit it with holdout > 0")
    acts = resolve_activations(model, pairs, hook, activations, chat, batch_size)
    vector = base_vector(base, acts, hook)
    if state.d != vector.shape[0]:
        raise ShapeError(f"the ManifoldProbe has width {state.d} at {hook!r}, the vector {vector.shape[0]}")
    budget = float(np.quantile(calibrated, level))
    assert state.components is not None and state.component_variances is not None
    iv = BudgetedAddition(
        hook,
        vector.to(torch.float32),
        state.mean,
        state.components,
        state.component_variances,
        state.residual_variance,
        budget,
        q=level,
        probe_hook=hook,
        positions=positions,
        method="budgeted_addition",
        model_identity=acts.identity,
    )
    past = iv.squared_distance(torch.cat([acts.positive, acts.negative])) > budget**2
    iv.info = {
        "q": level,
        "budget": budget,
        "share_of_concept_tokens_past_budget": float(past.double().mean()),
        "n_pairs": acts.n_pairs,
        "diffmean_norm": float(vector.norm()),
    }
    return iv
