"""The library's errors for bad input: what a user gave was wrong, and the message says what would
be right. The CLI prints exactly these as one line and exits with code 2; any other exception is
a bug and shows its traceback.

Each subclass is also the built-in exception a Python caller would expect (a missing file is a
FileNotFoundError, a malformed value a ValueError), so `except ValueError` keeps working.
"""

from __future__ import annotations


class InterpError(Exception):
    """Bad input, explained in the message."""


class BadInput(InterpError, ValueError):
    """A value, setting or file content that cannot be used as given."""


class NotFound(InterpError, FileNotFoundError):
    """A file or folder that should exist does not."""


class AlreadyExists(InterpError, FileExistsError):
    """Something would be overwritten that must not be."""


class MissingField(InterpError, KeyError):
    """A record lacks a field it was asked for."""

    def __str__(self) -> str:
        # KeyError quotes its message; this one is a sentence.
        return str(self.args[0]) if self.args else ""


class Unavailable(InterpError, RuntimeError):
    """A model or dataset that cannot be reached (the hub, offline)."""


class MissingPackage(InterpError, ImportError):
    """An optional package a requested feature needs is not installed."""


def check_positive(name: str, value, zero_ok: bool = False) -> int:
    """`value` if it is a whole number > 0 (>= 0 with `zero_ok`), else a BadInput naming `name`."""
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"{name.replace('_', ' ')} must be a whole number >= {low}, got {value!r}")
    return value
