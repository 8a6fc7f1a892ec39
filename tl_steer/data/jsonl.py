"""Reading JSON Lines files of records, with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tl_steer.errors import DataError

T = TypeVar("T")

JsonType = type | tuple[type, ...]

_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


def _type_phrase(kinds: tuple[type, ...]) -> str:
    names = [_JSON_NAMES.get(kind, kind.__name__) for kind in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"


def _has_type(value: object, kinds: tuple[type, ...]) -> bool:
    # JSON true/false load as bool, a subclass of int: accept them only where bool is asked for.
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _is_unicode(value: object) -> bool:
    """False when ``value`` (or a string inside a list) holds a lone surrogate, which JSON's ``\\ud800``
    escapes can produce but UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_is_unicode(v) for v in value)
    return True


def read_records(
    path: str | Path,
    fields: Sequence[str],
    make: Callable[..., T],
    *,
    what: str = "records",
    types: Mapping[str, JsonType] | None = None,
) -> list[T]:
    """Read ``path`` (JSON Lines), check every line holds an object with the ``fields``, and build
    ``make(*values)`` from each; a :class:`DataError` raised by ``make`` is re-raised with the file and line.

    Every field must be a string unless ``types`` maps it to another JSON type (or a tuple of them, e.g.
    ``{"options": list, "answer": (int, str)}``); a JSON boolean counts as an integer only where ``bool``
    is asked for. Only the top-level type is checked here: ``make`` checks what is inside.

    Blank lines are skipped; a missing file is a ``FileNotFoundError``, a file that is not UTF-8 or holds
    no record is a :class:`DataError`.
    """
    path = Path(path)
    kinds: dict[str, tuple[type, ...]] = {name: (str,) for name in fields}
    for name, kind in (types or {}).items():
        if name not in kinds:
            raise ValueError(f"types names {name!r}, which is not one of the fields {', '.join(fields)}")
        kinds[name] = kind if isinstance(kind, tuple) else (kind,)
    if not path.is_file():
        raise FileNotFoundError(f"no such {what} file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    out = []
    # Lines end at "\n" only (JSON Lines): str.splitlines would also split at U+2028, U+0085 ... which
    # JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise DataError(f"{where}: not valid JSON ({exc})") from exc
        except RecursionError as exc:
            raise DataError(f"{where}: not valid JSON (nested too deeply)") from exc
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields)}")
        for name in fields:
            if name not in record:
                raise DataError(f"{where}: missing field {name!r}")
            if not _has_type(record[name], kinds[name]):
                raise DataError(
                    f"{where}: field {name!r} must be {_type_phrase(kinds[name])}, got {type(record[name]).__name__}"
                )
            if not _is_unicode(record[name]):
                raise DataError(
                    f'{where}: field {name!r} holds a lone surrogate escape (such as "\\ud800"), which is not '
                    "Unicode text; write the character itself or a valid surrogate pair"
                )
        try:
            out.append(make(*(record[name] for name in fields)))
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from exc
    if not out:
        raise DataError(f"{path}: no {what} in the file")
    return out
