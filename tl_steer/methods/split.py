"""SPLIT (Steering with Preference-Utility Intervention) and its SFT baseline (methods.md section 3).

One trainer learns one intervention at one layer, the model frozen, in one of three forms that differ only
in which term of the weight update ``h_out = (W + m dW) h_in + (b + m db)`` is learned (methods.md
section 1):

- ``"vector"``: ``db`` only, an :class:`~tl_steer.interventions.AddVector` at ``blocks.{l}.hook_resid_post``;
- ``"lora"``: a rank-r ``dW = A B`` of layer l's MLP down-projection (:class:`~tl_steer.module_delta.LoRA`);
- ``"local_weight"``: the full ``dW`` and ``db`` of that projection (:class:`~tl_steer.module_delta.LocalWeight`).

For a pair ``(q, A_p, A_n)`` with the intervention active at strength ``m`` (drawn per example from a grid):

    L_p, L_n = mean per-token NLL of A_p, A_n after q (prompt tokens masked)
    loss     = lambda_p * L_p + lambda_n * L_n + gamma * relu(theta - (L_n - L_p))

The first two terms keep both completions likely (utility); the hinge pushes the preference log-odds
``L_n - L_p`` above the margin ``theta``. With ``add_subtract=True`` every pair also appears at ``-m``
with the roles of A_p and A_n swapped. SFT is the same trainer with ``lambda_p = 1`` and nothing else.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, DataError
from tl_steer.interventions import AddVector, Intervention
from tl_steer.models import model_identity
from tl_steer.module_delta import LocalWeight, LoRA
from tl_steer.positions import PositionsLike, prompt_boundary
from tl_steer.scoring import (
    Tokenized,
    batches,
    max_batch_tokens,
    nll_from_logits,
    pad_right,
    pad_token_id,
    tokenize_completions,
)

Form = Literal["vector", "lora", "local_weight"]
FORMS: tuple[str, ...] = ("vector", "lora", "local_weight")


def _grid(start: float, stop: float, n: int) -> tuple[float, ...]:
    return tuple(round(start + (stop - start) * i / (n - 1), 6) for i in range(n))


#: Per-form defaults: the published lr and m grid (methods.md section 3); see :func:`split` for the
#: check of the vector's scale on the default model.
DEFAULTS: dict[str, dict[str, Any]] = {
    "vector": {"lr": 0.08, "m_grid": _grid(2.0, 20.0, 10)},
    "lora": {"lr": 0.01, "m_grid": _grid(0.2, 2.0, 10)},
    "local_weight": {"lr": 0.01, "m_grid": _grid(0.2, 2.0, 10)},
}

HISTORY_COLUMNS = ("epoch", "step", "loss", "L_p", "L_n", "hinge", "pref", "lr", "grad_norm")


def split(
    model: HookedTransformer,
    pairs: Sequence[ContrastivePair],
    layer: int,
    form: Form = "vector",
    *,
    lambda_p: float = 1.0,
    lambda_n: float = 0.5,
    gamma: float = 5.0,
    theta: float = 0.5,
    lr: float | None = None,
    epochs: int = 3,
    batch_size: int = 8,
    m_grid: Sequence[float] | None = None,
    add_subtract: bool = False,
    rank: int = 4,
    seed: int = 0,
    early_stop_patience: int | None = None,
    weight_decay: float = 0.01,
    positions: PositionsLike = "all",
    progress: bool = True,
    chat: bool = False,
) -> tuple[Intervention, pd.DataFrame]:
    """Train a steering intervention at ``layer`` with the SPLIT objective; the model stays frozen.

    Args:
        model: a HookedTransformer; its weights are frozen during training and bit-identical afterwards.
        pairs: contrastive pairs ``(prompt, positive, negative)``; at least ``batch_size`` of them.
        layer: the block to steer: its residual output (vector) or its MLP down-projection (LoRA, local weight).
        form: ``"vector"``, ``"lora"`` or ``"local_weight"``.
        lambda_p, lambda_n, gamma, theta: the loss weights and margin (published: 1, 0.3..0.6, 3.5..8, 0.3..0.6).
        lr: AdamW learning rate, decayed linearly to 0 over the run; default per form (:data:`DEFAULTS`).
        epochs: passes over the pairs; ``early_stop_patience`` epochs without a lower epoch loss stop early.
        batch_size: pairs per optimiser step (both completions of a pair go in the same padded batch).
        m_grid: the strengths m is drawn from, per example, uniformly; positive; default per form.
        add_subtract: also train every pair at -m with A_p and A_n swapped.
        rank: the LoRA rank.
        seed: seeds the initialisation, the order of the pairs and the draws of m (deterministic on CPU).
        weight_decay: AdamW's decoupled weight decay.
        positions: the position policy of the intervention, used in training and kept for inference.
        progress: show a tqdm bar with the loss terms.
        chat: wrap the prompts in the chat template.

    Returns:
        ``(intervention, history)``: the trained :class:`AddVector`, :class:`LoRA` or :class:`LocalWeight`
        (``method`` "split", the settings in ``info``; ``info["m_typical"]`` is the median of the grid),
        and a DataFrame with one row per optimiser step: epoch, step, loss, L_p, L_n, hinge (mean
        ``relu(theta - (L_n - L_p))`` before the gamma factor), pref (mean ``L_n - L_p``), lr, grad_norm
        (before clipping at 1.0).

    Defaults and scales. The loss weights are the middle of the published ranges. lr and the m grid
    are the published ones per form: vector lr 0.08 with m in 2..20; LoRA and local weight lr 0.01
    with m in 0.2..2 (:data:`DEFAULTS`). The scale of the default model (SmolLM2-135M) was checked
    before keeping the vector's: its residual stream at layer 15 has a norm of about 180, and a DiffMean
    vector of norm about 19 saturates the preference at m = 1..2 and breaks the model at m = 4, so a
    vector that started at DiffMean's size (or any non-zero size) would be far off the manifold at
    m = 20. The trained vector therefore starts at zero (like ``db`` and the LoRA's B): AdamW moves each
    coordinate by about lr per step, so ``|m v|`` grows from 0 by at most ``m * lr * sqrt(d_model)``
    (<= 38 at m = 20) per step and the utility terms of the loss hold it there. Measured on the default
    model (sentiment, 48 pairs, 2 epochs of 6 steps, layer 15): the vector ended with norm 5.0
    (``m v`` about 55 at the median m = 11), the held-out PrefOdds rose from 0.43 at m = 0 to 1.05 at
    m = 11 and 0.98 at m = 20 with UtilOdds at or above its clean value; with m in 0.2..2 instead the
    vector learned ten times more slowly per step (norm 7.6, PrefOdds 1.06 at m = 2, training loss
    5.2 against 4.4). ``info["m_typical"]``, the median of the grid, is the strength to compare at.

    The margin theta is on the scale of L, the mean NLL per completion token. On the built-in concepts
    the clean default model already has PrefOdds of about 0.5 (sentiment) and 0.7 (formality), so the
    published theta = 0.5 leaves the hinge almost idle and SPLIT becomes SFT plus a term that also
    makes the negative completion likely: measured (layer 15, 100 train pairs, 2 epochs, 40 test
    pairs), SPLIT's held-out PrefOdds was SFT's within 0.01 or below it in five of six cases
    (formality: 1.2..1.4 against 1.5..1.9), and 0.28 above it once (sentiment, LoRA). With theta = 2
    SPLIT reached PrefOdds 2.1..2.7 in every form against SFT's 1.0..1.9, with UtilOdds above the
    clean model's but 0.3..0.65 below SFT's (``benchmarks/split_compare.py``).
    Choose theta above the clean model's preference on your pairs.
    """
    return _train(
        model,
        pairs,
        layer,
        form,
        objective="split",
        lambda_p=lambda_p,
        lambda_n=lambda_n,
        gamma=gamma,
        theta=theta,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        m_grid=m_grid,
        add_subtract=add_subtract,
        rank=rank,
        seed=seed,
        early_stop_patience=early_stop_patience,
        weight_decay=weight_decay,
        positions=positions,
        progress=progress,
        chat=chat,
    )


def sft(
    model: HookedTransformer,
    pairs: Sequence[ContrastivePair],
    layer: int,
    form: Form = "vector",
    *,
    lr: float | None = None,
    epochs: int = 3,
    batch_size: int = 8,
    m_grid: Sequence[float] | None = None,
    add_subtract: bool = False,
    rank: int = 4,
    seed: int = 0,
    early_stop_patience: int | None = None,
    weight_decay: float = 0.01,
    positions: PositionsLike = "all",
    progress: bool = True,
    chat: bool = False,
) -> tuple[Intervention, pd.DataFrame]:
    """The SFT baseline of :func:`split`: the same trainer with ``lambda_p = 1``, ``lambda_n = 0``,
    ``gamma = 0``, i.e. it only lowers the NLL of the positive completion at strength m (of the negative
    one at -m with ``add_subtract``). Arguments and result as in :func:`split` (``method`` is "sft")."""
    return _train(
        model,
        pairs,
        layer,
        form,
        objective="sft",
        lambda_p=1.0,
        lambda_n=0.0,
        gamma=0.0,
        theta=0.0,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        m_grid=m_grid,
        add_subtract=add_subtract,
        rank=rank,
        seed=seed,
        early_stop_patience=early_stop_patience,
        weight_decay=weight_decay,
        positions=positions,
        progress=progress,
        chat=chat,
    )


# ----- checks ------------------------------------------------------------------------------------------
def _real(name: str, value: object, *, minimum: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ConfigError(f"{name} must be finite, got {x}")
    if positive and x <= 0:
        raise ConfigError(f"{name} must be > 0, got {x}")
    if minimum is not None and x < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {x}")
    return x


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_options(
    model: HookedTransformer, n_pairs: int, layer: object, form: object, opts: dict[str, Any]
) -> dict[str, Any]:
    """Validate every option before any work; return them normalised (lr and m grid filled in)."""
    if not isinstance(form, str) or form not in FORMS:
        raise ConfigError(f"unknown form {form!r}; valid forms: {', '.join(repr(f) for f in FORMS)}")
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ConfigError(
            f"layer must be an int in 0..{n_layers - 1} for this model ({n_layers} layers), got {layer!r}"
        )
    out = dict(opts)
    for name in ("lambda_p", "lambda_n", "gamma", "weight_decay"):
        out[name] = _real(name, opts[name], minimum=0.0)
    out["theta"] = _real("theta", opts["theta"])
    if out["lambda_p"] == out["lambda_n"] == out["gamma"] == 0.0:
        raise ConfigError("lambda_p, lambda_n and gamma are all 0: the loss is 0 and there is nothing to train")
    out["lr"] = _real("lr", DEFAULTS[form]["lr"] if opts["lr"] is None else opts["lr"], positive=True)
    out["epochs"] = _integer("epochs", opts["epochs"], 1)
    out["batch_size"] = _integer("batch_size", opts["batch_size"], 1)
    out["rank"] = _integer("rank", opts["rank"], 1)
    out["seed"] = _integer("seed", opts["seed"], 0)
    if opts["early_stop_patience"] is not None:
        out["early_stop_patience"] = _integer("early_stop_patience", opts["early_stop_patience"], 1)
    grid = DEFAULTS[form]["m_grid"] if opts["m_grid"] is None else opts["m_grid"]
    if isinstance(grid, (int, float)):
        grid = [grid]
    elif hasattr(grid, "tolist"):  # a tensor or numpy array
        grid = grid.tolist()
        grid = grid if isinstance(grid, list) else [grid]
    try:
        values = [_real("each m in m_grid", m, positive=True) for m in grid]
    except TypeError as exc:
        raise ConfigError(f"m_grid must be a sequence of positive strengths, got {grid!r}") from exc
    if not values:
        raise ConfigError("m_grid is empty; give at least one positive strength")
    out["m_grid"] = tuple(values)
    if not isinstance(opts["add_subtract"], bool):
        raise ConfigError(f"add_subtract must be True or False, got {opts['add_subtract']!r}")
    if n_pairs < out["batch_size"]:
        raise DataError(
            f"{n_pairs} pairs are fewer than one batch (batch_size={out['batch_size']}); "
            "give more pairs or a smaller batch_size"
        )
    if form != "vector" and not model.cfg.d_mlp:
        raise ConfigError(f"form {form!r} needs a model with MLPs; this one has d_mlp={model.cfg.d_mlp}")
    return out


# ----- the trainer ---------------------------------------------------------------------------------------
def _new_intervention(
    model: HookedTransformer, layer: int, form: str, rank: int, seed: int, positions: PositionsLike
) -> Intervention:
    if form == "vector":
        dtype = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
        vector = torch.zeros(model.cfg.d_model, dtype=dtype, device=model.cfg.device)
        return AddVector(
            f"blocks.{layer}.hook_resid_post", vector, positions=positions, model_identity=model_identity(model)
        )
    if form == "lora":
        return LoRA.for_model(model, layer, rank, seed=seed, positions=positions)
    return LocalWeight.for_model(model, layer, positions=positions)


class _Prefix:
    """Forward passes for training that skip work whose result is known.

    The clean residual stream before the intervention's first block is computed once per sequence
    (the model is frozen and nothing before that block changes), so each step runs only the blocks
    from there on; and the final norm and unembedding run only from the first position whose logits
    are scored. Where skipping the prefix is not exact (block 0, shortformer positions) the blocks run
    from the embedding.
    """

    def __init__(self, model: HookedTransformer, data: Tokenized, start: int, batch_size: int) -> None:
        self.model, self.data, self.start = model, data, start
        self.pad = pad_token_id(model)
        self.enabled = start > 0 and model.cfg.positional_embedding_type != "shortformer"
        self.resid: list[Tensor] = []
        if not self.enabled:
            return
        lengths = [len(s) for s in data.sequences]
        rows: dict[int, Tensor] = {}
        with torch.no_grad():
            for idx in batches(lengths, max(batch_size, 16), max_batch_tokens(model)):
                tokens = pad_right([data.sequences[i] for i in idx], self.pad, model.cfg.device or "cpu")
                resid = model(tokens, stop_at_layer=start)
                for row, i in enumerate(idx):
                    rows[i] = resid[row, : lengths[i]].clone()
        self.resid = [rows[i] for i in range(len(data))]

    def logits(
        self, idx: Sequence[int], tokens: Int[Tensor, "batch pos"], first: int
    ) -> Float[Tensor, "batch pos_from_first vocab"]:
        """The logits at positions ``first ..`` of the padded batch ``tokens`` (rows ``idx`` of the data)."""
        model, n_layers = self.model, self.model.cfg.n_layers
        if self.enabled:
            width = tokens.shape[1]
            resid = self.resid[idx[0]].new_zeros(len(idx), width, self.resid[idx[0]].shape[-1])
            for row, i in enumerate(idx):
                resid[row, : self.resid[i].shape[0]] = self.resid[i]
            final = model(resid, start_at_layer=self.start, stop_at_layer=n_layers)
        else:
            final = model(tokens, stop_at_layer=n_layers)
        final = final[:, first:]
        if model.cfg.normalization_type is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)
        cap = float(getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0)
        return cap * torch.tanh(logits / cap) if cap > 0 else logits


def _train(
    model: HookedTransformer,
    pairs: Sequence[ContrastivePair],
    layer: int,
    form: str,
    *,
    objective: str,
    positions: PositionsLike,
    progress: bool,
    chat: bool,
    **options: Any,
) -> tuple[Intervention, pd.DataFrame]:
    if not isinstance(model, HookedTransformer):
        raise TypeError(f"expected a HookedTransformer, got {type(model).__name__}")
    items = check_pairs(pairs)
    opts = _check_options(model, len(items), layer, form, options)
    n = len(items)
    data = tokenize_completions(
        model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items], chat=chat
    )
    iv = _new_intervention(model, layer, form, opts["rank"], opts["seed"], positions)
    iv.check(model)

    # Examples: (pair, sign). Row 2k of a batch is the completion to prefer, row 2k+1 the other one.
    examples = [(i, 1) for i in range(n)] + ([(i, -1) for i in range(n)] if opts["add_subtract"] else [])
    bs = opts["batch_size"]
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = steps_per_epoch * opts["epochs"]
    grid = torch.tensor(opts["m_grid"], dtype=torch.float64)
    g = torch.Generator().manual_seed(opts["seed"])
    params: list[Tensor] = list(iv.tensors().values())
    dtype = params[0].dtype
    device = model.cfg.device or "cpu"
    lengths = [len(s) for s in data.sequences]

    flags = [(w, w.requires_grad) for w in model.parameters()]
    was_training = model.training
    history: list[dict[str, float]] = []
    epochs_run = 0
    started = time.perf_counter()
    try:
        for w, _ in flags:
            w.requires_grad_(False)
        model.eval()
        prefix = _Prefix(model, data, iv.first_layer(model.cfg.n_layers), bs)
        for t in params:
            t.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        best, bad_epochs = math.inf, 0
        bar = tqdm(total=total, disable=not progress, desc=f"{objective} {form} L{layer}", leave=False)
        with bar, torch.enable_grad():
            for epoch in range(opts["epochs"]):
                order = torch.randperm(len(examples), generator=g).tolist()
                m_draw = grid[torch.randint(len(grid), (len(examples),), generator=g)]
                epoch_losses = []
                for b in range(steps_per_epoch):
                    chosen = order[b * bs : (b + 1) * bs]
                    seqs, m_rows = [], []
                    for k in chosen:
                        i, sign = examples[k]
                        first, second = (i, n + i) if sign > 0 else (n + i, i)
                        seqs += [first, second]
                        m_rows += [sign * float(m_draw[k])] * 2
                    row = _step(
                        model,
                        iv,
                        prefix,
                        data,
                        seqs,
                        torch.tensor(m_rows, dtype=dtype, device=device),
                        lengths,
                        params,
                        optimizer,
                        opts,
                    )
                    lr_used = float(schedule.get_last_lr()[0])
                    schedule.step()
                    row.update(epoch=epoch, step=len(history), lr=lr_used)
                    history.append(row)
                    epoch_losses.append(row["loss"])
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{row['loss']:.3f}",
                        L_p=f"{row['L_p']:.3f}",
                        L_n=f"{row['L_n']:.3f}",
                        hinge=f"{row['hinge']:.3f}",
                    )
                epochs_run = epoch + 1
                epoch_loss = sum(epoch_losses) / len(epoch_losses)
                if epoch_loss < best - 1e-6:
                    best, bad_epochs = epoch_loss, 0
                else:
                    bad_epochs += 1
                patience = opts["early_stop_patience"]
                if patience is not None and bad_epochs >= patience:
                    break
    finally:
        for t in params:
            t.requires_grad_(False)
            t.grad = None
        for w, flag in flags:
            w.requires_grad_(flag)
        model.train(was_training)

    iv.method = objective
    iv.info = {
        "form": form,
        "layer": layer,
        "objective": objective,
        "n_pairs": n,
        "m_grid": list(opts["m_grid"]),
        "m_typical": float(statistics.median(opts["m_grid"])),
        "lambda_p": opts["lambda_p"],
        "lambda_n": opts["lambda_n"],
        "gamma": opts["gamma"],
        "theta": opts["theta"],
        "lr": opts["lr"],
        "epochs": opts["epochs"],
        "epochs_run": epochs_run,
        "batch_size": bs,
        "add_subtract": opts["add_subtract"],
        "rank": opts["rank"] if form == "lora" else None,
        "seed": opts["seed"],
        "chat": chat,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    frame = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    return iv, frame


def _step(
    model: HookedTransformer,
    iv: Intervention,
    prefix: _Prefix,
    data: Tokenized,
    seqs: list[int],
    m_rows: Tensor,
    lengths: list[int],
    params: list[Tensor],
    optimizer: torch.optim.Optimizer,
    opts: dict[str, Any],
) -> dict[str, float]:
    device = m_rows.device
    tokens = pad_right([data.sequences[i] for i in seqs], prefix.pad, device)
    starts = torch.as_tensor([data.starts[i] for i in seqs], device=device)
    lens = torch.as_tensor([lengths[i] for i in seqs], device=device)
    hooks = iv.row_hooks(m_rows, n_layers=model.cfg.n_layers)
    with ExitStack() as stack:
        stack.enter_context(prompt_boundary(starts))
        stack.enter_context(model.hooks(fwd_hooks=hooks))  # type: ignore[arg-type]
        # Logits from the position before the earliest completion token of the batch on.
        first = int(starts.min()) - 1
        logits = prefix.logits(seqs, tokens, first)
    nll = nll_from_logits(logits, tokens[:, first:], starts - first, lens - first)
    l_first, l_second = nll[0::2], nll[1::2]
    margin = l_second - l_first
    hinge = torch.relu(opts["theta"] - margin)
    loss = (opts["lambda_p"] * l_first + opts["lambda_n"] * l_second + opts["gamma"] * hinge).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return {
        "loss": float(loss.detach()),
        "L_p": float(l_first.detach().mean()),
        "L_n": float(l_second.detach().mean()),
        "hinge": float(hinge.detach().mean()),
        "pref": float(margin.detach().mean()),
        "grad_norm": float(grad_norm),
    }


__all__ = ["split", "sft", "DEFAULTS", "FORMS"]
