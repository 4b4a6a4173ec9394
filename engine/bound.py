"""An empirical check of the paper's bound (method.md §6), for every attribute, group and pair of allocations.

For two fine-tuning sets D' and D'' with different allocations (and, the theorem assumes, the same P(Y)), if the
class-conditional latent TV between the groups is at most ε in each class, then

    |Acc_a(D') − Acc_a(D'')|  ≤  4·ε + |Acc(D') − Acc(D'')|

with Acc_a a group's accuracy and Acc the overall accuracy of the heads trained on D' and D''. The heads are trained
on the checkpoint seed's embeddings, so ε is that encoder's TV (the larger of its two per-class estimates), not the
mean over pre-training seeds; accuracies are means over the replicate seeds, and a bound is "violated" only beyond
its seed-level noise.
A bound above 1 is vacuous. A violation points at the estimator or the assumptions, and :func:`_reasons` says which.
We also report the quantity the authors' notebooks plot: 2·TV + the balanced-accuracy generalisation gap.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np
from scipy import stats

NAN = float("nan")
PY_TOLERANCE = 0.01  # |ΔP(Y)| above this breaks the theorem's "same P(Y)" assumption


def _per_seed(metrics: list[dict], metric: str) -> dict[tuple[str, str, int, float], dict[int, float]]:
    """(alloc attribute, evaluated attribute, grp, α) -> {seed: value} (NaN values dropped)."""
    acc: dict[tuple[str, str, int, float], dict[int, float]] = defaultdict(dict)
    for r in metrics:
        if r["metric"] == metric and r["value"] is not None and math.isfinite(float(r["value"])):
            acc[(r["alloc_attribute"], r["attribute"], int(r["grp"]), float(r["alpha"]))][int(r["seed"])] = float(r["value"])
    return acc


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


def _excess(grp_a: dict[int, float], grp_b: dict[int, float], all_a: dict[int, float], all_b: dict[int, float],
            eps: float) -> tuple[float, float, float, float, int]:
    """(observed, overall delta, excess = observed − bound, its seed-level standard error, seeds) over the seeds
    that have all four values. Per seed the excess is signed like the seed-mean differences, so its mean is
    exactly observed − 4ε − overall delta."""
    seeds = sorted(set(grp_a) & set(grp_b) & set(all_a) & set(all_b))
    d = np.array([grp_a[s] - grp_b[s] for s in seeds])
    o = np.array([all_a[s] - all_b[s] for s in seeds])
    if not seeds:
        return NAN, NAN, NAN, NAN, 0
    e = np.sign(d.mean()) * d - np.sign(o.mean()) * o - 4 * eps
    se = float(np.std(e, ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else NAN
    return float(abs(d.mean())), float(abs(o.mean())), float(e.mean()), se, len(seeds)


def _status(excess: float, se: float, n_seeds: int) -> tuple[str, bool]:
    """'holds' | 'within noise of the bound' | 'violated': violated only beyond a one-sided 95% t margin."""
    if not excess > 0:
        return "holds", False
    if n_seeds < 2 or not math.isfinite(se):
        return "violated (1 seed: no noise estimate)", True
    margin = float(stats.t.ppf(0.95, n_seeds - 1)) * se
    return ("violated", True) if excess > margin else ("within noise of the bound", False)


def bounds(metrics: list[dict], separations: list[dict], p_y: list[dict], gaps: list[dict],
           mode: str = "last_layer", epsilon_rows: list[dict] | None = None) -> list[dict]:
    """Check the bound for every attribute, group and pair of α values.

    Args:
        metrics: rows ``alloc_attribute, alpha, seed, attribute, grp, metric, value`` (as the curves).
        separations: rows ``attribute, distance, value, value_y0, value_y1`` (means over pre-training seeds): the
            paper's quantity 2·TV + Δ balanced accuracy uses the mean, as its notebooks do.
        p_y: rows ``attribute, alpha, p_y`` = mean P(Y=1) of the allocated training sets.
        gaps: attribute slopes rows (``attribute, metric, gap``) for the notebooks' 2·TV + Δ balanced accuracy.
        mode: the fine-tuning mode (the theorem covers last_layer).
        epsilon_rows: the same columns plus ``pretrain_seed`` for the encoder the heads were trained on (the
            checkpoint seed): ε is its larger per-class TV. Without them ε falls back to ``separations``.

    ``observed`` and the overall delta are differences of seed means; the bound is "violated" only when
    observed − bound exceeds a one-sided 95% t margin of its seed-level standard error, else "within noise of the
    bound" (or "holds" when observed ≤ bound).

    Returns rows with keys ``attribute, grp, alpha_a, alpha_b, observed, epsilon, epsilon_seed, overall_delta,
    bound, vacuous, violated, excess_se, status, p_y_a, p_y_b, paper_quantity, reason``.
    """
    acc = _per_seed(metrics, "acc")
    tv = {r["attribute"]: r for r in separations if r["distance"] == "tv_paper"}
    ckpt = {r["attribute"]: r for r in (epsilon_rows or []) if r["distance"] == "tv_paper"}
    pys = {(r["attribute"], float(r["alpha"])): float(r["p_y"]) for r in p_y}
    gap = {r["attribute"]: r["gap"] for r in gaps if r["metric"] == "bal_acc"}
    out = []
    for attr in sorted({k[0] for k in acc}):
        sep = ckpt.get(attr, tv.get(attr))
        if sep is None:
            continue
        per_class = [float(sep[k]) for k in ("value_y0", "value_y1") if sep.get(k) is not None
                     and math.isfinite(float(sep[k]))]
        eps = max(per_class) if per_class else float(sep["value"])
        mean_tv = float(tv[attr]["value"]) if attr in tv else float(sep["value"])
        paper = 2 * mean_tv + float(gap.get(attr, NAN) if gap.get(attr) is not None else NAN)
        alphas = sorted({k[3] for k in acc if k[0] == attr and k[1] == "overall"})
        for a, b in itertools.combinations(alphas, 2):
            for grp in (0, 1):
                if (attr, attr, grp, a) not in acc or (attr, attr, grp, b) not in acc:
                    continue
                observed, overall, excess, se, n = _excess(acc[(attr, attr, grp, a)], acc[(attr, attr, grp, b)],
                                                           acc[(attr, "overall", -1, a)], acc[(attr, "overall", -1, b)],
                                                           eps)
                if n == 0:
                    continue
                bound = 4 * eps + overall
                status, violated = _status(excess, se, n)
                py = (pys.get((attr, a), NAN), pys.get((attr, b), NAN))
                out.append({"attribute": attr, "grp": grp, "alpha_a": a, "alpha_b": b, "observed": observed,
                            "epsilon": eps, "epsilon_seed": sep.get("pretrain_seed"), "overall_delta": overall,
                            "bound": bound, "vacuous": bound > 1, "violated": violated, "excess_se": se,
                            "status": status, "p_y_a": py[0], "p_y_b": py[1], "paper_quantity": paper,
                            "reason": _reasons(violated, py, mode)})
    return out
