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


# ---- vectorised estimators, calibration, uncertainty (issue 3) ----------------------------------------------------

from scipy.stats import norm, wasserstein_distance  # noqa: E402

from engine.distances import frechet, mmd, probe_auc, tv_shared, wasserstein  # noqa: E402
from engine.separation import _prepare, estimate, pca_reduce  # noqa: E402


def _tricky(dtype: type, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random columns, a constant column, values on a grid (ties at edges), ReLU-like zeros, a far-offset column."""
    x0 = rng.normal(size=(400, 8))
    x1 = rng.normal(loc=0.2, size=(300, 8))
    x0[:, 1], x1[:, 1] = 3.0, rng.choice([3.0, 2.0, 4.0], size=300)  # constant in group 0
    x0[:, 2], x1[:, 2] = rng.integers(0, 11, 400) / 10, rng.integers(-2, 13, 300) / 10  # ties on the edges
    x0[:, 3], x1[:, 3] = np.maximum(x0[:, 3], 0), np.maximum(x1[:, 3], 0)  # many exact zeros = group 0's min
    x0[:, 4], x1[:, 4] = 1e3 + x0[:, 4] * 0.1, 1e3 + x1[:, 4] * 0.1  # ill-conditioned range (exact fallback)
    return x0.astype(dtype), x1.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bins", [50, 10, 3])
def test_vectorised_tv_paper_matches_paper_code(dtype: type, bins: int) -> None:
    rng = np.random.default_rng(10)
    for _ in range(3):
        x0, x1 = _tricky(dtype, rng)
        assert abs(tv_paper(x0, x1, bins) - naive_compute_tvd(x0, x1, bins)) < 1e-12


def test_vectorised_counts_equal_np_histogram_per_column() -> None:
    from engine.distances import histogram_counts, histogram_edges

    rng = np.random.default_rng(11)
    for dtype in (np.float32, np.float64):
        x0, x1 = _tricky(dtype, rng)
        edges = histogram_edges(x0.min(axis=0), x0.max(axis=0), 50)
        c0, c1 = histogram_counts(x0, edges, False), histogram_counts(x1, edges, True)
        for j in range(x0.shape[1]):
            h0, e = np.histogram(x0[:, j], bins=50)
            np.testing.assert_array_equal(e, edges[j])
            np.testing.assert_array_equal(c0[j], h0)
            np.testing.assert_array_equal(c1[j], np.histogram(x1[:, j], bins=e)[0])


def test_tv_shared_symmetric_and_disjoint() -> None:
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(200, 3)), rng.normal(1.0, size=(150, 3))
    assert tv_shared(a, b) == pytest.approx(tv_shared(b, a), abs=1e-15)
    assert tv_shared(a, a + 100.0) == 1.0
    assert tv_paper(a, a + 100.0) == 1.0


@pytest.mark.parametrize(("n", "tol"), [(20000, 0.03), (200000, 0.015)])
def test_tv_of_two_gaussians(n: int, tol: float) -> None:
    # TV(N(0,1), N(mu,1)) = 2 Phi(mu/2) - 1. A histogram estimate has a sampling bias of about
    # sqrt(2 bins / (pi n)) / 2 per group (empty-ish bins add |noise|) plus a discretisation bias that shrinks with the
    # bin width; with 40 bins over about 9 standard deviations both are below the tolerances, which halve with 10x n.
    rng = np.random.default_rng(13)
    mu = 1.0
    x0, x1 = rng.normal(size=(n, 1)), rng.normal(mu, size=(n, 1))
    truth = 2 * norm.cdf(mu / 2) - 1
    assert abs(tv_shared(x0, x1, bins=40) - truth) < tol


def test_other_distances_sanity() -> None:
    rng = np.random.default_rng(14)
    a, a2, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)), rng.normal(1.0, size=(300, 4))
    assert wasserstein(a, b) == pytest.approx(np.mean([wasserstein_distance(a[:, j], b[:, j]) for j in range(4)]))
    assert wasserstein(a, a2) < 0.2 < 0.8 < wasserstein(a, b)
    assert frechet(a, a2) < 0.2 < 3.0 < frechet(a, b)  # |mu0 - mu1|^2 = 4
    assert abs(mmd(a, a2)) < 0.02 < 0.1 < mmd(a, b)
    assert abs(probe_auc(a, a2) - 0.5) < 0.1 and probe_auc(a, b) > 0.9


def test_pca_k_rule() -> None:
    rng = np.random.default_rng(15)
    z = rng.normal(size=(500, 6)) * np.array([10, 5, 1, 1, 1, 1])  # after scaling every column counts equally
    _, k = pca_reduce(z, 0.5)
    assert k == 3  # 6 equal-variance columns: 3 of 6 components reach 50%
    low_rank = rng.normal(size=(500, 2)) @ rng.normal(size=(2, 8)) + 1e-3 * rng.normal(size=(500, 8))
    reduced, k = pca_reduce(low_rank, 0.70)
    assert k <= 2 and reduced.shape == (500, k)
    assert estimate(low_rank, np.repeat([0, 1], 250), np.tile([0, 1], 250), distance="tv",
                    pca_variance=0.7)["pca_k"] == k


def _digits_like(rng: np.random.Generator, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = 600
    y, g = rng.integers(0, 2, n), rng.integers(0, 2, n)
    z = rng.normal(size=(n, 6)).astype(np.float32) + shift * g[:, None] + y[:, None]
    return z, y, g


@pytest.mark.parametrize("distance", ["tv_paper", "tv", "wasserstein", "mmd"])
def test_fast_replicates_equal_recomputation(distance: str) -> None:
    rng = np.random.default_rng(16)
    z, y, g = _digits_like(rng, 0.5)
    rows = np.flatnonzero(y == 1)
    zc, gc = z[rows], g[rows]
    cell = {"z": zc, "g": gc}
    stat = _prepare(distance, cell, {"bins": 20, "seed": 0})
    zc, gc = zc[stat.items], gc[stat.items]  # mmd orders its (sub)sample group 0 first
    from engine.distances import call_distance

    for _ in range(3):
        w0 = (rng.permutation(gc) == 0).astype(np.int32)
        assert stat(w0, 1 - w0) == pytest.approx(call_distance(distance, zc[w0 == 1], zc[w0 == 0],
                                                               {"bins": 20, "seed": 0}), abs=1e-12)
        b0 = np.bincount(rng.choice(np.flatnonzero(gc == 0), np.sum(gc == 0)), minlength=len(gc)).astype(np.int32)
        b1 = np.bincount(rng.choice(np.flatnonzero(gc == 1), np.sum(gc == 1)), minlength=len(gc)).astype(np.int32)
        expected = call_distance(distance, np.repeat(zc, b0, 0), np.repeat(zc, b1, 0), {"bins": 20, "seed": 0})
        if distance != "mmd":  # mmd replicates keep the pooled sample's kernel and bandwidth (see _KernelMMD)
            assert stat(b0, b1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("distance", ["tv_paper", "tv", "wasserstein", "frechet", "mmd", "probe_auc"])
def test_random_attribute_calibrates_to_zero_and_separated_one_does_not(distance: str) -> None:
    rng = np.random.default_rng(17)
    z, y, g = _digits_like(rng, 0.0)
    reps = 10 if distance == "probe_auc" else 40
    null = estimate(z, y, g, distance=distance, bins=10, permutations=reps, seed=1)
    g_sep = (z[:, 0] > np.median(z[:, 0])).astype(int)  # a group that the embeddings clearly separate
    sep = estimate(z, y, g_sep, distance=distance,
                   bins=10, permutations=reps, seed=1)
    scale = max(abs(sep["calibrated"]), 1e-9)
    assert abs(null["calibrated"]) < 0.25 * scale + 3 * null["null_std"]
    assert null["p_value"] > 0.05
    assert sep["calibrated"] > 3 * sep["null_std"] and sep["p_value"] <= 1 / (reps + 1) + 1e-12


def test_estimate_record_is_deterministic_and_complete() -> None:
    rng = np.random.default_rng(18)
    z, y, g = _digits_like(rng, 0.3)
    a = estimate(z, y, g, distance="tv", bins=10, permutations=20, bootstrap=20, seed=3)
    b = estimate(z, y, g, distance="tv", bins=10, permutations=20, bootstrap=20, seed=3)
    assert a == b
    assert set(a) == {"distance", "value", "value_y0", "value_y1", "n_g0", "n_g1", "pca_k", "null_mean", "null_std",
                      "p_value", "calibrated", "ci_low", "ci_high", "boot_shift", "params"}
    # A plug-in histogram TV is biased upwards on resamples (copies fill fewer bins), so the percentile interval
    # need not contain the estimate; it must be a proper interval near it.
    assert a["ci_low"] < a["ci_high"] and abs(a["ci_low"] - a["value"]) < 0.1
    assert a["ci_low"] <= a["value"] <= a["ci_high"]  # the interval is centred on the estimate
    import json

    assert json.loads(json.dumps(a["params"]))["bins"] == 10
    c = estimate(z, y, g, distance="tv", bins=10, permutations=20, bootstrap=20, seed=4)
    assert c["null_mean"] != a["null_mean"] and c["value"] == a["value"]


def test_prevalence_weighting_and_unknown_names() -> None:
    rng = np.random.default_rng(19)
    z, y, g = _digits_like(rng, 0.5)
    y = np.where(rng.random(len(y)) < 0.8, 0, 1)  # 80% class 0
    un = estimate(z, y, g, distance="tv", bins=10)
    pr = estimate(z, y, g, distance="tv", bins=10, class_weights="prevalence")
    p0 = np.mean(y == 0)
    assert un["value"] == pytest.approx((un["value_y0"] + un["value_y1"]) / 2)
    assert pr["value"] == pytest.approx(p0 * pr["value_y0"] + (1 - p0) * pr["value_y1"])
    with pytest.raises(ValueError, match="known distances are: .*tv_paper"):
        estimate(z, y, g, distance="kl")
    with pytest.raises(ValueError, match="class_weights"):
        estimate(z, y, g, distance="tv", class_weights="max")


# ---- size matching, what the bootstrap interval covers, library equivalence ---------------------------------------

from engine.separation import MATCH_DRAWS, _matched, _resample  # noqa: E402


def _no_difference(n0: int, n1: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20-d standard Gaussians for both groups (group 1 shifted by ``shift`` in every dimension), one class."""
    rng = np.random.default_rng(seed)
    g = np.r_[np.zeros(n0, dtype=int), np.ones(n1, dtype=int)]
    z = rng.standard_normal((n0 + n1, 20)) + shift * g[:, None]
    return z, np.zeros(n0 + n1, dtype=int), g


@pytest.mark.parametrize(("n1", "tol"), [(30, 0.03), (300, 0.015)])
def test_match_sizes_estimates_at_the_smaller_groups_size(n1: int, tol: float) -> None:
    # No real difference; group 0 has 3000 items. Raw tv_paper at (3000, n1) is about 0.40 (n1 = 30) / 0.13 (300):
    # the small group's noisy histogram alone makes it large. match_sizes compares both groups at n1 items, so it
    # must agree with the raw estimator's expectation at (n1, n1) (mean of 10 datasets; tolerance = 2 standard
    # deviations of one raw estimate at that size: 0.015 at 30, 0.006 at 300, rounded up).
    # It does NOT lower the value: with both groups small, both histograms are noisy and the floor is HIGHER
    # (about 0.61 against 0.40 at n1 = 30). It puts attributes on the same footing only when their smaller groups
    # have similar sizes; the size-free comparison is `calibrated` (value - permutation null mean).
    matched = estimate(*_no_difference(3000, n1, 0), distance="tv_paper", match_sizes=True)["value"]
    raw_unequal = estimate(*_no_difference(3000, n1, 0), distance="tv_paper")["value"]
    raw_equal = np.mean([estimate(*_no_difference(n1, n1, 100 + s), distance="tv_paper")["value"] for s in range(10)])
    assert abs(matched - raw_equal) < tol
    assert matched > raw_unequal + 2 * tol  # the direction of the change, stated so nobody expects the opposite


def test_match_sizes_equal_groups_is_the_raw_estimate() -> None:
    # equal sizes: every draw keeps every item, so the average of MATCH_DRAWS draws is the plain estimate
    z, y, g = _no_difference(3000, 3000, 1)
    assert estimate(z, y, g, distance="tv_paper", match_sizes=True)["value"] == pytest.approx(
        estimate(z, y, g, distance="tv_paper")["value"], abs=1e-12)


def test_match_sizes_separation_seed_and_record() -> None:
    z, y, g = _no_difference(3000, 300, 2)
    zs, ys, gs = _no_difference(3000, 300, 2, shift=0.5)
    null = estimate(z, y, g, distance="tv_paper", match_sizes=True, permutations=30, bootstrap=20, seed=5)
    sep = estimate(zs, ys, gs, distance="tv_paper", match_sizes=True, permutations=30, bootstrap=20, seed=5)
    assert sep["value"] > null["value"] + 0.05
    assert sep["p_value"] <= 1 / 31 + 1e-12 and null["p_value"] > 0.05
    assert sep["ci_low"] <= sep["value"] <= sep["ci_high"]
    again = estimate(z, y, g, distance="tv_paper", match_sizes=True, permutations=30, bootstrap=20, seed=5)
    assert repr(again) == repr(null)  # repr: value_y1 is NaN (one class), and NaN != NaN
    other = estimate(z, y, g, distance="tv_paper", match_sizes=True, seed=6)
    assert other["value"] != null["value"]  # the draws depend on the seed (default_rng([seed, 2]))
    assert null["params"]["match_sizes"] is True and null["params"]["match_draws"] == MATCH_DRAWS
    assert (null["n_g0"], null["n_g1"]) == (3000, 300)  # full sizes are still reported
    assert "match_sizes" not in estimate(z, y, g, distance="tv_paper")["params"]  # default record unchanged


def test_match_sizes_null_is_conservative() -> None:
    # Observed = mean of MATCH_DRAWS draws, each null replicate = one draw: the null is wider than the statistic's
    # own spread, so under no difference p-values are too large, not too small. Without the averaging the share of
    # p <= 0.1 would be about 0.1; measured here about 0.01 (100 datasets: 0.01 at n1 = 30, 0.00 at n1 = 300).
    ps = []
    for s in range(30):
        z, y, g = _no_difference(1000, 30, 200 + s)
        ps.append(estimate(z[:, :5], y, g, distance="tv_paper", match_sizes=True, permutations=39, seed=s)["p_value"])
    assert np.mean(np.array(ps) <= 0.1) <= 0.1


@pytest.mark.parametrize("distance", ["tv_paper", "tv", "wasserstein", "frechet"])
def test_size_matched_replicates_equal_recomputation(distance: str) -> None:
    # mmd is left out: its replicates keep the bandwidth of the class's pooled (sub)sample (see _KernelMMD), while
    # mmd() on a materialised subsample would take the subsample's own median distance.
    rng = np.random.default_rng(20)
    z, y, g = _digits_like(rng, 0.5)
    g = (rng.random(len(g)) < 0.2).astype(int)  # unequal groups, so matching subsamples group 0
    cell = {"z": z, "g": g}
    params = {"bins": 20, "seed": 0}
    stat = _prepare(distance, cell, params)
    zc, gc = z[stat.items], g[stat.items]
    from engine.distances import call_distance

    for _ in range(3):
        w0, w1 = _matched(gc, rng)
        assert w0.sum() == w1.sum() == min(np.sum(gc == 0), np.sum(gc == 1)) and not np.any(w0 & w1)
        assert stat(w0, w1) == pytest.approx(call_distance(distance, zc[w0 == 1], zc[w1 == 1], params), abs=1e-12)
        m = int(w1.sum())  # a size-matched bootstrap replicate (m draws with replacement per group)
        b0, b1 = _resample(gc == 0, rng, m), _resample(gc == 1, rng, m)
        expected = call_distance(distance, np.repeat(zc, b0, 0), np.repeat(zc, b1, 0), params)
        assert stat(b0, b1) == pytest.approx(expected, abs=1e-12)


def test_sorted_wasserstein_equals_scipy_on_materialised_replicates() -> None:
    # The hand-written replicate path (sorted once, ECDFs by cumulative sums) against the library, dimension by
    # dimension, for a permutation, a bootstrap draw and a size-matched draw.
    rng = np.random.default_rng(21)
    z = np.maximum(rng.standard_normal((500, 7)).astype(np.float32), 0)  # ties at 0, float32
    g = (rng.random(500) < 0.3).astype(int)
    stat = _prepare("wasserstein", {"z": z, "g": g}, {})
    perm = (rng.permutation(g) == 0).astype(np.int32)
    for w0, w1 in [(perm, 1 - perm), (_resample(g == 0, rng), _resample(g == 1, rng)), _matched(g, rng)]:
        x0, x1 = np.repeat(z, w0, 0).astype(np.float64), np.repeat(z, w1, 0).astype(np.float64)
        lib = np.mean([wasserstein_distance(x0[:, j], x1[:, j]) for j in range(z.shape[1])])
        assert abs(stat(w0, w1) - lib) < 1e-12


def test_rbf_kernel_median_is_sklearn_rbf_with_median_distance() -> None:
    from scipy.spatial.distance import pdist
    from sklearn.metrics.pairwise import rbf_kernel

    from engine.distances import rbf_kernel_median

    z = np.random.default_rng(22).normal(size=(101, 6))
    sigma2 = np.median(pdist(z, "sqeuclidean"))  # each pair once; the median of d² is the (median distance)²
    np.testing.assert_allclose(rbf_kernel_median(z), rbf_kernel(z, gamma=1 / (2 * sigma2)), rtol=0, atol=1e-12)
    assert np.allclose(np.diag(rbf_kernel_median(z)), 1.0)


def test_bootstrap_spread_covers_expectation_not_truth() -> None:
    # Why alloclab calls ci_low/ci_high a "sampling spread" and not a confidence interval of the distance.
    # N(0,1) vs N(0.3,1) in 1-D: TV = 2 Phi(0.15) - 1 = 0.119. With 200 items per group and 50 bins, tv_paper's
    # expectation is about 0.27 (empty-ish bins add |noise|), so an interval around the estimate measures how much
    # the estimate moves between samples (it covers the expectation about 95% of the time: 37/40 here) but
    # almost never contains the true distance (1/40 here).
    truth = 2 * norm.cdf(0.15) - 1
    rng = np.random.default_rng(23)
    n = 200
    g, y = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)], np.zeros(2 * n, dtype=int)

    def sample() -> np.ndarray:
        return np.r_[rng.normal(0.0, 1.0, n), rng.normal(0.3, 1.0, n)][:, None]

    expectation = np.mean([tv_paper(x[:n], x[n:]) for x in (sample() for _ in range(300))])
    runs = [estimate(sample(), y, g, distance="tv_paper", bootstrap=100, seed=i) for i in range(40)]
    lo, hi = np.array([r["ci_low"] for r in runs]), np.array([r["ci_high"] for r in runs])
    assert np.mean([r["value"] for r in runs]) > truth + 0.1  # biased well above the truth
    assert np.mean((lo <= truth) & (truth <= hi)) <= 0.2
    assert np.mean((lo <= expectation) & (expectation <= hi)) >= 0.75


