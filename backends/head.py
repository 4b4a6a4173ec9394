"""Last-layer retraining, backbone-agnostic: a fresh linear head on frozen embeddings (method.md §3).

The paper's code resumed the pre-training run to retrain the head (method.md §3, quirk (a)); alloclab instead trains
a FRESHLY initialised ``torch.nn.Linear(d, 2)`` on the embeddings, with the pre-training recipe: Adam, cross-entropy,
ReduceLROnPlateau (factor 0.1) and early stopping on val balanced accuracy, keeping the best weights.

:func:`fit` is the training loop shared with the backbones' pre-training (``backends/vision.py``). To add a head type
(e.g. the MLP of the foundation-model runs), write a ``train_<name>`` beside :func:`train_head` that builds the module
and calls :func:`fit`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from backends.errors import BackendError

# The paper's coloured-MNIST values (method.md §1.1); engine.spec.TrainSettings has the same defaults.
DEFAULT_SETTINGS: dict[str, Any] = {
    "lr": 1.587e-3,  # Adam learning rate
    "weight_decay": 1.537e-3,  # Adam weight decay (L2 added to the gradient, as torch.optim.Adam does)
    "batch_size": 128,  # mini-batch size
    "max_epochs": 50,  # upper bound on epochs
    "patience": 10,  # early stopping: epochs without a val balanced-accuracy gain
    "lr_patience": 10,  # ReduceLROnPlateau patience (factor 0.1)
}


@dataclass(frozen=True)
class HeadResult:
    """A trained linear head: logits = z @ weight.T + bias."""

    weight: np.ndarray  # (2, d) float32
    bias: np.ndarray  # (2,) float32
    epochs: int  # epochs run (early stopping may end before max_epochs)
    best_epoch: int  # 1-based epoch whose weights were kept
    best_val_bal_acc: float


@dataclass(frozen=True)
class FitLog:
    """What :func:`fit` did: epochs run, the kept epoch and its score, per-epoch history."""

    epochs: int
    best_epoch: int
    best_val_bal_acc: float
    history: list[dict[str, float]]


def resolve_settings(settings: dict[str, Any], owner: str) -> dict[str, Any]:
    """``settings`` over :data:`DEFAULT_SETTINGS`; an unknown key raises BackendError naming ``owner``."""
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise BackendError(f"{owner}: unknown training settings {unknown}; known are: {', '.join(DEFAULT_SETTINGS)}")
    return {**DEFAULT_SETTINGS, **settings}


def balanced_accuracy(y_true: np.ndarray | torch.Tensor, y_pred: np.ndarray | torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (= sklearn's ``balanced_accuracy_score``)."""
    y_true = torch.as_tensor(y_true).long()
    y_pred = torch.as_tensor(y_pred).long()
    if y_true.numel() == 0:
        return float("nan")
    k = int(max(int(y_true.max()), int(y_pred.max()) if y_pred.numel() else 0)) + 1
    total = torch.bincount(y_true, minlength=k)
    correct = torch.bincount(y_true[y_true == y_pred], minlength=k)
    present = total > 0
    return float((correct[present].double() / total[present].double()).mean())


