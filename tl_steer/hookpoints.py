"""Hook names: validation with helpful errors, and where a hook sits inside a block.

All model-facing knowledge of TransformerLens' naming lives here. Both hosts are addressed by the
HookedTransformer names (``blocks.L.hook_resid_post`` ...); a ``TransformerBridge`` also has names of its
own (``blocks.L.hook_out`` ...), which it lists beside those as aliases of the same hook points. Where a hook
sits (:class:`HookSite`) is read from either spelling through :data:`BRIDGE_TO_HOOKED`, a static table, so it
needs no model; a name written for the other host gets an error that names its equivalent here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from tl_steer.errors import HookNameError
from tl_steer.hosts import Host, check_host, hook_points, is_bridge
from tl_steer.sae_splicing import check_spliced

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Hooks of a block that fire before its attention scores are computed. A position policy at these
# hooks learns the KV-cache offset from the previous block's attention (see positions.py).
_PRE_ATTENTION = (
    "hook_resid_pre",
    "ln1.",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    # A bridge's own names for the hooks above (it computes q, k and v in submodules of its attention).
    "hook_in",
    "attn.hook_in",
    "attn.hook_attn_in",
    "attn.q.",
    "attn.k.",
    "attn.v.",
    "attn.hook_cos",
    "attn.hook_sin",
)

# A TransformerBridge's own hook names (after "blocks.L.", or at the top level) and the HookedTransformer
# names of the same activations: the bridge lists the latter as aliases of the former (TransformerLens 3.9,
# checked on Llama, GPT-2 and GPT-NeoX). Only names whose activation is the same tensor on both hosts are
# here: a bridge's "ln1.hook_in" carries the residual too, but an edit there reaches the attention only.
BRIDGE_TO_HOOKED: dict[str, str] = {
    "hook_in": "hook_resid_pre",
    "hook_out": "hook_resid_post",
    "ln2.hook_in": "hook_resid_mid",
    "attn.hook_out": "hook_attn_out",
    "mlp.hook_out": "hook_mlp_out",
    "attn.q.hook_out": "attn.hook_q",
    "attn.k.hook_out": "attn.hook_k",
    "attn.v.hook_out": "attn.hook_v",
    "attn.o.hook_in": "attn.hook_z",
    "attn.hook_attn_in": "hook_attn_in",
    "attn.hook_q_input": "hook_q_input",
    "attn.hook_k_input": "hook_k_input",
    "attn.hook_v_input": "hook_v_input",
    "mlp.gate.hook_out": "mlp.hook_pre",
    "mlp.in.hook_out": "mlp.hook_pre",  # mlp.hook_pre_linear on a gated MLP (see hooked_equivalent)
    "mlp.out.hook_in": "mlp.hook_post",
}
BRIDGE_TOP_TO_HOOKED: dict[str, str] = {
    "embed.hook_out": "hook_embed",
    "pos_embed.hook_out": "hook_pos_embed",
}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' ``get_act_name``, from wherever this TransformerLens version keeps it."""
    try:
        from transformer_lens.utilities import get_act_name as impl
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.utils import get_act_name as impl
    return impl(name, layer, layer_type)


# Hook points TransformerLens creates on every model but runs only when a config flag is set (a hook
# there would silently never fire): (name suffixes, the flag, its setter on HookedTransformer).
_FLAGGED = (
    (("attn.hook_result",), "use_attn_result", "set_use_attn_result"),
    (("hook_q_input", "hook_k_input", "hook_v_input"), "use_split_qkv_input", "set_use_split_qkv_input"),
    (("hook_mlp_in",), "use_hook_mlp_in", "set_use_hook_mlp_in"),
    (("hook_attn_in",), "use_attn_in", "set_use_attn_in"),
)


