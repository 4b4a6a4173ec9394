"""Correlations across attributes (and across groups) with tests that are honest at small n.

The paper correlates one number per attribute (its TV) with one number per attribute (its loss slope) inside one
dataset: 3 to 11 points. At that size:

- **p-values** come from a permutation test of the pairings (``scipy.stats.permutation_test``, ``pairings``):
  exact (all n! pairings) when n <= 8, 9,999 seeded Monte Carlo pairings above; two-sided. With n = 3 the
  smallest possible two-sided p is 2/3! = 1/3. The same for Spearman's rho (on ranks).
- **the interval of r** is Fisher's z (``pearsonr(...).confidence_interval()``), which needs n >= 4; a percentile
  bootstrap of r under-covers at n = 5–10.
- below :data:`MIN_TESTABLE` points ``testable`` is False: r and r² are descriptions, not evidence. Pooling
  experiments (``alloclab report --experiments a,b``) is how to reach enough points.

Points are independent units: one per non-null attribute, and **one** for the null baseline (the mean over the
null partitions of the x and y values, per experiment in a pooled report), since several random groupings are
replicates of one baseline, not independent attributes.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats

from engine.analysis import EXPLANATIONS
from engine.spec import is_null_partition

NAN = float("nan")
MIN_TESTABLE = 5  # below this many points a correlation is described, not tested
EXACT_MAX_N = 8  # 8! = 40,320 pairings: exact; above, Monte Carlo
MONTE_CARLO = 9999
TOO_FEW = ("too few attributes to test a correlation (n = {n}): add attributes or datasets (pooled reports "
           "across experiments, --experiments, are where the test becomes meaningful); r and r² are shown as "
           "descriptions only")


def _pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    return (xc * yc).sum(axis=axis) / np.sqrt((xc**2).sum(axis=axis) * (yc**2).sum(axis=axis))


def _perm_p(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, str]:
    exact = x.size <= EXACT_MAX_N
    res = stats.permutation_test((x,), lambda xp, axis=-1: _pearson(xp, y, axis), permutation_type="pairings",
                                 vectorized=True, n_resamples=np.inf if exact else MONTE_CARLO,
                                 alternative="two-sided", random_state=seed)
    how = (f"exact permutation ({math.factorial(x.size)} pairings)" if exact
           else f"Monte Carlo permutation ({MONTE_CARLO} pairings)")
    return float(res.pvalue), how


def correlate(x: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Pearson r, r², Fisher-z 95% interval of r, permutation p-values of r and Spearman's rho.

    NaN statistics when n < 3 or either side is constant. Returns keys ``r, r2, r_ci_low, r_ci_high, p_value,
    spearman_rho, spearman_p, n, testable, p_method``.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = {"r": NAN, "r2": NAN, "r_ci_low": NAN, "r_ci_high": NAN, "p_value": NAN, "spearman_rho": NAN,
           "spearman_p": NAN, "n": int(x.size), "testable": bool(x.size >= MIN_TESTABLE), "p_method": ""}
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["p_method"] = "not computed (fewer than 3 points or a constant side)"
        return out
    pr = stats.pearsonr(x, y)
    r = float(pr.statistic)
    out.update(r=r, r2=r * r)
    if x.size >= 4:
        ci = pr.confidence_interval(0.95)
        out.update(r_ci_low=float(ci.low), r_ci_high=float(ci.high))
    out["p_value"], out["p_method"] = _perm_p(x, y, seed)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    out["spearman_rho"] = float(stats.spearmanr(x, y).statistic)
    if np.ptp(rx) > 0 and np.ptp(ry) > 0:
        out["spearman_p"] = _perm_p(rx, ry, seed)[0]
    return out


def _null_group(attribute: str) -> str | None:
    """The null baseline an attribute belongs to ('random' or 'exp:random'), or None for a real attribute."""
    if not is_null_partition(attribute):
        return None
    prefix, _, _ = attribute.rpartition(":")
    return f"{prefix}:random" if prefix else "random"


def points(values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Attribute -> (x, y) with the null partitions merged into one point per baseline (means of x and of y)."""
    out: dict[str, tuple[float, float]] = {}
    nulls: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for attr, (x, y) in values.items():
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        base = _null_group(attr)
        if base is None:
            out[attr] = (x, y)
        else:
            nulls[base].append((x, y))
    for base, pts in nulls.items():
        out[base] = (float(np.mean([p[0] for p in pts])), float(np.mean([p[1] for p in pts])))
    return out


