"""protocol 'expand': what collecting more data for one group buys (issue 13, part 3; the paper's open question 4).

An expand sweep fixes one group's count at ``base`` and grows the other's along ``sizes``, so the fine-tuning set
grows. Per (attribute, grown group g, metric) this module computes, on the runs of each seed:

- the **slope per 1000 added items** of group g's metric (its own data), of the other group's (what g's data does
  to it) and of the whole test set; x = the grown group's count / 1000;
- the **difference** slope: the slope of (v_g − v_other) per seed, paired within a run so that what the shared
  head does to both groups cancels. For a null partition (a random half) it is 0 up to noise: growing a random half
  helps both halves alike. An attribute's growth is **specific** to its group when the difference's 95% interval
  lies outside the null range (0 and every null partition's difference slope), the same rule as the reallocation
  verdicts;
- the **gain** over the range run: the value at the largest count minus the value at the smallest.

Intervals: the seed + test-set construction of :mod:`engine.intervals` (unit of replication: the seed, which draws
the subsets, the head initialisation and the batch order; plus the paired test resamples), the same as every
reallocation slope; tests/test_intervals.py measures its coverage, and tests/test_expand.py checks it on expansion
curves with a known slope.

Fits: per (attribute, grown group, metric), the grown group's metric against its own count n, linear and Rolf et
al.'s power law a + b·n^(−c) (:mod:`engine.fits`), pooled over seeds (shape only: no interval), compared by AIC;
from the preferred model, the change the next 1000 items would bring at the largest count run (an extrapolation,
flagged as such).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from engine import fits
from engine.analysis import decimals, signed
from engine.intervals import Curve, beyond_null, difference, interval, null_range, slope_of
from engine.spec import is_null_partition

NAN = float("nan")
PER = 1000.0  # slopes are per this many added items
ROLES = ("grown", "other", "overall", "difference")
Cells = dict[tuple[str, int, str, str], dict[int, Curve]]  # (attribute, grown, metric, role) -> seed -> curve


def _last_minus_first(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Value at the largest x minus value at the smallest, along the last axis (NaN-aware: the extreme finite x)."""
    v = np.asarray(v, dtype=np.float64)
    hi, lo = np.isclose(x, np.nanmax(x)), np.isclose(x, np.nanmin(x))
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(hi, v, np.nan), axis=-1) - np.nanmean(np.where(lo, v, np.nan), axis=-1)


