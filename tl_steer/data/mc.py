"""Multiple-choice items: a question, its options and the index of the correct one (the capability side
of the capability-behaviour gap, docs/methods.md, section 8).

A file of items is JSON Lines, one object per line::

    {"question": "What is the capital of France?", "options": ["London", "Paris", "Rome", "Berlin"],
     "answer": "Paris"}

``answer`` is either the text of the correct option (as the built-in files write it: readable, and it
stays right when the options are reordered) or its 0-based index into ``options``. In an :class:`MCItem`
it is always the index.

The built-in set ``general`` (``builtin/mc_general.jsonl``, written for this project) holds 265
easy-to-moderate general-knowledge questions (geography, science, history, everyday facts, arithmetic and
maths words, language), each with four short options; the correct option's position is balanced over the
four places. Items are scored by the likelihood of each option's text, not by parsing a letter (see
:func:`tl_steer.analysis.capability.mc_accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tl_steer.data.jsonl import read_records
from tl_steer.errors import DataError

_FIELDS = ("question", "options", "answer")
_PREFIX = "mc_"
_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class MCItem:
    """A question, its options (at least two distinct non-empty strings) and ``answer``, the 0-based
    index of the correct option. A list of options is stored as a tuple."""

    question: str
    options: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not isinstance(self.question, str):
            raise DataError(f"MCItem.question must be a string, got {type(self.question).__name__}")
        if not self.question.strip():
            raise DataError("MCItem.question is empty")
        if not isinstance(self.options, list | tuple):
            raise DataError(f"MCItem.options must be a list or tuple of strings, got {type(self.options).__name__}")
        object.__setattr__(self, "options", tuple(self.options))
        if len(self.options) < 2:
            raise DataError(f"MCItem needs at least 2 options, got {len(self.options)}")
        seen: dict[str, int] = {}
        for i, option in enumerate(self.options):
            if not isinstance(option, str):
                raise DataError(f"MCItem option {i} must be a string, got {type(option).__name__}")
            if not option.strip():
                raise DataError(f"MCItem option {i} is empty")
            key = option.strip()
            if key in seen:
                raise DataError(f"MCItem has duplicate options: {i} and {seen[key]} are both {key!r}")
            seen[key] = i
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise DataError(f"MCItem.answer must be an option index (int), got {type(self.answer).__name__}")
        if not 0 <= self.answer < len(self.options):
            raise DataError(
                f"MCItem.answer {self.answer} is not among the options: give an index from 0 to {len(self.options) - 1}"
            )

    @property
    def gold(self) -> str:
        """The text of the correct option."""
        return self.options[self.answer]

    def to_dict(self) -> dict[str, Any]:
        """The item as a file record (``answer`` as the correct option's text)."""
        return {"question": self.question, "options": list(self.options), "answer": self.gold}


def mc_item(question: str, options: list[str] | tuple[str, ...], answer: int | str) -> MCItem:
    """An :class:`MCItem` whose ``answer`` is given as an index or as the correct option's text."""
    if not isinstance(options, list | tuple):
        raise DataError(f"options must be a list of strings, got {type(options).__name__}")
    if isinstance(answer, str):
        stripped = [o.strip() if isinstance(o, str) else o for o in options]
        if answer.strip() not in stripped:
            raise DataError(f"the answer {answer!r} is not among the options {list(options)!r}")
        answer = stripped.index(answer.strip())
    return MCItem(question, tuple(options), answer)


def check_mc_items(items: object) -> list[MCItem]:
    """Return ``items`` as a list, raising :class:`DataError` if it is empty or holds other things."""
    if isinstance(items, MCItem):
        return [items]
    try:
        out = list(items)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataError(f"expected a list of MCItem, got {type(items).__name__}") from exc
    if not out:
        raise DataError("the list of multiple-choice items is empty; give at least one MCItem")
    for i, item in enumerate(out):
        if not isinstance(item, MCItem):
            raise DataError(f"item {i} is a {type(item).__name__}, not an MCItem")
    return out


def read_mc_items(path: str | Path) -> list[MCItem]:
    """Read multiple-choice items from a JSON Lines file with fields ``question`` (a string), ``options``
    (a list of strings) and ``answer`` (the correct option's text, or its 0-based index).

    Every line is validated; an error names the file, the line and the problem (bad JSON, a missing or
    mistyped field, an empty question or option, fewer than two options, duplicate options, an answer not
    among the options). Blank lines are skipped.
    """
    return read_records(
        path, _FIELDS, mc_item, what="multiple-choice items", types={"options": list, "answer": (int, str)}
    )


def mc_sets() -> list[str]:
    """Names of the built-in multiple-choice sets, for :func:`load_mc_items`."""
    folder = resources.files("tl_steer.data") / "builtin"
    return sorted(
        p.name[len(_PREFIX) : -len(_SUFFIX)]
        for p in folder.iterdir()
        if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX)
    )


def load_mc_items(name: str = "general") -> list[MCItem]:
    """A built-in multiple-choice set. ``general``: 265 four-option general-knowledge questions written
    for this project (see the module docstring). See :func:`mc_sets`."""
    names = mc_sets()
    if name not in names:
        raise DataError(f"unknown built-in multiple-choice set {name!r}; choose one of {', '.join(names)}")
    resource = resources.files("tl_steer.data") / "builtin" / f"{_PREFIX}{name}{_SUFFIX}"
    with resources.as_file(resource) as path:
        return read_mc_items(path)


__all__ = ["MCItem", "check_mc_items", "load_mc_items", "mc_item", "mc_sets", "read_mc_items"]
