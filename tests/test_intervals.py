"""Coverage of alloclab's slope intervals, by simulation with the noise structures of a real allocation study.

Each draw simulates one study: 11 α values × 3 seeds, two groups scored on one finite test set (per-item intercepts
and own-share slopes, so the truth is the population mean slope), and the dependencies that made the old pooled-OLS
interval under-cover: a per-seed offset and drift shared by both groups (one head scores both), a per-seed random
walk along α (nested allocation subsets), per-group per-seed drifts, an item-by-run interaction, and, for the
attribute slope and the null rule, a pool-partition effect common to every seed (which side of the pool trains
the head). The paired test bootstrap uses B resamples per group shared by every run, as the workers do.
Pure numpy, seeded, a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.intervals import Curve, beyond_null, combine, gap, interval, ols, paired, slope_of

ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 10)
SEEDS = (42, 43, 44)
N_ITEMS, B, DRAWS = 250, 200, 400


def _weights(rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.integers(0, n, size=(B, n)) + (np.arange(B) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=B * n).reshape(B, n).astype(np.float64)


def simulate(rng: np.random.Generator, beta: tuple[float, float], pool_sd: float) -> dict[int, dict[int, Curve]]:
    """One study: {grp: {seed: Curve over own share... stored on α}}; group g's true own-share slope is beta[g]."""
    pool = pool_sd * rng.normal() * ALPHAS  # which half of the pool trains the head: shared by seeds and groups
    shared = {s: 0.01 * rng.normal() + 0.004 * rng.normal() * ALPHAS + np.cumsum(0.002 * rng.normal(size=ALPHAS.size))
              for s in SEEDS}  # one head scores both groups: offset, drift, nested-subset walk
    out: dict[int, dict[int, Curve]] = {}
    for grp in (0, 1):
        own = ALPHAS if grp == 1 else 1.0 - ALPHAS
        a = 0.3 + 0.2 * rng.normal(size=N_ITEMS)  # the finite test set: fixed items, scored by every run
        c = beta[grp] + 0.05 * rng.normal(size=N_ITEMS)
        w = _weights(rng, N_ITEMS)
        curves = {}
        for s in SEEDS:
            drift = 0.003 * rng.normal() * own + np.cumsum(0.001 * rng.normal(size=ALPHAS.size))
            items = (a[:, None] + c[:, None] * own[None, :] + (shared[s] + pool + drift)[None, :]
                     + 0.02 * rng.normal(size=(N_ITEMS, ALPHAS.size)))  # item × run interaction
            curves[s] = Curve(ALPHAS, items.mean(axis=0), w @ items / N_ITEMS)
        out[grp] = curves
    return out


def _own(curves: dict[int, Curve], grp: int) -> dict[int, Curve]:
    """Re-express group 0's curves on its own share 1 − α."""
    if grp == 1:
        return curves
    return {s: Curve(1.0 - c.x, c.v, c.boot) for s, c in curves.items()}


def test_ols_matches_polyfit_and_skips_nan() -> None:
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, 9)
    v = rng.normal(size=(4, 9))
    v[1, 3] = np.nan
    slope, icpt = ols(x, v)
    for i in range(4):
        keep = np.isfinite(v[i])
        b, a = np.polyfit(x[keep], v[i, keep], 1)
        assert slope[i] == pytest.approx(b, rel=1e-10) and icpt[i] == pytest.approx(a, rel=1e-10)
    assert np.isnan(ols(np.zeros(5), rng.normal(size=5))[0])  # constant x: no slope


def test_combine_reduces_to_the_seed_t_interval_without_resamples() -> None:
    from scipy import stats

    per_seed = np.array([0.1, 0.3, 0.2, np.nan])
    out = combine(per_seed, None)
    res = stats.ttest_1samp(per_seed[:3], 0.0)
    lo, hi = res.confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
    assert out["p_value"] == pytest.approx(res.pvalue, rel=1e-10)
    assert out["n_seeds"] == 3 and out["df"] == 2


def _coverage(beta: tuple[float, float], pool_sd: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    hits = {"g0": 0, "g1": 0, "attr": 0, "gap1": 0}
    for _ in range(DRAWS):
        sim = simulate(rng, beta, pool_sd)
        for grp in (0, 1):
            res = interval(_own(sim[grp], grp), slope_of)
            hits[f"g{grp}"] += res["ci_low"] <= beta[grp] <= res["ci_high"]
        att = interval(paired(sim[1], sim[0]), slope_of)
        hits["attr"] += att["ci_low"] <= (beta[0] + beta[1]) / 2 <= att["ci_high"]
        g1 = interval(sim[1], gap)
        hits["gap1"] += g1["ci_low"] <= beta[1] <= g1["ci_high"]
    return {k: v / DRAWS for k, v in hits.items()}


def test_group_attribute_and_gap_intervals_cover_the_truth() -> None:
    cov = _coverage((-0.04, 0.02), pool_sd=0.0, seed=7)
    for name, c in cov.items():
        assert 0.90 <= c <= 0.99, (name, c)


def test_attribute_slope_covers_with_a_pool_partition_effect() -> None:
    # the pool effect moves both groups together (one head): the paired attribute slope cancels it
    cov = _coverage((0.01, 0.03), pool_sd=0.02, seed=11)
    assert 0.90 <= cov["attr"] <= 0.99, cov


def test_null_attribute_rarely_matters_and_a_real_one_does() -> None:
    rng = np.random.default_rng(3)
    matters = detected = 0
    n = 300
    for _ in range(n):
        nulls = []
        for _k in range(3):  # three null partitions, each with its own pool effect
            sim = simulate(rng, (0.0, 0.0), pool_sd=0.02)
            nulls.append(interval(paired(sim[1], sim[0]), slope_of)["estimate"])
        sim = simulate(rng, (0.0, 0.0), pool_sd=0.02)
        res = interval(paired(sim[1], sim[0]), slope_of)
        matters += beyond_null(res["ci_low"], res["ci_high"], nulls)
        sim = simulate(rng, (-0.03, -0.03), pool_sd=0.02)
        real = interval(paired(sim[1], sim[0]), slope_of)
        detected += beyond_null(real["ci_low"], real["ci_high"], nulls)
    assert matters / n <= 0.10
    assert detected / n >= 0.8


def test_the_old_pooled_ols_interval_under_covers() -> None:
    """The construction this module replaces: OLS over all 33 runs pooled, as if independent."""
    from scipy import stats

    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(200):
        sim = simulate(rng, (-0.04, 0.02), pool_sd=0.0)
        x = np.concatenate([c.x for c in sim[1].values()])
        v = np.concatenate([c.v for c in sim[1].values()])
        res = stats.linregress(x, v)
        half = stats.t.ppf(0.975, x.size - 2) * res.stderr
        hits += res.slope - half <= 0.02 <= res.slope + half
    assert hits / 200 < 0.90  # nominal 0.95
