"""Applying interventions to a model: the ``steer`` context manager.

``with steer(model, intervention, m=4.0): model.generate(...)`` installs the intervention's hooks with
TransformerLens' own ``model.hooks`` context (TransformerLens 3.x ``generate`` takes no hooks argument),
and removes every hook it added when the block ends, also when the block raises. Everything is checked
before the first hook goes on, so a bad intervention leaves the model untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from tl_steer import sae_splicing
from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host, check_host
from tl_steer.interventions import HookFn, Intervention, check_strength
from tl_steer.positions import prompt_boundary


def strengths(interventions: Sequence[Intervention], m: float | Sequence[float]) -> list[float]:
    """One checked strength per intervention: a single m for all, or one each."""
    if isinstance(m, (list, tuple)):
        if len(m) != len(interventions):
            raise ConfigError(f"got {len(m)} strengths for {len(interventions)} interventions; give one m or one each")
        return [check_strength(x) for x in m]
    return [check_strength(m)] * len(interventions)  # type: ignore[arg-type]


def build_hooks(
    model: Host,
    interventions: Sequence[Intervention],
    m: float | Sequence[float] = 1.0,
    *,
    check: bool = True,
) -> list[tuple[str, HookFn]]:
    """Validate the interventions against the model and return their combined ``fwd_hooks``."""
    if not interventions:
        raise ConfigError("steer needs at least one intervention")
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected an Intervention, got {type(iv).__name__}")
    ms = strengths(interventions, m)
    if check:
        for iv in interventions:
            iv.check(model)
    hooks: list[tuple[str, HookFn]] = []
    for iv, mi in zip(interventions, ms, strict=True):
        hooks.extend(iv.hooks(mi, model=model))
    return hooks


@contextmanager
def steer(
    model: Host,
    *interventions: Intervention,
    m: float | Sequence[float] = 1.0,
    check: bool = True,
    sae_site: str = "before",
) -> Iterator[Host]:
    """Steer ``model`` with one or more interventions at strength ``m`` inside a ``with`` block.

    Args:
        model: a HookedTransformer or a TransformerBridge (anything else is a TypeError that says how to
            wrap it).
        *interventions: the interventions; they compose (applied in the order given).
        m: one strength for all, or one per intervention. ``m = 0`` is the clean model.
        check: validate hook names, widths and model identity first (default True).
        sae_site: on a sae-lens ``HookedSAETransformer``, where an edit at a hook name that has an SAE
            spliced in (now or later in the block) goes: "before" the SAE (default: the SAE encodes the
            steered activation) or "after" it (added to the SAE's output). See ``tl_steer.sae_splicing``.

    Inside the block, ``model.generate`` declares its prompt as the prompt of the position policy, so
    "generated" steers only generated tokens, with or without the KV cache.

    Example::

        with tl_steer.steer(model, vector, m=4.0):
            print(model.generate("I think that", max_new_tokens=20))
    """
    check_host(model)
    site = sae_splicing.check_site(sae_site)
    with sae_splicing.allow_spliced():  # a hook name occupied by an SAE is a valid target here
        fwd_hooks = build_hooks(model, interventions, m, check=check)
    # Nested steer() blocks share the outer block's generate wrapper.
    patched = "generate" not in vars(model)
    if patched:
        model.generate = _generate_with_boundary(model, model.generate)  # type: ignore[method-assign]
    try:
        if sae_splicing.is_sae_host(model):  # SAEs swap hook points out: follow them
            with sae_splicing.steered_hooks(model, fwd_hooks, site):
                yield model
        else:
            with model.hooks(fwd_hooks=list(fwd_hooks)):  # type: ignore[arg-type]
                yield model
    finally:
        if patched:
            vars(model).pop("generate", None)


def _generate_with_boundary(model: Host, generate: Any) -> Any:
    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_generation_length(model, args[0] if args else kwargs.get("input"), kwargs)
        with prompt_boundary(None):
            return generate(*args, **kwargs)

    return wrapper


def _check_generation_length(model: Host, prompt: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a generation that would run past the model's context before it starts: TransformerLens
    would otherwise fail with an IndexError deep inside its positional embedding after some tokens."""
    new = kwargs.get("max_new_tokens", 10)
    if isinstance(prompt, Tensor):
        n = int(prompt.shape[-1])
    elif isinstance(prompt, (str, list)) and model.tokenizer is not None:
        try:
            n = int(model.to_tokens(prompt, prepend_bos=kwargs.get("prepend_bos"), truncate=False).shape[-1])
        except Exception:  # noqa: BLE001 - let generate report inputs it cannot tokenize itself
            return
    else:
        return
    if isinstance(new, int) and n + new > model.cfg.n_ctx:
        raise DataError(
            f"generation would need {n} prompt tokens + max_new_tokens={new} = {n + new} positions, more than "
            f"the model's context of {model.cfg.n_ctx}; shorten the prompt or lower max_new_tokens"
        )
