"""COLD-Kernel (unit kernel): a steering vector ``-eta v`` with ``v`` the mean over the examples of the
gradient of the loss w.r.t. the activation at the hook; the backward pass stops at the hook."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.dtypes import master_dtype, scaled_grad
from tl_steer.errors import ConfigError, ShapeError, TlSteerError
from tl_steer.freezing import frozen
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector
from tl_steer.methods.cold.blocks import _block_site
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
from tl_steer.methods.cold.unit import ReferenceNorm, unit_for
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike


def cold_kernel(
    model: Host,
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
    """COLD-Kernel (unit kernel): a steering vector ``-eta v`` from N examples, added ``m * unit`` times at
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

    The intervention's ``unit`` makes ``m = 1`` add a vector of the norm of DiffMean on the same pairs
    (for positive-only examples, a tenth of the median activation norm over their completion tokens),
    measured from the activations of the same passes (:mod:`tl_steer.methods.cold.unit`). ``eta`` only
    scales the raw vector: ``m = 1`` does not depend on it (use ``.with_unit(1.0)`` for the raw step).
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
    model: Host,
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
    reference = ReferenceNorm(paired=ex.negatives is not None)
    for b in _batches(model, ex, data, _groups(ex, data, batch_size, prefixes)):
        leaves.clear()
        with frozen(model), torch.enable_grad():
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
        reference.add(leaves[0], b)
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
        reference_norm = reference.norm()
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
                    "reference_norm": reference_norm,
                    "reference": reference.describe(),
                },
                model_identity=model_identity(model),
                unit=unit_for(reference_norm, float(vector.double().norm())),
            ),
        )
