"""Capability under steering: multiple-choice accuracy scored by the likelihood of each option's text.

Every option is scored as a completion of the question (teacher-forced, prompt masked; see
:mod:`tl_steer.scoring`), and the model's choice is the option with the lowest NLL. Nothing is parsed from
generated text, so a format failure under steering is never counted as knowledge lost (docs/methods.md,
section 8). The prompt is::

    [instruction]\\n            (only with ``instruction``: the prompting baseline)
    Question: {question}
    Answer:

and the completion of option ``o`` is ``" " + o``. With ``chat=True`` that prompt is the user turn of the
tokenizer's chat template and the completion is ``o`` after the assistant header.

``normalize="mean"`` (the default) compares the mean NLL per completion token, so a long option is not
penalised for its length; ``"sum"`` compares the total NLL (the log-probability of the whole option).

Measured on the default model (SmolLM2-135M-Instruct, float32, unsteered) with the built-in ``general`` set
(265 four-option items, chance 0.25), accuracy when choosing by mean / summed NLL. The first row is the
format used here: the best by sum, and by mean within noise of the best (95% bootstrap interval of its
mean-NLL accuracy: 0.54 to 0.66)::

    prompt (completion " {option}" unless chat)             mean    sum
    "Question: {q}\nAnswer:"                                 0.604   0.649
    "Question: {q}\n\nAnswer:"                               0.611   0.630
    "Q: {q}\nA:"                                             0.600   0.630
    "{q}\nAnswer:"                                           0.566   0.608
    "{q}"                                                    0.551   0.619
    "<|endoftext|>Question: {q}\nAnswer:"                    0.577   0.645
    "Question: {q}\nOptions:\n- {o1}\n...\nAnswer:"          0.321   0.328
    chat template, user turn "{q}", completion "{option}"    0.517   0.619
    chat template, user turn "{q}\nOptions:\n- {o1}\n..."    0.340   0.392

Listing the options in the prompt brings this model close to chance. Summing
was ahead of the mean in every format (on the first row 24 items right only by sum, 12 only by mean;
binomial p = 0.07); the mean stays the default so that options of different token lengths compete on
equal terms, and ``normalize="sum"`` is there for the other convention.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.mc import MCItem, check_mc_items
from tl_steer.errors import ConfigError
from tl_steer.hookpoints import HookSite
from tl_steer.hosts import Host, is_bridge
from tl_steer.interventions import Intervention, InterventionsLike, as_intervention_list
from tl_steer.models import weights_version
from tl_steer.positions import prompt_boundary
from tl_steer.prefix import reusable_start
from tl_steer.scoring import (
    Tokenized,
    completion_nll,
    final_logprobs,
    nll_from_logits,
    pad_right,
    pad_token_id,
    tokenize_completions,
)
from tl_steer.steering import steer

Normalize = Literal["mean", "sum"]


def format_mc_prompt(item: MCItem, instruction: str | None = None) -> str:
    """The prompt an item is scored after: ``"Question: {question}\\nAnswer:"``, with ``instruction``
    and a newline in front when one is given."""
    prompt = f"Question: {item.question}\nAnswer:"
    return f"{instruction}\n{prompt}" if instruction else prompt


def mc_completions(item: MCItem) -> list[str]:
    """The completion scored for each option: the option text after a space."""
    return [f" {option}" for option in item.options]


def _check_options(normalize: object, batch_size: object, instruction: object, chat: object) -> None:
    if normalize not in ("mean", "sum"):
        raise ConfigError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if instruction is not None and not isinstance(instruction, str):
        raise ConfigError(f"instruction must be a string or None, got {type(instruction).__name__}")
    if not isinstance(chat, bool):
        raise ConfigError(f"chat must be True or False, got {chat!r}")


def mc_option_nll(
    model: Host,
    items: Sequence[MCItem],
    *,
    interventions: InterventionsLike = (),
    m: float | Sequence[float] = 1.0,
    instruction: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    normalize: Normalize = "mean",
    shared_prefix: bool = True,
    clean_prefix: MCCleanPrefix | None = None,
) -> Float[Tensor, "n n_options"]:
    """The NLL of every option of every item as a completion of the item's prompt (see the module
    docstring), with ``interventions`` applied at strength ``m``.

    With ``shared_prefix`` (the default) each question runs once and its options run on top of its keys and
    values (a KV cache), and the final norm and unembedding are computed only at the positions that predict a
    scored option token (:func:`_shared_prefix_nll`); ``shared_prefix=False`` runs every question + option
    as a full sequence, in padded batches of ``batch_size`` sequences (also used, whatever ``shared_prefix``,
    for shortformer models, hooks after the last block and positions given as a boolean mask; on a
    TransformerBridge the cache is Hugging Face's own). Both give the
    same NLL (to float rounding), steered or not: each token sees the same context at the same position, and
    the named position policies pick the same tokens. With ``shared_prefix``, ``batch_size`` counts questions.
    A ``clean_prefix`` (:class:`MCCleanPrefix`) shared by many calls on the same items also keeps the clean
    blocks before the intervention: each call then runs only the blocks from there (same NLL to float
    rounding).

    Returns float32 of shape [n_items, n_options] where n_options is the largest number of options of
    an item; the places of missing options of items with fewer hold ``inf``. ``normalize="mean"``: NLL
    per completion token; ``"sum"``: total NLL of the option.

    Raises:
        DataError: ``items`` is empty or holds something other than :class:`MCItem`.
        ConfigError: a bad ``normalize``, ``batch_size``, ``instruction``, ``chat`` or ``interventions``.
    """
    items = check_mc_items(items)
    _check_options(normalize, batch_size, instruction, chat)
    ivs = as_intervention_list(interventions)
    prompts: list[str] = []
    completions: list[str] = []
    for item in items:
        prompt = format_mc_prompt(item, instruction)
        options = mc_completions(item)
        prompts.extend([prompt] * len(options))
        completions.extend(options)
    if shared_prefix and _can_share(model, ivs):
        data = tokenize_completions(model, prompts, completions, chat=chat)
        groups = []
        at = 0
        for item in items:
            groups.append(list(range(at, at + len(item.options))))
            at += len(item.options)
        with ExitStack() as stack, torch.no_grad():
            if ivs:
                stack.enter_context(steer(model, *ivs, m=m))
            clean = clean_prefix if clean_prefix is not None and clean_prefix.applies(model, ivs) else None
            flat = _shared_prefix_nll(model, data, groups, normalize, batch_size, clean)
    else:
        flat = completion_nll(
            model,
            prompts,
            completions,
            interventions=ivs,
            m=m,
            reduction=normalize,
            batch_size=batch_size,
            chat=chat,
        )
    width = max(len(item.options) for item in items)
    out = torch.full((len(items), width), float("inf"), dtype=torch.float32)
    at = 0
    for row, item in enumerate(items):
        k = len(item.options)
        out[row, :k] = flat[at : at + k]
        at += k
    return out


def _can_share(model: Host, ivs: list[Intervention]) -> bool:
    """Whether the KV-cache path gives the full-sequence result: no shortformer positions (added inside
    attention, not cached as keys), every edited hook inside a block (the final norm and unembedding run on
    the scored positions only, so a hook there would see other positions), and no position given as a
    boolean mask (it indexes batch columns, which the shared path shifts, see :func:`_shared_prefix_nll`), and
    no kind whose change needs the whole input (:attr:`Intervention.needs_full_input`, COLD-FD): the options
    run as cached continuation steps. On a TransformerBridge the cache is Hugging Face's own
    (:func:`_bridge_shared_logprobs`), where its model's forward takes one and explicit positions."""
    if model.cfg.positional_embedding_type == "shortformer":
        return False
    if is_bridge(model):
        hf: Any = getattr(model, "original_model", None)  # the Hugging Face model the bridge wraps
        accepted = inspect.signature(hf.forward).parameters if hf is not None else {}
        if not {"past_key_values", "position_ids", "attention_mask"} <= set(accepted):
            return False
    if any(iv.positions.kind == "mask" or iv.needs_full_input for iv in ivs):
        return False
    return all(HookSite.parse(name).layer is not None for iv in ivs for name in iv.hook_names)


def _kv_cache(model: Host, batch: int) -> Any:
    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as Cache
    except ImportError:  # TransformerLens 2.x
        from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]
            HookedTransformerKeyValueCache as Cache,
        )
    return Cache.init_cache(model.cfg, model.cfg.device, batch)


