"""How to allocate a budget between an attribute's two groups, from the fitted allocation curves (open question 3).

Each group's curve is its preferred model (``engine.fits``: a line in own share or a power law in own sample count
n, by AIC) fitted on the study's runs at budget K. For a new budget N, group g gets n_g = share_g · N items and the
model predicts its metric there; the recommendation is the share that maximises the objective (the worse group's
metric, or the mean of the two; for a loss, the lower the better) on a grid of shares, under lower bounds on each
group's share. Its uncertainty: with 5 or more seeds an expanded percentile bootstrap over seeds (and test
resamples; :func:`expanded_tail`: the plain percentiles covered 91% / 85% for a nominal 95% in simulation, the
expanded ones 95% / 92.5%), with fewer the range of the per-seed predictions.

Where it extrapolates: the models were fitted on n from the smallest positive share run × K up to K. A group whose
n_g lies outside that range is predicted from the curve's continuation, and the recommendation says so. A share of
0 is allowed only when N = K and the runs include it (its value is then observed, not modelled).

Joint allocation (:func:`recommend_joint`): a K-group or intersection attribute's budget split among all its
groups at once, on a simplex grid, each group predicted from its one-vs-rest curve (:data:`JOINT_ASSUMPTION` says
what that assumes); the same objectives, bounds, intervals and extrapolation rules.

Pure: rows in, a dict out; ``engine.results`` reads and writes the ``recommendations`` table.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from engine.fits import (LOWER_IS_BETTER, MIN_SEEDS_FOR_BOOTSTRAP, Point, curve_points, group_model, group_models,
                         point_value)

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


def _picks(cells: list[list[Point]], seeds: list[int], n_boot: int, seed: int
           ) -> tuple[list[tuple[list[int], int | None]], int]:
    """The refits behind an interval: with fewer than MIN_SEEDS_FOR_BOOTSTRAP seeds one per seed (a per-seed
    range), else ``n_boot`` draws of seeds with replacement, each on one test resample when every point has them;
    and the number of test resamples (0 = none)."""
    have = all(p[3] is not None for pts in cells for p in pts)
    n_b = min((len(p[3]) for pts in cells for p in pts), default=0) if have else 0
    if len(seeds) < MIN_SEEDS_FOR_BOOTSTRAP:
        return [([s], None) for s in seeds], n_b
    rng = np.random.default_rng(seed)
    return [(sorted(rng.choice(seeds, size=len(seeds), replace=True).tolist()), int(rng.integers(n_b)) if n_b
             else None) for _ in range(n_boot)], n_b


def _bounds(draws: list[tuple[float, ...]], width: int, n_seeds: int, n_b: int
            ) -> tuple[str, np.ndarray, np.ndarray]:
    """(how the interval was made, lower, upper) of each column of the refits' predictions (see :func:`_picks`)."""
    arr = np.array(draws, dtype=float).reshape(-1, width)
    if n_seeds < MIN_SEEDS_FOR_BOOTSTRAP:
        empty = np.full(width, NAN)
        return (f"per-seed range ({n_seeds} seeds)", np.nanmin(arr, axis=0) if len(arr) else empty,
                np.nanmax(arr, axis=0) if len(arr) else empty)
    tail = 100 * expanded_tail(n_seeds)
    return ("expanded percentile bootstrap over seeds" + (" and test resamples" if n_b else ""),
            np.nanpercentile(arr, tail, axis=0), np.nanpercentile(arr, 100 - tail, axis=0))


