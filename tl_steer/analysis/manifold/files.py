"""Saving and loading a :class:`~tl_steer.analysis.manifold.ManifoldProbe`: one safetensors file with the
per-hook statistics as tensors and the settings, hooks, widths and model identity in JSON metadata."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from tl_steer.analysis.manifold.moments import HookStatistics, RunningMoments
from tl_steer.atomic import atomic_write
from tl_steer.digests import tensors_digest
from tl_steer.errors import FileFormatError, TlSteerError
from tl_steer.hosts import Host
from tl_steer.io import (
    check_against_model,
    check_data_digest,
    check_identity_field,
    check_saved_tensors,
    read_tensors,
    read_tl_steer_header,
)

if TYPE_CHECKING:
    from tl_steer.analysis.manifold.probe import ManifoldProbe

FORMAT = "tl_steer.manifold_probe"
VERSION = 1


def save_probe(probe: ManifoldProbe, path: str | Path) -> Path:
    """Write the probe to one safetensors file (``.safetensors`` appended if missing), with its settings
    in JSON metadata. Attached SAEs are not saved: attach them again after :meth:`ManifoldProbe.load`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    tensors: dict[str, Tensor] = {}
    states: dict[str, Any] = {}
    for i, (name, s) in enumerate(probe.stats.items()):
        tensors.update(
            {
                f"{i}.mean": s.moments.mean,
                f"{i}.M2": s.moments.M2,
                f"{i}.T3": s.moments.T3,
                f"{i}.S4": torch.tensor([s.moments.S4], dtype=torch.float64),
                f"{i}.reference": s.reference,
                f"{i}.reference_keys": s.reference_keys,
                f"{i}.calibration": s.calibration,
                f"{i}.calibration_keys": s.calibration_keys,
            }
        )
        states[name] = {
            "index": i,
            "n": s.moments.n,
            "n_outliers": s.n_outliers,
            "n_holdout": s.n_holdout,
            "threshold": s.threshold if math.isfinite(s.threshold) else None,
        }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "hooks": probe.hooks,
        "widths": probe.widths,
        "settings": {
            "k": probe.k,
            "knn_k": probe.knn_k,
            "n_reference": probe.n_reference,
            "n_calibration": probe.n_calibration,
            "holdout": probe.holdout,
            "outlier_factor": probe.outlier_factor,
            "seed": probe.seed,
            "shrinkage": probe.shrinkage,
        },
        "model_identity": probe.model_identity,
        "states": states,
    }
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta["data_digest"] = tensors_digest(data)  # checked on load: changed data bytes are refused
    text = json.dumps(meta, allow_nan=False)
    # A failed write is a SaveError naming `path`; an older file there stays intact.
    return atomic_write(path, lambda p: save_file(data, str(p), metadata={"tl_steer": text}), what="the probe")