X_KINDS = {"calibrated": "calibrated", "raw": "value"}  # correlations.x -> separations column


def correlations(separations: list[dict], attr_slopes: list[dict], *, seed: int = 0) -> list[dict]:
    """Across attributes: each distance (calibrated, then raw) against each metric's attribute slope and gap.

    ``x = 'calibrated'`` uses the distance minus its permutation-null mean (like is compared with like: raw
    histogram TV rises as a group shrinks); ``x = 'raw'`` the estimate itself. ``r2`` is r**2 and is labelled as
    such (the paper's plots print r² as "r"; we never do).

    Returns rows with keys ``distance, x, metric, y`` and those of :func:`correlate`.
    """
    dist: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in separations:
        for x_kind, col in X_KINDS.items():
            v = row.get(col)
            if v is not None and math.isfinite(float(v)):
                dist[(row["distance"], x_kind)][row["attribute"]] = float(v)
    ys: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in attr_slopes:
        for y in ("slope", "gap"):
            v = row.get(y)
            ys[(row["metric"], y)][row["attribute"]] = NAN if v is None else float(v)
    out = []
    for (distance, x_kind) in sorted(dist, key=lambda k: (k[0], k[1] != "calibrated")):
        for (metric, y) in sorted(ys, key=lambda k: (k[1] != "slope", k[0])):
            both = {a: (d, ys[(metric, y)][a]) for a, d in dist[(distance, x_kind)].items() if a in ys[(metric, y)]}
            pts = points(both)
            keys = sorted(pts)
            res = correlate(np.array([pts[k][0] for k in keys]), np.array([pts[k][1] for k in keys]), seed)
            out.append({"distance": distance, "x": x_kind, "metric": metric, "y": y, **res})
    return out


GROUP_EXPLANATIONS = tuple(e for e in EXPLANATIONS if e != "tv")  # one value per group (TV is per attribute)


def explanation_correlations(expl: list[dict], separations: list[dict], attr_slopes: list[dict], *,
                             distance: str = "tv_paper", seed: int = 0) -> list[dict]:
    """Each explanation against the loss slope, with n the number of independent points.

    ``tv`` is one number per attribute: it is correlated with the attribute's loss slope (unit 'attribute', the
    null partitions as one point, calibrated TV when available). The group-level explanations (pre-training
    share, pre-trained balanced accuracy, class prevalence) are per group: correlated with the group's loss slope
    (unit 'group'); of the null partitions only the first one's groups ('random') enter, so the baseline is one
    grouping like every other attribute.
    """
    sep = {r["attribute"]: r for r in separations if r["distance"] == distance}
    slope = {r["attribute"]: float(r["slope"]) for r in attr_slopes if r["metric"] == "loss"
             and r.get("slope") is not None}
    tv_vals = {}
    for a, s in slope.items():
        if a in sep:
            cal = sep[a].get("calibrated")
            x = cal if cal is not None and math.isfinite(float(cal)) else sep[a].get("value")
            tv_vals[a] = (NAN if x is None else float(x), s)
    pts = points(tv_vals)
    keys = sorted(pts)
    out = [{"explanation": "tv", "unit": "attribute",
            **correlate(np.array([pts[k][0] for k in keys]), np.array([pts[k][1] for k in keys]), seed)}]
    for name in GROUP_EXPLANATIONS:
        pairs = [(float(r[name]), float(r["loss_slope"])) for r in expl
                 if (not is_null_partition(r["attribute"]) or r["attribute"].rsplit(":", 1)[-1] == "random")
                 and r[name] is not None and r["loss_slope"] is not None
                 and math.isfinite(float(r[name])) and math.isfinite(float(r["loss_slope"]))]
        out.append({"explanation": name, "unit": "group",
                    **correlate(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]), seed)})
    return out
