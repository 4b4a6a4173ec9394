"""Allocation-curve fits and the best allocation, with bootstrap uncertainty over seeds.

Reviewers asked for more than straight lines (method.md §10.1–2): per group we fit the metric against the group's
own sample count n = share·K with

- ``linear``: m(n) = a + b·(n / K)   (the paper's line, in own share)
- ``power``:  m(n) = a + b·n^(−c), 0.01 ≤ c ≤ 3  (Rolf et al.'s saturating scaling law)

both fitted and compared on the same points (n ≥ 1: a power law has no value at n = 0) by R², RMSE and AIC. From the better-fitting model of each group
we read the α that maximises the worst group's metric and the α that maximises the mean of the two groups (for a
loss, "maximise" means minimise), searched only inside the data, with the range of per-seed optima (fewer than 5
seeds) or a percentile bootstrap over seeds and test resamples (5 or more).

The fits pool every seed's runs as points: R², RMSE and AIC describe the shape of the curve and compare the two
models on the same points; they are not tests (runs of one seed are dependent), and no interval is attached to a
fit's parameters.

To add a model: write ``_fit_<name>(n, v, k) -> _Model | None`` and add it to MODELS.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import optimize

NAN = float("nan")
LOWER_IS_BETTER = {"loss"}


@dataclass(frozen=True)
class _Model:
    name: str
    params: tuple[float, ...]
    predict: Callable[[np.ndarray], np.ndarray]  # own sample count -> metric


def _fit_linear(n: np.ndarray, v: np.ndarray, k: int) -> _Model | None:
    """OLS in own share, on n ≥ 1 like the power law so the two compare on the same points (the ``slopes``
    table keeps the paper's OLS over every point, share 0 included)."""
    keep = n >= 1
    n, v = n[keep], v[keep]
    if n.size < 3 or np.ptp(n) == 0:
        return None
    b, a = np.polyfit(n / k, v, 1)
    return _Model("linear", (float(a), float(b)), lambda m: a + b * (np.asarray(m, float) / k))


C_GRID = np.geomspace(0.01, 3.0, 120)  # exponents tried for the power law


def _power(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a + b * np.power(np.maximum(n, 1.0), -c)


def _fit_power(n: np.ndarray, v: np.ndarray, k: int) -> _Model | None:
    """Least squares over (a, b, c) by ``scipy.optimize.curve_fit`` (trust region, 0.01 ≤ c ≤ 3), started from a
    profile over C_GRID: for each c the model is linear in (a, b) and solved in closed form for all c at once. The
    profile finds the basin (curve_fit alone can stall on this model's flat directions); the library refines it.
    If curve_fit fails or does not improve the residual sum of squares, the profile's best point is kept."""
    keep = n >= 1
    n, v = n[keep], v[keep]
    if np.unique(n).size < 4:  # three parameters need at least four distinct counts
        return None
    x = np.power(n[None, :], -C_GRID[:, None])  # (grid, points)
    xm, vm = x.mean(axis=1, keepdims=True), v.mean()
    sxx = np.sum((x - xm) ** 2, axis=1)
    b = np.where(sxx > 0, np.sum((x - xm) * (v - vm), axis=1) / np.where(sxx > 0, sxx, 1), 0.0)
    a = vm - b * xm[:, 0]
    rss = np.sum((v[None, :] - a[:, None] - b[:, None] * x) ** 2, axis=1)
    i = int(np.argmin(rss))
    best = (float(a[i]), float(b[i]), float(C_GRID[i]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning on a flat direction: the RSS check below decides
            popt, _ = optimize.curve_fit(_power, n, v, p0=best, bounds=([-np.inf, -np.inf, C_GRID[0]],
                                                                       [np.inf, np.inf, C_GRID[-1]]))
        if np.all(np.isfinite(popt)) and np.sum((v - _power(n, *popt)) ** 2) < rss[i]:
            best = tuple(float(p) for p in popt)
    except (RuntimeError, ValueError):
        pass
    a_, b_, c_ = best
    return _Model("power", (a_, b_, c_), lambda m: _power(np.asarray(m, float), a_, b_, c_))


MODELS: dict[str, Callable[[np.ndarray, np.ndarray, int], _Model | None]] = {
    "linear": _fit_linear, "power": _fit_power,
}
N_PARAMS = {"linear": 2, "power": 3}


def goodness(model: _Model | None, n: np.ndarray, v: np.ndarray, n_params: int) -> dict[str, float]:
    keep = n >= 1  # both models are judged on the same points
    n, v = n[keep], v[keep]
    if model is None or n.size <= n_params:
        return {"r2": NAN, "rmse": NAN, "aic": NAN}
    resid = v - model.predict(n)
    rss = float(np.sum(resid**2))
    tss = float(np.sum((v - v.mean()) ** 2))
    aic = n.size * math.log(max(rss, 1e-300) / n.size) + 2 * n_params
    return {"r2": 1 - rss / tss if tss > 0 else NAN, "rmse": math.sqrt(rss / n.size), "aic": aic}


def curve_points(curves: list[dict]) -> dict[tuple[str, str, int], list[tuple[float, int, float, Any]]]:
    """(alloc attribute, metric, grp) -> [(own share, seed, value, resample values or None)] for the allocated
    attribute's own groups; NaN values are dropped."""
    cells: dict[tuple[str, str, int], list[tuple[float, int, float, Any]]] = defaultdict(list)
    for r in curves:
        grp = int(r["grp"])
        if r["attribute"] != r["alloc_attribute"] or grp not in (0, 1) or r["value"] is None:
            continue
        if not math.isfinite(float(r["value"])):
            continue
        share = float(r["alpha"]) if grp == 1 else 1.0 - float(r["alpha"])
        cells[(r["alloc_attribute"], r["metric"], grp)].append((share, int(r["seed"]), float(r["value"]),
                                                                r.get("boot")))
    return cells


def fit_curves(curves: list[dict], budget: int) -> list[dict]:
    """Linear and power-law fits per (attribute, metric, group).

    Returns rows with keys ``attribute, grp, metric, model, params (JSON list), r2, rmse, aic, n, preferred,
    seeds_preferring, n_seeds`` (``preferred`` marks the model with the lower AIC on the shared points, every seed's
    runs pooled; ``seeds_preferring`` counts the seeds whose runs, fitted alone, prefer it too: how stable the
    choice is from one seed to the next, since pooled runs are not independent and AIC alone overstates it).
    """
    out = []
    for (attr, metric, grp), pts in sorted(curve_points(curves).items()):
        seeds = sorted({p[1] for p in pts})
        votes: dict[str, int] = dict.fromkeys(MODELS, 0)
        for s in seeds:
            mine = [p for p in pts if p[1] == s]
            sh, vv = np.array([p[0] for p in mine]), np.array([p[2] for p in mine])
            aic = {name: goodness(fit(sh * budget, vv, budget), sh * budget, vv, N_PARAMS[name])["aic"]
                   for name, fit in MODELS.items()}
            finite = {k: a for k, a in aic.items() if math.isfinite(a)}
            if finite:
                votes[min(finite, key=lambda k: finite[k])] += 1
        share = np.array([p[0] for p in pts])
        v = np.array([p[2] for p in pts])
        n = share * budget
        rows = []
        for name, fit in MODELS.items():
            model = fit(n, v, budget)
            rows.append({"attribute": attr, "grp": grp, "metric": metric, "model": name,
                         "params": list(model.params) if model else None,
                         **goodness(model, n, v, N_PARAMS[name]), "n": int(n.size)})
        aics = [r["aic"] for r in rows if math.isfinite(r["aic"])]
        for r in rows:
            r["preferred"] = bool(aics) and math.isfinite(r["aic"]) and r["aic"] == min(aics)
            r.update(seeds_preferring=votes[r["model"]], n_seeds=len(seeds))
        out += rows
    return out


def _best_model(share: np.ndarray, v: np.ndarray, budget: int) -> _Model | None:
    n = share * budget
    fitted = [(name, MODELS[name](n, v, budget)) for name in MODELS]
    scored = [(goodness(m, n, v, N_PARAMS[name])["aic"], i, m) for i, (name, m) in enumerate(fitted) if m]
    scored = [s for s in scored if math.isfinite(s[0])]
    return min(scored)[2] if scored else None


Point = tuple[float, int, float, Any]  # (own share, seed, value, resample values or None)


def point_value(p: Point, b: int | None) -> float:
    """A point's value on test resample ``b``, or on the real test set (``b`` None or no resamples)."""
    if b is None or p[3] is None:
        return p[2]
    return float(p[3][b])


def _optimum(models: list[_Model], zero_share: dict[float, tuple[float, float]], lo: tuple[float, float],
             budget: int, lower_better: bool) -> tuple[float, float, float, float] | None:
    """(α*, value) for the worst group and for the mean, searched only where the fits hold.

    Inside the data: α from group 1's smallest fitted share to 1 − group 0's smallest fitted share (the models
    were fitted on shares > 0, so nothing is extrapolated towards n = 0), plus the observed α values where a
    group's share is 0, evaluated with the observed means of both groups there (``zero_share``: α -> (v0, v1)).
    """
    alphas, f0s, f1s = [], [], []
    if lo[1] <= 1 - lo[0]:
        grid = np.linspace(lo[1], 1 - lo[0], 201)
        alphas.append(grid)
        f0s.append(models[0].predict((1 - grid) * budget))
        f1s.append(models[1].predict(grid * budget))
    for a, (v0, v1) in sorted(zero_share.items()):
        alphas.append(np.array([a]))
        f0s.append(np.array([v0]))
        f1s.append(np.array([v1]))
    if not alphas:
        return None
    grid, f0, f1 = np.concatenate(alphas), np.concatenate(f0s), np.concatenate(f1s)
    sign = -1.0 if lower_better else 1.0
    worst = np.minimum(sign * f0, sign * f1)
    mean = sign * (f0 + f1) / 2
    iw, im = int(np.argmax(worst)), int(np.argmax(mean))
    return float(grid[iw]), float(sign * worst[iw]), float(grid[im]), float(sign * mean[im])


def group_models(points: dict[int, list[Point]], seeds: list[int], budget: int,
                 b: int | None = None) -> tuple[list[_Model], list[float]] | None:
    """Each group's preferred model (by AIC) on the runs of ``seeds`` with own share > 0 (repeats allowed: a
    bootstrap draw), on test resample ``b`` or the real test set, and the smallest share it was fitted on; None when
    a group has no such runs or no model fits."""
    models, lo = [], []
    for grp in (0, 1):
        fitted = group_model(points[grp], seeds, budget, b)
        if fitted is None:
            return None
        models.append(fitted[0])
        lo.append(fitted[1])
    return models, lo


def group_model(points: list[Point], seeds: list[int], budget: int,
                b: int | None = None) -> tuple[_Model, float] | None:
    """One group's preferred model (by AIC) on its runs of ``seeds`` with own share > 0, and the smallest share it
    was fitted on; None when there are no such runs or no model fits (see :func:`group_models`)."""
    fit_pts = [p for s in seeds for p in points if p[1] == s and p[0] > 0]
    if not fit_pts:
        return None
    m = _best_model(np.array([p[0] for p in fit_pts]), np.array([point_value(p, b) for p in fit_pts]), budget)
    if m is None:
        return None
    return m, min(p[0] for p in fit_pts)


def _best_for(points: dict[int, list[Point]], seeds: list[int], budget: int, lower_better: bool,
              b: int | None = None) -> tuple[float, float, float, float] | None:
    """The optimum from the runs of ``seeds`` (repeats allowed: a bootstrap draw), on test resample ``b`` or the
    real test set (None)."""
    fitted = group_models(points, seeds, budget, b)
    if fitted is None:
        return None
    models, lo = fitted
    at_zero = {}
    for alpha_zero, grp_zero in ((0.0, 1), (1.0, 0)):  # α where group grp_zero has share 0
        means = []
        for grp in (0, 1):
            own = alpha_zero if grp == 1 else 1.0 - alpha_zero
            vals = [point_value(p, b) for s in seeds for p in points[grp] if p[1] == s and math.isclose(p[0], own)]
            means.append(float(np.mean(vals)) if vals else NAN)
        if all(math.isfinite(m) for m in means):
            at_zero[alpha_zero] = (means[0], means[1])
    return _optimum(models, at_zero, (lo[0], lo[1]), budget, lower_better)


MIN_SEEDS_FOR_BOOTSTRAP = 5  # below this a percentile interval over seed resamples is too coarse to mean anything


def best_alpha(curves: list[dict], budget: int, *, n_boot: int = 200, seed: int = 0) -> list[dict]:
    """The α maximising the worst-group metric and the α maximising the group mean, from the fitted curves.

    Each group's curve is its better model by AIC, searched only inside the data (see :func:`_optimum`).
    Uncertainty: with fewer than 5 seeds, ``ci_low``/``ci_high`` are the range of the per-seed optima (each seed's
    runs fitted alone; ``interval`` = "per-seed range"). With 5 or more, a percentile bootstrap (2.5 %, 97.5 %):
    each draw resamples the seeds with replacement and, when the runs carry test resamples, scores them on one
    randomly chosen test resample, so the interval covers both sources of variation.

    Returns rows with keys ``attribute, metric, criterion ('worst_group' | 'mean'), alpha, value, ci_low, ci_high,
    interval, n_seeds, n_boot``.
    """
    cells = curve_points(curves)
    out = []
    rng = np.random.default_rng(seed)
    for attr, metric in sorted({(a, m) for a, m, _ in cells}):
        points = {g: cells.get((attr, metric, g), []) for g in (0, 1)}
        seeds = sorted({p[1] for g in (0, 1) for p in points[g]})
        lower = metric in LOWER_IS_BETTER
        est = _best_for(points, seeds, budget, lower)
        if est is None:
            continue
        n_b = min(len(p[3]) for g in (0, 1) for p in points[g]) if all(
            p[3] is not None for g in (0, 1) for p in points[g]) else 0
        draws: list[tuple[float, float]] = []
        if len(seeds) < MIN_SEEDS_FOR_BOOTSTRAP:
            how = f"per-seed range ({len(seeds)} seeds)"
            for s in seeds:
                one = _best_for(points, [s], budget, lower)
                if one is not None:
                    draws.append((one[0], one[2]))
        else:
            how = "percentile bootstrap over seeds" + (" and test resamples" if n_b else "")
            for _ in range(n_boot):
                pick = sorted(rng.choice(seeds, size=len(seeds), replace=True).tolist())
                b = int(rng.integers(n_b)) if n_b else None
                one = _best_for(points, pick, budget, lower, b)
                if one is not None:
                    draws.append((one[0], one[2]))
        for i, criterion in ((0, "worst_group"), (1, "mean")):
            vals = np.array([d[i] for d in draws])
            if not vals.size:
                lo, hi = NAN, NAN
            elif len(seeds) < MIN_SEEDS_FOR_BOOTSTRAP:
                lo, hi = float(vals.min()), float(vals.max())
            else:
                lo, hi = (float(q) for q in np.percentile(vals, [2.5, 97.5]))
            out.append({"attribute": attr, "metric": metric, "criterion": criterion, "alpha": est[2 * i],
                        "value": est[2 * i + 1], "ci_low": lo, "ci_high": hi, "interval": how,
                        "n_seeds": len(seeds), "n_boot": int(vals.size) if len(seeds) >= MIN_SEEDS_FOR_BOOTSTRAP
                        else 0})
    return out
