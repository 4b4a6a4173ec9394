"""Work that runs inside executor workers (Ray tasks or in-process): pre-train, embed, one allocation trial.

Each function takes plain values, computes, and returns a frozen result; none touches the database (only the
driver writes it). Big shared inputs (the embeddings of the pools and the test set) arrive once through the
object store as a :class:`TrialData`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from backends.base import Checkpoint

METRICS: tuple[str, ...] = ("acc", "bal_acc", "auc", "loss")
OVERALL = "overall"  # attribute name of the whole-test-set rows (grp -1)


def _limit_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load_bundle(kind: str, options: dict[str, Any]) -> Any:
    from backends import datasets

    module = datasets.get(kind)
    return module.load(module.Options.model_validate(options))


@dataclass(frozen=True)
class ModelRef:
    """Where a worker finds its inputs and its model: the dataset loader and the backbone, as the spec names them."""

    dataset_kind: str
    dataset_options: dict[str, Any]
    backbone: str
    options: dict[str, Any]  # the backbone's options

    def bundle(self) -> Any:
        return _load_bundle(self.dataset_kind, self.dataset_options)

    def backend(self, settings: dict[str, Any]) -> Any:
        from backends import create

        return create(self.backbone, settings, self.options)


# ---- pre-training and embedding ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainJob:
    model: ModelRef
    settings: dict[str, Any]
    seed: int
    y_train: np.ndarray
    y_val: np.ndarray
    threads: int | None = None


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Checkpoint
    duration_s: float


def run_pretrain(job: PretrainJob) -> PretrainResult:
    _limit_threads(job.threads)
    t0 = time.perf_counter()
    bundle = job.model.bundle()
    backend = job.model.backend(job.settings)
    ckpt = backend.pretrain(bundle.inputs("pretrain_train"), job.y_train, bundle.inputs("pretrain_val"), job.y_val,
                            seed=job.seed)
    return PretrainResult(ckpt, time.perf_counter() - t0)


@dataclass(frozen=True)
class EmbedJob:
    model: ModelRef
    settings: dict[str, Any]
    split: str
    with_proba: bool
    threads: int | None = None


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray  # (n, d) float32, in the split's item order
    proba: np.ndarray | None  # the pre-trained model's P(y=1), when asked
    duration_s: float


def run_embed(job: EmbedJob, checkpoint: Checkpoint) -> EmbedResult:
    """Embed one split (the checkpoint is a separate argument so Ray resolves it from the object store)."""
    _limit_threads(job.threads)
    t0 = time.perf_counter()
    backend = job.model.backend(job.settings)
    x = job.model.bundle().inputs(job.split)
    vectors = backend.embed(checkpoint, x)
    # a backbone used as loaded (pre-training max_epochs = 0) has no task head of its own to evaluate
    trained = checkpoint.log.get("trained", True) if isinstance(checkpoint.log, dict) else True
    proba = backend.predict_proba(checkpoint, x) if job.with_proba and trained else None
    return EmbedResult(vectors, proba, time.perf_counter() - t0)


# ---- latent separation ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeparationJob:
    attribute: str
    y: np.ndarray  # test labels, rows in item-id order
    g: np.ndarray  # the attribute's test groups, same order
    settings: dict[str, Any]  # the spec's [separation] (distances, bins, pca_variance, ...)
    threads: int | None = None


@dataclass(frozen=True)
class SeparationResult:
    rows: list[dict[str, Any]]  # one per distance, columns of separation_values (less stage/attribute/seed)
    duration_s: float


def run_separation(job: SeparationJob, z: np.ndarray) -> SeparationResult:
    """Every configured distance between the attribute's groups in the test embeddings, calibrated and bootstrapped."""
    from engine.separation import estimate

    _limit_threads(job.threads)
    t0 = time.perf_counter()
    st = job.settings
    rows = []
    for dist in st["distances"]:
        res = estimate(z, job.y, job.g, distance=dist, bins=st["bins"], pca_variance=st["pca_variance"],
                       class_weights=st["class_weights"], permutations=st["permutations"], bootstrap=st["bootstrap"],
                       seed=st["seed"])
        params = res.pop("params")
        rows.append({**res, "params_json": json.dumps(params, sort_keys=True)})
    return SeparationResult(rows, time.perf_counter() - t0)


# ---- metrics ---------------------------------------------------------------------------------------------------

def binary_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC of P(y=1) and mean cross-entropy; NaN where undefined (e.g. one class)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if y.size == 0:
        return {m: float("nan") for m in METRICS}
    pred = (proba >= 0.5).astype(np.int64)  # = argmax of the two softmax outputs
    p = np.clip(proba, 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    both = np.unique(y).size == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y, pred))
    return {
        "acc": float(np.mean(pred == y)),
        "bal_acc": bal,
        "auc": float(roc_auc_score(y, proba)) if both else float("nan"),
        "loss": loss,
    }


