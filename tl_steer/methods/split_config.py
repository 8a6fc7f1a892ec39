"""The training options of :func:`~tl_steer.methods.split.split` and :func:`~tl_steer.methods.split.sft`
as one object, :class:`SplitConfig`, and their check (:meth:`SplitConfig.checked`), so that the trainer
reads ``config.lr`` rather than a dictionary of keywords."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host

Form = Literal["vector", "lora", "local_weight"]
FORMS: tuple[str, ...] = ("vector", "lora", "local_weight")


def _grid(start: float, stop: float, n: int) -> tuple[float, ...]:
    return tuple(round(start + (stop - start) * i / (n - 1), 6) for i in range(n))


#: Per-form defaults: the published lr and m grid (docs/methods.md, section "SPLIT"); see
#: :func:`~tl_steer.methods.split.split` for the check of the vector's scale on the default model.
DEFAULTS: dict[str, dict[str, Any]] = {
    "vector": {"lr": 0.08, "m_grid": _grid(2.0, 20.0, 10)},
    "lora": {"lr": 0.01, "m_grid": _grid(0.2, 2.0, 10)},
    "local_weight": {"lr": 0.01, "m_grid": _grid(0.2, 2.0, 10)},
}

#: The margin of the published paper (0.3..0.6); the default (:attr:`SplitConfig.theta`) is 2.0, see there.
PUBLISHED_THETA = 0.5


@dataclass(frozen=True)
class SplitConfig:
    """The loss weights and training settings of SPLIT (and SFT, which fixes the loss weights).

    ``loss = lambda_p L_p + lambda_n L_n + gamma relu(theta - (L_n - L_p))`` (docs/methods.md, section
    "SPLIT"); AdamW with learning rate ``lr`` (default per form, :data:`DEFAULTS`) decayed linearly to 0,
    ``weight_decay``, gradients clipped at norm 1; ``epochs`` passes of ``batch_size`` pairs per step (stop
    after ``early_stop_patience`` epochs without a lower epoch loss); the strength of each example drawn
    from ``m_grid`` (default per form); ``add_subtract`` also trains each pair at -m with the completions
    swapped; ``rank`` of the LoRA; ``seed`` for the initialisation, the order and the draws of m.

    ``theta`` defaults to 2.0, not the published 0.5 (:data:`PUBLISHED_THETA`): on the built-in concepts the
    clean default model already prefers the positive completion by about 0.5..0.7 nats, so theta = 0.5 leaves
    the hinge idle and SPLIT trains like SFT (held-out PrefOdds within 0.01 of SFT's or below it in five of
    six form/concept cases), while theta = 2 gave PrefOdds 2.1..2.7 against SFT's 1.0..1.9 in all six
    (``benchmarks/split_compare.py``). Choose theta above the clean model's preference on your pairs.
    """

    lambda_p: float = 1.0
    lambda_n: float = 0.5
    gamma: float = 5.0
    theta: float = 2.0
    lr: float | None = None
    epochs: int = 3
    batch_size: int = 8
    m_grid: Sequence[float] | None = None
    add_subtract: bool = False
    rank: int = 4
    seed: int = 0
    early_stop_patience: int | None = None
    weight_decay: float = 0.01

    def for_sft(self) -> SplitConfig:
        """These settings with SFT's loss: ``lambda_p = 1``, ``lambda_n = gamma = theta = 0``."""
        return replace(self, lambda_p=1.0, lambda_n=0.0, gamma=0.0, theta=0.0)

    def checked(self, model: Host, n_pairs: int, layer: object, form: object) -> SplitConfig:
        """Validate every option before any work (and ``layer``, ``form`` and the number of pairs against
        ``model``); return the settings with ``lr`` and ``m_grid`` filled in for ``form`` (``m_grid`` as a
        tuple of floats)."""
        if not isinstance(form, str) or form not in FORMS:
            raise ConfigError(f"unknown form {form!r}; valid forms: {', '.join(repr(f) for f in FORMS)}")
        n_layers = model.cfg.n_layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
            raise ConfigError(
                f"layer must be an int in 0..{n_layers - 1} for this model ({n_layers} layers), got {layer!r}"
            )
        lambda_p, lambda_n, gamma, weight_decay = (
            _real(name, getattr(self, name), minimum=0.0) for name in ("lambda_p", "lambda_n", "gamma", "weight_decay")
        )
        theta = _real("theta", self.theta)
        if lambda_p == lambda_n == gamma == 0.0:
            raise ConfigError("lambda_p, lambda_n and gamma are all 0: the loss is 0 and there is nothing to train")
        lr = _real("lr", DEFAULTS[form]["lr"] if self.lr is None else self.lr, positive=True)
        epochs = _integer("epochs", self.epochs, 1)
        batch_size = _integer("batch_size", self.batch_size, 1)
        rank = _integer("rank", self.rank, 1)
        seed = _integer("seed", self.seed, 0)
        patience = (
            None if self.early_stop_patience is None else _integer("early_stop_patience", self.early_stop_patience, 1)
        )
        m_grid = _check_m_grid(DEFAULTS[form]["m_grid"] if self.m_grid is None else self.m_grid)
        if not isinstance(self.add_subtract, bool):
            raise ConfigError(f"add_subtract must be True or False, got {self.add_subtract!r}")
        if n_pairs < batch_size:
            raise DataError(
                f"{n_pairs} pairs are fewer than one batch (batch_size={batch_size}); "
                "give more pairs or a smaller batch_size"
            )
        if form != "vector" and not model.cfg.d_mlp:
            raise ConfigError(f"form {form!r} needs a model with MLPs; this one has d_mlp={model.cfg.d_mlp}")
        return SplitConfig(
            lambda_p=lambda_p,
            lambda_n=lambda_n,
            gamma=gamma,
            theta=theta,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            m_grid=m_grid,
            add_subtract=self.add_subtract,
            rank=rank,
            seed=seed,
            early_stop_patience=patience,
            weight_decay=weight_decay,
        )


def _real(name: str, value: object, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ConfigError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ConfigError(f"{name} must be > 0, got {x}")
    if minimum is not None and x < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {x}")
    return x


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_m_grid(grid: Any) -> tuple[float, ...]:
    if isinstance(grid, (int, float)):
        grid = [grid]
    elif hasattr(grid, "tolist"):  # a tensor or numpy array
        grid = grid.tolist()
        grid = grid if isinstance(grid, list) else [grid]
    try:
        values = [_real("each m in m_grid", m, positive=True) for m in grid]
    except TypeError as exc:
        raise ConfigError(f"m_grid must be a sequence of positive strengths, got {grid!r}") from exc
    if not values:
        raise ConfigError("m_grid is empty; give at least one positive strength")
    return tuple(values)


__all__ = ["DEFAULTS", "FORMS", "PUBLISHED_THETA", "Form", "SplitConfig"]
