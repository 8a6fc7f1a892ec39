"""Fixtures of the TransformerLens 4 suite (`make test-tl4`): tiny random Hugging Face models booted into
TransformerBridges with tl_steer.bridge_from_hf, offline.

This folder runs in its own venv (.venv-tl4: transformer-lens 4, no sae-lens) with
``pytest --confcutdir tests/tl4 tests/tl4``, so the main conftest (which builds HookedTransformers, gone in 4.x) is
not loaded; the main suite leaves this folder out (tests/conftest.py's collect_ignore). The same command in the
main venv runs it on TransformerLens 3.9.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "hello world, the world is wide and the weather is fine today.",
    "I went to the market and bought fresh bread and a cup of tea.",
    "The film was wonderful and the staff were kind and friendly.",
    "The food was awful and the room was cold and dirty.",
]
PAIRS = [
    ("The film was", " wonderful and kind.", " awful and cold."),
    ("I went to the market and", " bought fresh bread.", " the food was awful."),
    ("hello world, the weather is", " fine today.", " cold and dirty."),
    ("The staff were", " kind and friendly.", " rude."),
]
HOOK = "blocks.1.hook_resid_post"


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer of 300 tokens trained on :data:`CORPUS` (deterministic, offline)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    folder = tempfile.mkdtemp(prefix="tl_steer_tok_")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def make_hf(arch: str = "llama", seed: int = 0) -> Any:
    """A tiny random Hugging Face causal LM (3 layers, d_model 32, float64) over :func:`make_tokenizer`'s vocabulary."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        cfg: Any = LlamaConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            initializer_range=0.2,
            **special,
        )
        hf: Any = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        hf = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=300, n_positions=128, n_embd=32, n_layer=3, n_head=4, initializer_range=0.2, **special
            )
        )
    else:
        cfg = GPTNeoXConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            rotary_pct=0.25,
            initializer_range=0.2,
            **special,
        )
        hf = GPTNeoXForCausalLM(cfg)
    return hf.to(torch.float64).eval()


def make_bridge(arch: str = "llama", seed: int = 0) -> Any:
    import tl_steer

    return tl_steer.bridge_from_hf(
        make_hf(arch, seed), make_tokenizer(), default_prepend_bos=True, model_name=f"tiny-{arch}"
    )


@pytest.fixture(scope="session")
def bridge() -> Any:
    return make_bridge("llama")


@pytest.fixture(scope="session")
def pairs() -> list[Any]:
    import tl_steer

    return [tl_steer.ContrastivePair(*p) for p in PAIRS]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny float64 matmuls run faster on one thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def no_hooks_left(model: Any) -> bool:
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())
