"""Which token positions an intervention steers, also under left padding and the KV cache.

A policy is one of

- ``"all"``: every position (the default);
- ``"prompt"``: positions of the prompt, p < P;
- ``"generated"``: positions after the prompt, p >= P (generated tokens, or the completion when a
  completion is scored teacher-forced); the first generated token is produced *at* position P-1, so
  it is not changed by this policy;
- ``"last_prompt"``: the last prompt position, p = P-1;
- a boolean mask of shape [pos] or [batch, pos] over absolute positions (positions past its end are
  not steered).

P is the prompt length. Code that knows the prompt/completion boundary (scoring, ``steer``'s wrapper of
``model.generate``) declares it with :func:`prompt_boundary`; otherwise the whole input of a forward pass
that starts at position 0 counts as the prompt. Positions are absolute: under the KV cache a hook sees
one new position per step, at offset = number of cached positions, which the hook learns from the
attention scores of the block (see ``hookpoints.HookSite.offset_source``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_steer.errors import ConfigError, ShapeError

PolicyName = Literal["all", "prompt", "generated", "last_prompt"]
POLICIES: tuple[str, ...] = ("all", "prompt", "generated", "last_prompt")
PositionsLike = Union[str, Tensor, "PositionPolicy"]


@dataclass(frozen=True)
class PositionPolicy:
    """Which positions to steer: a named policy or a boolean mask over absolute positions."""

    kind: str = "all"
    mask: Bool[Tensor, "..."] | None = field(default=None, compare=False)

    @classmethod
    def coerce(cls, value: PositionsLike | None) -> PositionPolicy:
        """Accept a policy name, a boolean mask or a policy; raise with the valid names otherwise."""
        if value is None:
            return cls("all")
        if isinstance(value, PositionPolicy):
            return value
        if isinstance(value, Tensor):
            if value.dtype != torch.bool or value.ndim not in (1, 2):
                raise ShapeError(
                    f"a position mask must be a boolean tensor of shape [pos] or [batch, pos], "
                    f"got dtype {value.dtype} and shape {tuple(value.shape)}"
                )
            return cls("mask", value.detach().clone())
        if isinstance(value, str) and value in POLICIES:
            return cls(value)
        raise ConfigError(f"unknown position policy {value!r}; use one of {', '.join(POLICIES)} or a boolean mask")

    def to_json(self) -> str:
        if self.kind == "mask":
            raise ConfigError("an intervention with a position mask cannot be saved; save it with a named policy")
        return self.kind


@dataclass
class _Boundary:
    prompt_len: Int[Tensor, " batch"] | int | None


_BOUNDARY: contextvars.ContextVar[_Boundary | None] = contextvars.ContextVar("tl_steer_boundary", default=None)


@contextmanager
def prompt_boundary(prompt_len: int | Sequence[int] | Tensor | None) -> Iterator[None]:
    """Declare the prompt length P of the forward passes run inside the block.

    ``prompt_len`` is one int, one per batch row (right padding), or ``None``: learn P from the first
    forward pass inside the block that starts at position 0 (used around ``model.generate``).
    """
    value: Tensor | int | None
    if prompt_len is None or isinstance(prompt_len, int):
        value = prompt_len
    else:
        value = torch.as_tensor(prompt_len, dtype=torch.long)
    token = _BOUNDARY.set(_Boundary(value))
    try:
        yield
    finally:
        _BOUNDARY.reset(token)


@dataclass
class PositionState:
    """Per-hook bookkeeping: the KV-cache offset seen by the source hook of the current forward pass,
    and the prompt length learned from the last pass that started at position 0."""

    offset: int | None = None
    learned_prompt_len: int | None = None

    def record_offset(self, scores: Tensor, hook: Any) -> None:
        self.offset = int(scores.shape[-1] - scores.shape[-2])

    def take_offset(self) -> int:
        # Consumed on read: a pass that skips the source block (start_at_layer) starts at offset 0.
        offset, self.offset = self.offset or 0, None
        return offset


def steer_mask(
    policy: PositionPolicy, state: PositionState, batch: int, q_len: int, device: torch.device
) -> Bool[Tensor, "batch pos"] | None:
    """Boolean [batch, pos] mask of the positions to steer in this call; ``None`` means all."""
    if policy.kind == "all":
        return None
    offset = state.take_offset()
    positions = torch.arange(offset, offset + q_len, device=device)
    if policy.kind == "mask":
        assert policy.mask is not None
        mask = policy.mask.to(device)
        mask2 = mask[None] if mask.ndim == 1 else mask
        if mask2.shape[0] not in (1, batch):
            raise ShapeError(f"position mask has {mask2.shape[0]} rows but the batch has {batch}")
        length = mask2.shape[1]
        inside = positions < length
        gathered = mask2[:, positions.clamp(max=max(length - 1, 0))] & inside
        return gathered.expand(batch, q_len)
    prompt_len = _prompt_len(state, offset, q_len, batch, device)
    p = positions[None, :]
    if policy.kind == "prompt":
        out = p < prompt_len
    elif policy.kind == "generated":
        out = p >= prompt_len
    else:  # last_prompt
        out = p == prompt_len - 1
    return out.expand(batch, q_len)


def _prompt_len(state: PositionState, offset: int, q_len: int, batch: int, device: torch.device) -> Tensor:
    boundary = _BOUNDARY.get()
    if boundary is not None and boundary.prompt_len is None and offset == 0:
        boundary.prompt_len = q_len
    if boundary is not None and boundary.prompt_len is not None:
        value = boundary.prompt_len
    else:
        if offset == 0 or state.learned_prompt_len is None:
            state.learned_prompt_len = offset + q_len
        value = state.learned_prompt_len
    t = torch.as_tensor(value, dtype=torch.long, device=device)
    if t.ndim == 1:
        if t.shape[0] != batch:
            raise ShapeError(f"prompt_boundary gave {t.shape[0]} prompt lengths for a batch of {batch}")
        return t[:, None]
    return t.view(1, 1)