def test_match_sizes_replicates_draw_the_smaller_groups_size() -> None:
    from engine.separation import _bootstrap_ci, _permutation_null

    class Recorder:  # a Stat that records the replicates it is given
        def __init__(self, n: int) -> None:
            self.items, self.seen = np.arange(n), []

        def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float:
            self.seen.append((int(w0.sum()), int(w1.sum()), int(np.max(w0 + w1))))
            return 0.0

    g = np.r_[np.zeros(50, dtype=int), np.ones(8, dtype=int)]
    cells = {0: {"g": g, "weight": 1.0}}
    rng = np.random.default_rng(24)
    perm = {0: Recorder(len(g))}
    _permutation_null(perm, cells, 0.0, 5, rng, match_sizes=True)
    assert perm[0].seen == [(8, 8, 1)] * 5  # 8 per group, without replacement, no item in both groups
    boot = {0: Recorder(len(g))}
    _bootstrap_ci(boot, cells, 5, rng, 0.0, match_sizes=True)
    assert [s[:2] for s in boot[0].seen] == [(8, 8)] * 5  # 8 draws with replacement per group
    plain = {0: Recorder(len(g))}
    _bootstrap_ci(plain, cells, 5, rng, 0.0, match_sizes=False)
    assert [s[:2] for s in plain[0].seen] == [(50, 8)] * 5


