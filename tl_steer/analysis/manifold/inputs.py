"""Checks of a manifold probe's inputs: its settings, its hooks, the last block a fit must run, and the
token id lists of clean texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tl_steer.errors import ConfigError, DataError, HookNameError, ShapeError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host


@dataclass(frozen=True)
class ProbeSettings:
    """The settings of a :class:`~tl_steer.analysis.manifold.ManifoldProbe` fit as one object (the keywords of
    :meth:`~tl_steer.analysis.manifold.ManifoldProbe.fit` describe each one)."""

    k: int = 32
    knn_k: int = 10
    n_reference: int = 4096
    n_calibration: int = 4096
    holdout: float = 0.2
    outlier_factor: float | None = 10.0
    seed: int = 0
    shrinkage: float | None = None

    def check(self) -> ProbeSettings:
        """Raise :class:`~tl_steer.errors.ConfigError` for a setting out of range; return self."""
        _check_settings(
            self.k, self.knn_k, self.n_reference, self.n_calibration, self.holdout, self.outlier_factor, self.shrinkage
        )
        return self


def _check_settings(
    k: int,
    knn_k: int,
    n_reference: int,
    n_calibration: int,
    holdout: float,
    outlier_factor: float | None,
    shrinkage: float | None,
) -> None:
    for name, value, minimum in (("k", k, 1), ("knn_k", knn_k, 1), ("n_reference", n_reference, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(n_calibration, bool) or not isinstance(n_calibration, int) or n_calibration < 0:
        raise ConfigError(f"n_calibration must be an integer >= 0, got {n_calibration!r}")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout!r}")
    if outlier_factor is not None and not outlier_factor > 1.0:
        raise ConfigError(f"outlier_factor must be > 1 (or None), got {outlier_factor!r}")
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be in [0, 1] (or None for Ledoit-Wolf), got {shrinkage!r}")


def _check_hooks(model: Host, hooks: str | Sequence[str]) -> list[str]:
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names:
        raise HookNameError("give at least one hook name, e.g. 'blocks.6.hook_resid_post'")
    for name in names:
        validate_hook(model, name)
    return list(dict.fromkeys(names))


def _stop_layer(model: Host, hooks: Sequence[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook, or None for the whole model."""
    n_layers = model.cfg.n_layers
    stop = 0
    for name in hooks:
        site = HookSite.parse(name)
        if site.layer is not None:
            stop = max(stop, site.layer + 1)
        elif site.first_layer(n_layers) >= n_layers:
            return None
    return None if stop >= n_layers else stop


def _token_lists(
    model: Host, texts_or_tokens: str | Sequence[str] | Sequence[Sequence[int]] | Tensor
) -> list[list[int]]:
    """Token id lists from texts, lists of ids or a 2-D tensor of ids; raise DataError if nothing is left."""
    items: list[Any]
    if isinstance(texts_or_tokens, str):
        items = [texts_or_tokens]
    elif isinstance(texts_or_tokens, Tensor):
        if texts_or_tokens.ndim not in (1, 2) or texts_or_tokens.is_floating_point():
            raise ShapeError(
                f"token ids must be an integer tensor [pos] or [batch, pos], got {tuple(texts_or_tokens.shape)}"
            )
        items = [texts_or_tokens] if texts_or_tokens.ndim == 1 else list(texts_or_tokens)
    else:
        try:
            items = list(texts_or_tokens)
        except TypeError as exc:
            raise DataError(f"expected texts or token ids, got {type(texts_or_tokens).__name__}") from exc
    if not items:
        raise DataError("no texts to fit the probe on; give clean texts or token ids")
    tokenizer = model.tokenizer
    sequences: list[list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("texts need a model with a tokenizer; pass token ids instead")
            bos = (
                [tokenizer.bos_token_id] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
            )
            ids = bos + list(tokenizer(item, add_special_tokens=False).input_ids)
        elif isinstance(item, Tensor):
            ids = [int(t) for t in item.reshape(-1).tolist()]
        else:
            try:
                ids = [int(t) for t in item]
            except (TypeError, ValueError) as exc:
                raise DataError(f"item {i} is neither a text nor a list of token ids: {item!r}") from exc
        if len(ids) > model.cfg.n_ctx:
            raise DataError(f"item {i}: {len(ids)} tokens exceed the model's context of {model.cfg.n_ctx}; shorten it")
        if len(ids) >= 2:  # position 0 is excluded: a text of one token adds nothing
            sequences.append(ids)
    if not sequences:
        raise DataError(
            "no tokens left to fit the probe on: position 0 of every text is excluded, so give texts of at "
            "least two tokens"
        )
    return sequences