def _expand_cache(cache: Any, rows: Int[Tensor, " rows"]) -> Any:
    """The cache with row ``rows[r]`` of the original as its row r (each question's keys and values once per
    option), frozen: the options' own keys and values are not kept."""
    for entry in cache.entries:
        entry.past_keys = entry.past_keys.index_select(0, rows.to(entry.past_keys.device))
        entry.past_values = entry.past_values.index_select(0, rows.to(entry.past_values.device))
    mask = cache.previous_attention_mask
    cache.previous_attention_mask = mask.index_select(0, rows.to(mask.device))
    cache.freeze()
    return cache


def _bridge_shared_logprobs(
    model: Host,
    head: Int[Tensor, "q width"],
    head_mask: Int[Tensor, "q width"],
    cs: list[int],
    owner: Int[Tensor, " rows"],
    tokens: Int[Tensor, "rows pos"],
    boundaries: tuple[Tensor, Tensor],
    rows: list[int],
    cols: list[int],
) -> Float[Tensor, "scored vocab"]:
    """The two passes of :func:`_shared_prefix_nll` on a TransformerBridge, through Hugging Face's own KV
    cache (a ``DynamicCache``; the bridge takes no TransformerLens cache): the question pass computes the
    logits of its last column only (``logits_to_keep=1``, nothing reads them), the cache is copied to one row
    per option (``batch_select_indices``), and the option pass gets the question's mask and its positions
    ``C_q + j`` explicitly (HookedTransformer numbers them by the mask). Log-probabilities at (rows[i],
    cols[i]) of the option pass's logits."""
    from transformers import DynamicCache

    hf: Any = getattr(model, "original_model")  # noqa: B009 - the bridge's Hugging Face model, typed Any
    try:
        cache = DynamicCache(config=hf.config)  # sliding-window layers (Gemma 2, Mistral) need the config
    except TypeError:  # an older transformers
        cache = DynamicCache()
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}
    with prompt_boundary(boundaries[0]):
        model(head, attention_mask=head_mask, past_key_values=cache, use_cache=True, **keep)
    index = owner.to(head.device)
    cache.batch_select_indices(index)  # row k: the keys and values of option k's question
    mask = torch.cat([head_mask[index], torch.ones_like(tokens)], dim=1)
    positions = torch.as_tensor(cs, device=tokens.device)[owner.to(tokens.device)][:, None]
    positions = positions + torch.arange(tokens.shape[1], device=tokens.device)[None]
    with prompt_boundary(boundaries[1]):
        logits = model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True, position_ids=positions)
    device = logits.device
    picked = logits[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)]
    return torch.log_softmax(picked.float(), dim=-1)


