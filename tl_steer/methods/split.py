"""SPLIT (Steering with Preference-Utility Intervention) and its SFT baseline (docs/methods.md, section 5).

One trainer learns one intervention at one layer, the model frozen, in one of three forms that differ only
in which term of the weight update ``h_out = (W + m dW) h_in + (b + m db)`` is learned (docs/methods.md,
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

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_steer.config import resolve
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.freezing import frozen, trainable
from tl_steer.hosts import Host, check_host
from tl_steer.interventions import AddVector, Intervention
from tl_steer.methods.split_config import DEFAULTS, FORMS, PUBLISHED_THETA, Form, SplitConfig
from tl_steer.models import model_identity
from tl_steer.module_delta import LocalWeight, LoRA
from tl_steer.positions import PositionsLike, prompt_boundary
from tl_steer.prefix import PrefixCache
from tl_steer.scoring import (
    Tokenized,
    nll_from_logits,
    pad_right,
    tokenize_completions,
)

HISTORY_COLUMNS = ("epoch", "step", "loss", "L_p", "L_n", "hinge", "pref", "lr", "grad_norm")


def split(
    model: Host,
    pairs: Sequence[ContrastivePair],
    layer: int,
    form: Form = "vector",
    *,
    lambda_p: float = 1.0,
    lambda_n: float = 0.5,
    gamma: float = 5.0,
    theta: float = 2.0,
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
    config: SplitConfig | None = None,
) -> tuple[Intervention, pd.DataFrame]:
    """Train a steering intervention at ``layer`` with the SPLIT objective; the model stays frozen.

    Args:
        model: a HookedTransformer; its weights are frozen during training and bit-identical afterwards.
        pairs: contrastive pairs ``(prompt, positive, negative)``; at least ``batch_size`` of them.
        layer: the block to steer: its residual output (vector) or its MLP down-projection (LoRA, local weight).
        form: ``"vector"``, ``"lora"`` or ``"local_weight"``.
        lambda_p, lambda_n, gamma, theta: the loss weights and margin (published: 1, 0.3..0.6, 3.5..8, 0.3..0.6;
            theta's default is 2, see below).
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
        config: the loss weights and training settings as one :class:`SplitConfig` instead of the
            keywords lambda_p .. weight_decay (which must then keep their defaults).

    Returns:
        ``(intervention, history)``: the trained :class:`AddVector`, :class:`LoRA` or :class:`LocalWeight`
        (``method`` "split", the settings in ``info``; its ``unit`` is the median of the grid, so m = 1
        applies it at the strength it was trained for),
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
    (``m v`` about 55 at the median raw strength 11), the held-out PrefOdds rose from 0.43 at m = 0 to
    1.05 at raw strength 11 (m = 1) and 0.98 at raw 20 with UtilOdds at or above its clean value; with
    the grid 0.2..2 instead the vector learned ten times more slowly per step (norm 7.6, PrefOdds 1.06 at
    raw 2, training loss 5.2 against 4.4). The grid is in raw strengths (the factor of ``db``, ``dW``);
    the intervention's ``unit`` is its median, so ``m = 1`` is the median raw strength (11 for the vector,
    1.1 for LoRA and local weight by default) and ``m = r`` is r times it.

    The margin theta is on the scale of L, the mean NLL per completion token; its default is 2, not the
    published 0.5 (:data:`PUBLISHED_THETA`, one argument away). On the built-in concepts
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
        config=resolve(
            config,
            SplitConfig(
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
            ),
        ),
        positions=positions,
        progress=progress,
        chat=chat,
    )


def sft(
    model: Host,
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
    config: SplitConfig | None = None,
) -> tuple[Intervention, pd.DataFrame]:
    """The SFT baseline of :func:`split`: the same trainer with ``lambda_p = 1``, ``lambda_n = 0``,
    ``gamma = 0``, i.e. it only lowers the NLL of the positive completion at strength m (of the negative
    one at -m with ``add_subtract``). Arguments and result as in :func:`split` (``method`` is "sft"); a
    ``config`` gives the training settings, its loss weights are replaced by SFT's."""
    return _train(
        model,
        pairs,
        layer,
        form,
        objective="sft",
        config=resolve(
            config,
            SplitConfig(
                lr=lr,
                epochs=epochs,
                batch_size=batch_size,
                m_grid=m_grid,
                add_subtract=add_subtract,
                rank=rank,
                seed=seed,
                early_stop_patience=early_stop_patience,
                weight_decay=weight_decay,
            ),
        ).for_sft(),
        positions=positions,
        progress=progress,
        chat=chat,
    )


