"""Fixtures of the TransformerLens 4 suite (`make test-tl4`): tiny random Hugging Face models booted into
TransformerBridges with tl_steer.bridge_from_hf, offline.

This folder runs in its own venv (.venv-tl4: transformer-lens 4, no sae-lens) with
``pytest --confcutdir tests/tl4 tests/tl4``, so the main conftest (which builds HookedTransformers, gone in 4.x) is
not loaded; the main suite leaves this folder out (tests/conftest.py's collect_ignore). The same command in the
main venv runs it on TransformerLens 3.9.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny tokenizer and Hugging Face models are the main suite's (tests/_tiny_hf.py imports no TransformerLens).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny_hf import make_hf, make_tokenizer  # noqa: E402, F401

PAIRS = [
    ("The film was", " wonderful and kind.", " awful and cold."),
    ("I went to the market and", " bought fresh bread.", " the food was awful."),
    ("hello world, the weather is", " fine today.", " cold and dirty."),
    ("The staff were", " kind and friendly.", " rude."),
]
HOOK = "blocks.1.hook_resid_post"


def make_bridge(arch: str = "llama", seed: int = 0) -> Any:
    import tl_steer

    return tl_steer.bridge_from_hf(
        make_hf(arch, seed=seed), make_tokenizer(), default_prepend_bos=True, model_name=f"tiny-{arch}"
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
