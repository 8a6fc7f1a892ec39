"""Hook names: validation with helpful errors, and where a hook sits inside a block.

All model-facing knowledge of TransformerLens' naming lives here, so that a bridge backend
(TransformerLens 4's ``TransformerBridge``) can be added in one place later.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from tl_steer.errors import HookNameError
from tl_steer.hosts import Host
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
)


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


def validate_hook(model: Host, name: str) -> str:
    """Return ``name`` if the model has that hook point and runs it in a forward pass, else raise a
    :class:`HookNameError` with the reason this architecture lacks it (when known) and the closest
    valid names."""
    if not isinstance(name, str):
        raise HookNameError(f"a hook name must be a string like 'blocks.6.hook_resid_post', got {name!r}")
    hook_dict = model.hook_dict
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
    reason = _missing_reason(model, name)
    close = difflib.get_close_matches(name, list(hook_dict), n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    raise HookNameError(
        f"The model has no hook point {name!r}.{reason}{hint} "
        f"Hook names follow TransformerLens, e.g. 'blocks.{model.cfg.n_layers // 2}.hook_resid_post'."
    )


def _missing_reason(model: Host, name: str) -> str:
    """Why this model's architecture has no hook point ``name`` (a sentence with a leading space), or ""."""
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
        match = _BLOCK.match(name)
        if match is None:
            return cls(name=name, layer=None, pre_attention=True)
        rest = match.group(2)
        return cls(name=name, layer=int(match.group(1)), pre_attention=rest.startswith(_PRE_ATTENTION))

    def first_layer(self, n_layers: int) -> int:
        """The first layer whose computation this hook can change (for ``start_at_layer`` caching)."""
        if self.layer is None:
            return n_layers if self.name.startswith(("ln_final", "unembed")) else 0
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
