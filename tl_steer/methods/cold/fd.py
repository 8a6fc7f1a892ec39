"""COLD-FD's gradient: ``g = (1/N) sum_i grad L_i`` over the parameters before the hook, computed once
from the examples (for every prefix of them if asked), wrapped in a :class:`ColdFD` intervention."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.dtypes import master_dtype, scaled_grad
from tl_steer.errors import ConfigError, TlSteerError
from tl_steer.freezing import frozen
from tl_steer.hosts import Host, fired_name
from tl_steer.methods.cold.blocks import _INPUT_HOOK, EMBED, POS_EMBED, embedding_tables, fd_blocks, parameters_before
from tl_steer.methods.cold.examples import (
    Example,
    Loss,
    _at_prefix,
    _batches,
    _check_beta,
    _check_positive_finite,
    _check_prefixes,
    _groups,
    _last,
    _losses,
    _tokenize,
    completion_logprob,
    prepare_examples,
)
from tl_steer.methods.cold.fd_intervention import ColdFD
from tl_steer.methods.cold.unit import ReferenceNorm, unit_for
from tl_steer.positions import PositionsLike

#: The finite-difference step of the COLD paper (float32); ``cold_fd(..., fd_method="fd")`` uses it by default.
PUBLISHED_EPS = 1e-6


def _fd_method(fd_method: str | None, method: str | None) -> str:
    """The computation of dZ: ``fd_method``, or its old name ``method`` (which an intervention's ``method``
    label made ambiguous); "jvp" when neither is given."""
    if fd_method is not None and method is not None:
        raise ConfigError("give fd_method only (method is its old name), not both")
    value = fd_method if fd_method is not None else method if method is not None else "jvp"
    if value not in ("fd", "jvp"):
        raise ConfigError(f"fd_method must be 'fd' or 'jvp', got {value!r}")
    return value


def cold_fd(
    model: Host,
    examples: Sequence[Example],
    hook: str,
    *,
    eta: float = 1.0,
    fd_method: Literal["fd", "jvp"] | None = None,
    eps: float | None = None,
    loss: Loss | None = None,
    beta: float = 0.1,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
    method: Literal["fd", "jvp"] | None = None,
) -> ColdFD:
    """COLD-FD: the change one gradient step on the examples would make to the activation at ``hook``,
    computed for each input at inference and added ``m`` times at the positions of ``positions``.

    ``g = (1/N) sum_i grad L_i`` over the parameters before the hook (:func:`parameters_before`),
    computed once here (the parameters' ``requires_grad`` flags are restored and no ``.grad`` is set).
    At inference ``dZ(x) = -(eta/eps) [Z(x; theta + eps g) - Z(x; theta)]`` (``fd_method="fd"``, one
    perturbed partial pass per forward pass, whatever N) or ``dZ(x) = -eta J(x) g`` (``fd_method="jvp"``,
    exact forward-mode; no eps; ``method=`` is accepted as the old name of ``fd_method``). ``hook`` must
    be ``blocks.{l}.hook_resid_pre`` (l >= 1) or ``blocks.{l}.hook_resid_post``. See
    :mod:`tl_steer.methods.cold.fd_intervention` for the position policies under the KV cache.

    The default is the exact JVP. The published setting is one argument away: ``fd_method="fd"`` (with
    ``eps`` = :data:`PUBLISHED_EPS` = 1e-6 unless given). On the default model in float32 that step loses
    about half of ``eps g`` to rounding and the steered logits' change is off from the JVP's by more than
    100% (about 2% at eps = 1e-4, 0.2% at 1e-3). ``eps`` is refused with ``fd_method="jvp"``, where it would
    have no effect.

    The finite difference needs float32 or float64. On a float16 or
    bfloat16 model ``fd_method="fd"`` computes dZ by the exact JVP instead (:meth:`ColdFD.method_for`; the
    intervention keeps ``fd_method="fd"``, so on a float32 copy of the model it is the finite difference
    again). ``g`` is computed with a scaled loss in float16 and kept in float32 (see :mod:`tl_steer.dtypes`).

    The intervention's ``unit`` makes ``m = 1`` add, on the examples, a mean per-position norm of dZ equal
    to the norm of DiffMean on the same pairs (for positive-only examples, a tenth of the median activation
    norm over their completion tokens; :mod:`tl_steer.methods.cold.unit`). The reference comes from the
    activations of the gradient passes; the mean norm of dZ costs one perturbed partial pass per batch of
    examples. ``eta`` only scales the raw step: ``m = 1`` does not depend on it.
    """
    items = cold_fd_prefixes(
        model,
        examples,
        hook,
        None,
        eta=eta,
        fd_method=fd_method,
        eps=eps,
        loss=loss,
        beta=beta,
        positions=positions,
        chat=chat,
        batch_size=batch_size,
        method=method,
    )
    return _last(items)


def cold_fd_prefixes(
    model: Host,
    examples: Sequence[Example],
    hook: str,
    ns: Sequence[int] | None,
    *,
    eta: float = 1.0,
    fd_method: Literal["fd", "jvp"] | None = None,
    eps: float | None = None,
    loss: Loss | None = None,
    beta: float = 0.1,
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 8,
    method: Literal["fd", "jvp"] | None = None,
) -> Iterator[tuple[int, ColdFD]]:
    """:func:`cold_fd` from the first n examples, for each n in ``ns`` (all examples if ``None``), from
    one pass over the examples: yields ``(n, intervention)`` in increasing n, lazily, so that only the
    running sum and the latest gradient are held. Arguments are checked when the first item is requested."""
    ex = prepare_examples(examples, loss)
    eta = _check_positive_finite("eta", eta)
    beta = _check_beta(beta)
    computation = _fd_method(fd_method, method)
    if eps is not None and computation == "jvp":
        raise ConfigError(
            f"eps={eps!r} is the finite difference's step and has no effect with fd_method='jvp' (the default "
            "since 0.2: the exact forward-mode product); pass fd_method='fd' to use the finite difference with "
            "this step"
        )
    # Kept for the JVP too: the intervention saves it, and its fd twin (fd_method="fd") uses it.
    eps = _check_positive_finite("eps", PUBLISHED_EPS if eps is None else eps)
    fd_blocks(model, hook)
    if model.cfg.positional_embedding_type == "shortformer":
        raise TlSteerError("cold_fd does not support shortformer positional embeddings")
    prefixes = _check_prefixes(ns, len(ex))
    names = parameters_before(model, hook)
    params = dict(model.named_parameters())
    # Names that are not parameters of the model (a bridge's embedding tables, see parameters_before) get
    # their gradient from the gradient at the embedding's output.
    tables = dict(zip((EMBED, POS_EMBED), embedding_tables(model), strict=True))
    outputs = {EMBED: "hook_embed", POS_EMBED: "hook_pos_embed"}
    virtual = [name for name in names if name not in params]
    real = [name for name in names if name in params]
    data = _tokenize(model, ex, chat)
    shapes = {name: table for name, table in tables.items() if table is not None} | params
    sums = {name: torch.zeros_like(shapes[name], dtype=torch.float64) for name in names}
    first_input: list[Tensor] = []
    seen: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook: HookPoint) -> Tensor:
        # The embedding's output as a leaf of the graph: its gradient is dL/d(output).
        out = act.detach().requires_grad_(True)
        leaves[str(hook.name)] = out
        return out

    # Per batch so far: (block-0 input, clean activation at the hook, lengths), to measure dZ's norm.
    passes: list[tuple[Tensor, Tensor, Tensor]] = []
    reference = ReferenceNorm(paired=ex.negatives is not None)

    def record(act: Tensor, hook: HookPoint) -> None:
        seen[str(hook.name)] = act.detach()
        if not first_input:
            first_input.append(act.detach())

    first_tokens: Tensor | None = None
    count = 0
    for b in _batches(model, ex, data, _groups(ex, data, batch_size, prefixes)):
        leaves.clear()
        taps = [(outputs[name], leaf) for name in virtual]
        with frozen(model, real), torch.enable_grad():
            logits = model.run_with_hooks(b.tokens, fwd_hooks=[*taps, (_INPUT_HOOK, record), (hook, record)])
            batch_loss = _losses(completion_logprob(logits, b.tokens, b.starts, b.lengths), ex.loss, beta).sum()
            wrt = [params[n] for n in real] + [leaves[fired_name(model, outputs[n])] for n in virtual]
            found = scaled_grad(batch_loss, wrt, model, allow_unused=True)
        del logits
        by_name = dict(zip(real + virtual, found, strict=True))
        for name in virtual:
            by_name[name] = _table_gradient(by_name[name], b.tokens if name == EMBED else None, sums[name].shape)
        grads = [by_name[n] for n in names]
        # Recorded under the name the hook fired with (a bridge's own name for an alias).
        at_hook, at_input = seen[fired_name(model, hook)], seen[fired_name(model, _INPUT_HOOK)]
        reference.add(at_hook, b)
        passes.append((at_input, at_hook, b.lengths))
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
            fd_method=computation,
            positions=positions,
            info={"n_examples": count, "loss": ex.loss, "beta": beta, "chat": chat},
        )
        del g
        assert first_tokens is not None and first_input
        intervention._check_token_recovery(model, first_input[0], first_tokens)
        reference_norm = reference.norm()
        intervention.unit = unit_for(reference_norm, _mean_dz_norm(model, intervention, passes))
        intervention.info |= {"reference_norm": reference_norm, "reference": reference.describe()}
        yield count, intervention


def _table_gradient(d_out: Tensor | None, tokens: Tensor | None, shape: torch.Size) -> Tensor | None:
    """The gradient of an embedding table from the gradient at its output ``d_out`` [batch, pos, d]: row t of
    W_E gathers the positions holding token t (``tokens``); row p of W_pos the positions p (``tokens`` None).
    Exact for a lookup table: the output at a position is the row it looked up."""
    if d_out is None:
        return None
    rows = tokens if tokens is not None else torch.arange(d_out.shape[1], device=d_out.device).expand(d_out.shape[:2])
    grad = torch.zeros(shape, dtype=d_out.dtype, device=d_out.device)
    return grad.index_add_(0, rows.reshape(-1), d_out.reshape(-1, d_out.shape[-1]))


def _mean_dz_norm(model: Host, iv: ColdFD, passes: list[tuple[Tensor, Tensor, Tensor]]) -> float:
    """The mean norm of the raw dZ over the real positions but the first (the attention sink, whose
    activation is far larger) of the recorded example batches."""
    total, count = 0.0, 0
    perturbed = iv.perturbed_parameters(model) if iv.method_for(model) == "fd" else None
    for resid0, activation, lengths in passes:
        # Right padding: the real positions of a row never attend to its padding, so no mask is needed.
        dz = iv.delta(model, activation, resid0, None, perturbed)
        for row, n in enumerate(lengths.tolist()):
            norms = dz[row, 1:n].double().norm(dim=-1)
            total, count = total + float(norms.sum()), count + norms.numel()
    iv.n_perturbed_passes = 0  # counts the steered passes only
    return total / count if count else 0.0
