"""Dataset loaders: ``kind`` -> module, imported lazily.

Every dataset module exposes ``Options`` (a frozen pydantic model with ``extra="forbid"``, the spec's
``[dataset.options]``) and ``load(options: Options) -> DatasetBundle`` (see :mod:`backends.base`). ``load`` must be
cheap: the engine calls it for metadata (ids, columns) during validation; model inputs come lazily through
``bundle.inputs(split)``.

To add a dataset: write ``backends/datasets/<kind>.py`` with ``Options`` and ``load``, put the small real data files it
needs (with their licence) in a folder beside it, and add one line to :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from backends.errors import DataError

REGISTRY: dict[str, str] = {
    "colored_mnist": "backends.datasets.colored_mnist",
    "table": "backends.datasets.table",
    "redditbias": "backends.datasets.redditbias",
    "civilcomments": "backends.datasets.civilcomments",
}


def get(kind: str) -> ModuleType:
    """The dataset module registered as ``kind``.

    Args:
        kind: A key of :data:`REGISTRY`.

    Returns:
        The imported module (with ``Options`` and ``load``).

    Raises:
        DataError: ``kind`` is unknown, or its module cannot be imported.
    """
    if kind not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise DataError(f"unknown dataset kind '{kind}'; known kinds are: {known}")
    try:
        return importlib.import_module(REGISTRY[kind])
    except ImportError as e:
        raise DataError(
            f"dataset '{kind}': cannot import {REGISTRY[kind]} ({e}); reinstall alloclab with: pip install -e ."
        ) from e
