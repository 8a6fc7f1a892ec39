"""LoRA / LocalWeight interventions and the SPLIT / SFT trainer (docs/methods.md, sections 1 and 5)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import make_model, no_hooks_left

import tl_steer
from tl_steer import AddVector, ContrastivePair, DataError, steer
from tl_steer.errors import ConfigError, ShapeError, TlSteerError
from tl_steer.methods.split import DEFAULTS, FORMS, sft, split
from tl_steer.module_delta import LocalWeight, LoRA

# tl_steer.methods re-exports the function `split`, which shadows the submodule as an attribute.
split_module = sys.modules["tl_steer.methods.split"]

LAYER = 1
TEXT = "hello world, the weather is fine"
P = ContrastivePair
PAIRS = [
    P("The film was", " wonderful and the staff were kind.", " awful and the staff were rude."),
    P("The food was", " fresh and the tea was fine.", " cold and the tea was awful."),
    P("The room was", " wide and clean.", " cold and dirty."),
    P("I went to the market and", " the bread was fresh.", " the bread was awful."),
    P("hello world, the weather is", " fine today.", " awful today."),
    P("We had a cup of tea and", " it was wonderful.", " it was cold."),
    P("The staff were", " kind and friendly.", " rude and dirty."),
    P("The world is", " wide and wonderful.", " cold and awful."),
]
HELD_OUT = [
    P("The bread was", " fresh and fine.", " awful and cold."),
    P("The weather is", " fine and wide.", " cold and dirty."),
    P("I bought a cup of tea and", " it was wonderful.", " it was awful."),
    P("The market was", " wonderful today.", " dirty today."),
]


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny models' matrices are too small to gain from more, and on a loaded
    2-core machine threads that wait for a busy core made these tests 5-10x slower (the default-model
    test: 13 s on one thread, 103 s on two, measured beside other jobs)."""
    with threads(1):
        yield


def random_lora(model, layer=LAYER, rank=3, seed=0, scale=0.5, **kw):
    g = torch.Generator().manual_seed(seed)
    dtype = model.cfg.dtype
    A = torch.randn(model.cfg.d_mlp, rank, generator=g, dtype=dtype) * scale
    B = torch.randn(rank, model.cfg.d_model, generator=g, dtype=dtype) * scale
    return LoRA(layer, A, B, **kw)


def random_local_weight(model, layer=LAYER, seed=0, scale=0.1, **kw):
    g = torch.Generator().manual_seed(seed)
    dtype = model.cfg.dtype
    dW = torch.randn(model.cfg.d_mlp, model.cfg.d_model, generator=g, dtype=dtype) * scale
    db = torch.randn(model.cfg.d_model, generator=g, dtype=dtype) * scale
    return LocalWeight(layer, dW, db, **kw)


def logits_with(model, tokens, fwd_hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))


def pref(model, pairs, iv=None, m=0.0):
    lp, ln = tl_steer.pair_nll(model, pairs, interventions=[iv] if iv is not None else [], m=m)
    return float((ln - lp).mean())


