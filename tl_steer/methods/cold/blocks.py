"""Where COLD acts: the hook checks, the blocks COLD-FD's perturbed pass runs, the parameters before a hook,
and a context manager that suspends the hooks of the first blocks (parameter freezing is :mod:`tl_steer.freezing`)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from tl_steer.errors import HookNameError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host, is_bridge

_INPUT_HOOK = "blocks.0.hook_resid_pre"
_SCORES_HOOK = "blocks.0.attn.hook_attn_scores"
_FD_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def _block_site(model: Host, hook: str) -> HookSite:
    validate_hook(model, hook)
    site = HookSite.parse(hook)
    if site.layer is None:
        raise HookNameError(
            f"COLD steers at a hook inside a block, got {hook!r}: outside the blocks there is either nothing "
            "before it to learn (embeddings) or nothing after it that the loss could act through "
            f"(ln_final, unembed). Use e.g. 'blocks.{model.cfg.n_layers // 2}.hook_resid_post'."
        )
    return site


def fd_blocks(model: Host, hook: str) -> int:
    """How many blocks the perturbed pass of COLD-FD runs for ``hook`` (``stop_at_layer``)."""
    _block_site(model, hook)
    match = _FD_HOOK.match(hook)
    if match is None:
        raise HookNameError(
            f"cold_fd supports the residual stream hooks 'blocks.{{l}}.hook_resid_pre' (l >= 1) and "
            f"'blocks.{{l}}.hook_resid_post', got {hook!r}"
        )
    layer, where = int(match.group(1)), match.group(2)
    if where == "pre" and layer == 0:
        raise HookNameError(
            "cold_fd needs at least one block before its hook; 'blocks.0.hook_resid_pre' is the embedding "
            "output. Use 'blocks.0.hook_resid_post' or later (or cold_kernel)."
        )
    return layer if where == "pre" else layer + 1


#: The names COLD-FD gives the embedding tables on either host (a bridge's own names are Hugging Face's).
EMBED, POS_EMBED = "embed.W_E", "pos_embed.W_pos"


def parameters_before(model: Host, hook: str) -> list[str]:
    """Names of the parameters that act before ``hook`` (the ones COLD-FD's gradient step moves):
    the token (and absolute position) embeddings and the blocks the perturbed pass runs.

    On a HookedTransformer these are its ``named_parameters``. A TransformerBridge names its parameters after
    the Hugging Face model (``model.layers.0._original_component.mlp...``): its blocks' parameters come under
    those names, found through ``model.blocks[i]``, and its embedding tables as :data:`EMBED` /
    :data:`POS_EMBED`. The embedding may be tied to the unembedding there (one tensor), so COLD-FD takes
    their gradient from the embedding's output (:func:`embedding_tables`), which counts the embedding's own
    path only, as on a HookedTransformer, whose W_E and W_U are separate."""
    n_blocks = fd_blocks(model, hook)
    if not is_bridge(model):
        prefixes = ("embed.", "pos_embed.", *(f"blocks.{i}." for i in range(n_blocks)))
        return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    wanted = {id(p) for block in list(model.blocks)[:n_blocks] for p in block.parameters()}
    blocks = [name for name, p in model.named_parameters() if id(p) in wanted]
    _, w_pos = embedding_tables(model)
    return [EMBED, *([POS_EMBED] if w_pos is not None else []), *blocks]


def embedding_tables(model: Host) -> tuple[Tensor, Tensor | None]:
    """The token-embedding table W_E [d_vocab, d_model] and, for absolute positions, W_pos [n_ctx, d_model]
    (None otherwise), on either host."""
    if model.cfg.positional_embedding_type != "standard":
        return model.W_E, None
    if not is_bridge(model):
        return model.W_E, model.W_pos
    weights = [p for p in model.pos_embed.parameters() if p.ndim == 2]
    return model.W_E, weights[0]


@contextmanager
def _hooks_suspended(model: Host, n_blocks: int) -> Iterator[None]:
    """Detach every forward hook of the TransformerLens hook points of blocks[:n_blocks] for the duration
    of the block, and put the very same hooks back afterwards (also on error).

    On a bridge, every hook point of the model: its partial pass runs from the token embedding and, when
    it ends at the last block, through ln_final and the unembedding, whose hooks must not fire either. A
    bridge lists each hook point under two names (its own and the HookedTransformer alias): each is
    suspended once, or the second save would record the emptied hooks."""
    prefixes = tuple(f"blocks.{i}." for i in range(n_blocks))
    points = list(
        {id(hp): hp for name, hp in model.hook_dict.items() if is_bridge(model) or name.startswith(prefixes)}.values()
    )
    saved = [hp._forward_hooks for hp in points]
    try:
        for hp in points:
            hp._forward_hooks = OrderedDict()
        yield
    finally:
        for hp, hooks in zip(points, saved, strict=True):
            hp._forward_hooks = hooks
