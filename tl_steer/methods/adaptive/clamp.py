"""Projection clamp: move each token's component along the concept direction toward a target value
(``docs/methods.md``, section "Adaptive steering")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.data.pairs import ContrastivePair
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, EditEntry
from tl_steer.methods.adaptive._fit import (
    ConceptActivations,
    OneDirection,
    base_vector,
    check_hook_name,
    check_level,
    check_scalar,
    resolve_activations,
)
from tl_steer.positions import PositionsLike


class ProjectionClamp(OneDirection):
    """h' = h + raw (c - p) v, with v = d / |d| and p = h . v (one-sided: max(0, c - p) in place of c - p).

    At raw strength 1 (m = 1, unit 1) every steered token's projection on v becomes exactly ``target`` = c;
    tokens already past it move back to it, unless ``one_sided``, which leaves them alone. The change is
    linear in raw. Build it from data with :func:`projection_clamp`.
    """

    kind = "projection_clamp"
    linear_in_m = True

    def __init__(
        self,
        hook: str,
        direction: Float[Tensor, " d"],
        target: float,
        *,
        one_sided: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(hook, direction, "the clamp direction", **common)
        self.target = check_scalar(target, "the clamp target")
        self.one_sided = bool(one_sided)

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        unit_dir = self.unit_direction()
        target, one_sided = self.target, self.one_sided

        def edit(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
            # The projection in float32 at least: a bfloat16 dot product over d_model entries is too coarse
            # to land on the target.
            dtype = torch.promote_types(activation.dtype, torch.float32)
            v = unit_dir.to(device=activation.device, dtype=dtype)
            gap = target - activation.to(dtype) @ v
            if one_sided:
                gap = gap.clamp_min(0.0)
            return raw * gap[..., None] * v

        return [(self.hook, edit)]

    def config(self) -> dict[str, Any]:
        return {"hook": self.hook, "target": self.target, "one_sided": self.one_sided}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> ProjectionClamp:
        return cls(config["hook"], tensors["direction"], config["target"], one_sided=config["one_sided"], **common)


def projection_clamp(
    model: Host,
    pairs: Sequence[ContrastivePair] | None,
    hook: str,
    *,
    q: float = 0.5,
    one_sided: bool = False,
    base: AddVector | None = None,
    activations: ConceptActivations | None = None,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 16,
) -> ProjectionClamp:
    """A :class:`ProjectionClamp` along DiffMean's direction, with the target c the quantile ``q`` of the
    projections h . v of every positive completion token of ``pairs`` on clean runs.

    ``base`` reuses an existing DiffMean vector at ``hook``; ``activations`` (from
    :func:`~tl_steer.methods.adaptive.concept_activations`) reuses a pass over the pairs. ``info`` records
    the target, the quantile and the median projections of the positive and negative tokens.
    """
    level = check_level(q)
    check_hook_name(hook)
    acts = resolve_activations(model, pairs, hook, activations, chat, batch_size)
    vector = base_vector(base, acts, hook)
    v = vector / vector.norm()
    pos, neg = (acts.positive @ v).numpy(), (acts.negative @ v).numpy()
    target = float(np.quantile(pos, level))
    return ProjectionClamp(
        hook,
        v.to(torch.float32),
        target,
        one_sided=one_sided,
        positions=positions,
        method="projection_clamp",
        info={
            "q": level,
            "target": target,
            "median_positive_projection": float(np.median(pos)),
            "median_negative_projection": float(np.median(neg)),
            "n_pairs": acts.n_pairs,
            "diffmean_norm": float(vector.norm()),
        },
        model_identity=acts.identity,
    )