def load_probe(cls: type[ManifoldProbe], path: str | Path, model: Host | None = None) -> ManifoldProbe:
    """Read a probe written by :meth:`ManifoldProbe.save`. With ``model``, refuse one fitted on another model
    (:class:`~tl_steer.errors.ModelMismatchError`) or whose hooks the model lacks or has at another
    width (:class:`~tl_steer.errors.HookNameError`, :class:`~tl_steer.errors.ShapeError`)."""
    path = Path(path)
    meta = _read_metadata(path)
    hooks, widths, states, settings = _check_probe_metadata(path, meta, cls)
    if model is not None:
        check_against_model(path, model, meta.get("model_identity"), hooks, widths)
    tensors = read_tensors(path)
    check_data_digest(path, meta, tensors)
    check_saved_tensors(path, tensors)
    expected: set[str] = set()
    for name in hooks:
        i, d = states[name]["index"], widths[name]
        shapes = {"mean": [d], "M2": [d, d], "T3": [d], "S4": [1], "reference": [-1, d], "calibration": [-1, d]}
        for part, shape in shapes.items():
            t = tensors.get(f"{i}.{part}")
            ok = (
                t is not None
                and t.ndim == len(shape)
                and all(w in (-1, n) for w, n in zip(shape, t.shape, strict=True))
            )
            if not ok:
                got = "missing" if t is None else f"of shape {list(t.shape)}"
                raise FileFormatError(f"{path}: tensor '{i}.{part}' of {name!r} is {got}, expected {shape}")
        for part in ("reference", "calibration"):
            keys = tensors.get(f"{i}.{part}_keys")
            if keys is None or list(keys.shape) != [tensors[f"{i}.{part}"].shape[0]]:
                raise FileFormatError(f"{path}: tensor '{i}.{part}_keys' of {name!r} does not match '{i}.{part}'")
        expected |= {f"{i}.{part}" for part in (*shapes, "reference_keys", "calibration_keys")}
    if set(tensors) != expected:
        raise FileFormatError(f"{path}: unexpected or missing tensors {sorted(set(tensors) ^ expected)[:8]}")
    stats = {}
    for name in hooks:
        info = states[name]
        i = info["index"]
        stats[name] = HookStatistics(
            hook=name,
            moments=RunningMoments(
                info["n"],
                tensors[f"{i}.mean"].double(),
                tensors[f"{i}.M2"].double(),
                tensors[f"{i}.T3"].double(),
                float(tensors[f"{i}.S4"][0]),
            ),
            reference=tensors[f"{i}.reference"].float(),
            reference_keys=tensors[f"{i}.reference_keys"].double(),
            calibration=tensors[f"{i}.calibration"].float(),
            calibration_keys=tensors[f"{i}.calibration_keys"].double(),
            threshold=math.inf if info["threshold"] is None else float(info["threshold"]),
            n_outliers=info["n_outliers"],
            n_holdout=info["n_holdout"],
        )
    try:
        return cls(stats, identity=meta.get("model_identity"), **settings)
    except TlSteerError as exc:  # a setting out of range
        raise FileFormatError(f"{path}: {exc}") from exc


def _check_probe_metadata(
    path: Path, meta: dict[str, Any], cls: type[ManifoldProbe]
) -> tuple[list[str], dict[str, int], dict[str, dict[str, Any]], dict[str, Any]]:
    """The hooks, widths, per-hook states and settings of a probe file's metadata, each field checked for
    its JSON type (:class:`FileFormatError` naming the field otherwise)."""

    def bad(field: str, want: str, got: object) -> FileFormatError:
        return FileFormatError(f"{path}: manifold-probe metadata field {field!r} must be {want}, got {got!r:.200}")

    def count(v: object, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    hooks = meta.get("hooks")
    if (
        not isinstance(hooks, list)
        or not hooks
        or not all(isinstance(h, str) for h in hooks)
        or len(set(hooks)) < len(hooks)
    ):
        raise bad("hooks", "a non-empty list of distinct hook names", hooks)
    widths = meta.get("widths")
    if not isinstance(widths, dict) or set(widths) != set(hooks) or not all(count(w, 1) for w in widths.values()):
        raise bad("widths", "an object mapping each hook to a positive integer", widths)
    states = meta.get("states")
    if not isinstance(states, dict) or not set(hooks) <= set(states):
        raise bad("states", "an object with an entry for each hook", states)
    indices = []
    for name in hooks:
        info = states[name]
        if not isinstance(info, dict):
            raise bad(f"states.{name}", "an object", info)
        for key, low in (("index", 0), ("n", 1), ("n_outliers", 0), ("n_holdout", 0)):
            if not count(info.get(key), low):
                raise bad(f"states.{name}.{key}", f"an integer >= {low}", info.get(key))
        threshold = info.get("threshold", False)  # null is an infinite threshold; missing is an error
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold)
        ):
            raise bad(f"states.{name}.threshold", "a finite number or null", threshold)
        indices.append(info["index"])
    if len(set(indices)) < len(indices):
        raise bad("states", "one distinct index per hook", indices)
    settings = meta.get("settings")
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "stats", "identity"}
    if not isinstance(settings, dict) or not set(settings) <= known:
        raise bad("settings", f"an object with keys among {sorted(known)}", settings)
    for key, value in settings.items():
        if isinstance(value, bool) or not (value is None or isinstance(value, int | float)):
            raise bad(f"settings.{key}", "a number", value)
    check_identity_field(path, meta.get("model_identity"))
    return hooks, widths, states, settings


def _read_metadata(path: str | Path) -> dict[str, Any]:
    return read_tl_steer_header(path, FORMAT, VERSION, "manifold probe")
