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
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
import torch
from torch import nn
from torch.nn import functional as F

from backends.errors import BackendError
from backends.regularisers import PenaltyTerm, stratified_order

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which fit() uses; train_heads follows them

# The paper's coloured-MNIST values (method.md §1.1); engine.spec.TrainSettings has the same defaults.
DEFAULT_SETTINGS: dict[str, Any] = {
    "lr": 1.587e-3,  # Adam learning rate
    "weight_decay": 1.537e-3,  # Adam weight decay (L2 added to the gradient, as torch.optim.Adam does)
    "batch_size": 128,  # mini-batch size
    "max_epochs": 50,  # upper bound on epochs
    "patience": 10,  # early stopping: epochs without a val balanced-accuracy gain
    "lr_patience": 10,  # ReduceLROnPlateau patience (factor 0.1)
    "device": "auto",  # "auto" (CUDA when torch sees a GPU), "cpu", "cuda"
    "amp": "none",  # "bf16": autocast the backbone's forward passes to bfloat16 (heads stay float32)
}


def resolve_device(name: str) -> torch.device:
    """``settings["device"]`` as a torch device: 'auto' = CUDA when torch sees a GPU, else the CPU.

    Raises:
        BackendError: 'cuda' asked for where torch sees no GPU.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return _deterministic_cuda(torch.device("cuda"))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendError(f"device = '{name}' but torch sees no GPU here; fix: device = \"auto\" or \"cpu\"")
        return _deterministic_cuda(torch.device(name))
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    raise BackendError(f"unknown device '{name}'; known: auto, cpu, cuda")


def _deterministic_cuda(device: torch.device) -> torch.device:
    """``device``, with cuDNN restricted to its deterministic algorithms (and no autotuning, which may pick another
    algorithm per run): by default a convolution's backward on CUDA may sum in a run-dependent order, so the same
    seed gave a different checkpoint on each run (seen on an H200: pre-training losses differing in the 7th digit).
    The rest of what trains here (linear layers, pooling, cross-entropy, the heads' batched products) is
    deterministic on CUDA for fixed shapes."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a dict of tensors such as a tokenizer's output) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast(settings: dict[str, Any], device: torch.device) -> Any:
    """The forward passes' autocast context of ``settings["amp"]`` ('bf16' or 'none', a no-op) on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.get("amp", "none") == "bf16")


class Recipe(BaseModel):
    """Optimiser, schedule and clipping of a backbone that trains (pre-training and 'full'/'lora' fine-tuning); the
    backbone's ``[backbone.options]``. The defaults are :func:`fit`'s: Adam with ReduceLROnPlateau, no clipping.
    The paper's DenseNet (MIMIC): cosine with ``t_max = 10``, ``eta_min = 1e-6``, ``grad_clip = 0.5``; its ViT (HAM):
    AdamW, ``warmup_epochs = 5``, cosine with ``t_max = 95``, ``grad_clip = 0.5`` (method.md §1.2-1.3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (L2 in the gradient) or AdamW (decoupled).")
    schedule: Literal["plateau", "cosine"] = Field(
        "plateau", description="plateau = ReduceLROnPlateau(factor 0.1, lr_patience) on val balanced accuracy; "
        "cosine = CosineAnnealingLR per epoch (after the warm-up).")
    warmup_epochs: int = Field(0, ge=0, description="Linear warm-up epochs (from warmup_start_factor × lr), cosine only.")
    warmup_start_factor: float = Field(1e-3, gt=0, le=1, description="Learning-rate factor at the warm-up's start.")
    t_max: int | None = Field(None, ge=1, description="Cosine period in epochs; None = max_epochs − warm-up.")
    eta_min: float = Field(0.0, ge=0, description="Cosine's floor learning rate.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradients' global L2 norm; None = off.")

    @model_validator(mode="after")
    def _warmup_with_cosine(self) -> "Recipe":
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError("warmup_epochs needs schedule = 'cosine'")
        return self

    def optimizer_factory(self, settings: dict[str, Any]) -> Callable[[list[Any]], torch.optim.Optimizer]:
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return lambda params: cls(params, lr=settings["lr"], weight_decay=settings["weight_decay"])

    def schedule_factory(self, max_epochs: int) -> Callable[[torch.optim.Optimizer], Any] | None:
        """None for plateau (fit's default); else warm-up (if any) then cosine, stepped per epoch."""
        if self.schedule == "plateau":
            return None
        sched = torch.optim.lr_scheduler

        def build(opt: torch.optim.Optimizer) -> Any:
            t_max = self.t_max or max(1, max_epochs - self.warmup_epochs)
            cosine = sched.CosineAnnealingLR(opt, T_max=t_max, eta_min=self.eta_min)
            if not self.warmup_epochs:
                return cosine
            warm = sched.LinearLR(opt, start_factor=self.warmup_start_factor, total_iters=self.warmup_epochs)
            return sched.SequentialLR(opt, [warm, cosine], milestones=[self.warmup_epochs])

        return build


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
    y_true = torch.as_tensor(y_true).long().cpu()
    y_pred = torch.as_tensor(y_pred).long().cpu()
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
    optimizer: Callable[[list[Any]], torch.optim.Optimizer] | None = None,
    grad_clip: float | None = None,
    penalty: PenaltyTerm | None = None,
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> FitLog:
    """Train ``model`` in place and leave it holding the weights of its best val epoch.

    Adam(lr, weight_decay), cross-entropy on seeded shuffled mini-batches, ReduceLROnPlateau(mode="max",
    factor=0.1, patience=lr_patience) and early stopping after ``patience`` epochs without a strict gain in val
    balanced accuracy (Lightning's EarlyStopping with min_delta 0).

    Args:
        model: Maps a prepared batch to logits (n, 2).
        x: Training inputs, indexed along dim 0 (kept as given; ``prepare`` converts each batch).
        y: int64 labels (n,).
        predict_val: Returns the current model's int64 predictions on the val set (called in eval mode, on the
            model's device: the callee moves its batches there).
        val_y: int64 val labels.
        settings: Resolved training settings (see :data:`DEFAULT_SETTINGS`); ``device`` places the model and each
            batch, ``amp`` autocasts the forward pass (the loss is taken in float32).
        seed: Seeds the batch order.
        prepare: Optional per-batch conversion (e.g. uint8 -> float, or row indices -> a dict of token tensors).
        optimizer: Builds the optimiser from the trainable parameters (those with ``requires_grad``; frozen ones,
            e.g. a LoRA-wrapped encoder's base weights, are left out); default Adam(lr, weight_decay).
        grad_clip: Clip the gradients' global L2 norm to this value before each step; None = no clipping.
        schedule: Builds the learning-rate scheduler from the optimiser, stepped once per epoch (e.g.
            :meth:`Recipe.schedule`); default ReduceLROnPlateau on val balanced accuracy.
        penalty: A separation penalty (:mod:`backends.regularisers`): the loss becomes CE + λ·penalty(features, y,
            a), with ``model.features(x)`` and ``model.classify(features)`` in place of ``model(x)``; batches are
            stratified by (class, group) (:func:`~backends.regularisers.stratified_order`); the penalty's own
            parameters (an adversary's) train in the same optimiser at ``lr_ratio`` × the learning rate; the
            history gains ``train_penalty`` (the mean term per epoch).

    Returns:
        The run's :class:`FitLog`.
    """
    dev = resolve_device(settings.get("device", "auto"))
    model.to(dev)
    params: list[Any] = [p for p in model.parameters() if p.requires_grad]
    if penalty is not None:
        penalty.module.to(dev).train()
        extra = [p for p in penalty.module.parameters() if p.requires_grad]
        if extra:  # param groups: the adversary learns at its own rate, under the same schedule
            params = [{"params": params}, {"params": extra, "lr": settings["lr"] * penalty.lr_ratio}]
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=settings["lr"], weight_decay=settings["weight_decay"])
    else:
        opt = optimizer(params)
    plateau = schedule is None
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=settings["lr_patience"])
             if plateau else schedule(opt))
    gen = torch.Generator().manual_seed(seed)
    best, best_epoch, best_state, history = -1.0, 0, copy.deepcopy(model.state_dict()), []
    for epoch in range(1, settings["max_epochs"] + 1):
        loss, pen = _train_epoch(model, opt, x, y, settings["batch_size"], gen, prepare, grad_clip, settings, dev,
                                 penalty)
        model.eval()
        with torch.inference_mode():
            score = balanced_accuracy(val_y, predict_val())
        history.append({"epoch": epoch, "train_loss": loss, "val_bal_acc": score}
                       | ({} if penalty is None else {"train_penalty": pen}))
        sched.step(score) if plateau else sched.step()
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
    grad_clip: float | None,
    settings: dict[str, Any],
    device: torch.device,
    penalty: PenaltyTerm | None = None,
) -> tuple[float, float]:
    """One pass over a seeded permutation (stratified by class and group under a penalty); returns the mean
    training loss (the total, penalty included) and the mean penalty term (0 without one)."""
    model.train()
    perm = torch.randperm(len(y), generator=gen) if penalty is None else stratified_order(y, penalty.groups, gen)
    total, total_pen = 0.0, 0.0
    for start in range(0, len(perm), batch_size):
        idx = perm[start : start + batch_size]
        xb = to_device(x[idx] if prepare is None else prepare(x[idx]), device)
        yb = y[idx].to(device)
        with autocast(settings, device):
            if penalty is None:
                logits = model(xb)
            else:
                features = model.features(xb)
                logits = model.classify(features)
        loss = F.cross_entropy(logits.float(), yb)
        if penalty is not None:
            term = penalty.module(features.float(), yb, penalty.groups[idx].to(device))
            loss = loss + penalty.weight * term
            total_pen += float(term.detach()) * len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / max(len(perm), 1), total_pen / max(len(perm), 1)


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
    dev = resolve_device(resolved["device"])
    z, y = as_tensor(train_z, np.float32), as_tensor(train_y, np.int64)
    vz, vy = as_tensor(val_z, np.float32).to(dev), as_tensor(val_y, np.int64)
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], 2)  # PyTorch's default (Kaiming-uniform) initialisation, on the CPU's generator
    log = fit(head, z, y, lambda: head(vz).argmax(dim=1).cpu(), vy, settings=resolved, seed=seed)
    return HeadResult(
        weight=head.weight.detach().cpu().numpy().astype(np.float32, copy=True),
        bias=head.bias.detach().cpu().numpy().astype(np.float32, copy=True),
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
    return heads_proba([result], z)[0]


# ---- many heads at once ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTask:
    """One head of :func:`train_heads`: its rows of the shared train and val matrices and its seed."""

    train_rows: np.ndarray  # int64 indices into train_z
    val_rows: np.ndarray  # int64 indices into val_z
    seed: int


# Without the compiled CPU kernel (torch's batched products on the CPU): rows gathered per step across the heads of
# a stack (heads x batch_size). 512 (4 heads of 128) was fastest at the demo scale (0.10 s per head-epoch against
# 0.15 s for 8 heads and 0.17 s for 1). Not a result-changing setting.
MAX_ROWS_PER_STEP = 512


def train_heads(train_z: np.ndarray, train_y: np.ndarray, val_z: np.ndarray, val_y: np.ndarray,
                tasks: list[HeadTask], *, settings: dict[str, Any], device: str | None = None,
                max_heads: int | None = None) -> list[HeadResult | BackendError]:
    """Train one fresh ``Linear(d, 2)`` per task, all at once: :func:`train_head` for each, batched.

    Every head is trained exactly as :func:`train_head` trains it alone: the same seed-determined initialisation
    (``torch.manual_seed(seed)`` then ``nn.Linear``), the same batch order (its own generator, one ``randperm`` per
    epoch), its own Adam moments, its own ReduceLROnPlateau and early stopping on its own val rows, and the weights
    of its best epoch. What is shared: the heads' weights and Adam moments are one (H, 2, d) tensor each, an epoch
    of every head is one call (see below), and the val logits of all heads come from one matrix product over the val
    rows any head uses. A head that stops early is dropped from the stack (its best weights kept). Results equal
    independent training up to floating-point summation order (tests/test_batched_heads.py states the tolerance).

    On the CPU an epoch runs in the compiled kernel :func:`backends._head_kernel.adam_epoch` (each embedding row
    read once per step; three times faster than torch's batched products); on a GPU, in torch's batched products
    (:func:`_torch_epoch`).

    Heads are stacked when their train and val sets have the same sizes (one allocation budget); tasks of other
    sizes form their own stack. A task whose rows are invalid gets a :class:`BackendError` in its place, the others
    train.

    Args:
        train_z: float32 (N, d) embeddings every task's ``train_rows`` index (e.g. the whole fine-tuning pool).
        train_y: 0/1 labels (N,).
        val_z: float32 (M, d) embeddings the ``val_rows`` index.
        val_y: 0/1 labels (M,).
        tasks: The heads to train.
        settings: Training settings (see :data:`DEFAULT_SETTINGS`), shared by all heads.
        device: torch device of the arithmetic ("cpu", "cuda", "cuda:1", "auto"); default ``settings["device"]``.
        max_heads: Heads per stack at most (default: all; :data:`MAX_ROWS_PER_STEP` rows per step for torch's
            batched products on the CPU, used only where the compiled kernel is unavailable).

    Returns:
        One :class:`HeadResult` (or the :class:`BackendError` of that task) per task, in task order.
    """
    resolved = resolve_settings(settings, "train_heads")
    out: list[HeadResult | BackendError | None] = [None] * len(tasks)
    stacks: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(tasks):
        try:
            _check_rows(t, len(train_y), len(val_y))
        except BackendError as e:
            out[i] = e
            continue
        stacks.setdefault((len(t.train_rows), len(t.val_rows)), []).append(i)
    if stacks:
        _check_shapes(train_z, train_y, val_z, val_y)
        dev = resolve_device(device or resolved["device"])
        z = as_tensor(train_z, np.float32).to(dev)
        y = as_tensor(train_y, np.int64).to(dev)
        vz = as_tensor(val_z, np.float32).to(dev)
        vy = as_tensor(val_y, np.int64).to(dev)
        if max_heads is None:
            batched = dev.type != "cpu" or _cpu_kernel() is not None  # the kernel takes one head at a time
            max_heads = len(tasks) if batched else max(1, MAX_ROWS_PER_STEP // resolved["batch_size"])
        for members in stacks.values():
            for start in range(0, len(members), max_heads):
                chunk = members[start : start + max_heads]
                for i, res in zip(chunk, _train_stack(z, y, vz, vy, [tasks[i] for i in chunk], resolved)):
                    out[i] = res
    return out  # type: ignore[return-value]  (every slot is filled)


def _check_rows(task: HeadTask, n_train: int, n_val: int) -> None:
    for name, rows, n in (("train", task.train_rows, n_train), ("val", task.val_rows, n_val)):
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
            raise BackendError(f"train_heads: {name} rows must be a non-empty 1-D integer array, got {rows.dtype} "
                               f"{rows.shape}")
        if rows.min() < 0 or rows.max() >= n:
            raise BackendError(f"train_heads: {name} rows out of range [0, {n})")


def _init_head(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial (weight (2, d), bias (2,)) :func:`train_head` draws for ``seed``."""
    torch.manual_seed(seed)
    head = nn.Linear(d, 2)
    return head.weight.detach(), head.bias.detach()


class _Plateau:
    """One head's ReduceLROnPlateau (torch's own, on a stand-in optimiser holding only its learning rate)."""

    def __init__(self, lr: float, patience: int) -> None:
        self.opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="max", factor=0.1, patience=patience)

    def step(self, score: float) -> float:
        self.sched.step(score)
        return float(self.opt.param_groups[0]["lr"])


def _bal_acc_rows(pred: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Balanced accuracy of each row of (H, m) predictions against (H, m) labels, as :func:`balanced_accuracy`
    computes it (mean recall over the classes present, in float64)."""
    recalls, present = [], []
    for c in (0, 1):
        total = (y == c).sum(dim=1).double()
        correct = ((y == c) & (pred == c)).sum(dim=1).double()
        present.append(total > 0)
        recalls.append(torch.where(total > 0, correct / total.clamp(min=1), torch.zeros_like(total)))
    both = present[0] & present[1]
    mean = torch.where(both, (recalls[0] + recalls[1]) / 2, recalls[0] + recalls[1])
    return mean.cpu().numpy()


def _cpu_kernel() -> Any:
    """The compiled CPU epoch (:mod:`backends._head_kernel`), or None where numba cannot be imported."""
    try:
        from backends._head_kernel import adam_epoch
    except ImportError:  # pragma: no cover - numba is a dependency; torch's batched products still work
        return None
    return adam_epoch


def _torch_epoch(z: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, state: dict[str, torch.Tensor],
                 lr: torch.Tensor, step: int, settings: dict[str, Any]) -> int:
    """One epoch of every head of the stack with torch's batched products (any device); returns Adam's step."""
    (beta1, beta2), eps, wd, bs = ADAM_BETAS, ADAM_EPS, settings["weight_decay"], settings["batch_size"]
    w, b = state["w"], state["b"]
    h_n, n = rows.shape
    for start in range(0, n, bs):
        idx = rows[:, start : start + bs]
        nb = idx.shape[1]
        x = z.index_select(0, idx.reshape(-1)).view(h_n, nb, -1)  # (H, nb, d)
        logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (H, nb, 2)
        grad = torch.softmax(logits, dim=2)
        y1 = y[idx].to(grad.dtype)  # − onehot(y), exactly (no scatter: its CUDA kernel adds with atomics)
        grad[..., 0].sub_(1 - y1)
        grad[..., 1].sub_(y1)
        grad.div_(nb)  # d(mean cross-entropy)/d(logits), per head
        step += 1
        bc1, bc2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
        step_size = (-(lr / bc1)).to(z.device, torch.float32)  # (H,): addcdiv's value = -lr / bc1, per head
        for p, g, m, v in ((w, torch.bmm(grad.transpose(1, 2), x), state["m_w"], state["v_w"]),
                           (b, grad.sum(dim=1), state["m_b"], state["v_b"])):
            g = g.add(p, alpha=wd)  # torch.optim.Adam's coupled weight decay, then its update, per element
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
            p.add_(m * step_size.view(-1, *([1] * (p.dim() - 1))) / denom)
    return step


def _train_stack(z: torch.Tensor, y: torch.Tensor, vz: torch.Tensor, vy: torch.Tensor, tasks: list[HeadTask],
                 settings: dict[str, Any]) -> list[HeadResult]:
    """Heads whose train sets share one size and val sets another, trained together (see :func:`train_heads`)."""
    dev, d = z.device, z.shape[1]
    kernel = _cpu_kernel() if dev.type == "cpu" else None
    h_all = len(tasks)
    inits = [_init_head(d, t.seed) for t in tasks]
    state = {"w": torch.stack([wt for wt, _ in inits]).contiguous().to(dev),  # (H, 2, d), as nn.Linear.weight
             "b": torch.stack([bt for _, bt in inits]).contiguous().to(dev)}  # (H, 2)
    state.update(m_w=torch.zeros_like(state["w"]), v_w=torch.zeros_like(state["w"]),
                 m_b=torch.zeros_like(state["b"]), v_b=torch.zeros_like(state["b"]))
    tr = torch.stack([torch.as_tensor(np.asarray(t.train_rows, dtype=np.int64)) for t in tasks])  # (H, n), CPU
    va_np = np.stack([np.asarray(t.val_rows, dtype=np.int64) for t in tasks])
    used, va_local = np.unique(va_np, return_inverse=True)  # the val rows any head uses; each head's positions
    # val logits in float64: a head's val predictions, hence its early stopping, then do not depend on which other
    # heads share its stack (a float32 product's rounding may change with the matrix shapes; float64's would have to
    # move a logit difference below 1e-14 to flip a prediction), so results do not depend on how trials are batched
    vz_used = vz[torch.as_tensor(used).to(dev)].double()
    va = torch.as_tensor(va_local.reshape(va_np.shape)).to(dev)
    vy_heads = vy[torch.as_tensor(va_np).to(dev)]  # (H, m)
    gens = [torch.Generator().manual_seed(t.seed) for t in tasks]  # each head's batch order, as fit() draws it
    plateaus = [_Plateau(settings["lr"], settings["lr_patience"]) for _ in tasks]
    lr = torch.full((h_all,), float(settings["lr"]), dtype=torch.float64)
    best = np.full(h_all, -1.0)
    best_epoch = np.zeros(h_all, dtype=np.int64)
    epochs = np.zeros(h_all, dtype=np.int64)
    best_w, best_b = state["w"].clone(), state["b"].clone()  # epoch 0: the initial weights, as fit() keeps them
    active = np.arange(h_all)  # heads still training; state, tr, va and lr hold only their rows, in this order
    n, step = tr.shape[1], 0
    for epoch in range(1, settings["max_epochs"] + 1):
        perm = torch.stack([torch.randperm(n, generator=gens[h]) for h in active])
        rows = torch.gather(tr, 1, perm)
        if kernel is not None:
            arrays = {k: v.numpy() for k, v in state.items()}
            step = int(kernel(z.numpy(), y.numpy(), rows.numpy(), arrays["w"], arrays["b"], arrays["m_w"],
                              arrays["v_w"], arrays["m_b"], arrays["v_b"], lr.numpy(), step,
                              settings["batch_size"], settings["weight_decay"], *ADAM_BETAS, ADAM_EPS))
        else:
            step = _torch_epoch(z, y, rows.to(dev), state, lr, step, settings)
        with torch.inference_mode():
            vlogits = (torch.einsum("nd,hkd->hnk", vz_used, state["w"].double())
                       + state["b"].double().unsqueeze(1))  # (H, U, 2)
            vl = torch.gather(vlogits, 1, va.unsqueeze(2).expand(-1, -1, 2))
            pred = (vl[..., 1] > vl[..., 0]).long()  # argmax: a tie goes to class 0, as argmax does
            scores = _bal_acc_rows(pred, vy_heads)
        stop = np.zeros(len(active), dtype=bool)
        for j, h in enumerate(active):  # fit()'s bookkeeping, per head
            epochs[h] = epoch
            lr[j] = plateaus[h].step(float(scores[j]))
            if scores[j] > best[h]:
                best[h], best_epoch[h] = scores[j], epoch
                best_w[h], best_b[h] = state["w"][j], state["b"][j]
            elif epoch - best_epoch[h] >= settings["patience"]:
                stop[j] = True
        if stop.all():
            break
        if stop.any():  # a stopped head is frozen at its best weights and leaves the stack
            keep = np.flatnonzero(~stop)
            active = active[keep]
            k_dev = torch.as_tensor(keep).to(dev)
            state = {k: v.index_select(0, k_dev).contiguous() for k, v in state.items()}
            va, vy_heads = va.index_select(0, k_dev), vy_heads.index_select(0, k_dev)
            tr, lr = tr[torch.as_tensor(keep)], lr[torch.as_tensor(keep)]
    return [HeadResult(weight=best_w[h].cpu().numpy().astype(np.float32, copy=True),
                       bias=best_b[h].cpu().numpy().astype(np.float32, copy=True),
                       epochs=int(epochs[h]), best_epoch=int(best_epoch[h]), best_val_bal_acc=float(best[h]))
            for h in range(h_all)]


def heads_proba(results: list[HeadResult], z: np.ndarray) -> np.ndarray:
    """P(y=1) of each row of ``z`` under each head: (H, n) float64, row h = :func:`head_proba` of head h."""
    from scipy.special import expit

    if not results:
        return np.zeros((0, len(z)))
    w = np.stack([r.weight for r in results]).astype(np.float64)  # (H, 2, d)
    b = np.stack([r.bias for r in results]).astype(np.float64)  # (H, 2)
    diff = w[:, 1, :] - w[:, 0, :]  # logit(1) - logit(0) is linear in z; expit(it) = softmax[:, 1], no overflow
    return expit(np.asarray(z, dtype=np.float64) @ diff.T + (b[:, 1] - b[:, 0])).T
