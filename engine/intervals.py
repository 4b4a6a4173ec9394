"""Intervals over what replicates in an allocation study: the seeds and the finite test set.

Runs are not independent draws. Runs of one seed share a head initialisation and nested allocation subsets; the
two groups of one run share one head; every run is scored on the same test items. So a statistic (a slope, a gap)
is computed **per seed** on that seed's whole curve, and its uncertainty combines two variance components:

- **seed** (unit of replication: the seed, which draws the allocation subsets, the head initialisation and the
  batch order): ``var(per-seed estimates, ddof=1) / S``;
- **test set** (unit: the test item): the variance of the seed-mean estimate over B paired bootstrap resamples of
  the test items. Resampling is within each evaluated group, and the same B resamples score every trial, so a
  resample moves every run of the curve together, as drawing another test set would.

``se = sqrt(v_seed + v_test)``; the 95% interval is ``estimate ± t(0.975, df) · se`` with Welch–Satterthwaite
degrees of freedom ``(v_seed + v_test)² / (v_seed² / (S − 1) + v_test² / (B − 1))``. With few seeds and a
dominant seed component this is close to the seed t interval (df ≈ S − 1); with a dominant test component it is
close to a normal interval. The two components are estimated separately and added, which counts the
head-by-item interaction in both: slightly conservative (the coverage test in tests/test_intervals.py measures
it). What it does not cover: the fixed pool partition (which items a grouping puts on each side of the pool).
That is common to every seed and every test resample; the null partitions (independent random groupings run
through the same pipeline) are what measure it, and verdicts compare against them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

NAN = float("nan")
LEVEL = 0.95

METHOD_SEED_TEST = "seed t + paired test bootstrap (Welch–Satterthwaite df)"
METHOD_SEED = "seed t (no test resamples: the finite test set is not covered)"
METHOD_TEST = "paired test bootstrap only (1 seed: seed variation not estimable)"


@dataclass(frozen=True)
class Curve:
    """One seed's curve: x (n,), point values (n,) and, when resampled, values on the B test resamples (B, n).

    NaN marks a missing value (a failed trial or an undefined metric); it is dropped, never propagated.
    """

    x: np.ndarray
    v: np.ndarray
    boot: np.ndarray | None = None


def ols(x: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OLS slope and intercept of ``v`` on ``x`` along the last axis, skipping NaN values of ``v`` per row.

    Vectorised over leading axes (e.g. B resamples at once). NaN where fewer than 2 distinct x are finite.
    """
    v = np.asarray(v, dtype=np.float64)
    x = np.broadcast_to(np.asarray(x, dtype=np.float64), v.shape)
    w = np.isfinite(v)
    n = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.where(w, x, 0).sum(axis=-1) / n
        vm = np.where(w, v, 0).sum(axis=-1) / n
        dx = np.where(w, x - xm[..., None], 0)
        sxx = (dx**2).sum(axis=-1)
        sxv = (dx * np.where(w, v - vm[..., None], 0)).sum(axis=-1)
        ok = (n >= 2) & (sxx > 1e-15 * np.maximum(1.0, n))
        slope = np.where(ok, sxv / np.where(ok, sxx, 1), np.nan)
    return slope, np.where(ok, vm - slope * xm, np.nan)


