"""hooked_from_hf and bridge_from_hf on tiny random Hugging Face models (offline), the default model's cache
layout and host choice, and model identity."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_hf, make_model, make_tokenizer
from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM

import tl_steer
import tl_steer.models as models
from tl_steer.hosts import is_bridge


# Hugging Face's own initialisation (range 0.02), float32, 2 layers, d_model 64: conftest.make_hf's settings
# for these tests, which compare converted and wrapped models with Hugging Face's logits in float32.
def tiny_llama() -> LlamaForCausalLM:
    return make_hf("llama", d_model=64, dtype=torch.float32, n_layers=2, initializer_range=0.02)


def tiny_gpt2() -> GPT2LMHeadModel:
    return make_hf("gpt2", d_model=64, dtype=torch.float32, n_layers=2, initializer_range=0.02)


def tiny_neox() -> GPTNeoXForCausalLM:
    """Pythia's layout: parallel attention and MLP, rotary on a quarter of each head, untied unembedding."""
    return make_hf("neox", d_model=64, dtype=torch.float32, n_layers=2, d_mlp=256, initializer_range=0.02)


@pytest.mark.parametrize("make_hf", [tiny_llama, tiny_gpt2, tiny_neox], ids=["llama", "gpt2", "neox"])
def test_hooked_from_hf_matches_hugging_face_logits(make_hf):
    hf = make_hf()
    before = hf.config.to_dict()
    model = tl_steer.hooked_from_hf(hf, make_tokenizer(), model_name="tiny")
    if make_hf is tiny_neox:
        assert model.cfg.parallel_attn_mlp and model.cfg.rotary_dim == 4
    tokens = torch.tensor([[0, 5, 17, 42, 99, 250, 7, 3]])
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    assert model.cfg.model_name == "tiny"
    assert hf.config.to_dict() == before  # the Hugging Face model is left as it was


def test_hooked_from_hf_activations_equal_hidden_states():
    hf = tiny_llama()
    model = tl_steer.hooked_from_hf(hf, make_tokenizer())
    tokens = torch.tensor([[0, 5, 17, 42, 99]])
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens)
    # hidden_states[l + 1] is the output of layer l (before the final norm for all but the last).
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hidden[1], atol=1e-5, rtol=1e-5)


def test_hooked_from_hf_rejects_non_models():
    with pytest.raises(TypeError, match="Hugging Face model"):
        tl_steer.hooked_from_hf(object(), make_tokenizer())


def test_model_identity_tells_models_apart():
    a, b, c = make_model(seed=0), make_model(seed=1), make_model(seed=0)
    c.to(torch.float32)
    ia, ib, ic = (tl_steer.model_identity(m) for m in (a, b, c))
    assert ia["d_model"] == ib["d_model"] and ia["embed_checksum"] != ib["embed_checksum"]
    assert ia["embed_checksum"] == pytest.approx(ic["embed_checksum"], rel=1e-6)  # dtype-independent


# ----- bridge_from_hf: the same Hugging Face models in a TransformerBridge -------------------------------------


@pytest.mark.parametrize("make_hf", [tiny_llama, tiny_gpt2, tiny_neox], ids=["llama", "gpt2", "neox"])
def test_bridge_from_hf_gives_the_hugging_face_logits_and_hook_names(make_hf):
    hf = make_hf()
    tokens = torch.tensor([[0, 5, 17, 42, 99, 250, 7, 3]])
    with torch.no_grad():
        expected = hf(tokens).logits
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    model = tl_steer.bridge_from_hf(hf, make_tokenizer(), model_name="tiny")
    assert is_bridge(model) and model.cfg.model_name == "tiny"
    assert model.cfg.default_prepend_bos is False  # the tiny tokenizer adds no BOS of its own
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    # The bridge runs Hugging Face's own modules: the logits are theirs (float32 rounding aside).
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hidden[1], atol=1e-5, rtol=1e-5)


