"""COLD's examples: validation, tokenisation, padded batches and the per-example losses (DPO without a
reference model for pairs, the mean token NLL for positive-only examples), and the argument checks the
COLD functions share."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host
from tl_steer.scoring import Tokenized, batches, check_positive_int, pad_right, pad_token_id, tokenize_completions

Loss = Literal["dpo", "nll"]
Example = ContrastivePair | tuple[str, str] | tuple[str, str, str]


@dataclass(frozen=True)
class Examples:
    """Validated examples: prompts, target completions and (for DPO) the rejected completions."""

    prompts: list[str]
    positives: list[str]
    negatives: list[str] | None
    loss: str

    def __len__(self) -> int:
        return len(self.prompts)


def prepare_examples(examples: object, loss: Loss | None = None) -> Examples:
    """Check ``examples`` and choose the loss.

    Accepts :class:`ContrastivePair` items or ``(prompt, positive, negative)`` tuples (pairs), and
    ``(prompt, completion)`` tuples (positive-only). ``loss=None`` picks ``"dpo"`` for pairs and
    ``"nll"`` for positive-only examples; ``loss="nll"`` on pairs uses their positive completions.
    """
    if loss not in (None, "dpo", "nll"):
        raise ConfigError(f"loss must be 'dpo' or 'nll', got {loss!r}")
    if examples is None or isinstance(examples, (str, bytes)):
        raise DataError(f"examples must be a list of ContrastivePair or (prompt, completion) tuples, got {examples!r}")
    if isinstance(examples, ContrastivePair):
        examples = [examples]
    try:
        items = list(examples)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataError(f"examples must be a list, got {type(examples).__name__}") from exc
    if not items:
        raise DataError("COLD needs at least one example; the list of examples is empty")
    prompts, positives, negatives = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, ContrastivePair):
            fields: tuple[Any, ...] = (item.prompt, item.positive, item.negative)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            fields = tuple(item)
        else:
            raise DataError(
                f"example {i}: expected a ContrastivePair, a (prompt, completion) or a (prompt, positive, negative) "
                f"tuple, got {type(item).__name__}"
            )
        for value in fields:
            if not isinstance(value, str):
                raise DataError(f"example {i}: every field must be a string, got {type(value).__name__}")
        if not fields[0].strip():
            raise DataError(f"example {i}: the prompt is empty")
        for value in fields[1:]:
            if not value.strip():
                raise DataError(f"example {i}: the completion {value!r} is empty; every example needs a completion")
        prompts.append(fields[0])
        positives.append(fields[1])
        negatives.append(fields[2] if len(fields) == 3 else None)
    has_negative = [n is not None for n in negatives]
    if loss is None:
        if all(has_negative):
            loss = "dpo"
        elif not any(has_negative):
            loss = "nll"
        else:
            raise DataError("examples mix pairs and positive-only examples; give one kind, or loss='nll'")
    if loss == "dpo":
        missing = [i for i, h in enumerate(has_negative) if not h]
        if missing:
            raise DataError(f"loss='dpo' needs pairs, but example {missing[0]} has no negative completion")
        return Examples(prompts, positives, [n for n in negatives if n is not None], "dpo")
    return Examples(prompts, positives, None, "nll")


def _tokenize(model: Host, ex: Examples, chat: bool) -> Tokenized:
    """Rows 0..N-1 are the positive completions; for DPO rows N..2N-1 are the negative ones."""
    prompts = list(ex.prompts)
    completions = list(ex.positives)
    if ex.negatives is not None:
        prompts += ex.prompts
        completions += ex.negatives
    return tokenize_completions(model, prompts, completions, chat=chat)


def completion_logprob(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    starts: Int[Tensor, " batch"],
    lengths: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """Minus the mean token NLL of tokens[b, starts[b]:lengths[b]]; differentiable, float32 or wider."""
    lg = logits[:, :-1]
    if lg.dtype not in (torch.float32, torch.float64):
        lg = lg.float()
    token_lp = torch.log_softmax(lg, dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)[None]
    mask = (pos >= starts[:, None]) & (pos < lengths[:, None])
    return (token_lp * mask).sum(-1) / mask.sum(-1)


def _losses(logp: Tensor, loss: str, beta: float) -> Tensor:
    """Per-example losses from the completion log-probs of one batch (positives first, then negatives)."""
    if loss == "nll":
        return -logp
    k = logp.shape[0] // 2
    return -F.logsigmoid(beta * (logp[:k] - logp[k:]))


@dataclass
class _Batch:
    examples: list[int]  # example indices
    rows: list[list[int]]  # per example, its rows in ``tokens``
    tokens: Tensor
    starts: Tensor
    lengths: Tensor


def _groups(ex: Examples, data: Tokenized, batch_size: int, ns: list[int] | None = None) -> list[list[int]]:
    """Example indices in batches. Without ``ns``: batches of similar length. With ``ns`` (sorted prefix
    sizes): consecutive batches that never cross a prefix end, so running sums can be read at each n."""
    batch_size = check_positive_int("batch_size", batch_size)
    n = len(ex)
    if ns is None:
        lengths = [len(s) for s in data.sequences]
        paired = ex.negatives is not None
        ex_len = [max(lengths[i], lengths[i + n]) if paired else lengths[i] for i in range(n)]
        return batches(ex_len, batch_size)
    out, start = [], 0
    for end in ns:
        out += [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]
        start = end
    return out


def _batches(model: Host, ex: Examples, data: Tokenized, groups: list[list[int]]) -> Iterator[_Batch]:
    """Batches of whole examples (both completions of a pair in the same batch), right-padded."""
    n = len(ex)
    paired = ex.negatives is not None
    lengths = [len(s) for s in data.sequences]
    pad = pad_token_id(model)
    for idx in groups:
        source = idx + [i + n for i in idx] if paired else list(idx)
        k = len(idx)
        rows = [[j, j + k] if paired else [j] for j in range(k)]
        tokens = pad_right([data.sequences[r] for r in source], pad, model.cfg.device or "cpu")
        starts = torch.as_tensor([data.starts[r] for r in source], device=tokens.device)
        lens = torch.as_tensor([lengths[r] for r in source], device=tokens.device)
        yield _Batch(list(idx), rows, tokens, starts, lens)


def _check_prefixes(ns: Sequence[int] | None, n: int) -> list[int] | None:
    if ns is None:
        return None
    try:
        values = sorted({int(x) for x in ns})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"ns must be a list of example counts, got {ns!r}") from exc
    if not values or values[0] < 1 or values[-1] > n:
        raise ConfigError(f"every prefix size in ns must be between 1 and the number of examples ({n}), got {ns!r}")
    return values


def example_losses(
    model: Host,
    examples: Sequence[Example],
    *,
    loss: Loss | None = None,
    beta: float = 0.1,
    chat: bool = False,
    batch_size: int = 8,
) -> Float[Tensor, " n"]:
    """The loss of each example (DPO without reference, or NLL), in the input order, computed in padded
    batches without gradients."""
    ex = prepare_examples(examples, loss)
    _check_beta(beta)
    data = _tokenize(model, ex, chat)
    out = torch.empty(len(ex), dtype=torch.float64)
    with torch.no_grad():
        for b in _batches(model, ex, data, _groups(ex, data, batch_size)):
            logp = completion_logprob(model(b.tokens), b.tokens, b.starts, b.lengths)
            out[b.examples] = _losses(logp, ex.loss, beta).double().cpu()
    return out


# ----- checks -------------------------------------------------------------------------------------


def _check_positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value == 0.0:
        raise ConfigError(f"{name} must be finite and non-zero, got {value}")
    return value


def _check_beta(beta: float) -> float:
    beta = _check_positive_finite("beta", beta)
    if beta < 0:
        raise ConfigError(f"beta must be positive, got {beta}")
    return beta


def _at_prefix(count: int, n: int, prefixes: list[int] | None) -> bool:
    return count == n if prefixes is None else count in prefixes


def _last(items: Iterator[tuple[int, Any]]) -> Any:
    out = None
    for _, item in items:
        out = item
    assert out is not None
    return out
