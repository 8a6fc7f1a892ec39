"""The tiny tokenizer and tiny random Hugging Face models of the tests, without TransformerLens: tests/conftest.py
and the TransformerLens 4 suite (tests/tl4/conftest.py, where HookedTransformer does not exist) both use them."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_CORPUS = [
    "hello world, the world is wide and the weather is fine today.",
    "I went to the market and bought fresh bread and a cup of tea.",
    "The film was wonderful and the staff were kind and friendly.",
    "The food was awful and the room was cold and dirty.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 300 tokens trained on a fixed corpus (deterministic, offline).

    It merges across word pieces, e.g. "hello wor" -> [.., 'wor'] but "hello world" -> [.., 'world'].
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    # TransformerLens reloads the tokenizer from its name_or_path, so give it a folder to reload from.
    folder = tempfile.mkdtemp(prefix="tl_steer_tok_")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


BRIDGE_ARCHITECTURES = ("llama", "gpt2", "neox")


def make_hf(
    arch: str = "llama",
    *,
    seed: int = 0,
    d_model: int = 32,
    dtype: torch.dtype = torch.float64,
    n_layers: int = 3,
    d_mlp: int | None = None,
    initializer_range: float = 0.2,
) -> Any:
    """A tiny random Hugging Face causal LM (3 layers, d_mlp = 2 d_model by default) over
    :func:`make_tokenizer`'s vocabulary."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    vocab = len(make_tokenizer())
    d_mlp = 2 * d_model if d_mlp is None else d_mlp
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        cfg: Any = LlamaConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            initializer_range=initializer_range,
            **special,
        )
        hf: Any = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=4,
            initializer_range=initializer_range,
            **special,
        )
        hf = GPT2LMHeadModel(cfg)
    elif arch == "neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=128,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            initializer_range=initializer_range,
            **special,
        )
        hf = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(f"no tiny Hugging Face model for {arch!r}; use one of {BRIDGE_ARCHITECTURES}")
    return hf.to(dtype).eval()
