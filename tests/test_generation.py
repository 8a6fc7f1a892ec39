"""Batched steered generation: batched == one at a time, seeds, EOS, conditions, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model, no_hooks_left
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_steer
from tl_steer import AddVector, Condition, ConfigError, DataError
from tl_steer.generation import COLUMNS, generate, side_by_side

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["hello world, the", "I went to the market and bought fresh", "The film", "The food was awful and"]


def vector(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=model.cfg.dtype)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_equals_one_at_a_time_greedy(arch, positions):
    model = make_model(arch)
    iv = AddVector(HOOK, vector(model), positions=positions, method="vec")
    conds = [None, iv, Condition("vec + prompting", iv, "The weather is fine.")]
    batched = generate(model, conds, PROMPTS, [0.0, 1.5], max_new_tokens=8, batch_size=4)
    single = generate(model, conds, PROMPTS, [0.0, 1.5], max_new_tokens=8, batch_size=1)
    assert list(batched.columns) == list(COLUMNS)
    # no steering: 1 strength; vec and vec + prompting: 2 strengths; 4 prompts each
    assert len(batched) == 4 * (1 + 2 + 2)
    assert batched["completion"].tolist() == single["completion"].tolist()
    assert batched["n_tokens"].tolist() == single["n_tokens"].tolist()
    # steering changed the text, and m = 0 is the clean model
    vec = batched[batched["condition"] == "vec"]
    clean = batched[batched["condition"] == "no steering"]["completion"].tolist()
    assert vec[vec["m"] == 0.0]["completion"].tolist() == clean
    assert vec[vec["m"] == 1.5]["completion"].tolist() != clean
    assert no_hooks_left(model)


def test_cold_fd_generates_without_the_kv_cache_where_it_must(tiny):
    """COLD-FD's finite difference needs the whole input: generated with full passes, batched == single, and
    the same texts as TransformerLens' generate without the cache."""
    from tl_steer.generation import kv_cache_ok
    from tl_steer.methods import cold_fd

    pairs = [
        tl_steer.ContrastivePair("The film was", " wonderful.", " awful."),
        tl_steer.ContrastivePair("The food", " fresh.", " cold."),
    ]
    fd = cold_fd(tiny, pairs, HOOK, fd_method="jvp")
    assert not kv_cache_ok(fd) and kv_cache_ok(AddVector(HOOK, vector(tiny)))
    batched = generate(tiny, fd, PROMPTS, [1.0], max_new_tokens=5, batch_size=4)
    single = generate(tiny, fd, PROMPTS, [1.0], max_new_tokens=5, batch_size=1)
    assert batched["completion"].tolist() == single["completion"].tolist()
    with tl_steer.steer(tiny, fd, m=1.0):
        kw = dict(do_sample=False, use_past_kv_cache=False, verbose=False, return_type="tokens")
        out = tiny.generate(PROMPTS[0], max_new_tokens=5, **kw)
    new = out[0, tiny.to_tokens(PROMPTS[0]).shape[-1] :].tolist()
    eos = tiny.tokenizer.eos_token_id
    assert batched.loc[0, "completion"] == tiny.tokenizer.decode(new[: new.index(eos)] if eos in new else new)
    assert batched["completion"].tolist() != generate(tiny, None, PROMPTS, max_new_tokens=5)["completion"].tolist()
    assert no_hooks_left(tiny)


def test_greedy_matches_transformer_lens_token_for_token(tiny):
    """An independent reference: TransformerLens' own generate of one prompt, tokens compared."""
    iv = AddVector(HOOK, vector(tiny), method="vec")
    table = generate(tiny, iv, PROMPTS[:2], [2.0], max_new_tokens=6)
    for i, prompt in enumerate(PROMPTS[:2]):
        with tl_steer.steer(tiny, iv, m=2.0):
            out = tiny.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
        width = tiny.to_tokens(prompt).shape[-1]
        new = out[0, width:].tolist()
        eos = tiny.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert table.loc[i, "completion"] == tiny.tokenizer.decode(new)
        assert table.loc[i, "n_tokens"] == len(new)


def test_sampling_is_reproducible_by_seed(tiny):
    kw = dict(max_new_tokens=8, do_sample=True, n_samples=3, batch_size=4)
    a = generate(tiny, None, PROMPTS, seed=1, **kw)
    b = generate(tiny, None, PROMPTS, seed=1, **kw)
    c = generate(tiny, None, PROMPTS, seed=2, **kw)
    assert a["completion"].tolist() == b["completion"].tolist()
    assert a["completion"].tolist() != c["completion"].tolist()
    assert len(a) == 12 and sorted(set(a["sample"])) == [0, 1, 2]
    # the samples of one prompt differ from each other (the stream is not restarted per row)
    assert len(set(a[a["item"] == 0]["completion"])) > 1
    # the global RNG is left as it was
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    generate(tiny, None, PROMPTS[:1], seed=3, **kw)
    assert torch.equal(torch.rand(1), before)