def test_bridge_from_hf_names_and_bos_defaults():
    hf = tiny_llama()
    hf.config._name_or_path = "some/llama"
    model = tl_steer.bridge_from_hf(hf, make_tokenizer(), default_prepend_bos=True)
    assert model.cfg.model_name == "some/llama" and model.cfg.default_prepend_bos is True
    assert model.to_tokens("hello")[0, 0].item() == make_tokenizer().bos_token_id
    unnamed = tiny_gpt2()
    unnamed.config._name_or_path = ""
    assert tl_steer.bridge_from_hf(unnamed, make_tokenizer()).cfg.model_name == "GPT2LMHeadModel"


def test_bridge_from_hf_rejects_non_models():
    with pytest.raises(TypeError, match="Hugging Face model"):
        tl_steer.bridge_from_hf(object(), make_tokenizer())


def test_the_bridge_and_the_hooked_transformer_of_one_model_agree():
    hf = tiny_llama()
    hooked = tl_steer.hooked_from_hf(hf, make_tokenizer())
    bridge = tl_steer.bridge_from_hf(hf, make_tokenizer())
    tokens = torch.tensor([[0, 5, 17, 42, 99]])
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hooked(tokens), atol=1e-5, rtol=1e-5)


# ----- the default model's cache: HookedTransformer's layout, written and read without TransformerLens ---------


def test_the_cache_layout_is_transformer_lens_own_llama_conversion_bit_for_bit():
    hf = tiny_llama()
    hooked = tl_steer.hooked_from_hf(hf, make_tokenizer())
    ours = models._llama_to_cache(hf)
    theirs = {k: v for k, v in hooked.state_dict().items() if k in dict(hooked.named_parameters())}
    del theirs["unembed.W_U"]  # tied: the cache stores W_E once
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    back = models._cache_to_llama(ours, hf.config)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_the_cache_refuses_weights_that_are_not_a_llama():
    state = models._llama_to_cache(tiny_llama())
    state["blocks.0.attn.b_Q"] = state["blocks.0.attn.b_Q"] + 1.0
    with pytest.raises(tl_steer.TlSteerError, match="blocks.0.attn.b_Q"):
        models._cache_to_llama(state, tiny_llama().config)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """load_default_model wired to a tiny Llama 'read' from a fake GGUF file (counted), with its own cache."""
    hf, tokenizer, calls = tiny_llama(), make_tokenizer(), []

    def read(gguf):
        calls.append(gguf)
        return copy.deepcopy(hf), tokenizer

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" * 100)
    monkeypatch.setenv("TL_STEER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(models, "_read_gguf", read)
    return hf, calls


def test_the_default_model_as_a_bridge_from_the_file_and_from_the_cache(fake_gguf):
    hf, calls = fake_gguf
    tokens = torch.tensor([[0, 5, 17, 42, 99, 250]])
    with torch.no_grad():
        expected = hf(tokens).logits
    first = tl_steer.load_default_model(host="bridge")  # read from the "GGUF file", cache written
    second = tl_steer.load_default_model(host="bridge")  # rebuilt from the cache
    hooked = tl_steer.load_default_model(host="hooked")  # the same cache, the other host
    assert len(calls) == 1
    for model in (first, second):
        assert is_bridge(model) and model.cfg.model_name == "SmolLM2-135M-Instruct"
        assert model.cfg.default_prepend_bos is False and model.tokenizer.padding_side == "right"
    with torch.no_grad():
        torch.testing.assert_close(first(tokens), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(second(tokens), first(tokens))  # the cache round trip is exact
        torch.testing.assert_close(hooked(tokens), expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_host_is_refused_before_loading(fake_gguf):
    _, calls = fake_gguf
    with pytest.raises(tl_steer.ConfigError, match="'hooked', 'bridge'"):
        tl_steer.load_default_model(host="nnsight")
    assert not calls


def test_transformer_lens_deprecation_warning_is_not_hidden():
    """TransformerLens 3.9 deprecates HookedTransformer; tl_steer passes its warning on (the README says which host
    to use) instead of silencing it as it once did."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tl_steer.hooked_from_hf(tiny_llama(), make_tokenizer())
    assert any("HookedTransformer is deprecated" in str(w.message) for w in caught)
