"""Where COLD acts: the hook checks, the blocks COLD-FD's perturbed pass runs, the parameters before a hook,
and a context manager that suspends the hooks of the first blocks (parameter freezing is :mod:`tl_steer.freezing`)."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from tl_steer.errors import HookNameError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host

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


def parameters_before(model: Host, hook: str) -> list[str]:
    """Names of the parameters that act before ``hook`` (the ones COLD-FD's gradient step moves):
    the token (and absolute position) embeddings and the blocks the perturbed pass runs."""
    n_blocks = fd_blocks(model, hook)
    prefixes = ("embed.", "pos_embed.", *(f"blocks.{i}." for i in range(n_blocks)))
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


@contextmanager
def _hooks_suspended(model: Host, n_blocks: int) -> Iterator[None]:
    """Detach every forward hook of the TransformerLens hook points of blocks[:n_blocks] for the duration
    of the block, and put the very same hooks back afterwards (also on error)."""
    prefixes = tuple(f"blocks.{i}." for i in range(n_blocks))
    points = [hp for name, hp in model.hook_dict.items() if name.startswith(prefixes)]
    saved = [hp._forward_hooks for hp in points]
    try:
        for hp in points:
            hp._forward_hooks = OrderedDict()
        yield
    finally:
        for hp, hooks in zip(points, saved, strict=True):
            hp._forward_hooks = hooks
