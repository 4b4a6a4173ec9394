"""The per-trial metrics: sklearn's definitions, NaN where undefined, and the paired test resamples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

from engine.trial import LOSS_CLIP, METRICS, binary_metrics, group_masks, resample_weights, weighted_metrics


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    proba = np.clip(0.5 + 0.3 * (y - 0.5) + 0.25 * rng.normal(size=n), 0, 1)
    proba[:40] = np.round(proba[:40], 1)  # ties, which AUC counts as one half
    return proba, y


def test_binary_metrics_are_sklearn_and_nan_where_undefined() -> None:
    proba, y = _data()
    m = binary_metrics(proba, y)
    pred = (proba >= 0.5).astype(int)
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["bal_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(y, proba))
    assert m["loss"] == pytest.approx(log_loss(y, np.clip(proba, LOSS_CLIP, 1 - LOSS_CLIP)))
    one = binary_metrics(proba[y == 1], y[y == 1])
    assert math.isnan(one["bal_acc"]) and math.isnan(one["auc"])  # not that class's recall
    assert math.isfinite(one["acc"]) and math.isfinite(one["loss"])
    assert all(math.isnan(v) for v in binary_metrics(proba[:0], y[:0]).values())


def test_weighted_metrics_equal_sklearn_with_sample_weight() -> None:
    proba, y = _data()
    w = np.random.default_rng(1).integers(0, 4, size=(5, y.size)).astype(float)
    out = weighted_metrics(proba, y, w)
    pred = (proba >= 0.5).astype(int)
    for b in range(w.shape[0]):
        sw = w[b]
        ref = {"acc": accuracy_score(y, pred, sample_weight=sw),
               "bal_acc": balanced_accuracy_score(y, pred, sample_weight=sw),
               "auc": roc_auc_score(y, proba, sample_weight=sw),
               "loss": log_loss(y, np.clip(proba, LOSS_CLIP, 1 - LOSS_CLIP), sample_weight=sw)}
        for i, m in enumerate(METRICS):
            assert out[i, b] == pytest.approx(ref[m], rel=1e-10), m


def test_unit_weights_give_the_point_metrics() -> None:
    proba, y = _data(seed=2)
    out = weighted_metrics(proba, y, np.ones((1, y.size)))
    point = binary_metrics(proba, y)
    for i, m in enumerate(METRICS):
        assert out[i, 0] == pytest.approx(point[m], rel=1e-12)


def test_a_resample_without_one_class_is_nan() -> None:
    proba, y = _data(n=20)
    w = np.zeros((1, y.size))
    w[0, y == 1] = 1.0
    out = weighted_metrics(proba, y, w)
    assert math.isnan(out[METRICS.index("bal_acc"), 0]) and math.isnan(out[METRICS.index("auc"), 0])


def test_resamples_are_drawn_once_per_cell_and_reproducible() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    groups = {"a": rng.integers(0, 2, 400), "random": rng.integers(0, 2, 400)}
    w = resample_weights(y, groups, 50, seed=7)
    cells = [(a, g) for a, g, _ in group_masks(y, groups)]
    assert list(w) == cells
    for (attr, grp), mask in zip(cells, [m for _, _, m in group_masks(y, groups)], strict=True):
        assert w[(attr, grp)].shape == (50, int(mask.sum()))
        assert (w[(attr, grp)].sum(axis=1) == mask.sum()).all()  # each resample keeps the cell's size
    again = resample_weights(y, groups, 50, seed=7)
    assert all(np.array_equal(w[k], again[k]) for k in w)
    other = resample_weights(y, groups, 50, seed=8)
    assert not np.array_equal(w[("a", 0)], other[("a", 0)])
    assert resample_weights(y, groups, 0, seed=7) == {}


def test_float32_probabilities_of_exactly_one_have_a_finite_loss() -> None:
    """A model returning float32 P(y=1) = 1.0 (sklearn's predict_proba on float32 inputs) gets the clipped loss, not
    NaN from 0 * log(0)."""
    y = np.array([1, 1, 0, 0])
    proba = np.array([1.0, 0.9, 0.0, 0.2], dtype=np.float32)
    out = weighted_metrics(proba, y, np.ones((1, 4)))
    assert np.all(np.isfinite(out[:, 0]))
    assert out[METRICS.index("loss"), 0] == pytest.approx(binary_metrics(proba.astype(np.float64), y)["loss"])
