"""The unit of COLD's interventions: the raw strength at which ``m = 1`` adds as much as DiffMean would.

COLD's raw step ``-eta J g`` has no natural size: on the default model the raw COLD-Kernel vector is
about 35,000 times shorter than DiffMean's. So that ``m = 1`` means the same for COLD as for the other
methods, :func:`~tl_steer.methods.cold.cold_kernel` and :func:`~tl_steer.methods.cold.cold_fd` set the
intervention's ``unit`` to ``reference / added``, where ``added`` is the norm the raw step adds per
position (the vector's norm for COLD-Kernel; the mean norm of dZ over the real positions of the
examples but the first for COLD-FD) and ``reference`` is measured on the same examples, from the
activations at the hook that the gradient passes compute anyway:

- pairs: the norm of the DiffMean vector of the pairs,
  ``|(1/N) sum_i (mean_{t in A_p,i} a_t - mean_{t in A_n,i} a_t)|`` (what :func:`~tl_steer.diffmean`
  returns with ``reduce="mean"``);
- positive-only examples (no contrast to take a difference of): :data:`POSITIVE_ONLY_FRACTION` times the
  median norm of the activation over the completion tokens. DiffMean's norm is a little more than that
  fraction of it on the built-in concepts (measured at layer 15 of the default model, 32 pairs: 0.12 for
  sentiment, 0.16 for formality), so positive-only COLD at m = 1 adds a little less than DiffMean would.

docs/methods.md, section 1, states the same.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from tl_steer.methods.cold.examples import _Batch

#: For positive-only examples: the reference norm is this fraction of the median activation norm over the
#: completion tokens (see the module docstring).
POSITIVE_ONLY_FRACTION = 0.1


class ReferenceNorm:
    """Accumulates the reference norm over the batches of COLD's examples, in the order they are seen."""

    def __init__(self, paired: bool) -> None:
        self.paired = paired
        self.total: Tensor | None = None  # pairs: the running sum of the per-example differences (float64)
        self.token_norms: list[Tensor] = []  # positive-only: the norms over the completion tokens
        self.count = 0

    def add(self, acts: Float[Tensor, "rows pos d"], batch: _Batch) -> None:
        """Add the activations at the hook of one batch (rows as in ``batch.rows``)."""
        acts = acts.detach()
        for rows in batch.rows:
            spans = [acts[r, int(batch.starts[r]) : int(batch.lengths[r])].double() for r in rows]
            if self.paired:
                diff = spans[0].mean(0) - spans[1].mean(0)
                self.total = diff if self.total is None else self.total + diff
            else:
                self.token_norms.append(spans[0].norm(dim=-1).cpu())
            self.count += 1

    def norm(self) -> float:
        """The reference norm of the examples added so far."""
        if self.paired:
            assert self.total is not None
            return float((self.total / self.count).norm())
        return POSITIVE_ONLY_FRACTION * float(torch.cat(self.token_norms).median())

    def describe(self) -> str:
        if self.paired:
            return "norm of the DiffMean vector of the examples"
        return f"{POSITIVE_ONLY_FRACTION} x the median activation norm over the completion tokens"


def unit_for(reference: float, added: float) -> float:
    """``reference / added``, or 1 where that is not a finite positive number (a zero step or reference)."""
    unit = reference / added if added > 0 else math.nan
    return unit if math.isfinite(unit) and unit > 0 else 1.0
