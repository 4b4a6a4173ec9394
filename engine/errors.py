"""Domain exceptions. Each says what went wrong, where, and how to fix it.

The CLI turns any of these into one line on stderr and exit code 2 (user mistakes never show a traceback).
``DataError`` and ``BackendError`` live in ``backends.errors`` because backends must not import the engine.
"""

from __future__ import annotations

from backends.errors import BackendError, DataError

__all__ = ["AlloclabError", "SpecError", "StoreError", "DataError", "BackendError", "USER_ERRORS"]


class SpecError(ValueError):
    """A spec file is invalid: names the file, the field path and the fix."""


class StoreError(RuntimeError):
    """The results database cannot be opened or written (locked by another process, wrong schema, ...)."""


AlloclabError = (SpecError, StoreError, DataError, BackendError)
USER_ERRORS = AlloclabError