# ----- the interventions -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [random_lora, random_local_weight], ids=["lora", "local_weight"])
def test_module_delta_matches_hand_written_hooks(tiny_any, make):
    model = tiny_any
    iv = make(model)
    m = 1.7
    tokens = model.to_tokens(TEXT)
    seen = {}

    def record(act, hook):
        seen["a_mid"] = act

    def add(act, hook):
        a = seen["a_mid"]
        if isinstance(iv, LoRA):
            return act + m * (a @ iv.A @ iv.B)
        return act + m * (a @ iv.dW + iv.db)

    expected = logits_with(
        model, tokens, [(f"blocks.{LAYER}.mlp.hook_post", record), (f"blocks.{LAYER}.hook_mlp_out", add)]
    )
    with steer(model, iv, m=m):
        got = logits_with(model, tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(got, logits_with(model, tokens))
    torch.testing.assert_close(logits_with(model, tokens, iv.hooks(m)), expected, rtol=0, atol=1e-12)
    assert no_hooks_left(model)


@pytest.mark.parametrize("form", ["lora", "local_weight"])
def test_module_delta_is_a_change_of_the_down_projection(form):
    """The unified view: adding m*(a_mid A B) at hook_mlp_out is W_out + m*A@B (and b_out + m*db)."""
    model = make_model("llama")
    iv = random_lora(model) if form == "lora" else random_local_weight(model)
    tokens = model.to_tokens(TEXT)
    with steer(model, iv, m=0.8):
        steered = logits_with(model, tokens)
    edited = make_model("llama")
    mlp = edited.blocks[LAYER].mlp
    with torch.no_grad():
        if form == "lora":
            mlp.W_out += 0.8 * iv.A @ iv.B
        else:
            mlp.W_out += 0.8 * iv.dW
            mlp.b_out += 0.8 * iv.db
    torch.testing.assert_close(steered, logits_with(edited, tokens), rtol=0, atol=1e-10)


@pytest.mark.parametrize("make", [random_lora, random_local_weight], ids=["lora", "local_weight"])
def test_m_zero_is_the_clean_model_bit_for_bit(tiny_any, make):
    model = tiny_any
    iv = make(model)
    tokens = model.to_tokens(TEXT)
    clean = logits_with(model, tokens)
    with steer(model, iv, m=0.0):
        assert torch.equal(logits_with(model, tokens), clean)
    assert iv.hooks(0.0) == []
    assert no_hooks_left(model)


@pytest.mark.parametrize("make", [random_lora, random_local_weight], ids=["lora", "local_weight"])
def test_save_load_round_trip(tiny, make, tmp_path):
    model = tiny
    iv = make(model, positions="generated", method="split", info={"note": "x"})
    iv.model_identity = tl_steer.model_identity(model)
    path = tl_steer.save(iv, tmp_path / "delta")
    meta = tl_steer.read_metadata(path)
    assert meta["kind"] == iv.kind
    assert meta["widths"] == {
        f"blocks.{LAYER}.mlp.hook_post": model.cfg.d_mlp,
        f"blocks.{LAYER}.hook_mlp_out": model.cfg.d_model,
    }
    loaded = tl_steer.load(path, model=model)
    assert type(loaded) is type(iv)
    assert loaded.layer == LAYER and loaded.positions.kind == "generated" and loaded.method == "split"
    assert loaded.info == {"note": "x"}
    for name, tensor in iv.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor)
    tokens = model.to_tokens(TEXT)
    with tl_steer.prompt_boundary(3), steer(model, iv, m=1.3):
        a = logits_with(model, tokens)
    with tl_steer.prompt_boundary(3), steer(model, loaded, m=1.3):
        b = logits_with(model, tokens)
    assert torch.equal(a, b)


def test_saved_delta_refuses_a_model_of_another_width(tiny, tmp_path):
    path = tl_steer.save(random_lora(tiny), tmp_path / "lora")
    with pytest.raises(ShapeError, match="width"):
        tl_steer.load(path, model=make_model("gpt2", d_model=16))


