"""Refusing strengths too large for the model's number format, at the first forward pass they reach.

A finite but huge ``m`` (1e30, 1e38 in float32) does not fail by itself: the steered activation
overflows to inf (NaN logits downstream), or stays finite but overflows the sum of squares of the next
RMSNorm / LayerNorm (a uniform next-token distribution). :func:`check_steered` refuses both inside the
hook, with one check per hooked activation: the largest entry of the edit against
``sqrt(max / width)`` of the format the normalisation computes in (float32 for float16 / bfloat16
models, as TransformerLens upcasts there; the model's own dtype otherwise), and the steered activation
being finite. What m means: docs/methods.md, section 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tl_steer.errors import ConfigError

_HALF = (torch.float16, torch.bfloat16)


def largest_safe_edit(dtype: torch.dtype, width: int) -> float:
    """The largest |entry| an edit may have at an activation of ``dtype`` and ``width``: its square summed
    over the width must fit the normalisation's format, and the entry itself the activation's dtype."""
    if not dtype.is_floating_point:
        return math.inf
    norm = torch.float32 if dtype in _HALF else dtype
    return min(float(torch.finfo(dtype).max), math.sqrt(float(torch.finfo(norm).max) / max(width, 1)))


def check_steered(activation: Tensor, delta: Tensor, steered: Tensor, hook_name: str, m: float | Tensor) -> None:
    """Raise :class:`ConfigError` naming ``m`` and the hook if the edit ``delta`` is too large for the
    activation's dtype or made a finite activation non-finite. One reduction and one sync per call."""
    if not activation.is_floating_point():
        return
    bound = largest_safe_edit(activation.dtype, int(activation.shape[-1]))
    too_large = delta.detach().abs().amax().double() > bound
    if not bool(too_large | ~torch.isfinite(steered.detach()).all()):
        return
    # Rare path: say what went wrong, unless the activation was already non-finite before the edit.
    amax = float(delta.detach().abs().amax().double())
    newly_bad = bool((~torch.isfinite(steered.detach()) & torch.isfinite(activation.detach())).any())
    if amax <= bound and not newly_bad:
        return
    hint = ", or the model in bfloat16 or float32" if activation.dtype == torch.float16 else ""
    strength = f"{float(m):g}" if not isinstance(m, Tensor) or m.numel() == 1 else f"up to {float(m.abs().max()):g}"
    raise ConfigError(
        f"the strength m={strength} is too large at {hook_name!r}: it adds activations of size {amax:.3g} "
        f"to a {str(activation.dtype).removeprefix('torch.')} activation of width {activation.shape[-1]}, "
        f"where {bound:.3g} is the most that stays finite through the model's normalisation"
        f"{' (the steered activation overflowed)' if newly_bad else ''}; use a smaller |m|{hint}"
    )
