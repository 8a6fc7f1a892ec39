"""Fluency of generated text: the clean model's NLL per token, and two measures of repetition.

Low NLL alone rewards degenerate loops ("the the the ..." is very likely), so the judge also reports
distinct-n (unique n-grams / n-grams, n = 1, 2) and the share of tokens that sit inside a 4-gram occurring
more than once in the completion. See ``docs/methods.md``, section "Judging generated text".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from tl_steer.hosts import Host
from tl_steer.judges.base import Judge, check_clean, check_texts, clean_nll, nonempty


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Unique n-grams / n-grams of ``tokens`` (NaN when it has fewer than n tokens)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float:
    """The share of tokens covered by at least one n-gram that occurs more than once (0 when the text
    repeats no n-gram, 1 for a pure loop; NaN for no tokens)."""
    if not tokens:
        return float("nan")
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(tokens), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = True
    return float(covered.mean())


class FluencyJudge(Judge):
    """``nll``: the clean model's mean NLL per completion token given the prompt (nats, lower = more
    fluent); ``distinct1``, ``distinct2``; ``rep4``: share of tokens in repeated 4-grams."""

    metrics = ("nll", "distinct1", "distinct2", "rep4")

    def __init__(self, *, chat: bool = False, batch_size: int = 16) -> None:
        self.chat, self.batch_size = chat, batch_size

    def score(self, model: Host, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        p, c = check_texts(prompts, completions)
        check_clean(model)
        out = {k: np.full(len(c), np.nan) for k in self.metrics}
        keep = nonempty(c)
        if not keep.size:
            return out
        out["nll"][keep] = clean_nll(
            model, [p[i] for i in keep], [c[i] for i in keep], chat=self.chat, batch_size=self.batch_size
        )
        assert model.tokenizer is not None
        for i in keep:
            ids = model.tokenizer(c[i], add_special_tokens=False).input_ids
            out["distinct1"][i] = distinct_n(ids, 1)
            out["distinct2"][i] = distinct_n(ids, 2)
            out["rep4"][i] = repeated_ngram_share(ids, 4)
        return out

    def info(self) -> dict[str, object]:
        return {"judge": "fluency"}
