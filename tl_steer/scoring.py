"""Teacher-forced scoring of completions: NLL with the prompt masked, batched with padding.

For a prompt q and completion A = (a_1 .. a_T) the NLL is ``-sum_t log P(a_t | q, a_<t)`` (``"sum"``)
or that divided by T (``"mean"``, the default: length-normalised, docs/methods.md, section 2).

The prompt/completion boundary is found on token ids: the full text ``prompt + completion`` is
tokenized once, and the completion starts at the first token where it differs from the tokenization of
the prompt alone, so a token that merges across the boundary counts as completion.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, DataError
from tl_steer.hookpoints import HookSite
from tl_steer.hosts import Host, can_restart, check_host
from tl_steer.interventions import Intervention
from tl_steer.positions import prompt_boundary
from tl_steer.steering import steer

Reduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class Tokenized:
    """Token ids of prompt + completion, and where each completion starts (its first token index)."""

    sequences: list[list[int]]
    starts: list[int]

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(
        self, idx: Sequence[int], pad_id: int, device: torch.device | str
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " batch"], Int[Tensor, " batch"]]:
        """(tokens, starts, lengths) of the items ``idx``: their sequences right-padded with ``pad_id`` on
        ``device`` (:func:`pad_right`), each completion's first token index and each sequence's length."""
        tokens = pad_right([self.sequences[i] for i in idx], pad_id, device)
        starts = torch.as_tensor([self.starts[i] for i in idx], device=tokens.device)
        lens = torch.as_tensor([len(self.sequences[i]) for i in idx], device=tokens.device)
        return tokens, starts, lens


def format_prompt(model: Host, prompt: str, chat: bool) -> str:
    """The prompt as the model sees it: as given, or wrapped in the tokenizer's chat template as a user
    turn followed by the assistant header (``chat=True``)."""
    if not chat:
        return prompt
    tokenizer = model.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat=True needs a tokenizer with a chat template")
    return str(
        tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    )


def tokenize_completions(
    model: Host, prompts: Sequence[str], completions: Sequence[str], *, chat: bool = False
) -> Tokenized:
    """Tokenize each ``prompt + completion`` and find the completion boundary on token ids.

    A BOS token is prepended when ``model.cfg.default_prepend_bos`` is set. With ``chat=True`` the prompt
    is wrapped in the chat template and leading whitespace of the completion is dropped.
    """
    check_host(model)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("scoring needs a model with a tokenizer")
    if len(prompts) != len(completions):
        raise DataError(f"{len(prompts)} prompts but {len(completions)} completions")
    bos = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
    sequences, starts = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not completion.strip():
            raise DataError(f"item {i}: the completion {completion!r} is empty or only whitespace")
        text_prompt = format_prompt(model, prompt, chat)
        text_completion = completion.lstrip() if chat else completion
        p_ids = bos + tokenizer(text_prompt, add_special_tokens=False).input_ids
        full = bos + tokenizer(text_prompt + text_completion, add_special_tokens=False).input_ids
        start = 0
        limit = min(len(p_ids), len(full))
        while start < limit and p_ids[start] == full[start]:
            start += 1
        if start >= len(full):
            raise DataError(f"item {i}: the completion {completion!r} is empty after tokenization")
        if start == 0:
            raise DataError(
                f"item {i}: the prompt {prompt!r} is empty after tokenization; give a prompt or set prepend_bos"
            )
        if len(full) > model.cfg.n_ctx:
            raise DataError(f"item {i}: {len(full)} tokens exceed the model's context of {model.cfg.n_ctx}; shorten it")
        sequences.append(full)
        starts.append(start)
    return Tokenized(sequences, starts)


def pad_token_id(model: Host) -> int:
    """The id used to pad batches: the tokenizer's pad token, else 0 (padding is never attended)."""
    tokenizer = model.tokenizer
    return int(tokenizer.pad_token_id) if tokenizer is not None and tokenizer.pad_token_id is not None else 0


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> Int[Tensor, "batch pos"]:
    """Right-pad token lists into one tensor. Causal attention never lets a real token see a pad to
    its right, so no attention mask is needed and real positions are computed exactly."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out.to(device)


def nll_from_logits(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    starts: Int[Tensor, " batch"],
    lengths: Int[Tensor, " batch"],
    reduction: Reduction = "mean",
) -> Float[Tensor, " batch"]:
    """NLL of tokens[b, starts[b]:lengths[b]] given the logits one position earlier."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = tokens[:, 1:]
    token_lp = logprobs.gather(-1, target[..., None])[..., 0]
    pos = torch.arange(1, tokens.shape[1], device=tokens.device)[None]
    mask = (pos >= starts[:, None]) & (pos < lengths[:, None])
    total = -(token_lp * mask).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1)
    raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def final_logprobs(
    model: Host, final: Float[Tensor, "batch pos d_model"], rows: Tensor | list[int], cols: Tensor | list[int]
) -> Float[Tensor, "scored vocab"]:
    """Log-probabilities from the final residual (before the final norm) at (rows[i], cols[i]) only: final
    norm, unembedding and logit soft cap of those positions, so the vocabulary-sized matrix product runs where
    a token is scored and nowhere else."""
    device = final.device
    picked = final[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)][None]
    if model.cfg.normalization_type is not None:
        picked = model.ln_final(picked)
    logits = model.unembed(picked)[0]
    cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return torch.log_softmax(logits.float(), dim=-1)


