"""How to allocate a budget between an attribute's two groups, from the fitted allocation curves (open question 3).

Each group's curve is its preferred model (``engine.fits``: a line in own share or a power law in own sample count
n, by AIC) fitted on the study's runs at budget K. For a new budget N, group g gets n_g = share_g · N items and the
model predicts its metric there; the recommendation is the share that maximises the objective (the worse group's
metric, or the mean of the two; for a loss, the lower the better) on a grid of shares, under lower bounds on each
group's share. Its uncertainty follows ``engine.fits.best_alpha``: with 5 or more seeds a percentile bootstrap over
seeds (and test resamples), with fewer the range of the per-seed predictions.

Where it extrapolates: the models were fitted on n from the smallest positive share run × K up to K. A group whose
n_g lies outside that range is predicted from the curve's continuation, and the recommendation says so. A share of
0 is allowed only when N = K and the runs include it (its value is then observed, not modelled).

Pure: rows in, a dict out; ``engine.results`` reads and writes the ``recommendations`` table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.fits import LOWER_IS_BETTER, MIN_SEEDS_FOR_BOOTSTRAP, Point, curve_points, group_models, point_value

GRID = np.round(np.linspace(0.0, 1.0, 201), 6)  # share of group 1 searched (steps of 0.005)
NAN = float("nan")


def _zero_share(points: dict[int, list[Point]], seeds: list[int], b: int | None) -> dict[int, float]:
    """Observed mean of each group at own share 0 (its value when it gets no items), where the runs include it."""
    out = {}
    for grp in (0, 1):
        vals = [point_value(p, b) for s in seeds for p in points[grp] if p[1] == s and p[0] == 0]
        if vals:
            out[grp] = float(np.mean(vals))
    return out


def _predict(models: list[Any], zero: dict[int, float], alpha: np.ndarray, n_total: int,
             k: int) -> tuple[np.ndarray, np.ndarray]:
    """Predicted metric of group 0 and group 1 at shares ``alpha`` of group 1 under budget ``n_total``."""
    preds = []
    for grp, share in ((0, 1.0 - alpha), (1, alpha)):
        n = share * n_total
        v = np.asarray(models[grp].predict(np.maximum(n, 1.0)), dtype=float)
        at_zero = zero.get(grp, NAN) if n_total == k else NAN
        preds.append(np.where(n < 0.5, at_zero, v))
    return preds[0], preds[1]


def _objective(f0: np.ndarray, f1: np.ndarray, objective: str, lower_better: bool) -> np.ndarray:
    sign = -1.0 if lower_better else 1.0
    score = np.minimum(sign * f0, sign * f1) if objective == "worst_group" else sign * (f0 + f1) / 2
    return np.where(np.isfinite(score), score, -np.inf)


def _allowed(min_share: dict[int, float]) -> np.ndarray:
    return (GRID >= min_share.get(1, 0.0) - 1e-12) & (1.0 - GRID >= min_share.get(0, 0.0) - 1e-12)


def recommend_one(curves: list[dict], attribute: str, *, k: int, budget: int, objective: str = "worst_group",
                  metric: str = "bal_acc", min_share: dict[int, float] | None = None, n_boot: int = 200,
                  seed: int = 0) -> dict[str, Any] | None:
    """The recommended allocation of ``budget`` between ``attribute``'s groups (see the module docstring).

    Returns keys ``alpha`` (share of group 1), ``n_g0``, ``n_g1``, ``pred_g0``/``pred_g1`` with ``_low``/``_high``,
    ``objective_value``, ``interval`` (how the intervals were made), ``alternatives`` (the balanced allocation and,
    when the constraints bind, the unconstrained optimum: their shares, predictions and what the recommendation
    gains over them), ``binding`` (the constraints change the answer), ``extrapolation`` (a sentence, or "") and
    ``fit_range`` (the sample counts the models were fitted on). None when a group has no fitted curve.
    """
    min_share = dict(min_share or {})
    if min_share.get(0, 0.0) + min_share.get(1, 0.0) > 1.0 + 1e-12:
        raise ValueError(f"the minimum shares add up to more than 1: {min_share}")
    cells = curve_points(curves)
    points = {g: cells.get((attribute, metric, g), []) for g in (0, 1)}
    seeds = sorted({p[1] for g in (0, 1) for p in points[g]})
    lower = metric in LOWER_IS_BETTER
    fitted = group_models(points, seeds, k)
    if fitted is None:
        return None
    models = fitted[0]
    zero = _zero_share(points, seeds, None)
    f0, f1 = _predict(models, zero, GRID, budget, k)
    score = _objective(f0, f1, objective, lower)
    allowed = _allowed(min_share)
    if not np.isfinite(score[allowed]).any():
        return None
    i = int(np.flatnonzero(allowed)[np.argmax(score[allowed])])
    free = int(np.argmax(score))
    alpha = float(GRID[i])

    # uncertainty of the predictions at the recommended shares
    n_b = min((len(p[3]) for g in (0, 1) for p in points[g] if p[3] is not None), default=0) if all(
        p[3] is not None for g in (0, 1) for p in points[g]) else 0
    draws = []
    rng = np.random.default_rng(seed)
    few = len(seeds) < MIN_SEEDS_FOR_BOOTSTRAP
    picks = [([s], None) for s in seeds] if few else [
        (sorted(rng.choice(seeds, size=len(seeds), replace=True).tolist()), int(rng.integers(n_b)) if n_b else None)
        for _ in range(n_boot)]
    for pick, b in picks:
        m = group_models(points, pick, k, b)
        if m is not None:
            d0, d1 = _predict(m[0], _zero_share(points, pick, b), np.array([alpha]), budget, k)
            draws.append((float(d0[0]), float(d1[0])))
    arr = np.array(draws, dtype=float).reshape(-1, 2)
    if few:
        interval = f"per-seed range ({len(seeds)} seeds)"
        lo = np.nanmin(arr, axis=0) if len(arr) else np.array([NAN, NAN])
        hi = np.nanmax(arr, axis=0) if len(arr) else np.array([NAN, NAN])
    else:
        interval = "percentile bootstrap over seeds" + (" and test resamples" if n_b else "")
        lo, hi = np.nanpercentile(arr, 2.5, axis=0), np.nanpercentile(arr, 97.5, axis=0)

    fitted = [p[0] * k for g in (0, 1) for p in points[g] if p[0] > 0]
    n_lo, n_hi = min(fitted), max(fitted)
    n_g = {0: (1.0 - alpha) * budget, 1: alpha * budget}
    outside = [f"group {g} gets n = {n:.0f}, {'below' if n < n_lo else 'above'} the fitted range "
               f"{n_lo:.0f}–{n_hi:.0f}" for g, n in n_g.items() if (n > 0.5 and (n < n_lo - 0.5 or n > n_hi + 0.5))
               or (n <= 0.5 and budget != k)]
    extrapolation = ("extrapolates: " + "; ".join(outside) + " (the curves' continuation, not data)") if outside \
        else ""
    sign = -1.0 if lower else 1.0

    def alternative(name: str, j: int) -> dict[str, Any]:
        return {"name": name, "alpha": float(GRID[j]), "pred_g0": float(f0[j]), "pred_g1": float(f1[j]),
                "objective_value": float(sign * score[j]), "loses": float(score[i] - score[j])
                if np.isfinite(score[j]) else NAN}

    alternatives = [alternative("balanced (50/50)", int(np.argmin(np.abs(GRID - 0.5))))]
    if free != i:
        alternatives.append(alternative("unconstrained optimum", free))
    return {
        "attribute": attribute, "metric": metric, "objective": objective, "budget": int(budget), "k": int(k),
        "alpha": alpha, "n_g0": int(round((1.0 - alpha) * budget)), "n_g1": int(round(alpha * budget)),
        "pred_g0": float(f0[i]), "pred_g1": float(f1[i]),
        "pred_g0_low": float(lo[0]), "pred_g0_high": float(hi[0]),
        "pred_g1_low": float(lo[1]), "pred_g1_high": float(hi[1]),
        "objective_value": float(sign * score[i]), "interval": interval, "n_seeds": len(seeds),
        "binding": free != i and not math.isclose(score[free], score[i]), "alternatives": alternatives,
        "extrapolation": extrapolation, "fit_range": [float(n_lo), float(n_hi)],
        "min_share": {str(g): v for g, v in sorted(min_share.items())},
    }
