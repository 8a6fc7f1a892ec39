"""Shared fixtures: tiny seeded HookedTransformers with a tiny offline BPE tokenizer, and the default model."""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, settings
from jaxtyping import install_import_hook
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.weight_processing import ProcessWeights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests/tl4 is the TransformerLens 4 suite, run on its own by `make test-tl4` (in .venv-tl4, with its own conftest).
collect_ignore = ["tl4"]

# ----- run-time shape checks: the jaxtyping annotations of tl_steer are checked by beartype on each call ---
# (as TransformerLens' own tests do). Installed before anything imports tl_steer; the test
# test_jaxtyping_shapes_are_checked_at_run_time fails if it ever stops being active. TL_STEER_SHAPE_CHECKS=0
# turns it off (to time the suite without it).
# Only the modules that use jaxtyping annotations are instrumented: decorating every function of the others
# would cost import time for nothing.
SHAPE_CHECKS = os.environ.get("TL_STEER_SHAPE_CHECKS", "1") != "0"
_PACKAGE = Path(__file__).resolve().parents[1] / "tl_steer"
SHAPE_CHECKED_MODULES = sorted(
    ".".join(path.relative_to(_PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in _PACKAGE.rglob("*.py")
    if "from jaxtyping import" in path.read_text(encoding="utf-8")
)
JAXTYPING_HOOK = install_import_hook(SHAPE_CHECKED_MODULES, "_shapes.shapes_only") if SHAPE_CHECKS else None

# ----- fuzzing (tests/test_fuzz_loaders.py): hypothesis profiles and a count of the inputs tried ----------
# "ci" (the default) is small and derandomized, so CI runs the same examples every time; "large"
# (TL_STEER_FUZZ=large or HYPOTHESIS_PROFILE=large; `make fuzz`) gives every loader >= 10,000 inputs.
FUZZ_EXAMPLES = {"ci": 200, "large": 2000}
for _name, _examples in FUZZ_EXAMPLES.items():
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
FUZZ_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or ("large" if os.environ.get("TL_STEER_FUZZ") == "large" else "ci")
settings.load_profile(FUZZ_PROFILE)
FUZZ_COUNTS: collections.Counter[str] = collections.Counter()


def count_fuzz_input(loader: str) -> None:
    """Record one generated input tried on ``loader`` (reported by pytest_terminal_summary)."""
    FUZZ_COUNTS[loader] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FUZZ_COUNTS:
        return
    terminalreporter.section(f"fuzzed inputs per loader (hypothesis profile {FUZZ_PROFILE!r})")
    for loader, n in sorted(FUZZ_COUNTS.items()):
        terminalreporter.write_line(f"{loader:<40} {n:>8}")
    if out := os.environ.get("TL_STEER_FUZZ_COUNTS"):
        Path(out).write_text(json.dumps(dict(sorted(FUZZ_COUNTS.items())), indent=1) + "\n")


# ----- end of the fuzzing block ---------------------------------------------------------------------------

# The tiny tokenizer and tiny Hugging Face models live in _tiny_hf.py (no TransformerLens import), which the
# TransformerLens 4 suite (tests/tl4) shares.
from _tiny_hf import BRIDGE_ARCHITECTURES, make_hf, make_tokenizer  # noqa: E402, F401

# Sentiment pairs (prompt, positive, negative) in the tiny tokenizer's vocabulary, shared by the tiny-model
# method tests: each takes the first few it needs (ContrastivePair(*t)), so their data stay the same.
SENTIMENT_PAIRS = [
    ("The film was", " wonderful and kind.", " awful and cold."),
    ("I went to the market and", " bought fresh bread.", " the food was awful."),
    ("hello world, the weather is", " fine today.", " cold and dirty."),
    ("The staff were", " kind and friendly.", " rude."),
    ("The food was", " wonderful.", " awful and cold."),
    ("The weather is", " kind and fine.", " dirty and cold."),
]
# The hook the tiny-model method tests steer at.
TINY_HOOK = "blocks.1.hook_resid_post"
# Multiple-choice questions (question, options, answer index) in the tiny tokenizer's vocabulary: MCItem(*t).
MC_QUESTIONS = [
    ("What is wide?", ("the world", "the bread", "the tea", "the room"), 0),
    ("How was the film?", ("awful", "wonderful", "cold", "dirty"), 1),
    ("What did I buy at the market?", ("fresh bread", "a film", "the weather", "a room"), 0),
    ("The staff were", ("cold", "dirty", "kind and friendly", "awful"), 2),
    ("hello", ("world", "market", "tea", "bread and a cup of tea"), 0),
]


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
    # The GPT-2 style after TransformerLens' weight processing (fold_ln, center_writing_weights,
    # center_unembed, fold_value_biases), as HookedTransformer.from_pretrained loads it by default: its
    # normalisation becomes "LNPre" (no weights of its own), so the residual stream is mean-centred.
    # make_model pops the flag; make_model("gpt2_folded", fold=False) is the same function unprocessed.
    "gpt2_folded": dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new", fold=True),
    # Pythia / GPT-NeoX style: LayerNorm, attention and MLP in parallel (no resid_mid), rotary on a
    # quarter of each head (rotary_pct=0.25 of d_head=8; rotated in halves, not adjacent pairs), exact GELU.
    "neox": dict(
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=2,
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=True,
        act_fn="gelu",
    ),
}


def make_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    d_model: int = 32,
    dtype: torch.dtype = torch.float64,
    fold: bool | None = None,
    initializer_range: float = 0.2,
) -> HookedTransformer:
    """A tiny randomly initialised HookedTransformer (3 layers), float64 by default so that
    comparisons between computation paths are exact to ~1e-12 and greedy decoding never flips on a tie.

    Architectures with ``fold=True`` in :data:`ARCHITECTURES` get random LayerNorm weights and biases
    (TransformerLens initialises them to 1 and 0, which would leave nothing to fold) and are then
    processed with ``process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)``
    (and TransformerLens' default fold_value_biases), computed in the model's dtype; ``fold=False``
    returns the same model before processing (the same log-probabilities to ~1e-14; the logits differ
    by center_unembed's per-position constant). ``fold`` is ignored for the other architectures.
    """
    tokenizer = make_tokenizer()
    options = dict(ARCHITECTURES[arch])
    arch_fold = bool(options.pop("fold", False))
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
        initializer_range=initializer_range,
        **options,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    if arch_fold:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.split(".")[-2] in ("ln1", "ln2", "ln_final"):
                    noise = torch.randn(param.shape, generator=g, dtype=torch.float64).to(param.dtype)
                    param.add_(0.3 * noise)
        if fold is None or fold:
            # TransformerLens' own orchestration would round float64 weights through float32.
            with mock.patch.object(ProcessWeights, "process_weights", staticmethod(_process_weights_in_place_dtype)):
                model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    model.eval()
    return model


