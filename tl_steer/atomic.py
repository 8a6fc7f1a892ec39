"""Writing files all at once: through a temporary file in the same folder and a rename.

Every file tl_steer saves (interventions, probes, the report's cached results, the model cache) goes
through :func:`atomic_write`, so that the target is either the complete new file or left as it was
(a crash or a full disk mid-write cannot leave half a file), the new file has the permissions the
user's umask gives new files (safetensors writes 0600 whatever the umask), and any failure is a
:class:`~tl_steer.errors.SaveError` naming the target path and the cause.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tl_steer.errors import SaveError

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "its folder does not exist",
}
# safetensors reports OS errors as "I/O error: <text> (os error N)".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux), else set and reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cause(exc: BaseException) -> tuple[str, int | None]:
    """A short human cause for a write error, and its errno where one is known."""
    code = getattr(exc, "errno", None)
    if not isinstance(code, int):
        match = _OS_ERROR.search(str(exc))
        code = int(match.group(1)) if match else None
    if code in _CAUSES:
        return _CAUSES[code], code
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text), code


def save_error(path: Path, exc: BaseException, what: str = "the file") -> SaveError:
    """A :class:`SaveError` saying that ``what`` could not be saved to ``path``, and why."""
    why, code = cause(exc)
    error = SaveError(f"could not save {what} to {path}: {why}")
    error.errno = code  # type: ignore[assignment]
    error.filename = str(path)
    return error


def check_target(path: Path, what: str = "the file", *, make_parents: bool = True) -> None:
    """Raise :class:`SaveError` before any work if ``path`` cannot be a file: a directory is in the way,
    or its folder is missing and cannot be made."""
    if path.is_dir():
        raise SaveError(f"could not save {what} to {path}: it is a directory; give a file name inside it")
    parent = path.parent
    if make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise save_error(path, exc, what) from exc
    elif not parent.is_dir():
        raise SaveError(f"could not save {what} to {path}: its folder {parent} does not exist")


def atomic_write(
    path: str | Path,
    write: Callable[[Path], Any],
    *,
    what: str = "the file",
    make_parents: bool = True,
) -> Path:
    """Write ``path`` by calling ``write(tmp)`` on a temporary path beside it (same suffix), then renaming it.

    The new file gets mode ``0o666 & ~umask``. On any error the temporary file is removed, the old target
    (if any) is untouched, and a :class:`SaveError` names ``path`` and the cause. Concurrent writers of one
    path each write their own temporary file; the last rename wins, with a complete file.
    """
    path = Path(path)
    check_target(path, what, make_parents=make_parents)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial{path.suffix}")
    try:
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
        except Exception as exc:
            if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
                raise save_error(path, exc, what) from exc
            raise
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:  # best effort: never hide the real error
            pass
    return path


def write_text(path: str | Path, text: str, *, what: str = "the file") -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), what=what)
