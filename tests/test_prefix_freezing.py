"""The shared clean-prefix reuse (tl_steer.prefix) against full forward passes, and parameter freezing
(tl_steer.freezing): flags, training mode and gradients restored, also on error."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, no_hooks_left
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer.freezing import frozen, trainable
from tl_steer.prefix import CleanPrefix, PrefixCache, reusable_start
from tl_steer.scoring import pad_right, pad_token_id, tokenize_completions

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["hello world, the weather is fine today.", "The food was awful", "I went to the market and"]


def test_reusable_start(tiny_any):
    model = tiny_any
    n = model.cfg.n_layers
    assert reusable_start(model, 0) is None and reusable_start(model, n) is None
    assert [reusable_start(model, layer) for layer in range(1, n)] == list(range(1, n))


def test_no_restart_under_shortformer_positions():
    model = make_model("gpt2")
    model.cfg.positional_embedding_type = "shortformer"  # only the config is read
    try:
        assert reusable_start(model, 1) is None and not CleanPrefix(model, 1).enabled
    finally:
        model.cfg.positional_embedding_type = "standard"


def test_clean_prefix_equals_a_full_pass_with_a_steering_hook(tiny_any):
    """A pass restarted from the cached residual gives the full pass's logits, with an intervention at the
    restart block or after it; at an earlier block than the restart it would not (checked: the shortcut is
    only exact when nothing before ``start`` changes)."""
    model = tiny_any
    tokens = model.to_tokens(TEXTS, padding_side="right")
    vector = torch.randn(model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            iv = tl_steer.AddVector(f"blocks.{layer}.hook_resid_post", vector)
            prefix = CleanPrefix(model, iv.first_layer(model.cfg.n_layers))
            resid = prefix.residual(tokens)
            assert (resid is None) == (layer == 0)
            with tl_steer.steer(model, iv, m=1.0):
                full = model(tokens)
                restarted = prefix.forward(tokens, resid)
            torch.testing.assert_close(restarted, full, rtol=0, atol=1e-12)
            if layer > 0:
                # The same shortcut from a later block misses the edit: the comparison above can fail.
                late = CleanPrefix(model, layer + 1) if layer + 1 < model.cfg.n_layers else None
                if late is not None:
                    clean_late = late.residual(tokens)
                    with tl_steer.steer(model, iv, m=1.0):
                        skipped = late.forward(tokens, clean_late)
                    assert not torch.allclose(skipped, full)
        # Disabled: the whole model from the tokens.
        off = CleanPrefix(model, 1, enabled=False)
        assert off.residual(tokens) is None
        torch.testing.assert_close(off.forward(tokens, None), model(tokens), rtol=0, atol=0)
    assert no_hooks_left(model)


def test_prefix_cache_logits_equal_a_full_pass(tiny_any):
    model = tiny_any
    data = tokenize_completions(model, ["The film was", "I went to the market and"], [" good.", " bought bread."])
    idx = [1, 0]
    tokens = pad_right([data.sequences[i] for i in idx], pad_token_id(model), "cpu")
    lengths = [len(data.sequences[i]) for i in idx]
    first = min(data.starts[i] for i in idx) - 1
    with torch.no_grad():
        full = model(tokens)[:, first:]
        for layer in (0, 1, model.cfg.n_layers - 1):
            cache = PrefixCache(model, data, layer, batch_size=1)
            assert cache.enabled == (layer > 0)
            logits = cache.logits(idx, tokens, first)
            for row, n in enumerate(lengths):  # right padding: only the real positions are defined
                torch.testing.assert_close(logits[row, : n - first], full[row, : n - first], rtol=0, atol=1e-12)


def test_frozen_sets_exactly_the_named_flags_and_restores_them_on_error():
    model: HookedTransformer = make_model("llama")
    names = [name for name, _ in model.named_parameters()]
    first = dict(model.named_parameters())[names[0]]
    first.requires_grad_(False)  # a flag that differs from the others must come back as it was
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    with pytest.raises(RuntimeError, match="boom"), frozen(model, [names[1]], eval_mode=True):
        assert [p.requires_grad for p in model.parameters()] == [n == names[1] for n in names]
        assert not model.training
        raise RuntimeError("boom")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert model.training
    with frozen(model):  # without eval_mode the training mode is left alone
        assert model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training
    first.requires_grad_(True)
    model.eval()


def test_trainable_clears_grads_and_flags():
    t = torch.zeros(3)
    with pytest.raises(RuntimeError, match="boom"), trainable([t]):
        assert t.requires_grad
        (t * 2).sum().backward()
        assert t.grad is not None
        raise RuntimeError("boom")
    assert not t.requires_grad and t.grad is None