def expanded_tail(n: int, level: float = 0.95) -> float:
    """The lower tail probability of Hesterberg's expanded percentile interval for a bootstrap over ``n``
    replication units: Φ(√(n / (n − 1)) · t_{(1 − level)/2, n − 1}) instead of (1 − level)/2, which corrects
    the plain percentile interval's narrowness with few units (measured here: 85–91% coverage for a nominal 95% with 6
    seeds, tests/test_recommend.py)."""
    from scipy import stats

    return float(stats.norm.cdf(math.sqrt(n / (n - 1)) * stats.t.ppf((1 - level) / 2, n - 1)))


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
    picks, n_b = _picks([points[0], points[1]], seeds, n_boot, seed)
    draws = []
    for pick, b in picks:
        m = group_models(points, pick, k, b)
        if m is not None:
            d0, d1 = _predict(m[0], _zero_share(points, pick, b), np.array([alpha]), budget, k)
            draws.append((float(d0[0]), float(d1[0])))
    interval, lo, hi = _bounds(draws, 2, len(seeds), n_b)

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


# ---- joint allocation among a K-group attribute's groups --------------------------------------------------------

JOINT_POINTS = 20_000  # shares searched at most: the finest simplex grid (step 1/m) with this many points or fewer
JOINT_ASSUMPTION = ("each group's metric is predicted from its own share only, by the curve of its one-vs-rest sweep "
                    "(which held the other groups at their pool proportions): how the rest of the budget is split "
                    "among the other groups is assumed not to matter to it")


CHECK_RATIO = 2.0  # the assumption is called into doubt when the check's RMSE exceeds the own-sweep fit's by this


def assumption_warning(check_rmse: float | None, fit_rmse: float | None, check_n: int) -> str:
    """A sentence when :func:`assumption_check` finds the curves predict the other groups' sweeps more than
    :data:`CHECK_RATIO` times worse than their own (a rule of thumb: the two RMSEs are read side by side, not
    tested); "" when they do not, or there is nothing to check."""
    if not check_n or check_rmse is None or fit_rmse is None or not (math.isfinite(check_rmse)
                                                                      and math.isfinite(fit_rmse)):
        return ""
    if check_rmse <= CHECK_RATIO * fit_rmse:
        return ""
    ratio = check_rmse / fit_rmse
    return (f"the assumption does not hold well here: the curves miss the other groups' sweeps {ratio:.1f} times"
            f" more than their own (a group's metric also depends on the other groups' shares), so read this "
            "allocation as a rough guide and check it with a run")


def simplex_grid(n_groups: int, max_points: int = JOINT_POINTS) -> np.ndarray:
    """Every share vector (P, n_groups) on the simplex with steps of 1/m, m the largest of 200, 100, 50, 40, 20,
    10, 5, 4, 2, 1 that gives at most ``max_points`` vectors (K = 2: 0.005, K = 3: 0.01, K = 4: 0.025)."""
    m = next(m for m in (200, 100, 50, 40, 20, 10, 5, 4, 2, 1) if math.comb(m + n_groups - 1, n_groups - 1)
             <= max_points)
    rows = []
    for bars in itertools.combinations(range(m + n_groups - 1), n_groups - 1):  # stars and bars
        edges = (-1, *bars, m + n_groups - 1)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_groups)])
    return np.round(np.array(rows, dtype=float) / m, 6)


