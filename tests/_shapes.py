"""The run-time type checker of the tests' jaxtyping import hook (tests/conftest.py): beartype, restricted to
the jaxtyping array annotations (shapes and dtypes, consistent across the arguments of one call).

Other annotations are left to tl_steer itself: its functions check their inputs and raise tl_steer errors
that say what was wrong and how to fix it, and the bad-input tests expect those errors, not beartype's. For
the same reason constructors (``__init__``, also of dataclasses) are not checked: an intervention's
constructor is where tl_steer checks the shapes of the tensors it is given, with a ``ShapeError``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from beartype import beartype
from jaxtyping import AbstractArray


def has_array(annotation: Any) -> bool:
    """True if a jaxtyping array type (``Float[Tensor, "..."]`` ...) occurs anywhere in ``annotation``."""
    if isinstance(annotation, type) and issubclass(annotation, AbstractArray):
        return True
    return any(has_array(arg) for arg in typing.get_args(annotation))


def shapes_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``beartype(fn)`` with every annotation that holds no jaxtyping array type replaced by ``Any``.

    ``fn`` is the signature-only function jaxtyping builds for each checked function (its annotations are
    already resolved), so changing its annotations changes nothing else."""
    if getattr(fn, "__name__", "") == "__init__":
        return fn
    annotations = getattr(fn, "__annotations__", None)
    if annotations:
        fn.__annotations__ = {k: (v if has_array(v) else Any) for k, v in annotations.items()}
    return beartype(fn)
