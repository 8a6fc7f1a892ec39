"""Module-delta interventions: a low-rank (LoRA) or full (local weight) update of one MLP down-projection.

Layer l's MLP ends with the down-projection ``mlp_out = a_mid @ W_out + b_out``, where ``a_mid`` is the
activation at ``blocks.{l}.mlp.hook_post`` (width d_mlp). Under control the weight becomes
``W_out + r * dW`` (and the bias ``b_out + r * db``) at raw strength ``r = m * unit``, so the output
changes by

    LoRA:          d(mlp_out) = r * (a_mid @ A @ B)          A [d_mlp, r], B [r, d_model]
    local weight:  d(mlp_out) = r * (a_mid @ dW + db)        dW [d_mlp, d_model], db [d_model]

(docs/methods.md, section 1, written for row vectors as TransformerLens stores ``W_out`` [d_mlp, d_model]).
Both are ordinary :class:`~tl_steer.interventions.Intervention` s: the delta is added at
``blocks.{l}.hook_mlp_out`` at the positions of the position policy, ``m = 0`` installs no hook at all
(the clean model, bit for bit), and they save and load with :func:`tl_steer.save` / :func:`tl_steer.load`.

How: two hooks per forward pass. A read-only hook at ``mlp.hook_post`` records ``a_mid`` (it returns
``None``, so it changes nothing), and the adding hook at ``hook_mlp_out`` of the same block, which
fires later in the same forward call, turns it into the delta. Both see the same positions, so this is
also correct under ``generate`` with the KV cache, where each call sees only the new positions.

On post-norm architectures (OLMo 2/3) ``hook_mlp_out`` comes after a norm, so the delta is added after
that norm rather than at the raw down-projection output. Neither hook depends on where the MLP reads
from: on parallel-attention models (GPT-J, GPT-NeoX / Pythia), which have no ``hook_resid_mid``, the MLP
reads ``hook_resid_pre`` and the same two hooks apply; on LayerNorm-folded models ("LNPre") ``a_mid`` is
unchanged by folding, so the same tensors make the same change to the output distribution.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.dtypes import master_dtype
from tl_steer.errors import ConfigError, DataError, ShapeError
from tl_steer.hosts import Host
from tl_steer.interventions import EditEntry, Intervention, ReadOnly
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike


class _Recorder:
    """Records the activation its :class:`ReadOnly` hook sees (the hook changes nothing)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def record(self, activation: Tensor, hook: HookPoint) -> None:
        self.value = activation

    def take(self, where: str) -> Tensor:
        value, self.value = self.value, None  # release the activation once used
        if value is None:
            raise RuntimeError(
                f"{where}: no activation was recorded at the MLP's hook_post in this forward pass; "
                "was the pass started after this block (start_at_layer)?"
            )
        return value


def _check_layer(layer: object) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(f"layer must be a non-negative int, got {layer!r}")
    return layer


def _check_tensor(name: str, value: object, ndim: int) -> Tensor:
    if not isinstance(value, Tensor) or value.ndim != ndim or value.numel() == 0:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ShapeError(f"{name} must be a non-empty {ndim}-D tensor, got {got}")
    if not value.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if not torch.isfinite(value).all():
        raise DataError(f"{name} has NaN or infinite entries")
    return value.detach().clone()


