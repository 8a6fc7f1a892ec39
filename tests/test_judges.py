"""Judges of generated text: probe AUROC, fluency, relevance, the LLM judge's strict parser and back ends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_model, no_hooks_left
from hypothesis import given
from hypothesis import strategies as st

import tl_steer
from tl_steer import AddVector, ConfigError, ContrastivePair, DataError, FileFormatError, ModelMismatchError
from tl_steer.judges import (
    FluencyJudge,
    LLMJudge,
    ProbeJudge,
    RelevanceJudge,
    auroc,
    distinct_n,
    judge_table,
    parse_score,
    repeated_ngram_share,
)
from tl_steer.judges.llm import harmonic_mean
from tl_steer.judges.relevance import other_prompts

GOOD = [" the film was wonderful and the staff were kind", " fresh bread and a cup of tea, wonderful and fine"]
BAD = [" the food was awful and the room was cold and dirty", " the room was dirty and the food was awful"]
PROMPTS = ["hello world,", "I went to the market and", "The weather is", "we bought", "today the", "then"]


def pairs(n, offset=0):
    return [ContrastivePair(PROMPTS[(i + offset) % len(PROMPTS)], GOOD[i % 2], BAD[(i // 2) % 2]) for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def probe(tiny):
    return ProbeJudge.fit(tiny, pairs(12), pairs(6, offset=3), concept="toy")


# ----- AUROC ---------------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auroc_equals_direct_count_of_pairs(items):
    scores = [float(s) for s, _ in items]
    labels = [y for _, y in items]
    pos = [s for s, y in items if y]
    neg = [s for s, y in items if not y]
    if not pos or not neg:
        with pytest.raises(DataError):
            auroc(scores, labels)
        return
    direct = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(direct, abs=1e-12)


# ----- probe judge ---------------------------------------------------------------------------------------


def test_probe_auroc_is_measured_on_held_out_completions(tiny, probe):
    test = pairs(6, offset=3)
    p = probe.score(tiny, [q.prompt for q in test] * 2, [q.positive for q in test] + [q.negative for q in test])
    scores = p["concept"]
    assert ((scores >= 0) & (scores <= 1)).all()
    assert probe.auroc == pytest.approx(auroc(scores, [1] * 6 + [0] * 6), abs=1e-12)
    assert probe.auroc > 0.8 and probe.reliable and probe.n_train == 24 and probe.n_test == 12
    assert probe.info()["auroc"] == probe.auroc and "UNRELIABLE" not in repr(probe)
    # a judge under 0.8 is flagged
    low = ProbeJudge(**{**_args(probe), "auroc": 0.6})
    assert not low.reliable and "UNRELIABLE" in repr(low)


def _args(j):
    return dict(
        concept=j.concept,
        hook=j.hook,
        weight=j.weight,
        bias=j.bias,
        mean=j.mean,
        scale=j.scale,
        auroc=j.auroc,
        n_train=j.n_train,
        n_test=j.n_test,
        identity=j.model_identity,
    )


def test_probe_score_matches_a_hand_computed_feature(tiny, probe):
    """Independent path: run_with_cache on prompt + completion, mean over the completion's tokens."""
    prompt, completion = "I went to the market and", " the film was wonderful"
    tokens = tiny.to_tokens(prompt + completion)
    n_prompt = tiny.to_tokens(prompt).shape[-1]
    _, cache = tiny.run_with_cache(tokens)
    feat = cache[probe.hook][0, n_prompt:].double().mean(0)
    expected = torch.sigmoid(((feat - probe.mean) / probe.scale) @ probe.weight + probe.bias)
    got = probe.score(tiny, [prompt], [completion])["concept"][0]
    assert got == pytest.approx(float(expected), abs=1e-9)


def test_probe_refuses_other_model_concept_and_steering(tiny, probe):
    other = make_model("llama", seed=1)
    with pytest.raises(ModelMismatchError):
        probe.score(other, ["hello"], [" world"])
    with pytest.raises(ConfigError, match="fitted for the concept 'toy'"):
        probe.check(tiny, "sentiment")
    iv = AddVector("blocks.1.hook_resid_post", torch.ones(tiny.cfg.d_model, dtype=torch.float64))
    with tl_steer.steer(tiny, iv, m=1.0), pytest.raises(ConfigError, match="clean model"):
        probe.score(tiny, ["hello"], [" world"])
    assert no_hooks_left(tiny)
    with pytest.raises(ConfigError, match="concept"):
        ProbeJudge.fit(tiny, pairs(4), pairs(4), concept="")


