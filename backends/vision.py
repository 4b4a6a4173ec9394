"""torch vision backbones. ``SimpleCNN`` is the paper's coloured-MNIST model (method.md §1.1).

Inputs are uint8 arrays N×C×H×W. They are scaled to float in [0, 1] (divided by 255) batch by batch; the paper's
normalisation lived in its unreleased data module (method.md §1.1), so this is alloclab's choice.

To add a backbone: write an ``nn.Module`` with ``features(x)`` (the embedding) and ``forward(x)`` (logits), a
backend class like :class:`SimpleCNNBackend` (or subclass it and override ``_build``), and register it in
``backends.REGISTRY``. Thread counts are the caller's: nothing here calls ``torch.set_num_threads``.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
import torch
from torch import nn

from backends.base import Checkpoint
from backends.errors import BackendError
from backends.head import as_tensor, autocast, fit, resolve_device, resolve_settings
from backends.regularisers import PenaltyTerm, Regularisation
from backends.pooling import MaxPool2x2

# Images per pass of the classifier head in predict_proba and the val predictions of every epoch (the head's
# matrix product rounds differently with its row count, so this stays what it was).
EVAL_BATCH = 1024
# Images per pass of the convolutions, by device, inside each EVAL_BATCH. On the CPU 128 keeps a convolution's
# output in the caches: 1.7x faster than 1024 (16,384 pool images, one thread: 1.58 s against 2.70 s), and each
# image's features do not depend on its batch, so embeddings and predictions are bit-identical to one pass of
# 1024 (tests/test_vision.py). GPUs take the whole EVAL_BATCH.
FEATURE_BATCH = {"cpu": 128}


class SimpleCNN(nn.Module):
    """The paper's SimpleCNN (method.md §1.1).

    Conv(3→16, 5×5, pad 2)+ReLU+MaxPool2 → Conv(16→32, 5×5, pad 2)+ReLU+MaxPool2 → flatten (1568)
    → Linear(1568,2) (computed as Conv → MaxPool → ReLU, the same function: see ``__init__``).
    """

    embed_dim = 32 * 7 * 7

    def __init__(self) -> None:
        super().__init__()
        # The paper's order is Conv -> ReLU -> MaxPool; max pooling and ReLU commute (relu(max(x)) = max(relu(x)),
        # and the gradient reaches the same element), so pooling first gives the same outputs and gradients
        # (bit-identical weights after training, measured) with ReLU on a quarter of the values: about 30% faster.
        # The pooling is backends.pooling's compiled 2x2 max pool: nn.MaxPool2d's values, indices and gradients bit
        # for bit, and pre-training epochs 1.5x faster on the CPU (bench/bench_demo.py).
        # The state_dict keys (conv.0, conv.3, fc) are the paper layout's.
        self.conv = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=5, padding=2),
            MaxPool2x2(),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            MaxPool2x2(),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(self.embed_dim, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1568-d flattened embedding of float images (n, 3, 28, 28)."""
        return torch.flatten(self.conv(x), start_dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (n, 2) of embeddings."""
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def _scale(batch: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]."""
    return batch.float().div_(255.0)


class SimpleCNNBackend:
    """The :class:`backends.base.Backend` for :class:`SimpleCNN`.

    Args:
        settings: Training settings (lr, weight_decay, batch_size, max_epochs, patience, lr_patience); stored here,
            validated on first use.
    """

    name = "simple_cnn"
    modes = ("last_layer", "full")  # fine-tuning modes it supports ('last_layer' runs on cached embeddings)
    regularisable = True  # pre-training and fine-tuning take a separation penalty (backends.regularisers)
    input_shape = (3, 28, 28)  # images of an image-file dataset must decode to this ([backbone.transform] resize)

    class Options(BaseModel):
        """SimpleCNN has no architecture options (the paper's network is fixed)."""

        model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, settings: dict[str, Any], options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.options = options or {}

    def _build(self) -> nn.Module:
        return SimpleCNN()

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Train the network at natural proportions; keep the epoch with the best val balanced accuracy.

        Args:
            inputs: uint8 (n, 3, 28, 28) training images.
            y: 0/1 labels (n,).
            val_inputs: uint8 (m, 3, 28, 28) val images.
            val_y: 0/1 labels (m,).
            seed: Seeds the initialisation (``torch.manual_seed``) and the batch order; same seed, same result on CPU.
            regulariser: A separation penalty on the 1568-d features (:mod:`backends.regularisers`); None = plain
                cross-entropy.

        Returns:
            A checkpoint: ``torch.save`` bytes of the best state_dict and a log (epochs, best_epoch,
            best_val_bal_acc, history of {epoch, train_loss, val_bal_acc[, train_penalty]}).
        """
        settings = resolve_settings(self.settings, self.name)
        x, vx = self._images(inputs, "inputs"), self._images(val_inputs, "val_inputs")
        for what, images, labels in (("train", x, y), ("val", vx, val_y)):
            if len(images) == 0 or np.shape(labels) != (len(images),):
                raise BackendError(f"{self.name}: {what} set needs n > 0 images and n labels, got {len(images)} "
                                   f"images and labels of shape {np.shape(labels)}")
        torch.manual_seed(seed)
        model = self._build()
        penalty = PenaltyTerm.of(regulariser, model.embed_dim, len(x))  # after the model: its init is unchanged
        log = fit(
            model, x, as_tensor(y, np.int64), lambda: self._predict(model, vx), as_tensor(val_y, np.int64),
            settings=settings, seed=seed, prepare=_scale, penalty=penalty,
        )
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)  # loads anywhere
        info = {"epochs": log.epochs, "best_epoch": log.best_epoch, "best_val_bal_acc": log.best_val_bal_acc,
                "history": log.history}
        return Checkpoint(backbone=self.name, state=buffer.getvalue(), log=info)

    def finetune(self, checkpoint: Checkpoint, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *,
                 mode: str, settings: dict[str, Any], seed: int,
                 regulariser: Regularisation | None = None) -> Checkpoint:
        """Full fine-tuning (the paper's ``finetune_alloc``): the pre-trained convolutions plus a FRESHLY
        initialised head (seeded), all trained with the fine-tuning settings, selected on val balanced accuracy;
        with ``regulariser``, under its separation penalty."""
        if mode != "full":
            raise BackendError(f"{self.name}: fine-tuning mode '{mode}' is not supported; modes: "
                               f"{', '.join(self.modes)}")
        model = self._load(checkpoint).train()
        torch.manual_seed(seed)
        model.fc.reset_parameters()  # a fresh head, never the pre-trained one (method.md §3, quirk (a))
        x, vx = self._images(inputs, "inputs"), self._images(val_inputs, "val_inputs")
        penalty = PenaltyTerm.of(regulariser, model.embed_dim, len(x))
        log = fit(model, x, as_tensor(y, np.int64), lambda: self._predict(model, vx), as_tensor(val_y, np.int64),
                  settings=resolve_settings(settings, self.name), seed=seed, prepare=_scale, penalty=penalty)
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)  # loads anywhere
        info = {"mode": mode, "epochs": log.epochs, "best_epoch": log.best_epoch,
                "best_val_bal_acc": log.best_val_bal_acc}
        return Checkpoint(backbone=self.name, state=buffer.getvalue(), log=info)

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float32 (n, 1568) embeddings, computed in eval mode in batches of :data:`EVAL_BATCH`."""
        model = self._load(checkpoint)
        x = self._images(inputs, "inputs")
        return self._batched(model, x, model.embed_dim, features=True).numpy()

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float64 (n,) P(y=1): softmax of the pre-trained model's own head."""
        model = self._load(checkpoint)
        x = self._images(inputs, "inputs")
        logits = self._batched(model, x, 2).double()
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    def _predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._batched(model, x, 2).argmax(dim=1)

    def _batched(self, model: nn.Module, x: torch.Tensor, width: int, features: bool = False) -> torch.Tensor:
        """``model`` (or its ``features``) over uint8 images in batches of :data:`EVAL_BATCH`, on the model's device
        under the settings' autocast; float32 (n, width) on the CPU."""
        device = next(model.parameters()).device
        out = torch.empty((len(x), width), dtype=torch.float32)
        step = FEATURE_BATCH.get(device.type, EVAL_BATCH)
        with torch.inference_mode(), autocast(self.settings, device):
            for start in range(0, len(x), EVAL_BATCH):
                chunk = x[start : start + EVAL_BATCH]
                feats = torch.cat([model.features(_scale(chunk[i : i + step].to(device, non_blocking=True)))
                                   for i in range(0, len(chunk), step)])
                out[start : start + EVAL_BATCH] = (feats if features else model.classify(feats)).float().cpu()
        return out

    def _images(self, inputs: Any, what: str) -> torch.Tensor:
        array = np.asarray(inputs)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (3, 28, 28):
            raise BackendError(f"{self.name}: {what} must be uint8 (n, 3, 28, 28) images, got {array.dtype} "
                               f"{array.shape}")
        return as_tensor(array, np.uint8)

    def _load(self, checkpoint: Checkpoint) -> nn.Module:
        """The checkpoint's network in eval mode; BackendError if it is not a loadable checkpoint of this backbone."""
        if checkpoint.backbone != self.name:
            raise BackendError(f"{self.name}: checkpoint is from backbone '{checkpoint.backbone}'; "
                               f"re-run pre-training with {self.name}")
        model = self._build()
        try:
            state = torch.load(io.BytesIO(checkpoint.state), weights_only=True, map_location="cpu")
            model.load_state_dict(state)
        except Exception as e:  # torch raises several types (pickle, zip, RuntimeError) for a bad file
            raise BackendError(f"{self.name}: checkpoint cannot be loaded ({type(e).__name__}: {e}); "
                               "it is corrupt or from another model: re-run pre-training") from e
        return model.eval().to(resolve_device(self.settings.get("device", "auto")))