def group_metrics(proba: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Metrics per group of EVERY attribute, plus the whole set as attribute 'overall', grp -1."""
    rows = [{"attribute": OVERALL, "grp": -1, "metric": m, "value": v} for m, v in binary_metrics(proba, y).items()]
    for attr, g in groups.items():
        for grp in (0, 1):
            mask = g == grp
            rows += [{"attribute": attr, "grp": grp, "metric": m, "value": v}
                     for m, v in binary_metrics(proba[mask], y[mask]).items()]
    return rows


# ---- allocation trials -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialData:
    """Shared by every trial of an experiment; put in the object store once."""

    z: dict[str, np.ndarray]  # split -> embeddings (n, d), rows in item-id order
    y: dict[str, np.ndarray]  # split -> labels
    groups: dict[str, dict[str, np.ndarray]]  # split -> attribute -> 0/1


@dataclass(frozen=True)
class TrialJob:
    trial_id: str
    attribute: str
    alpha: float
    seed: int
    budget: int
    budget_val: int
    sampler: str
    settings: dict[str, Any]  # fine-tuning: lr, weight_decay, batch_size, max_epochs, patience, lr_patience
    threads: int | None = None
    mode: str = "last_layer"
    model: ModelRef | None = None  # what a worker needs to fine-tune the backbone itself ('full', 'lora')


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    metrics: list[dict[str, Any]]
    n_train_g1: int
    p_y_train: float
    epochs: int
    best_val_bal_acc: float
    duration_s: float


@lru_cache(maxsize=2)
def _sorted_inputs(kind: str, options_json: str) -> dict[str, Any]:
    """Model inputs of the trial splits in item-id order (the order of TrialData), cached per worker process."""
    bundle = _load_bundle(kind, json.loads(options_json))
    out = {}
    for split in ("pool_train", "pool_val", "test"):
        order = np.argsort(bundle.splits[split].ids, kind="stable")
        out[split] = bundle.inputs(split)[order]
    return out


def _finetune(job: TrialJob, data: TrialData, checkpoint: Checkpoint, tr: np.ndarray,
              va: np.ndarray) -> tuple[np.ndarray, int, float]:
    """'full' / 'lora': the backend fine-tunes itself from the checkpoint; returns (test P(y=1), epochs, val score)."""
    if job.model is None:
        raise ValueError(f"mode '{job.mode}' needs the dataset and backbone (TrialJob.model)")
    inputs = _sorted_inputs(job.model.dataset_kind, json.dumps(job.model.dataset_options, sort_keys=True))
    backend = job.model.backend(job.settings)
    tuned = backend.finetune(checkpoint, inputs["pool_train"][tr], data.y["pool_train"][tr], inputs["pool_val"][va],
                             data.y["pool_val"][va], mode=job.mode, settings=job.settings, seed=job.seed)
    proba = backend.predict_proba(tuned, inputs["test"])
    return proba, int(tuned.log.get("epochs", 0)), float(tuned.log.get("best_val_bal_acc", float("nan")))


def run_trial(job: TrialJob, data: TrialData, checkpoint: Checkpoint | None = None) -> TrialResult:
    """Allocate the fine-tuning sets, fine-tune (a fresh linear head on frozen embeddings for 'last_layer'; the
    backend itself for 'full' / 'lora'), evaluate on the test set for the groups of every attribute."""
    from backends.head import head_proba, train_head
    from engine.sampling import SAMPLERS, TRAIN_STREAM, VAL_STREAM

    _limit_threads(job.threads)
    t0 = time.perf_counter()
    sample = SAMPLERS[job.sampler]
    tr = sample(data.groups["pool_train"][job.attribute], job.alpha, job.budget, job.seed, TRAIN_STREAM)
    va = sample(data.groups["pool_val"][job.attribute], job.alpha, job.budget_val, job.seed, VAL_STREAM)
    if job.mode == "last_layer":
        head = train_head(data.z["pool_train"][tr], data.y["pool_train"][tr], data.z["pool_val"][va],
                          data.y["pool_val"][va], settings=job.settings, seed=job.seed)
        proba, epochs, best = head_proba(head, data.z["test"]), head.epochs, head.best_val_bal_acc
    else:
        if checkpoint is None:
            raise ValueError(f"mode '{job.mode}' needs the pre-trained checkpoint")
        proba, epochs, best = _finetune(job, data, checkpoint, tr, va)
    metrics = group_metrics(proba, data.y["test"], data.groups["test"])
    return TrialResult(
        trial_id=job.trial_id,
        metrics=metrics,
        n_train_g1=int(data.groups["pool_train"][job.attribute][tr].sum()),
        p_y_train=float(data.y["pool_train"][tr].mean()),
        epochs=epochs,
        best_val_bal_acc=best,
        duration_s=time.perf_counter() - t0,
    )