# ---- batched replicates (issue 10): Stat.many against one call per replicate, bit for bit --------------------------

import engine.separation as separation  # noqa: E402
from engine.distances import histogram_edges, tv_from_counts  # noqa: E402
from engine.separation import _SortedHistogram  # noqa: E402


def _relu_ties(rng: np.random.Generator, n: int = 360, d: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32, two classes, unequal groups; ReLU columns (exact zeros at the minimum), a grid column (ties on the
    edges), a constant column and a column far from zero."""
    y = (rng.random(n) < 0.45).astype(int)
    g = (rng.random(n) < 0.3).astype(int)
    z = rng.normal(size=(n, d)) + 0.4 * g[:, None]
    z[:, :5] = np.maximum(z[:, :5], 0)
    z[:, 5] = np.round(z[:, 5] * 4) / 4
    z[:, 6] = 2.0
    z[:, 7] = 1e3 + 0.1 * z[:, 7]
    return z.astype(np.float32), y, g


@pytest.mark.parametrize("distance", ["tv_paper", "tv"])
@pytest.mark.parametrize("match_sizes", [False, True])
def test_batched_estimate_equals_per_replicate_loop(distance: str, match_sizes: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Same random draws in the same order, same counts, same float operations: every field equal, not approximately.
    z, y, g = _relu_ties(np.random.default_rng(25))
    kw = {"distance": distance, "bins": 12, "permutations": 60, "bootstrap": 40, "seed": 3, "match_sizes": match_sizes}
    batched = estimate(z, y, g, **kw)
    with monkeypatch.context() as patch:  # small chunks and blocks: every loop of the batched path runs several times
        for name, value in (("_REPLICATE_CHUNK", 16), ("_CHUNK_DRAWS", 7), ("_BLOCK_BYTES", 1 << 12), ("_TV_ROWS", 8)):
            patch.setattr(separation, name, value)
        small = estimate(z, y, g, **kw)
    monkeypatch.setattr(separation, "_BATCHED", False)
    loop = estimate(z, y, g, **kw)
    assert loop["p_value"] is not None and loop["ci_low"] is not None
    for key, value in loop.items():
        assert batched[key] == value, key
        assert small[key] == value, key


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sorted_histogram_many_equals_calls(shared: bool, dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permutations, size-matched draws, bootstrap and size-matched bootstrap resamples, and all of them mixed.
    rng = np.random.default_rng(26)
    z, _, g = _relu_ties(rng, n=300)
    stat = _SortedHistogram(z.astype(dtype), 10, shared)
    perms = [rng.permutation(g) for _ in range(12)]
    m = min(np.sum(g == 0), np.sum(g == 1))
    kinds = [[((p == 0).astype(np.int32), (p == 1).astype(np.int32)) for p in perms],
             [_matched(p, rng) for p in perms],
             [(_resample(g == 0, rng), _resample(g == 1, rng)) for _ in range(12)],
             [(_resample(g == 0, rng, m), _resample(g == 1, rng, m)) for _ in range(12)]]
    monkeypatch.setattr(separation, "_BLOCK_BYTES", 1 << 12)
    monkeypatch.setattr(separation, "_TV_ROWS", 16)
    for draws in kinds + [[w for draws in kinds for w in draws[:3]]]:
        expected = np.array([stat(w0, w1) for w0, w1 in draws])
        assert np.array_equal(stat.many(np.array([w[0] for w in draws]), np.array([w[1] for w in draws])), expected)


def test_many_with_groups_too_large_for_16_bit_lanes() -> None:
    rng = np.random.default_rng(27)
    z = np.maximum(rng.normal(size=(20000, 2)), 0)
    g = (rng.random(20000) < 0.5).astype(int)
    w0s = np.array([rng.permutation(g) == 0 for _ in range(3)], dtype=np.int32)
    assert w0s.sum(axis=1).min() > 0xFFFF // 8  # the batched path switches to 32-bit lanes here
    for shared in (False, True):
        stat = _SortedHistogram(z, 10, shared)
        assert np.array_equal(stat.many(w0s, 1 - w0s), [stat(w0, 1 - w0) for w0 in w0s])


def test_tv_from_counts_keeps_the_first_versions_arithmetic() -> None:
    # tv_from_counts now works in place on blocks of rows; its values must stay those of the original expression.
    def reference(p: np.ndarray, q: np.ndarray, edges: np.ndarray | None) -> np.ndarray:
        p_tot, q_tot = p.sum(axis=1), q.sum(axis=1)
        empty = (p_tot == 0) | (q_tot == 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            if edges is not None:
                width = np.diff(edges, axis=1).astype(np.float64)
                p = p / width / p_tot[:, None]
                q = q / width / q_tot[:, None]
                p_tot, q_tot = p.sum(axis=1), q.sum(axis=1)
            tv = 0.5 * np.abs(p / p_tot[:, None] - q / q_tot[:, None]).sum(axis=1)
        return np.where(empty, 1.0, tv)

    rng = np.random.default_rng(28)
    for bins in (1, 3, 8, 50, 130):
        p, q = rng.integers(0, 40, (64, bins)), rng.integers(0, 40, (64, bins))
        p[:3], q[3:5] = 0, 0  # rows with an empty side
        for dtype in (np.float32, np.float64):
            lo = (rng.normal(size=64) * 10.0 ** rng.integers(-2, 4, 64)).astype(dtype)
            edges = histogram_edges(lo, lo + np.abs(lo) + dtype(1), bins)
            assert np.array_equal(tv_from_counts(p, q, edges), reference(p, q, edges))
        assert np.array_equal(tv_from_counts(p, q), reference(p, q, None))
