"""The judge contract: score (prompt, completion) pairs, reading the text with no steering active."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import pandas as pd

from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host
from tl_steer.scoring import completion_nll

# Within one judge_table call, the clean NLL of each (prompt, completion) set is computed once: the fluency
# judge's NLL is the relevance judge's own-prompt term.
_NLL_MEMO: ContextVar[dict[Any, Any] | None] = ContextVar("tl_steer_judge_nll_memo", default=None)


@contextmanager
def shared_nll() -> Iterator[None]:
    """Inside the block, :func:`clean_nll` computes each distinct request once."""
    token = _NLL_MEMO.set({})
    try:
        yield
    finally:
        _NLL_MEMO.reset(token)


def clean_nll(
    model: Host, prompts: Sequence[str], completions: Sequence[str], *, chat: bool, batch_size: int
) -> np.ndarray:
    """The clean model's mean NLL per token of each completion after its prompt (float64 array)."""
    memo = _NLL_MEMO.get()
    key = (id(model), tuple(prompts), tuple(completions), chat)
    if memo is not None and key in memo:
        return memo[key]  # type: ignore[no-any-return]
    out = completion_nll(model, list(prompts), list(completions), chat=chat, batch_size=batch_size)
    values = out.double().numpy()
    if memo is not None:
        memo[key] = values
    return values


class Judge(ABC):
    """Scores generated texts. :meth:`score` returns one float array per metric (``metrics``), NaN for an
    empty completion (nothing to judge) or, for the LLM judge, an unparseable answer."""

    #: the names of the columns this judge adds to a generation table
    metrics: tuple[str, ...] = ()

    @abstractmethod
    def score(self, model: Host, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        """One value per (prompt, completion) for every metric of :attr:`metrics`."""

    def check(self, model: Host, concept: str | None = None) -> None:
        """Raise before any work if this judge cannot judge texts of ``model`` (and ``concept``)."""
        return None  # judges that use the clean model itself fit any model

    def info(self) -> dict[str, object]:
        """What to show beside this judge's scores (validity, model, ...)."""
        return {"judge": type(self).__name__}


def check_clean(model: Host) -> None:
    """Judges read text with the clean model: refuse to run inside a ``steer`` block (or with any hook)."""
    if any(hp._forward_hooks for hp in model.hook_dict.values()):
        raise ConfigError(
            "the model has hooks attached (a steer() block?): judges read the text with the clean model; "
            "score outside the steer() block"
        )


def check_texts(prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[str], list[str]]:
    """The prompts and completions as lists of strings of one length."""
    p, c = list(prompts), list(completions)
    if len(p) != len(c):
        raise DataError(f"{len(p)} prompts but {len(c)} completions")
    for name, items in (("prompts", p), ("completions", c)):
        for i, x in enumerate(items):
            if not isinstance(x, str):
                raise DataError(f"{name}[{i}] is a {type(x).__name__}, not a string")
    return p, c


def nonempty(completions: Sequence[str]) -> np.ndarray:
    """Indices of the completions that hold more than whitespace (the others score NaN)."""
    return np.array([i for i, c in enumerate(completions) if c.strip()], dtype=np.int64)


def judge_table(
    model: Host, table: pd.DataFrame, judges: Sequence[Judge], *, concept: str | None = None
) -> pd.DataFrame:
    """``table`` (from :func:`tl_steer.generate`) with one column per judge metric added, each judge run
    once over all rows (the prompt as given, without a condition's instruction)."""
    if not isinstance(table, pd.DataFrame) or not {"prompt", "completion"} <= set(table.columns):
        raise DataError("judge_table needs a table with 'prompt' and 'completion' columns (from tl_steer.generate)")
    for j in judges:
        if not isinstance(j, Judge):
            raise ConfigError(f"expected a Judge, got {type(j).__name__}")
        j.check(model, concept)
    out = table.copy()
    prompts, completions = table["prompt"].astype(str).tolist(), table["completion"].astype(str).tolist()
    with shared_nll():
        for j in judges:
            for name, values in j.score(model, prompts, completions).items():
                out[name] = values
    return out
