"""The intervention comparison: encoders pre-trained with and without a separation penalty, side by side.

Input: one row per experiment (a grid variant), as :func:`engine.results.intervention_data` reads it from DuckDB.
Output: per variant, the regularised attribute's separation and allocation slope, the accuracy of the pre-trained
model and of the heads at the recommended α, whether the variant is on the Pareto front of (overall accuracy ↑,
|slope| ↓), and one sentence on the best trade-off and its cost. Pure: no I/O.

The two axes are the ones a user trades: accuracy of the pre-trained model on the whole test set (what the
penalty costs) and the magnitude of the regularised attribute's paired loss slope (how much allocation still
matters). A variant is *dominated* when another has accuracy at least as high and |slope| at least as low, one
of them strictly.
"""

from __future__ import annotations

import math
from typing import Any

COST_TOLERANCE = 0.01  # "costs almost nothing": at most one accuracy point below the unregularised encoder


def _f(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else math.nan


def label(reg: dict[str, Any]) -> str:
    """'none' for an unregularised encoder (kind 'none' or weight 0), else 'kind λ=weight'."""
    if reg.get("kind", "none") == "none" or not reg.get("weight"):
        return "none"
    return f"{reg['kind']} λ={reg['weight']:g}"


def is_active(reg: dict[str, Any]) -> bool:
    return label(reg) != "none"


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """For (accuracy, |slope|) points: True where no other point has accuracy ≥ and |slope| ≤, one strictly.
    A point with a missing value is never on the front."""
    out = []
    for i, (acc, sl) in enumerate(points):
        if math.isnan(acc) or math.isnan(sl):
            out.append(False)
            continue
        dominated = any((a >= acc and s <= sl and (a > acc or s < sl))
                        for j, (a, s) in enumerate(points) if j != i and not (math.isnan(a) or math.isnan(s)))
        out.append(not dominated)
    return out


def summarise(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, the Pareto front and the verdict sentence. Each variant has keys ``experiment``, ``regulariser``
    (the spec's section), ``attribute`` (the regularised one), ``tv`` and ``controls`` ({attribute: separation
    row}), ``slope`` (the attribute's loss-slope row), ``acc`` / ``worst`` (pre-trained overall accuracy and
    worst-group balanced accuracy, mean and SD over seeds) and ``at_best`` (the heads at the recommended α)."""
    rows = []
    for v in variants:
        slope = v.get("slope") or {}
        rows.append({**v, "label": label(v["regulariser"]), "active": is_active(v["regulariser"]),
                     "abs_slope": abs(_f(slope.get("slope"))), "acc_mean": _f((v.get("acc") or {}).get("mean"))})
    front = pareto([(r["acc_mean"], r["abs_slope"]) for r in rows])
    for r, on in zip(rows, front, strict=True):
        r["pareto"] = on
    base = next((r for r in rows if not r["active"]), None)
    for r in rows:
        r["cost"] = (base["acc_mean"] - r["acc_mean"]) if base is not None else math.nan
    return {"rows": rows, "baseline": base, "sentence": sentence(rows, base), "beats": beats_surrogate(rows)}


CHANCE_MARGIN = 0.02  # a pre-trained model whose worst group is within this of 0.5 balanced accuracy is at chance


def collapsed(r: dict[str, Any]) -> bool:
    """The pre-trained model is at chance on the regularised attribute's worse group: the penalty made the encoder
    useless (an invariance reached by forgetting the task), whatever its slope."""
    return _f((r.get("worst") or {}).get("mean")) <= 0.5 + CHANCE_MARGIN


def _describe(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    tv = _f((r.get("tv") or {}).get("value"))
    text = f"{r['label']}: |loss slope| {r['abs_slope']:.4f}, TV {tv:.3f}, overall accuracy {r['acc_mean']:.3f}"
    if base is not None and r is not base:
        text += f" ({-r['cost']:+.3f} vs none)"
    if collapsed(r):
        text += " (at chance: the penalty collapsed the encoder)"
    return text


def sentence(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> str:
    """Which setting gives the best trade-off and what it costs, in words (or why nothing can be said)."""
    active = [r for r in rows if r["active"] and not math.isnan(r["abs_slope"]) and not math.isnan(r["acc_mean"])]
    if not active:
        return "No regularised variant has both a slope and an accuracy yet: nothing to compare."
    if base is None or math.isnan(base["abs_slope"]) or math.isnan(base["acc_mean"]):
        best = min(active, key=lambda r: r["abs_slope"])
        return (f"No unregularised variant (kind 'none' or weight 0) to compare against; the smallest slope is "
                f"{_describe(best, None)}.")
    lower = [r for r in active if r["abs_slope"] < base["abs_slope"]]
    if not lower:
        return (f"No penalty lowered the allocation slope of '{base['attribute']}' below the unregularised "
                f"encoder's ({_describe(base, None)}).")
    cheap = [r for r in lower if r["cost"] <= COST_TOLERANCE]
    lowest = min(lower, key=lambda r: r["abs_slope"])
    parts = []
    if cheap:
        best = min(cheap, key=lambda r: r["abs_slope"])
        parts.append(f"Best trade-off (the smallest slope among settings that lose at most {COST_TOLERANCE:.2f} "
                     f"overall accuracy): {_describe(best, base)}, against {_describe(base, None)} without a penalty")
        if lowest is not best:
            parts.append(f"the smallest slope, {_describe(lowest, base)}, costs more")
    else:
        cheapest = min(lower, key=lambda r: r["cost"])
        parts.append(f"Every penalty that lowers the slope of '{base['attribute']}' costs more than "
                     f"{COST_TOLERANCE:.2f} overall accuracy (unregularised: {_describe(base, None)}); the cheapest "
                     f"is {_describe(cheapest, base)}")
        if lowest is not cheapest:
            parts.append(f"the smallest slope is {_describe(lowest, base)}")
    slope = lowest.get("slope") or {}
    lo, hi = _f(slope.get("ci_low")), _f(slope.get("ci_high"))
    if lo <= 0 <= hi:
        parts.append(f"its 95% interval [{lo:+.4f}, {hi:+.4f}] includes 0")
    return "; ".join(parts) + "."


def beats_surrogate(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per kind other than the paper's tv_surrogate: does one of its settings dominate a surrogate setting
    (accuracy ≥, |slope| ≤, one strictly)? 'yes' / 'no' / 'no surrogate to compare'."""
    surrogate = [r for r in rows if r["active"] and r["regulariser"].get("kind") == "tv_surrogate"]
    out: dict[str, str] = {}
    for kind in sorted({r["regulariser"].get("kind") for r in rows if r["active"]} - {"tv_surrogate"}):
        mine = [r for r in rows if r["active"] and r["regulariser"].get("kind") == kind]
        if not surrogate:
            out[kind] = "no tv_surrogate setting to compare"
            continue
        wins = [(m["label"], s["label"]) for m in mine for s in surrogate
                if m["acc_mean"] >= s["acc_mean"] and m["abs_slope"] <= s["abs_slope"]
                and (m["acc_mean"] > s["acc_mean"] or m["abs_slope"] < s["abs_slope"])]
        out[kind] = ("yes: " + "; ".join(f"{a} dominates {b}" for a, b in wins)) if wins else \
            "no: none of its settings has both higher accuracy and a smaller |slope| than a tv_surrogate setting"
    return out
