"""Saving and loading interventions: one safetensors file, with JSON metadata in its header.

The file holds the intervention's tensors; its header's ``__metadata__`` holds, under the key
``tl_steer``, a JSON document with the kind, method, hook names, widths, position policy, the method's
parameters, the identity of the model it was made for and its ``unit`` (the raw strength at m = 1).
Nothing is ever unpickled.

Format versions: 2 (tl_steer 0.2) records ``unit``; version 1 (tl_steer 0.1) had none, and its files
load converted: ``unit`` from ``info["m_typical"]`` where 0.1 recorded one (SFT, SPLIT and the report's
scaled COLD / SAE interventions, whose ``m = m_typical`` was the strength they were made for), else 1,
with a warning naming the file and the conversion.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from tl_steer.atomic import atomic_write
from tl_steer.digests import tensors_digest
from tl_steer.errors import ConfigError, FileFormatError, ShapeError, TlSteerError
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention, check_identity, check_unit, hook_widths, registry
from tl_steer.positions import POLICIES

FORMAT = "tl_steer.intervention"
VERSION = 2
#: Format versions :func:`load` reads (1: tl_steer 0.1, converted on load; see the module docstring).
READ_VERSIONS = (1, 2)
_MAX_HEADER = 16 * 1024 * 1024
# Bytes per element of the safetensors dtypes a tl_steer file may hold; any other dtype is refused.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save(intervention: Intervention, path: str | Path) -> Path:
    """Write ``intervention`` to ``path`` (``.safetensors`` is appended if missing); return the path.

    The metadata records a digest of the tensor data, which :func:`load` checks. Raises
    :class:`~tl_steer.errors.SaveError` naming ``path`` and the cause if the file cannot be written.
    """
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
        "unit": intervention.unit,
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in intervention.tensors().items()}
    meta["data_digest"] = tensors_digest(tensors)  # checked by load(): flipped data bytes are refused
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the intervention's info or config is not JSON-serialisable: {exc}") from exc
    # Through a temporary file and a rename: a failed write (full disk, no permission, a directory in the
    # way) is a SaveError naming `path`, and leaves an older file at `path` intact.
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"tl_steer": text}), what="an intervention")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a saved intervention, read without loading its tensors (as stored: a version 1
    file has no ``unit``; :func:`load` converts it)."""
    return read_tl_steer_header(path, FORMAT, READ_VERSIONS, "intervention")


def read_tl_steer_header(path: str | Path, fmt: str, version: int | tuple[int, ...], what: str) -> dict[str, Any]:
    """The ``tl_steer`` JSON document in a safetensors header, checked to be format ``fmt`` and ``version``
    (one version, or a tuple of the versions read).

    Reads only the header (its length is checked against the file before anything is allocated) and
    raises :class:`FileFormatError` naming the problem for anything else.
    """
    path = Path(path)
    header, _ = _read_header(path)
    block = header.get("__metadata__") if isinstance(header, dict) else None
    text = block.get("tl_steer") if isinstance(block, dict) else None
    if not isinstance(text, str):
        raise FileFormatError(f"{path} is a safetensors file but not a tl_steer {what} (no 'tl_steer' metadata)")
    meta = _parse_json(text, f"{path}: the tl_steer metadata is not valid JSON")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise FileFormatError(f"{path}: metadata does not describe a tl_steer {what}")
    versions = (version,) if isinstance(version, int) else version
    if meta.get("version") not in versions or isinstance(meta.get("version"), bool):
        readable = f"version {versions[0]}" if len(versions) == 1 else f"versions {', '.join(map(str, versions))}"
        raise FileFormatError(f"{path}: format version {meta.get('version')!r}; this tl_steer reads {readable}")
    return meta


def _parse_json(text: str | bytes, problem: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{problem}: {exc}") from exc
    # Not JSONDecodeError: bytes that are not UTF-8, an integer of more digits than Python converts
    # (sys.get_int_max_str_digits), and nesting deeper than the interpreter's recursion limit.
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"{problem}: {exc}") from exc
    except RecursionError as exc:
        raise FileFormatError(f"{problem}: nested too deeply") from exc


def _read_header(path: Path) -> tuple[Any, int]:
    """The safetensors header of ``path`` (parsed JSON) and the length of the data after it."""
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory, not a file saved by tl_steer; give the path of the file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        total = path.stat().st_size
        if size > _MAX_HEADER or size > total - 8:
            raise FileFormatError(f"{path} is not a safetensors file (header length {size} is impossible)")
        raw = f.read(size)
    return _parse_json(raw, f"{path} is not a safetensors file (header is not JSON)"), total - 8 - size