def nll_from_final(
    model: Host,
    final: Float[Tensor, "batch pos d_model"],
    tokens: Int[Tensor, "batch pos"],
    starts: Int[Tensor, " batch"],
    lengths: Int[Tensor, " batch"],
    reduction: Reduction = "mean",
) -> Float[Tensor, " batch"]:
    """:func:`nll_from_logits` from the final residual (``model(tokens, stop_at_layer=n_layers)``): the
    logits are computed only at the positions ``starts[b] - 1 .. lengths[b] - 2`` that predict a completion
    token (:func:`final_logprobs`). Completions are short beside their prompts, so most of the unembedding of
    a full pass is skipped; the NLL is the same to float rounding."""
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pos = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None]
    mask = (pos >= starts[:, None] - 1) & (pos < lengths[:, None] - 1)
    rows, cols = mask.nonzero(as_tuple=True)
    logprobs = final_logprobs(model, final, rows, cols)
    target = tokens[rows, cols + 1].to(logprobs.device)
    token_lp = logprobs.gather(-1, target[:, None])[:, 0]
    total = torch.zeros(tokens.shape[0], dtype=token_lp.dtype, device=token_lp.device)
    total = total.index_add(0, rows.to(token_lp.device), -token_lp)
    if reduction == "sum":
        return total
    return total / mask.sum(-1).to(total.device)


def scores_from_final(model: Host, interventions: Sequence[Intervention]) -> bool:
    """Whether a scoring pass may stop after the last block and unembed only the scored positions
    (:func:`nll_from_final`): a host that stops there (a HookedTransformer; a bridge's ``stop_at_layer``
    returns logits) and no edited hook after the last block (the final norm and unembedding run on the
    scored positions only, so a hook there would see other shapes), nor any hook already on the model's
    final norm or unembedding (a user's own ``model.hooks(...)`` there)."""
    if not can_restart(model):
        return False
    if any(hp._forward_hooks for name, hp in model.hook_dict.items() if name.startswith(("ln_final.", "unembed."))):
        return False
    return all(HookSite.parse(name).layer is not None for iv in interventions for name in iv.hook_names)


# Padded tokens x vocabulary x 4 bytes of float32 logits per pass; batches are split to stay under it.
_LOGITS_BUDGET: ContextVar[int] = ContextVar("tl_steer_logits_budget", default=1 << 30)


@contextmanager
def logits_budget(n_bytes: int) -> Iterator[None]:
    """Inside the block, every batched scoring or capture pass holds at most ``n_bytes`` of float32 logits:
    a batch of ``batch_size`` rows is split further when ``rows x longest x d_vocab x 4`` would exceed it
    (default 1 GiB). A single sequence is never split, so one row always fits whatever the budget.

    Example::

        with tl_steer.logits_budget(256 * 2**20):  # 256 MiB per pass
            tl_steer.preference_utility(model, vector, pairs)
    """
    token = _LOGITS_BUDGET.set(check_positive_int("the logits budget (bytes)", n_bytes))
    try:
        yield
    finally:
        _LOGITS_BUDGET.reset(token)