class ModuleDelta(Intervention):
    """Base class of the interventions that add ``m * unit * f(a_mid)`` at the output of layer l's MLP.

    Subclasses define :meth:`delta` (the unscaled change, from the recorded ``a_mid``) and the tensors.
    ``unit`` is 1 for one built by hand; SFT / SPLIT set it to the median of their training grid.
    """

    linear_in_m = True

    def __init__(
        self,
        layer: int,
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(positions=positions, method=method, info=info, model_identity=model_identity, unit=unit)
        self.layer = _check_layer(layer)

    @property
    def read_hook(self) -> str:
        """Where ``a_mid`` (the input of the down-projection) is recorded."""
        return f"blocks.{self.layer}.mlp.hook_post"

    @property
    def write_hook(self) -> str:
        """Where the delta is added."""
        return f"blocks.{self.layer}.hook_mlp_out"

    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.read_hook, self.write_hook)

    @property
    @abstractmethod
    def d_mlp(self) -> int:
        """Width of the MLP's hidden layer (of ``a_mid``)."""

    @property
    @abstractmethod
    def d_model(self) -> int:
        """Width of the MLP's output."""

    @abstractmethod
    def delta(self, a_mid: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        """The change of the MLP output at strength 1, for the input ``a_mid`` of the down-projection."""

    def parameters(self) -> list[Tensor]:
        """The learnable tensors (the same objects the intervention uses, so a trainer can update them)."""
        return list(self.tensors().values())

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        recorder = _Recorder()
        where = f"{type(self).__name__} at layer {self.layer}"

        def add(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
            # raw may also be a tensor that broadcasts against the activation (a strength per row).
            return raw * self.delta(recorder.take(where))

        return [(self.read_hook, ReadOnly(recorder.record)), (self.write_hook, add)]

    def widths(self) -> dict[str, int]:
        return {self.read_hook: self.d_mlp, self.write_hook: self.d_model}

    def config(self) -> dict[str, Any]:
        return {"layer": self.layer}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, layer={self.layer}, "
            f"positions={self.positions.kind!r}, unit={self.unit:g}, {self._shape_text()})"
        )

    def _shape_text(self) -> str:
        return ", ".join(f"{k}={list(v.shape)}" for k, v in self.tensors().items())


class LoRA(ModuleDelta):
    """A rank-r update of layer l's MLP down-projection: adds ``m * unit * (a_mid @ A @ B)`` at ``hook_mlp_out``.

    Args:
        layer: the block whose MLP is changed.
        A: [d_mlp, r]; B: [r, d_model]. :meth:`for_model` makes the usual start (A random, B zero).
    """

    kind = "lora"

    def __init__(
        self,
        layer: int,
        A: Float[Tensor, "d_mlp r"],
        B: Float[Tensor, "r d_model"],
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(layer, positions=positions, method=method, info=info, model_identity=model_identity, unit=unit)
        self.A = _check_tensor("LoRA A", A, 2)
        self.B = _check_tensor("LoRA B", B, 2)
        if self.A.shape[1] != self.B.shape[0]:
            raise ShapeError(
                f"LoRA A has rank {self.A.shape[1]} (shape {tuple(self.A.shape)}) but B has "
                f"{self.B.shape[0]} rows (shape {tuple(self.B.shape)})"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.B.shape[1])

    @classmethod
    def for_model(
        cls,
        model: Host,
        layer: int,
        rank: int = 4,
        *,
        seed: int = 0,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> LoRA:
        """The usual LoRA start for ``model``: A uniform in +-1/sqrt(d_mlp) (PyTorch's default for a linear
        layer of fan-in d_mlp, as peft uses), B zero, so the delta is zero at every m until B is trained."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be an int >= 1, got {rank!r}")
        d_mlp, d_model = int(model.cfg.d_mlp or 0), model.cfg.d_model
        if d_mlp < 1:
            raise ShapeError(f"model {model.cfg.model_name!r} has no MLP (d_mlp={model.cfg.d_mlp})")
        dtype = master_dtype(model)  # trainable tensors stay out of half precision
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d_mlp)
        A = (torch.rand(d_mlp, rank, generator=g, dtype=torch.float64) * 2 - 1) * bound
        return cls(
            layer,
            A.to(dtype=dtype, device=model.cfg.device),
            torch.zeros(rank, d_model, dtype=dtype, device=model.cfg.device),
            positions=positions,
            method=method,
            info=info,
            model_identity=model_identity(model),
        )

    def delta(self, a_mid: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        dtype = torch.promote_types(self.A.dtype, a_mid.dtype)
        A, B = self.A.to(device=a_mid.device, dtype=dtype), self.B.to(device=a_mid.device, dtype=dtype)
        return (a_mid.to(dtype) @ A) @ B

    def tensors(self) -> dict[str, Tensor]:
        return {"A": self.A, "B": self.B}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> LoRA:
        return cls(config["layer"], tensors["A"], tensors["B"], **common)


class LocalWeight(ModuleDelta):
    """A full update of layer l's MLP down-projection: adds ``m * unit * (a_mid @ dW + db)`` at ``hook_mlp_out``.

    Args:
        layer: the block whose MLP is changed.
        dW: [d_mlp, d_model]; db: [d_model] (zeros if omitted). :meth:`for_model` starts both at zero.
    """

    kind = "local_weight"

    def __init__(
        self,
        layer: int,
        dW: Float[Tensor, "d_mlp d_model"],
        db: Float[Tensor, " d_model"] | None = None,
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(layer, positions=positions, method=method, info=info, model_identity=model_identity, unit=unit)
        self.dW = _check_tensor("LocalWeight dW", dW, 2)
        self.db = (
            torch.zeros(self.dW.shape[1], dtype=self.dW.dtype, device=self.dW.device)
            if db is None
            else _check_tensor("LocalWeight db", db, 1)
        )
        if self.db.shape[0] != self.dW.shape[1]:
            raise ShapeError(f"LocalWeight db has width {self.db.shape[0]} but dW has {self.dW.shape[1]} columns")

    @property
    def d_mlp(self) -> int:
        return int(self.dW.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.dW.shape[1])

    @classmethod
    def for_model(
        cls,
        model: Host,
        layer: int,
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> LocalWeight:
        """dW and db zero (the delta is zero at every m until trained), shaped for ``model``."""
        d_mlp, d_model = int(model.cfg.d_mlp or 0), model.cfg.d_model
        if d_mlp < 1:
            raise ShapeError(f"model {model.cfg.model_name!r} has no MLP (d_mlp={model.cfg.d_mlp})")
        dtype = master_dtype(model)  # trainable tensors stay out of half precision
        device = model.cfg.device
        return cls(
            layer,
            torch.zeros(d_mlp, d_model, dtype=dtype, device=device),
            torch.zeros(d_model, dtype=dtype, device=device),
            positions=positions,
            method=method,
            info=info,
            model_identity=model_identity(model),
        )

    def delta(self, a_mid: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        dtype = torch.promote_types(self.dW.dtype, a_mid.dtype)
        dW, db = self.dW.to(device=a_mid.device, dtype=dtype), self.db.to(device=a_mid.device, dtype=dtype)
        return a_mid.to(dtype) @ dW + db

    def tensors(self) -> dict[str, Tensor]:
        return {"dW": self.dW, "db": self.db}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> LocalWeight:
        return cls(config["layer"], tensors["dW"], tensors["db"], **common)


__all__ = ["LoRA", "LocalWeight", "ModuleDelta"]