def test_empty_completions_score_nan(tiny, probe):
    out = judge_table(
        tiny,
        __import__("pandas").DataFrame({"prompt": PROMPTS[:3], "completion": [" the film", "", "  "]}),
        [probe, FluencyJudge(), RelevanceJudge()],
    )
    assert not math.isnan(out.loc[0, "concept"]) and out.loc[1:, "concept"].isna().all()
    assert out.loc[1:, "nll"].isna().all() and out.loc[1:, "relevance"].isna().all()


# ----- fluency and relevance -----------------------------------------------------------------------------


def test_distinct_and_repetition_by_hand():
    assert distinct_n([1, 2, 3, 1], 1) == 0.75
    assert distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n([1], 2))
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    # 1 2 3 4 occurs twice: its 8 tokens are covered, the 9th (7) is not
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4, 7]) == pytest.approx(8 / 9)
    assert repeated_ngram_share([5] * 10) == 1.0
    assert math.isnan(repeated_ngram_share([]))


def _manual_nll(model, prompt, completion):
    tokens = model.to_tokens(prompt + completion)
    n_prompt = model.to_tokens(prompt).shape[-1]
    with torch.no_grad():
        lp = torch.log_softmax(model(tokens)[0].double(), -1)
    target = tokens[0, n_prompt:]
    return -lp[n_prompt - 1 : -1].gather(-1, target[:, None]).mean().item()


def test_fluency_nll_and_relevance_pmi_by_hand(tiny):
    prompts = ["I went to the market and", "The weather is", "I went to the market and"]
    completions = [" bought fresh bread", " fine today", " the the the the the the the the"]
    flu = FluencyJudge().score(tiny, prompts, completions)
    for i in range(3):
        assert flu["nll"][i] == pytest.approx(_manual_nll(tiny, prompts[i], completions[i]), abs=1e-5)
    assert flu["rep4"][2] == 1.0 and flu["rep4"][0] == 0.0
    rel = RelevanceJudge().score(tiny, prompts, completions)["relevance"]
    # the other prompt of "I went ..." is "The weather is", and of "The weather is" it is "I went ..."
    expected0 = _manual_nll(tiny, prompts[1], completions[0]) - _manual_nll(tiny, prompts[0], completions[0])
    expected1 = _manual_nll(tiny, prompts[0], completions[1]) - _manual_nll(tiny, prompts[1], completions[1])
    assert rel[0] == pytest.approx(expected0, abs=1e-5) and rel[1] == pytest.approx(expected1, abs=1e-5)
    assert other_prompts(["a", "b", "c", "a"]) == ["b", "c", "a", "b"]
    with pytest.raises(DataError, match="2 distinct prompts"):
        RelevanceJudge().score(tiny, ["a", "a"], [" x", " y"])


# ----- LLM judge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("[[2]]", 2),
        ("Rating: [[1]]", 1),
        ("[[ 0 ]]", 0),
        ("2", 2),
        (" 1.\n", 1),
        ("The text is fluent. Rating: [[2]]", 2),
        ("[[3]]", None),
        ("[[1]] or [[2]]", None),
        ("[[1]] [[1]]", None),
        ("[[1.5]]", None),
        ("[[-1]]", None),
        ("[[２]]", None),
        ("[[two]]", None),
        ("Rating: 2", None),
        ("12", None),
        ("", None),
        ("[[]]", None),
        ("[[2]", None),
        ("I cannot rate this.", None),
        (None, None),
        (2, None),
    ],
)
def test_parser_on_hostile_answers(answer, expected):
    assert parse_score(answer) == expected


@given(st.text(max_size=60))
def test_parser_never_guesses(text):
    """Fuzzed: the parser never raises, returns 0/1/2 or None, and a rating it returns is in the text."""
    value = parse_score(text)
    assert value in (None, 0, 1, 2)
    if value is not None:
        assert str(value) in text
        assert text.count("[[") <= 1


@given(st.integers(0, 2), st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=30))
def test_parser_reads_one_bracketed_rating_in_any_prose(value, prose):
    assert parse_score(f"{prose}[[{value}]]{prose}") == value


