"""Contrastive pairs: one prompt with a concept-positive and a concept-negative completion."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from tl_steer.data.jsonl import read_records
from tl_steer.errors import DataError

_FIELDS = ("prompt", "positive", "negative")


@dataclass(frozen=True)
class ContrastivePair:
    """``prompt`` followed by ``positive`` (shows the concept) or ``negative`` (shows its opposite).

    The scored text is ``prompt + completion`` as given: put the separating space at the start of the
    completion, as the built-in datasets do.
    """

    prompt: str
    positive: str
    negative: str

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DataError(f"ContrastivePair.{name} must be a string, got {type(value).__name__}")
        if not self.positive.strip() or not self.negative.strip():
            raise DataError("ContrastivePair needs non-empty positive and negative completions")
        if self.positive == self.negative:
            raise DataError(f"ContrastivePair has identical completions: {self.positive!r}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_pairs(pairs: object) -> list[ContrastivePair]:
    """Return ``pairs`` as a list, raising :class:`DataError` if it is empty or holds other things."""
    if isinstance(pairs, ContrastivePair):
        return [pairs]
    try:
        items = list(pairs)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataError(f"expected a list of ContrastivePair, got {type(pairs).__name__}") from exc
    if not items:
        raise DataError("the list of pairs is empty; give at least one ContrastivePair")
    for i, item in enumerate(items):
        if not isinstance(item, ContrastivePair):
            raise DataError(f"item {i} is a {type(item).__name__}, not a ContrastivePair")
    return items


def read_pairs(path: str | Path) -> list[ContrastivePair]:
    """Read contrastive pairs from a JSON Lines file with fields ``prompt``, ``positive``, ``negative``.

    Every line is validated; an error names the file, the line and the problem (bad JSON, a missing,
    non-string or empty field, identical completions). Blank lines are skipped.
    """
    return read_records(path, _FIELDS, _pair_from_file, what="pairs")


def _pair_from_file(prompt: str, positive: str, negative: str) -> ContrastivePair:
    if not prompt.strip():
        raise DataError("field 'prompt' is empty")
    return ContrastivePair(prompt, positive, negative)


def builtin_concepts() -> list[str]:
    """Names of the built-in concepts, for :func:`load_pairs`."""
    folder = resources.files("tl_steer.data") / "builtin"
    return sorted({p.name.rsplit("_", 1)[0] for p in folder.iterdir() if p.name.endswith("_train.jsonl")})


# The prompting baseline of each built-in concept: an instruction asking for the positive completion's
# behaviour, prepended (with a newline) to every prompt.
CONCEPT_INSTRUCTIONS = {
    "sentiment": "Continue the text in a positive, happy tone.",
    "formality": "Continue the text in a formal, polite register.",
    "refusal": "You are an assistant that politely declines every request.",
}


def concept_instruction(name: str) -> str:
    """The prompting-baseline instruction of a built-in concept (see ``CONCEPT_INSTRUCTIONS``)."""
    if name not in CONCEPT_INSTRUCTIONS:
        raise DataError(f"no instruction for concept {name!r}; known: {', '.join(sorted(CONCEPT_INSTRUCTIONS))}")
    return CONCEPT_INSTRUCTIONS[name]


def load_pairs(name: str, split: Literal["train", "test"] = "train") -> list[ContrastivePair]:
    """A built-in dataset of contrastive pairs, with its fixed train/test split.

    Concepts: ``sentiment`` (positive vs negative), ``formality`` (formal vs casual register),
    ``refusal`` (an assistant declining vs complying); 100 train and 40 test pairs each, written for
    this project. See :func:`builtin_concepts`.
    """
    concepts = builtin_concepts()
    if name not in concepts:
        raise DataError(f"unknown built-in concept {name!r}; choose one of {', '.join(concepts)}")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    resource = resources.files("tl_steer.data") / "builtin" / f"{name}_{split}.jsonl"
    with resources.as_file(resource) as path:
        return read_pairs(path)
