"""A/B items: validating reader, built-in datasets, and A/B accuracy against a hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import no_hooks_left

import tl_steer
from tl_steer import AddVector, DataError
from tl_steer.analysis.ab import ab_accuracy, ab_scores, letter_token_ids
from tl_steer.data.ab import (
    ANSWER_PREFIX,
    ABItem,
    ab_behaviours,
    ab_to_pairs,
    format_ab_prompt,
    load_ab_items,
    read_ab_items,
)


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


GOOD = {"question": "How was it?", "option_a": "fine", "option_b": "awful", "answer_matching_behavior": "A"}
ITEMS = [
    ABItem("How was it?", "fine", "cold", "A"),
    ABItem("Was the staff kind?", "awful", "kind", "B"),
    ABItem("The bread?", "fresh bread", "awful bread", "A"),
    ABItem("The room?", "dirty", "fine and wide", "B"),
    ABItem("hello world?", "the world is wide", "the weather is cold", "A"),
]


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----- reader ---------------------------------------------------------------------------------------


def test_read_ab_items_round_trip(tmp_path):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "answer_matching_behavior": "B"})])
    items = read_ab_items(path)
    assert items == [ABItem(**GOOD), ABItem(**{**GOOD, "answer_matching_behavior": "B"})]
    assert items[1].matching_option == "awful" and items[1].other_letter == "A"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps(["a", "b"]), "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "option_b"}), "missing field 'option_b'"),
        (json.dumps({**GOOD, "question": 3}), "field 'question' must be a string"),
        (json.dumps({**GOOD, "answer_matching_behavior": "C"}), "must be 'A' or 'B'"),
        (json.dumps({**GOOD, "answer_matching_behavior": "a"}), "must be 'A' or 'B'"),
        (json.dumps({**GOOD, "option_a": "  "}), "option_a is empty"),
        (json.dumps({**GOOD, "option_b": "fine"}), "identical options"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", bad])
    with pytest.raises(DataError) as info:
        read_ab_items(path)
    text = str(info.value)
    assert f"{path}, line 3" in text
    assert message in text


def test_reader_empty_missing_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="no A/B items"):
        read_ab_items(write_lines(tmp_path, [""]))
    with pytest.raises(FileNotFoundError):
        read_ab_items(tmp_path / "nope.jsonl")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match="UTF-8"):
        read_ab_items(path)


def test_item_validation():
    with pytest.raises(DataError, match="'A' or 'B'"):
        ABItem("q", "a", "b", "X")
    with pytest.raises(DataError, match="string"):
        ABItem("q", "a", None, "A")  # type: ignore[arg-type]


# ----- built-in data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sentiment", "formality"])
def test_builtin_sizes_split_and_balance(name):
    train, test = load_ab_items(name, "train"), load_ab_items(name, "test")
    assert load_ab_items(name) == train
    assert len(train) + len(test) >= 100
    assert len(train) >= 50 and len(test) >= 40  # N up to 50 in the sample-efficiency study
    for split in (train, test):
        letters = [it.answer_matching_behavior for it in split]
        assert abs(letters.count("A") - letters.count("B")) <= 1
    # No question in both splits, and no duplicates.
    questions = [it.question for it in train + test]
    assert len(set(questions)) == len(questions)


def test_builtin_listing_and_errors():
    assert {"sentiment", "formality"} <= set(ab_behaviours())
    # The A/B files do not show up among the contrastive-pair concepts.
    assert not any(c.startswith("ab") for c in tl_steer.builtin_concepts())
    with pytest.raises(DataError, match="sentiment"):
        load_ab_items("sarcasm")
    with pytest.raises(DataError, match="split must be"):
        load_ab_items("sentiment", "validation")  # type: ignore[arg-type]


def test_format_and_pairs():
    item = ITEMS[1]
    text = format_ab_prompt(item)
    assert text.startswith(item.question) and text.endswith(ANSWER_PREFIX)
    assert "(A) awful\n(B) kind" in text
    (pair,) = ab_to_pairs([item])
    assert (pair.prompt, pair.positive, pair.negative) == (text, "B", "A")


# ----- A/B accuracy -------------------------------------------------------------------------------------


def hand_scores(model, items, fwd_hooks=()):
    ids = {letter: model.tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "AB"}
    out = []
    with torch.no_grad():
        for item in items:
            logits = model.run_with_hooks(model.to_tokens(format_ab_prompt(item)), fwd_hooks=list(fwd_hooks))[0, -1]
            out.append(float(logits[ids[item.matching_letter]] - logits[ids[item.other_letter]]))
    return torch.tensor(out)


def test_ab_accuracy_equals_hand_computation(tiny_any):
    model = tiny_any
    assert set(letter_token_ids(model)) == {"A", "B"}
    expected = hand_scores(model, ITEMS)
    got = ab_scores(model, None, ITEMS, batch_size=2)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert ab_accuracy(model, None, ITEMS) == pytest.approx(float((expected > 0).float().mean()))
    # Steered: the same as a hand-written hook.
    g = torch.Generator().manual_seed(0)
    v = 2.0 * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
    iv = AddVector("blocks.1.hook_resid_post", v)
    expected = hand_scores(model, ITEMS, [("blocks.1.hook_resid_post", lambda a, hook: a + 1.5 * v)])
    got = ab_scores(model, iv, ITEMS, m=1.5, batch_size=3)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert ab_accuracy(model, [iv], ITEMS, m=1.5) == pytest.approx(float((expected > 0).float().mean()))
    assert no_hooks_left(model)


def test_ab_accuracy_bad_input(tiny):
    with pytest.raises(DataError, match="empty"):
        ab_accuracy(tiny, None, [])
    with pytest.raises(DataError, match="ABItem"):
        ab_accuracy(tiny, None, [GOOD])  # type: ignore[list-item]
    long = ABItem("hello world " * 80, "a", "b", "A")
    with pytest.raises(DataError, match="context"):
        ab_accuracy(tiny, None, [long])