def max_batch_tokens(model: Host) -> int:
    """Padded tokens (rows x longest row) one pass may hold under the current :func:`logits_budget`."""
    return max(1, _LOGITS_BUDGET.get() // (4 * int(model.cfg.d_vocab)))


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1 (numpy integers too, booleans not), or a :class:`ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), to waste little on padding.

    A batch holds at most ``batch_size`` rows and, with ``max_tokens``, at most that many padded tokens
    (rows x its longest row), so a large batch of long sequences is chunked instead of running out of
    memory; a sequence longer than ``max_tokens`` gets a batch of its own.
    """
    size = check_positive_int("batch_size", batch_size)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        # Longest first: a batch's first row is its longest, so its padded size is rows x that length.
        fits = out and len(out[-1]) < size
        if fits and max_tokens is not None:
            fits = (len(out[-1]) + 1) * lengths[out[-1][0]] <= max_tokens
        if fits:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def score_tokenized(
    model: Host,
    data: Tokenized,
    *,
    reduction: Reduction = "mean",
    batch_size: int = 16,
    forward: Callable[[Int[Tensor, "batch pos"]], Float[Tensor, "batch pos vocab"]] | None = None,
    from_final: bool = False,
) -> Float[Tensor, " n"]:
    """Completion NLL of every item of ``data``, computed in padded batches, in the input order.

    ``forward`` maps tokens to logits (default: the model's forward pass); the prompt boundary of each
    row is declared for position policies while it runs. With ``from_final`` (and no ``forward``) each pass
    stops after the last block and only the scored positions are unembedded (:func:`nll_from_final`; allowed
    where :func:`scores_from_final` says so).
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    scored = from_final and forward is None
    run = forward or (lambda tokens: model(tokens, return_type="logits"))
    pad = pad_token_id(model)
    out = torch.empty(len(data), dtype=torch.float32)
    lengths = [len(s) for s in data.sequences]
    for idx in batches(lengths, batch_size, max_batch_tokens(model)):
        tokens, starts, lens = data.batch(idx, pad, model.cfg.device or "cpu")
        with prompt_boundary(starts):
            if scored:
                nll = nll_from_final(
                    model, model(tokens, stop_at_layer=model.cfg.n_layers), tokens, starts, lens, reduction
                )
            else:
                nll = nll_from_logits(run(tokens), tokens, starts, lens, reduction)
        out[idx] = nll.detach().float().cpu()
    return out


def completion_nll(
    model: Host,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    interventions: Sequence[Intervention] = (),
    m: float | Sequence[float] = 1.0,
    reduction: Reduction = "mean",
    batch_size: int = 16,
    chat: bool = False,
) -> Float[Tensor, " n"]:
    """Teacher-forced NLL of each completion after its prompt, optionally while steered.

    Returns a float32 tensor of shape [n]: mean NLL per completion token (default) or the sum.
    """
    data = tokenize_completions(model, prompts, completions, chat=chat)
    with ExitStack() as stack, torch.no_grad():
        if interventions:
            stack.enter_context(steer(model, *interventions, m=m))
        # the unembedding only where a completion token is scored, where no edited hook sits after the blocks
        from_final = scores_from_final(model, list(interventions))
        return score_tokenized(model, data, reduction=reduction, batch_size=batch_size, from_final=from_final)


def pair_nll(
    model: Host,
    pairs: Sequence[ContrastivePair],
    *,
    interventions: Sequence[Intervention] = (),
    m: float | Sequence[float] = 1.0,
    reduction: Reduction = "mean",
    batch_size: int = 16,
    chat: bool = False,
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """(L_p, L_n): the NLL of each pair's positive and negative completion, both in one batched run."""
    items = check_pairs(pairs)
    prompts = [p.prompt for p in items] * 2
    completions = [p.positive for p in items] + [p.negative for p in items]
    nll = completion_nll(
        model,
        prompts,
        completions,
        interventions=interventions,
        m=m,
        reduction=reduction,
        batch_size=batch_size,
        chat=chat,
    )
    n = len(items)
    return nll[:n], nll[n:]
