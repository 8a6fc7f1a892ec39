"""Reading activations at a hook over the completion tokens of many texts, in padded batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.errors import ConfigError
from tl_steer.hookpoints import HookSite, validate_hook
from tl_steer.hosts import Host
from tl_steer.scoring import Tokenized, batches, max_batch_tokens, pad_right, pad_token_id

Reduce = Literal["mean", "last"]


def completion_activations(
    model: Host,
    data: Tokenized,
    hook: str,
    *,
    reduce: Reduce = "mean",
    batch_size: int = 16,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "n d"]:
    """The activation at ``hook`` for each item, averaged over its completion tokens (``"mean"``) or
    taken at its last token (``"last"``); float64 (averaged in float64 whatever the model's dtype), in the
    input order, on the CPU.

    ``transform`` maps the activations of a batch ([batch, pos, d] -> [batch, pos, d']) before the
    reduction, e.g. an SAE's encoder, whose mean over tokens is not the code of the mean activation.

    The forward pass stops after the hook's block (``stop_at_layer``), so later layers cost nothing.
    """
    validate_hook(model, hook)
    if reduce not in ("mean", "last"):
        raise ConfigError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    site = HookSite.parse(hook)
    stop = site.layer + 1 if site.layer is not None and site.layer + 1 < model.cfg.n_layers else None
    pad = pad_token_id(model)
    lengths = [len(s) for s in data.sequences]
    rows: dict[int, Tensor] = {}
    captured: list[Tensor] = []

    def capture(act: Tensor, hook: HookPoint) -> None:
        captured.append(act.detach())

    for idx in batches(lengths, batch_size, max_batch_tokens(model)):
        tokens = pad_right([data.sequences[i] for i in idx], pad, model.cfg.device or "cpu")
        captured.clear()
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(hook, capture)], stop_at_layer=stop, return_type=None)
            acts = captured[0] if transform is None else transform(captured[0])
        acts = acts.double()
        for row, i in enumerate(idx):
            start, end = data.starts[i], lengths[i]
            span = acts[row, start:end] if reduce == "mean" else acts[row, end - 1 : end]
            rows[i] = span.mean(0).cpu()
    return torch.stack([rows[i] for i in range(len(data))])
