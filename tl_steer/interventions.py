"""The intervention: one type for every steering method.

An intervention is addressed by TransformerLens hook names, changes activations by an amount scaled by
one strength ``m``, and is exactly the clean model at ``m = 0`` (no hook is even installed). Every method
in tl_steer returns one; everything downstream (applying, saving, sweeping, scoring, probing) works on
this type alone.

A concrete kind implements :meth:`Intervention._edits`: for a strength m, a list of
``(hook_name, edit)`` where ``edit(activation, hook, m) -> delta`` returns the change to add at that hook.
The base class adds the delta only at the positions its :class:`~tl_steer.positions.PositionPolicy`
selects, casts to the activation's dtype and device, and keeps track of the KV-cache offset.
"""

from __future__ import annotations

import math
import numbers
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, cast

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_steer.errors import ConfigError, DataError, HookNameError, ModelMismatchError, ShapeError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.models import model_identity
from tl_steer.positions import PositionPolicy, PositionsLike, PositionState, steer_mask

HookFn = Callable[[Tensor, HookPoint], Tensor | None]
Edit = Callable[[Tensor, HookPoint, float], Tensor]

_REGISTRY: dict[str, type[Intervention]] = {}


def check_strength(m: float) -> float:
    """Return m as a float, or raise if it is not a finite real number."""
    # numbers.Real also admits numpy scalars (np.float32, np.int64), which are not float or int.
    if isinstance(m, bool) or not isinstance(m, numbers.Real) and not (isinstance(m, Tensor) and m.numel() == 1):
        raise TypeError(f"the strength m must be a real number, got {type(m).__name__}")
    value = float(m)
    if not math.isfinite(value):
        raise ConfigError(f"the strength m must be finite, got {value}")
    return value


def check_grid(ms: object, *, name: str = "ms", unique: bool = False) -> list[float]:
    """A strength grid as a list of finite floats: any sequence or iterable of real numbers, in order.

    A single number, a string or an empty grid is a :class:`ConfigError` saying how to write one, and
    so, with ``unique``, is a repeated value; the grid may be long (thousands of values cost one pass
    each and nothing more).
    """
    if isinstance(ms, (str, bytes, numbers.Real)) or isinstance(ms, Tensor) and ms.ndim == 0:
        raise ConfigError(f"{name} must be a sequence of strengths, e.g. {name}=[-1, 0, 1], got {ms!r}")
    try:
        values = list(ms)  # type: ignore[call-overload]
    except TypeError as exc:
        raise ConfigError(f"{name} must be a sequence of strengths, got {type(ms).__name__}") from exc
    if not values:
        raise ConfigError(f"the strength grid {name} is empty; give e.g. {name}=[-2, -1, 0, 1, 2]")
    grid = []
    for i, m in enumerate(values):
        try:
            grid.append(check_strength(m))
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{name}[{i}]: {exc}") from exc
    if unique and len(set(grid)) != len(grid):
        repeated = sorted(m for m, count in Counter(grid).items() if count > 1)
        raise ConfigError(f"the strength grid {name} has repeated values: {repeated[:10]}")
    return grid


