"""Cross-trial statistics: allocation slopes, generalisation gaps, correlations with separation, verdicts.

Every function takes lists of row dicts (as read from DuckDB) and returns lists of row dicts whose keys are exactly
the columns of the matching table (method.md §5). Pure numpy/scipy; no database access.

To add a statistic: write a function ``rows -> rows`` here, keep its output keys equal to the table's columns,
and document the statistical choice in its docstring (what is pooled, which interval, what NaN means).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from scipy import stats

__all__ = ["group_slopes", "attribute_slopes", "correlations", "verdicts", "cross_slopes", "explanations",
           "explanation_correlations", "LOSS", "BAL_ACC"]

NAN = float("nan")
LOSS, BAL_ACC = "loss", "bal_acc"
TV_DISTANCE = "tv_paper"  # the distance the verdicts quote


def _f(x: float) -> float:
    """A plain Python float (DuckDB and JSON friendly); None becomes NaN."""
    return NAN if x is None else float(x)


def own_share(alpha: float, grp: int) -> float:
    """The group's own share of the fine-tuning set: alpha for group 1, 1 - alpha for group 0 (never row reversal)."""
    return float(alpha) if grp == 1 else 1.0 - float(alpha)


def _fit(x: np.ndarray, v: np.ndarray) -> dict:
    """OLS of v on x with a two-sided 95% t interval; NaN when n < 3 or x is constant."""
    keys = ("slope", "intercept", "stderr", "ci_low", "ci_high", "r", "p_value")
    if len(x) < 3 or np.ptp(x) == 0:
        return dict.fromkeys(keys, NAN)
    res = stats.linregress(x, v)
    half = stats.t.ppf(0.975, len(x) - 2) * res.stderr
    vals = (res.slope, res.intercept, res.stderr, res.slope - half, res.slope + half, res.rvalue, res.pvalue)
    return {k: _f(val) for k, val in zip(keys, vals, strict=True)}


def _gap(x: np.ndarray, v: np.ndarray) -> dict:
    """Full-shot minus zero-shot: mean(v at own share 1) - mean(v at own share 0), with a Welch-style stderr."""
    full, zero = v[np.isclose(x, 1.0)], v[np.isclose(x, 0.0)]
    if len(full) == 0 or len(zero) == 0:
        return {"gap": NAN, "gap_stderr": NAN}
    se = NAN  # ddof-1 variances need at least two runs at each end
    if len(full) > 1 and len(zero) > 1:
        se = math.sqrt(np.var(full, ddof=1) / len(full) + np.var(zero, ddof=1) / len(zero))
    return {"gap": _f(full.mean() - zero.mean()), "gap_stderr": _f(se)}


