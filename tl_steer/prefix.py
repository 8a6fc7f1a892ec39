"""Reuse of the clean prefix of a forward pass.

An intervention whose first edited block is ``l`` cannot change the residual stream entering block ``l``,
so a pass that is run many times on the same tokens (a sweep over strengths, a training epoch) can compute
that residual once and restart each pass from it (``start_at_layer=l``), running only blocks ``l..``.

The restart is exact when ``0 < l < n_layers``: the residual entering block ``l`` is all the later blocks
read, except under shortformer positional embeddings, which add the positions inside every block's
attention (no residual-only restart then), and for ``l = 0`` or ``l = n_layers`` there is nothing to skip or
nothing left to run. :func:`reusable_start` decides; :class:`CleanPrefix` runs the passes of one batch;
:class:`PrefixCache` keeps the residual of every sequence of a data set for many epochs.

A ``TransformerBridge`` cannot restart (it refuses ``start_at_layer``: Hugging Face's forward owns the loop
over layers, see ``hosts.can_restart``), so on a bridge every pass runs from the embedding: the same
results, at the cost of the skipped blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_steer.hosts import Host, can_restart
from tl_steer.scoring import (
    Reduction,
    Tokenized,
    batches,
    max_batch_tokens,
    nll_from_final,
    nll_from_logits,
    pad_right,
    pad_token_id,
)


def reusable_start(model: Host, first_layer: int) -> int | None:
    """The block ``first_layer`` if a pass can restart there from a cached clean residual, else None (run
    from the embedding): ``0 < first_layer < n_layers``, no shortformer positional embeddings, and a host that
    can start a pass at a later block (not a TransformerBridge)."""
    if model.cfg.positional_embedding_type == "shortformer" or not can_restart(model):
        return None
    return first_layer if 0 < first_layer < model.cfg.n_layers else None


class CleanPrefix:
    """Forward passes of one batch of tokens that restart from the clean residual entering block ``start``.

    ``residual(tokens)`` computes that residual (None when the restart is not exact, see
    :func:`reusable_start`, or ``enabled`` is False); ``forward(tokens, resid, ...)`` runs the rest of the
    model from it, or the whole model from ``tokens`` when ``resid`` is None. Both give the same result as a
    full pass: the blocks after ``start`` run the same kernels on the same inputs.
    """

    def __init__(self, model: Host, first_layer: int, *, enabled: bool = True) -> None:
        self.model = model
        self.start = reusable_start(model, first_layer) if enabled else None

    @property
    def enabled(self) -> bool:
        return self.start is not None

    def residual(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"] | None:
        """The clean residual entering block ``start`` (run without gradients by the caller), or None."""
        return self.model(tokens, stop_at_layer=self.start) if self.start is not None else None

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        resid: Float[Tensor, "batch pos d_model"] | None,
        *,
        stop_at_layer: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """``model(tokens, stop_at_layer=..., **kwargs)``, restarted from ``resid`` when it is given."""
        if resid is not None:
            return self.model(resid, start_at_layer=self.start, stop_at_layer=stop_at_layer, **kwargs)
        return self.model(tokens, stop_at_layer=stop_at_layer, **kwargs)

    def nll(
        self,
        tokens: Int[Tensor, "batch pos"],
        resid: Float[Tensor, "batch pos d_model"] | None,
        starts: Int[Tensor, " batch"],
        lengths: Int[Tensor, " batch"],
        reduction: Reduction,
        *,
        from_final: bool,
    ) -> Float[Tensor, " batch"]:
        """Completion NLL of the batch (hooks as the caller set them): with ``from_final`` the pass stops
        after the last block and only the scored positions are unembedded (:func:`nll_from_final`; see
        :func:`~tl_steer.scoring.scores_from_final` for when that is allowed), else from the full logits."""
        if from_final:
            final = self.forward(tokens, resid, stop_at_layer=self.model.cfg.n_layers)
            return nll_from_final(self.model, final, tokens, starts, lengths, reduction)
        return nll_from_logits(self.forward(tokens, resid), tokens, starts, lengths, reduction)


class PrefixCache:
    """The clean residual entering block ``start`` of every sequence of ``data``, computed once (the model is
    frozen and nothing before that block changes), and logits from it: each training step then runs only
    the blocks from ``start`` on, and the final norm and unembedding only from the first scored position.
    Where the restart is not exact (:func:`reusable_start`) the blocks run from the embedding."""

    def __init__(self, model: Host, data: Tokenized, first_layer: int, batch_size: int) -> None:
        self.model, self.data = model, data
        self.pad = pad_token_id(model)
        start = reusable_start(model, first_layer)
        self.start = 0 if start is None else start
        self.enabled = start is not None
        self.resid: list[Tensor] = []
        if not self.enabled:
            return
        lengths = [len(s) for s in data.sequences]
        rows: dict[int, Tensor] = {}
        with torch.no_grad():
            for idx in batches(lengths, max(batch_size, 16), max_batch_tokens(model)):
                tokens = pad_right([data.sequences[i] for i in idx], self.pad, model.cfg.device or "cpu")
                resid = model(tokens, stop_at_layer=self.start)
                for row, i in enumerate(idx):
                    rows[i] = resid[row, : lengths[i]].clone()
        self.resid = [rows[i] for i in range(len(data))]

    def logits(
        self, idx: Sequence[int], tokens: Int[Tensor, "batch pos"], first: int
    ) -> Float[Tensor, "batch pos_from_first vocab"]:
        """The logits at positions ``first ..`` of the padded batch ``tokens`` (rows ``idx`` of the data)."""
        model, n_layers = self.model, self.model.cfg.n_layers
        if not can_restart(model):
            # A bridge's stop_at_layer=n_layers returns logits, and its ln_final / unembed modules do not
            # take a residual: its full forward gives the logits (final soft cap included).
            return model(tokens)[:, first:]
        if self.enabled:
            width = tokens.shape[1]
            resid = self.resid[idx[0]].new_zeros(len(idx), width, self.resid[idx[0]].shape[-1])
            for row, i in enumerate(idx):
                resid[row, : self.resid[i].shape[0]] = self.resid[i]
            final = model(resid, start_at_layer=self.start, stop_at_layer=n_layers)
        else:
            final = model(tokens, stop_at_layer=n_layers)
        final = final[:, first:]
        if model.cfg.normalization_type is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)
        cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits


__all__ = ["CleanPrefix", "PrefixCache", "reusable_start"]
