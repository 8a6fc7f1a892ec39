"""Multiple-choice items: validating reader, the built-in set, option NLLs against an unbatched hand
computation, and the default model's unsteered accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MC_QUESTIONS, no_hooks_left

from tl_steer import AddVector, DataError
from tl_steer.analysis.capability import (
    MCResult,
    format_mc_prompt,
    mc_accuracy,
    mc_completions,
    mc_option_nll,
    mc_result,
)
from tl_steer.data import MCItem, check_mc_items, load_mc_items, mc_item, mc_sets, read_mc_items
from tl_steer.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


GOOD = {
    "question": "What is wide?",
    "options": ["the world", "the bread", "the tea", "the room"],
    "answer": "the world",
}
ITEMS = [MCItem(*t) for t in MC_QUESTIONS]
HOOK = "blocks.1.hook_resid_post"


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----- items and reader -------------------------------------------------------------------------------


def test_read_mc_items_answer_as_text_or_index(tmp_path):
    by_index = {**GOOD, "answer": 2}
    path = write_lines(tmp_path, [json.dumps(GOOD), "", json.dumps(by_index)])
    first, second = read_mc_items(path)
    assert first == MCItem(GOOD["question"], tuple(GOOD["options"]), 0)
    assert second.answer == 2 and second.gold == "the tea"
    assert isinstance(first.options, tuple)
    assert mc_item(**first.to_dict()) == first


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps(["q", ["a", "b"], 0]), "expected a JSON object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "options"}), "missing field 'options'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), "missing field 'answer'"),
        (json.dumps({**GOOD, "question": 3}), "field 'question' must be a string"),
        (json.dumps({**GOOD, "options": "the world"}), "field 'options' must be a list"),
        (json.dumps({**GOOD, "answer": True}), "field 'answer' must be an integer or a string"),
        (json.dumps({**GOOD, "answer": "the moon"}), "'the moon' is not among the options"),
        (json.dumps({**GOOD, "answer": 4}), "answer 4 is not among the options"),
        (json.dumps({**GOOD, "answer": -1}), "answer -1 is not among the options"),
        (json.dumps({**GOOD, "options": ["the world", "the tea", "the world "]}), "duplicate options"),
        (json.dumps({**GOOD, "options": ["the world"]}), "at least 2 options"),
        (json.dumps({**GOOD, "options": ["the world", 7]}), "option 1 must be a string"),
        (json.dumps({**GOOD, "options": ["the world", " "]}), "option 1 is empty"),
        (json.dumps({**GOOD, "question": "  "}), "question is empty"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, [json.dumps(GOOD), "", bad])
    with pytest.raises(DataError) as info:
        read_mc_items(path)
    text = str(info.value)
    assert f"{path}, line 3" in text
    assert message in text


def test_reader_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="no multiple-choice items"):
        read_mc_items(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(FileNotFoundError):
        read_mc_items(tmp_path / "nope.jsonl")


def test_item_validation_and_check():
    with pytest.raises(DataError, match="at least 2 options"):
        MCItem("q", ("a",), 0)
    with pytest.raises(DataError, match="duplicate options"):
        MCItem("q", ("a", "b", "a"), 0)
    with pytest.raises(DataError, match="not among the options"):
        MCItem("q", ("a", "b"), 2)
    with pytest.raises(DataError, match="option index"):
        MCItem("q", ("a", "b"), "a")  # type: ignore[arg-type]
    assert MCItem("q", ["a", "b"], 1).options == ("a", "b")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="empty"):
        check_mc_items([])
    with pytest.raises(DataError, match="MCItem"):
        check_mc_items([GOOD])


# ----- built-in set -----------------------------------------------------------------------------------


def test_builtin_general_set():
    assert "general" in mc_sets()
    items = load_mc_items()
    assert items == load_mc_items("general")
    assert len(items) >= 150
    assert all(len(it.options) == 4 for it in items)
    questions = [it.question.strip().lower() for it in items]
    assert len(set(questions)) == len(questions)
    # The gold position is spread over the four places, so a position bias cannot pass for knowledge.
    counts = torch.bincount(torch.tensor([it.answer for it in items]), minlength=4)
    assert counts.min() >= len(items) // 4 - 2
    assert not any("all of the above" in o.lower() for it in items for o in it.options)
    with pytest.raises(DataError, match="general"):
        load_mc_items("trivia")


# ----- option NLL ---------------------------------------------------------------------------------------


def hand_nll(model, prompt: str, completion: str, normalize: str, fwd_hooks=()) -> float:
    """One sequence at a time, no padding: -log P(completion tokens | prompt tokens)."""
    tok = model.tokenizer
    bos = [tok.bos_token_id] if model.cfg.default_prepend_bos else []
    p_ids = bos + tok(prompt, add_special_tokens=False).input_ids
    full = bos + tok(prompt + completion, add_special_tokens=False).input_ids
    start = next((i for i, (a, b) in enumerate(zip(p_ids, full, strict=False)) if a != b), len(p_ids))
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([full]), fwd_hooks=list(fwd_hooks))[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    total = -sum(float(logprobs[t - 1, full[t]]) for t in range(start, len(full)))
    return total / (len(full) - start) if normalize == "mean" else total


def hand_matrix(model, items, normalize="mean", instruction=None, fwd_hooks=()):
    return torch.tensor(
        [
            [hand_nll(model, format_mc_prompt(it, instruction), c, normalize, fwd_hooks) for c in mc_completions(it)]
            for it in items
        ]
    )


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_option_nll_equals_unbatched_hand_computation(tiny_any, normalize):
    model = tiny_any
    got = mc_option_nll(model, ITEMS, batch_size=3, normalize=normalize)
    assert got.shape == (len(ITEMS), 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, hand_matrix(model, ITEMS, normalize).float(), rtol=1e-5, atol=1e-5)
    # The prompting baseline: the instruction and a newline in front of every prompt.
    got = mc_option_nll(model, ITEMS, instruction="Be kind.", normalize=normalize)
    expected = hand_matrix(model, ITEMS, normalize, instruction="Be kind.")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_steered_option_nll_equals_hand_hook_and_m0_is_clean(tiny):
    model = tiny
    g = torch.Generator().manual_seed(1)
    v = 2.0 * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)
    iv = AddVector(HOOK, v)
    steered = mc_option_nll(model, ITEMS, interventions=[iv], m=1.5, batch_size=4)
    expected = hand_matrix(model, ITEMS, fwd_hooks=[(HOOK, lambda a, hook: a + 1.5 * v)])
    torch.testing.assert_close(steered, expected.float(), rtol=1e-5, atol=1e-5)
    clean = mc_option_nll(model, ITEMS)
    assert not torch.allclose(steered, clean)
    assert torch.equal(mc_option_nll(model, ITEMS, interventions=iv, m=0.0), clean)
    assert no_hooks_left(model)


def test_accuracy_and_result(tiny):
    model = tiny
    result = mc_accuracy(model, ITEMS, normalize="sum")
    assert isinstance(result, MCResult)
    nll = mc_option_nll(model, ITEMS, normalize="sum")
    torch.testing.assert_close(result.nll, nll)
    assert result.chosen.tolist() == [int(row.argmin()) for row in nll]
    assert result.correct.tolist() == [c == it.answer for c, it in zip(result.chosen.tolist(), ITEMS, strict=True)]
    assert result.accuracy == pytest.approx(sum(result.correct.tolist()) / len(ITEMS))
    low, high = result.ci()
    assert low <= result.accuracy <= high


def test_result_ties_count_as_misses_and_ragged_options(tiny):
    nll = torch.tensor([[1.0, 1.0, 2.0], [0.5, 1.0, 2.0], [3.0, 2.0, float("inf")]])
    result = mc_result(nll, torch.tensor([0, 0, 1]))
    assert result.correct.tolist() == [False, True, True]
    assert result.chosen.tolist() == [0, 0, 1]
    # Items with fewer options than the widest get inf in the missing places.
    items = [ITEMS[0], MCItem("hello", ("world", "tea"), 1)]
    got = mc_option_nll(tiny, items)
    assert got.shape == (2, 4) and torch.isinf(got[1, 2:]).all() and torch.isfinite(got[1, :2]).all()
    torch.testing.assert_close(got[1, :2], mc_option_nll(tiny, items[1:])[0])


def test_bad_arguments_fail_before_any_work(tiny, monkeypatch):
    import tl_steer.analysis.capability as capability

    def refuse(*args, **kwargs):
        raise AssertionError("scoring ran")

    monkeypatch.setattr(capability, "completion_nll", refuse)
    with pytest.raises(DataError, match="empty"):
        mc_accuracy(tiny, [])
    with pytest.raises(DataError, match="MCItem"):
        mc_option_nll(tiny, [GOOD])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="normalize"):
        mc_accuracy(tiny, ITEMS, normalize="max")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        mc_option_nll(tiny, ITEMS, batch_size=0)
    with pytest.raises(ConfigError, match="instruction"):
        mc_option_nll(tiny, ITEMS, instruction=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Intervention"):
        mc_option_nll(tiny, ITEMS, interventions=["blocks.1.hook_resid_post"])  # type: ignore[list-item]


# ----- the default model --------------------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_knows_the_general_set(default_model):
    items = load_mc_items()
    result = mc_accuracy(default_model, items, batch_size=64)
    # Measured 0.604 (mean-token NLL, float32; 95% CI 0.54 to 0.66); chance is 0.25. About 16k tokens:
    # under a minute on 2 cores.
    assert result.accuracy > 0.55
    assert result.ci()[0] > 0.45
    assert no_hooks_left(default_model)