def gap(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Full-shot minus zero-shot along the last axis: mean of v where x = 1 minus mean where x = 0 (NaN-aware)."""
    v = np.asarray(v, dtype=np.float64)
    full, zero = np.isclose(x, 1.0), np.isclose(x, 0.0)
    if not full.any() or not zero.any():
        return np.full(v.shape[:-1], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN end gives NaN, which is the answer
        return np.nanmean(v[..., full], axis=-1) - np.nanmean(v[..., zero], axis=-1)


def slope_of(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    return ols(x, v)[0]


def combine(per_seed: np.ndarray, per_resample: np.ndarray | None, level: float = LEVEL) -> dict[str, float | str | int]:
    """Estimate (mean over seeds) with the seed + test-set interval described in the module docstring.

    Args:
        per_seed: the statistic per seed on the real test set (NaN seeds are dropped and counted).
        per_resample: the seed-mean statistic on each test resample (NaN resamples dropped), or None.

    Returns keys ``estimate, stderr, se_seed, se_test, df, ci_low, ci_high, p_value, seed_min, seed_max,
    n_seeds, n_resamples, method``. ``p_value`` is two-sided against 0 on the same t reference.
    """
    s = np.asarray(per_seed, dtype=np.float64)
    s = s[np.isfinite(s)]
    r = np.asarray(per_resample if per_resample is not None else [], dtype=np.float64)
    r = r[np.isfinite(r)]
    out: dict[str, float | str | int] = {
        "estimate": NAN, "stderr": NAN, "se_seed": NAN, "se_test": NAN, "df": NAN, "ci_low": NAN, "ci_high": NAN,
        "p_value": NAN, "seed_min": NAN, "seed_max": NAN, "n_seeds": int(s.size), "n_resamples": int(r.size),
        "method": "",
    }
    if s.size == 0:
        return out
    est = float(s.mean())
    out.update(estimate=est, seed_min=float(s.min()), seed_max=float(s.max()))
    v_seed = float(np.var(s, ddof=1) / s.size) if s.size >= 2 else NAN
    v_test = float(np.var(r, ddof=1)) if r.size >= 2 else NAN
    if s.size >= 2 and r.size >= 2:
        var = v_seed + v_test
        denom = v_seed**2 / (s.size - 1) + v_test**2 / (r.size - 1)
        df, method = (var**2 / denom if denom > 0 else math.inf), METHOD_SEED_TEST
    elif s.size >= 2:
        var, df, method = v_seed, float(s.size - 1), METHOD_SEED
    elif r.size >= 2:
        var, df, method = v_test, float(r.size - 1), METHOD_TEST
    else:
        out["method"] = "no interval: one seed and no test resamples"
        return out
    se = math.sqrt(var)
    q = float(stats.t.ppf(0.5 + level / 2, df))
    p = float(2 * stats.t.sf(abs(est) / se, df)) if se > 0 else (0.0 if est != 0 else 1.0)
    out.update(stderr=se, se_seed=math.sqrt(v_seed) if math.isfinite(v_seed) else NAN,
               se_test=math.sqrt(v_test) if math.isfinite(v_test) else NAN, df=df, ci_low=est - q * se,
               ci_high=est + q * se, p_value=p, method=method)
    return out


def per_seed_statistic(curves: dict[int, Curve], stat) -> tuple[np.ndarray, np.ndarray | None, int]:  # noqa: ANN001
    """``stat(x, v)`` per seed and, when every seed has resamples, the seed mean on each resample.

    Returns (per-seed values (S,), per-resample seed means (B,) or None, number of NaN point values dropped).
    """
    seeds = sorted(curves)
    point = np.array([stat(curves[s].x, curves[s].v) for s in seeds], dtype=np.float64)
    dropped = int(sum(int(np.sum(~np.isfinite(curves[s].v))) for s in seeds))
    boots = [curves[s].boot for s in seeds]
    if not seeds or any(b is None or b.shape[0] < 2 for b in boots):
        return point, None, dropped
    if len({b.shape[0] for b in boots}) != 1:  # seeds scored on different resample sets cannot be paired
        return point, None, dropped
    per_b = np.stack([stat(curves[s].x, np.where(np.isfinite(curves[s].v), b, np.nan))
                      for s, b in zip(seeds, boots, strict=True)])  # (S, B); a dropped point stays dropped
    ok = np.isfinite(point)
    with np.errstate(invalid="ignore"):
        means = per_b[ok].mean(axis=0) if ok.any() else np.full(per_b.shape[1], np.nan)
    return point, means, dropped


def paired(c1: dict[int, Curve], c0: dict[int, Curve]) -> dict[int, Curve]:
    """Per seed, (v₁ − v₀) / 2 on α for the two groups of one run (matched on α): what the shared head does to
    both groups cancels. Its slope on α equals the mean of the two groups' own-share slopes."""
    return difference(c1, c0, scale=0.5)


def difference(ca: dict[int, Curve], cb: dict[int, Curve], scale: float = 1.0) -> dict[int, Curve]:
    """Per seed, scale · (v_a − v_b) of two groups scored by the same runs, matched on x (and on each test
    resample): what the shared head does to both groups cancels."""
    out = {}
    for s in sorted(set(ca) & set(cb)):
        a, b = ca[s], cb[s]
        common, ia, ib = np.intersect1d(np.round(a.x, 10), np.round(b.x, 10), return_indices=True)
        boot = None
        if a.boot is not None and b.boot is not None and a.boot.shape[0] == b.boot.shape[0]:
            boot = (a.boot[:, ia] - b.boot[:, ib]) * scale
        out[s] = Curve(common, (a.v[ia] - b.v[ib]) * scale, boot)
    return out


def interval(curves: dict[int, Curve], stat) -> dict[str, float | str | int]:  # noqa: ANN001
    """:func:`combine` of ``stat`` over the seeds of ``curves``, plus ``n`` (points used) and ``n_dropped``."""
    point, boot, dropped = per_seed_statistic(curves, stat)
    out = combine(point, boot)
    out["n"] = int(sum(int(np.sum(np.isfinite(c.v))) for c in curves.values()))
    out["n_dropped"] = dropped
    return out


def null_range(null_estimates: list[float]) -> tuple[float, float]:
    """The null range: the span of 0 and every null partition's estimate (finite ones)."""
    vals = [0.0] + [float(v) for v in null_estimates if v is not None and math.isfinite(float(v))]
    return min(vals), max(vals)


def beyond_null(ci_low: float, ci_high: float, null_estimates: list[float]) -> bool:
    """True when the 95% interval lies entirely outside the null range (so it excludes 0 as well).

    The null partitions are random groupings run through the identical pipeline: their estimates show what the
    pool partition, the seeds and the test set produce with no real difference between the groups, including the
    pool-partition variation the interval itself cannot see.
    """
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return False
    lo, hi = null_range(null_estimates)
    return ci_low > hi or ci_high < lo
