"""Precision rules for models loaded in float16 or bfloat16.

- Tensors a method learns or estimates (steering vectors, LoRA factors, COLD gradients) are kept in
  :func:`master_dtype`: float64 for a float64 model, else float32. Hooks cast them to the activation's
  dtype and device when they are applied, so a vector made on one model works on the same model in any
  dtype.
- Statistics (means, moments) are accumulated in float64 whatever the model's dtype.
- Gradients taken through a float16 model are computed from a loss multiplied by :func:`loss_scale`
  (a power of two, so scaling and unscaling are exact) and divided by it in :func:`master_dtype`:
  float16's smallest normal number is 6.1e-5, and the gradient at a hook of a mean-token loss is often
  smaller than that, so without the scale it is rounded to a few bits or flushed to zero. bfloat16 has
  float32's exponent range and needs no scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tl_steer.hosts import Host

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT16_LOSS_SCALE = 2.0**10


def model_dtype(model: Host) -> torch.dtype:
    """The dtype the model computes in (``cfg.dtype``, which ``model.to(dtype)`` updates)."""
    return model.cfg.dtype


def is_half(model: Host) -> bool:
    """True for a model in float16 or bfloat16."""
    return model_dtype(model) in HALF_DTYPES


def master_dtype(model: Host) -> torch.dtype:
    """float64 for a float64 model, else float32: the dtype of learned and estimated tensors."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def loss_scale(model: Host) -> float:
    """The factor the loss is multiplied by before a backward pass through the model (1 unless float16)."""
    return FLOAT16_LOSS_SCALE if model_dtype(model) == torch.float16 else 1.0


def scaled_grad(
    loss: Tensor, inputs: Sequence[Tensor], model: Host, *, allow_unused: bool = False
) -> list[Tensor | None]:
    """``torch.autograd.grad(loss, inputs)`` in :func:`master_dtype`, computed with :func:`loss_scale`.

    If the scaled backward pass overflows (a non-finite gradient), it is repeated without the scale.
    """
    scale = loss_scale(model)
    dtype = master_dtype(model)
    grads = torch.autograd.grad(loss * scale, list(inputs), retain_graph=scale != 1.0, allow_unused=allow_unused)
    if scale != 1.0 and any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
        scale = 1.0
        grads = torch.autograd.grad(loss, list(inputs), allow_unused=allow_unused)
    return [None if g is None else g.to(dtype) / scale for g in grads]


__all__ = ["HALF_DTYPES", "is_half", "loss_scale", "master_dtype", "model_dtype", "scaled_grad"]
