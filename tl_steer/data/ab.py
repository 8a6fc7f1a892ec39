"""A/B behaviour items: a question with two lettered options, one of which matches the behaviour.

An item is shown to the model as::

    {question}

    (A) {option_a}
    (B) {option_b}

    Answer: (

so that the next token is the answer letter (see :func:`tl_steer.analysis.ab.ab_accuracy`).

The built-in sets (written for this project) are ``sentiment`` (the matching option is the positive
reply) and ``formality`` (the matching option is the formal reply), each with a fixed train/test split
and the matching letter balanced between A and B. Their files are ``builtin/ab_{name}.{split}.jsonl``:
the dot keeps them out of :func:`tl_steer.builtin_concepts`, which lists contrastive-pair sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from tl_steer.data.jsonl import read_records
from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import DataError

_FIELDS = ("question", "option_a", "option_b", "answer_matching_behavior")
LETTERS = ("A", "B")


@dataclass(frozen=True)
class ABItem:
    """A question, two options, and the letter ("A" or "B") of the option that matches the behaviour."""

    question: str
    option_a: str
    option_b: str
    answer_matching_behavior: str

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"ABItem.{name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"ABItem.{name} is empty")
        if self.answer_matching_behavior not in LETTERS:
            raise DataError(
                f"ABItem.answer_matching_behavior must be 'A' or 'B', got {self.answer_matching_behavior!r}"
            )
        if self.option_a.strip() == self.option_b.strip():
            raise DataError(f"ABItem has identical options: {self.option_a!r}")

    @property
    def matching_letter(self) -> str:
        return self.answer_matching_behavior

    @property
    def other_letter(self) -> str:
        return "B" if self.answer_matching_behavior == "A" else "A"

    @property
    def matching_option(self) -> str:
        return self.option_a if self.answer_matching_behavior == "A" else self.option_b

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


ANSWER_PREFIX = "Answer: ("


def format_ab_prompt(item: ABItem) -> str:
    """The text shown to the model: question, the two lettered options and the answer prefix, after
    which the next token is the answer letter."""
    return f"{item.question}\n\n(A) {item.option_a}\n(B) {item.option_b}\n\n{ANSWER_PREFIX}"


def ab_to_pairs(items: object) -> list[ContrastivePair]:
    """A/B items as contrastive pairs: the formatted prompt, the matching letter as the positive
    completion and the other letter as the negative one (CAA-style training examples)."""
    return [
        ContrastivePair(format_ab_prompt(item), item.matching_letter, item.other_letter)
        for item in check_ab_items(items)
    ]


def check_ab_items(items: object) -> list[ABItem]:
    """Return ``items`` as a list, raising :class:`DataError` if it is empty or holds other things."""
    if isinstance(items, ABItem):
        return [items]
    try:
        out = list(items)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataError(f"expected a list of ABItem, got {type(items).__name__}") from exc
    if not out:
        raise DataError("the list of A/B items is empty; give at least one ABItem")
    for i, item in enumerate(out):
        if not isinstance(item, ABItem):
            raise DataError(f"item {i} is a {type(item).__name__}, not an ABItem")
    return out


def read_ab_items(path: str | Path) -> list[ABItem]:
    """Read A/B items from a JSON Lines file with fields ``question``, ``option_a``, ``option_b`` and
    ``answer_matching_behavior`` ("A" or "B").

    Every line is validated; an error names the file, the line and the problem. Blank lines are skipped.
    """
    return read_records(path, _FIELDS, ABItem, what="A/B items")


def ab_behaviors() -> list[str]:
    """Names of the built-in A/B behaviors, for :func:`load_ab_items` (``ab_behaviours`` is an alias)."""
    folder = resources.files("tl_steer.data") / "builtin"
    return sorted(
        {
            p.name[len("ab_") : -len(".train.jsonl")]
            for p in folder.iterdir()
            if p.name.startswith("ab_") and p.name.endswith(".train.jsonl")
        }
    )


#: The former spelling of :func:`ab_behaviors` (the public API spells "behavior", as the A/B data's
#: ``answer_matching_behavior`` field does).
ab_behaviours = ab_behaviors


def load_ab_items(name: str, split: Literal["train", "test"] = "train") -> list[ABItem]:
    """A built-in A/B behaviour dataset with its fixed train/test split.

    Behaviours: ``sentiment`` (95 train / 50 test items; the matching option is the positive reply) and
    ``formality`` (91 train / 40 test; the matching option is the formal reply). In each split the
    matching letter is A in half of the items. See :func:`ab_behaviors`.
    """
    names = ab_behaviors()
    if name not in names:
        raise DataError(f"unknown built-in A/B behaviour {name!r}; choose one of {', '.join(names)}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    resource = resources.files("tl_steer.data") / "builtin" / f"ab_{name}.{split}.jsonl"
    with resources.as_file(resource) as path:
        return read_ab_items(path)


__all__ = [
    "ABItem",
    "ANSWER_PREFIX",
    "ab_behaviors",
    "ab_behaviours",
    "ab_to_pairs",
    "check_ab_items",
    "format_ab_prompt",
    "load_ab_items",
    "read_ab_items",
]