def restart_layer(iv: Intervention, n_layers: int) -> int:
    """The latest block a KV-cached pass steered by ``iv`` may restart at: its first edited block, or the
    block whose attention scores tell a hook its cache offset (:meth:`HookSite.offset_source`; one block
    earlier for a hook before attention), so that position policies still see where the options sit."""
    out = iv.first_layer(n_layers)
    for name in iv.hook_names:
        source = HookSite.parse(name).offset_source(n_layers)
        if source is not None:
            layer = HookSite.parse(source).layer
            out = min(out, layer if layer is not None else out)
    return out


class MCCleanPrefix:
    """The clean residual entering block ``start`` of the question and option passes of
    :func:`mc_option_nll`'s shared-prefix scoring, kept per chunk of questions, so that every later scoring
    of the same items whose interventions first edit block ``start`` or later runs only the blocks from
    ``start`` on (:mod:`tl_steer.prefix`: nothing before that block can change).

    Give one to :func:`mc_accuracy` / :func:`mc_option_nll` (``clean_prefix=``) or
    :func:`~tl_steer.capability_behavior_gap` when the same items are scored under many interventions or
    strengths at one layer; :func:`~tl_steer.capability_behavior_gap` makes one for its own conditions. The
    residuals are computed the first time a chunk is scored and hold for this model as it is then: they are
    dropped if any of its parameters changes in place afterwards, and no other hook should edit a block
    before ``start`` while they are in use. On hosts that cannot restart (a TransformerBridge, shortformer
    positions) or with ``start`` outside ``1 .. n_layers - 1`` it is inert: every pass runs from the
    embedding.
    """

    def __init__(self, model: Host, start: int) -> None:
        self.model = model
        self.start = reusable_start(model, int(start))
        self._chunks: dict[bytes, tuple[Tensor, Tensor]] = {}
        self._version = self._weights_version()

    @classmethod
    def for_interventions(cls, model: Host, ivs: Sequence[Intervention | None]) -> MCCleanPrefix | None:
        """One that serves every intervention of ``ivs`` (starting at their earliest :func:`restart_layer`;
        ``None`` entries are unsteered conditions), or None when there is none."""
        layers = [restart_layer(iv, model.cfg.n_layers) for iv in ivs if iv is not None]
        return cls(model, min(layers)) if layers else None

    def _weights_version(self) -> int:
        return weights_version(self.model)

    def applies(self, model: Host, ivs: Sequence[Intervention]) -> bool:
        """Whether scoring ``model`` under ``ivs`` may restart at :attr:`start`: the same model, a restart
        possible, and every intervention's :func:`restart_layer` at ``start`` or later."""
        if model is not self.model or self.start is None:
            return False
        return all(restart_layer(iv, model.cfg.n_layers) >= self.start for iv in ivs)

    def residuals(
        self,
        head: Int[Tensor, "q width"],
        head_mask: Int[Tensor, "q width"],
        owner: Int[Tensor, " rows"],
        tokens: Int[Tensor, "rows pos"],
    ) -> tuple[Float[Tensor, "q width d_model"], Float[Tensor, "rows pos d_model"]]:
        """(question residual, option residual) entering block ``start`` for one chunk: the two passes of
        :func:`_shared_prefix_nll` up to that block, on a KV cache of blocks ``0 .. start - 1``."""
        assert self.start is not None
        version = self._weights_version()
        if version != self._version:  # weights edited in place: nothing kept is the clean model's any more
            self._chunks.clear()
            self._version = version
        key = b"|".join(
            t.cpu().numpy().tobytes() + str(tuple(t.shape)).encode() for t in (head, head_mask, owner, tokens)
        )
        if key not in self._chunks:
            # no position policy reads these blocks: the steering hooks sit at ``start`` or later
            self._chunks[key] = _cached_passes(self.model, head, head_mask, owner, tokens, stop=self.start)
        return self._chunks[key]