def hooked_equivalent(name: str, *, gated_mlp: bool = False, parallel_attn_mlp: bool = False) -> str | None:
    """The HookedTransformer name of a bridge's own hook name (``blocks.3.hook_out`` ->
    ``blocks.3.hook_resid_post``), or None when ``name`` is not one (:data:`BRIDGE_TO_HOOKED`). With
    ``parallel_attn_mlp`` (GPT-NeoX, GPT-J) a block has no resid_mid: its ``ln2.hook_in`` has no equivalent."""
    match = _BLOCK.match(name)
    if match is None:
        return BRIDGE_TOP_TO_HOOKED.get(name)
    rest = match.group(2)
    if rest == "ln2.hook_in" and parallel_attn_mlp:
        return None
    if rest == "mlp.in.hook_out" and gated_mlp:
        rest = "mlp.hook_pre_linear"
    elif rest in BRIDGE_TO_HOOKED:
        rest = BRIDGE_TO_HOOKED[rest]
    else:
        return None
    return f"blocks.{match.group(1)}.{rest}"


def bridge_equivalent(name: str, *, gated_mlp: bool = False, parallel_attn_mlp: bool = False) -> str | None:
    """The bridge's own name of a HookedTransformer hook name (the inverse of :func:`hooked_equivalent`),
    or None when the table has none."""
    match = _BLOCK.match(name)
    if match is None:
        return next((own for own, hooked in BRIDGE_TOP_TO_HOOKED.items() if hooked == name), None)
    for own in BRIDGE_TO_HOOKED:
        if own == "mlp.gate.hook_out" and not gated_mlp:  # an ungated MLP's hook_pre is its "in" projection
            continue
        candidate = f"blocks.{match.group(1)}.{own}"
        if hooked_equivalent(candidate, gated_mlp=gated_mlp, parallel_attn_mlp=parallel_attn_mlp) == name:
            return candidate
    return None


def canonical_site_name(name: str) -> str:
    """``name`` in HookedTransformer spelling where it is a bridge's own name, else ``name``: what
    :class:`HookSite` parses (the layer, and the place inside the block)."""
    return hooked_equivalent(name) or name


