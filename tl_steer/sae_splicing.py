"""Steering a model that has sae-lens SAEs spliced in (sae-lens' ``HookedSAETransformer``).

sae-lens splices an SAE in by *replacing* the hook point at the SAE's hook name ``H`` with a wrapper
module whose own hook points are ``H.hook_sae_input`` (what the SAE encodes), ``H.hook_sae_acts_post``
(the features), ``H.hook_sae_recons``, ``H.hook_sae_error`` and ``H.hook_sae_output`` (what flows on).
A hook registered on the old hook point then never runs again, and ``reset_saes`` puts a *new* hook
point back, so ``model.hooks`` alone would silently stop steering. On such a model, ``steer`` places
its hooks here instead and moves them whenever an SAE is added or removed at a steered hook name
(``add_sae``, ``reset_saes``, ``run_with_saes``, ``run_with_cache_with_saes``, ``saes()``):

- ``sae_site="before"`` (the default): the SAE receives the steered activation, as if the model had
  been steered with no SAE and the SAE then spliced in. Without the error term the model continues
  with the reconstruction of the steered activation; with ``use_error_term`` it continues with the
  steered activation itself (error term = steered input minus its clean reconstruction).
- ``sae_site="after"``: the edit is added to what the SAE puts back (``H.hook_sae_output``), so the
  SAE encodes the clean activation and the model continues with its output plus the edit.

Where no SAE is spliced at a steered name the hook sits on the plain hook point, as ``model.hooks``
would put it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint, LensHandle

from tl_steer.errors import ConfigError, HookNameError

SaeSite = Literal["before", "after"]
SAE_SITES: tuple[str, ...] = ("before", "after")

HookFn = Callable[[Tensor, HookPoint], Tensor | None]

# True while steer() validates its interventions: a hook name occupied by an SAE is then a valid
# steering target (steer moves the hook to the SAE); anywhere else it is an error that says so.
_STEERING: contextvars.ContextVar[bool] = contextvars.ContextVar("tl_steer_steering_spliced", default=False)


def check_site(site: object) -> SaeSite:
    """Return ``site`` if it is "before" or "after", else raise :class:`ConfigError`."""
    if site not in SAE_SITES:
        raise ConfigError(
            f"sae_site must be 'before' (the SAE encodes the steered activation) or 'after' (the edit is "
            f"added to the SAE's output), got {site!r}"
        )
    return site  # type: ignore[return-value]


def is_sae_host(model: object) -> bool:
    """True for a model that can splice sae-lens SAEs in (``HookedSAETransformer`` or alike)."""
    return isinstance(getattr(model, "_acts_to_saes", None), dict) and callable(getattr(model, "add_sae", None))


def native_name(model: nn.Module, name: str) -> str:
    """``name`` in the spelling an SAE host resolves attributes by: unchanged on a HookedSAETransformer; on
    sae-lens' ``SAETransformerBridge``, the bridge's own name of a HookedTransformer-style alias
    (``blocks.1.hook_resid_post`` -> ``blocks.1.hook_out``, also in front of an SAE's hook point
    ``.hook_sae_input``): it splices SAEs in under its own names, and an alias attribute keeps the replaced
    hook point."""
    resolve = getattr(model, "_resolve_hook_name", None)
    if not callable(resolve):
        return name
    head, sep, tail = name.partition(".hook_sae_")
    return str(resolve(head)) + sep + tail


def _repair_name(model: nn.Module, name: str) -> None:
    """Give the hook point at ``name`` on an ``SAETransformerBridge`` its full name back if it lost it.

    sae-lens' ``reset_saes`` on that bridge puts a fresh hook point back that the bridge renames after its
    attribute alone (``hook_out``, measured with sae-lens 6.54 / TransformerLens 3.9); the bridge's
    ``run_with_hooks`` then reads ``blocks.1.hook_out`` as an alias of ``hook_out``, a name it does not have,
    and silently adds no hook there."""
    if not callable(getattr(model, "_resolve_hook_name", None)):
        return
    native = native_name(model, name)
    try:
        point = _get(model, native)
    except (AttributeError, IndexError, TypeError, ValueError):
        return
    if isinstance(point, HookPoint) and point.name != native:
        point.name = native


def _same_site(model: nn.Module, a: str, b: str) -> bool:
    return native_name(model, a) == native_name(model, b)


def _get(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in native_name(model, path).split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def spliced_at(model: nn.Module, name: str) -> nn.Module | None:
    """The sae-lens wrapper module spliced in at hook name ``name``, or None if there is none."""
    try:
        module = _get(model, name)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if isinstance(module, HookPoint) or not isinstance(module, nn.Module):
        return None
    return module if isinstance(getattr(module, "hook_sae_output", None), HookPoint) else None


def describe_sae(wrapper: nn.Module) -> str:
    """A short name for the SAE inside a sae-lens wrapper: its class, release and id where known."""
    sae = getattr(wrapper, "sae", wrapper)
    meta = getattr(getattr(sae, "cfg", None), "metadata", None)
    parts = [str(p) for p in (getattr(meta, "release", None), getattr(meta, "sae_id", None)) if p]
    return f"{type(sae).__name__}" + (f" ({'/'.join(parts)})" if parts else "")


@contextmanager
def allow_spliced() -> Iterator[None]:
    """Inside this block, :func:`check_spliced` accepts hook names occupied by an SAE (steer's validation)."""
    token = _STEERING.set(True)
    try:
        yield
    finally:
        _STEERING.reset(token)


def check_spliced(model: nn.Module, name: str) -> bool:
    """False if no SAE is spliced in at ``name``; True if one is and steer is validating; else raise a
    :class:`HookNameError` naming the SAE and the hook points that replaced ``name``."""
    wrapper = spliced_at(model, name)
    if wrapper is None:
        return False
    if _STEERING.get():
        return True
    raise HookNameError(
        f"The hook point {name!r} is occupied by the SAE {describe_sae(wrapper)} that sae-lens spliced in "
        f"there: the hook points at that site are now '{name}.hook_sae_input' (what the SAE encodes), "
        f"'{name}.hook_sae_acts_post' (its features) and '{name}.hook_sae_output' (what the model continues "
        f"with). Use one of those names, steer with tl_steer.steer (sae_site='before' or 'after'), or remove "
        f"the SAE first with model.reset_saes()."
    )


def width_hook(model: nn.Module, name: str) -> str:
    """The hook name at which the activation width of ``name`` can be observed: ``name`` itself, or, when
    an SAE is spliced in there, its ``hook_sae_output`` (same width as the activation it replaces); on an
    ``SAETransformerBridge`` in the bridge's own spelling (:func:`native_name`), the one its hooks run under."""
    _repair_name(model, name)
    return native_name(model, f"{name}.hook_sae_output" if spliced_at(model, name) is not None else name)


@dataclass
class _Placement:
    """One steering hook and where it currently sits."""

    name: str
    fn: HookFn
    target: object = None  # the HookPoint, or the SAE wrapper for a forward pre-hook
    handle: Any = None  # LensHandle (HookPoint) or torch RemovableHandle (pre-hook)
    dropped: bool = False  # removed by someone else (model.reset_hooks()): stays off

    def remove(self) -> None:
        if isinstance(self.handle, LensHandle) and isinstance(self.target, HookPoint):
            self.handle.hook.remove()
            self.target.fwd_hooks = [h for h in self.target.fwd_hooks if h is not self.handle]
        elif self.handle is not None:
            self.handle.remove()
        self.target, self.handle = None, None

    def still_on(self) -> bool:
        if isinstance(self.handle, LensHandle) and isinstance(self.target, HookPoint):
            return any(h is self.handle for h in self.target.fwd_hooks)
        return self.handle is not None


class _Placer:
    """Keeps steer's hooks on the live hook points of a model whose SAEs come and go."""

    def __init__(self, model: nn.Module, fwd_hooks: Sequence[tuple[str, HookFn]], site: SaeSite) -> None:
        self.model = model
        self.site = site
        self.items = [_Placement(name, fn) for name, fn in fwd_hooks]

    def _resolve(self, name: str) -> tuple[object, bool]:
        """(target, prepend): where the hook for ``name`` must sit now."""
        wrapper = spliced_at(self.model, name)
        if wrapper is None:
            try:
                hook_point = _get(self.model, name)
            except (AttributeError, IndexError, TypeError, ValueError):
                hook_point = None
            if isinstance(hook_point, HookPoint):
                _repair_name(self.model, name)
            else:
                site = name.rpartition(".")[0]
                raise HookNameError(
                    f"the steered hook point {name!r} is gone: it belonged to an SAE that was removed inside the "
                    f"steer block. Steer the SAE's site {site!r} instead (sae_site='before' or 'after'): steer "
                    "follows SAEs there as they are added and removed."
                )
            # A transcoder reads its input at this hook point through a permanent hook added when it
            # was spliced in; steering first makes it encode the steered activation.
            transcoder_inputs = getattr(self.model, "_transcoder_output_hooks", {})
            reads_here = any(_same_site(self.model, key, name) for key in transcoder_inputs)
            return hook_point, self.site == "before" and reads_here
        if self.site == "after":
            return wrapper.hook_sae_output, False
        saes = getattr(self.model, "_acts_to_saes", {})
        encodes_here = any(w is wrapper and _same_site(self.model, key, name) for key, w in saes.items())
        if not encodes_here:  # a transcoder's output site: what it encodes is read elsewhere
            raise ConfigError(
                f"cannot steer {name!r} before the transcoder {describe_sae(wrapper)} spliced in there: it "
                f"encodes the activation of another hook point and replaces this one, so the edit would be "
                f"lost. Pass sae_site='after' (the edit is added to '{name}.hook_sae_output') or steer the "
                f"transcoder's input hook."
            )
        return wrapper, False

    def check(self) -> None:
        for item in self.items:
            self._resolve(item.name)

    def place(self) -> None:
        """Put every hook where it belongs now (moving those whose hook point was swapped out)."""
        for item in self.items:
            if item.dropped:
                continue
            if item.handle is not None and not item.still_on():
                item.dropped, item.target, item.handle = True, None, None
                continue
            target, prepend = self._resolve(item.name)
            if target is item.target:
                continue
            item.remove()
            if isinstance(target, HookPoint):
                target.add_hook(item.fn, dir="fwd", prepend=prepend)  # type: ignore[arg-type]
                item.handle = target.fwd_hooks[0 if prepend else -1]
            else:
                assert isinstance(target, nn.Module)
                item.handle = target.register_forward_pre_hook(_pre_hook(item.fn, target))
            item.target = target

    def remove(self) -> None:
        for item in self.items:
            item.remove()

    def watch(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` (add_sae, _reset_sae), followed by re-placing the hooks."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                self.place()

        return wrapper


def _pre_hook(fn: HookFn, wrapper: nn.Module) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """A forward pre-hook that edits the activation arriving at an SAE wrapper (its only argument)."""
    hook_point = cast(HookPoint, wrapper.hook_sae_input)  # passed as ``hook``: edits read its name only

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        (activation, *rest) = args
        out = fn(activation, hook_point)
        return (activation if out is None else out, *rest)

    return pre_hook


_WATCHED = ("add_sae", "_reset_sae")
_MISSING = object()


@contextmanager
def steered_hooks(model: nn.Module, fwd_hooks: Sequence[tuple[str, HookFn]], site: SaeSite) -> Iterator[None]:
    """Install ``fwd_hooks`` on an SAE-hosting model for the duration of the block, following SAEs that
    are spliced in or removed inside it; every hook and method patch is gone when the block ends."""
    placer = _Placer(model, fwd_hooks, site)
    placer.check()  # a combination that cannot compose fails here, before anything is installed
    saved = {name: vars(model).get(name, _MISSING) for name in _WATCHED}
    guards: list[torch.utils.hooks.RemovableHandle] = []
    try:
        placer.place()
        for name in _WATCHED:
            setattr(model, name, placer.watch(getattr(model, name)))
        # Anything that swaps a hook point without add_sae/_reset_sae is caught when the module that
        # holds it runs next: the hooks move before the swapped-in module is called.
        for parent in {id(p): p for p in (_parent(model, name) for name, _ in fwd_hooks)}.values():
            guards.append(parent.register_forward_pre_hook(lambda module, args: placer.place()))
        yield
    finally:
        for guard in guards:
            guard.remove()
        for name, value in saved.items():
            if value is _MISSING:
                vars(model).pop(name, None)
            else:
                setattr(model, name, value)
        placer.remove()


def _parent(model: nn.Module, name: str) -> nn.Module:
    head = name.rpartition(".")[0]
    parent = _get(model, head) if head else model
    return parent if isinstance(parent, nn.Module) else model
