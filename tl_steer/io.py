"""Saving and loading interventions: one safetensors file, with JSON metadata in its header.

The file holds the intervention's tensors; its header's ``__metadata__`` holds, under the key
``tl_steer``, a JSON document with the kind, method, hook names, widths, position policy, the method's
parameters and the identity of the model it was made for. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from tl_steer.errors import FileFormatError
from tl_steer.interventions import Intervention, registry

FORMAT = "tl_steer.intervention"
VERSION = 1
_MAX_HEADER = 16 * 1024 * 1024


def save(intervention: Intervention, path: str | Path) -> Path:
    """Write ``intervention`` to ``path`` (``.safetensors`` is appended if missing); return the path."""
    if not isinstance(intervention, Intervention):
        raise TypeError(f"save expects an Intervention, got {type(intervention).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "kind": intervention.kind,
        "method": intervention.method,
        "hook_names": list(intervention.hook_names),
        "widths": intervention.widths(),
        "positions": intervention.positions.to_json(),
        "info": intervention.info,
        "model_identity": intervention.model_identity,
        "config": intervention.config(),
    }
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the intervention's info or config is not JSON-serialisable: {exc}") from exc
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in intervention.tensors().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"tl_steer": text})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a saved intervention, read without loading its tensors."""
    return read_tl_steer_header(path, FORMAT, VERSION, "intervention")


def read_tl_steer_header(path: str | Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The ``tl_steer`` JSON document in a safetensors header, checked to be format ``fmt``, ``version``.

    Reads only the header (its length is checked against the file before anything is allocated) and
    raises :class:`FileFormatError` naming the problem for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER or size > path.stat().st_size - 8:
            raise FileFormatError(f"{path} is not a safetensors file (header length {size} is impossible)")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path} is not a safetensors file (header is not JSON: {exc})") from exc
    block = header.get("__metadata__") if isinstance(header, dict) else None
    text = block.get("tl_steer") if isinstance(block, dict) else None
    if not isinstance(text, str):
        raise FileFormatError(f"{path} is a safetensors file but not a tl_steer {what} (no 'tl_steer' metadata)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: the tl_steer metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise FileFormatError(f"{path}: metadata does not describe a tl_steer {what}")
    if meta.get("version") != version:
        raise FileFormatError(f"{path}: format version {meta.get('version')!r}; this tl_steer reads version {version}")
    return meta


def load(path: str | Path, model: HookedTransformer | None = None) -> Intervention:
    """Read an intervention saved by :func:`save`.

    With ``model``, also check that it fits that model (same identity, hook names and widths) and
    move its tensors to the model's device; a mismatch raises before anything else happens.
    """
    meta = read_metadata(path)
    kinds = registry()
    cls = kinds.get(meta.get("kind", ""))
    if cls is None:
        raise FileFormatError(f"{path}: unknown intervention kind {meta.get('kind')!r}; known: {sorted(kinds)}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise FileFormatError(f"{path}: unreadable tensors: {exc}") from exc
    if model is not None:
        tensors = {k: v.to(model.cfg.device) for k, v in tensors.items()}
    common = {
        "positions": meta.get("positions", "all"),
        "method": meta.get("method"),
        "info": meta.get("info") or {},
        "model_identity": meta.get("model_identity"),
    }
    try:
        intervention = cls.from_saved(meta.get("config") or {}, tensors, common)
    except (KeyError, TypeError) as exc:
        raise FileFormatError(f"{path}: metadata does not match the {cls.__name__} format: {exc}") from exc
    if intervention.widths() != meta.get("widths", intervention.widths()):
        raise FileFormatError(
            f"{path}: tensor widths {intervention.widths()} differ from the metadata's {meta['widths']}"
        )
    if model is not None:
        intervention.check(model)
    return intervention


__all__ = ["save", "load", "read_metadata"]
