"""engine.separation: the paper's histogram TV, checked against a naive transcription of its code."""

from __future__ import annotations

import numpy as np
import pytest

from engine.separation import attribute_tv, tv_paper


def naive_compute_tvd(x: np.ndarray, y: np.ndarray, bins: int = 50) -> float:
    """Direct transcription of compute_tvd in the authors' src/utils/distance_utils.py (method.md §4)."""
    tvs = []
    for d in range(x.shape[1]):
        hist_x, edges = np.histogram(x[:, d], bins=bins, density=True)
        hist_y, _ = np.histogram(y[:, d], bins=edges, density=True)
        hist_x = hist_x / np.sum(hist_x)
        hist_y = hist_y / np.sum(hist_y)
        tvs.append(0.5 * np.sum(np.abs(hist_x - hist_y)))
    return float(np.mean(tvs))


@pytest.mark.parametrize("bins", [50, 7])
def test_matches_paper_formula(bins: int) -> None:
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(300, 12))
    x1 = rng.normal(loc=0.3, scale=1.2, size=(200, 12))
    assert tv_paper(x0, x1, bins) == pytest.approx(naive_compute_tvd(x0, x1, bins), abs=1e-12)


def test_identical_samples_give_zero() -> None:
    x = np.random.default_rng(1).normal(size=(100, 5))
    assert tv_paper(x, x.copy()) == pytest.approx(0.0, abs=1e-15)


def test_disjoint_supports_give_one() -> None:
    rng = np.random.default_rng(2)
    x0 = rng.uniform(0, 1, size=(50, 3))
    # group 1 entirely outside group 0's edges: the paper's code gives NaN here, we define 1.0
    assert tv_paper(x0, x0 + 10.0) == 1.0
    # disjoint but inside the range (alternate bins) is 1 by the formula itself
    a = np.repeat([[0.5], [2.5]], 10, axis=0)
    b = np.repeat([[1.5]], 10, axis=0)
    assert tv_paper(a, b, bins=3) == pytest.approx(1.0)


def test_constant_dimension_and_1d_input() -> None:
    x0 = np.zeros((20, 1))
    assert tv_paper(x0, np.zeros((5, 1))) == pytest.approx(0.0)
    assert tv_paper(np.arange(10.0), np.arange(10.0)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("x0", "x1", "match"),
    [
        (np.empty((0, 3)), np.ones((4, 3)), "x0 .*empty"),
        (np.ones((4, 3)), np.empty((0, 3)), "x1 .*empty"),
        (np.ones((4, 3)), np.ones((4, 2)), "dimensions"),
        (np.array([[np.nan]]), np.ones((4, 1)), "NaN"),
    ],
)
def test_bad_input_raises(x0: np.ndarray, x1: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tv_paper(x0, x1)


def _labelled(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.repeat([0, 0, 1, 1], 60)
    g = np.tile(np.repeat([0, 1], 60), 2)
    z = rng.normal(size=(240, 4)) + (g[:, None] * (1 + y[:, None]))  # more separation in class 1
    return z, y, g


def test_attribute_tv_per_class_and_mean() -> None:
    z, y, g = _labelled(np.random.default_rng(3))
    out = attribute_tv(z, y, g, bins=20)
    v0 = naive_compute_tvd(z[(y == 0) & (g == 0)], z[(y == 0) & (g == 1)], 20)
    v1 = naive_compute_tvd(z[(y == 1) & (g == 0)], z[(y == 1) & (g == 1)], 20)
    assert out["value_y0"] == pytest.approx(v0, abs=1e-12)
    assert out["value_y1"] == pytest.approx(v1, abs=1e-12)
    assert out["value"] == pytest.approx((v0 + v1) / 2, abs=1e-12)
    assert out["value_y1"] > out["value_y0"]
    assert (out["n_g0"], out["n_g1"]) == (120, 120)


def test_attribute_tv_skips_class_with_empty_group() -> None:
    z, y, g = _labelled(np.random.default_rng(4))
    keep = ~((y == 1) & (g == 1))
    out = attribute_tv(z[keep], y[keep], g[keep], bins=20)
    assert np.isnan(out["value_y1"])
    assert out["value"] == out["value_y0"]
    with pytest.raises(ValueError, match="no class"):
        attribute_tv(z[g == 0], y[g == 0], g[g == 0])
