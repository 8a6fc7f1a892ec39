"""The errors tl_steer raises on bad input.

Every error a user can trigger with bad input is a :class:`TlSteerError`; the subclasses also derive from
the built-in exception a Python user would expect (``ValueError``, ``FileNotFoundError`` ...), so
``except ValueError`` keeps working. An argument of the wrong Python type (a string where a model goes)
raises ``TypeError``, as Python itself does; a missing file raises ``FileNotFoundError``.

Every loader of user files (pairs, A/B and multiple-choice JSONL, saved interventions and probes, their
metadata) raises only these on bad input: the fuzz tests in ``tests/test_fuzz_loaders.py`` check it.
"""

from __future__ import annotations


class TlSteerError(Exception):
    """Base class of every error tl_steer raises on purpose."""


class HookNameError(TlSteerError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class ShapeError(TlSteerError, ValueError):
    """A tensor of the wrong width or rank for where it is used."""


class DataError(TlSteerError, ValueError):
    """A data file or a list of examples that is malformed or empty."""


class ConfigError(TlSteerError, ValueError):
    """An option out of its valid range: a layer index, a method or form name, a hyperparameter."""


class ModelMismatchError(TlSteerError, ValueError):
    """A saved object made for another model than the one it is used with."""


class FileFormatError(TlSteerError, ValueError):
    """A file that is not what it claims to be."""


class SaveError(TlSteerError, OSError):
    """A file that could not be written: the message names the target path and the cause (a directory in
    the way, permission denied, no space left ...). The target, if it existed, is left as it was.
    ``errno`` and ``filename`` (the target) are set as on an ``OSError``."""

    def __str__(self) -> str:  # OSError would print "[Errno N] ..." once errno is set; show the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(TlSteerError, ImportError):
    """An optional package that a function needs is not installed."""