def test_stops_at_eos_and_counts_tokens(tiny):
    """A vector along the EOS token's unembedding makes the model end at once; the row records it."""
    eos = tiny.tokenizer.eos_token_id
    direction = tiny.W_U[:, eos].detach().clone()
    iv = AddVector(f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post", direction / direction.norm(), method="eos")
    table = generate(tiny, iv, PROMPTS, [0.0, 200.0], max_new_tokens=5)
    forced = table[table["m"] == 200.0]
    assert forced["stopped_at_eos"].all() and (forced["n_tokens"] == 0).all()
    assert (forced["completion"] == "").all()
    clean = table[table["m"] == 0.0]
    assert ((clean["n_tokens"] == 5) | clean["stopped_at_eos"]).all()


def test_bad_input_raises_before_generation(tiny):
    iv = AddVector(HOOK, vector(tiny), method="vec")
    calls = []
    original = tiny.generate
    tiny.generate = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        with pytest.raises(DataError, match="empty"):
            generate(tiny, iv, [], [1.0])
        with pytest.raises(DataError, match="prompts\\[1\\] is empty"):
            generate(tiny, iv, ["hello", "  "], [1.0])
        with pytest.raises(DataError, match="wrap a single prompt"):
            generate(tiny, iv, "hello", [1.0])
        with pytest.raises(DataError, match="context"):
            generate(tiny, iv, ["hello", "hello world " * 30], [1.0], max_new_tokens=20)
        with pytest.raises(DataError, match="context"):
            generate(tiny, iv, ["hello"], [1.0], max_new_tokens=tiny.cfg.n_ctx)
        # the instruction counts towards the context too
        long = Condition("long", iv, "the weather is fine " * 40)
        with pytest.raises(DataError, match="'long'"):
            generate(tiny, [None, long], ["hello"], [1.0])
        with pytest.raises(ConfigError, match="distinct"):
            generate(tiny, [iv, iv], ["hello"], [1.0])
        with pytest.raises(ConfigError, match="max_new_tokens"):
            generate(tiny, iv, ["hello"], [1.0], max_new_tokens=0)
        with pytest.raises(ConfigError):
            generate(tiny, iv, ["hello"], [])
        with pytest.raises(ConfigError):
            generate(tiny, "vec", ["hello"], [1.0])
        with pytest.raises(tl_steer.TlSteerError):
            generate(tiny, AddVector(HOOK, torch.ones(7, dtype=torch.float64)), ["hello"], [1.0])
    finally:
        del tiny.generate
    assert calls == []
    assert no_hooks_left(tiny)


def test_side_by_side_lists_every_condition(tiny):
    iv = AddVector(HOOK, vector(tiny), method="vec")
    table = generate(tiny, [None, iv], PROMPTS[:2], [1.0, 2.0], max_new_tokens=4)
    text = side_by_side(table)
    assert text.count("no steering:") == 2 and text.count("vec m=2:") == 2
    assert "[1] I went to the market" in text


# ----- the tl-steer generate command (on a tiny model standing in for the default one) -------------------


@pytest.fixture
def cli_model(monkeypatch):
    import tl_steer.models

    model = make_model("llama")
    monkeypatch.setattr(tl_steer.models, "load_default_model", lambda **options: model)
    return model


def test_cli_generate_prints_texts_side_by_side(cli_model, capsys, tmp_path):
    from tl_steer import cli

    csv = tmp_path / "texts.csv"
    argv = ["generate", "hello world, the", "The film", "-m", "0", "2", "--layer", "1", "--max-new-tokens", "5"]
    assert cli.main([*argv, "--judge", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "[0] hello world, the" in out and "[1] The film" in out
    assert out.count("diffmean m=0:") == 2 and out.count("diffmean m=2:") == 2
    assert "ProbeJudge(concept='sentiment'" in out
    import pandas as pd

    table = pd.read_csv(csv)
    assert len(table) == 4 and {"concept", "nll", "rep4"} <= set(table.columns)
    # the texts are those of the Python API
    vector = tl_steer.diffmean(cli_model, tl_steer.load_pairs("sentiment"), "blocks.1.hook_resid_post")
    direct = generate(cli_model, vector, ["hello world, the", "The film"], [0.0, 2.0], max_new_tokens=5)
    assert table["completion"].fillna("").tolist() == direct["completion"].tolist()


def test_cli_generate_with_a_saved_intervention_and_builtin_prompts(cli_model, capsys, tmp_path):
    from tl_steer import cli

    path = tl_steer.save(AddVector(HOOK, vector(cli_model), method="saved_vec"), tmp_path / "v")
    assert cli.main(["generate", "--load", str(path), "-m", "1", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    first = tl_steer.load_prompts("sentiment", "test")[0]
    assert f"[0] {first}" in out and "saved_vec m=1:" in out


def test_cli_generate_bad_input_fails_before_loading_the_model(monkeypatch, capsys, tmp_path):
    import tl_steer.models
    from tl_steer import cli

    def refuse():
        raise AssertionError("the model must not load")

    monkeypatch.setattr(tl_steer.models, "load_default_model", refuse)
    cases = [
        ["generate", "  "],
        ["generate", "hi", "--load", str(tmp_path / "missing.safetensors")],
        ["generate", "hi", "--concept", "sarcasm"],
        ["generate", "hi", "--max-new-tokens", "0"],
        ["generate", "--pairs", str(tmp_path / "p.jsonl")],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        assert "tl-steer: error:" in capsys.readouterr().err


# ----- on the default model (slow: about a minute) --------------------------------------------------------


@pytest.mark.default_model
def test_default_model_probe_judge_is_valid_and_diffmean_raises_the_judged_concept(default_model):
    """The README's numbers, small: the sentiment probe judge's held-out AUROC is >= 0.8, and DiffMean at
    its trained strength (m = 1) raises the judged concept score of texts generated from held-out prompts."""
    from tl_steer.analysis.stats import bootstrap_ci
    from tl_steer.judges import ProbeJudge

    model = default_model
    train, test = tl_steer.load_pairs("sentiment"), tl_steer.load_pairs("sentiment", "test")
    probe = ProbeJudge.fit(model, train, test, concept="sentiment")
    assert probe.auroc >= 0.8 and probe.reliable
    vector = tl_steer.diffmean(model, train, "blocks.15.hook_resid_post")
    prompts = tl_steer.load_prompts("sentiment", "test")[:8]
    table = generate(model, vector, prompts, [0.0, 1.0], max_new_tokens=24, batch_size=8)
    scores = probe.score(model, table["prompt"].tolist(), table["completion"].tolist())["concept"]
    clean, steered = np.nan_to_num(scores[:8]), np.nan_to_num(scores[8:])
    low, _ = bootstrap_ci(steered - clean)
    assert steered.mean() > clean.mean() and low > 0
    assert no_hooks_left(model)


# ----- the open prompts: built-in sets and the loader of prompt files --------------------------------------


def test_builtin_prompt_sets_have_a_fixed_split():
    for name in tl_steer.builtin_concepts():
        train, test = tl_steer.load_prompts(name, "train"), tl_steer.load_prompts(name, "test")
        everything = tl_steer.load_prompts(name, "all")
        assert len(train) == 32 and len(test) == 16 and len(set(everything)) == 48
        assert set(train).isdisjoint(test) and sorted(train + test) == sorted(everything)
        # open prompts, not the pairs' prompts
        assert not set(everything) & {p.prompt for p in tl_steer.load_pairs(name)}
    with pytest.raises(DataError, match="choose one of"):
        tl_steer.load_prompts("sarcasm")
    with pytest.raises(DataError, match="split"):
        tl_steer.load_prompts("sentiment", "dev")  # type: ignore[arg-type]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"prompt": st.text(max_size=12) | _JSON, "split": st.sampled_from(["train", "test"]) | _JSON}
        ),
        max_size=4,
    ),
    st.binary(max_size=6),
    st.integers(0, 200),
)
def test_read_prompts_fuzzed(tmp_path_factory, records, junk, cut):
    """Any file: either prompts (non-blank strings of the asked split) or a DataError naming the line."""
    from tl_steer.data.prompts import read_prompts

    blob = "\n".join(json.dumps(r) for r in records).encode() + junk
    blob = blob[: len(blob) - cut % (len(blob) + 1)] if cut % 3 == 0 else blob
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_bytes(blob)
    try:
        prompts = read_prompts(path, "test")
    except DataError:
        return
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    valid = all(
        isinstance(r["prompt"], str) and r["prompt"].strip() and r["split"] in ("train", "test") for r in records
    )
    if valid and not junk and cut % 3:
        assert prompts == [r["prompt"] for r in records if r["split"] == "test"]
