"""Reading JSON Lines files of string records, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tl_steer.errors import DataError

T = TypeVar("T")


def read_records(path: str | Path, fields: Sequence[str], make: Callable[..., T], *, what: str = "records") -> list[T]:
    """Read ``path`` (JSON Lines), check every line holds an object with the string ``fields``, and build
    ``make(*values)`` from each; a :class:`DataError` raised by ``make`` is re-raised with the file and line.

    Blank lines are skipped; a missing file is a ``FileNotFoundError``, a file that is not UTF-8 or holds
    no record is a :class:`DataError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such {what} file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
        for name in fields:
            if name not in record:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        try:
            out.append(make(*(record[name] for name in fields)))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
    if not out:
        raise DataError(f"{path}: no {what} in the file")
    return out