def generate(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens", **kw)


@pytest.mark.parametrize(
    "make, policy", [(random_lora, "all"), (random_lora, "generated"), (random_local_weight, "prompt")]
)
def test_cached_and_uncached_generation_agree_while_steered(tiny_any, make, policy):
    model = tiny_any
    iv = make(model, scale=1.0 if make is random_lora else 0.3, positions=policy)
    clean = generate(model, "hello world")
    with steer(model, iv, m=1.0):
        cached = generate(model, "hello world", use_past_kv_cache=True)
        uncached = generate(model, "hello world", use_past_kv_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, clean)  # the steering does change the text
    assert no_hooks_left(model)


def test_bad_tensors_are_refused():
    with pytest.raises(ShapeError, match="rank"):
        LoRA(0, torch.zeros(8, 2), torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="2-D"):
        LoRA(0, torch.zeros(8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        LocalWeight(0, torch.full((8, 4), math.nan))
    with pytest.raises(ShapeError, match="db"):
        LocalWeight(0, torch.zeros(8, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="layer"):
        LocalWeight(-1, torch.zeros(8, 4))
    with pytest.raises(ValueError, match="rank"):
        LoRA.for_model(make_model("llama"), 0, rank=0)


def test_row_strength_hooks_equal_one_strength_per_row(tiny):
    """The trainer's per-example strengths: a batch with a different m per row equals each row alone."""
    model = tiny
    iv = random_lora(model, positions="generated")
    tokens = model.to_tokens(["hello world, the weather", "the film was wonderful"], padding_side="right")
    ms = torch.tensor([0.7, -1.9], dtype=model.cfg.dtype)
    with tl_steer.prompt_boundary(2):
        batched = logits_with(model, tokens, iv.row_hooks(ms, model=model))
        for row in range(2):
            alone = logits_with(model, tokens[row : row + 1], iv.hooks(float(ms[row])))
            torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-10)


# ----- training ----------------------------------------------------------------------------------------
TRAIN = dict(epochs=8, batch_size=4, progress=False)
# The published LoRA lr (0.01) moves this tiny random model too slowly for 16 steps.
LR = {"vector": None, "lora": 0.05, "local_weight": None}


@pytest.fixture(scope="module")
def trained(tiny_any):
    """SPLIT in each form on each tiny architecture, with the model's state before and after."""
    before = {k: v.clone() for k, v in tiny_any.state_dict().items()}
    flags = [p.requires_grad for p in tiny_any.parameters()]
    with threads(1):
        out = {form: split(tiny_any, PAIRS, LAYER, form, lr=LR[form], **TRAIN) for form in FORMS}
    return out, before, flags


@pytest.mark.parametrize("form", FORMS)
def test_training_lowers_the_loss(trained, form):
    _, history = trained[0][form]
    assert list(history.columns) == ["epoch", "step", "loss", "L_p", "L_n", "hinge", "pref", "lr", "grad_norm"]
    assert len(history) == TRAIN["epochs"] * 2  # 8 pairs, 4 per step
    per_epoch = history.groupby("epoch")["loss"].mean()
    assert per_epoch.iloc[-1] < per_epoch.iloc[0] - 0.3
    # the linear schedule decays the learning rate towards 0
    assert history["lr"].is_monotonic_decreasing and history["lr"].iloc[-1] < 0.1 * history["lr"].iloc[0]


@pytest.mark.parametrize("form", FORMS)
def test_split_pushes_held_out_preference_up(tiny_any, trained, form):
    tiny = tiny_any
    iv, _ = trained[0][form]
    assert iv.method == "split" and iv.info["form"] == form
    # m = 1 is the strength it was trained for: the median of the training grid (11 or 1.1 raw).
    assert iv.unit == {"vector": 11.0, "lora": 1.1, "local_weight": 1.1}[form]
    assert "m_typical" not in iv.info and iv.info["m_grid"] == list(DEFAULTS[form]["m_grid"])
    assert pref(tiny, HELD_OUT, iv, 1.0) > pref(tiny, HELD_OUT) + 0.05
    assert pref(tiny, PAIRS, iv, 1.0) > pref(tiny, PAIRS) + 0.2


@pytest.mark.parametrize("form", FORMS)
def test_m_1_is_the_median_raw_strength_of_the_grid(tiny_any, trained, form):
    """m = 1 moves PrefOdds exactly as the raw median strength (0.1.0's m = m_typical) did, and m = r as
    r times it; the raw strength 1 (0.1.0's m = 1) is a different, weaker point."""
    iv, _ = trained[0][form]
    raw = iv.with_unit(1.0)
    assert pref(tiny_any, HELD_OUT, iv, 1.0) == pytest.approx(pref(tiny_any, HELD_OUT, raw, iv.unit), abs=1e-6)
    assert pref(tiny_any, HELD_OUT, iv, -0.5) == pytest.approx(pref(tiny_any, HELD_OUT, raw, -0.5 * iv.unit), abs=1e-6)
    if form == "vector":  # raw 1 is a tenth of the median 11: far weaker (LoRA's 1 is close to its 1.1)
        clean = pref(tiny_any, PAIRS)
        assert pref(tiny_any, PAIRS, iv, 1.0) - clean > 2 * (pref(tiny_any, PAIRS, raw, 1.0) - clean)


def test_the_model_is_frozen_and_unchanged(tiny_any, trained):
    tiny = tiny_any
    results, before, flags = trained
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny.parameters()] == flags
    assert all(p.grad is None for p in tiny.parameters())
    assert no_hooks_left(tiny)
    for iv, _ in results.values():
        assert all(not t.requires_grad for t in iv.tensors().values())


def test_trained_interventions_are_the_expected_kinds(tiny_any, trained):
    tiny = tiny_any
    results = trained[0]
    assert isinstance(results["vector"][0], AddVector)
    assert results["vector"][0].hook == f"blocks.{LAYER}.hook_resid_post"
    assert isinstance(results["lora"][0], LoRA) and results["lora"][0].rank == 4
    assert isinstance(results["local_weight"][0], LocalWeight)
    for iv, _ in results.values():
        iv.check(tiny)


def test_logged_loss_equals_an_independent_evaluation(tiny_any):
    """Step 2 of a run is computed with the parameters a 1-step run ends with (same seed, same first lr);
    its logged L_p / L_n must equal the mean NLLs from pair_nll at that strength."""
    tiny = tiny_any
    kw = dict(batch_size=len(PAIRS), m_grid=[1.5], progress=False)
    one, _ = split(tiny, PAIRS, LAYER, "lora", epochs=1, **kw)
    _, history = split(tiny, PAIRS, LAYER, "lora", epochs=2, **kw)
    assert one.unit == 1.5  # the grid's one strength is m = 1
    lp, ln = tl_steer.pair_nll(tiny, PAIRS, interventions=[one], m=1.0)
    assert history.loc[1, "L_p"] == pytest.approx(float(lp.mean()), abs=1e-5)
    assert history.loc[1, "L_n"] == pytest.approx(float(ln.mean()), abs=1e-5)
    # Step 1 is the clean model: B starts at zero.
    lp0, ln0 = tl_steer.pair_nll(tiny, PAIRS)
    assert history.loc[0, "L_p"] == pytest.approx(float(lp0.mean()), abs=1e-5)


def test_training_is_deterministic_given_the_seed(tiny):
    kw = dict(epochs=2, batch_size=4, progress=False, add_subtract=True)
    a, ha = split(tiny, PAIRS, LAYER, "lora", seed=3, **kw)
    b, hb = split(tiny, PAIRS, LAYER, "lora", seed=3, **kw)
    c, _ = split(tiny, PAIRS, LAYER, "lora", seed=4, **kw)
    assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert ha.equals(hb)
    assert not torch.equal(a.A, c.A)


def test_sft_is_split_with_only_the_positive_term(tiny):
    kw = dict(epochs=2, batch_size=4, progress=False)
    a, ha = sft(tiny, PAIRS, LAYER, "vector", **kw)
    b, hb = split(tiny, PAIRS, LAYER, "vector", lambda_p=1.0, lambda_n=0.0, gamma=0.0, theta=0.0, **kw)
    assert torch.equal(a.vector, b.vector)
    assert a.method == "sft" and b.method == "split"
    assert (ha["loss"] - ha["L_p"]).abs().max() < 1e-6


def test_add_subtract_steers_both_ways(tiny):
    iv, history = split(tiny, PAIRS, LAYER, "vector", epochs=3, batch_size=8, add_subtract=True, progress=False)
    assert len(history) == 3 * 2  # 16 examples (8 pairs at +m and at -m), 8 per step
    assert pref(tiny, PAIRS, iv, -1.0) < pref(tiny, PAIRS) < pref(tiny, PAIRS, iv, 1.0)


def test_early_stopping(tiny):
    # lr so small that the epoch loss cannot improve by more than noise: stops after `patience` epochs
    # theta 0.5 keeps the loss near 13, where its float32 rounding noise stays below the 1e-6 improvement step.
    iv, history = split(tiny, PAIRS, LAYER, "vector", epochs=10, batch_size=8, lr=1e-12, m_grid=[1.0],
                        early_stop_patience=2, progress=False, theta=0.5)  # fmt: skip
    assert iv.info["epochs_run"] == 3 and history["epoch"].max() == 2


def test_hooks_removed_and_flags_restored_when_training_fails(tiny, monkeypatch):
    flags = [p.requires_grad for p in tiny.parameters()]
    original = split_module.PrefixCache.logits
    calls = []

    def failing(self, *args, **kw):
        calls.append(1)
        original(self, *args, **kw)
        assert not no_hooks_left(tiny)  # the training hooks are on while the forward pass runs
        raise RuntimeError("boom")

    monkeypatch.setattr(split_module.PrefixCache, "logits", failing)
    with pytest.raises(RuntimeError, match="boom"):
        split(tiny, PAIRS, LAYER, "lora", epochs=1, batch_size=4, progress=False)
    assert calls and no_hooks_left(tiny)
    assert [p.requires_grad for p in tiny.parameters()] == flags


# ----- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layer=3), ConfigError, r"layer must be an int in 0\.\.2"),
        (dict(layer=-1), ConfigError, "layer"),
        (dict(form="lora2"), ConfigError, "'vector', 'lora', 'local_weight'"),
        (dict(batch_size=9), DataError, "8 pairs are fewer than one batch"),
        (dict(lambda_n=-0.1), ConfigError, "lambda_n must be >= 0"),
        (dict(gamma=-1), ConfigError, "gamma must be >= 0"),
        (dict(lambda_p=0, lambda_n=0, gamma=0), ConfigError, "nothing to train"),
        (dict(rank=0), ConfigError, "rank must be an int >= 1"),
        (dict(lr=math.nan), ConfigError, "lr must be finite"),
        (dict(lr=math.inf), ConfigError, "lr must be finite"),
        (dict(lr=0.0), ConfigError, "lr must be > 0"),
        (dict(m_grid=[]), ConfigError, "m_grid is empty"),
        (dict(m_grid=[1.0, -2.0]), ConfigError, "m_grid"),
        (dict(epochs=0), ConfigError, "epochs"),
        (dict(early_stop_patience=0), ConfigError, "early_stop_patience"),
    ],
)
def test_bad_input_raises_before_any_work(tiny, monkeypatch, kwargs, error, match):
    def no_work(*args, **kw):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(split_module, "tokenize_completions", no_work)
    args = dict(layer=LAYER, form="lora", batch_size=4) | kwargs
    with pytest.raises(error, match=match) as info:
        split(tiny, PAIRS, args.pop("layer"), args.pop("form"), progress=False, **args)
    assert isinstance(info.value, TlSteerError) and isinstance(info.value, ValueError)


def test_bad_pairs_are_data_errors(tiny):
    with pytest.raises(DataError, match="empty"):
        split(tiny, [], LAYER, progress=False)
    with pytest.raises(DataError, match="not a ContrastivePair"):
        sft(tiny, ["a", "b"], LAYER, batch_size=1, progress=False)


# ----- the default model -------------------------------------------------------------------------------
@pytest.mark.default_model
def test_split_vector_on_the_default_model_raises_held_out_preference(default_model):
    train = tl_steer.load_pairs("sentiment", "train")[:16]
    test = tl_steer.load_pairs("sentiment", "test")[:16]
    iv, history = split(default_model, train, 15, "vector", epochs=1, batch_size=8, progress=False)
    assert len(history) == 2
    assert iv.unit == 11.0
    assert pref(default_model, test, iv, 1.0) > pref(default_model, test) + 0.2  # measured 0.49 -> 0.88
    assert no_hooks_left(default_model)
