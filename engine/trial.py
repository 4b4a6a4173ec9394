"""Work that runs inside executor workers (Ray tasks or in-process): pre-train, embed, one allocation trial.

Each function takes plain values, computes, and returns a frozen result; none touches the database (only the
driver writes it). Big shared inputs (the embeddings of the pools and the test set) arrive once through the
object store as a :class:`TrialData`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from backends.base import Checkpoint

METRICS: tuple[str, ...] = ("acc", "bal_acc", "auc", "loss")
STAGE_DISTANCES: tuple[str, ...] = ("transfer",)  # separation.distances computed by their own stage, not here
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
    keep: dict[str, np.ndarray] | None = None  # split -> rows kept (a rule with missing = "drop"); None = all
    transform: dict[str, Any] | None = None  # the spec's [backbone.transform] (image datasets)
    cache_dir: str | None = None  # where decoded images are cached (beside the database); None = decode in memory

    def bundle(self, *, verify: bool = False) -> Any:
        """The dataset as the driver prepared it: rows a ``missing = "drop"`` rule left out are left out here too,
        and image files come decoded (uint8 N×C×H×W, from the cache; ``verify`` checks the cache's SHA-256)."""
        from engine.data import decoded_inputs, restrict

        bundle = _load_bundle(self.dataset_kind, self.dataset_options)
        if self.keep is not None:
            bundle = restrict(bundle, self.keep)
        return decoded_inputs(bundle, self.transform, self.cache_dir, verify=verify)

    def cache_key(self) -> str:
        """What identifies the rows and inputs a worker loads (the cache key of :func:`_sorted_inputs`)."""
        import hashlib

        keep = "" if self.keep is None else hashlib.sha256(b"".join(
            np.packbits(self.keep[s]).tobytes() + s.encode() for s in sorted(self.keep))).hexdigest()
        return json.dumps([self.dataset_kind, self.dataset_options, keep, self.transform], sort_keys=True)

    def backend(self, settings: dict[str, Any]) -> Any:
        from backends import create

        return create(self.backbone, settings, self.options, self.transform)


# ---- pre-training and embedding ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainJob:
    model: ModelRef
    settings: dict[str, Any]
    seed: int
    y_train: np.ndarray
    y_val: np.ndarray
    threads: int | None = None
    regulariser: dict[str, Any] | None = None  # the spec's [regulariser] when it applies to pre-training
    groups_train: np.ndarray | None = None  # then: the regularised attribute's groups of pretrain_train


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Checkpoint
    duration_s: float
    node_id: str | None = None  # where it ran (set by the executor: Ray's node id, or 'local' in-process)


def run_pretrain(job: PretrainJob) -> PretrainResult:
    _limit_threads(job.threads)
    t0 = time.perf_counter()
    bundle = job.model.bundle()
    backend = job.model.backend(job.settings)
    reg = {}
    if job.regulariser is not None:
        from backends.regularisers import Regularisation

        reg = {"regulariser": Regularisation.from_spec(job.regulariser, job.groups_train)}  # type: ignore[arg-type]
    ckpt = backend.pretrain(bundle.inputs("pretrain_train"), job.y_train, bundle.inputs("pretrain_val"), job.y_val,
                            seed=job.seed, **reg)
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
    node_id: str | None = None  # where it ran (set by the executor: Ray's node id, or 'local' in-process)


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
    node_id: str | None = None  # where it ran (set by the executor: Ray's node id, or 'local' in-process)


def run_separation(job: SeparationJob, z: np.ndarray) -> SeparationResult:
    """Every configured distance between the attribute's groups in the test embeddings, calibrated and bootstrapped."""
    from engine.separation import estimate, estimate_label_tv

    _limit_threads(job.threads)
    t0 = time.perf_counter()
    st = job.settings
    rows = []
    for dist in st["distances"]:
        if dist in STAGE_DISTANCES:  # computed by a stage of its own (engine.pipeline)
            continue
        fn = estimate_label_tv if dist == "tv_label" else estimate
        res = fn(z, job.y, job.g, distance=dist, bins=st["bins"], pca_variance=st["pca_variance"],
                       class_weights=st["class_weights"], permutations=st["permutations"], bootstrap=st["bootstrap"],
                       seed=st["seed"], match_sizes=st.get("match_sizes", False))
        params = res.pop("params")
        rows.append({**res, "params_json": json.dumps(params, sort_keys=True)})
    return SeparationResult(rows, time.perf_counter() - t0)


# ---- metrics ---------------------------------------------------------------------------------------------------

def binary_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC of P(y=1) and mean cross-entropy (sklearn's ``log_loss``).

    Undefined values are NaN, never a substitute: all four on an empty set; balanced accuracy and AUC when only one
    class is present (sklearn would return that class's recall as the "balanced" accuracy).
    """
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    if y.size == 0:
        return {m: float("nan") for m in METRICS}
    pred = (proba >= 0.5).astype(np.int64)  # = argmax of the two softmax outputs
    both = np.unique(y).size == 2
    bal = float("nan")
    if both:
        bal = float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1)]))
    return {
        "acc": float(accuracy_score(y, pred)),
        "bal_acc": bal,
        "auc": float(roc_auc_score(y, proba)) if both else float("nan"),
        "loss": float(log_loss(y, np.clip(proba, LOSS_CLIP, 1 - LOSS_CLIP), labels=[0, 1])),
    }


LOSS_CLIP = 1e-12  # probabilities are clipped to [1e-12, 1 - 1e-12] before the log, in both metric paths


def weighted_metrics(proba: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """:func:`binary_metrics` under B item-weight vectors at once: (len(METRICS), B), rows in METRICS order.

    ``w`` (B, n) holds bootstrap multiplicities (how often each item is drawn in a resample). Hand-written rather
    than B calls of sklearn because a trial evaluates about 11 groups × B = 200 resamples: the loop costs ~2 s per
    trial (AUC alone ~1 ms per call). ``tests/test_trial_metrics.py`` checks every metric against sklearn with
    ``sample_weight`` (and against :func:`binary_metrics` at unit weights). See :func:`weighted_metrics_t`.
    """
    return weighted_metrics_t(proba, y, np.ascontiguousarray(np.asarray(w, dtype=np.float64).T))


def weighted_metrics_t(proba: np.ndarray, y: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """:func:`weighted_metrics` with the weights given item-major: ``wt`` float64 (n, B).

    Item-major, because every step then moves whole rows: the sums are one (k, n) @ (n, B) product, and the AUC
    gathers rows. AUC counts ties as one half (as sklearn does): the negatives' rows, in score order, are summed
    cumulatively once, and each positive reads the sums below its score and up to the end of its tie block
    (:func:`_weighted_auc_numerator`). Measured at the demo scale (11 groups, 4000 test items, B = 200):
    see :func:`resample_metrics`.
    """
    out = np.full((len(METRICS), wt.shape[1]), np.nan)
    if y.size == 0:
        return out
    y = np.asarray(y, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)  # float32 would round 1 - 1e-12 to 1: log(0) in the loss
    pred = (proba >= 0.5).astype(np.int64)
    p = np.clip(proba, LOSS_CLIP, 1 - LOSS_CLIP)
    item_loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    # every weighted sum at once: one (6, n) @ (n, B) product
    total, correct, loss, pos, neg, hit1, hit0 = np.vstack([
        np.ones(y.size), pred == y, item_loss, y == 1, y == 0, (pred == 1) & (y == 1), (pred == 0) & (y == 0),
    ]).astype(np.float64) @ wt
    with np.errstate(invalid="ignore", divide="ignore"):
        out[METRICS.index("acc")] = correct / total
        out[METRICS.index("loss")] = loss / total
        if np.any(y == 1) and np.any(y == 0):
            both = (pos > 0) & (neg > 0)  # a resample can miss a class entirely: NaN, as in binary_metrics
            out[METRICS.index("bal_acc")] = np.where(both, (hit0 / neg + hit1 / pos) / 2, np.nan)
            out[METRICS.index("auc")] = np.where(both, _weighted_auc_numerator(proba, y, wt) / (pos * neg), np.nan)
    return out


def _weighted_auc_numerator(proba: np.ndarray, y: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Σ over positives of w × (negative weight strictly below its score + half the negative weight tied with it),
    per resample: (B,). Only the negatives' rows are summed (in score order) and only the positives' rows read."""
    order = np.argsort(proba, kind="stable")
    s, ys = proba[order], y[order]
    neg_rows, pos_rows = np.flatnonzero(ys == 0), np.flatnonzero(ys == 1)  # sorted positions
    cum = np.zeros((neg_rows.size + 1, wt.shape[1]))
    np.cumsum(wt[order[neg_rows]], axis=0, out=cum[1:])  # negative weight of the first k negatives, k = 0..n_neg
    # for each positive: negatives strictly below its score, and up to the end of its tie block
    lo = np.searchsorted(s[neg_rows], s[pos_rows], side="left")
    hi = np.searchsorted(s[neg_rows], s[pos_rows], side="right")
    below = cum[lo]
    return np.sum(wt[order[pos_rows]] * (below + 0.5 * (cum[hi] - below)), axis=0)


def group_cells(groups: dict[str, Any]) -> list[tuple[str, int]]:
    """(attribute, grp) of every evaluated cell, in the order of every per-cell array: 'overall' (-1), then groups."""
    return [(OVERALL, -1)] + [(attr, grp) for attr in groups for grp in (0, 1)]


def group_masks(y: np.ndarray, groups: dict[str, np.ndarray]) -> list[tuple[str, int, np.ndarray]]:
    """(attribute, grp, boolean mask) of every evaluated cell (:func:`group_cells` order)."""
    return [(attr, grp, np.ones(y.size, dtype=bool) if grp < 0 else groups[attr] == grp)
            for attr, grp in group_cells(groups)]


def group_metrics(proba: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Metrics per group of EVERY attribute, plus the whole set as attribute 'overall', grp -1.

    :func:`weighted_metrics_t` at unit weights (equal to :func:`binary_metrics`, i.e. sklearn, to 1e-12;
    tests/test_trial_metrics.py), five times faster than sklearn's four calls per group."""
    rows = []
    for attr, grp, mask in group_masks(y, groups):
        values = weighted_metrics_t(proba[mask], y[mask], np.ones((int(mask.sum()), 1)))[:, 0]
        rows.extend({"attribute": attr, "grp": grp, "metric": m, "value": float(v)} for m, v in zip(METRICS, values))
    return rows


def resample_weights(y: np.ndarray, groups: dict[str, np.ndarray], n_resamples: int,
                     seed: int) -> dict[tuple[str, int], np.ndarray]:
    """The paired test-set bootstrap: per evaluated cell (attribute, grp), B resamples of its test items.

    Each cell's items are drawn with replacement (its size kept), as multiplicities (B, n_cell) uint16. The draws
    depend only on (seed, attribute name, grp) and the cell's items, so every trial of an experiment is scored on
    the same B resamples (the driver draws them once and ships them with :class:`TrialData`): differences between
    runs stay paired, and a slope's bootstrap distribution reflects which items happen to be in the test set.
    """
    import zlib

    out: dict[tuple[str, int], np.ndarray] = {}
    if n_resamples <= 0:
        return out
    for attr, grp, mask in group_masks(y, groups):
        n = int(mask.sum())
        rng = np.random.default_rng([seed, zlib.crc32(attr.encode()), grp + 1])
        idx = rng.integers(0, max(n, 1), size=(n_resamples, n)) + (np.arange(n_resamples) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)
        out[(attr, grp)] = counts.astype(np.uint16)
    return out


def item_major(weights: dict[tuple[str, int], np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """The resample multiplicities (B, n_cell) as float64 (n_cell, B), the layout :func:`weighted_metrics_t` reads;
    convert once per batch of trials, not once per trial."""
    return {cell: np.ascontiguousarray(w.T, dtype=np.float64) for cell, w in weights.items()}


def resample_metrics(proba: np.ndarray, y: np.ndarray, groups: dict[str, np.ndarray],
                     weights: dict[tuple[str, int], np.ndarray], *, converted: bool = False) -> np.ndarray:
    """(cells, len(METRICS), B) metrics on the shared resamples, cells in :func:`group_masks` order.

    ``weights`` as :func:`resample_weights` draws them, or already :func:`item_major` (``converted=True``).
    At the demo scale (11 groups, 4000 test items, B = 200) 0.06 s per trial; the resample-major version before
    took 0.37 s."""
    cells = group_masks(y, groups)
    if not weights:
        return np.zeros((len(cells), len(METRICS), 0))
    wt = weights if converted else item_major(weights)
    return np.stack([weighted_metrics_t(proba[mask], y[mask], wt[(attr, grp)]) for attr, grp, mask in cells])


# ---- allocation trials -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialData:
    """Shared by every trial of an experiment; put in the object store once."""

    z: dict[str, np.ndarray]  # split -> embeddings (n, d), rows in item-id order
    y: dict[str, np.ndarray]  # split -> labels
    groups: dict[str, dict[str, np.ndarray]]  # split -> attribute -> 0/1
    resamples: dict[tuple[str, int], np.ndarray] | None = None  # test cell -> (B, n_cell) multiplicities


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
    regulariser: dict[str, Any] | None = None  # the spec's [regulariser] when it applies to fine-tuning
    counts: tuple[int, int] | None = None  # protocol 'expand': (n0, n1) of the train set; val is balanced (α 0.5)


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    metrics: list[dict[str, Any]]
    resamples: np.ndarray  # (cells, metrics, B): the metrics on the shared test resamples (group_masks order)
    n_train_g1: int
    p_y_train: float
    epochs: int
    best_val_bal_acc: float
    duration_s: float
    node_id: str | None = None  # where it ran (set by the executor: Ray's node id, or 'local' in-process)


_INPUTS: dict[str, dict[str, Any]] = {}  # per worker process: ModelRef.cache_key() -> sorted inputs (at most 2)


def _sorted_inputs(model: ModelRef) -> dict[str, Any]:
    """Model inputs of the trial splits in item-id order (the order of TrialData), cached per worker process."""
    key = model.cache_key()
    if key in _INPUTS:
        return _INPUTS[key]
    if len(_INPUTS) >= 2:
        _INPUTS.pop(next(iter(_INPUTS)))
    bundle = model.bundle()
    out: dict[str, Any] = {}
    for split in ("pool_train", "pool_val", "test"):
        order = np.argsort(bundle.splits[split].ids, kind="stable")
        out[split] = bundle.inputs(split)[order]
    _INPUTS[key] = out
    return out


def _finetune(job: TrialJob, data: TrialData, checkpoint: Checkpoint, tr: np.ndarray,
              va: np.ndarray) -> tuple[np.ndarray, int, float]:
    """'full' / 'lora': the backend fine-tunes itself from the checkpoint; returns (test P(y=1), epochs, val score)."""
    if job.model is None:
        raise ValueError(f"mode '{job.mode}' needs the dataset and backbone (TrialJob.model)")
    inputs = _sorted_inputs(job.model)
    backend = job.model.backend(job.settings)
    reg = {}
    if job.regulariser is not None:
        from backends.regularisers import Regularisation

        groups = data.groups["pool_train"][job.regulariser["attribute"]][tr]
        reg = {"regulariser": Regularisation.from_spec(job.regulariser, groups)}
    tuned = backend.finetune(checkpoint, inputs["pool_train"][tr], data.y["pool_train"][tr], inputs["pool_val"][va],
                             data.y["pool_val"][va], mode=job.mode, settings=job.settings, seed=job.seed, **reg)
    proba = backend.predict_proba(tuned, inputs["test"])
    return proba, int(tuned.log.get("epochs", 0)), float(tuned.log.get("best_val_bal_acc", float("nan")))


def run_trial(job: TrialJob, data: TrialData, checkpoint: Checkpoint | None = None) -> TrialResult:
    """One trial alone: :func:`run_trials` with a batch of one, its error raised."""
    (outcome,) = run_trials(TrialBatch([job]), data, checkpoint).outcomes
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return outcome.result


@dataclass(frozen=True)
class TrialBatch:
    """Trials one worker runs together: last-layer heads of one batch train as one stacked problem."""

    jobs: list[TrialJob]
    device: str = "cpu"  # where last-layer heads train ("cpu", "cuda"); resolved by the driver


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    result: TrialResult | None
    error: BaseException | None  # this trial's failure; the batch's other trials are unaffected


@dataclass(frozen=True)
class TrialBatchResult:
    outcomes: list[TrialOutcome]
    duration_s: float
    node_id: str | None = None  # where it ran (set by the executor: Ray's node id, or 'local' in-process)


def _allocate(job: TrialJob, data: TrialData) -> tuple[np.ndarray, np.ndarray]:
    from engine.sampling import COUNT_SAMPLERS, SAMPLERS, TRAIN_STREAM, VAL_STREAM

    sample = SAMPLERS[job.sampler]
    if job.counts is not None:  # expand: the counts as given; the val set balanced, the same at every count
        n0, n1 = job.counts
        tr = COUNT_SAMPLERS[job.sampler](data.groups["pool_train"][job.attribute], data.y["pool_train"], n0, n1,
                                         job.seed, TRAIN_STREAM)
        va = sample(data.groups["pool_val"][job.attribute], data.y["pool_val"], 0.5, job.budget_val, job.seed,
                    VAL_STREAM)
        return tr, va
    tr = sample(data.groups["pool_train"][job.attribute], data.y["pool_train"], job.alpha, job.budget, job.seed,
                TRAIN_STREAM)
    va = sample(data.groups["pool_val"][job.attribute], data.y["pool_val"], job.alpha, job.budget_val, job.seed,
                VAL_STREAM)
    return tr, va


def _result(job: TrialJob, data: TrialData, tr: np.ndarray, proba: np.ndarray, epochs: int, best: float,
            resamples: dict[tuple[str, int], np.ndarray], share_s: float = 0.0) -> TrialResult:
    """Evaluate P(y=1) on the test set for the groups of every attribute, on the set and on its resamples
    (``resamples``: the shared test resamples, :func:`item_major`). ``duration_s`` = ``share_s`` (the trial's share
    of its batch's training) + the time of this evaluation."""
    t0 = time.perf_counter()
    metrics = group_metrics(proba, data.y["test"], data.groups["test"])
    boot = resample_metrics(proba, data.y["test"], data.groups["test"], resamples, converted=True)
    return TrialResult(
        trial_id=job.trial_id,
        metrics=metrics,
        resamples=boot,
        n_train_g1=int(data.groups["pool_train"][job.attribute][tr].sum()),
        p_y_train=float(data.y["pool_train"][tr].mean()),
        epochs=epochs,
        best_val_bal_acc=best,
        duration_s=share_s + time.perf_counter() - t0,
    )


def run_trials(batch: TrialBatch, data: TrialData, checkpoint: Checkpoint | None = None) -> TrialBatchResult:
    """Allocate each trial's fine-tuning sets, fine-tune, evaluate on the test set for the groups of every attribute.

    'last_layer' trials train fresh linear heads on the frozen embeddings, all of the batch at once
    (:func:`backends.head.train_heads`); 'full' / 'lora' trials fine-tune the backend itself, one after another.
    A trial that fails (an infeasible allocation, a head whose training raises, an evaluation error) fails alone:
    its outcome carries the error and the others go on. ``duration_s`` of each trial is its share of the batch's
    wall time (heads train together), so the trials' durations add up to the batch's.
    """
    t0 = time.perf_counter()
    if batch.jobs:
        _limit_threads(batch.jobs[0].threads)
    outcomes: dict[str, TrialOutcome] = {}
    done: list[tuple[TrialJob, np.ndarray, np.ndarray, int, float]] = []  # (job, tr, proba, epochs, best val)
    ready: list[tuple[TrialJob, np.ndarray, np.ndarray]] = []
    for job in batch.jobs:
        try:
            tr, va = _allocate(job, data)
        except Exception as e:  # noqa: BLE001 - one infeasible allocation fails one trial
            outcomes[job.trial_id] = TrialOutcome(job.trial_id, None, e)
            continue
        if job.mode == "last_layer":
            ready.append((job, tr, va))
            continue
        try:
            if checkpoint is None:
                raise ValueError(f"mode '{job.mode}' needs the pre-trained checkpoint")
            proba, epochs, best = _finetune(job, data, checkpoint, tr, va)
            done.append((job, tr, proba, epochs, best))
        except Exception as e:  # noqa: BLE001
            outcomes[job.trial_id] = TrialOutcome(job.trial_id, None, e)
    if ready:
        for (job, tr, _), head in zip(ready, _train_last_layer(ready, data, batch.device)):
            if isinstance(head, BaseException):
                outcomes[job.trial_id] = TrialOutcome(job.trial_id, None, head)
            else:
                done.append((job, tr, head[0], head[1], head[2]))
    resamples = item_major(data.resamples or {})
    share = (time.perf_counter() - t0) / max(len(batch.jobs), 1)
    for job, tr, proba, epochs, best in done:
        try:
            outcomes[job.trial_id] = TrialOutcome(job.trial_id, _result(job, data, tr, proba, epochs, best, resamples,
                                                                        share), None)
        except Exception as e:  # noqa: BLE001
            outcomes[job.trial_id] = TrialOutcome(job.trial_id, None, e)
    return TrialBatchResult([outcomes[j.trial_id] for j in batch.jobs], time.perf_counter() - t0)


def _train_last_layer(ready: list[tuple[TrialJob, np.ndarray, np.ndarray]], data: TrialData,
                      device: str) -> list[tuple[np.ndarray, int, float] | BaseException]:
    """Train the heads of ``ready`` together; (test P(y=1), epochs, best val score) or the error, per trial.

    Heads of different fine-tuning settings train in separate stacks. If a stack's training raises as a whole,
    each of its heads is trained alone, so that only the heads that fail on their own are failed.
    """
    from backends.head import HeadTask, heads_proba, train_heads

    out: list[tuple[np.ndarray, int, float] | BaseException | None] = [None] * len(ready)
    by_settings: dict[str, list[int]] = {}
    for i, (job, _, _) in enumerate(ready):
        by_settings.setdefault(json.dumps(job.settings, sort_keys=True), []).append(i)
    for members in by_settings.values():
        settings = ready[members[0]][0].settings
        tasks = [HeadTask(ready[i][1], ready[i][2], ready[i][0].seed) for i in members]
        args = (data.z["pool_train"], data.y["pool_train"], data.z["pool_val"], data.y["pool_val"])
        try:
            heads = train_heads(*args, tasks, settings=settings, device=device)
        except Exception:  # noqa: BLE001 - isolate: each head alone
            heads = []
            for task in tasks:
                try:
                    heads.extend(train_heads(*args, [task], settings=settings, device=device))
                except Exception as e:  # noqa: BLE001
                    heads.append(e)
        trained = [(i, h) for i, h in zip(members, heads) if not isinstance(h, BaseException)]
        for i, h in zip(members, heads):
            if isinstance(h, BaseException):
                out[i] = h
        if trained:
            proba = heads_proba([h for _, h in trained], data.z["test"])
            for row, (i, h) in enumerate(trained):
                out[i] = (proba[row], h.epochs, h.best_val_bal_acc)
    return out  # type: ignore[return-value]  (every slot is filled)


# ---- label-aware separation: transfer between groups ------------------------------------------------------------

@dataclass(frozen=True)
class TransferJob:
    """Heads trained on one group of ``attribute`` only (α = 0 and α = 1 at budget K), ``repeats`` seeded times."""

    attribute: str
    budget: int
    budget_val: int
    repeats: int
    seed: int
    settings: dict[str, Any]  # the last-layer head's training settings (the spec's [finetune], less mode)
    device: str = "cpu"
    threads: int | None = None


def transfer_gaps(metrics: dict[tuple[float, int], dict[tuple[str, int, str], float]], attribute: str,
                  repeats: list[int], metric: str) -> np.ndarray:
    """Per repeat, how much worse a head does on the group it was not trained on, mean of both directions:
    [m(h₀, g₁) − m(h₀, g₀) + m(h₁, g₀) − m(h₁, g₁)] / 2 for a loss, the opposite sign for balanced accuracy.
    ``metrics[(α, repeat)][(attribute, grp, metric)]`` holds the value (h₀ = α 0, h₁ = α 1)."""
    sign = 1.0 if metric == "loss" else -1.0
    out = []
    for r in repeats:
        h0, h1 = metrics[(0.0, r)], metrics[(1.0, r)]
        cross = h0[(attribute, 1, metric)] + h1[(attribute, 0, metric)]
        own = h0[(attribute, 0, metric)] + h1[(attribute, 1, metric)]
        out.append(sign * (cross - own) / 2)
    return np.asarray(out, dtype=np.float64)


def run_transfer(job: TransferJob, data: TrialData) -> SeparationResult:
    """The ``transfer`` distance of one attribute: train heads on group 0 only and on group 1 only (the α = 0 and
    α = 1 allocations at the same K, each repeat with its own seeded subsets and initialisation), score each on both
    groups' test items, and report the mean drop when a head meets the group it was not trained on, in balanced
    accuracy (``transfer``) and in loss (``transfer_loss``). The interval is the seed + test-set one of
    :func:`engine.intervals.combine`: repeats are the seeds, and the shared test resamples move every head
    together. Under exchangeable groups (a random partition) the expected gap is 0, so ``calibrated`` is the value
    itself and ``p_value`` is the interval's two-sided t-test against 0."""
    from engine.intervals import combine

    _limit_threads(job.threads)
    t0 = time.perf_counter()
    seeds = [job.seed * 1000 + r for r in range(job.repeats)]
    jobs = [TrialJob(f"transfer-{alpha}-{s}", job.attribute, alpha, s, job.budget, job.budget_val, "natural",
                     job.settings, job.threads) for alpha in (0.0, 1.0) for s in seeds]
    outcomes = run_trials(TrialBatch(jobs, job.device), data).outcomes
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise failed[0]
    cells = [(a, g) for a, g, _ in group_masks(data.y["test"], data.groups["test"])]
    point: dict[tuple[float, int], dict[tuple[str, int, str], float]] = {}
    boot: dict[tuple[float, int], dict[tuple[str, int, str], np.ndarray]] = {}
    for j, o in zip(jobs, outcomes):
        assert o.result is not None
        point[(j.alpha, j.seed)] = {(m["attribute"], m["grp"], m["metric"]): m["value"] for m in o.result.metrics}
        boot[(j.alpha, j.seed)] = {(a, g, metric): o.result.resamples[c, k] for c, (a, g) in enumerate(cells)
                                   for k, metric in enumerate(METRICS)}
    rows = []
    for name, metric in (("transfer", "bal_acc"), ("transfer_loss", "loss")):
        per_seed = transfer_gaps(point, job.attribute, seeds, metric)
        per_resample = (transfer_gaps(boot, job.attribute, seeds, metric).mean(axis=0)
                        if data.resamples else None)  # (B,): the repeat-mean gap on each test resample
        ci = combine(per_seed, per_resample)
        n0, n1 = (int((data.groups["test"][job.attribute] == g).sum()) for g in (0, 1))
        params = {"distance": name, "metric": metric, "repeats": job.repeats, "seed": job.seed,
                  "budget": job.budget, "budget_val": job.budget_val, "interval": ci["method"],
                  "per_repeat": [float(v) for v in per_seed], "stderr": ci["stderr"], "df": ci["df"]}
        rows.append({"distance": name, "value": ci["estimate"], "value_y0": None, "value_y1": None,
                     "n_g0": n0, "n_g1": n1, "pca_k": None, "null_mean": 0.0, "null_std": None,
                     "p_value": ci["p_value"], "calibrated": ci["estimate"], "ci_low": ci["ci_low"],
                     "ci_high": ci["ci_high"], "boot_shift": None,
                     "params_json": json.dumps(params, sort_keys=True)})
    return SeparationResult(rows, time.perf_counter() - t0)