def _process_weights_in_place_dtype(
    state_dict: dict[str, torch.Tensor],
    cfg: HookedTransformerConfig,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
    adapter: object = None,
) -> dict[str, torch.Tensor]:
    """TransformerLens 3.9's ``ProcessWeights.process_weights`` for LayerNorm models, the same steps in the
    same order, but in the weights' own dtype. TransformerLens casts every weight to float32 for the
    processing (meant as an upcast from half precision), which for a float64 model costs ~1e-6 of logit
    agreement; kept in float64, folding changes log-probabilities by ~1e-14. Its agreement with
    TransformerLens' own processing is tested in tests/test_architectures.py."""
    assert adapter is None and not refactor_factored_attn_matrices and cfg.normalization_type in ("LN", "LNPre")
    if fold_ln:
        state_dict = ProcessWeights.fold_layer_norm(state_dict, cfg, fold_biases=True, center_weights=True)
    if center_writing_weights:
        state_dict = ProcessWeights.center_writing_weights(state_dict, cfg)
    if center_unembed:
        state_dict = ProcessWeights.center_unembed(state_dict, cfg=cfg)
    if fold_value_biases:
        state_dict = ProcessWeights.fold_value_biases(state_dict, cfg)
        if center_writing_weights:
            for layer in range(cfg.n_layers):
                b_O = state_dict[f"blocks.{layer}.attn.b_O"]
                state_dict[f"blocks.{layer}.attn.b_O"] = b_O - b_O.mean()
    return state_dict


# ----- the same tiny models as TransformerLens 3.9+ TransformerBridges (TransformerLens' current class) -------
# A bridge wraps a Hugging Face model, so these start from tiny random Hugging Face models. hooked_from_hf turns
# the same Hugging Face model into a HookedTransformer with the same weights (make_host_pair).
def make_bridge(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float64, hf: Any = None) -> Any:
    """The tiny Hugging Face model of :func:`make_hf` booted into a TransformerBridge (offline), with
    ``default_prepend_bos=True`` as :func:`make_model` (the bridge's own default)."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    hf = make_hf(arch, seed=seed, dtype=dtype) if hf is None else hf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            f"tiny-{arch}-{seed}", hf_model=hf, tokenizer=make_tokenizer(), dtype=dtype
        )
    bridge.cfg.model_name = f"tiny-{arch}-{seed}"
    bridge.cfg.default_prepend_bos = True  # as make_model (the bridge reads it from the tokenizer otherwise)
    bridge.eval()
    return bridge


def make_host_pair(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
    """(HookedTransformer, TransformerBridge) with the same weights: one Hugging Face model, converted by
    TransformerLens' weight conversion (tl_steer.hooked_from_hf) and wrapped by the bridge."""
    import tl_steer

    hf = make_hf(arch, seed=seed, dtype=dtype)
    hooked = tl_steer.hooked_from_hf(
        hf, make_tokenizer(), dtype=dtype, default_prepend_bos=True, model_name=f"tiny-{arch}-{seed}"
    )
    return hooked, make_bridge(arch, seed=seed, dtype=dtype, hf=hf)


@pytest.fixture(scope="session")
def tiny_bridge() -> Any:
    return make_bridge("llama")


@pytest.fixture(scope="session", params=["hooked", "bridge"])
def tiny_host(request: pytest.FixtureRequest) -> Any:
    """The tiny Llama-style model on either host (tests that must pass on both take this fixture)."""
    return make_model("llama") if request.param == "hooked" else make_bridge("llama")


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """One torch thread for a module of tiny-model tests: tiny float64 matmuls run many times slower with
    2 threads than with 1 on a busy 2-core machine. Restored afterwards (the default model wants both)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