def whole_counts(shares: np.ndarray, budget: int) -> list[int]:
    """Item counts summing to ``budget``, each share × budget rounded by largest remainder."""
    raw = shares * budget
    counts = np.floor(raw + 1e-9).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: budget - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def assumption_check(curves: list[dict], attribute: str, groups: list[str], points: list[list[Point]],
                     models: list[Any], pool: dict[str, int], *, k: int, metric: str) -> dict[str, Any]:
    """How well :data:`JOINT_ASSUMPTION` holds on the runs there are: in group h's one-vs-rest sweep at share α,
    every other group g got share (1 − α) · pool_g / (pool − pool_h) in expectation and was scored; its own curve
    ``models[g]`` (fitted on its own sweep's ``points[g]``, every seed pooled) predicts it there.

    Returns ``check_rmse`` and ``check_bias`` (mean observed − predicted) over those points (share > 0),
    ``check_n``, and ``fit_rmse``: the same curves' error on their own sweeps' points (what the check is to be read
    against). NaN where there is nothing to check."""
    total = sum(pool.values())
    model_of = dict(zip(groups, models))
    own = [p[2] - float(m.predict(max(p[0] * k, 1.0))) for pts, m in zip(points, models) for p in pts if p[0] > 0]
    cross: list[float] = []
    for r in curves:
        alloc, scored = str(r["alloc_attribute"]), str(r["attribute"])
        if (r["metric"] != metric or int(r["grp"]) != 1 or r["value"] is None or not alloc.startswith(f"{attribute}=")
                or not scored.startswith(f"{attribute}=") or alloc == scored):
            continue
        h, g = alloc[len(attribute) + 1:], scored[len(attribute) + 1:]
        if g not in model_of or h not in pool or g not in pool or total <= pool[h]:
            continue
        share = (1.0 - float(r["alpha"])) * pool[g] / (total - pool[h])
        if share > 0 and math.isfinite(float(r["value"])):
            cross.append(float(r["value"]) - float(model_of[g].predict(max(share * k, 1.0))))

    def rmse(errors: list[float]) -> float:
        return float(np.sqrt(np.mean(np.square(errors)))) if errors else NAN

    return {"check_rmse": rmse(cross), "check_bias": float(np.mean(cross)) if cross else NAN,
            "check_n": len(cross), "fit_rmse": rmse(own)}


