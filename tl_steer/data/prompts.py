"""Open prompts to generate from: each built-in concept has a set, with a fixed train/test split.

The files ``builtin/<concept>_prompts.jsonl`` hold one object per line with ``prompt`` (the text to
continue) and ``split`` (``"train"`` or ``"test"``); 48 prompts per concept (32 train, 16 test), written
for this project. They are neutral about the concept (a sentiment prompt opens a story without judging
it, a formality prompt asks for a message without setting its register, a refusal prompt is a harmless
request), so what the generated text shows of the concept comes from the condition, not the prompt.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

from tl_steer.data.jsonl import read_records
from tl_steer.errors import DataError

Split = Literal["train", "test", "all"]


def _record(prompt: str, split: str) -> tuple[str, str]:
    if not prompt.strip():
        raise DataError("field 'prompt' is empty")
    if split not in ("train", "test"):
        raise DataError(f"field 'split' must be 'train' or 'test', got {split!r}")
    return prompt, split


def read_prompts(path: str | Path, split: Split = "all") -> list[str]:
    """The prompts of a JSON Lines file with fields ``prompt`` and ``split`` ("train"/"test"), in file
    order, those of one split or all of them."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    records = read_records(path, ("prompt", "split"), _record, what="prompts")
    return [p for p, s in records if split == "all" or s == split]


def prompt_sets() -> list[str]:
    """The built-in concepts that have open prompts, for :func:`load_prompts`."""
    folder = resources.files("tl_steer.data") / "builtin"
    return sorted(p.name.removesuffix("_prompts.jsonl") for p in folder.iterdir() if p.name.endswith("_prompts.jsonl"))


def load_prompts(name: str, split: Split = "test") -> list[str]:
    """The open prompts of a built-in concept (``sentiment``, ``formality``, ``refusal``): the 16 held-out
    ``"test"`` prompts (default), the 32 ``"train"`` prompts, or ``"all"`` 48."""
    names = prompt_sets()
    if name not in names:
        raise DataError(f"no built-in prompts for {name!r}; choose one of {', '.join(names)}")
    resource = resources.files("tl_steer.data") / "builtin" / f"{name}_prompts.jsonl"
    with resources.as_file(resource) as path:
        return read_prompts(path, split)