class Intervention(ABC):
    """Base class of all interventions. See the module docstring for the contract."""

    kind: ClassVar[str]
    #: Saved tensors that hold integer indices; every other saved tensor must be floating-point.
    saved_index_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
    ) -> None:
        self.positions = PositionPolicy.coerce(positions)
        self.method = method or self.kind
        self.info = dict(info or {})
        self.model_identity = model_identity

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            _REGISTRY[cls.kind] = cls

    # ----- what a concrete kind provides -------------------------------------------------------
    @property
    @abstractmethod
    def hook_names(self) -> tuple[str, ...]:
        """The hook points this intervention edits."""

    @abstractmethod
    def _edits(self) -> list[tuple[str, Edit]]:
        """(hook name, edit) pairs; ``edit(activation, hook, m)`` returns the delta to add."""

    @abstractmethod
    def widths(self) -> dict[str, int]:
        """The activation width (last dimension) each hook must have."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors to save."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments other than tensors."""

    @classmethod
    @abstractmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> Intervention:
        """Rebuild from :meth:`config`, :meth:`tensors` and the common fields."""

    # ----- shared behaviour ---------------------------------------------------------------------
    def first_layer(self, n_layers: int) -> int:
        """The first layer whose output this intervention can change (nothing before it is touched)."""
        return min(HookSite.parse(name).first_layer(n_layers) for name in self.hook_names)

    def hooks(self, m: float = 1.0, *, n_layers: int | None = None) -> list[tuple[str, HookFn]]:
        """A ``fwd_hooks`` list for ``model.run_with_hooks`` or ``model.hooks`` at strength m.

        ``m = 0`` gives an empty list: the clean model, bit for bit. For position policies other
        than "all", the list also holds a read-only hook on an attention-scores hook point that tells
        the edit the KV-cache offset; ``n_layers`` is needed only for hooks after the last block.
        """
        m = check_strength(m)
        if m == 0.0:
            return []
        return self._build_hooks(m, n_layers)

    def row_hooks(self, m_rows: Float[Tensor, " batch"], *, n_layers: int | None = None) -> list[tuple[str, HookFn]]:
        """Like :meth:`hooks`, with one strength per batch row (for trainers that draw m per example).

        Only for kinds whose edits use m as a factor, so that m of shape [batch, 1, 1] broadcasts
        (AddVector, LoRA, LocalWeight).
        """
        if not isinstance(m_rows, Tensor) or m_rows.ndim != 1 or not torch.isfinite(m_rows).all():
            raise ConfigError("m_rows must be a finite 1-D tensor with one strength per batch row")
        # The edits receive the tensor where they expect a float; they only multiply by it.
        return self._build_hooks(cast(float, m_rows.view(-1, 1, 1)), n_layers)

    def _build_hooks(self, m: float, n_layers: int | None) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for name, edit in self._edits():
            state = PositionState()
            if self.positions.kind != "all":
                site = HookSite.parse(name)
                source = site.offset_source(n_layers if n_layers is not None else (site.layer or 0) + 1)
                if source is None:
                    raise HookNameError(
                        f"position policy {self.positions.kind!r} cannot be used at {name!r}: it fires "
                        "before any attention layer, where the KV-cache offset is unknown. Steer "
                        "'blocks.0.hook_resid_post' or later, or use positions='all'."
                    )
                hooks.append((source, state.record_offset))
            hooks.append((name, self._hook_fn(edit, m, state)))
        return hooks

    def _hook_fn(self, edit: Edit, m: float, state: PositionState) -> HookFn:
        policy = self.positions

        def hook_fn(activation: Tensor, hook: HookPoint) -> Tensor:
            mask = steer_mask(policy, state, activation.shape[0], activation.shape[1], activation.device)
            delta = edit(activation, hook, m).to(dtype=activation.dtype, device=activation.device)
            if mask is None:
                return activation + delta
            mask = mask.view(*mask.shape, *([1] * (activation.ndim - 2)))
            return torch.where(mask, activation + delta, activation)

        return hook_fn

    def check(self, model: HookedTransformer) -> None:
        """Raise before any work if this intervention does not fit ``model``.

        Checks, when the intervention records the model it was made for, that model's identity; then
        the hook names (listing the closest valid ones) and the width at each hook.
        """
        if self.model_identity is not None:
            check_identity(self.model_identity, model)
        for name in self.hook_names:
            validate_hook(model, name)
        widths = hook_widths(model, self.hook_names)
        for name, width in self.widths().items():
            if widths[name] != width:
                raise ShapeError(
                    f"{type(self).__name__} at {name!r} has width {width}, but the model's activation "
                    f"there has width {widths[name]}; was it made for another model?"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(method={self.method!r}, hooks={list(self.hook_names)}, "
            f"positions={self.positions.kind!r})"
        )


def check_identity(saved: dict[str, Any], model: HookedTransformer) -> None:
    """Raise :class:`ModelMismatchError` if ``saved`` (a :func:`model_identity`) is not ``model``'s."""
    current = model_identity(model)
    for key in ("d_model", "n_layers", "d_vocab", "n_heads"):
        if key in saved and saved[key] != current[key]:
            raise ModelMismatchError(
                f"made for a model with {key}={saved[key]} ({saved.get('model_name')}), "
                f"but this model has {key}={current[key]} ({current['model_name']})"
            )
    a, b = saved.get("embed_checksum"), current["embed_checksum"]
    if a is not None and not math.isclose(a, b, rel_tol=1e-3):
        raise ModelMismatchError(
            f"made for model {saved.get('model_name')!r}, whose embedding checksum {a:.6g} differs from "
            f"this model's ({current['model_name']!r}, {b:.6g}): the weights are not the same"
        )


_WIDTHS: weakref.WeakKeyDictionary[HookedTransformer, dict[str, int]] = weakref.WeakKeyDictionary()


def hook_widths(model: HookedTransformer, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """The last-dimension width of the activation at each hook, from one forward pass of 2 tokens."""
    known = _WIDTHS.setdefault(model, {})
    missing = [n for n in names if n not in known]
    if missing:

        def record(act: Tensor, hook: HookPoint) -> None:
            known[str(hook.name)] = int(act.shape[-1])

        tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
        with torch.no_grad():
            model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(n, record) for n in missing])
    silent = [n for n in names if n not in known]
    if silent:  # hook points that exist but that this model's forward pass does not run
        for name in silent:
            validate_hook(model, name)  # says why, where the reason is known
        raise HookNameError(f"the hook point(s) {silent} did not run in a forward pass of this model")
    return {n: known[n] for n in names}


class AddVector(Intervention):
    """Adds ``m * vector`` at one hook: DiffMean/CAA, SPLIT's vector form, COLD-Kernel, SAE add.

    ``h <- h + m * v`` at the selected positions.
    """

    kind = "add_vector"

    def __init__(
        self,
        hook: str,
        vector: Float[Tensor, " d"],
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(positions=positions, method=method, info=info, model_identity=model_identity)
        if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.numel() == 0:
            raise ShapeError(
                f"AddVector needs a 1-D tensor of the hook's width, got "
                f"{tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__}"
            )
        if not torch.isfinite(vector).all():
            raise DataError("the steering vector has NaN or infinite entries")
        if not isinstance(hook, str):
            raise HookNameError(f"the hook must be a hook name string, got {hook!r}")
        self.hook = hook
        self.vector = vector.detach().clone()

    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def _edits(self) -> list[tuple[str, Edit]]:
        vector = self.vector

        def edit(activation: Tensor, hook: HookPoint, m: float) -> Tensor:
            return m * vector.to(device=activation.device, dtype=torch.promote_types(vector.dtype, activation.dtype))

        return [(self.hook, edit)]

    def widths(self) -> dict[str, int]:
        return {self.hook: int(self.vector.shape[0])}

    def tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}

    def config(self) -> dict[str, Any]:
        return {"hook": self.hook}

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> AddVector:
        return cls(config["hook"], tensors["vector"], **common)


InterventionsLike = Intervention | Sequence[Intervention] | None


def as_intervention_list(interventions: InterventionsLike) -> list[Intervention]:
    """``None``, one intervention or a sequence of them, as a list; raise :class:`ConfigError` for anything
    that is not an intervention (a string included), naming its position."""
    if interventions is None:
        return []
    if isinstance(interventions, Intervention):
        return [interventions]
    if isinstance(interventions, str | bytes):
        raise ConfigError(f"interventions must be Intervention objects, got {type(interventions).__name__}")
    out = list(interventions)
    for i, iv in enumerate(out):
        if not isinstance(iv, Intervention):
            raise ConfigError(f"interventions[{i}] is a {type(iv).__name__}, not an Intervention")
    return out


def registry() -> dict[str, type[Intervention]]:
    """The intervention kinds known to :func:`tl_steer.load`, by ``kind``."""
    return dict(_REGISTRY)
