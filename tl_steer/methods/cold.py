"""COLD-Steer: steering from a few examples by the learning dynamics of one gradient step.

The change in the activation Z at a hook that one gradient step on N examples would cause,

    theta' = theta - (eta/N) sum_i grad_theta L_i
    dZ(x)  = Z(x; theta') - Z(x; theta)  ~  -eta J(x) g,      g = (1/N) sum_i grad_theta L_i,

is applied at inference without changing any weight (methods.md section 4). Losses on the examples
(:func:`example_losses`): for pairs, DPO without a reference model,
``L = -log sigmoid(beta (log p(A_p|q) - log p(A_n|q)))`` with ``log p`` minus the mean token NLL of the
completion (beta = 0.1); for positive-only examples, the mean token NLL of the completion.

- :func:`cold_kernel` (unit kernel, K = 1): ``dZ = -eta v`` with ``v`` the mean over examples of the
  gradient of the whole loss w.r.t. the activation at the hook (at the last prompt position, or averaged
  over the completion positions). The backward pass stops at the hook: no parameter gradient is computed.
  Returns an :class:`~tl_steer.interventions.AddVector`.
- :func:`cold_fd`: ``g`` over the parameters before the hook only; at inference, for each input,
  ``dZ(x) = -(eta/eps) [Z(x; theta + eps g) - Z(x; theta)]`` (``method="fd"``: one perturbed pass that
  stops at the hook, with ``Z(x; theta)`` taken from the ordinary pass) or the exact forward-mode
  ``dZ(x) = -eta J(x) g`` (``method="jvp"``, ``torch.func.jvp`` over ``torch.func.functional_call``).
  Returns a :class:`ColdFD` intervention.

How COLD-FD sees its input. A hook sees the activation at its hook point, not the tokens. :class:`ColdFD`
therefore also records, in the same forward pass, the residual entering block 0
(``blocks.0.hook_resid_pre``) and, from block 0's attention scores, the KV-cache offset and the padding
mask. The perturbed partial pass runs the blocks up to the hook from that residual with the perturbed
parameters (``start_at_layer=0, stop_at_layer=...``), with every TransformerLens hook of those blocks suspended, so
that it neither re-triggers steering nor overwrites activations that other hooks record. The embedding
part of ``g`` (rows of ``W_E`` of the example tokens, and ``W_pos`` for absolute positions) enters as a
perturbation of that residual: the token at each position is recognised by an exact match of the
recorded residual with ``W_E[token] (+ W_pos[position])`` among the tokens whose gradient row is not zero
(a check at construction makes sure this recovers the tokens of the examples). Only the parameters before
the hook are copied (for ``"fd"``); the model is never copied.

Where it steers. Any position policy works in full forward passes (scoring, uncached generation). Under
the KV cache a forward pass holds only the new positions, while dZ of a new position depends on the
perturbed states of all earlier ones: COLD-FD steers the prompt pass (``positions="prompt"``, the
published setting; the effect carries through the cache) and raises a clear error if a policy asks it to
steer positions of a cached continuation step. Use ``generate(..., use_past_kv_cache=False)`` for the
other policies.

Composition. ``method="jvp"`` computes dZ from the clean network and composes freely with other
interventions. ``method="fd"`` takes ``Z(x; theta)`` from the ordinary (steered) pass, so it assumes that
no other intervention changes activations at or before its hook.
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_steer.data.pairs import ContrastivePair
from tl_steer.dtypes import is_half, master_dtype, scaled_grad
from tl_steer.errors import ConfigError, DataError, HookNameError, ShapeError, TlSteerError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.interventions import AddVector, Edit, HookFn, Intervention, check_strength
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike, PositionState, steer_mask
from tl_steer.scoring import Tokenized, batches, check_positive_int, pad_right, pad_token_id, tokenize_completions

Loss = Literal["dpo", "nll"]
Example = ContrastivePair | tuple[str, str] | tuple[str, str, str]
_INPUT_HOOK = "blocks.0.hook_resid_pre"
_SCORES_HOOK = "blocks.0.attn.hook_attn_scores"
_FD_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


# ----- examples and losses ----------------------------------------------------------------------


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


def _tokenize(model: HookedTransformer, ex: Examples, chat: bool) -> Tokenized:
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


def _batches(model: HookedTransformer, ex: Examples, data: Tokenized, groups: list[list[int]]) -> Iterator[_Batch]:
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
    model: HookedTransformer,
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


def _block_site(model: HookedTransformer, hook: str) -> HookSite:
    validate_hook(model, hook)
    site = HookSite.parse(hook)
    if site.layer is None:
        raise HookNameError(
            f"COLD steers at a hook inside a block, got {hook!r}: outside the blocks there is either nothing "
            "before it to learn (embeddings) or nothing after it that the loss could act through "
            f"(ln_final, unembed). Use e.g. 'blocks.{model.cfg.n_layers // 2}.hook_resid_post'."
        )
    return site


def fd_blocks(model: HookedTransformer, hook: str) -> int:
    """How many blocks the perturbed pass of COLD-FD runs for ``hook`` (``stop_at_layer``)."""
    _block_site(model, hook)
    match = _FD_HOOK.match(hook)
    if match is None:
        raise HookNameError(
            f"cold_fd supports the residual stream hooks 'blocks.{{l}}.hook_resid_pre' (l >= 1) and "
            f"'blocks.{{l}}.hook_resid_post', got {hook!r}"
        )
    layer, where = int(match.group(1)), match.group(2)
    if where == "pre" and layer == 0:
        raise HookNameError(
            "cold_fd needs at least one block before its hook; 'blocks.0.hook_resid_pre' is the embedding "
            "output. Use 'blocks.0.hook_resid_post' or later (or cold_kernel)."
        )
    return layer if where == "pre" else layer + 1


def parameters_before(model: HookedTransformer, hook: str) -> list[str]:
    """Names of the parameters that act before ``hook`` (the ones COLD-FD's gradient step moves):
    the token (and absolute position) embeddings and the blocks the perturbed pass runs."""
    n_blocks = fd_blocks(model, hook)
    prefixes = ("embed.", "pos_embed.", *(f"blocks.{i}." for i in range(n_blocks)))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


@contextmanager
def _grad_only_for(model: HookedTransformer, names: Sequence[str]) -> Iterator[None]:
    """Set requires_grad on exactly the named parameters; restore every flag afterwards, also on error."""
    wanted = set(names)
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


@contextmanager
def _hooks_suspended(model: HookedTransformer, n_blocks: int) -> Iterator[None]:
    """Detach every forward hook of the TransformerLens hook points of blocks[:n_blocks] for the duration
    of the block, and put the very same hooks back afterwards (also on error)."""
    prefixes = tuple(f"blocks.{i}." for i in range(n_blocks))
    points = [hp for name, hp in model.hook_dict.items() if name.startswith(prefixes)]
    saved = [hp._forward_hooks for hp in points]
    try:
        for hp in points:
            hp._forward_hooks = OrderedDict()
        yield
    finally:
        for hp, hooks in zip(points, saved, strict=True):
            hp._forward_hooks = hooks


# ----- COLD-Kernel --------------------------------------------------------------------------------


def cold_kernel(
    model: HookedTransformer,
    examples: Sequence[Example],
    hook: str,
    *,
    eta: float = 1.0,
    loss: Loss | None = None,
    beta: float = 0.1,
    where: Literal["last_prompt", "completion"] = "last_prompt",
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
) -> AddVector:
    """COLD-Kernel (unit kernel): a steering vector ``-eta v`` from N examples, added ``m`` times at
    ``hook`` at the positions of ``positions``.

        v = (1/N) sum_i dL_i / dZ_i

    where Z_i is the activation at ``hook`` at the last prompt position of example i (``where=
    "last_prompt"``; for a pair, the prompt is shared by both completions, so the gradients through both
    add up), or averaged over the completion positions of each completion (``where="completion"``,
    summed over the two completions of a pair). L is the whole loss (DPO without reference for pairs,
    NLL for positive-only examples; see :func:`prepare_examples`).

    The activation at the hook is made a leaf and every model parameter has ``requires_grad`` False
    during the computation (flags restored afterwards), so the backward pass stops at the hook and no
    parameter ``.grad`` is touched.
    """
    items = cold_kernel_prefixes(
        model,
        examples,
        hook,
        None,
        eta=eta,
        loss=loss,
        beta=beta,
        where=where,
        positions=positions,
        chat=chat,
        batch_size=batch_size,
    )
    return _last(items)


def cold_kernel_prefixes(
    model: HookedTransformer,
    examples: Sequence[Example],
    hook: str,
    ns: Sequence[int] | None,
    *,
    eta: float = 1.0,
    loss: Loss | None = None,
    beta: float = 0.1,
    where: Literal["last_prompt", "completion"] = "last_prompt",
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
) -> Iterator[tuple[int, AddVector]]:
    """:func:`cold_kernel` from the first n examples, for each n in ``ns`` (all examples if ``None``),
    from one pass over the examples: yields ``(n, vector)`` in increasing n.

    Arguments are checked when the first item is requested (this is a generator)."""
    ex = prepare_examples(examples, loss)
    eta = _check_positive_finite("eta", eta)
    beta = _check_beta(beta)
    if where not in ("last_prompt", "completion"):
        raise ConfigError(f"where must be 'last_prompt' or 'completion', got {where!r}")
    _block_site(model, hook)
    prefixes = _check_prefixes(ns, len(ex))
    data = _tokenize(model, ex, chat)
    leaves: list[Tensor] = []

    def make_leaf(act: Tensor, hook: HookPoint) -> Tensor:
        leaf = act.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    total: Tensor | None = None
    count = 0
    for b in _batches(model, ex, data, _groups(ex, data, batch_size, prefixes)):
        leaves.clear()
        with _grad_only_for(model, ()), torch.enable_grad():
            logits = model.run_with_hooks(b.tokens, fwd_hooks=[(hook, make_leaf)])
            if len(leaves) != 1:
                raise TlSteerError(f"the hook {hook!r} fired {len(leaves)} times in one forward pass; expected once")
            batch_loss = _losses(completion_logprob(logits, b.tokens, b.starts, b.lengths), ex.loss, beta).sum()
            # Loss-scaled in float16, where these gradients are often below the smallest normal number.
            (grad,) = scaled_grad(batch_loss, leaves, model)
            assert grad is not None
        del logits
        if grad.ndim != 3:
            raise ShapeError(
                f"cold_kernel needs a hook with activations of shape [batch, pos, d], but {hook!r} has "
                f"shape {tuple(grad.shape)}; use a residual-stream or MLP hook"
            )
        for rows in b.rows:
            for r in rows:
                s, e = int(b.starts[r]), int(b.lengths[r])
                part = (grad[r, s - 1] if where == "last_prompt" else grad[r, s:e].mean(0)).double()
                total = part if total is None else total + part
        count += len(b.examples)
        if not _at_prefix(count, len(ex), prefixes):
            continue
        assert total is not None
        vector = (-eta * total / count).to(master_dtype(model))
        yield (
            count,
            AddVector(
                hook,
                vector,
                positions=positions,
                method="cold_kernel",
                info={
                    "n_examples": count,
                    "loss": ex.loss,
                    "beta": beta,
                    "eta": eta,
                    "where": where,
                    "chat": chat,
                    "norm": float(vector.norm()),
                },
                model_identity=model_identity(model),
            ),
        )


def _at_prefix(count: int, n: int, prefixes: list[int] | None) -> bool:
    return count == n if prefixes is None else count in prefixes


def _last(items: Iterator[tuple[int, Any]]) -> Any:
    out = None
    for _, item in items:
        out = item
    assert out is not None
    return out


# ----- COLD-FD ------------------------------------------------------------------------------------


def cold_fd(
    model: HookedTransformer,
    examples: Sequence[Example],
    hook: str,
    *,
    eta: float = 1.0,
    method: Literal["fd", "jvp"] = "fd",
    eps: float = 1e-6,
    loss: Loss | None = None,
    beta: float = 0.1,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
) -> ColdFD:
    """COLD-FD: the change one gradient step on the examples would make to the activation at ``hook``,
    computed for each input at inference and added ``m`` times at the positions of ``positions``.

    ``g = (1/N) sum_i grad L_i`` over the parameters before the hook (:func:`parameters_before`),
    computed once here (the parameters' ``requires_grad`` flags are restored and no ``.grad`` is set).
    At inference ``dZ(x) = -(eta/eps) [Z(x; theta + eps g) - Z(x; theta)]`` (``method="fd"``, one
    perturbed partial pass per forward pass, whatever N) or ``dZ(x) = -eta J(x) g`` (``method="jvp"``,
    exact forward-mode; no eps). ``hook`` must be ``blocks.{l}.hook_resid_pre`` (l >= 1) or
    ``blocks.{l}.hook_resid_post``. See the module docstring for the position policies under the KV cache.

    The finite difference needs float32 or float64 (published eps = 1e-6, float32). On a float16 or
    bfloat16 model ``method="fd"`` computes dZ by the exact JVP instead (:meth:`ColdFD.method_for`; the
    intervention keeps ``fd_method="fd"``, so on a float32 copy of the model it is the finite difference
    again). ``g`` is computed with a scaled loss in float16 and kept in float32 (see :mod:`tl_steer.dtypes`).
    """
    items = cold_fd_prefixes(
        model,
        examples,
        hook,
        None,
        eta=eta,
        method=method,
        eps=eps,
        loss=loss,
        beta=beta,
        positions=positions,
        chat=chat,
        batch_size=batch_size,
    )
    return _last(items)


def cold_fd_prefixes(
    model: HookedTransformer,
    examples: Sequence[Example],
    hook: str,
    ns: Sequence[int] | None,
    *,
    eta: float = 1.0,
    method: Literal["fd", "jvp"] = "fd",
    eps: float = 1e-6,
    loss: Loss | None = None,
    beta: float = 0.1,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
) -> Iterator[tuple[int, ColdFD]]:
    """:func:`cold_fd` from the first n examples, for each n in ``ns`` (all examples if ``None``), from
    one pass over the examples: yields ``(n, intervention)`` in increasing n, lazily, so that only the
    running sum and the latest gradient are held. Arguments are checked when the first item is requested."""
    ex = prepare_examples(examples, loss)
    eta = _check_positive_finite("eta", eta)
    eps = _check_positive_finite("eps", eps)
    beta = _check_beta(beta)
    if method not in ("fd", "jvp"):
        raise ConfigError(f"method must be 'fd' or 'jvp', got {method!r}")
    fd_blocks(model, hook)
    if model.cfg.positional_embedding_type == "shortformer":
        raise TlSteerError("cold_fd does not support shortformer positional embeddings")
    prefixes = _check_prefixes(ns, len(ex))
    names = parameters_before(model, hook)
    params = dict(model.named_parameters())
    data = _tokenize(model, ex, chat)
    sums = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names}
    first_input: list[Tensor] = []

    def record(act: Tensor, hook: HookPoint) -> None:
        if not first_input:
            first_input.append(act.detach())

    first_tokens: Tensor | None = None
    count = 0
    for b in _batches(model, ex, data, _groups(ex, data, batch_size, prefixes)):
        with _grad_only_for(model, names), torch.enable_grad():
            logits = model.run_with_hooks(b.tokens, fwd_hooks=[(_INPUT_HOOK, record)])
            batch_loss = _losses(completion_logprob(logits, b.tokens, b.starts, b.lengths), ex.loss, beta).sum()
            grads = scaled_grad(batch_loss, [params[n] for n in names], model, allow_unused=True)
        del logits
        if first_tokens is None:
            first_tokens = b.tokens
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                sums[name] += grad.double()
        del grads
        count += len(b.examples)
        if not _at_prefix(count, len(ex), prefixes):
            continue
        # float32 in a half-precision model: many entries of g are below float16's normal range.
        g = {name: (total / count).to(master_dtype(model)) for name, total in sums.items()}
        intervention = ColdFD.from_gradient(
            model,
            hook,
            g,
            eta=eta,
            eps=eps,
            fd_method=method,
            positions=positions,
            info={"n_examples": count, "loss": ex.loss, "beta": beta, "chat": chat},
        )
        del g
        assert first_tokens is not None and first_input
        intervention._check_token_recovery(model, first_input[0], first_tokens)
        yield count, intervention


class ColdFD(Intervention):
    """COLD-FD: adds ``m * dZ(x)`` at a residual-stream hook, where dZ(x) is the change one gradient step
    of size eta along ``-g`` would make to that activation for the current input x.

    ``g`` is stored as tensors (block parameters by name; the non-zero rows of the token-embedding
    gradient; the position-embedding gradient for absolute positions), so the intervention saves and
    loads like any other; it acts on the model it was made for (checked by :meth:`check`, which also
    binds it to that model: ``steer`` and ``tl_steer.load(path, model)`` do this).

    ``n_perturbed_passes`` counts the perturbed partial passes run so far (one per steered forward pass).
    """

    kind = "cold_fd"
    saved_index_tensors = ("embed.index",)

    def __init__(
        self,
        hook: str,
        grads: dict[str, Tensor],
        *,
        embed_index: Tensor,
        embed_grad: Tensor,
        pos_grad: Tensor | None = None,
        eta: float = 1.0,
        eps: float = 1e-6,
        fd_method: str = "fd",
        n_blocks: int,
        d_model: int,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(positions=positions, method=method or "cold_fd", info=info, model_identity=model_identity)
        if not isinstance(hook, str) or _FD_HOOK.match(hook) is None:
            raise HookNameError(f"ColdFD needs a 'blocks.{{l}}.hook_resid_pre/post' hook, got {hook!r}")
        if fd_method not in ("fd", "jvp"):
            raise ConfigError(f"fd_method must be 'fd' or 'jvp', got {fd_method!r}")
        self.hook = hook
        self.eta = _check_positive_finite("eta", eta)
        self.eps = _check_positive_finite("eps", eps)
        self.fd_method = fd_method
        for name, value in (("n_blocks", n_blocks), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ColdFD's {name} must be a positive integer, got {value!r}")
        self.n_blocks = int(n_blocks)
        self.d_model = int(d_model)
        self.grads = {k: v.detach() for k, v in grads.items()}
        self.embed_index = embed_index.detach().to(torch.long).reshape(-1)
        self.embed_grad = embed_grad.detach()
        self.pos_grad = None if pos_grad is None else pos_grad.detach()
        if self.embed_index.numel() and int(self.embed_index.min()) < 0:
            raise ShapeError(f"ColdFD's embed_index holds a negative token id {int(self.embed_index.min())}")
        if self.embed_grad.shape != (self.embed_index.shape[0], self.d_model):
            raise ShapeError(
                f"embed_grad must have shape [{self.embed_index.shape[0]}, {self.d_model}], "
                f"got {tuple(self.embed_grad.shape)}"
            )
        for name, t in [*self.grads.items(), ("embed_grad", self.embed_grad)]:
            if not torch.isfinite(t).all():
                raise DataError(f"the COLD-FD gradient {name!r} has NaN or infinite entries")
        self.n_perturbed_passes = 0
        self._model: weakref.ref[HookedTransformer] | None = None

    # ----- construction from a full gradient -----------------------------------------------------
    @classmethod
    def from_gradient(
        cls,
        model: HookedTransformer,
        hook: str,
        g: dict[str, Tensor],
        *,
        eta: float = 1.0,
        eps: float = 1e-6,
        fd_method: str = "fd",
        positions: PositionsLike | None = None,
        info: dict[str, Any] | None = None,
    ) -> ColdFD:
        """Build from a gradient ``g`` over :func:`parameters_before` (names as in ``named_parameters``)."""
        n_blocks = fd_blocks(model, hook)
        expected = set(parameters_before(model, hook))
        if set(g) != expected:
            missing, extra = sorted(expected - set(g)), sorted(set(g) - expected)
            raise ShapeError(f"g must hold the parameters before {hook!r}; missing {missing[:5]}, extra {extra[:5]}")
        for name in g:
            other_embedding = name.startswith(("embed.", "pos_embed.")) and name not in ("embed.W_E", "pos_embed.W_pos")
            if other_embedding and g[name].abs().max() > 0:
                raise TlSteerError(f"cold_fd does not support embedding parameters other than W_E / W_pos ({name})")
        w_e = g["embed.W_E"]
        index = (w_e != 0).any(-1).nonzero()[:, 0]
        iv = cls(
            hook,
            {k: v for k, v in g.items() if k.startswith("blocks.")},
            embed_index=index,
            embed_grad=w_e[index],
            pos_grad=g.get("pos_embed.W_pos"),
            eta=eta,
            eps=eps,
            fd_method=fd_method,
            n_blocks=n_blocks,
            d_model=model.cfg.d_model,
            positions=positions,
            info={**(info or {}), "norm_g": float(sum(float(v.double().pow(2).sum()) for v in g.values()) ** 0.5)},
            model_identity=model_identity(model),
        )
        iv.check(model)
        if iv.method_for(model) == "fd":
            lost = iv.fd_rounding_error(model)
            iv.info["fd_rounding_error"] = lost
            if lost > 0.2:
                warnings.warn(
                    f"with eps={eps}, {100 * lost:.0f}% of the parameter perturbation eps*g is lost to rounding in "
                    f"{model.cfg.dtype} (|fl(theta + eps g) - theta - eps g| / |eps g|); the finite difference "
                    "will be noisy. Use a larger eps (the error of the difference grows with eps * |g|) or "
                    "method='jvp'.",
                    stacklevel=3,
                )
        return iv

    def method_for(self, model: HookedTransformer) -> str:
        """How dZ is computed on ``model``: ``fd_method``, except that a finite difference requested for a
        float16 or bfloat16 model is computed by the exact JVP instead.

        Why: with 8 to 11 significant bits, ``theta + eps g`` rounds most of ``eps g`` away for any useful
        eps (measured on the tiny test models: 92-100% of the perturbation lost at eps=1e-6, and a dZ with
        cosine ~0 to the float32 one at eps=1e-3), and running the partial pass in float32 instead would
        need float32 copies of every block before the hook. The JVP is the quantity the finite difference
        approximates, exact in any dtype, so it is the float32 answer up to the rounding of the forward pass.
        """
        return "jvp" if self.fd_method == "fd" and is_half(model) else self.fd_method

    # ----- Intervention protocol -------------------------------------------------------------------
    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def first_layer(self, n_layers: int) -> int:
        # dZ depends on the input of block 0, which must be part of every steered pass.
        return 0

    def widths(self) -> dict[str, int]:
        return {self.hook: self.d_model}

    def tensors(self) -> dict[str, Tensor]:
        out = {f"grad.{k}": v for k, v in self.grads.items()}
        out["embed.index"] = self.embed_index
        out["embed.grad"] = self.embed_grad
        if self.pos_grad is not None:
            out["pos.grad"] = self.pos_grad
        return out

    def config(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "eta": self.eta,
            "eps": self.eps,
            "fd_method": self.fd_method,
            "n_blocks": self.n_blocks,
            "d_model": self.d_model,
        }

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> ColdFD:
        grads = {k.removeprefix("grad."): v for k, v in tensors.items() if k.startswith("grad.")}
        return cls(
            config["hook"],
            grads,
            embed_index=tensors["embed.index"],
            embed_grad=tensors["embed.grad"],
            pos_grad=tensors.get("pos.grad"),
            eta=config["eta"],
            eps=config["eps"],
            fd_method=config["fd_method"],
            n_blocks=config["n_blocks"],
            d_model=config["d_model"],
            **common,
        )

    def check(self, model: HookedTransformer) -> None:
        """Check that this intervention fits ``model`` (identity, hook, width, parameter shapes) and bind
        it to ``model`` for the perturbed passes."""
        super().check(model)
        if fd_blocks(model, self.hook) != self.n_blocks:
            raise ShapeError(
                f"ColdFD at {self.hook!r} runs {self.n_blocks} blocks; this model would run another number"
            )
        params = dict(model.named_parameters())
        for name, t in self.grads.items():
            if name not in params or params[name].shape != t.shape:
                raise ShapeError(f"ColdFD's gradient {name!r} of shape {tuple(t.shape)} does not fit this model")
        if self.embed_index.numel() and int(self.embed_index.max()) >= model.cfg.d_vocab:
            raise ShapeError("ColdFD's embedding gradient refers to tokens outside this model's vocabulary")
        if (self.pos_grad is None) != (model.cfg.positional_embedding_type != "standard"):
            raise ShapeError("ColdFD's position-embedding gradient does not fit this model's positional embeddings")
        if self.pos_grad is not None and self.pos_grad.shape != model.W_pos.shape:
            raise ShapeError(
                f"ColdFD's position-embedding gradient has shape {tuple(self.pos_grad.shape)}, but this model's "
                f"W_pos has {tuple(model.W_pos.shape)}"
            )
        self._model = weakref.ref(model)

    def with_positions(self, positions: PositionsLike) -> ColdFD:
        """The same intervention (sharing its tensors) with another position policy."""
        twin = ColdFD.from_saved(
            self.config(),
            self.tensors(),
            {"positions": positions, "method": self.method, "info": self.info, "model_identity": self.model_identity},
        )
        twin._model = self._model
        return twin

    def _bound_model(self) -> HookedTransformer:
        model = self._model() if self._model is not None else None
        if model is None:
            raise TlSteerError(
                "this ColdFD is not bound to a model; apply it with tl_steer.steer(model, ...) or call "
                ".check(model) first (tl_steer.load(path, model) does this)"
            )
        return model

    def _edits(self) -> list[tuple[str, Edit]]:
        raise TlSteerError("ColdFD installs its hooks through .hooks(m), which also records the input of block 0")

    def hooks(self, m: float = 1.0, *, n_layers: int | None = None) -> list[tuple[str, HookFn]]:
        """``fwd_hooks`` at strength m: two read-only recorders at block 0 (its input, and the KV-cache
        offset and padding mask from its attention scores) and the steering hook. ``m = 0`` gives []."""
        m = check_strength(m)
        if m == 0.0:
            return []
        model = self._bound_model()
        run = _Run(self, model, m)
        return [(_INPUT_HOOK, run.record_input), (_SCORES_HOOK, run.record_scores), (self.hook, run.steer)]

    # ----- the perturbed pass -------------------------------------------------------------------------
    def embedding_direction(
        self,
        model: HookedTransformer,
        resid0: Float[Tensor, "batch pos d"],
        key_mask: Int[Tensor, "batch pos"] | None,
    ) -> tuple[Float[Tensor, "batch pos d"], Int[Tensor, "batch pos"]]:
        """The embedding part of g at each position of an input whose block-0 input is ``resid0``, and
        the recognised token id at each position (-1 where the token's gradient row is zero).

        The token at a position is the one among those with a non-zero gradient row whose
        ``W_E[token] (+ W_pos[position])`` equals ``resid0`` there exactly.
        """
        batch, pos, d = resid0.shape
        flat = resid0.reshape(-1, d)
        pos_embed: Tensor | None = None
        pos_ids: Tensor | None = None
        pad: Tensor | None = None
        if model.cfg.positional_embedding_type == "standard":
            if key_mask is None:
                pos_ids = torch.arange(pos, device=resid0.device)[None].expand(batch, pos)
            else:
                pos_ids = (key_mask.cumsum(dim=1) - 1).clamp(min=0)
                pad = key_mask == 0
            pos_embed = model.W_pos[pos_ids]
            if pad is not None:
                pos_embed = torch.where(pad[..., None], torch.zeros_like(pos_embed), pos_embed)
        # The gradient keeps its own (master) precision: in float16 most of its entries are subnormal.
        dtype = torch.promote_types(self.embed_grad.dtype, resid0.dtype)
        direction = torch.zeros_like(resid0, dtype=dtype)
        tokens = torch.full((batch * pos,), -1, dtype=torch.long, device=resid0.device)
        index = self.embed_index.to(resid0.device)
        if index.numel():
            rows = model.W_E[index].detach()
            target = flat - pos_embed.reshape(-1, d) if pos_embed is not None else flat
            nearest = torch.cdist(target, rows).argmin(-1)
            candidate = rows[nearest]
            rebuilt = candidate + pos_embed.reshape(-1, d) if pos_embed is not None else candidate
            exact = (rebuilt == flat).all(-1)
            grad_rows = self.embed_grad.to(device=resid0.device, dtype=dtype)[nearest]
            direction = torch.where(exact[:, None], grad_rows, torch.zeros_like(grad_rows)).reshape(batch, pos, d)
            tokens = torch.where(exact, index[nearest], tokens)
        if self.pos_grad is not None and pos_ids is not None:
            pos_dir = self.pos_grad.to(device=resid0.device, dtype=dtype)[pos_ids]
            if pad is not None:
                pos_dir = torch.where(pad[..., None], torch.zeros_like(pos_dir), pos_dir)
            direction = direction + pos_dir
        return direction, tokens.reshape(batch, pos)

    def delta(
        self,
        model: HookedTransformer,
        activation: Float[Tensor, "batch pos d"],
        resid0: Float[Tensor, "batch pos d"],
        key_mask: Int[Tensor, "batch pos"] | None = None,
        perturbed: dict[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d"]:
        """dZ(x) for every position of an input whose block-0 input is ``resid0`` and whose clean
        activation at the hook is ``activation`` (used by "fd" only): one perturbed partial pass.

        The method is :meth:`method_for` the model (the exact JVP in float16 / bfloat16). In those dtypes the
        JVP's tangent (g and its embedding part) is multiplied by a power of two that brings its largest
        entry near 1 before it is cast to the model's dtype, and the result divided by it in float32: the
        JVP is linear in the tangent, and unscaled most entries of g would be subnormal in float16."""
        direction, _ = self.embedding_direction(model, resid0, key_mask)
        kwargs: dict[str, Any] = {"start_at_layer": 0, "stop_at_layer": self.n_blocks, "attention_mask": key_mask}
        with torch.no_grad(), _hooks_suspended(model, self.n_blocks):
            self.n_perturbed_passes += 1
            if self.method_for(model) == "fd":
                if perturbed is None:
                    perturbed = self.perturbed_parameters(model)
                shifted = (resid0 + self.eps * direction).to(resid0.dtype)
                z = torch.func.functional_call(model, perturbed, (shifted,), kwargs)
                return -(self.eta / self.eps) * (z - activation)
            scale = 1.0
            if is_half(model):
                peak = max([float(direction.abs().max())] + [float(v.abs().max()) for v in self.grads.values()])
                scale = 2.0 ** -math.floor(math.log2(peak)) if peak > 0 else 1.0
            tangents = {
                k: (v.to(device=resid0.device, dtype=torch.promote_types(v.dtype, resid0.dtype)) * scale).to(
                    resid0.dtype
                )
                for k, v in self.grads.items()
            }
            params = dict(model.named_parameters())
            primals = {k: params[k].detach() for k in tangents}

            def partial(ps: dict[str, Tensor], r: Tensor) -> Tensor:
                return torch.func.functional_call(model, ps, (r,), kwargs)

            out = torch.func.jvp(partial, (primals, resid0), (tangents, (direction * scale).to(resid0.dtype)))
            dz = out[1] if scale == 1.0 else out[1].float() / scale
            return -self.eta * dz

    def perturbed_parameters(self, model: HookedTransformer) -> dict[str, Tensor]:
        """theta + eps g for the block parameters before the hook (the only parameters copied)."""
        params = dict(model.named_parameters())
        return {
            k: params[k].detach() + self.eps * v.to(device=params[k].device, dtype=params[k].dtype)
            for k, v in self.grads.items()
        }

    def fd_rounding_error(self, model: HookedTransformer) -> float:
        """|fl(theta + eps g) - theta - eps g| / |eps g| over the block parameters: the share of the finite
        difference's parameter perturbation that the model's dtype cannot represent."""
        params = dict(model.named_parameters())
        err = ref = 0.0
        with torch.no_grad():
            for name, grad in self.perturbed_parameters(model).items():
                theta = params[name].detach().double()
                step = self.eps * self.grads[name].to(theta.device).double()
                err += float((grad.double() - theta - step).pow(2).sum())
                ref += float(step.pow(2).sum())
        return math.sqrt(err / ref) if ref > 0 else 0.0

    def _check_token_recovery(self, model: HookedTransformer, resid0: Tensor, tokens: Tensor) -> None:
        """Raise if the tokens of an example batch cannot be recognised from its block-0 input (an
        architecture whose embedding is not a plain lookup), and warn about tokens sharing an embedding
        row with a token of the examples (they would receive its gradient)."""
        _, found = self.embedding_direction(model, resid0, None)
        known = torch.isin(tokens, self.embed_index.to(tokens.device))
        w_e = model.W_E.detach()
        recognised = bool((found[known] >= 0).all()) and torch.equal(w_e[found[known].clamp(min=0)], w_e[tokens[known]])
        if not recognised:
            raise TlSteerError(
                "cold_fd cannot recognise the input tokens from 'blocks.0.hook_resid_pre' for this model (its "
                "embedding is not a plain W_E lookup plus W_pos); use cold_kernel"
            )
        proj = w_e.double() @ torch.randn(
            w_e.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        ).to(w_e.device)
        order = proj.argsort()
        same = (w_e[order[1:]] == w_e[order[:-1]]).all(-1)
        if same.any():
            dup = torch.cat([order[1:][same], order[:-1][same]])
            shared = dup[torch.isin(dup, self.embed_index.to(dup.device))]
            if shared.numel():
                warnings.warn(
                    f"tokens {sorted(set(shared.tolist()))[:10]} share their embedding row with other tokens; "
                    "COLD-FD gives all of them the same embedding update",
                    stacklevel=3,
                )


class _Run:
    """The per-installation state of a ColdFD: what the recorders saw in the current forward pass."""

    def __init__(self, iv: ColdFD, model: HookedTransformer, m: float) -> None:
        self.iv = iv
        self.model = model
        self.m = m
        self.state = PositionState()
        self.resid0: Tensor | None = None
        self.key_mask: Tensor | None = None
        self.offset: int | None = None
        self.perturbed: dict[str, Tensor] | None = None

    def record_input(self, act: Tensor, hook: HookPoint) -> None:
        self.resid0 = act.detach()

    def record_scores(self, scores: Tensor, hook: HookPoint) -> None:
        self.state.record_offset(scores, hook)
        self.offset = int(scores.shape[-1] - scores.shape[-2])
        # A real key is attended by at least its own query (causal or local attention); a padding key is
        # masked (-inf) for every query.
        keys = torch.isfinite(scores[:, 0]).any(dim=-2)
        self.key_mask = None if bool(keys.all()) else keys.to(torch.long)

    def steer(self, activation: Tensor, hook: HookPoint) -> Tensor:
        resid0, key_mask, offset = self.resid0, self.key_mask, self.offset
        self.resid0 = self.key_mask = self.offset = None
        batch, q_len = activation.shape[0], activation.shape[1]
        mask = steer_mask(self.iv.positions, self.state, batch, q_len, activation.device)
        if mask is not None and not bool(mask.any()):
            return activation
        if offset is None or resid0 is None:
            raise TlSteerError(
                f"ColdFD at {self.iv.hook!r} did not see block 0 of this forward pass; COLD-FD needs passes that "
                "start at the embeddings (no start_at_layer)"
            )
        if offset > 0:
            raise TlSteerError(
                f"ColdFD with positions={self.iv.positions.kind!r} was asked to steer a cached continuation step "
                "(KV cache), which holds only the new positions while dZ depends on the whole input. Steer the "
                "prompt pass only (positions='prompt', the published setting) or generate with "
                "use_past_kv_cache=False."
            )
        if resid0.shape[:2] != activation.shape[:2]:
            raise ShapeError(
                f"ColdFD: the input of block 0 has shape {tuple(resid0.shape)} but the activation at "
                f"{self.iv.hook!r} has shape {tuple(activation.shape)}"
            )
        if self.iv.method_for(self.model) == "fd" and self.perturbed is None:
            self.perturbed = self.iv.perturbed_parameters(self.model)
        dz = self.iv.delta(self.model, activation, resid0, key_mask, self.perturbed)
        steered = activation + (self.m * dz).to(activation.dtype)
        if mask is None:
            return steered
        return torch.where(mask[..., None], steered, activation)


__all__ = [
    "ColdFD",
    "Examples",
    "cold_fd",
    "cold_fd_prefixes",
    "cold_kernel",
    "cold_kernel_prefixes",
    "completion_logprob",
    "example_losses",
    "fd_blocks",
    "parameters_before",
    "prepare_examples",
]