def as_tensor(array: np.ndarray, dtype: np.dtype[Any] | type) -> torch.Tensor:
    """A torch view of ``array`` without copying when it is already contiguous with ``dtype``.

    Arrays from Ray's object store are read-only; torch warns about that, but nothing here writes to them.
    """
    array = np.ascontiguousarray(array, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    predict_val: Callable[[], torch.Tensor],
    val_y: torch.Tensor,
    *,
    settings: dict[str, Any],
    seed: int,
    prepare: Callable[[torch.Tensor], Any] | None = None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    grad_clip: float | None = None,
) -> FitLog:
    """Train ``model`` in place and leave it holding the weights of its best val epoch.

    Adam(lr, weight_decay), cross-entropy on seeded shuffled mini-batches, ReduceLROnPlateau(mode="max",
    factor=0.1, patience=lr_patience) and early stopping after ``patience`` epochs without a strict gain in val
    balanced accuracy (Lightning's EarlyStopping with min_delta 0).

    Args:
        model: Maps a prepared batch to logits (n, 2).
        x: Training inputs, indexed along dim 0 (kept as given; ``prepare`` converts each batch).
        y: int64 labels (n,).
        predict_val: Returns the current model's int64 predictions on the val set (called in eval mode).
        val_y: int64 val labels.
        settings: Resolved training settings (see :data:`DEFAULT_SETTINGS`).
        seed: Seeds the batch order.
        prepare: Optional per-batch conversion (e.g. uint8 -> float, or row indices -> a dict of token tensors).
        optimizer: Builds the optimiser from the trainable parameters (those with ``requires_grad``; frozen ones,
            e.g. a LoRA-wrapped encoder's base weights, are left out); default Adam(lr, weight_decay).
        grad_clip: Clip the gradients' global L2 norm to this value before each step; None = no clipping.

    Returns:
        The run's :class:`FitLog`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    else:
        opt = optimizer(params)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=settings["lr_patience"])
    gen = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state, history = -1.0, 0, copy.deepcopy(model.state_dict()), []
    for epoch in range(1, settings["max_epochs"] + 1):
        loss = _train_epoch(model, opt, x, y, settings["batch_size"], gen, prepare, grad_clip)
        model.eval()
        with torch.inference_mode():
            score = balanced_accuracy(val_y, predict_val())
        history.append({"epoch": epoch, "train_loss": loss, "val_bal_acc": score})
        sched.step(score)
        if score > best:
            best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= settings["patience"]:
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitLog(epochs=len(history), best_epoch=best_epoch, best_val_bal_acc=best, history=history)


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
    prepare: Callable[[torch.Tensor], Any] | None,
    grad_clip: float | None = None,
) -> float:
    """One pass over a seeded permutation; returns the mean training loss."""
    model.train()
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for start in range(0, len(perm), batch_size):
        idx = perm[start : start + batch_size]
        xb = x[idx] if prepare is None else prepare(x[idx])
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / max(len(perm), 1)


def train_head(
    train_z: np.ndarray,
    train_y: np.ndarray,
    val_z: np.ndarray,
    val_y: np.ndarray,
    *,
    settings: dict[str, Any],
    seed: int,
) -> HeadResult:
    """Train a freshly initialised ``Linear(d, 2)`` on frozen embeddings.

    Args:
        train_z: float32 (n, d) training embeddings.
        train_y: 0/1 labels (n,). A single class is allowed (the head still trains).
        val_z: float32 (m, d) val embeddings, used for scheduling, early stopping and selection.
        val_y: 0/1 labels (m,).
        settings: Training settings; missing keys take :data:`DEFAULT_SETTINGS`.
        seed: Seeds the initialisation (``torch.manual_seed``) and the batch order.

    Returns:
        The best-epoch weights as numpy arrays.

    Raises:
        BackendError: inconsistent shapes, an empty set or an unknown setting.
    """
    resolved = resolve_settings(settings, "train_head")
    _check_shapes(train_z, train_y, val_z, val_y)
    z, y = as_tensor(train_z, np.float32), as_tensor(train_y, np.int64)
    vz, vy = as_tensor(val_z, np.float32), as_tensor(val_y, np.int64)
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], 2)  # PyTorch's default (Kaiming-uniform) initialisation
    log = fit(head, z, y, lambda: head(vz).argmax(dim=1), vy, settings=resolved, seed=seed)
    return HeadResult(
        weight=head.weight.detach().numpy().astype(np.float32, copy=True),
        bias=head.bias.detach().numpy().astype(np.float32, copy=True),
        epochs=log.epochs,
        best_epoch=log.best_epoch,
        best_val_bal_acc=log.best_val_bal_acc,
    )


def _check_shapes(train_z: np.ndarray, train_y: np.ndarray, val_z: np.ndarray, val_y: np.ndarray) -> None:
    for name, z, y in (("train", train_z, train_y), ("val", val_z, val_y)):
        if z.ndim != 2 or y.ndim != 1 or len(z) != len(y) or len(z) == 0:
            raise BackendError(f"train_head: {name} embeddings {z.shape} and labels {y.shape} must be (n, d) and (n,)"
                               " with n > 0")
    if train_z.shape[1] != val_z.shape[1]:
        raise BackendError(f"train_head: train dim {train_z.shape[1]} != val dim {val_z.shape[1]}")


def head_proba(result: HeadResult, z: np.ndarray) -> np.ndarray:
    """P(y=1) of each row of ``z`` under the head: softmax of ``z @ W.T + b``, in float64.

    Args:
        result: A trained head.
        z: (n, d) embeddings.

    Returns:
        float64 (n,) probabilities.
    """
    logits = np.asarray(z, dtype=np.float64) @ result.weight.astype(np.float64).T + result.bias.astype(np.float64)
    from scipy.special import expit

    return expit(logits[:, 1] - logits[:, 0])  # = softmax(logits)[:, 1]; expit does not overflow