def _cached_passes(
    model: Host,
    head: Tensor,
    head_mask: Int[Tensor, "q width"],
    owner: Int[Tensor, " rows"],
    tail: Tensor,
    *,
    stop: int,
    start: int | None = None,
    boundaries: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The two passes of :func:`_shared_prefix_nll` on a HookedTransformer, up to block ``stop``: the
    questions ``head`` (tokens, or with ``start`` their residual entering that block) on a fresh KV cache,
    then the options ``tail`` on top of it, one cache row per option (``owner``). Returns both passes'
    outputs. ``boundaries`` declares the prompt boundary of each pass for position policies."""
    cache = _kv_cache(model, head.shape[0])
    out: list[Tensor] = []
    for x, mask, rows in ((head, head_mask, None), (tail, torch.ones(tail.shape[:2], dtype=torch.long), owner)):
        if rows is not None:
            cache = _expand_cache(cache, rows)
        mask = mask.to(x.device)
        kwargs: dict[str, Any] = {"past_kv_cache": cache, "stop_at_layer": stop}
        if start is None:
            kwargs["attention_mask"] = mask
        else:  # the mask a pass from the embedding would give its blocks (input_to_embed appends it)
            kwargs |= {"start_at_layer": start, "attention_mask": cache.append_attention_mask(mask)}
        with prompt_boundary(boundaries[len(out)]) if boundaries is not None else nullcontext():
            out.append(model(x, **kwargs))
    return out[0], out[1]


def _shared_prefix_nll(
    model: Host,
    data: Tokenized,
    groups: list[list[int]],
    normalize: Normalize,
    batch_size: int,
    clean: MCCleanPrefix | None = None,
) -> Float[Tensor, " n"]:
    """Completion NLL of every row of ``data`` where the rows of each group (one question's options) share
    their prompt. Per chunk of ``batch_size`` questions, two forward passes:

    1. the questions: the tokens of question q before ``C_q = min(start) - 1``, right-padded to the chunk's
       longest ``C``, with an attention mask that hides the padding; keys and values are kept (KV cache);
    2. the options: the tokens of each option from ``C_q`` on, on top of its question's cached keys and
       values (one cache row per option). The mask keeps the question's padding hidden, so every real
       token attends to exactly the tokens it attends to in the full sequence, at the same positions
       (TransformerLens numbers positions by the mask).

    Only the positions ``start - 1 .. len - 2`` of each option (those that predict its tokens) go through the
    final norm and unembedding. A steering hook sees the batch's columns: the prompt boundary of each option
    row is declared in columns (``start + padding``), so the named position policies pick the same tokens
    as in the full sequence. Few passes matter: TransformerLens copies its weights in every forward call.
    """
    device = model.cfg.device or "cpu"
    n_layers = model.cfg.n_layers
    pad = pad_token_id(model)
    out = torch.empty(len(data), dtype=torch.float32)
    keyed = sorted(groups, key=lambda q: min(data.starts[r] for r in q))
    for at in range(0, len(keyed), batch_size):
        chunk = keyed[at : at + batch_size]
        cs = [min(data.starts[r] for r in q) - 1 for q in chunk]
        if min(cs) < 1:  # a one-token prompt: nothing to share, and an all-padding question row is undefined
            for q in chunk:
                out[torch.as_tensor(q)] = _full_nll(model, data, q, normalize)
            continue
        width = max(cs)
        rows = [r for q in chunk for r in q]
        owner = [k for k, q in enumerate(chunk) for _ in q]
        head = pad_right([data.sequences[q[0]][:c] for q, c in zip(chunk, cs, strict=True)], pad, device)
        head_mask = (torch.arange(width)[None] < torch.as_tensor(cs)[:, None]).long().to(device)
        owner_t = torch.as_tensor(owner, dtype=torch.long)
        # Every real position of the question pass is a prompt position of each of its options.
        head_boundary = torch.as_tensor([c + 1 for c in cs])
        shift = [width - cs[owner[k]] for k in range(len(rows))]  # column = position + shift in pass 2
        tokens = pad_right([data.sequences[r][cs[owner[k]] :] for k, r in enumerate(rows)], pad, device)
        boundary = torch.as_tensor([data.starts[r] + shift[k] for k, r in enumerate(rows)])
        # Position p of option k (relative to its question's C) predicts its token p + 1.
        sel_rows, sel_cols, target, which = [], [], [], []
        for k, r in enumerate(rows):
            seq, c = data.sequences[r], cs[owner[k]]
            for p in range(data.starts[r] - 1, len(seq) - 1):
                sel_rows.append(k)
                sel_cols.append(p - c)
                target.append(seq[p + 1])
                which.append(k)
        if is_bridge(model):
            logprobs = _bridge_shared_logprobs(
                model, head, head_mask, cs, owner_t, tokens, (head_boundary, boundary), sel_rows, sel_cols
            )
        else:
            bounds = (head_boundary, boundary)
            if clean is not None:
                # the clean blocks before ``clean.start`` ran once for these items: only the blocks from there run
                resid_q, resid_o = clean.residuals(head, head_mask, owner_t, tokens)
                _, final = _cached_passes(
                    model, resid_q, head_mask, owner_t, resid_o, stop=n_layers, start=clean.start, boundaries=bounds
                )
            else:
                _, final = _cached_passes(model, head, head_mask, owner_t, tokens, stop=n_layers, boundaries=bounds)
            logprobs = final_logprobs(model, final, sel_rows, sel_cols)
        token_lp = logprobs.gather(-1, torch.as_tensor(target, device=logprobs.device)[:, None])[:, 0].cpu()
        index = torch.as_tensor(which, dtype=torch.long)
        total = torch.zeros(len(rows), dtype=torch.float32).index_add_(0, index, -token_lp)
        count = torch.zeros(len(rows), dtype=torch.float32).index_add_(0, index, torch.ones_like(token_lp))
        out[torch.as_tensor(rows)] = total if normalize == "sum" else total / count
    return out


def _full_nll(model: Host, data: Tokenized, rows: list[int], normalize: Normalize) -> Float[Tensor, " k"]:
    """NLL of ``rows`` of ``data`` from full sequences in one pass (the fallback of :func:`_shared_prefix_nll`)."""
    tokens = pad_right([data.sequences[r] for r in rows], pad_token_id(model), model.cfg.device or "cpu")
    starts = torch.as_tensor([data.starts[r] for r in rows], device=tokens.device)
    lens = torch.as_tensor([len(data.sequences[r]) for r in rows], device=tokens.device)
    with prompt_boundary(starts):
        logits = model(tokens)
    return nll_from_logits(logits, tokens, starts, lens, normalize).float().cpu()


@dataclass(frozen=True)
class MCResult:
    """Multiple-choice results of one condition.

    ``nll``: per-option NLL [n, n_options]; ``chosen``: index of the lowest-NLL option (the first one on
    an exact tie); ``answer``: the gold index; ``correct``: the gold option has the lowest NLL and no other
    option ties it; ``accuracy``: the share of correct items.
    """

    nll: Float[Tensor, "n n_options"]
    chosen: Int[Tensor, " n"]
    answer: Int[Tensor, " n"]
    correct: Bool[Tensor, " n"]
    normalize: str
    accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "accuracy", float(self.correct.float().mean()))

    def __len__(self) -> int:
        return int(self.correct.numel())

    def ci(self, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
        """Percentile-bootstrap confidence interval of the accuracy."""
        return bootstrap_ci(self.correct.double().numpy(), seed=seed, level=level)

    def items(self) -> pd.DataFrame:
        """One row per item: item, answer, chosen, correct, and the NLL of each option (nll_0, nll_1, ..)."""
        nll = self.nll.detach().double().cpu().numpy()
        frame = pd.DataFrame(
            {
                "item": np.arange(len(self)),
                "answer": self.answer.cpu().numpy(),
                "chosen": self.chosen.cpu().numpy(),
                "correct": self.correct.cpu().numpy(),
            }
        )
        for k in range(nll.shape[1]):
            frame[f"nll_{k}"] = nll[:, k]  # inf where an item has fewer options
        return frame

    def summary(self, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
        """One row: n, accuracy with its bootstrap CI (accuracy_low, accuracy_high), normalize."""
        low, high = self.ci(level, seed)
        row = {"n": len(self), "accuracy": self.accuracy, "accuracy_low": low, "accuracy_high": high}
        return pd.DataFrame([{**row, "normalize": self.normalize}])

    def to_csv(self, path: str | Path, summary: bool = False) -> Path:
        """Write the per-item table (or, with ``summary=True``, the one-row summary) as CSV."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.summary() if summary else self.items()).to_csv(path, index=False)
        return path

    def plot(self, path: str | Path | None = None, *, title: str | None = None) -> Any:
        """The accuracy with its 95% bootstrap CI, against chance (1 / number of options)."""
        from tl_steer.analysis.plots import _pyplot, finish_figure

        plt = _pyplot()
        row = self.summary().iloc[0]
        n_options = torch.isfinite(self.nll).sum(-1).double()
        chance = float((1.0 / n_options).mean())
        fig, ax = plt.subplots(figsize=(3.6, 3.6), dpi=120)
        ax.bar([0], [row["accuracy"]], width=0.5, color="#4c72b0")
        ax.errorbar(
            [0],
            [row["accuracy"]],
            yerr=[[row["accuracy"] - row["accuracy_low"]], [row["accuracy_high"] - row["accuracy"]]],
            color="black",
            capsize=6,
        )
        ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.2f})")
        ax.set_xticks([0], [f"n = {len(self)}"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("multiple-choice accuracy")
        ax.set_title(title or "Accuracy [95% CI]")
        ax.legend(fontsize=7)
        return finish_figure(fig, path, "Bar: share of items whose gold option has the lowest NLL.")


def mc_result(nll: Float[Tensor, "n n_options"], answer: Int[Tensor, " n"], normalize: str = "mean") -> MCResult:
    """Choose the lowest-NLL option of each row of ``nll`` and score it against ``answer``."""
    chosen = nll.argmin(dim=-1)
    gold = nll.gather(-1, answer[:, None])[:, 0]
    others = nll.scatter(-1, answer[:, None], float("inf"))
    correct = gold < others.min(dim=-1).values
    return MCResult(nll=nll, chosen=chosen, answer=answer, correct=correct, normalize=normalize)


def mc_accuracy(
    model: Host,
    items: Sequence[MCItem],
    *,
    interventions: InterventionsLike = (),
    m: float | Sequence[float] = 1.0,
    instruction: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    normalize: Normalize = "mean",
    shared_prefix: bool = True,
    clean_prefix: MCCleanPrefix | None = None,
) -> MCResult:
    """Multiple-choice accuracy of ``model`` on ``items``, each answered by the option with the lowest
    NLL (mean per token by default, length-normalised; ``normalize="sum"`` for the total), with
    ``interventions`` at strength ``m`` and ``instruction`` prepended to every prompt (the prompting
    baseline). An exact tie for the lowest NLL counts as a miss. See :func:`mc_option_nll`.
    """
    items = check_mc_items(items)
    nll = mc_option_nll(
        model,
        items,
        interventions=interventions,
        m=m,
        instruction=instruction,
        chat=chat,
        batch_size=batch_size,
        normalize=normalize,
        shared_prefix=shared_prefix,
        clean_prefix=clean_prefix,
    )
    answer = torch.tensor([item.answer for item in items], dtype=torch.long)
    return mc_result(nll, answer, normalize)


__all__ = [
    "MCCleanPrefix",
    "MCResult",
    "format_mc_prompt",
    "mc_accuracy",
    "mc_completions",
    "mc_option_nll",
    "mc_result",
]
