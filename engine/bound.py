"""An empirical check of the paper's bound (method.md §6), for every attribute, group and pair of allocations.

For two fine-tuning sets D' and D'' with different allocations (and, the theorem assumes, the same P(Y)), if the
class-conditional latent TV between the groups is at most ε in each class, then

    |Acc_a(D') − Acc_a(D'')|  ≤  4·ε + |Acc(D') − Acc(D'')|

with Acc_a a group's accuracy and Acc the overall accuracy of the heads trained on D' and D''. We take ε as the
larger of the two per-class TV estimates (mean over pre-training seeds) and accuracies as means over seeds.
A bound above 1 is vacuous. A violation points at the estimator or the assumptions, and :func:`_reasons` says which.
We also report the quantity the authors' notebooks plot: 2·TV + the balanced-accuracy generalisation gap.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np

NAN = float("nan")
PY_TOLERANCE = 0.01  # |ΔP(Y)| above this breaks the theorem's "same P(Y)" assumption


def _means(metrics: list[dict], metric: str) -> dict[tuple[str, str, int, float], float]:
    """(alloc attribute, evaluated attribute, grp, α) -> mean over seeds."""
    acc: dict[tuple[str, str, int, float], list[float]] = defaultdict(list)
    for r in metrics:
        if r["metric"] == metric and r["value"] is not None and math.isfinite(float(r["value"])):
            acc[(r["alloc_attribute"], r["attribute"], int(r["grp"]), float(r["alpha"]))].append(float(r["value"]))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _reasons(violated: bool, py: tuple[float, float], mode: str) -> str:
    if not violated:
        return ""
    why = []
    if math.isfinite(py[0]) and math.isfinite(py[1]) and abs(py[0] - py[1]) > PY_TOLERANCE:
        why.append(f"P(Y=1) of the training sets differs ({py[0]:.3f} vs {py[1]:.3f}): the theorem assumes it fixed")
    if mode != "last_layer":
        why.append(f"mode '{mode}' changes the encoder: the theorem covers last-layer retraining only")
    why.append("tv_paper averages 1-D marginal histogram TVs, which can understate the joint latent TV the theorem "
               "needs, and it carries sampling error")
    return "; ".join(why)


def bounds(metrics: list[dict], separations: list[dict], p_y: list[dict], gaps: list[dict],
           mode: str = "last_layer") -> list[dict]:
    """Check the bound for every attribute, group and pair of α values.

    Args:
        metrics: rows ``alloc_attribute, alpha, seed, attribute, grp, metric, value`` (as the curves).
        separations: rows ``attribute, distance, value, value_y0, value_y1`` (means over pre-training seeds).
        p_y: rows ``attribute, alpha, p_y`` = mean P(Y=1) of the allocated training sets.
        gaps: attribute slopes rows (``attribute, metric, gap``) for the notebooks' 2·TV + Δ balanced accuracy.
        mode: the fine-tuning mode (the theorem covers last_layer).

    Returns rows with keys ``attribute, grp, alpha_a, alpha_b, observed, epsilon, overall_delta, bound, vacuous,
    violated, p_y_a, p_y_b, paper_quantity, reason``.
    """
    acc = _means(metrics, "acc")
    tv = {r["attribute"]: r for r in separations if r["distance"] == "tv_paper"}
    pys = {(r["attribute"], float(r["alpha"])): float(r["p_y"]) for r in p_y}
    gap = {r["attribute"]: r["gap"] for r in gaps if r["metric"] == "bal_acc"}
    out = []
    for attr in sorted({k[0] for k in acc}):
        sep = tv.get(attr)
        if sep is None:
            continue
        per_class = [float(sep[k]) for k in ("value_y0", "value_y1") if sep.get(k) is not None
                     and math.isfinite(float(sep[k]))]
        eps = max(per_class) if per_class else float(sep["value"])
        paper = 2 * float(sep["value"]) + float(gap.get(attr, NAN))
        alphas = sorted({k[3] for k in acc if k[0] == attr and k[1] == "overall"})
        for a, b in itertools.combinations(alphas, 2):
            overall = abs(acc[(attr, "overall", -1, a)] - acc[(attr, "overall", -1, b)])
            for grp in (0, 1):
                if (attr, attr, grp, a) not in acc or (attr, attr, grp, b) not in acc:
                    continue
                observed = abs(acc[(attr, attr, grp, a)] - acc[(attr, attr, grp, b)])
                bound = 4 * eps + overall
                py = (pys.get((attr, a), NAN), pys.get((attr, b), NAN))
                violated = observed > bound
                out.append({"attribute": attr, "grp": grp, "alpha_a": a, "alpha_b": b, "observed": observed,
                            "epsilon": eps, "overall_delta": overall, "bound": bound, "vacuous": bound > 1,
                            "violated": violated, "p_y_a": py[0], "p_y_b": py[1], "paper_quantity": paper,
                            "reason": _reasons(violated, py, mode)})
    return out
