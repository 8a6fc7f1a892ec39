"""What the adaptive kinds are fitted from: the clean activations of a concept's training completions, token
by token, and the checks they share (a quantile level, a fit made for the same hook and width)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, DataError, HookNameError, ShapeError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, Intervention, check_identity
from tl_steer.models import model_identity
from tl_steer.scoring import (
    batches,
    check_positive_int,
    max_batch_tokens,
    pad_right,
    pad_token_id,
    tokenize_completions,
)


@dataclass
class ConceptActivations:
    """Clean activations at ``hook`` over the completion tokens of a concept's training pairs.

    ``positive`` / ``negative``: every completion token of the positive / negative completions, stacked
    (float64, CPU); ``diffmean``: the DiffMean vector, the mean over pairs of (mean positive completion
    activation - mean negative one), as :func:`tl_steer.diffmean` computes it.
    """

    hook: str
    positive: Float[Tensor, "n_pos d"]
    negative: Float[Tensor, "n_neg d"]
    diffmean: Float[Tensor, " d"]
    n_pairs: int
    identity: dict[str, Any]

    @property
    def width(self) -> int:
        return int(self.diffmean.shape[0])


def concept_activations(
    model: Host,
    pairs: Sequence[ContrastivePair],
    hook: str,
    *,
    chat: bool = False,
    batch_size: int = 16,
) -> ConceptActivations:
    """One clean pass over the positive and negative completions of ``pairs``, stopping after ``hook``'s
    block; see :class:`ConceptActivations`. Pass the result as ``activations=`` to several fit functions
    to share the pass."""
    items = check_pairs(pairs)
    validate_hook(model, hook)
    batch_size = check_positive_int("batch_size", batch_size)
    n = len(items)
    data = tokenize_completions(
        model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items], chat=chat
    )
    site = HookSite.parse(hook)
    stop = site.layer + 1 if site.layer is not None and site.layer + 1 < model.cfg.n_layers else None
    lengths = [len(s) for s in data.sequences]
    spans: dict[int, Tensor] = {}
    captured: list[Tensor] = []

    def capture(act: Tensor, hook: HookPoint) -> None:
        captured.append(act.detach())

    pad = pad_token_id(model)
    with torch.no_grad():
        for idx in batches(lengths, batch_size, max_batch_tokens(model)):
            tokens = pad_right([data.sequences[i] for i in idx], pad, model.cfg.device or "cpu")
            captured.clear()
            model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)], stop_at_layer=stop, return_type=None)
            if captured[0].ndim != 3:
                raise ShapeError(f"{hook!r} has activations of shape {tuple(captured[0].shape)}; need [batch, pos, d]")
            acts = captured[0].double().cpu()
            for row, i in enumerate(idx):
                spans[i] = acts[row, data.starts[i] : lengths[i]]
    means = torch.stack([spans[i].mean(0) for i in range(2 * n)])
    return ConceptActivations(
        hook=hook,
        positive=torch.cat([spans[i] for i in range(n)]),
        negative=torch.cat([spans[i] for i in range(n, 2 * n)]),
        diffmean=(means[:n] - means[n:]).mean(0),
        n_pairs=n,
        identity=model_identity(model),
    )


def resolve_activations(
    model: Host,
    pairs: Sequence[ContrastivePair] | None,
    hook: str,
    activations: ConceptActivations | None,
    chat: bool,
    batch_size: int,
) -> ConceptActivations:
    """``activations`` checked against ``model`` and ``hook``, or computed from ``pairs``."""
    if activations is None:
        if pairs is None:
            raise ConfigError("give the concept's training pairs (or activations= from concept_activations)")
        return concept_activations(model, pairs, hook, chat=chat, batch_size=batch_size)
    if not isinstance(activations, ConceptActivations):
        raise ConfigError(f"activations must come from concept_activations, got {type(activations).__name__}")
    check_fitted_for(activations.hook, hook, "the concept activations")
    check_identity(activations.identity, model)
    return activations


def base_vector(base: AddVector | None, acts: ConceptActivations, hook: str) -> Tensor:
    """The DiffMean vector: ``base``'s (checked to be at ``hook`` with the same width) or the activations'."""
    if base is None:
        return acts.diffmean
    if not isinstance(base, AddVector):
        raise ConfigError(f"base must be an AddVector (e.g. from tl_steer.diffmean), got {type(base).__name__}")
    check_fitted_for(base.hook, hook, "the base vector")
    if base.vector.shape[0] != acts.width:
        raise ShapeError(f"the base vector has width {base.vector.shape[0]}, the activations at {hook!r} {acts.width}")
    return base.vector.double().cpu()


def check_fitted_for(fitted: str, hook: str, what: str) -> None:
    """Raise :class:`HookNameError` unless something fitted at ``fitted`` is used at ``hook``."""
    if fitted != hook:
        raise HookNameError(f"{what} was fitted at {fitted!r} and cannot steer {hook!r}; fit it again at {hook!r}")


def check_level(q: object, name: str = "q") -> float:
    """A quantile level strictly inside (0, 1), as a float; otherwise :class:`ConfigError`."""
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not math.isfinite(float(q)) or not 0 < float(q) < 1:
        raise ConfigError(f"{name} is a quantile level and must lie strictly between 0 and 1, got {q!r}")
    return float(q)


def check_direction(direction: object, what: str) -> Tensor:
    """A finite, non-zero 1-D tensor, detached and cloned; otherwise a :class:`ShapeError` / :class:`DataError`."""
    if not isinstance(direction, Tensor) or direction.ndim != 1 or direction.numel() == 0:
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise ShapeError(f"{what} must be a 1-D tensor of the hook's width, got {shape}")
    if not torch.isfinite(direction).all():
        raise DataError(f"{what} has NaN or infinite entries")
    if float(direction.double().norm()) == 0.0:
        raise DataError(f"{what} is zero: there is no direction to steer along")
    return direction.detach().clone()


def check_hook_name(hook: object) -> str:
    if not isinstance(hook, str) or not hook:
        raise HookNameError(f"the hook must be a hook name string, got {hook!r}")
    return hook


def check_scalar(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


class OneDirection(Intervention):
    """What the kinds that edit one hook along one direction (:class:`ProjectionClamp`, :class:`Rotation`)
    share: the checked ``hook`` and ``direction``, the hook names, widths and saved tensors they give, and the
    float64 unit direction d / |d| their edits use. ``what`` names the direction in error messages."""

    def __init__(self, hook: str, direction: Float[Tensor, " d"], what: str, **common: Any) -> None:
        super().__init__(**common)
        self.hook = check_hook_name(hook)
        self.direction = check_direction(direction, what)

    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def unit_direction(self) -> Float[Tensor, " d"]:
        """d / |d| in float64."""
        return self.direction.double() / self.direction.double().norm()

    def widths(self) -> dict[str, int]:
        return {self.hook: int(self.direction.shape[0])}

    def tensors(self) -> dict[str, Tensor]:
        return {"direction": self.direction}
