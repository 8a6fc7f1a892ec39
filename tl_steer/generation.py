"""Steered text: batched generation under every condition and strength, one table row per text.

A *condition* is one way of getting a behaviour (``tl_steer.Condition``): no steering, an instruction
prepended to every prompt (prompting), an intervention swept over m (steering), or both. ``generate``
runs every (condition, m) over every prompt, in left-padded batches with TransformerLens' KV cache, and
returns a pandas table. Left padding keeps each prompt flush against the first generated position, so the
"generated", "prompt" and "last_prompt" position policies mean the same thing for every row of a batch as
for a prompt run alone (positions are absolute and every row's prompt ends at the padded width); an
intervention with a boolean position *mask* is run one prompt at a time, since padding would shift the
absolute positions its mask names.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from tl_steer.analysis.gap import BASELINE, Condition
from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host, is_bridge
from tl_steer.interventions import Intervention, check_grid
from tl_steer.scoring import check_positive_int, format_prompt
from tl_steer.steering import steer

#: The columns of the table :func:`generate` returns, in order.
COLUMNS = (
    "condition",
    "m",
    "item",
    "prompt",
    "sample",
    "completion",
    "n_tokens",
    "stopped_at_eos",
)

ConditionsLike = Condition | Intervention | None | Sequence[Condition | Intervention | None]


def as_conditions(conditions: ConditionsLike) -> list[Condition]:
    """``conditions`` as a list of :class:`Condition`: ``None`` is no steering, an intervention is a
    condition named after its method, and a list holds any of these (each one condition)."""
    items: Any = [conditions] if conditions is None or isinstance(conditions, (Condition, Intervention)) else conditions
    if isinstance(items, (str, bytes)):
        raise ConfigError("conditions must be Condition or Intervention objects (or None), not a string")
    try:
        items = list(items)
    except TypeError as exc:
        raise ConfigError(
            f"conditions must be a Condition, an Intervention, None or a list of them, got {type(conditions).__name__}"
        ) from exc
    if not items:
        raise ConfigError("no conditions given; pass None for the clean model, an intervention, or Conditions")
    out: list[Condition] = []
    for i, item in enumerate(items):
        if item is None:
            out.append(Condition(BASELINE))
        elif isinstance(item, Intervention):
            out.append(Condition(item.method, item))
        elif isinstance(item, Condition):
            if item.intervention is not None and not isinstance(item.intervention, Intervention):
                raise ConfigError(f"condition {item.name!r}: its intervention is a {type(item.intervention).__name__}")
            if item.instruction is not None and not isinstance(item.instruction, str):
                raise ConfigError(f"condition {item.name!r}: its instruction must be a string or None")
            out.append(item)
        else:
            raise ConfigError(f"conditions[{i}] is a {type(item).__name__}, not a Condition, Intervention or None")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"condition names must be distinct; repeated: {repeated}. Name them with Condition(name, ...)"
        )
    return out


def check_prompts(prompts: object) -> list[str]:
    """``prompts`` as a non-empty list of non-blank strings, or a :class:`DataError` naming the bad one."""
    if isinstance(prompts, str):
        raise DataError("prompts must be a list of strings; wrap a single prompt in a list: [prompt]")
    try:
        items = list(prompts)  # type: ignore[call-overload]
    except TypeError as exc:
        raise DataError(f"prompts must be a list of strings, got {type(prompts).__name__}") from exc
    if not items:
        raise DataError("the list of prompts is empty; give at least one prompt")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise DataError(f"prompts[{i}] is a {type(p).__name__}, not a string")
        if not p.strip():
            raise DataError(f"prompts[{i}] is empty or only whitespace; give the text to continue")
    return items


def with_instruction(prompt: str, instruction: str | None) -> str:
    """The prompt a condition shows the model: the instruction, a newline, then the prompt (as
    ``capability_behavior_gap`` does for its prompting baseline)."""
    return f"{instruction}\n{prompt}" if instruction else prompt


@dataclass(frozen=True)
class _Plan:
    condition: Condition
    ms: list[float]
    texts: list[str]  # the formatted prompt of each item, as the model sees it
    lengths: list[int]  # its length in tokens


def _plan(
    model: Host, conds: list[Condition], prompts: list[str], grid: list[float], max_new: int, chat: bool
) -> list[_Plan]:
    """Everything checked before the first token is generated: interventions against the model, and every
    formatted prompt plus ``max_new_tokens`` against the context."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("generation needs a model with a tokenizer")
    plans = []
    for c in conds:
        if c.intervention is not None:
            c.intervention.check(model)
        ms = grid if c.ms is None else check_grid(c.ms, name=f"{c.name}.ms")
        ms = list(dict.fromkeys(ms)) if c.intervention is not None else [0.0]
        texts = [format_prompt(model, with_instruction(p, c.instruction), chat) for p in prompts]
        lengths = []
        for i, text in enumerate(texts):
            n = int(model.to_tokens(text, truncate=False).shape[-1])
            if n + max_new > model.cfg.n_ctx:
                raise DataError(
                    f"prompt {i} under condition {c.name!r} has {n} tokens; + max_new_tokens={max_new} = {n + max_new} "
                    f"positions, more than the model's context of {model.cfg.n_ctx}; shorten it or lower max_new_tokens"
                )
            lengths.append(n)
        plans.append(_Plan(c, ms, texts, lengths))
    return plans