def group_slopes(metrics: list[dict]) -> list[dict]:
    """Per (allocated attribute, group, metric): OLS of the metric on the group's own share, pooled over seeds.

    Only rows evaluating the allocated attribute's own groups are used (``attribute == alloc_attribute``,
    ``grp`` in {0, 1}); "overall" rows and other attributes' groups are ignored. x is α for group 1 and 1 − α for
    group 0, computed per row, so missing trials (fewer seeds at some α) are handled exactly.
    CI = slope ± t(0.975, n − 2) · stderr. Fewer than 3 points or constant x → NaN fit (the row is still emitted).
    ``gap`` = mean at own share 1 − mean at own share 0; ``gap_stderr`` = sqrt(var1/n1 + var0/n0), ddof 1.

    Returns:
        Rows with keys ``attribute, grp, metric, slope, intercept, stderr, ci_low, ci_high, r, p_value, n, gap,
        gap_stderr``, sorted by attribute, metric, grp.
    """
    cells: dict[tuple[str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for row in metrics:
        grp = int(row["grp"])
        if row["attribute"] != row["alloc_attribute"] or grp not in (0, 1):
            continue
        cells[(row["alloc_attribute"], grp, row["metric"])].append((own_share(row["alpha"], grp), float(row["value"])))
    out = []
    for (attribute, grp, metric), points in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        x, v = (np.array(col, dtype=np.float64) for col in zip(*points, strict=True))
        out.append({"attribute": attribute, "grp": grp, "metric": metric, **_fit(x, v), "n": len(x), **_gap(x, v)})
    return out


def _mean_pair(a: float, b: float) -> float:
    return (a + b) / 2.0


def _se_pair(a: float, b: float) -> float:
    return math.sqrt(a**2 + b**2) / 2.0


def attribute_slopes(group_rows: list[dict]) -> list[dict]:
    """Per (attribute, metric): the mean of the two groups' slopes and gaps.

    ``stderr = sqrt(se0² + se1²) / 2`` treats the two group fits as independent (they share trials, so this is an
    approximation). The paper divides the mean stderr by √9 instead; we do not copy that. CI is normal:
    slope ± 1.96 · stderr. A missing group gives NaN statistics and ``n`` = 0.
    """
    by_key: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in group_rows:
        by_key[(row["attribute"], row["metric"])][int(row["grp"])] = row
    out = []
    for (attribute, metric), groups in sorted(by_key.items()):
        g0, g1 = groups.get(0), groups.get(1)
        if g0 is None or g1 is None:
            stat = dict.fromkeys(("slope", "stderr", "gap", "gap_stderr"), NAN)
            n = 0
        else:
            stat = {
                "slope": _mean_pair(g0["slope"], g1["slope"]),
                "stderr": _se_pair(g0["stderr"], g1["stderr"]),
                "gap": _mean_pair(g0["gap"], g1["gap"]),
                "gap_stderr": _se_pair(g0["gap_stderr"], g1["gap_stderr"]),
            }
            n = min(int(g0["n"]), int(g1["n"]))
        half = 1.96 * stat["stderr"]
        out.append({
            "attribute": attribute, "metric": metric, "slope": _f(stat["slope"]), "stderr": _f(stat["stderr"]),
            "ci_low": _f(stat["slope"] - half), "ci_high": _f(stat["slope"] + half),
            "gap": _f(stat["gap"]), "gap_stderr": _f(stat["gap_stderr"]), "n": n,
        })
    return out


def _corr(x: np.ndarray, v: np.ndarray) -> dict:
    """Pearson and Spearman correlation; NaN when n < 3 or either side is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(v) == 0:
        return dict.fromkeys(("r", "r2", "p_value", "spearman_rho", "spearman_p"), NAN)
    pr, sr = stats.pearsonr(x, v), stats.spearmanr(x, v)
    r = _f(pr.statistic)
    return {"r": r, "r2": r**2, "p_value": _f(pr.pvalue), "spearman_rho": _f(sr.statistic),
            "spearman_p": _f(sr.pvalue)}


def correlations(separations: list[dict], attr_slopes: list[dict], *, n_boot: int = 1000,
                 seed: int = 0) -> list[dict]:
    """Across attributes (random included): correlation of each distance with each metric's slope and gap.

    Attributes present in both inputs with finite values are paired; ``n`` is the number of pairs.
    ``r2`` is r**2 and is labelled as such (the paper's plots print r² as "r"; we never do).

    Returns:
        Rows with keys ``distance, metric, y, r, r2, p_value, spearman_rho, spearman_p, r_ci_low, r_ci_high, n``;
        y is "slope" or "gap". The r CI is a percentile bootstrap over attributes (NaN below 4 attributes).
    """
    dist: dict[str, dict[str, float]] = defaultdict(dict)
    for row in separations:
        dist[row["distance"]][row["attribute"]] = _f(row["value"])
    ys: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for row in attr_slopes:
        for y in ("slope", "gap"):
            ys[(row["metric"], y)][row["attribute"]] = _f(row[y])
    out = []
    for distance in sorted(dist):
        for (metric, y) in sorted(ys, key=lambda k: (k[1] != "slope", k[0])):
            pairs = [(d, ys[(metric, y)][a]) for a, d in sorted(dist[distance].items()) if a in ys[(metric, y)]]
            pairs = [(d, s) for d, s in pairs if math.isfinite(d) and math.isfinite(s)]
            x = np.array([p[0] for p in pairs], dtype=np.float64)
            v = np.array([p[1] for p in pairs], dtype=np.float64)
            lo, hi = _boot_r(x, v, n_boot, seed)
            out.append({"distance": distance, "metric": metric, "y": y, **_corr(x, v), "r_ci_low": lo,
                        "r_ci_high": hi, "n": len(pairs)})
    return out


def _signed(x: float, digits: int = 3) -> str:
    """'+0.012' / '−0.012' with a typographic minus."""
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def _digits(half_width: float) -> int:
    """Decimals that resolve a CI of this half-width: 3 at least (the usual case), 5 at most."""
    if not half_width > 0:
        return 3
    return min(5, max(3, 1 - math.floor(math.log10(half_width))))


def _effect(row: dict | None, what: str) -> str | None:
    """'that group's loss by −0.021 (95% CI −0.025 to −0.017)' per +10% of allocation, or None."""
    if row is None or not math.isfinite(row["slope"]) or not math.isfinite(row["stderr"]):
        return None
    lo, est, hi = (0.1 * row[k] for k in ("ci_low", "slope", "ci_high"))
    d = _digits((hi - lo) / 2)
    return f"{what} by {_signed(est, d)} (95% CI {_signed(lo, d)} to {_signed(hi, d)})"


def _excludes_zero(row: dict | None) -> bool:
    return row is not None and math.isfinite(row["ci_low"]) and (row["ci_low"] > 0 or row["ci_high"] < 0)


RANDOM = "random"  # the null-baseline attribute every spec gets


def _beyond_baseline(row: dict, base: dict | None) -> bool:
    """|slope| larger than the random baseline's |slope|, by more than 1.96 standard errors of the difference.

    The random attribute splits the data arbitrarily, so its slope is what sampling noise and the nested subsets
    produce on their own (its OLS interval can exclude 0: the seeds' runs are correlated). An attribute only
    "matters" when it beats that baseline, not merely 0.
    """
    if base is None or not math.isfinite(base["slope"]) or not math.isfinite(base["stderr"]):
        return True
    diff = abs(row["slope"]) - abs(base["slope"])
    return diff > 1.96 * math.hypot(row["stderr"], base["stderr"])


def _verdict_text(attribute: str, loss: dict | None, bal: dict | None, tv: float | None,
                  base: dict | None) -> tuple[bool, str]:
    loss_part = _effect(loss, "that group's loss")
    if loss is None or loss_part is None:
        return False, (f"{attribute}: not enough information to estimate the loss slope "
                       f"(fewer than 3 finished runs per group, a single α, or a constant metric).")
    bal_part = _effect(bal, "its balanced accuracy")
    effect = loss_part + (f" and {bal_part}" if bal_part else "")
    tv_part = f" Latent separation TV = {tv:.3f}." if tv is not None and math.isfinite(tv) else ""
    if attribute == RANDOM:
        return False, (f"random (the null baseline, an arbitrary 50/50 split): each +10% of allocation to a group "
                       f"changes {effect}. Effects no larger than this mean nothing.{tv_part}")
    if not _excludes_zero(loss):
        return False, (f"{attribute}: no detectable effect (95% CI of the loss slope spans 0); "
                       f"each +10% of allocation to a group changes {effect}.{tv_part}")
    if not _beyond_baseline(loss, base):
        return False, (f"{attribute}: no effect beyond the random baseline; each +10% of allocation to a group "
                       f"changes {effect}, no more than an arbitrary split does.{tv_part}")
    return True, (f"Balancing on {attribute}: each +10% of allocation to a group changes {effect}: "
                  f"allocation matters.{tv_part}")


def verdicts(attr_slopes: list[dict], separations: Iterable[dict]) -> list[dict]:
    """One plain-English sentence per attribute from its loss and balanced-accuracy slopes.

    ``matters`` is True when the 95% CI of the attribute's loss slope excludes 0 AND its magnitude beats the random
    baseline's (see :func:`_beyond_baseline`); the random attribute itself never "matters". Effects are quoted per
    +10% of allocation (slope × 0.1). The TV (distance "tv_paper") is appended when known.

    Returns:
        Rows with keys ``attribute, matters, text``, sorted by attribute.
    """
    by_attr: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in attr_slopes:
        by_attr[row["attribute"]][row["metric"]] = row
    tv = {row["attribute"]: _f(row["value"]) for row in separations if row["distance"] == TV_DISTANCE}
    out = []
    for attribute in sorted(by_attr):
        metrics = by_attr[attribute]
        matters, text = _verdict_text(attribute, metrics.get(LOSS), metrics.get(BAL_ACC), tv.get(attribute),
                                      by_attr.get(RANDOM, {}).get(LOSS))
        out.append({"attribute": attribute, "matters": matters, "text": text})
    return out


# ---- cross-attribute effects ("whac-a-mole", method.md §10.10) ---------------------------------------------------

def cross_slopes(metrics: list[dict]) -> list[dict]:
    """How allocating on A moves the groups of EVERY attribute B (and the whole test set, B = 'overall').

    OLS of the metric of B's group on α (the share of A's group 1), seeds pooled, with a t-based 95% CI.
    For B = A and group 1 this equals the group slope; for group 0 of A it is minus the group slope (x = 1 − α).

    Returns rows with keys ``alloc_attribute, attribute, grp, metric, slope, stderr, ci_low, ci_high, p_value, n``.
    """
    cells: dict[tuple[str, str, int, str], list[tuple[float, float]]] = defaultdict(list)
    for row in metrics:
        if row["value"] is None or not math.isfinite(float(row["value"])):
            continue
        key = (row["alloc_attribute"], row["attribute"], int(row["grp"]), row["metric"])
        cells[key].append((float(row["alpha"]), float(row["value"])))
    out = []
    for (alloc, attr, grp, metric), pts in sorted(cells.items()):
        x, v = (np.array(col, dtype=np.float64) for col in zip(*pts, strict=True))
        fit = _fit(x, v)
        out.append({"alloc_attribute": alloc, "attribute": attr, "grp": grp, "metric": metric,
                    **{k: fit[k] for k in ("slope", "stderr", "ci_low", "ci_high", "p_value")}, "n": len(x)})
    return out


# ---- conventional explanations (method.md §8) --------------------------------------------------------------------

EXPLANATIONS = ("tv", "pretrain_share", "pretrained_bal_acc", "class_prevalence")


def _boot_r(x: np.ndarray, v: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% CI of Pearson r, resampling the (x, y) pairs; NaN when n < 4."""
    if len(x) < 4 or n_boot <= 0:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(v[i]) > 0:
            draws.append(np.corrcoef(x[i], v[i])[0, 1])
    if len(draws) < n_boot // 2:
        return NAN, NAN
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def explanations(group_rows: list[dict], separations: list[dict], pretrain_groups: list[dict],
                 pretrained: list[dict]) -> list[dict]:
    """Per group: its loss slope beside TV and the three conventional explanations.

    ``pretrain_groups`` rows: ``attribute, grp, share`` (the group's share of the pre-training train set) and
    ``prevalence`` (P(Y=1 | A=a) there). ``pretrained`` rows: ``attribute, grp, value`` = the pre-trained model's
    balanced accuracy on the group (test set, mean over pre-training seeds). TV is the attribute's (both groups).

    Returns rows with keys ``attribute, grp, loss_slope, tv, pretrain_share, pretrained_bal_acc, class_prevalence``.
    """
    tv = {r["attribute"]: _f(r["value"]) for r in separations if r["distance"] == TV_DISTANCE}
    pre = {(r["attribute"], int(r["grp"])): r for r in pretrain_groups}
    acc = {(r["attribute"], int(r["grp"])): _f(r["value"]) for r in pretrained}
    out = []
    for r in group_rows:
        if r["metric"] != LOSS:
            continue
        key = (r["attribute"], int(r["grp"]))
        p = pre.get(key, {})
        out.append({"attribute": key[0], "grp": key[1], "loss_slope": _f(r["slope"]), "tv": tv.get(key[0], NAN),
                    "pretrain_share": _f(p.get("share")), "pretrained_bal_acc": acc.get(key, NAN),
                    "class_prevalence": _f(p.get("prevalence"))})
    return out


def explanation_correlations(rows: list[dict], *, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Correlation of each explanation with the per-group loss slope, across groups (random included).

    Returns rows with keys ``explanation, r, r2, p_value, spearman_rho, spearman_p, r_ci_low, r_ci_high, n``.
    """
    out = []
    for name in EXPLANATIONS:
        pairs = [(r[name], r["loss_slope"]) for r in rows if math.isfinite(r[name]) and math.isfinite(r["loss_slope"])]
        x = np.array([p[0] for p in pairs], dtype=np.float64)
        v = np.array([p[1] for p in pairs], dtype=np.float64)
        lo, hi = _boot_r(x, v, n_boot, seed)
        out.append({"explanation": name, **_corr(x, v), "r_ci_low": lo, "r_ci_high": hi, "n": len(pairs)})
    return out


# ---- screening: is an attribute separated in the latent space? ------------------------------------------------

def screen_verdicts(separations: list[dict], *, min_effect: float, permutations: int | None = None,
                    level: float = 0.05) -> dict[tuple[str, str], dict]:
    """A plain verdict per (attribute, distance) from the calibrated estimate and the permutation p-value.

    Separated = p below ``level`` / m (Bonferroni over the m non-random attributes) AND the calibrated estimate
    (value − permutation-null mean) at least ``min_effect``. A detectable but smaller separation is reported as
    not meaningful; the random attribute is the null baseline.

    Returns {(attribute, distance): {"separated": bool | None, "verdict": str}}.
    """
    m = max(1, len({r["attribute"] for r in separations if r["attribute"] != RANDOM}))
    threshold = level / m
    too_few = permutations is not None and 1.0 / (permutations + 1) >= threshold
    out = {}
    for r in separations:
        key = (r["attribute"], r["distance"])
        p, cal = r.get("p_value"), r.get("calibrated")
        if r["attribute"] == RANDOM:
            out[key] = {"separated": None, "verdict": "null baseline (an arbitrary 50/50 split)"}
        elif p is None or cal is None or not math.isfinite(p):
            out[key] = {"separated": None, "verdict": "not calibrated (separation.permutations = 0)"}
        elif too_few:
            need = math.ceil(1.0 / threshold)
            out[key] = {"separated": None, "verdict": f"undetermined: {permutations} permutations cannot reach "
                                                      f"p < {threshold:.3g}; fix: separation.permutations >= {need}"}
        elif p < threshold and cal >= min_effect:
            out[key] = {"separated": True, "verdict": "separated: allocation likely matters"}
        elif p < threshold:
            out[key] = {"separated": False, "verdict": f"not meaningfully separated: detectable (p = {p:.3g}) but "
                                                       f"calibrated {cal:.3f} < {min_effect:g}"}
        else:
            out[key] = {"separated": False, "verdict": f"not separated beyond chance (p = {p:.3g})"}
    return out
