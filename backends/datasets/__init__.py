"""Dataset loaders: ``kind`` -> module, imported lazily.

Every dataset module exposes ``Options`` (a frozen pydantic model with ``extra="forbid"``, the spec's
``[dataset.options]``) and ``load(options: Options) -> DatasetBundle`` (see :mod:`backends.base`). ``load`` must be
cheap: the engine calls it for metadata (ids, columns) during validation; model inputs come lazily through
``bundle.inputs(split)``.

To add a dataset: write ``backends/datasets/<kind>.py`` with ``Options`` and ``load``, put the small real data files it
needs (with their licence) in a folder beside it, and add one line to :data:`REGISTRY`. Outside alloclab, a spec may
name ``"package.module:Loader"`` (a module or class with ``Options`` and ``load``), or a package may register it
under the entry-point group ``alloclab.datasets`` (:mod:`backends.plugins`).
"""

from __future__ import annotations

import importlib
from typing import Any

from backends.errors import DataError

REGISTRY: dict[str, str] = {
    "colored_mnist": "backends.datasets.colored_mnist",
    "table": "backends.datasets.table",
    "redditbias": "backends.datasets.redditbias",
    "civilcomments": "backends.datasets.civilcomments",
    "images": "backends.datasets.images",
    "mimic_cxr": "backends.datasets.mimic_cxr",
    "ham10000": "backends.datasets.ham10000",
}


def known_kinds() -> list[str]:
    """The dataset kinds a spec may name without a 'module:Name' reference: built in and installed plugins."""
    from backends import plugins

    return sorted({*REGISTRY, *plugins.registered("dataset")})


def get(kind: str) -> Any:
    """The dataset loader registered as ``kind``, an installed plugin's, or the one 'package.module:Name' names.

    Args:
        kind: A key of :data:`REGISTRY`, an entry point of group ``alloclab.datasets``, or a reference.

    Returns:
        The module (or object) with ``Options`` and ``load``.

    Raises:
        DataError: ``kind`` is unknown, or its module cannot be imported, or it lacks ``Options``/``load``.
    """
    from backends import plugins

    if kind not in REGISTRY:
        if kind in plugins.registered("dataset") or plugins.is_ref(kind):
            return plugins.load(kind, "dataset", DataError)
        raise DataError(f"unknown dataset kind '{kind}'; known kinds are: {', '.join(known_kinds())}")
    try:
        return importlib.import_module(REGISTRY[kind])
    except ImportError as e:
        raise DataError(
            f"dataset '{kind}': cannot import {REGISTRY[kind]} ({e}); reinstall alloclab with: pip install -e ."
        ) from e
