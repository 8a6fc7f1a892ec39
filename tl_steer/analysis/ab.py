"""A/B behaviour evaluation: is the behaviour-matching answer letter the more probable next token?

Each item is formatted by :func:`tl_steer.data.ab.format_ab_prompt` (question, "(A) ...", "(B) ...",
then "Answer: (") so that the next token is the answer letter. The score of an item is
``logit(matching letter) - logit(other letter)`` at the last prompt position (equal to the difference of
their log-probabilities); A/B accuracy is the share of items whose score is positive (a tie counts as a
miss).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from jaxtyping import Float
from torch import Tensor

from tl_steer.data.ab import LETTERS, ABItem, check_ab_items, format_ab_prompt
from tl_steer.errors import ConfigError, DataError
from tl_steer.hosts import Host
from tl_steer.interventions import InterventionsLike, as_intervention_list
from tl_steer.positions import prompt_boundary
from tl_steer.scoring import batches, max_batch_tokens, pad_right, pad_token_id
from tl_steer.steering import steer


def letter_token_ids(model: Host) -> dict[str, int]:
    """The token id of each answer letter; raise if a letter is not a single token of the tokenizer."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("A/B evaluation needs a model with a tokenizer")
    out = {}
    for letter in LETTERS:
        ids = tokenizer(letter, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise DataError(f"the answer letter {letter!r} is not a single token of this tokenizer (ids {ids})")
        out[letter] = int(ids[0])
    return out


def tokenize_ab(model: Host, items: Sequence[ABItem]) -> list[list[int]]:
    """Token ids of each formatted item (with BOS when the model prepends one).

    Checks that appending either letter to the prompt adds exactly that letter's token, so the letter
    logits at the last position are the model's answer (a tokenizer that merges "(" with the letter
    would make them meaningless).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ConfigError("A/B evaluation needs a model with a tokenizer")
    letters = letter_token_ids(model)
    bos = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos and tokenizer.bos_token_id is not None else []
    out = []
    for i, item in enumerate(items):
        text = format_ab_prompt(item)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for letter, letter_id in letters.items():
            full = tokenizer(text + letter, add_special_tokens=False).input_ids
            if full != [*ids, letter_id]:
                raise DataError(
                    f"item {i}: the tokenizer does not keep the answer letter {letter!r} as its own token after "
                    f"the answer prefix ({ids[-3:]} + {letter_id} != {full[-4:]})"
                )
        if len(bos) + len(ids) > model.cfg.n_ctx:
            raise DataError(
                f"item {i}: {len(bos) + len(ids)} tokens exceed the model's context of {model.cfg.n_ctx}; shorten it"
            )
        out.append(bos + ids)
    return out


def ab_scores(
    model: Host,
    intervention: InterventionsLike,
    items: Sequence[ABItem],
    *,
    m: float | Sequence[float] = 1.0,
    batch_size: int = 16,
) -> Float[Tensor, " n"]:
    """``logit(matching letter) - logit(other letter)`` at the answer position of each item (float32, in
    the input order), with ``intervention`` (one, several, or ``None`` for the clean model) at strength m.

    The whole formatted item counts as the prompt of the position policies.
    """
    items = check_ab_items(items)
    ivs = as_intervention_list(intervention)
    letters = letter_token_ids(model)
    sequences = tokenize_ab(model, items)
    match = torch.tensor([letters[it.matching_letter] for it in items])
    other = torch.tensor([letters[it.other_letter] for it in items])
    lengths = [len(s) for s in sequences]
    pad = pad_token_id(model)
    out = torch.empty(len(items), dtype=torch.float32)
    with ExitStack() as stack, torch.no_grad():
        if ivs:
            stack.enter_context(steer(model, *ivs, m=m))
        for idx in batches(lengths, batch_size, max_batch_tokens(model)):
            tokens = pad_right([sequences[i] for i in idx], pad, model.cfg.device or "cpu")
            lens = torch.as_tensor([lengths[i] for i in idx], device=tokens.device)
            with prompt_boundary(lens):
                logits = model(tokens, return_type="logits")
            last = logits[torch.arange(len(idx), device=tokens.device), lens - 1]
            rows = torch.as_tensor(idx)
            diff = last.gather(-1, match[rows, None].to(last.device)) - last.gather(
                -1, other[rows, None].to(last.device)
            )
            out[idx] = diff[:, 0].detach().float().cpu()
    return out


def ab_accuracy(
    model: Host,
    intervention: InterventionsLike,
    items: Sequence[ABItem],
    *,
    m: float | Sequence[float] = 1.0,
    batch_size: int = 16,
) -> float:
    """Share of items where the behaviour-matching letter is more probable than the other one at the
    answer position, with ``intervention`` applied at strength ``m`` (``None``: the clean model)."""
    scores = ab_scores(model, intervention, items, m=m, batch_size=batch_size)
    return float((scores > 0).float().mean())


__all__ = ["ab_accuracy", "ab_scores", "letter_token_ids", "tokenize_ab"]