def generate(
    model: Host,
    conditions: ConditionsLike,
    prompts: Sequence[str],
    ms: Sequence[float] = (1.0,),
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
    n_samples: int = 1,
    temperature: float = 1.0,
    chat: bool = False,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Generate a completion of every prompt under every condition and strength.

    Args:
        model: a HookedTransformer with a tokenizer.
        conditions: ``None`` (the clean model), an intervention, a :class:`tl_steer.Condition` (an
            intervention and/or an instruction prepended to every prompt), or a list of these.
        prompts: the texts to continue.
        ms: the strengths of every steering condition (a condition's own ``ms`` replaces it); a
            condition with no intervention runs once, at m = 0.
        max_new_tokens: the most tokens generated per text; a row stops earlier at the end-of-sequence token.
        do_sample: sample (at ``temperature``) instead of greedy decoding.
        seed: with ``do_sample``, each batch draws from ``torch.manual_seed(seed + batch index)``, so a run
            is reproducible and every condition and m sees the same random stream per batch.
        n_samples: completions per prompt (useful with ``do_sample``).
        chat: wrap each prompt in the tokenizer's chat template (after the instruction is prepended).
        batch_size: prompts generated together.

    Returns:
        A DataFrame with one row per (condition, m, prompt, sample) and the columns of :data:`COLUMNS`:
        ``item`` is the prompt's index, ``prompt`` the prompt as given (without the instruction),
        ``completion`` the generated text (the end-of-sequence token excluded), ``n_tokens`` its length in
        tokens and ``stopped_at_eos`` whether it ended at the end-of-sequence token.

    Raises:
        DataError: empty prompts, or a prompt whose length plus ``max_new_tokens`` exceeds the context.
        ConfigError: bad conditions or options; an intervention that does not fit the model. All before
            any token is generated.
    """
    prompt_list = check_prompts(prompts)
    conds = as_conditions(conditions)
    grid = check_grid(ms)
    max_new = check_positive_int("max_new_tokens", max_new_tokens)
    size = check_positive_int("batch_size", batch_size)
    samples = check_positive_int("n_samples", n_samples)
    if not isinstance(do_sample, bool) or not isinstance(chat, bool):
        raise ConfigError("do_sample and chat must be True or False")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
    plans = _plan(model, conds, prompt_list, grid, max_new, chat)

    rows: list[dict[str, Any]] = []
    for plan in plans:
        iv = plan.condition.intervention
        # A position mask names absolute positions, which left padding would shift: one prompt at a time.
        own_size = 1 if iv is not None and iv.positions.kind == "mask" or not left_padding_ok(model) else size
        jobs = [(i, s) for i in range(len(prompt_list)) for s in range(samples)]
        for m in plan.ms:
            for b, start in enumerate(range(0, len(jobs), own_size)):
                chunk = jobs[start : start + own_size]
                texts = [plan.texts[i] for i, _ in chunk]
                with contextlib.ExitStack() as stack:
                    if iv is not None and m != 0.0:
                        stack.enter_context(steer(model, iv, m=m))
                    completions = _generate_batch(
                        model,
                        texts,
                        max_new,
                        do_sample=do_sample,
                        seed=seed + b,
                        temperature=float(temperature),
                        use_cache=m == 0.0 or kv_cache_ok(iv),
                    )
                for (i, s), (text, n, eos) in zip(chunk, completions, strict=True):
                    rows.append(
                        {"condition": plan.condition.name, "m": m, "item": i, "prompt": prompt_list[i], "sample": s}
                        | {"completion": text, "n_tokens": n, "stopped_at_eos": eos}
                    )
    return pd.DataFrame(rows, columns=list(COLUMNS))


_PADDING_OK: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def left_padding_ok(model: Host) -> bool:
    """Whether a left-padded batch gives each row the logits it gets alone on ``model`` (checked once per
    model, with one forward pass of two 2-token rows, the first one padded).

    Always on a HookedTransformer. A TransformerLens 3.9 bridge computes the softmax of rotary attention
    (Llama, Qwen, ...) in float32 whatever the model's dtype: in a float64 model the padding mask's float64
    minimum becomes -inf there, the query rows of the pad positions (every key masked) become NaN, and the
    NaN reaches the real rows through the next layer's zero attention weights (0 * NaN). Where this check
    fails, :func:`generate` runs one prompt at a time (the same texts, slower); float32 and half-precision
    bridges pass it.
    """
    if not is_bridge(model):
        return True
    known = _PADDING_OK.get(model)
    if known is None:
        tokenizer = model.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        token = getattr(tokenizer, "bos_token_id", None)
        token = getattr(tokenizer, "eos_token_id", 0) if token is None else token
        if pad is None:
            known = True  # the bridge does not mask padding it cannot see; nothing to check
        else:
            device = model.cfg.device
            tokens = torch.tensor([[pad, token, token], [token, token, token]], device=device)
            mask = torch.tensor([[0, 1, 1], [1, 1, 1]], device=device)
            with torch.no_grad():
                logits = model(tokens, attention_mask=mask)
            known = bool(torch.isfinite(logits[:, -1]).all())
        _PADDING_OK[model] = known
    return known


def kv_cache_ok(iv: Intervention | None) -> bool:
    """Whether ``iv`` can steer the KV-cached continuation steps of generation. A kind whose change needs the
    whole input (:attr:`Intervention.needs_full_input`: COLD-FD's edit is a difference over the whole input,
    which a cached step does not hold) is generated with full forward passes under a policy that steers
    generated positions (slower, the same texts)."""
    if iv is None or not iv.needs_full_input:
        return True
    return iv.positions.kind in ("prompt", "last_prompt")


def _generate_batch(
    model: Host,
    texts: list[str],
    max_new: int,
    *,
    do_sample: bool,
    seed: int,
    temperature: float,
    use_cache: bool = True,
) -> list[tuple[str, int, bool]]:
    """(completion text, tokens before EOS, stopped at EOS) for each text, generated in one left-padded batch."""
    tokenizer = model.tokenizer
    assert tokenizer is not None
    eos = tokenizer.eos_token_id
    width = int(model.to_tokens(texts, padding_side="left", truncate=False).shape[-1])
    rng = torch.random.fork_rng(devices=[]) if do_sample else contextlib.nullcontext()
    with rng, torch.no_grad():
        if do_sample:
            torch.manual_seed(seed)
        out = model.generate(
            texts if len(texts) > 1 else texts[0],
            max_new_tokens=max_new,
            do_sample=do_sample,
            temperature=temperature,
            stop_at_eos=eos is not None,
            use_past_kv_cache=use_cache,
            padding_side="left",
            return_type="tokens",
            verbose=False,
        )
    assert isinstance(out, torch.Tensor)
    new = out[:, width:].tolist()
    results = []
    for row in new:
        n = row.index(eos) if eos is not None and eos in row else len(row)
        results.append((str(tokenizer.decode(row[:n])), n, n < len(row)))
    return results


def side_by_side(table: pd.DataFrame, *, width: int = 60) -> str:
    """The completions of a :func:`generate` table as plain text: per prompt, one line per (condition, m)."""
    lines = []
    for item, group in table.groupby("item", sort=True):
        lines.append(f"[{item}] {' '.join(str(group['prompt'].iloc[0]).split())}")
        for _, row in group.iterrows():
            text = " ".join(str(row["completion"]).split())
            if len(text) > width:
                text = text[: width - 3] + "..."
            label = row["condition"] if row["condition"] == BASELINE else f"{row['condition']} m={row['m']:g}"
            sample = f" #{row['sample']}" if table["sample"].max() > 0 else ""
            lines.append(f"  {label}{sample}: {text}")
    return "\n".join(lines)
