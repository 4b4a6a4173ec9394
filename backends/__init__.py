"""Model backends: ``kind`` -> ``"module:Class"``, imported lazily so that ``import backends`` stays light.

A backend class takes one ``settings`` dict (the spec's training settings, see ``engine.spec.TrainSettings``),
stores it, and implements :class:`backends.base.Backend`. Heavy libraries (torch, transformers) are imported by the
backend module, never here.

To add a backend: write the class (e.g. in ``backends/vision.py``), add ``"kind": "module:Class"`` to
:data:`REGISTRY`, and the contract test in ``tests/test_vision.py`` runs over it. Outside alloclab, a spec may name
the class as ``"package.module:Class"``, or a package may register it under the entry-point group
``alloclab.backbones`` (:mod:`backends.plugins`).
"""

from __future__ import annotations

import importlib
from typing import Any

from backends.base import Backend
from backends.errors import BackendError

REGISTRY: dict[str, str] = {
    "simple_cnn": "backends.vision:SimpleCNNBackend",
    "precomputed": "backends.precomputed:PrecomputedBackend",
    "text": "backends.text:TextBackend",
    "torchvision": "backends.tv_backbones:TorchvisionBackend",
    "hf_vision": "backends.hf_vision:HFVisionBackend",
}


def known_backbones() -> list[str]:
    """The backbone kinds a spec may name without a 'module:Class' reference: built in and installed plugins."""
    from backends import plugins

    return sorted({*REGISTRY, *plugins.registered("backbone")})


def backend_class(kind: str) -> Any:
    """The class registered as ``kind``, an installed plugin's, or the one a 'package.module:Class' names."""
    from backends import plugins

    if kind not in REGISTRY:
        if kind in plugins.registered("backbone") or plugins.is_ref(kind):
            return plugins.load(kind, "backbone", BackendError)
        raise BackendError(f"unknown backbone '{kind}'; known backbones are: {', '.join(known_backbones())}")
    module_name, _, class_name = REGISTRY[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendError(
            f"backbone '{kind}' needs {module_name}, which cannot be imported ({e}); install with: pip install -e ."
        ) from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BackendError(f"backbone '{kind}': module {module_name} has no class {class_name}")
    return cls


def create(kind: str, settings: dict[str, Any], options: dict[str, Any] | None = None,
           transform: dict[str, Any] | None = None) -> Backend:
    """Instantiate the backend registered as ``kind``.

    Args:
        kind: A key of :data:`REGISTRY`.
        settings: Training settings passed to the backend's constructor (stored, validated on first use).
        options: Backbone options (``[backbone] options`` in the spec), validated by the class's ``Options`` model.
        transform: The spec's ``[backbone.transform]``, passed as ``transform=`` to classes that set
            ``takes_transform = True`` (image backbones: normalisation and augmentations, :mod:`backends.images`).

    Returns:
        The backend instance.

    Raises:
        BackendError: ``kind`` is unknown, or its module (or an optional dependency) cannot be imported.
    """
    cls = backend_class(kind)
    if getattr(cls, "takes_transform", False):
        backend: Backend = cls(dict(settings), dict(options or {}), transform=transform)
    else:
        backend = cls(dict(settings), dict(options or {}))
    return backend
