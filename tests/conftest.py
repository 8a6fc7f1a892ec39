"""Shared fixtures: tiny seeded HookedTransformers with a tiny offline BPE tokenizer, and the default model."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    return AutoTokenizer.from_pretrained(folder)


ARCHITECTURES = {
    # Llama style: RMSNorm, rotary, gated MLP, grouped-query attention.
    "llama": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        final_rms=True,
    ),
    # GPT-2 style: LayerNorm, learned absolute positions.
    "gpt2": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new"),
}


def make_model(
    arch: str = "llama", *, seed: int = 0, d_model: int = 32, dtype: torch.dtype = torch.float64
) -> HookedTransformer:
    """A tiny randomly initialised HookedTransformer (3 layers), float64 by default so that
    comparisons between computation paths are exact to ~1e-12 and greedy decoding never flips on a tie."""
    tokenizer = make_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=d_model,
        n_heads=4,
        d_head=d_model // 4,
        d_mlp=2 * d_model,
        n_ctx=128,
        d_vocab=len(tokenizer),
        seed=seed,
        dtype=dtype,
        device="cpu",
        default_prepend_bos=True,
        model_name=f"tiny-{arch}-{seed}",
        initializer_range=0.2,
        **ARCHITECTURES[arch],
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny() -> HookedTransformer:
    return make_model("llama")


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def tiny_any(request: pytest.FixtureRequest) -> HookedTransformer:
    return make_model(request.param)


@pytest.fixture(scope="session")
def default_model() -> HookedTransformer:
    import tl_steer

    return tl_steer.load_default_model()


def no_hooks_left(model: HookedTransformer) -> bool:
    """True when no hook point of the model has a forward or backward hook attached."""
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())
