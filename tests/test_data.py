"""Contrastive pairs: the JSONL reader's validation, ContrastivePair, and the built-in datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tl_steer
from tl_steer import ContrastivePair, DataError, load_pairs, read_pairs

GOOD = [
    {"prompt": "The food was", "positive": " wonderful and fresh.", "negative": " awful and stale."},
    {
        "prompt": "Caf\u00e9 review:",
        "positive": " lovely cr\u00e8me br\u00fbl\u00e9e \U0001f600",
        "negative": " sad cr\u00e8me br\u00fbl\u00e9e",
    },
    {"prompt": 'Line with "quotes"\tand tab', "positive": " yes\nno", "negative": " no\nyes"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_line(i: int = 0) -> str:
    return json.dumps(GOOD[i])


# ----- read_pairs ----------------------------------------------------------------------------------


def test_read_pairs_round_trip(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r) for r in GOOD])
    pairs = read_pairs(path)
    assert pairs == [ContrastivePair(**r) for r in GOOD]
    assert [p.to_dict() for p in pairs] == GOOD
    # Writing them back with to_dict and reading again gives the same pairs.
    again = write_lines(tmp_path / "again.jsonl", [json.dumps(p.to_dict()) for p in pairs])
    assert read_pairs(str(again)) == pairs


def test_read_pairs_ignores_extra_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**GOOD[0], "id": 7, "note": "x"})])
    assert read_pairs(path) == [ContrastivePair(**GOOD[0])]


def test_read_pairs_skips_blank_lines_and_counts_them(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ["", good_line(0), "   ", "\t", good_line(1), ""])
    assert read_pairs(path) == [ContrastivePair(**GOOD[0]), ContrastivePair(**GOOD[1])]
    # Blank lines still count in the line numbers of errors.
    bad = write_lines(tmp_path / "bad.jsonl", ["", good_line(0), "   ", "{not json"])
    with pytest.raises(DataError, match=r"line 4\b"):
        read_pairs(bad)


BAD_LINES = {
    "bad_json": ('{"prompt": "a", "positive": " b"', "not valid JSON"),
    "array": ('["a", " b", " c"]', "expected a JSON object"),
    "string": ('"just a string"', "expected a JSON object"),
    "missing_positive": ('{"prompt": "a", "negative": " c"}', "missing field 'positive'"),
    "missing_prompt": ('{"positive": " b", "negative": " c"}', "missing field 'prompt'"),
    "int_negative": ('{"prompt": "a", "positive": " b", "negative": 3}', "field 'negative' must be a string, got int"),
    "null_prompt": ('{"prompt": null, "positive": " b", "negative": " c"}', "field 'prompt' must be a string"),
    "list_positive": ('{"prompt": "a", "positive": [" b"], "negative": " c"}', "field 'positive' must be a string"),
    "empty_prompt": ('{"prompt": "", "positive": " b", "negative": " c"}', "field 'prompt' is empty"),
    "blank_prompt": ('{"prompt": "  \\n ", "positive": " b", "negative": " c"}', "field 'prompt' is empty"),
    "empty_positive": ('{"prompt": "a", "positive": "", "negative": " c"}', "non-empty positive and negative"),
    "blank_negative": ('{"prompt": "a", "positive": " b", "negative": "  \\t"}', "non-empty positive and negative"),
    "identical": ('{"prompt": "a", "positive": " same", "negative": " same"}', "identical completions"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_read_pairs_bad_line_names_file_line_and_problem(tmp_path: Path, case: str) -> None:
    line, problem = BAD_LINES[case]
    path = write_lines(tmp_path / f"{case}.jsonl", [good_line(0), good_line(1), line, good_line(2)])
    with pytest.raises(DataError) as info:
        read_pairs(path)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert problem in message


def test_read_pairs_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no pairs") as info:
        read_pairs(path)
    assert str(path) in str(info.value)
    only_blank = write_lines(tmp_path / "blank.jsonl", ["", "  ", ""])
    with pytest.raises(DataError, match="no pairs"):
        read_pairs(only_blank)


def test_read_pairs_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_pairs(path)
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path)  # a folder is not a pairs file


def test_read_pairs_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good_line(0).encode() + b"\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="not UTF-8") as info:
        read_pairs(path)
    assert str(path) in str(info.value)


def test_data_error_is_a_value_error(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ["[]"])
    with pytest.raises(ValueError):
        read_pairs(path)
    assert issubclass(DataError, tl_steer.TlSteerError)


# ----- ContrastivePair -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((1, " b", " c"), "ContrastivePair.prompt must be a string, got int"),
        (("a", None, " c"), "ContrastivePair.positive must be a string, got NoneType"),
        (("a", " b", b" c"), "ContrastivePair.negative must be a string, got bytes"),
        (("a", "", " c"), "non-empty positive and negative"),
        (("a", " b", "   "), "non-empty positive and negative"),
        (("a", "\n", " c"), "non-empty positive and negative"),
        (("a", " same", " same"), "identical completions: ' same'"),
    ],
)
def test_contrastive_pair_validation(args: tuple, problem: str) -> None:
    with pytest.raises(DataError) as info:
        ContrastivePair(*args)
    assert problem in str(info.value)


def test_contrastive_pair_is_frozen_and_comparable() -> None:
    pair = ContrastivePair("a", " b", " c")
    assert pair == ContrastivePair("a", " b", " c")
    assert pair != ContrastivePair("a", " c", " b")
    assert pair.to_dict() == {"prompt": "a", "positive": " b", "negative": " c"}
    with pytest.raises(AttributeError):
        pair.prompt = "x"  # type: ignore[misc]


# ----- built-in datasets ---------------------------------------------------------------------------


def test_builtin_concepts_listed() -> None:
    concepts = tl_steer.builtin_concepts()
    assert {"sentiment", "formality", "refusal"} <= set(concepts)
    assert concepts == sorted(concepts)


@pytest.mark.parametrize("concept", ["sentiment", "formality", "refusal"])
def test_builtin_dataset_sizes_and_split(concept: str) -> None:
    train = load_pairs(concept, "train")
    test = load_pairs(concept, "test")
    assert load_pairs(concept) == train  # the default split is train
    assert len(train) >= 100
    assert len(test) >= 20
    assert len(train) + len(test) >= 120
    assert all(isinstance(p, ContrastivePair) for p in train + test)
    # No prompt appears in both splits.
    assert not {p.prompt for p in train} & {p.prompt for p in test}


@pytest.mark.parametrize("concept", ["sentiment", "formality", "refusal"])
def test_builtin_completions_have_similar_lengths(concept: str) -> None:
    for pair in load_pairs(concept, "train") + load_pairs(concept, "test"):
        a, b = len(pair.positive.split()), len(pair.negative.split())
        assert min(a, b) >= 1
        assert max(a, b) <= 1.5 * min(a, b), pair
        # Completions start with the separating space, as the docs say.
        assert pair.positive.startswith(" ") and pair.negative.startswith(" "), pair


def test_load_pairs_unknown_concept_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        load_pairs("sarcasm")
    message = str(info.value)
    assert "'sarcasm'" in message
    for name in tl_steer.builtin_concepts():
        assert name in message


@pytest.mark.parametrize("split", ["validation", "Train", "", None])
def test_load_pairs_bad_split(split: object) -> None:
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_pairs("sentiment", split)  # type: ignore[arg-type]


def test_concept_instructions_cover_the_builtin_concepts() -> None:
    from tl_steer.data.pairs import concept_instruction

    for name in tl_steer.builtin_concepts():
        assert concept_instruction(name).strip()
    with pytest.raises(tl_steer.DataError, match="known: formality, refusal, sentiment"):
        concept_instruction("humour")
