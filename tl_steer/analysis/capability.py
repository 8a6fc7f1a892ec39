"""Capability under steering: multiple-choice accuracy scored by the likelihood of each option's text.

Every option is scored as a completion of the question (teacher-forced, prompt masked; see
:mod:`tl_steer.scoring`), and the model's choice is the option with the lowest NLL. Nothing is parsed from
generated text, so a format failure under steering is never counted as knowledge lost (methods.md
section 5). The prompt is::

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data.mc import MCItem, check_mc_items
from tl_steer.errors import ConfigError
from tl_steer.interventions import InterventionsLike, as_intervention_list
from tl_steer.scoring import completion_nll

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
    model: HookedTransformer,
    items: Sequence[MCItem],
    *,
    interventions: InterventionsLike = (),
    m: float | Sequence[float] = 1.0,
    instruction: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    normalize: Normalize = "mean",
) -> Float[Tensor, "n n_options"]:
    """The NLL of every option of every item as a completion of the item's prompt (see the module
    docstring), with ``interventions`` applied at strength ``m``; all options of all items go through in
    padded batches of ``batch_size`` sequences.

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


def mc_result(nll: Float[Tensor, "n n_options"], answer: Int[Tensor, " n"], normalize: str = "mean") -> MCResult:
    """Choose the lowest-NLL option of each row of ``nll`` and score it against ``answer``."""
    chosen = nll.argmin(dim=-1)
    gold = nll.gather(-1, answer[:, None])[:, 0]
    others = nll.scatter(-1, answer[:, None], float("inf"))
    correct = gold < others.min(dim=-1).values
    return MCResult(nll=nll, chosen=chosen, answer=answer, correct=correct, normalize=normalize)


def mc_accuracy(
    model: HookedTransformer,
    items: Sequence[MCItem],
    *,
    interventions: InterventionsLike = (),
    m: float | Sequence[float] = 1.0,
    instruction: str | None = None,
    chat: bool = False,
    batch_size: int = 16,
    normalize: Normalize = "mean",
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
    )
    answer = torch.tensor([item.answer for item in items], dtype=torch.long)
    return mc_result(nll, answer, normalize)


__all__ = ["MCResult", "format_mc_prompt", "mc_accuracy", "mc_completions", "mc_option_nll", "mc_result"]
