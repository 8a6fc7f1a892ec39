"""Parameter freezing for gradient computations on a model that must come out unchanged.

:func:`frozen` sets ``requires_grad`` on exactly the named parameters of a model (none by default) and,
optionally, puts it in eval mode; :func:`trainable` makes tensors outside the model (an intervention's)
require gradients. Both restore what they changed on exit, also on error, so a failed computation leaves
every flag, the training mode and no ``.grad`` behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def frozen(model: nn.Module, trainable_names: Iterable[str] = (), *, eval_mode: bool = False) -> Iterator[None]:
    """``requires_grad`` True on exactly the parameters named in ``trainable_names`` and False on every other
    parameter of ``model`` (and ``model.eval()`` with ``eval_mode``) for the duration of the block; every
    flag and the training mode are restored afterwards."""
    wanted = set(trainable_names)
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        if eval_mode:
            model.eval()
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
        if eval_mode:
            model.train(was_training)


@contextmanager
def trainable(tensors: Sequence[Tensor]) -> Iterator[None]:
    """``requires_grad`` True on ``tensors`` (leaf tensors, e.g. an intervention's) for the duration of the
    block; afterwards False again, with their ``.grad`` cleared."""
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield
    finally:
        for t in tensors:
            t.requires_grad_(False)
            t.grad = None


__all__ = ["frozen", "trainable"]