def read_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, read into memory after every header entry was checked.

    Each entry must have a known dtype, a shape of non-negative integers and data offsets that lie in
    the file and hold exactly shape x dtype bytes, so a header claiming enormous tensors is refused
    before anything is allocated. The tensors are copies (no memory map): overwriting the file later
    cannot change or break them.
    """
    path = Path(path)
    header, data_len = _read_header(path)
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: unreadable tensors: the safetensors header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: unreadable tensors: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FileFormatError(f"{where}: header entry must hold dtype, shape and data_offsets, got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise FileFormatError(f"{where}: unsupported dtype {dtype!r:.50}; expected one of {', '.join(_ITEMSIZE)}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise FileFormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise FileFormatError(f"{where}: data_offsets must be two integers, got {offsets!r:.200}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise FileFormatError(f"{where}: data_offsets {offsets} lie outside the file's {data_len} data bytes")
        if math.prod(shape) * _ITEMSIZE[dtype] != end - begin:
            raise FileFormatError(
                f"{where}: shape {shape} of {dtype} needs {math.prod(shape) * _ITEMSIZE[dtype]} bytes, "
                f"but its data_offsets hold {end - begin}"
            )
        spans.append((begin, end))
    spans.sort()
    if [b for b, _ in spans] != [0, *(e for _, e in spans[:-1])] or (spans[-1][1] if spans else 0) != data_len:
        raise FileFormatError(f"{path}: unreadable tensors: their data_offsets overlap or leave gaps in the data")
    try:
        return load_bytes(path.read_bytes())
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: unreadable tensors: {exc}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_data_digest(path: str | Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Raise :class:`FileFormatError` if the metadata's ``data_digest`` (written by tl_steer since 0.2;
    files without one load unchecked) is not the digest of the tensors read from the file."""
    recorded = meta.get("data_digest")
    if recorded is None:
        return
    if not isinstance(recorded, str) or recorded != tensors_digest(tensors):
        raise FileFormatError(
            f"{path}: the tensor data does not match the digest recorded when the file was saved: the file "
            "was changed or damaged after it was written; save it again from its source"
        )


def check_saved_tensors(path: str | Path, tensors: dict[str, Tensor], index_names: tuple[str, ...] = ()) -> None:
    """Raise :class:`FileFormatError` naming the tensor unless every tensor is a finite floating-point one
    (any precision: half precision is cast where it is used), or an integer one among ``index_names``."""
    for name, t in tensors.items():
        if name in index_names:
            if t.is_floating_point() or t.dtype == torch.bool:
                raise FileFormatError(f"{path}: tensor {name!r} must hold integer indices, got dtype {t.dtype}")
        elif not t.is_floating_point():
            raise FileFormatError(f"{path}: tensor {name!r} must be floating-point, got dtype {t.dtype}")
        elif not torch.isfinite(t).all():
            raise FileFormatError(f"{path}: tensor {name!r} has NaN or infinite entries")


_IDENTITY_TYPES: dict[str, Callable[[object], bool]] = {
    "model_name": lambda v: isinstance(v, str),
    "n_layers": _is_int,
    "d_model": _is_int,
    "d_vocab": _is_int,
    "n_heads": _is_int,
    "embed_checksum": lambda v: v is None or _is_int(v) or isinstance(v, float) and math.isfinite(v),
    "processed_weights": lambda v: v is None or isinstance(v, bool),
}


def check_identity_field(path: str | Path, identity: object) -> dict[str, Any] | None:
    """The ``model_identity`` of a file's metadata: None or an object whose known fields have their types."""
    if identity is None:
        return None
    if not isinstance(identity, dict):
        raise FileFormatError(f"{path}: 'model_identity' must be an object or null, got {type(identity).__name__}")
    for key, ok in _IDENTITY_TYPES.items():
        if key in identity and not ok(identity[key]):
            raise FileFormatError(f"{path}: model_identity field {key!r} has the wrong type: {identity[key]!r:.100}")
    return identity


def check_against_model(
    path: str | Path,
    model: Host,
    identity: dict[str, Any] | None,
    hooks: list[str],
    widths: dict[str, int],
) -> None:
    """Raise, before any tensor is read, if a file's metadata does not fit ``model``: another model's
    identity (:class:`ModelMismatchError`), a hook it lacks (:class:`HookNameError`) or another width
    there (:class:`ShapeError`). The error keeps its type and names the file."""
    try:
        if identity:
            check_identity(identity, model)
        for name in hooks:
            validate_hook(model, name)
        actual = hook_widths(model, hooks)
        for name, width in widths.items():
            if actual[name] != width:
                raise ShapeError(
                    f"the file has width {width} at {name!r}, but the model's activation there has width "
                    f"{actual[name]}; was it made for another model?"
                )
    except TlSteerError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