def test_harmonic_mean_against_hand_values():
    assert harmonic_mean([2.0, 2.0, 2.0]) == 2.0
    assert harmonic_mean([1.0, 2.0, 2.0]) == pytest.approx(3 / (1 + 0.5 + 0.5))
    assert harmonic_mean([0.0, 2.0, 2.0]) == 0.0
    assert math.isnan(harmonic_mean([float("nan"), 2.0, 2.0]))


def test_llm_judge_with_a_callable_counts_unparseable_answers(tiny):
    answers = iter(["[[2]]", "[[1]]", "[[2]]", "maybe two?", "[[2]]", "[[0]]"])
    asked = []

    def backend(question):
        asked.append(question)
        return next(answers)

    judge = LLMJudge(backend, concept="sentiment")
    out = judge.score(tiny, ["p1", "p2", "p3"], [" good text", " other text", ""])
    assert out["llm_concept"][0] == 2 and out["llm_instruction"][0] == 1 and out["llm_fluency"][0] == 2
    assert out["llm_hmean"][0] == pytest.approx(3 / (0.5 + 1 + 0.5))
    assert math.isnan(out["llm_concept"][1]) and math.isnan(out["llm_hmean"][1])
    assert out["llm_unparsed"].tolist() == [0, 1, 0]
    assert judge.n_asked == 6 and judge.n_unparsed == 1
    assert "positive, happy" in asked[0] and "good text" in asked[0] and "p1" in asked[0]


def test_llm_judge_on_a_hooked_model_runs(tiny):
    """Mechanics only: a tiny random model answers nonsense, which must be counted, never guessed."""
    judge = LLMJudge(tiny, concept="toy concept", max_new_tokens=4)
    out = judge.score(tiny, ["hello world,", "The weather is"], [" fine", " cold"])
    for key in ("llm_concept", "llm_instruction", "llm_fluency"):
        assert all(math.isnan(v) or v in (0, 1, 2) for v in out[key])
    n_nan = sum(int(math.isnan(out[k][i])) for k in ("llm_concept", "llm_instruction", "llm_fluency") for i in range(2))
    assert out["llm_unparsed"].sum() == n_nan == judge.n_unparsed


def test_llm_judge_folder_must_be_a_causal_lm(tmp_path):
    from transformers import BertConfig

    with pytest.raises(FileNotFoundError):
        LLMJudge(tmp_path / "missing", concept="sentiment")
    with pytest.raises(FileFormatError, match="no config.json"):
        LLMJudge(tmp_path, concept="sentiment")
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(FileFormatError, match="not a causal"):
        LLMJudge(tmp_path, concept="sentiment")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FileFormatError):
        LLMJudge(tmp_path, concept="sentiment")
    with pytest.raises(ConfigError):
        LLMJudge(42, concept="sentiment")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LLMJudge(lambda q: "[[1]]", concept=" ")


def test_judge_table_adds_columns_and_checks_concept(tiny, probe):
    import pandas as pd

    table = pd.DataFrame({"prompt": PROMPTS[:2], "completion": [" the film", " the food"]})
    out = judge_table(tiny, table, [probe, FluencyJudge()])
    assert {"concept", "nll", "distinct1", "distinct2", "rep4"} <= set(out.columns)
    assert np.isfinite(out["concept"]).all()
    with pytest.raises(ConfigError, match="fitted for the concept"):
        judge_table(tiny, table, [probe], concept="formality")


def test_judge_table_computes_the_shared_nll_once(tiny, monkeypatch):
    """Fluency's NLL is relevance's own-prompt term: one pass for both inside judge_table, the same values."""
    import pandas as pd

    import tl_steer.judges.base as base

    calls = []
    original = base.completion_nll
    monkeypatch.setattr(base, "completion_nll", lambda *a, **k: calls.append(1) or original(*a, **k))
    table = pd.DataFrame({"prompt": PROMPTS[:3], "completion": [" the film", " the food", " fine"]})
    out = judge_table(tiny, table, [FluencyJudge(), RelevanceJudge()])
    assert len(calls) == 2  # own prompts once, other prompts once
    alone = FluencyJudge().score(tiny, table["prompt"].tolist(), table["completion"].tolist())
    np.testing.assert_array_equal(out["nll"], alone["nll"])
    assert len(calls) == 3  # outside judge_table nothing is shared
