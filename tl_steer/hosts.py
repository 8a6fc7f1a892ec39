"""The two TransformerLens model classes tl_steer steers: ``HookedTransformer`` and ``TransformerBridge``.

TransformerLens 3.x has both; 4.x removed ``HookedTransformer`` (its import raises an ImportError with a
migration pointer) and keeps ``TransformerBridge``, which wraps a Hugging Face model and exposes the same
hook names (``blocks.L.hook_resid_post`` ...) as aliases of its own (``blocks.L.hook_out`` ...). Everything
tl_steer knows about the difference between the two lives here:

- which class a model is (:func:`is_bridge`, :func:`check_host`, with a TypeError that says how to wrap
  anything else);
- which name a hook fires under (:func:`fired_name`: a bridge calls its hook functions with its own name, not
  the alias the user wrote) and the HookedTransformer-style name of any hook (:func:`canonical_name`);
- what a host can do (:func:`can_restart`: the bridge refuses ``start_at_layer``, because Hugging Face's
  forward owns the loop over layers).

``Host`` is the type of a model argument. For the type checker it is ``HookedTransformer`` (the interface
tl_steer uses, which the bridge mirrors; the tests run both hosts); at run time it is the union.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, TypeGuard, Union

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    Host = HookedTransformer
else:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens 4 removed it

        class HookedTransformer:  # noqa: D101 - a stand-in that nothing is an instance of
            pass

    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens 2 has no bridge

        class TransformerBridge:  # noqa: D101 - a stand-in that nothing is an instance of
            pass

    Host = Union[HookedTransformer, TransformerBridge]  # noqa: UP007 - a run-time alias, not an annotation

HAS_HOOKED_TRANSFORMER = HookedTransformer.__module__.startswith("transformer_lens")

# Hook names of a HookedTransformer block, after "blocks.L.": a bridge lists these as aliases of its own names.
_HOOKED_BLOCK_SUFFIXES = frozenset(
    {
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_in",
        "hook_q_input",
        "hook_k_input",
        "hook_v_input",
        "hook_mlp_in",
        "hook_attn_out",
        "hook_mlp_out",
        "ln1.hook_scale",
        "ln1.hook_normalized",
        "ln2.hook_scale",
        "ln2.hook_normalized",
        "attn.hook_q",
        "attn.hook_k",
        "attn.hook_v",
        "attn.hook_z",
        "attn.hook_rot_q",
        "attn.hook_rot_k",
        "attn.hook_attn_scores",
        "attn.hook_pattern",
        "attn.hook_result",
        "mlp.hook_pre",
        "mlp.hook_pre_linear",
        "mlp.hook_post",
    }
)
_HOOKED_TOP = frozenset({"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"})
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_bridge(model: object) -> TypeGuard[Host]:
    """True if ``model`` is a TransformerLens ``TransformerBridge`` (or a subclass, e.g. sae-lens'
    ``SAETransformerBridge``)."""
    return isinstance(model, TransformerBridge)


def is_hooked(model: object) -> TypeGuard[Host]:
    """True if ``model`` is a ``HookedTransformer`` (or a subclass, e.g. sae-lens' ``HookedSAETransformer``)."""
    return isinstance(model, HookedTransformer)


def check_host(model: object, *, argument: str = "model") -> None:
    """Raise a TypeError that says how to wrap ``model`` unless it is a HookedTransformer or a bridge."""
    if is_hooked(model) or is_bridge(model):
        return
    kind = type(model).__name__
    module = type(model).__module__
    if module.startswith("nnsight"):
        how = (
            "tl_steer steers TransformerLens models; an nnsight model wraps a Hugging Face model, so wrap that "
            "one instead: tl_steer.bridge_from_hf(nnsight_model._model, nnsight_model.tokenizer)"
        )
    elif hasattr(model, "config") and hasattr(model, "state_dict") and module.startswith("transformers"):
        how = (
            "it is a Hugging Face model; wrap it first: tl_steer.bridge_from_hf(hf_model, tokenizer) (a "
            "TransformerBridge, TransformerLens' current class) or tl_steer.hooked_from_hf(hf_model, tokenizer) "
            "(a HookedTransformer)"
        )
    else:
        how = (
            "load one with tl_steer.load_default_model(), TransformerBridge.boot_transformers(name) or "
            "HookedTransformer.from_pretrained(name)"
        )
    raise TypeError(f"{argument} must be a TransformerLens HookedTransformer or TransformerBridge, got {kind}: {how}")


def hook_points(model: Any) -> dict[str, Any]:
    """``model.hook_dict``, with a bridge's HookedTransformer-style aliases in it on every bridge.

    A TransformerBridge's hook_dict has its aliases. sae-lens' ``SAETransformerBridge`` overrides hook_dict
    with its registry alone (the bridge's own names and its SAEs' hook points, ``blocks.1.hook_out.
    hook_sae_input``), so there the aliases are added back, each pointing at what its own name points at
    now: an alias of a site with an SAE spliced in names that SAE's hook points
    (``blocks.1.hook_resid_post.hook_sae_input``). (Its blocks' alias attributes keep the hook point the SAE
    replaced, which never runs again: go through these names.)"""
    hooks = model.hook_dict
    resolve = getattr(model, "_resolve_hook_name", None)
    if not is_bridge(model) or not isinstance(getattr(model, "_acts_to_saes", None), dict) or not callable(resolve):
        return hooks
    hooks = dict(hooks)
    collect = getattr(model, "_collect_hook_aliases_from_registry", dict)
    aliases: dict[str, Any] = {**getattr(model, "hook_aliases", {}), **collect()}
    sae_points = [name for name in hooks if ".hook_sae_" in name]
    for alias in aliases:
        native = resolve(alias)
        if native in hooks:
            hooks.setdefault(alias, hooks[native])
        for name in sae_points:
            if name.startswith(native + "."):
                hooks.setdefault(alias + name[len(native) :], hooks[name])
    return hooks


def fired_name(model: Any, name: str) -> str:
    """The name a hook point calls its hook functions with: ``name`` itself on a HookedTransformer; on a
    bridge, where ``name`` may be an alias (``blocks.3.hook_resid_post``), the bridge's own name
    (``blocks.3.hook_out``). Unknown names come back unchanged."""
    if not is_bridge(model):
        return name
    point = hook_points(model).get(name)
    return str(point.name) if point is not None and point.name else name


def canonical_name(model: Any, name: str) -> str:
    """The HookedTransformer-style name of the hook point ``name`` (``blocks.3.hook_out`` ->
    ``blocks.3.hook_resid_post`` on a bridge), so that code reading a hook's layer and place inside its block
    reads either spelling; ``name`` itself when it has none or the model is not a bridge."""
    if not is_bridge(model):
        return name
    points = hook_points(model)
    point = points.get(name)
    if point is None or _is_hooked_style(name):
        return name
    for alias, other in points.items():
        if other is point and _is_hooked_style(alias):
            return str(alias)
    return name


def _is_hooked_style(name: str) -> bool:
    match = _BLOCK.match(name)
    return match.group(2) in _HOOKED_BLOCK_SUFFIXES if match else name in _HOOKED_TOP


def sae_lens_install_hint() -> str:
    """How to install sae-lens here: plain ``pip install sae-lens`` beside TransformerLens 3; on TransformerLens 4,
    which sae-lens does not support yet (it pins transformer-lens below 4), the downgrade that pip will make."""
    if HAS_HOOKED_TRANSFORMER:
        return "pip install sae-lens"
    return (
        "pip install sae-lens 'transformer-lens>=3.9,<4' (sae-lens needs TransformerLens 3; the installed "
        "TransformerLens 4 is replaced by 3.x, which has both hosts)"
    )


def can_restart(model: Any) -> bool:
    """Whether a forward pass can start at a later block from a given residual (``start_at_layer``): a
    HookedTransformer can; a bridge cannot (Hugging Face's forward runs every layer), so passes that would
    restart from a cached clean prefix run from the embedding instead (the same results, more compute)."""
    return not is_bridge(model)


__all__ = [
    "HAS_HOOKED_TRANSFORMER",
    "Host",
    "HookedTransformer",
    "TransformerBridge",
    "can_restart",
    "canonical_name",
    "check_host",
    "fired_name",
    "hook_points",
    "is_bridge",
    "is_hooked",
    "sae_lens_install_hint",
]