def _check_common(path: Path, meta: dict[str, Any]) -> tuple[type[Intervention], list[str], dict[str, int]]:
    """The intervention class, hook names and widths of a file's metadata, every common field checked."""
    kinds = registry()
    kind = meta.get("kind")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FileFormatError(f"{path}: unknown intervention kind {kind!r:.100}; known: {sorted(kinds)}")
    hooks = meta.get("hook_names")
    if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) for h in hooks):
        raise FileFormatError(f"{path}: 'hook_names' must be a non-empty list of hook names, got {hooks!r:.200}")
    widths = meta.get("widths")
    if (
        not isinstance(widths, dict)
        or not set(widths) <= set(hooks)
        or not all(_is_int(w) and w >= 1 for w in widths.values())
    ):
        raise FileFormatError(
            f"{path}: 'widths' must map hook names of 'hook_names' to positive integers, got {widths!r:.200}"
        )
    positions = meta.get("positions", "all")
    if not isinstance(positions, str) or positions not in POLICIES:
        raise FileFormatError(f"{path}: 'positions' must be one of {', '.join(POLICIES)}, got {positions!r:.100}")
    for key in ("method",):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise FileFormatError(f"{path}: {key!r} must be a string, got {type(meta[key]).__name__}")
    for key in ("info", "config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise FileFormatError(f"{path}: {key!r} must be an object, got {type(meta[key]).__name__}")
    check_identity_field(path, meta.get("model_identity"))
    return cls, hooks, widths


def load(path: str | Path, model: Host | None = None) -> Intervention:
    """Read an intervention saved by :func:`save`.

    With ``model``, also check that it fits that model (same identity, hook names and widths, from the
    metadata, before any tensor is read) and move its tensors to the model's device. Anything wrong with
    the file raises :class:`FileFormatError` naming the file and the problem.
    """
    path = Path(path)
    meta = read_metadata(path)
    cls, hooks, widths = _check_common(path, meta)
    if model is not None:
        check_against_model(path, model, meta.get("model_identity"), hooks, widths)
    tensors = read_tensors(path)
    check_data_digest(path, meta, tensors)
    check_saved_tensors(path, tensors, cls.saved_index_tensors)
    if model is not None:
        tensors = {k: v.to(model.cfg.device) for k, v in tensors.items()}
    info = dict(meta.get("info") or {})
    unit = _saved_unit(path, meta, info)
    common = {
        "positions": meta.get("positions", "all"),
        "method": meta.get("method"),
        "info": info,
        "model_identity": meta.get("model_identity"),
    }
    try:
        intervention = cls.from_saved(meta.get("config") or {}, tensors, common)
    except (KeyError, TypeError) as exc:
        raise FileFormatError(f"{path}: metadata does not match the {cls.__name__} format: {exc!r}") from exc
    except TlSteerError as exc:  # a shape, hook name or setting its constructor refuses
        raise FileFormatError(f"{path}: {exc}") from exc
    if intervention.widths() != widths or list(intervention.hook_names) != hooks:
        raise FileFormatError(
            f"{path}: tensor widths {intervention.widths()} at {list(intervention.hook_names)} differ from the "
            f"metadata's {widths} at {hooks}"
        )
    # Set here rather than passed to from_saved, so that a kind's from_saved needs no unit argument.
    intervention.unit = unit
    if set(intervention.tensors()) != set(tensors):
        raise FileFormatError(
            f"{path}: the file holds the tensors {sorted(tensors)}, but a {cls.__name__} is saved as "
            f"{sorted(intervention.tensors())}"
        )
    if model is not None:
        try:
            intervention.check(model)
        except TlSteerError as exc:
            raise type(exc)(f"{path}: {exc}") from exc
    return intervention


def _saved_unit(path: Path, meta: dict[str, Any], info: dict[str, Any]) -> float:
    """The unit of a file's metadata; for a version 1 file, the conversion (and a warning saying so)."""
    if meta.get("version") != 1:
        try:
            return check_unit(meta.get("unit"))
        except ConfigError as exc:
            raise FileFormatError(f"{path}: {exc}") from exc
    typical = info.pop("m_typical", None)
    try:
        unit, source = check_unit(typical), f"info['m_typical'] = {typical!r}"
    except ConfigError:
        unit, source = 1.0, "1: the file records no usable info['m_typical']"
    warnings.warn(
        f"{path} was saved by tl_steer 0.1 (format version 1, no unit); converted: unit = {unit:g} (from "
        f"{source}), so m = 1 is the strength it was made for and m = r applies r times it. Save it again "
        "to write the current format.",
        stacklevel=3,
    )
    return unit


__all__ = ["check_saved_tensors", "load", "read_metadata", "read_tensors", "save"]
