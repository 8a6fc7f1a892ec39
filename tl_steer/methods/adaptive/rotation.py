"""Norm-preserving rotation ("angular steering"): turn each activation toward the concept direction in the
plane the two span, keeping its norm (``docs/methods.md``, section "Adaptive steering")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import DataError
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, EditEntry
from tl_steer.methods.adaptive._fit import (
    ConceptActivations,
    OneDirection,
    base_vector,
    check_hook_name,
    resolve_activations,
)
from tl_steer.positions import PositionsLike


def rotate_toward(h: Float[Tensor, "... d"], v: Float[Tensor, " d"], theta: float) -> Float[Tensor, "... d"]:
    """h turned by the angle ``theta`` (radians; negative: away) toward the unit vector v, in the plane of
    h and v, keeping |h|: |h| (cos theta e1 + sin theta e2), e1 = h / |h|, e2 the unit component of v
    orthogonal to e1. Where h is zero or parallel to v (no plane) h is returned unchanged. Float64."""
    h64 = h.to(torch.float64)
    v64 = v.to(device=h.device, dtype=torch.float64)
    norm = h64.norm(dim=-1, keepdim=True)
    e1 = h64 / norm.clamp_min(1e-300)
    ortho = v64 - (e1 @ v64)[..., None] * e1
    ortho_norm = ortho.norm(dim=-1, keepdim=True)
    e2 = ortho / ortho_norm.clamp_min(1e-300)
    turned = norm * (math.cos(theta) * e1 + math.sin(theta) * e2)
    # 1e-9: below it the plane is numerically undefined (v along h).
    return torch.where((ortho_norm > 1e-9) & (norm > 0), turned, h64)


class Rotation(OneDirection):
    """h' = |h| (cos(raw) e1 + sin(raw) e2): h turned toward v by ``raw`` radians in the plane of h and v,
    its norm kept (see :func:`rotate_toward`). Negative raw turns away from v.

    The unit is the angle of m = 1 in radians: :func:`rotation` sets it to the mean angle by which DiffMean
    at m = 1 turns the concept's training tokens, so m = 1 turns each token as far as DiffMean turns the
    average one. Past the angle between h and v the token turns beyond v. Not linear in m.
    """

    kind = "rotation"

    def __init__(self, hook: str, direction: Float[Tensor, " d"], **common: Any) -> None:
        super().__init__(hook, direction, "the rotation direction", **common)

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        v = self.unit_direction()

        def edit(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
            return rotate_toward(activation, v, float(raw)) - activation.to(torch.float64)

        return [(self.hook, edit)]

    def config(self) -> dict[str, Any]:
        return {"hook": self.hook}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> Rotation:
        return cls(config["hook"], tensors["direction"], **common)


def rotation(
    model: Host,
    pairs: Sequence[ContrastivePair] | None,
    hook: str,
    *,
    base: AddVector | None = None,
    activations: ConceptActivations | None = None,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 16,
) -> Rotation:
    """A :class:`Rotation` toward DiffMean's direction (``base``'s vector, or computed from ``pairs``).

    Its unit theta_0 is the mean over every completion token t of the training pairs (positive and
    negative) of angle(h_t, h_t + v), v the DiffMean vector: the angle DiffMean at m = 1 turns a token
    on average. ``info`` records it in degrees.
    """
    check_hook_name(hook)
    acts = resolve_activations(model, pairs, hook, activations, chat, batch_size)
    vector = base_vector(base, acts, hook)
    h = torch.cat([acts.positive, acts.negative])
    cos = torch.nn.functional.cosine_similarity(h, h + vector, dim=-1).clamp(-1.0, 1.0)
    theta0 = float(torch.arccos(cos).mean())
    if not theta0 > 0:
        raise DataError("DiffMean does not turn the training activations at all; there is no angle to rotate by")
    return Rotation(
        hook,
        (vector / vector.norm()).to(torch.float32),
        positions=positions,
        method="rotation",
        info={"theta0_degrees": math.degrees(theta0), "n_pairs": acts.n_pairs, "diffmean_norm": float(vector.norm())},
        model_identity=acts.identity,
        unit=theta0,
    )
