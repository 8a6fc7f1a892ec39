"""Options objects: a function with many settings takes them either as keywords (as before) or as one
frozen dataclass (``config=``), and reads one object inside. :func:`resolve` picks the one given and refuses
both at once, so a setting is never silently taken from the other."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, TypeVar

from tl_steer.errors import ConfigError

C = TypeVar("C")


def _same(a: object, b: object) -> bool:
    # A tensor or array setting compares element-wise (and may refuse to become a bool): not the default.
    if a is None or b is None:
        return a is b
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def is_default(config: Any) -> bool:
    """True when every field of the dataclass instance ``config`` has its default value."""
    default = type(config)()
    return all(_same(getattr(config, f.name), getattr(default, f.name)) for f in fields(config))


def resolve(config: C | None, keywords: C, name: str = "config") -> C:
    """``config`` when given (then every keyword must be at its default), else the settings from the keywords.

    Raises :class:`~tl_steer.errors.ConfigError` for a ``config`` of the wrong type or for both at once."""
    if config is None:
        return keywords
    kind = type(keywords)
    if not isinstance(config, kind) or not is_dataclass(config):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {type(config).__name__}")
    if not is_default(keywords):
        changed = [
            f.name
            for f in fields(keywords)  # type: ignore[arg-type]
            if not _same(getattr(keywords, f.name), getattr(kind(), f.name))
        ]
        raise ConfigError(
            f"give the settings either as {name}= or as keywords, not both: {', '.join(changed)} given as "
            f"keywords; set them in the {kind.__name__} instead (dataclasses.replace({name}, ...))"
        )
    return config


__all__ = ["is_default", "resolve"]