# ----- the trainer ---------------------------------------------------------------------------------------
def _new_intervention(
    model: Host, layer: int, form: str, rank: int, seed: int, positions: PositionsLike
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


def _train(
    model: Host,
    pairs: Sequence[ContrastivePair],
    layer: int,
    form: str,
    *,
    objective: str,
    positions: PositionsLike,
    progress: bool,
    chat: bool,
    config: SplitConfig,
) -> tuple[Intervention, pd.DataFrame]:
    check_host(model)
    items = check_pairs(pairs)
    cfg = config.checked(model, len(items), layer, form)
    assert cfg.lr is not None and cfg.m_grid is not None  # filled in by checked()
    n = len(items)
    data = tokenize_completions(
        model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items], chat=chat
    )
    iv = _new_intervention(model, layer, form, cfg.rank, cfg.seed, positions)
    iv.check(model)

    # Examples: (pair, sign). Row 2k of a batch is the completion to prefer, row 2k+1 the other one.
    examples = [(i, 1) for i in range(n)] + ([(i, -1) for i in range(n)] if cfg.add_subtract else [])
    bs = cfg.batch_size
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = steps_per_epoch * cfg.epochs
    grid = torch.tensor(cfg.m_grid, dtype=torch.float64)
    g = torch.Generator().manual_seed(cfg.seed)
    params: list[Tensor] = list(iv.tensors().values())
    dtype = params[0].dtype
    device = model.cfg.device or "cpu"
    lengths = [len(s) for s in data.sequences]

    history: list[dict[str, float]] = []
    epochs_run = 0
    started = time.perf_counter()
    # The model frozen and in eval mode, the intervention's tensors trainable; all restored afterwards.
    with frozen(model, eval_mode=True), trainable(params):
        prefix = PrefixCache(model, data, iv.first_layer(model.cfg.n_layers), bs)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
        best, bad_epochs = math.inf, 0
        bar = tqdm(total=total, disable=not progress, desc=f"{objective} {form} L{layer}", leave=False)
        with bar, torch.enable_grad():
            for epoch in range(cfg.epochs):
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
                        cfg,
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
                patience = cfg.early_stop_patience
                if patience is not None and bad_epochs >= patience:
                    break

    iv.method = objective
    iv.info = {
        "form": form,
        "layer": layer,
        "objective": objective,
        "n_pairs": n,
        "m_grid": list(cfg.m_grid),
        "lambda_p": cfg.lambda_p,
        "lambda_n": cfg.lambda_n,
        "gamma": cfg.gamma,
        "theta": cfg.theta,
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "epochs_run": epochs_run,
        "batch_size": bs,
        "add_subtract": cfg.add_subtract,
        "rank": cfg.rank if form == "lora" else None,
        "seed": cfg.seed,
        "chat": chat,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    # Trained at raw strengths drawn from the grid (unit 1 while training); m = 1 is now the grid's median.
    iv.unit = float(statistics.median(cfg.m_grid))
    frame = pd.DataFrame(history, columns=list(HISTORY_COLUMNS))
    return iv, frame


def _step(
    model: Host,
    iv: Intervention,
    prefix: PrefixCache,
    data: Tokenized,
    seqs: list[int],
    m_rows: Tensor,
    lengths: list[int],
    params: list[Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: SplitConfig,
) -> dict[str, float]:
    device = m_rows.device
    tokens = pad_right([data.sequences[i] for i in seqs], prefix.pad, device)
    starts = torch.as_tensor([data.starts[i] for i in seqs], device=device)
    lens = torch.as_tensor([lengths[i] for i in seqs], device=device)
    hooks = iv.row_hooks(m_rows, model=model)
    with ExitStack() as stack:
        stack.enter_context(prompt_boundary(starts))
        stack.enter_context(model.hooks(fwd_hooks=hooks))  # type: ignore[arg-type]
        # Logits from the position before the earliest completion token of the batch on.
        first = int(starts.min()) - 1
        logits = prefix.logits(seqs, tokens, first)
    nll = nll_from_logits(logits, tokens[:, first:], starts - first, lens - first)
    l_first, l_second = nll[0::2], nll[1::2]
    margin = l_second - l_first
    hinge = torch.relu(cfg.theta - margin)
    loss = (cfg.lambda_p * l_first + cfg.lambda_n * l_second + cfg.gamma * hinge).mean()
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


__all__ = ["split", "sft", "DEFAULTS", "FORMS", "PUBLISHED_THETA", "Form", "SplitConfig"]