def recommend_joint(curves: list[dict], attribute: str, groups: list[str], *, k: int, budget: int,
                    objective: str = "worst_group", metric: str = "bal_acc", min_share: dict[str, float] | None = None,
                    n_boot: int = 200, seed: int = 0, pool: dict[str, int] | None = None) -> dict[str, Any] | None:
    """The recommended split of ``budget`` among all groups of a K-group (or intersection) attribute at once.

    Group g's curve is group 1 of the one-vs-rest attribute ``attribute=g`` (its metric against its own share),
    fitted as in :func:`recommend_one`; see :data:`JOINT_ASSUMPTION` for what that assumes. The shares searched are
    :func:`simplex_grid`'s, under lower bounds ``min_share`` (group label -> share); a share of 0 is allowed only
    when N = K and the runs include it. Intervals, extrapolation and alternatives (equal shares, and the
    unconstrained optimum when the bounds bind) as in :func:`recommend_one`. With ``pool`` (group label -> items
    in the fine-tuning pool), the result also has :func:`assumption_check`'s keys.

    Returns keys ``attribute, groups, metric, objective, budget, k, shares, counts, preds, pred_low, pred_high``
    (lists in ``groups`` order), ``objective_value, interval, n_seeds, binding, alternatives, extrapolation,
    fit_range`` (per group), ``min_share``, ``assumption``. None when a group has no fitted curve.
    """
    min_share = dict(min_share or {})
    unknown = sorted(set(min_share) - set(groups))
    if unknown:
        raise ValueError(f"no group {unknown[0]!r} in {attribute}; its groups are {', '.join(groups)}")
    if sum(min_share.values()) > 1.0 + 1e-12:
        raise ValueError(f"the minimum shares add up to more than 1: {min_share}")
    cells = curve_points(curves)
    points = [cells.get((f"{attribute}={g}", metric, 1), []) for g in groups]
    seeds = sorted({p[1] for pts in points for p in pts})
    lower = metric in LOWER_IS_BETTER
    sign = -1.0 if lower else 1.0
    grid = simplex_grid(len(groups))

    def fit(pick: list[int], b: int | None) -> list[Any] | None:
        """Every group's preferred curve on the runs of ``pick`` (test resample ``b``); None if one fails."""
        fitted = [group_model(pts, pick, k, b) for pts in points]
        return None if any(f is None for f in fitted) else [f[0] for f in fitted]  # type: ignore[index]

    def predict(models: list[Any], pick: list[int], b: int | None, shares: np.ndarray) -> np.ndarray:
        """(P, K) predicted metric of every group at each share vector (observed means at share 0)."""
        cols = []
        for model, pts, share in zip(models, points, shares.T):
            n = share * budget
            zero = [point_value(p, b) for s in pick for p in pts if p[1] == s and p[0] == 0]
            at_zero = float(np.mean(zero)) if zero and budget == k else NAN
            cols.append(np.where(n < 0.5, at_zero, np.asarray(model.predict(np.maximum(n, 1.0)), dtype=float)))
        return np.stack(cols, axis=1)

    pooled = fit(seeds, None)
    if pooled is None:
        return None
    preds = predict(pooled, seeds, None, grid)
    signed = sign * preds
    score = signed.min(axis=1) if objective == "worst_group" else signed.mean(axis=1)
    score = np.where(np.isfinite(score), score, -np.inf)
    bounds = np.array([min_share.get(g, 0.0) for g in groups])
    allowed = (grid >= bounds - 1e-12).all(axis=1)
    if not np.isfinite(score[allowed]).any():
        return None
    i = int(np.flatnonzero(allowed)[np.argmax(score[allowed])])
    free = int(np.argmax(score))
    best = grid[i]

    picks, n_b = _picks(points, seeds, n_boot, seed)
    draws = [tuple(predict(m, pick, b, best[None, :])[0]) for pick, b in picks if (m := fit(pick, b)) is not None]
    interval, lo, hi = _bounds(draws, len(groups), len(seeds), n_b)

    fit_range, outside = [], []
    for g, pts, share in zip(groups, points, best):
        ns = [p[0] * k for p in pts if p[0] > 0]
        n_lo, n_hi = min(ns), max(ns)
        fit_range.append([float(n_lo), float(n_hi)])
        n = share * budget
        if (n > 0.5 and (n < n_lo - 0.5 or n > n_hi + 0.5)) or (n <= 0.5 and budget != k):
            outside.append(f"{g} gets n = {n:.0f}, {'below' if n < n_lo else 'above'} the fitted range "
                           f"{n_lo:.0f}–{n_hi:.0f}")
    extrapolation = ("extrapolates: " + "; ".join(outside) + " (the curves' continuation, not data)") if outside \
        else ""

    def alternative(name: str, j: int) -> dict[str, Any]:
        return {"name": name, "shares": [float(v) for v in grid[j]], "preds": [float(v) for v in preds[j]],
                "objective_value": float(sign * score[j]) if np.isfinite(score[j]) else NAN,
                "loses": float(score[i] - score[j]) if np.isfinite(score[j]) else NAN}

    equal = int(np.argmin(np.abs(grid - 1.0 / len(groups)).sum(axis=1)))
    alternatives = [alternative(f"equal shares (1/{len(groups)} each)", equal)]
    if free != i:
        alternatives.append(alternative("unconstrained optimum", free))
    return {
        "attribute": attribute, "groups": list(groups), "metric": metric, "objective": objective,
        "budget": int(budget), "k": int(k), "shares": [float(v) for v in best],
        "counts": whole_counts(best, budget), "preds": [float(v) for v in preds[i]],
        "pred_low": [float(v) for v in lo], "pred_high": [float(v) for v in hi],
        "objective_value": float(sign * score[i]), "interval": interval, "n_seeds": len(seeds),
        "binding": free != i and not math.isclose(score[free], score[i]), "alternatives": alternatives,
        "extrapolation": extrapolation, "fit_range": fit_range,
        "min_share": {g: v for g, v in sorted(min_share.items())}, "assumption": JOINT_ASSUMPTION,
        **(assumption_check(curves, attribute, groups, points, pooled, pool, k=k, metric=metric) if pool else
           {"check_rmse": NAN, "check_bias": NAN, "check_n": 0, "fit_rmse": NAN}),
    }
