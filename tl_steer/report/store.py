"""The report's results on disk, step by step, so that a run that was interrupted resumes where it stopped.

Every finished step writes its result under ``DIR/cache/`` (CSV for tables, JSON for small records,
safetensors for interventions) through a temporary file and a rename
(:func:`tl_steer.atomic.atomic_write`), so a file is either complete or absent, and a failed write is a
:class:`~tl_steer.errors.SaveError` naming the file. The run's settings are kept in
``DIR/cache/settings.json``: resuming with other settings is refused rather than mixing results of two
configurations.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from tl_steer.atomic import atomic_write
from tl_steer.errors import ConfigError, SaveError
from tl_steer.hosts import Host
from tl_steer.interventions import Intervention
from tl_steer.io import load, save


def _name(key: str) -> str:
    return key.replace("/", "__").replace(" ", "_")


def _unreadable(path: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        f"the cached file {path} is unreadable ({exc.__class__.__name__}: {exc}); delete it, or rerun with "
        "--fresh to discard every cached result"
    )


def _read_json(path: Path) -> Any:
    """A cached JSON file, or a :class:`ConfigError` saying how to start over if it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _unreadable(path, exc) from exc


class Store:
    """Cached step results under ``root/cache``."""

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.cache = self.root / "cache"
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SaveError(f"could not create the report's folder {self.cache}: {exc.strerror or exc}") from exc
        path = self.cache / "settings.json"
        if path.exists():
            saved = _read_json(path)
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise ConfigError(
                    f"{self.root} holds results of a run with other settings ({', '.join(changed)} differ); "
                    "use another --out directory, or --fresh to discard the old results"
                )
        else:
            self._atomic(path, lambda p: p.write_text(json.dumps(settings, indent=1, sort_keys=True)))

    @staticmethod
    def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
        atomic_write(path, write, what="the report's cached result")

    def has(self, key: str, suffix: str) -> bool:
        return (self.cache / f"{_name(key)}{suffix}").exists()

    def frame(self, key: str, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        path = self.cache / f"{_name(key)}.csv"
        if path.exists():
            try:
                return pd.read_csv(path)
            except (OSError, UnicodeDecodeError, ValueError) as exc:  # pandas' parser errors are ValueErrors
                raise _unreadable(path, exc) from exc
        frame = compute()
        self._atomic(path, lambda p: frame.to_csv(p, index=False))
        return frame

    def record(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.cache / f"{_name(key)}.json"
        if path.exists():
            result: dict[str, Any] = _read_json(path)
            return result
        value = compute()
        self._atomic(path, lambda p: p.write_text(json.dumps(value, indent=1)))
        return value

    def intervention(self, key: str, compute: Callable[[], Intervention], model: Host) -> Intervention:
        path = self.cache / f"{_name(key)}.safetensors"
        if path.exists():
            return load(path, model=model)
        iv = compute()
        save(iv, path)  # atomic itself
        return iv

    def clear(self) -> None:
        for path in self.cache.glob("*"):
            if path.is_file():
                path.unlink()
