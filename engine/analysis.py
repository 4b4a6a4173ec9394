"""Cross-trial statistics: allocation slopes, generalisation gaps, cross effects, explanations, verdicts.

Every slope and gap is a statistic computed **per seed** on that seed's curve, averaged over seeds, with the seed
+ test-set interval of :mod:`engine.intervals` (its docstring names the units of replication and what the interval
covers). Inputs are the curves from :func:`curves_from_rows`; outputs are lists of row dicts whose keys are exactly
the columns of the matching table (engine/store.py). Correlations across attributes live in :mod:`engine.correlate`.

To add a statistic: a function ``(x, v) -> value`` vectorised over leading axes, passed to
:func:`engine.intervals.interval`, and a table whose columns are the keys you return.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np

from engine.intervals import Curve, beyond_null, gap, interval, null_range, ols, paired, slope_of
from engine.spec import is_null_partition

__all__ = ["curves_from_rows", "group_slopes", "attribute_slopes", "verdicts", "cross_slopes", "explanations",
           "screen_verdicts", "LOSS", "BAL_ACC", "EXPLANATIONS"]

NAN = float("nan")
LOSS, BAL_ACC = "loss", "bal_acc"
TV_DISTANCE = "tv_paper"  # the distance the verdicts quote
Cells = dict[tuple[str, str, int, str], dict[int, Curve]]  # (alloc attribute, attribute, grp, metric) -> seed -> curve


def _f(x: float | None) -> float:
    """A plain Python float (DuckDB and JSON friendly); None becomes NaN."""
    return NAN if x is None else float(x)


def curves_from_rows(rows: Iterable[dict]) -> Cells:
    """Metric rows (``alloc_attribute, alpha, seed, attribute, grp, metric, value`` and optionally ``boot``, the
    values on the B test resamples) -> per (alloc attribute, attribute, grp, metric) and seed, a :class:`Curve` on
    α, points sorted by α. A cell whose runs do not all carry resamples of one size gets none (seed interval only).
    """
    acc: dict[tuple[str, str, int, str], dict[int, list[tuple[float, float, object]]]] = defaultdict(
        lambda: defaultdict(list))
    for r in rows:
        value = _f(r["value"])
        acc[(r["alloc_attribute"], r["attribute"], int(r["grp"]), r["metric"])][int(r["seed"])].append(
            (float(r["alpha"]), value, r.get("boot")))
    cells: Cells = {}
    for key, seeds in acc.items():
        sizes = {len(p[2]) if p[2] is not None else -1 for pts in seeds.values() for p in pts}
        use_boot = len(sizes) == 1 and min(sizes) >= 2
        out = {}
        for seed, pts in seeds.items():
            pts.sort(key=lambda p: p[0])
            x = np.array([p[0] for p in pts])
            v = np.array([p[1] for p in pts])
            boot = np.array([p[2] for p in pts], dtype=np.float64).T if use_boot else None
            out[seed] = Curve(x, v, boot)
        cells[key] = out
    return cells


def _on_own_share(curves: dict[int, Curve], grp: int) -> dict[int, Curve]:
    return curves if grp == 1 else {s: Curve(1.0 - c.x, c.v, c.boot) for s, c in curves.items()}


def _interval_row(curves: dict[int, Curve], name: str = "slope") -> dict:
    """The slope of ``curves`` with its interval, as the shared interval columns (engine/store.py ``_Interval``)."""
    res = interval(curves, slope_of)
    est = res.pop("estimate")
    return {name: _f(est), **res}


def _gap_columns(curves: dict[int, Curve]) -> dict:
    res = interval(curves, gap)
    return {"gap": _f(res["estimate"]), "gap_stderr": _f(res["stderr"]), "gap_ci_low": _f(res["ci_low"]),
            "gap_ci_high": _f(res["ci_high"])}


def group_slopes(cells: Cells) -> list[dict]:
    """Per (allocated attribute, group, metric): the slope of the metric on the group's own share.

    Per seed: OLS of the group's metric on its own share (α for group 1, 1 − α for group 0) over that seed's runs;
    the estimate is the mean over seeds, the interval the seed + test-set one (engine.intervals). ``intercept``
    is the mean of the per-seed intercepts. ``gap`` = value at own share 1 − value at own share 0, per seed, with
    the same interval construction. NaN metric values are dropped and counted (``n_dropped``). For a null
    partition the group slope is conditional on the pool partition (see engine.intervals); the verdicts use the
    paired attribute slope.
    """
    out = []
    for (alloc, attr, grp, metric), curves in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][2])):
        if attr != alloc or grp not in (0, 1):
            continue
        own = _on_own_share(curves, grp)
        icpt = [float(ols(c.x, c.v)[1]) for c in own.values()]
        icpt = [i for i in icpt if math.isfinite(i)]
        out.append({"attribute": attr, "grp": grp, "metric": metric, **_interval_row(own),
                    "intercept": float(np.mean(icpt)) if icpt else NAN, **_gap_columns(own)})
    return out


def attribute_slopes(cells: Cells) -> list[dict]:
    """Per (attribute, metric): the paired attribute slope, and how it compares with the null partitions.

    The attribute slope (mean of the two groups' own-share slopes) is the slope of (v₁ − v₀)/2 on α within a run:
    it is fitted per seed on that paired quantity, so what one head does to both groups cancels in the estimate
    and its error; interval as engine.intervals. ``gap`` is the paired gap (mean of the groups' gaps).
    The null range (``null_low``, ``null_high``) spans 0 and every null partition's attribute slope for the metric;
    ``beyond_null`` says whether the attribute's 95% interval lies entirely outside it (None for null partitions).
    """
    rows = []
    by_attr: dict[tuple[str, str], dict[int, dict[int, Curve]]] = defaultdict(dict)
    for (alloc, attr, grp, metric), curves in cells.items():
        if attr == alloc and grp in (0, 1):
            by_attr[(attr, metric)][grp] = curves
    for (attr, metric), groups in sorted(by_attr.items()):
        if 0 not in groups or 1 not in groups:
            continue
        pc = paired(groups[1], groups[0])
        rows.append({"attribute": attr, "metric": metric, **_interval_row(pc), **_gap_columns(pc),
                     "null_partition": is_null_partition(attr)})
    nulls: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["null_partition"]:
            nulls[r["metric"]].append(r["slope"])
    for r in rows:
        lo, hi = null_range(nulls[r["metric"]])
        r.update(null_low=lo, null_high=hi, n_null=len(nulls[r["metric"]]),
                 beyond_null=None if r["null_partition"] else beyond_null(r["ci_low"], r["ci_high"],
                                                                          nulls[r["metric"]]))
    return rows


def cross_slopes(cells: Cells) -> list[dict]:
    """How allocating on A moves the groups of EVERY attribute B (and the whole test set, B = 'overall').

    Per seed: OLS of the metric of B's group on α (the share of A's group 1); mean over seeds with the seed +
    test-set interval. For B = A and group 1 this equals the group slope; for group 0 of A it is minus the group
    slope (x = 1 − α).
    """
    return [{"alloc_attribute": alloc, "attribute": attr, "grp": grp, "metric": metric, **_interval_row(curves)}
            for (alloc, attr, grp, metric), curves in sorted(cells.items())]


# ---- verdicts ------------------------------------------------------------------------------------------------

def signed(x: float, digits: int = 3) -> str:
    """'+0.012' / '−0.012' with a typographic minus."""
    return f"{x:+.{digits}f}".replace("-", "\u2212")


def decimals(half_width: float) -> int:
    """Decimals that resolve a CI of this half-width: 3 at least (the usual case), 5 at most."""
    if not half_width > 0:
        return 3
    return min(5, max(3, 1 - math.floor(math.log10(half_width))))


def _effect(row: dict | None, what: str) -> str | None:
    """'that group's loss by −0.021 (95% CI −0.025 to −0.017)' per +10% of allocation, or None."""
    if row is None or not math.isfinite(row["slope"]) or not math.isfinite(row["ci_low"]):
        return None
    lo, est, hi = (0.1 * row[k] for k in ("ci_low", "slope", "ci_high"))
    d = decimals((hi - lo) / 2)
    return f"{what} by {signed(est, d)} (95% CI {signed(lo, d)} to {signed(hi, d)})"


def _basis(row: dict) -> str:
    return f" Based on {row['n']} runs over {row['n_seeds']} seeds" + (
        f" and {row['n_resamples']} test resamples." if row.get("n_resamples") else " (no test resamples).")


POOL_CAVEAT = ("its interval covers the seeds and the finite test set but not the pool partition: every seed trains "
               "on nearly the same items of each side of this random grouping, so what distinguishes those two "
               "halves of the pool is common to all runs. The spread of the null partitions measures it, and no "
               "attribute is said to matter unless its interval lies beyond that spread")


def _verdict_text(attribute: str, loss: dict | None, bal: dict | None, tv: float | None) -> tuple[bool, str]:
    loss_part = _effect(loss, "that group's loss")
    if loss is None or loss_part is None:
        return False, (f"{attribute}: not enough information to estimate the loss slope "
                       f"(fewer than 2 runs at distinct α per seed, or every value missing).")
    bal_part = _effect(bal, "its balanced accuracy")
    effect = loss_part + (f" and {bal_part}" if bal_part else "")
    tv_part = f" Latent separation TV = {tv:.3f}." if tv is not None and math.isfinite(tv) else ""
    basis = _basis(loss)
    lo, hi = _f(loss.get("null_low")), _f(loss.get("null_high"))
    null_span = (f"the null partitions' loss slopes span {signed(0.1 * lo, 4)} to {signed(0.1 * hi, 4)} per +10% "
                 f"(with 0; {loss.get('n_null', 0)} partitions)")
    if loss.get("null_partition"):
        excl = [name for name, r in (("loss", loss), ("balanced accuracy", bal)) if r is not None and
                math.isfinite(r["ci_low"]) and (r["ci_low"] > 0 or r["ci_high"] < 0)]
        note = (f" Its {' and '.join(excl)} interval excludes 0: {POOL_CAVEAT}." if excl
                else " Its intervals include 0, as a null baseline's should.")
        return False, (f"{attribute} (a null partition: an arbitrary 50/50 split): each +10% of allocation to a "
                       f"group changes {effect}.{note}{tv_part}{basis}")
    if not (loss["ci_low"] > 0 or loss["ci_high"] < 0):
        return False, (f"{attribute}: no detectable effect (95% CI of the loss slope spans 0); each +10% of "
                       f"allocation to a group changes {effect}.{tv_part}{basis}")
    if not loss.get("beyond_null"):
        return False, (f"{attribute}: no effect beyond the null partitions; each +10% of allocation to a group "
                       f"changes {effect}, and {null_span}: the interval overlaps them.{tv_part}{basis}")
    return True, (f"Balancing on {attribute}: each +10% of allocation to a group changes {effect}: allocation "
                  f"matters (the interval lies beyond the null range: {null_span}).{tv_part}{basis}")


def verdicts(attr_slopes: list[dict], separations: Iterable[dict]) -> list[dict]:
    """One plain-English sentence per attribute from its paired loss and balanced-accuracy slopes.

    ``matters`` is True when the 95% interval of the attribute's loss slope lies entirely outside the null range
    (the span of 0 and every null partition's loss slope; see engine.intervals.beyond_null). Null partitions never
    "matter"; their sentence says whether their interval includes 0, and if not, which source of variation it
    cannot capture. Effects are quoted per +10% of allocation (slope × 0.1); every verdict says how many runs,
    seeds and test resamples it rests on. The TV (distance "tv_paper") is appended when known.

    Returns rows with keys ``attribute, matters, text, n_runs, n_seeds``, sorted by attribute.
    """
    by_attr: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in attr_slopes:
        by_attr[row["attribute"]][row["metric"]] = row
    tv = {row["attribute"]: _f(row["value"]) for row in separations if row["distance"] == TV_DISTANCE}
    out = []
    for attribute in sorted(by_attr):
        metrics = by_attr[attribute]
        loss = metrics.get(LOSS)
        matters, text = _verdict_text(attribute, loss, metrics.get(BAL_ACC), tv.get(attribute))
        out.append({"attribute": attribute, "matters": matters, "text": text,
                    "n_runs": int(loss["n"]) if loss else 0, "n_seeds": int(loss["n_seeds"]) if loss else 0})
    return out


# ---- conventional explanations (method.md §8) --------------------------------------------------------------------

EXPLANATIONS = ("tv", "pretrain_share", "pretrained_bal_acc", "class_prevalence")


def explanations(group_rows: list[dict], separations: list[dict], pretrain_groups: list[dict],
                 pretrained: list[dict]) -> list[dict]:
    """Per group: its loss slope beside TV and the three conventional explanations.

    ``pretrain_groups`` rows: ``attribute, grp, share`` (the group's share of the pre-training train set) and
    ``prevalence`` (P(Y=1 | A=a) there). ``pretrained`` rows: ``attribute, grp, value`` = the pre-trained model's
    balanced accuracy on the group (test set, mean over pre-training seeds). TV is the attribute's (both groups).
    ``null_partition`` marks the groups of random groupings.

    Returns rows with keys ``attribute, grp, loss_slope, tv, pretrain_share, pretrained_bal_acc, class_prevalence,
    null_partition``.
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
                    "class_prevalence": _f(p.get("prevalence")), "null_partition": is_null_partition(key[0])})
    return out


# ---- screening: is an attribute separated in the latent space? ------------------------------------------------

def screen_verdicts(separations: list[dict], *, min_effect: float, permutations: int | None = None,
                    level: float = 0.05) -> dict[tuple[str, str], dict]:
    """A plain verdict per (attribute, distance) from the calibrated estimate and the permutation p-value.

    Separated = p below ``level`` / m (Bonferroni over the m non-random attributes) AND the calibrated estimate
    (value − permutation-null mean) at least ``min_effect``. A detectable but smaller separation is reported as
    not meaningful; the random attribute is the null baseline.

    The transfer distances (heads trained on one group, applied to the other) have no permutation null: their
    p-value is the seed + test-set t-test of the gap against 0, and the same rule applies to the gap itself. When
    TV calls an attribute separated but every label-aware measure present (``transfer``, ``tv_label``) does not,
    TV's verdict says the separation lies along directions the head does not use.

    Returns {(attribute, distance): {"separated": bool | None, "verdict": str}}.
    """
    m = max(1, len({r["attribute"] for r in separations if not is_null_partition(r["attribute"])}))
    threshold = level / m
    too_few = permutations is not None and 1.0 / (permutations + 1) >= threshold
    out = {}
    for r in separations:
        key = (r["attribute"], r["distance"])
        p, cal = r.get("p_value"), r.get("calibrated")
        if is_null_partition(r["attribute"]):
            out[key] = {"separated": None, "verdict": "null partition (an arbitrary 50/50 split)"}
        elif r["distance"] in TRANSFER_DISTANCES:
            out[key] = _transfer_verdict(r, threshold, min_effect)
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
    for (attr, dist), v in out.items():
        if dist not in ("tv_paper", "tv") or not v["separated"]:
            continue
        label_aware = [out[(attr, d)]["separated"] for d in ("transfer", "tv_label") if (attr, d) in out]
        if label_aware and not any(label_aware):
            v["verdict"] = ("separated, but along directions the head does not use: allocation unlikely to matter "
                            "(transfer / tv_label find no label-relevant difference)")
    return out


TRANSFER_DISTANCES = ("transfer", "transfer_loss")


def _transfer_verdict(r: dict, threshold: float, min_effect: float) -> dict:
    """Verdict of a transfer gap: a head trained on one group is worse on the other by at least ``min_effect``
    (balanced accuracy points or nats of loss) and the t-test against 0 passes the Bonferroni threshold."""
    p, gap = r.get("p_value"), r.get("value")
    what = "balanced-accuracy drop" if r["distance"] == "transfer" else "loss rise"
    if p is None or gap is None or not math.isfinite(p) or not math.isfinite(gap):
        return {"separated": None, "verdict": "undetermined: no interval (one repeat and no test resamples)"}
    if p < threshold and gap >= min_effect:
        return {"separated": True, "verdict": f"heads do not transfer between the groups ({what} {gap:.3f}): "
                                              "allocation likely matters"}
    if p < threshold and gap > 0:
        return {"separated": False, "verdict": f"heads transfer almost fully: {what} {gap:.3f} is detectable "
                                               f"(p = {p:.3g}) but below {min_effect:g}"}
    return {"separated": False, "verdict": f"heads transfer between the groups ({what} {gap:.3f}, p = {p:.3g})"}
