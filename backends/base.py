"""The contract between the engine and model backends.

A *dataset* module (``backends/datasets/<kind>.py``) turns options into a :class:`DatasetBundle`: named splits,
each with item ids, raw columns (the engine binarises them into the task label and the attributes) and, for
backends that train a model, inputs loaded lazily with :meth:`DatasetBundle.inputs`.

A *backend* (``backends/<name>.py``) implements :class:`Backend`: pre-train on a split, embed a split with a
checkpoint. Last-layer retraining is backbone-agnostic and lives in :mod:`backends.head`.
To add a backend: write a class with these methods, add it to ``backends.REGISTRY`` and the contract test in
``tests/test_vision.py`` runs over it.

Everything returned crosses process boundaries (Ray), so results are frozen dataclasses of numpy arrays and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

if TYPE_CHECKING:  # torch stays out of `import backends`
    from backends.regularisers import Regularisation

# The five splits every dataset provides (method.md §1): a disjoint pre-training set (train/val), the fine-tuning
# pool (train/val) and THE test set that evaluates everything.
SPLITS: tuple[str, ...] = ("pretrain_train", "pretrain_val", "pool_train", "pool_val", "test")

# A separation penalty (backends/regularisers.py) uses a class of a mini-batch only when each group has this many
# items in it (the paper's min_per_cell); the engine checks the batch size against the data with it.
MIN_PER_CELL = 2


@dataclass(frozen=True)
class Split:
    """One split: unique int64 item ids and raw columns (name -> 1-D array, parallel to ids)."""

    name: str
    ids: np.ndarray
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class DatasetBundle:
    """A dataset's splits plus a loader for model inputs (images, text) of a split, called only when needed."""

    kind: str
    splits: dict[str, Split]
    fingerprint: str  # content hash of the data actually used (changes when the data or options change)
    load_inputs: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)
    images: bool = False  # inputs are image files (backends.images.ImageFiles): the engine decodes and caches them

    def inputs(self, split: str) -> Any:
        """Model inputs of ``split`` in item order (e.g. uint8 images N×C×H×W)."""
        if self.load_inputs is None:
            raise RuntimeError(f"dataset '{self.kind}' has no model inputs (embeddings only)")
        return self.load_inputs(split)


@dataclass(frozen=True)
class Checkpoint:
    """A pre-trained backbone: serialized torch state (bytes, loadable with weights_only=True) and its log."""

    backbone: str
    state: bytes
    log: dict[str, Any]


class Backend(Protocol):
    """What the engine asks of a model backend. ``__init__(settings, options)`` stores params; heavy imports happen
    on first use. ``settings`` are training settings (lr, weight_decay, batch_size, max_epochs, patience,
    lr_patience); ``options`` are validated by the class attribute ``Options`` (a frozen pydantic model with
    ``extra="forbid"``), which the spec validation also uses.

    Model inputs (``bundle.inputs(split)``) must support ``inputs[idx]`` with an int64 index array (numpy arrays of
    images, numpy object arrays of strings, ...), so the engine can allocate subsets for fine-tuning.
    """

    name: str

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Train the backbone with its classification head at natural proportions; select on val balanced acc.
        ``regulariser`` (a separation penalty, :mod:`backends.regularisers`) is passed only when the spec asks for
        one, and only to backends whose class sets ``regularisable = True``: pass it to
        :func:`backends.head.fit` as ``penalty=PenaltyTerm.of(regulariser, dim, n)``."""
        ...

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """Penultimate features, float32 array of shape (n, dim), deterministic for a given checkpoint."""
        ...

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """The model's own head's P(y=1) for each item (pre-trained or fine-tuned checkpoint)."""
        ...

    def finetune(self, checkpoint: Checkpoint, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *,
                 mode: str, settings: dict[str, Any], seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Fine-tune from ``checkpoint`` with a freshly initialised head (``mode`` 'full' or 'lora'; 'last_layer' is
        done by the engine on cached embeddings). Optional: backends without it support only 'last_layer'.
        ``regulariser`` as in :meth:`pretrain` (``regulariser.stage`` 'finetune' or 'both')."""
        ...
