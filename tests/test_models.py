"""hooked_from_hf on tiny random Hugging Face models (offline), and model identity."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import tl_steer


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_neox() -> GPTNeoXForCausalLM:
    """Pythia's layout: parallel attention and MLP, rotary on a quarter of each head, untied unembedding."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    return GPTNeoXForCausalLM(cfg).eval()


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