def validate_hook(model: Host, name: str) -> str:
    """Return ``name`` if the model has that hook point and runs it in a forward pass, else raise a
    :class:`HookNameError` with the reason this architecture lacks it (when known), the equivalent name
    on this host of a name written for the other one, and the closest valid names."""
    check_host(model)
    if not isinstance(name, str):
        raise HookNameError(f"a hook name must be a string like 'blocks.6.hook_resid_post', got {name!r}")
    hook_dict = hook_points(model)  # model.hook_dict, with a bridge's aliases also on sae-lens' SAE bridge
    if name in hook_dict:
        for suffixes, flag, setter in _FLAGGED:
            if name.endswith(suffixes) and not getattr(model.cfg, flag, False):
                raise HookNameError(
                    f"The hook point {name!r} exists but never runs on this model: TransformerLens computes it "
                    f"only with cfg.{flag}=True. Call model.{setter}(True) first, or use another hook."
                )
        return name
    if check_spliced(model, name):  # an SAE spliced in by sae-lens; steer() may target it, else this raises
        return name
    reason = missing_reason(model, name) or _other_host_reason(model, name)
    close = difflib.get_close_matches(name, list(hook_dict), n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    raise HookNameError(
        f"The model has no hook point {name!r}.{reason}{hint} "
        f"Hook names follow TransformerLens, e.g. 'blocks.{model.cfg.n_layers // 2}.hook_resid_post'."
    )


def _other_host_reason(model: Host, name: str) -> str:
    """A sentence (with a leading space) naming this model's equivalent of a hook name written for the other
    host (a bridge's own name given to a HookedTransformer, or the reverse), or ""."""
    flags = {flag: bool(getattr(model.cfg, flag, False)) for flag in ("gated_mlp", "parallel_attn_mlp")}
    if is_bridge(model):
        other, host, written = bridge_equivalent(name, **flags), "TransformerBridge", "HookedTransformer"
    else:
        other, host, written = hooked_equivalent(name, **flags), "HookedTransformer", "TransformerBridge"
    if other is None or other not in hook_points(model):
        return ""
    return f" {name!r} is a {written} name; on a {host} this is {other!r}."


def missing_reason(model: Host, name: str) -> str:
    """Why this model's architecture has no hook point ``name``, or does not run it (a sentence with a leading
    space), or "". A bridge lists some hook points its Hugging Face forward never runs (``hook_pos_embed`` of
    a rotary model): the reason is the same."""
    cfg = model.cfg
    match = _BLOCK.match(name)
    layer, rest = (int(match.group(1)), match.group(2)) if match else (-1, name)
    if layer >= cfg.n_layers:
        return f" The model has {cfg.n_layers} blocks (0..{cfg.n_layers - 1})."
    if rest == "hook_resid_mid" and cfg.parallel_attn_mlp:
        return (
            f" This model computes attention and MLP in parallel (cfg.parallel_attn_mlp, as GPT-J and "
            f"GPT-NeoX/Pythia), so there is no residual stream between them: both read "
            f"'blocks.{layer}.hook_resid_pre' (the MLP through 'blocks.{layer}.ln2.hook_normalized') and "
            f"both write to 'blocks.{layer}.hook_resid_post'."
        )
    if cfg.attn_only and (rest == "hook_resid_mid" or "mlp" in rest or rest.startswith("ln2.")):
        return " This model is attention-only (cfg.attn_only): its blocks have no MLP and no resid_mid."
    if rest.startswith(("attn.hook_rot_q", "attn.hook_rot_k")):
        return f" Rotary hooks exist only with rotary positions; this model's are {cfg.positional_embedding_type!r}."
    if rest == "hook_pos_embed":
        return (
            f" This model has no learned position embedding (positions are {cfg.positional_embedding_type!r}); "
            "the embedding output is 'hook_embed' and 'blocks.0.hook_resid_pre'."
        )
    if (".hook_scale" in rest or ".hook_normalized" in rest) and cfg.normalization_type is None:
        return " This model has no normalisation layers (cfg.normalization_type is None)."
    return ""


@dataclass(frozen=True)
class HookSite:
    """Where a hook point sits: its block (``None`` outside blocks) and whether it fires before the
    block's attention scores."""

    name: str
    layer: int | None
    pre_attention: bool

    @classmethod
    def parse(cls, name: str) -> HookSite:
        """Read ``name`` in either host's spelling (a bridge's ``blocks.3.hook_out`` is
        ``blocks.3.hook_resid_post``); ``name`` is kept as given."""
        match = _BLOCK.match(canonical_site_name(name))
        if match is None:
            return cls(name=name, layer=None, pre_attention=True)
        rest = match.group(2)
        return cls(name=name, layer=int(match.group(1)), pre_attention=rest.startswith(_PRE_ATTENTION))

    def first_layer(self, n_layers: int) -> int:
        """The first layer whose computation this hook can change (for ``start_at_layer`` caching)."""
        if self.layer is None:
            return n_layers if self.name.startswith(("ln_final", "unembed", "hook_unembed")) else 0
        return self.layer

    def offset_source(self, n_layers: int) -> str | None:
        """The attention-scores hook from which this hook learns the KV-cache offset, if any.

        ``hook_attn_scores`` has shape [batch, head, query_pos, key_pos] with key_pos = offset +
        query_pos under a KV cache, and fires in every forward pass before hooks later in the block.
        ``None`` for hooks that fire before any attention (the embeddings, block 0 before attention).
        """
        if self.layer is None:
            last = n_layers - 1
            return f"blocks.{last}.attn.hook_attn_scores" if self.first_layer(n_layers) == n_layers else None
        layer = self.layer - 1 if self.pre_attention else self.layer
        return None if layer < 0 else f"blocks.{layer}.attn.hook_attn_scores"
