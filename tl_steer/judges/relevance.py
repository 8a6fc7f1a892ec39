"""Relevance of generated text to its prompt: pointwise mutual information with the prompt.

PMI = mean_t [log p(y_t | own prompt, y_<t) - log p(y_t | other prompt, y_<t)] under the clean model, in
nats per token, with the other prompt the next distinct prompt of the set (cyclically, so the choice is
fixed and every prompt serves once as another's foil). About 0 for text that ignores its prompt, positive
for text that follows from it. See ``docs/methods.md``, section "Judging generated text".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tl_steer.errors import DataError
from tl_steer.hosts import Host
from tl_steer.judges.base import Judge, check_clean, check_texts, clean_nll, nonempty


def other_prompts(prompts: Sequence[str]) -> list[str]:
    """For each prompt, the next distinct prompt of the list in order of first appearance (cyclically)."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        raise DataError("relevance needs at least 2 distinct prompts: each completion is compared with another prompt")
    where = {p: k for k, p in enumerate(distinct)}
    return [distinct[(where[p] + 1) % len(distinct)] for p in prompts]


class RelevanceJudge(Judge):
    """``relevance``: PMI of the completion with its prompt against another prompt of the set (nats/token)."""

    metrics = ("relevance",)

    def __init__(self, *, chat: bool = False, batch_size: int = 16) -> None:
        self.chat, self.batch_size = chat, batch_size

    def score(self, model: Host, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        p, c = check_texts(prompts, completions)
        others = other_prompts(p)
        check_clean(model)
        out = np.full(len(c), np.nan)
        keep = nonempty(c)
        if keep.size:
            texts = [c[i] for i in keep]
            chat, size = self.chat, self.batch_size
            own = clean_nll(model, [p[i] for i in keep], texts, chat=chat, batch_size=size)
            other = clean_nll(model, [others[i] for i in keep], texts, chat=chat, batch_size=size)
            out[keep] = other - own
        return {"relevance": out}

    def info(self) -> dict[str, object]:
        return {"judge": "relevance"}