def cells(rows: Iterable[dict]) -> Cells:
    """Metric rows of expand trials (``alloc_attribute, grown, added, seed, attribute, grp, metric, value, boot``)
    -> curves on x = added / 1000 per (attribute, grown group, metric, role); rows of other trials are skipped."""
    acc: dict[tuple[str, int, str, str], dict[int, list[tuple[float, float, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in rows:
        if r.get("grown") is None:
            continue
        alloc, grown = r["alloc_attribute"], int(r["grown"])
        if r["attribute"] == alloc and int(r["grp"]) in (0, 1):
            role = "grown" if int(r["grp"]) == grown else "other"
        elif r["attribute"] == "overall":
            role = "overall"
        else:
            continue
        value = NAN if r["value"] is None else float(r["value"])
        acc[(alloc, grown, r["metric"], role)][int(r["seed"])].append((int(r["added"]) / PER, value, r.get("boot")))
    out: Cells = {}
    for key, seeds in acc.items():
        sizes = {len(p[2]) if p[2] is not None else -1 for pts in seeds.values() for p in pts}
        use_boot = len(sizes) == 1 and min(sizes) >= 2
        curves = {}
        for seed, pts in seeds.items():
            pts.sort(key=lambda p: p[0])
            boot = np.array([p[2] for p in pts], dtype=np.float64).T if use_boot else None
            curves[seed] = Curve(np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), boot)
        out[key] = curves
    for (alloc, grown, metric, role), curves in list(out.items()):
        if role == "grown" and (alloc, grown, metric, "other") in out:
            out[(alloc, grown, metric, "difference")] = difference(curves, out[(alloc, grown, metric, "other")])
    return out


def slope_rows(c: Cells) -> list[dict]:
    """One row per (attribute, grown group, metric, role): the slope per 1000 added items and the gain over the
    range, each with its seed + test-set interval; difference rows carry the null comparison."""
    rows = []
    for (attr, grown, metric, role), curves in sorted(c.items()):
        s = interval(curves, slope_of)
        g = interval(curves, _last_minus_first)
        xs = np.concatenate([cv.x for cv in curves.values()]) * PER
        rows.append({
            "attribute": attr, "grown": grown, "role": role, "metric": metric,
            "slope": _f(s.pop("estimate")), **{k: (_f(v) if isinstance(v, float) else v) for k, v in s.items()},
            "gain": _f(g["estimate"]), "gain_ci_low": _f(g["ci_low"]), "gain_ci_high": _f(g["ci_high"]),
            "n_min": int(xs.min()), "n_max": int(xs.max()), "null_partition": is_null_partition(attr),
        })
    nulls: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["role"] == "difference" and r["null_partition"]:
            nulls[r["metric"]].append(r["slope"])
    for r in rows:
        if r["role"] != "difference":
            r.update(null_low=NAN, null_high=NAN, beyond_null=None)
            continue
        lo, hi = null_range(nulls[r["metric"]])
        r.update(null_low=lo, null_high=hi,
                 beyond_null=None if r["null_partition"] else beyond_null(r["ci_low"], r["ci_high"],
                                                                          nulls[r["metric"]]))
    return rows


def attribute_rows(slopes: list[dict]) -> list[dict]:
    """One value per (attribute, metric) for the correlations with separation (:func:`engine.correlate.correlations`):
    ``slope`` = the paired difference slope per 1000 items, averaged over the grown groups (how much more a group's
    own data helps it than the other group; 0 up to noise for a null partition)."""
    diffs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in slopes:
        if r["role"] == "difference" and r["slope"] is not None and math.isfinite(r["slope"]):
            diffs[(r["attribute"], r["metric"])].append(float(r["slope"]))
    return [{"attribute": a, "metric": m, "slope": float(np.mean(v))} for (a, m), v in sorted(diffs.items())]


def fit_rows(c: Cells) -> list[dict]:
    """Linear and power-law fits of the grown group's metric on its own count, pooled over seeds; the preferred
    model (lower AIC) and the change it predicts for the next 1000 items at the largest count run."""
    out = []
    for (attr, grown, metric, role), curves in sorted(c.items()):
        if role != "grown":
            continue
        n = np.concatenate([cv.x for cv in curves.values()]) * PER
        v = np.concatenate([cv.v for cv in curves.values()])
        keep = np.isfinite(v)
        n, v = n[keep], v[keep]
        if n.size == 0:
            continue
        scale = int(n.max())
        models = {name: fn(n, v, scale) for name, fn in fits.MODELS.items()}
        stats = {name: fits.goodness(m, n, v, fits.N_PARAMS[name]) for name, m in models.items()}
        finite = {k: s["aic"] for k, s in stats.items() if math.isfinite(s["aic"])}
        preferred = min(finite, key=finite.get) if finite else None
        for name, m in models.items():
            nxt = NAN if m is None else float(m.predict(np.array([n.max() + PER]))[0] - m.predict(np.array([n.max()]))[0])
            out.append({"attribute": attr, "grown": grown, "metric": metric, "model": name,
                        "params": [] if m is None else list(m.params), **stats[name],
                        "preferred": name == preferred, "n_min": int(n.min()), "n_max": int(n.max()),
                        "next_1000": nxt, "null_partition": is_null_partition(attr)})
    return out


def _f(x: Any) -> float:
    return NAN if x is None else float(x)


def _num(x: float, digits: int = 3) -> str:
    return signed(x, digits) if math.isfinite(x) else "n/a"


def _ci(row: dict) -> tuple[str, str, str]:
    """The slope and its interval with the decimals that resolve the interval (analysis' rule)."""
    d = decimals((row["ci_high"] - row["ci_low"]) / 2) if math.isfinite(row["ci_high"] - row["ci_low"]) else 3
    return _num(row["slope"], d), _num(row["ci_low"], d), _num(row["ci_high"], d)


def verdicts(slopes: list[dict], fitted: list[dict], metric: str = "loss") -> list[dict]:
    """Per attribute: whether collecting for one of its groups is specific to that group (the loss difference
    slope of some grown group beyond the null range), and the sentence the report and the CLI show."""
    by = {(r["attribute"], r["grown"], r["role"], r["metric"]): r for r in slopes}
    fit_by = {(r["attribute"], r["grown"], r["metric"]): r for r in fitted if r["preferred"]}
    out = []
    for attr in sorted({r["attribute"] for r in slopes}):
        parts, matters, n_runs, n_seeds = [], False, 0, 0
        for grown in sorted({r["grown"] for r in slopes if r["attribute"] == attr}):
            own, other = by.get((attr, grown, "grown", metric)), by.get((attr, grown, "other", metric))
            diff = by.get((attr, grown, "difference", metric))
            if own is None:
                continue
            n_runs, n_seeds = max(n_runs, int(own["n"])), max(n_seeds, int(own["n_seeds"]))
            est, lo, hi = _ci(own)
            text = f"each extra 1000 items of group {grown} change its {metric} by {est} (95% CI {lo} to {hi})"
            if other is not None:
                est, lo, hi = _ci(other)
                text += f" and group {1 - grown}'s by {est} ({lo} to {hi})"
            if diff is not None and not diff["null_partition"]:
                specific = bool(diff["beyond_null"])
                matters |= specific
                est, lo, hi = _ci(diff)
                d = len(est.split(".")[-1])
                text += (f"; the difference, {est} ({lo} to {hi}), {'lies beyond' if specific else 'is within'} the "
                         f"null partitions' range ({_num(diff['null_low'], d)} to {_num(diff['null_high'], d)})")
            fit = fit_by.get((attr, grown, metric))
            if fit is not None and math.isfinite(fit["next_1000"]):
                d = len(_ci(own)[0].split(".")[-1])
                text += (f"; at n = {fit['n_max']} the {fit['model']} fit expects {_num(fit['next_1000'], d)} from "
                         "the next 1000 (an extrapolation)")
            parts.append(text)
        if not parts:
            continue
        lead = (f"{attr} (a null partition: an arbitrary 50/50 split): " if is_null_partition(attr)
                else f"Collecting for {attr}: ")
        tail = (" Growing a group helps it more than the other: collect for the group that needs it."
                if matters else (" What a group gains from more data is not specific to it beyond the null range."
                                 if not is_null_partition(attr) else ""))
        out.append({"attribute": attr, "matters": matters, "text": lead + "; ".join(parts) + "." + tail,
                    "n_runs": n_runs, "n_seeds": n_seeds})
    return out
