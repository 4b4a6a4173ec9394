"""Errors raised by backends and dataset loaders.

They subclass builtins so callers outside alloclab can catch them generically. The engine re-exports them
(`engine.errors`); backends import nothing from the engine, so the dependency stays one-way.
Each message says what went wrong, where (file, rows, directory) and how to fix it.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data is missing, malformed or inconsistent (a file, a column, ids, NaNs)."""


class BackendError(RuntimeError):
    """A model backend cannot run: a missing optional dependency, weights or a bad checkpoint."""
