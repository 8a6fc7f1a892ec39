"""How good a sparse autoencoder is at its hook: sparsity, reconstruction, and the language-model loss it costs.

Scored positions: every real (non-padding) position except the first ``skip_first`` of each sequence and
the positions of excluded tokens (by default the tokenizer's special tokens: BOS, EOS, padding, chat
markers). The first positions of a sequence are attention sinks whose residual norm in Llama-family models
is orders of magnitude above the rest; an SAE is not trained on them (sae-lens ``seqpos_slice`` and
``exclude_special_tokens``), so scoring them would measure something it never tried to do.

With ``x`` the activation at the hook, ``f = sae.encode(x)`` and ``x_hat = sae.decode(f)`` (sae-lens' own
encode and decode), over the scored positions ``S``:

- ``l0 = mean_{p in S} #{i : f_p,i != 0}``
- ``explained_variance = 1 - sum_{p in S} ||x_p - x_hat_p||^2 / sum_{p in S} ||x_p - mean_S(x)||^2``
- cross-entropy ``CE`` is the mean next-token loss over predictions made *at* scored positions whose
  target is a real token, in three runs: clean; with ``x_hat`` spliced in at the scored positions (the
  others keep their clean activation); with zeros spliced in there (zero ablation). Then
  ``ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 when the reconstruction costs no
  loss, 0 when it is as bad as deleting the activation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_steer.errors import ConfigError, DataError, ShapeError
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import Host

if TYPE_CHECKING:
    from sae_lens import SAE


@dataclass(frozen=True)
class SAEQuality:
    """What :func:`sae_quality` measured; see the module docstring for the formulas."""

    hook_name: str
    n_tokens: int
    """Scored positions (the set ``S``)."""
    n_predictions: int
    """Next-token predictions in the cross-entropy means."""
    l0: float
    explained_variance: float
    ce_clean: float
    ce_with_sae: float
    ce_zero_ablation: float
    ce_loss_recovered: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Totals:
    """Running sums over scored positions, in float64 so that long evaluations do not lose precision."""

    n: int = 0
    n_pred: int = 0
    active: float = 0.0
    sq_err: float = 0.0
    sq_x: float = 0.0
    sum_x: Tensor | None = None
    ce_clean: float = 0.0
    ce_sae: float = 0.0
    ce_zero: float = 0.0


@torch.no_grad()
def sae_quality(
    model: Host,
    sae: SAE,
    texts_or_tokens: Sequence[str] | Int[Tensor, "batch pos"],
    *,
    hook_name: str | None = None,
    batch_size: int = 8,
    max_length: int = 128,
    skip_first: int | None = None,
    exclude_token_ids: Sequence[int] | None = None,
) -> SAEQuality:
    """Mean L0, explained variance and fraction of cross-entropy loss recovered of ``sae`` on held-out input.

    Args:
        model: the model the SAE reads from.
        sae: a sae-lens SAE whose input is the activation at ``hook_name``.
        texts_or_tokens: strings (each gets a BOS token prepended and is cut to ``max_length`` tokens) or a
            tensor of token ids with no padding (used as given, e.g. BOS-led rows of a training corpus).
        hook_name: default ``sae.cfg.metadata.hook_name``.
        batch_size: sequences per forward pass.
        max_length: longest text, in tokens, BOS included.
        skip_first: leading positions of each sequence not scored; default: the start of the SAE's training
            ``seqpos_slice`` if it recorded one, else 1 (the BOS position).
        exclude_token_ids: token ids whose positions are not scored; default: the tokenizer's special tokens.

    Returns:
        :class:`SAEQuality` (formulas in the module docstring).
    """
    hook_name = validate_hook(model, hook_name or _sae_hook(sae))
    if getattr(sae.cfg.metadata, "hook_head_index", None) is not None:
        raise ConfigError("sae_quality does not support SAEs trained on a single attention head")
    if skip_first is None:
        skip_first = _seqpos_start(sae)
    excluded = torch.tensor(
        sorted(set(exclude_token_ids if exclude_token_ids is not None else _special_ids(model))), dtype=torch.long
    )
    tokens, valid = _as_tokens(model, texts_or_tokens, max_length)
    device = next(model.parameters()).device
    totals = _Totals()
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size].to(device)
        real = valid[start : start + batch_size].to(device)
        scored = real & ~torch.isin(batch, excluded.to(device))
        scored[:, :skip_first] = False
        if scored.any():
            _score_batch(model, sae, hook_name, batch, real, scored, totals)
    if totals.n == 0 or totals.n_pred == 0:
        raise DataError("no position to score: every position is padding, skipped or an excluded token")
    return _summarise(hook_name, totals)


def _score_batch(
    model: Host,
    sae: SAE,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    real: Bool[Tensor, "batch pos"],
    scored: Bool[Tensor, "batch pos"],
    totals: _Totals,
) -> None:
    captured: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> Tensor:
        captured["x"] = act.detach().clone()
        return act

    clean_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, capture)])
    x = captured["x"]
    features = sae.encode(x.to(sae.dtype))
    x_hat = sae.decode(features).to(x.dtype).reshape(x.shape)

    sae_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, _splice(x_hat, scored))])
    zero_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, _splice(torch.zeros_like(x), scored))])

    flat = x[scored].flatten(1).to(torch.float64)
    flat_hat = x_hat[scored].flatten(1).to(torch.float64)
    totals.n += flat.shape[0]
    totals.active += float((features[scored] != 0).sum())
    totals.sq_err += float(((flat - flat_hat) ** 2).sum())
    totals.sq_x += float((flat**2).sum())
    sum_x = flat.sum(0)
    totals.sum_x = sum_x if totals.sum_x is None else totals.sum_x + sum_x

    # A prediction counts when it is made at a scored position and its target is a real token.
    predicts = scored[:, :-1] & real[:, 1:]
    targets = tokens[:, 1:]
    totals.n_pred += int(predicts.sum())
    totals.ce_clean += _summed_nll(clean_logits, targets, predicts)
    totals.ce_sae += _summed_nll(sae_logits, targets, predicts)
    totals.ce_zero += _summed_nll(zero_logits, targets, predicts)


def _splice(replacement: Tensor, where: Bool[Tensor, "batch pos"]) -> Callable[[Tensor, Any], Tensor]:
    def hook(act: Tensor, hook: Any) -> Tensor:
        act = act.clone()
        act[where] = replacement[where].to(act.dtype)
        return act

    return hook


def _summed_nll(
    logits: Float[Tensor, "batch pos d_vocab"],
    targets: Int[Tensor, "batch pos_minus_1"],
    mask: Bool[Tensor, "batch pos_minus_1"],
) -> float:
    logprobs = F.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(nll[mask].sum())


def _summarise(hook_name: str, t: _Totals) -> SAEQuality:
    assert t.sum_x is not None
    total_var = t.sq_x - float((t.sum_x**2).sum()) / t.n
    ce_clean, ce_sae, ce_zero = (v / t.n_pred for v in (t.ce_clean, t.ce_sae, t.ce_zero))
    return SAEQuality(
        hook_name=hook_name,
        n_tokens=t.n,
        n_predictions=t.n_pred,
        l0=t.active / t.n,
        explained_variance=1.0 - t.sq_err / total_var if total_var > 0 else float("nan"),
        ce_clean=ce_clean,
        ce_with_sae=ce_sae,
        ce_zero_ablation=ce_zero,
        ce_loss_recovered=(ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
    )


def _as_tokens(
    model: Host, texts_or_tokens: Sequence[str] | Tensor, max_length: int
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Token ids and the mask of real (non-padding) positions; texts are right-padded."""
    if isinstance(texts_or_tokens, Tensor):
        if texts_or_tokens.ndim != 2 or texts_or_tokens.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"tokens must be an integer tensor [batch, pos], got {tuple(texts_or_tokens.shape)}")
        tokens = texts_or_tokens.long().cpu()
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
    if isinstance(texts_or_tokens, str) or not all(isinstance(t, str) for t in texts_or_tokens):
        raise DataError("texts_or_tokens must be a list of strings or a [batch, pos] tensor of token ids")
    if not texts_or_tokens:
        raise DataError("texts_or_tokens is empty")
    # max_length truncates by design; never past the model's context, where the forward pass would fail.
    limit = min(max_length, int(model.cfg.n_ctx))
    seqs = [model.to_tokens(text, prepend_bos=True, truncate=False)[0, :limit].cpu() for text in texts_or_tokens]
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    tokens = torch.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        valid[i, : len(s)] = True
    return tokens, valid


def _sae_hook(sae: SAE) -> str:
    name = getattr(sae.cfg.metadata, "hook_name", None)
    if not name:
        raise ConfigError("the SAE records no hook name; pass hook_name=...")
    return str(name)


def _seqpos_start(sae: SAE) -> int:
    """The first position the SAE was trained on (sae-lens ``seqpos_slice``), at least 1 (BOS)."""
    seqpos = getattr(sae.cfg.metadata, "seqpos_slice", None)
    start = seqpos[0] if seqpos else None
    return max(1, int(start)) if isinstance(start, int) else 1


def _special_ids(model: Host) -> list[int]:
    tokenizer = model.tokenizer
    return list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []
