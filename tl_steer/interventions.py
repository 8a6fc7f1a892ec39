"""The intervention: one type for every steering method.

An intervention is addressed by TransformerLens hook names, changes activations by an amount scaled by
one strength ``m``, and is exactly the clean model at ``m = 0`` (no hook is even installed). Every method
in tl_steer returns one; everything downstream (applying, saving, sweeping, scoring, probing) works on
this type alone.

The strength m means the same for every kind: ``m = 1`` is the strength the intervention was made for.
Each intervention carries a ``unit`` (a positive float, saved with it): the raw scale of its edits at
m = 1, so the edits run at raw strength ``m * unit`` (see :meth:`Intervention.raw_strength`). DiffMean
and the SAE edits have unit 1; SFT / SPLIT the median of their training grid; COLD the scale at which
they add DiffMean's norm (docs/methods.md, section 1).

A concrete kind implements :meth:`Intervention._edits`: for the model being steered (``None`` when the
caller has none and the kind does not need one), a list of ``(hook_name, edit)`` where
``edit(activation, hook, raw) -> delta`` returns the change to add at that hook for the raw strength
``raw``; an entry may also be a :class:`ReadOnly` recorder that only reads an activation. The base class
adds each delta only at the positions its :class:`~tl_steer.positions.PositionPolicy` selects, casts it
to the activation's dtype and device, and keeps track of the KV-cache offset. Kinds declare what they
support as class attributes: :attr:`Intervention.linear_in_m` (needed by :meth:`Intervention.row_hooks`)
and :attr:`Intervention.needs_model`. ``docs/new_intervention.md`` is a guide to writing a kind.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.errors import ConfigError, DataError, HookNameError, ModelMismatchError, ShapeError
from tl_steer.hookpoints import HookSite, missing_reason, validate_hook
from tl_steer.hosts import Host, check_host
from tl_steer.models import model_identity
from tl_steer.overflow import check_steered
from tl_steer.positions import PositionPolicy, PositionsLike, PositionState, steer_mask
from tl_steer.sae_splicing import width_hook

HookFn = Callable[[Tensor, HookPoint], Tensor | None]
Edit = Callable[[Tensor, HookPoint, float], Tensor]


class ReadOnly:
    """An entry of :meth:`Intervention._edits` that only reads: ``fn(activation, hook)`` is called at
    every position and at any non-zero strength, and its hook changes nothing (it returns ``None``).

    For kinds whose edit needs an activation from earlier in the same forward pass (a module's input,
    the input of block 0): list the reader before the edit that uses what it recorded.
    """

    def __init__(self, fn: Callable[[Tensor, HookPoint], None]) -> None:
        self.fn = fn


EditEntry = Edit | ReadOnly

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


def check_unit(unit: object) -> float:
    """Return ``unit`` as a float, or raise :class:`ConfigError` unless it is a finite real number > 0."""
    if isinstance(unit, bool) or not isinstance(unit, numbers.Real):
        raise ConfigError(f"an intervention's unit must be a positive real number, got {unit!r:.100}")
    value = float(unit)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"an intervention's unit must be finite and > 0 (the raw strength of its edits at m = 1), got {value}"
        )
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


_Kind = TypeVar("_Kind", bound="Intervention")


class Intervention(ABC):
    """Base class of all interventions. See the module docstring and ``docs/new_intervention.md``.

    Args (shared by every kind):
        positions: the position policy (:mod:`tl_steer.positions`).
        method: a label (default: the kind).
        info: JSON-able facts about how it was made (saved with it; nothing reads them to steer).
        model_identity: the :func:`~tl_steer.models.model_identity` of the model it was made for.
        unit: the raw strength of the edits at ``m = 1`` (finite, > 0; default 1).
    """

    kind: ClassVar[str]
    #: Saved tensors that hold integer indices; every other saved tensor must be floating-point.
    saved_index_tensors: ClassVar[tuple[str, ...]] = ()
    #: The change at raw strength r is r times the change at 1, for every activation: then a strength
    #: per batch row (a tensor of shape [batch, 1, 1] in place of r) is correct, and :meth:`row_hooks`
    #: allowed. False by default: a kind must declare it.
    linear_in_m: ClassVar[bool] = False
    #: The edits need the model being steered (e.g. they run part of it again); :meth:`hooks` then
    #: requires ``model=``.
    needs_model: ClassVar[bool] = False
    #: The change at a position depends on the whole input, not only on the activations a cached
    #: continuation step sees (COLD-FD reruns the input from its embeddings): such a kind cannot steer the
    #: positions of a KV-cache continuation step, and callers that score or generate with the cache fall
    #: back to full passes (or steer the prompt pass only).
    needs_full_input: ClassVar[bool] = False

    def __init__(
        self,
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        self.positions = PositionPolicy.coerce(positions)
        self.method = method or self.kind
        self.info = dict(info or {})
        self.model_identity = model_identity
        self.unit = unit

    @property
    def unit(self) -> float:
        """The raw strength of the edits at ``m = 1``: the strength this intervention was made for."""
        return self._unit

    @unit.setter
    def unit(self, value: float) -> None:
        self._unit = check_unit(value)

    def raw_strength(self, m: float) -> float:
        """``m * unit``: the factor the edits are scaled by at strength m."""
        return check_strength(m) * self.unit

    def with_unit(self: _Kind, unit: float) -> _Kind:
        """The same intervention (sharing its tensors; ``info`` copied) with another ``unit``: its
        ``m = 1`` then applies the edits at raw strength ``unit``."""
        value = check_unit(unit)
        twin = copy.copy(self)
        twin.info = dict(self.info)
        twin.unit = value
        return twin

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
    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        """(hook name, edit) pairs; ``edit(activation, hook, raw)`` returns the delta to add at raw
        strength ``raw`` (``m * unit``), or the entry is a :class:`ReadOnly` reader. ``model`` is the
        model being steered; it is ``None`` only for kinds that do not declare :attr:`needs_model`."""

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

    def hooks(
        self, m: float = 1.0, *, model: Host | None = None, n_layers: int | None = None
    ) -> list[tuple[str, HookFn]]:
        """A ``fwd_hooks`` list for ``model.run_with_hooks`` or ``model.hooks`` at strength m.

        The edits run at raw strength ``m * unit``; ``m = 0`` gives an empty list: the clean model,
        bit for bit. ``model`` is the model the hooks go on: required by kinds that declare
        :attr:`needs_model`, and used otherwise for the number of layers (needed only for hooks after
        the last block under a position policy other than "all"). For those policies the list also
        holds a read-only hook on an attention-scores hook point that tells the edit the KV-cache offset.
        ``n_layers`` is a deprecated alias of ``model.cfg.n_layers``.
        """
        m = check_strength(m)
        n_layers = _n_layers(model, n_layers)
        if m == 0.0:
            return []
        self._check_model_argument(model)
        return self._build_hooks(m * self.unit, model, n_layers)

    def row_hooks(
        self,
        m_rows: Float[Tensor, " batch"],
        *,
        model: Host | None = None,
        n_layers: int | None = None,
    ) -> list[tuple[str, HookFn]]:
        """Like :meth:`hooks`, with one strength per batch row (for trainers that draw m per example).

        Only for kinds that declare :attr:`linear_in_m` (their edits use the strength as a factor, so a
        strength of shape [batch, 1, 1] broadcasts); any other kind raises :class:`ConfigError`.
        """
        if not self.linear_in_m:
            raise ConfigError(
                f"{type(self).__name__} (kind {self.kind!r}) does not declare linear_in_m: its change is not "
                "its strength times a fixed change, so one strength per batch row cannot be applied as a "
                "factor. Run one batch per strength with .hooks(m) instead."
            )
        if not isinstance(m_rows, Tensor) or m_rows.ndim != 1 or not torch.isfinite(m_rows).all():
            raise ConfigError("m_rows must be a finite 1-D tensor with one strength per batch row")
        self._check_model_argument(model)
        # The edits receive the tensor where they expect a float; they only multiply by it.
        raw = cast(float, m_rows.view(-1, 1, 1) * self.unit)
        return self._build_hooks(raw, model, _n_layers(model, n_layers))

    def _check_model_argument(self, model: Host | None) -> None:
        if model is not None:
            check_host(model)
        if model is None and self.needs_model:
            raise ConfigError(
                f"{type(self).__name__} needs the model it steers to build its hooks (kind {self.kind!r} "
                "declares needs_model): call .hooks(m, model=model), or use tl_steer.steer(model, ...)"
            )

    def _build_hooks(self, raw: float, model: Host | None, n_layers: int | None) -> list[tuple[str, HookFn]]:
        hooks: list[tuple[str, HookFn]] = []
        for name, edit in self._edits(model):
            if isinstance(edit, ReadOnly):
                hooks.append((name, edit.fn))
                continue
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
            hooks.append((name, self._hook_fn(edit, raw, state)))
        return hooks

    def _hook_fn(self, edit: Edit, raw: float, state: PositionState) -> HookFn:
        policy = self.positions

        def hook_fn(activation: Tensor, hook: HookPoint) -> Tensor:
            mask = steer_mask(policy, state, activation.shape[0], activation.shape[1], activation.device)
            delta = edit(activation, hook, raw).to(dtype=activation.dtype, device=activation.device)
            steered = activation + delta
            # A finite but huge m would give inf/NaN (or a uniform distribution) silently: refuse it here.
            check_steered(activation, delta, steered, str(hook.name), raw / self.unit)
            if mask is None:
                return steered
            mask = mask.view(*mask.shape, *([1] * (activation.ndim - 2)))
            return torch.where(mask, steered, activation)

        return hook_fn

    def check(self, model: Host) -> None:
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
            f"positions={self.positions.kind!r}, unit={self.unit:g})"
        )


def _n_layers(model: Host | None, n_layers: int | None) -> int | None:
    if n_layers is not None:
        warnings.warn(
            "hooks(..., n_layers=) is deprecated and will be removed; pass model= instead",
            DeprecationWarning,
            stacklevel=3,
        )
    return model.cfg.n_layers if model is not None else n_layers


def check_identity(saved: dict[str, Any], model: Host) -> None:
    """Raise :class:`ModelMismatchError` if ``saved`` (a :func:`model_identity`) is not ``model``'s."""
    current = model_identity(model)
    for key in ("d_model", "n_layers", "d_vocab", "n_heads"):
        if key in saved and saved[key] != current[key]:
            raise ModelMismatchError(
                f"made for a model with {key}={saved[key]} ({saved.get('model_name')}), "
                f"but this model has {key}={current[key]} ({current['model_name']})"
            )
    # The same weights with and without TransformerLens' processing give other activations (model_identity).
    done = saved.get("processed_weights")
    if done is not None and bool(done) != current["processed_weights"]:
        how = {True: "processed weights (folded norms)", False: "unprocessed weights"}
        raise ModelMismatchError(
            f"made for model {saved.get('model_name')!r} with {how[bool(done)]}, but this model "
            f"({current['model_name']!r}) has {how[current['processed_weights']]}: their activations differ. Use "
            "the model it was made on (HookedTransformer.from_pretrained folds norms unless fold_ln=False; a "
            "TransformerBridge does after enable_compatibility_mode()), or make it again on this one"
        )
    a, b = saved.get("embed_checksum"), current["embed_checksum"]
    if a is not None and not math.isclose(a, b, rel_tol=1e-3):
        raise ModelMismatchError(
            f"made for model {saved.get('model_name')!r}, whose embedding checksum {a:.6g} differs from "
            f"this model's ({current['model_name']!r}, {b:.6g}): the weights are not the same"
        )


_WIDTHS: weakref.WeakKeyDictionary[Host, dict[str, int]] = weakref.WeakKeyDictionary()


def hook_widths(model: Host, names: tuple[str, ...] | list[str]) -> dict[str, int]:
    """The last-dimension width of the activation at each hook, from one forward pass of 2 tokens."""
    known = _WIDTHS.setdefault(model, {})
    missing = [n for n in names if n not in known]
    if missing:

        def record(name: str) -> HookFn:
            def hook_fn(act: Tensor, hook: HookPoint) -> None:
                known[name] = int(act.shape[-1])

            return hook_fn

        tokens = torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device)
        # Where sae-lens spliced an SAE in, the width is read at its output (the hook point is gone).
        fwd_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (width_hook(model, n), record(n)) for n in missing
        ]
        with torch.no_grad():
            model.run_with_hooks(tokens, return_type=None, fwd_hooks=fwd_hooks)
    silent = [n for n in names if n not in known]
    if silent:  # hook points that exist but that this model's forward pass does not run
        for name in silent:
            validate_hook(model, name)  # says why, where the reason is known
        reasons = "".join(missing_reason(model, name) for name in silent)
        raise HookNameError(
            f"the hook point(s) {silent} did not run in a forward pass of this model.{reasons} Use a hook that "
            "runs, e.g. 'blocks.0.hook_resid_post'."
        )
    return {n: known[n] for n in names}


class AddVector(Intervention):
    """Adds ``m * unit * vector`` at one hook: DiffMean/CAA, SPLIT's vector form, COLD-Kernel.

    ``h <- h + m * unit * v`` at the selected positions (unit 1 unless the method that made it says
    otherwise: SPLIT's median training strength, COLD's scale to DiffMean's norm).
    """

    kind = "add_vector"
    linear_in_m = True

    def __init__(
        self,
        hook: str,
        vector: Float[Tensor, " d"],
        *,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(positions=positions, method=method, info=info, model_identity=model_identity, unit=unit)
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

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
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
