"""Render a finished analysis as one self-contained HTML report (no scripts, no network, figures as inline SVG).

``render_report(data, out_path)`` takes the analysis tables as lists of row dicts (see ``REQUIRED_KEYS``; the dict
``engine.results.report_data`` returns, or its pooled variant with ``experiment["pooled"]``). This module decides every
number and word; ``engine.figures`` draws; ``reports/templates/report.html.j2`` only lays out (Jinja2,
``autoescape=True``, ``StrictUndefined``; formatting filters are registered in ``FILTERS``).

To add a section: compute its rows in a ``_section_*`` function here (figures in ``engine.figures``), add it to the
context in ``build_context``, and lay it out in a partial ``reports/templates/_<section>.html.j2``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from engine import figures, intervention, recommend
from engine.analysis import BAL_ACC, EXPLANATIONS, LOSS, POOL_CAVEAT, TV_DISTANCE
from engine.correlate import TOO_FEW
from engine.figures import BestAlpha
from engine.spec import is_null_partition

__all__ = ["render_report", "build_context", "REQUIRED_KEYS", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
TEMPLATE = "report.html.j2"
REQUIRED_KEYS = ("experiment", "separations", "curves", "slopes", "attribute_slopes", "correlations", "verdicts",
                 "fits", "best_alpha", "cross_slopes", "explanations", "explanation_correlations", "bounds",
                 "trials", "stages", "pretrain", "generated_at")
METRIC_NAMES = {BAL_ACC: "balanced accuracy", LOSS: "test loss (cross-entropy)", "acc": "accuracy", "auc": "AUC"}
SHORT_METRIC_NAMES = {BAL_ACC: "bal. acc.", LOSS: "loss"}
EXPLANATION_NAMES = {"tv": "latent separation TV (the attribute's)", "pretrain_share": "share of the pre-training set",
                     "pretrained_bal_acc": "pre-trained model's balanced accuracy on the group",
                     "class_prevalence": "class prevalence P(Y=1 | A=a) in pre-training"}
OVERALL = "overall"
CROSS_WARNINGS_PER_METRIC = 2  # the summary names only the largest side effects; §7 has them all
MAX_VIOLATIONS_SHOWN = 20  # beyond the lowest-vs-highest pairs, the bound table lists violated pairs up to this
FLAT_CI_WIDTH = 0.8  # a best-α CI this wide (of the range 0–1) means the criterion barely depends on α
DASH = "—"


# ---------------------------------------------------------------- formatting filters (registered in Jinja)

def _finite(x: Any) -> bool:
    return isinstance(x, int | float | np.floating | np.integer) and not isinstance(x, bool) and math.isfinite(x)


def fmt_num(x: Any, digits: int = 3) -> str:
    """Fixed-point with a typographic minus; "—" for None/NaN."""
    return f"{float(x):.{digits}f}".replace("-", "\u2212") if _finite(x) else DASH


def fmt_signed(x: Any, digits: int = 4) -> str:
    return f"{float(x):+.{digits}f}".replace("-", "\u2212") if _finite(x) else DASH


def fmt_p(p: Any) -> str:
    """p-values: three decimals, scientific below 0.001."""
    if not _finite(p):
        return DASH
    if p == 0:
        return "0"  # e.g. Spearman's exact p for a perfect rank correlation
    return f"{float(p):.1e}".replace("-", "\u2212") if p < 1e-3 else f"{float(p):.3f}"


def fmt_ci(low: Any, high: Any, digits: int = 4) -> str:
    return f"[{fmt_signed(low, digits)}, {fmt_signed(high, digits)}]" if _finite(low) and _finite(high) else DASH


def fmt_pm(mean: Any, std: Any, digits: int = 3) -> str:
    return f"{fmt_num(mean, digits)} ± {fmt_num(std, digits)}" if _finite(std) else fmt_num(mean, digits)


def fmt_seconds(s: Any) -> str:
    if not _finite(s):
        return DASH
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


FILTERS = {"num": fmt_num, "signed": fmt_signed, "pval": fmt_p, "ci": fmt_ci, "pm": fmt_pm, "seconds": fmt_seconds}


def _excludes_zero(row: dict) -> bool:
    return _finite(row.get("ci_low")) and _finite(row.get("ci_high")) and (row["ci_low"] > 0 or row["ci_high"] < 0)


def _per10(row: dict, what: str) -> str:
    """'what by −0.0021 per +10% α (95% CI −0.0030 to −0.0012)'."""
    lo, est, hi = (fmt_signed(0.1 * row[k]) for k in ("ci_low", "slope", "ci_high"))
    return f"{what} by {est} per +10% α (95% CI {lo} to {hi})"


def correlation_label(row: dict | None, what: str = "TV or the slope") -> str:
    """'Pearson r = …, r² = …, p = … (exact permutation), n = …' (+ r's Fisher-z CI); below 5 points r and r² only,
    as descriptions, with the reason. r and r² are both labelled (the paper wrote r² as r)."""
    if row is None or not _finite(row["r"]):
        n = 0 if row is None else row["n"]
        if n >= 3:
            return f"no correlation: {what} is constant (n = {n})"
        return f"not enough points for a correlation (n < 3; n = {n})"
    desc = f"Pearson r = {fmt_num(row['r'])}, r² = {fmt_num(row['r2'])}"
    if not row.get("testable", True):
        return f"{desc} ({TOO_FEW.format(n=row['n'])})"
    label = f"{desc}, p = {fmt_p(row['p_value'])} ({row.get('p_method') or 'permutation'}), n = {row['n']}"
    if _finite(row.get("r_ci_low")) and _finite(row.get("r_ci_high")):
        label += f"; Fisher z 95% CI of r [{fmt_num(row['r_ci_low'])}, {fmt_num(row['r_ci_high'])}]"
    return label


def _index(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in rows}


# ---------------------------------------------------------------- 2. TV ranking

def _tv_cell(row: dict | None) -> str:
    """Mean ± SD over pre-training seeds (ddof 1): the encoder-to-encoder spread, never a within-seed interval."""
    return DASH if row is None else fmt_pm(row["value"], row.get("seed_sd"))


def _section_tv_table(data: dict) -> dict:
    """Rows ranked by the primary distance (TV first), with per-class TVs and the attribute slopes alongside."""
    seps = _index(data["separations"], "attribute", "distance")
    distances = sorted({d for _, d in seps}, key=lambda d: (d != TV_DISTANCE, d))
    slopes = _index(data["attribute_slopes"], "attribute", "metric")
    primary = distances[0] if distances else None
    calibrated = any("calibrated" in r for r in data["separations"])

    def rank_key(a: str) -> tuple[bool, float, str]:
        v = seps.get((a, primary), {}).get("value")
        return (not _finite(v), -float(v) if _finite(v) else 0.0, a)

    rows = []
    for a in sorted({a for a, _ in seps} | {a for a, _ in slopes}, key=rank_key):
        first = seps.get((a, primary), {})
        rows.append({
            "attribute": a, "dists": [_tv_cell(seps.get((a, d))) for d in distances],
            "y0": fmt_num(first.get("value_y0")), "y1": fmt_num(first.get("value_y1")),
            "within": fmt_num(first.get("within_sd")),
            "calibrated": fmt_num(first.get("calibrated")), "null_mean": fmt_num(first.get("null_mean")),
            "p_perm": fmt_p(first.get("p_value")),
            "n_seeds": first.get("n_seeds", DASH), "n_g0": first.get("n_g0", DASH), "n_g1": first.get("n_g1", DASH),
            "loss": slopes.get((a, LOSS)), "bal_acc": slopes.get((a, BAL_ACC)),
            "verdict": first.get("verdict") or DASH,
        })
    verdicts = any(r.get("verdict") for r in data["separations"])
    nulls = next((r for r in data["attribute_slopes"] if r["metric"] == LOSS and _finite(r.get("null_low"))), None)
    return {"distances": distances, "primary": primary or TV_DISTANCE, "rows": rows, "calibrated": calibrated,
            "verdicts": verdicts, "interval": "mean ± SD over pre-training seeds, ddof 1",
            "null_loss": None if nulls is None else fmt_ci(nulls["null_low"], nulls["null_high"]),
            "n_null": 0 if nulls is None else nulls.get("n_null", 0),
            "methods": sorted({r["method"] for r in data["attribute_slopes"] if r.get("method")})}


def _rank(tv_table: dict) -> dict[str, int]:
    return {row["attribute"]: i for i, row in enumerate(tv_table["rows"])}


def _order(attributes: Any, rank: dict[str, int]) -> list[str]:
    return sorted(set(attributes), key=lambda a: (rank.get(a, len(rank)), a))


# ---------------------------------------------------------------- 3. allocation curves with fits

def _fit_rows(attribute: str, data: dict) -> list[dict]:
    """The fit table: balanced accuracy then loss, per group the line and the power law, parameters compact."""
    rows = []
    for f in sorted((f for f in data["fits"] if f["attribute"] == attribute and f["metric"] in (BAL_ACC, LOSS)),
                    key=lambda f: (f["metric"] != BAL_ACC, f["grp"], f["model"])):
        params = figures.fit_params(f)
        text = ", ".join(f"{n} = {p:.3g}" for n, p in zip("abc", params, strict=False)) if params else DASH
        rows.append({**f, "metric_name": SHORT_METRIC_NAMES[f["metric"]], "params_text": text.replace("-", "\u2212"),
                     "model_name": "power law" if f["model"] == "power" else f["model"]})
    return rows


def _best(data: dict, attribute: str, matters: bool) -> dict | None:
    if not matters:
        return None
    return next((b for b in data["best_alpha"] if b["attribute"] == attribute and b["metric"] == BAL_ACC
                 and b["criterion"] == "worst_group" and _finite(b["alpha"])), None)


def _null_band(attribute: str, metric: str, points: dict[int, np.ndarray], data: dict) -> dict | None:
    """Per group, the wedge a curve with a null partition's slope would fill: centred on the group's mean over the
    observed α, with slopes (per unit of own share) from null_low to null_high of the attribute_slopes table."""
    row = next((r for r in data["attribute_slopes"] if r["attribute"] == attribute and r["metric"] == metric), None)
    if row is None or not (_finite(row.get("null_low")) and _finite(row.get("null_high"))) or not row.get("n_null"):
        return None
    band = {}
    for grp, pts in points.items():
        if pts.size == 0 or not np.isfinite(pts[1]).any():
            continue
        x = np.linspace(float(np.min(pts[0])), float(np.max(pts[0])), 21)
        share = x if grp == 1 else 1.0 - x
        centre = float(np.nanmean([np.nanmean(pts[1][pts[0] == a]) for a in np.unique(pts[0])]))
        d = share - 0.5 * (share.min() + share.max())
        lo, hi = np.minimum(row["null_low"] * d, row["null_high"] * d), np.maximum(row["null_low"] * d, row["null_high"] * d)
        band[grp] = (x, centre + lo, centre + hi)
    return band or None


def _curve_section(attribute: str, rows: list[dict], data: dict, matters: bool) -> dict:
    budget = data["experiment"].get("budget")
    panels, bands = [], []
    for metric in (BAL_ACC, LOSS):
        points = {g: np.array([(r["alpha"], r["value"]) for r in rows if r["grp"] == g and r["metric"] == metric],
                              dtype=float).reshape(-1, 2).T for g in (0, 1)}
        lines = figures.preferred_lines(data["fits"], data["slopes"], attribute, metric, points, budget)
        panels.append((METRIC_NAMES[metric], points, lines))
        bands.append(None if is_null_partition(attribute) else _null_band(attribute, metric, points, data))
    best = _best(data, attribute, matters)
    marker = None if best is None else BestAlpha(
        best["alpha"], best["ci_low"] if _finite(best["ci_low"]) else best["alpha"],
        best["ci_high"] if _finite(best["ci_high"]) else best["alpha"],
        f"best α for the worst group = {fmt_num(best['alpha'], 2)}")
    described = "; ".join(f"{title}: " + ", ".join(f"group {ln.grp} {ln.label}" for ln in lines)
                          for title, _, lines in panels)
    alt = (f"Allocation curves for {attribute}: balanced accuracy and loss of group 0 and group 1 versus α, the share "
           f"of group 1; runs, per-α means and fitted curves ({described})."
           + (f" Best α for the worst group's balanced accuracy: {fmt_num(best['alpha'], 2)}." if best else ""))
    caption = (f"Allocating on {attribute}: each point is one fine-tuning run (seed); thin solid lines join the per-α "
               f"means; dashed lines are each group's preferred fit (lower AIC) on its own share (α for group 1, "
               f"1 − α for group 0), drawn over the range it was fitted on."
               + (" The green line and band mark the α that maximises the worse group's balanced accuracy and its "
                  f"{best.get('interval') or 'bootstrap 95% CI'}." if best else "")
               + (" The shaded wedge behind each group's curve is the null band: a curve through the group's mean "
                  "level whose slope lies between the smallest and largest attribute slope the null partitions "
                  "produce (and 0); a group whose curve leaves it moves more than an arbitrary split does."
                  if any(bands) else ""))
    if budget is None and any(f["model"] == "power" and f["preferred"] for f in data["fits"]
                              if f["attribute"] == attribute):
        caption += " The fine-tuning budget K is unknown here, so power-law fits are shown in the table only."
    p_y = sorted((r["alpha"], r["p_y"]) for r in data.get("p_y", []) if r["attribute"] == attribute)
    return {"attribute": attribute, "svg": figures.curve_figure(attribute, panels, marker, alt, bands),
            "caption": caption, "fits": _fit_rows(attribute, data),
            "p_y": [{"alpha": fmt_num(a, 2), "p_y": fmt_num(v)} for a, v in p_y],
            "p_y_range": fmt_num(max(v for _, v in p_y) - min(v for _, v in p_y)) if p_y else DASH}


def _sampler_note(data: dict) -> str:
    sampler = data["experiment"].get("sampler") or "natural"
    if sampler == "stratified":
        return ("Sampler: stratified. Within each group the fine-tuning sets keep the pool's P(Y=1), so P(Y) is the "
                "same at every α (the theorem's assumption) and a slope is not a change of class balance.")
    if sampler == "natural":
        return ("Sampler: natural (the paper's). Each group brings its own P(Y | A), so P(Y=1) of the fine-tuning set "
                "moves with α when the groups' class balance differs: part of a slope can be a class-balance effect. "
                "The table under each figure shows P(Y=1) per α; allocation.sampler = \"stratified\" holds it fixed.")
    return f"Samplers: {sampler}."


def _section_curves(data: dict, rank: dict[str, int]) -> list[dict]:
    """One small-multiple figure and fit table per allocated attribute, in the TV table's order."""
    by_alloc: dict[str, list[dict]] = defaultdict(list)
    for r in data["curves"]:
        if r["attribute"] == r["alloc_attribute"] and r["grp"] in (0, 1):
            by_alloc[r["alloc_attribute"]].append(r)
    matters = {v["attribute"]: bool(v["matters"]) for v in data["verdicts"]}
    return [_curve_section(a, by_alloc[a], data, matters.get(a, False)) for a in _order(by_alloc, rank)]


# ---------------------------------------------------------------- 4. TV vs slope; 5. explanations

def _section_scatter(data: dict) -> dict | None:
    """TV (calibrated when the permutation null exists) against the paired loss slope, one point per attribute."""
    corrs = [c for c in data["correlations"] if c["distance"] == TV_DISTANCE and c["metric"] == LOSS
             and c["y"] == "slope"]
    corr = next((c for c in corrs if c.get("x", "raw") == "calibrated"), corrs[0] if corrs else None)
    x_kind = corr.get("x", "raw") if corr else "raw"
    col, sd_col = ("calibrated", "calibrated_sd") if x_kind == "calibrated" else ("value", "seed_sd")
    tv = {r["attribute"]: r for r in data["separations"] if r["distance"] == TV_DISTANCE}
    slopes = {r["attribute"]: r for r in data["attribute_slopes"] if r["metric"] == LOSS}
    points = [
        {"attribute": a, "tv": tv[a][col], "tv_std": tv[a][sd_col] if _finite(tv[a].get(sd_col)) else 0.0,
         "slope": slopes[a]["slope"],
         "half_ci": (slopes[a]["ci_high"] - slopes[a]["ci_low"]) / 2 if _finite(slopes[a]["ci_low"]) else 0.0}
        for a in sorted(tv) if a in slopes and _finite(tv[a].get(col)) and _finite(slopes[a]["slope"])
    ]
    if not points:
        return None
    label = correlation_label(corr)
    xlabel = ("calibrated TV (estimate − permutation-null mean; ± SD over pre-training seeds)" if x_kind == "calibrated"
              else "latent separation TV (± SD over pre-training seeds)")
    alt = f"Scatter of {xlabel.split(' (')[0]} against the paired loss slope, one point per attribute; {label}."
    svg = figures.scatter_figure(points, label, alt, draw_line=corr is not None and _finite(corr["r"]) and
                                 bool(corr.get("testable", True)), xlabel=xlabel)
    what = xlabel.split(" (")[0]
    caption = (f"{what[:1].upper() + what[1:]} against the attribute's paired loss slope (± its seed + test-set "
               f"95% interval), one point per attribute; every null partition is drawn, but they count as one point "
               f"in the correlation. {label}.")
    return {"svg": svg, "caption": caption, "label": label}


def _section_explanations(data: dict) -> dict | None:
    rows = data["explanations"]
    if not rows:
        return None
    corrs = {c["explanation"]: c for c in data["explanation_correlations"]}
    panels, table = [], []
    for name in EXPLANATIONS:
        pts = [{"x": r[name], "y": r["loss_slope"], "grp": int(r["grp"]),
                "name": f"{r['attribute']}/g{r['grp']}" + (" (null)" if is_null_partition(r["attribute"]) else "")}
               for r in rows if _finite(r.get(name)) and _finite(r["loss_slope"])]
        label = correlation_label(corrs.get(name), what="the explanation or the slope")
        panels.append((EXPLANATION_NAMES[name], label, pts))
        blank = dict.fromkeys(("r", "r2", "p_value", "spearman_rho", "spearman_p", "r_ci_low", "r_ci_high"))
        unit = (corrs.get(name) or {}).get("unit", "attribute" if name == "tv" else "group")
        table.append({"name": EXPLANATION_NAMES[name], "label": label, **blank, "n": len(pts),
                      **corrs.get(name, {}), "unit": unit})
    alt = ("Four scatter plots of each group's loss slope against TV, the group's pre-training share, the pre-trained "
           "balanced accuracy and the class prevalence: " + "; ".join(f"{x}: {t}" for x, t, _ in panels) + ".")
    return {"svg": figures.explanations_figure(panels, alt), "table": table,
            "caption": "Per-group loss slope against latent separation and the three conventional explanations "
                       "(under-representation, initial accuracy, class imbalance), one point per group (attribute/g0 "
                       "or /g1; null partitions marked '(null)'). TV is one number per attribute, so its statistics "
                       "pair it with the attribute's paired loss slope (n = attributes, the null partitions as one); "
                       "the group-level explanations use n = groups, of the null partitions only 'random'. Each "
                       "panel's title gives Pearson r and r²; p-values are exact permutation tests, and below 5 "
                       "points none is given."}


# ---------------------------------------------------------------- 6. the bound

def _bound_status(row: dict) -> str:
    status = row.get("status") or ("violated" if row["violated"] else "holds")
    if row["violated"]:
        return status.upper()
    return f"{status}; vacuous (> 1)" if row["vacuous"] else status


def _section_bound(data: dict, rank: dict[str, int]) -> dict:
    rows = data["bounds"]
    extremes = []
    for a in _order((r["attribute"] for r in rows), rank):
        mine = [r for r in rows if r["attribute"] == a]
        lo, hi = min(r["alpha_a"] for r in mine), max(r["alpha_b"] for r in mine)
        extremes += [r for r in mine if r["alpha_a"] == lo and r["alpha_b"] == hi]
    violated = [r for r in rows if r["violated"] and r not in extremes][:MAX_VIOLATIONS_SHOWN]
    paper = {r["attribute"]: r["paper_quantity"] for r in rows if _finite(r["paper_quantity"])}
    names = _order(paper, rank)
    alt = ("Bars of 2·TV + Δ balanced accuracy per attribute against the notebooks' reference line at 1: "
           + ", ".join(f"{a} {fmt_num(paper[a])}" for a in names) + ".")
    return {
        "pairs": [{**r, "status": _bound_status(r)} for r in extremes + violated], "n": len(rows),
        "n_vacuous": sum(bool(r["vacuous"]) for r in rows),
        "n_violated": sum(bool(r["violated"]) for r in rows),
        "n_noise": sum(1 for r in rows if r.get("status") == "within noise of the bound"),
        "paper": [{"attribute": a, "value": paper[a], "above": paper[a] > 1} for a in names],
        "paper_svg": figures.paper_quantity_figure(names, [paper[a] for a in names], alt) if names else None,
        "paper_alt": alt, "mode": data["experiment"].get("mode"),
    }


def _bound_sentence(bound: dict) -> str:
    n, vac, vio = bound["n"], bound["n_vacuous"], bound["n_violated"]
    law = "|Acc_a′ − Acc_a″| ≤ 4ε + |Acc′ − Acc″|"
    if n == 0:
        return "The bound was not checked: no pair of allocations has both accuracies and a TV estimate."
    noise = bound.get("n_noise", 0)
    within = f"; {noise} exceed it by less than their seed-level noise" if noise else ""
    if vio:
        return (f"The bound {law} is VIOLATED beyond seed-level noise in {vio} of {n} checked pairs of allocations "
                f"({vac} vacuous{within}); see §6.")
    if noise:
        return (f"The bound {law} holds in {n - noise} of {n} checked pairs ({vac} vacuous, i.e. above 1){within}, "
                f"so none is violated.")
    return f"The bound {law} holds in all {n} checked pairs of allocations ({vac} of them vacuous, i.e. above 1)."


# ---------------------------------------------------------------- 7. cross-attribute matrix

def _section_cross(data: dict, rank: dict[str, int]) -> list[dict]:
    out = []
    for metric in (LOSS, BAL_ACC):
        rows = [r for r in data["cross_slopes"] if r["metric"] == metric]
        if not rows:
            continue
        cells = _index(rows, "alloc_attribute", "attribute", "grp")
        evaluated = _order((r["attribute"] for r in rows if r["attribute"] != OVERALL), rank)
        columns = [(a, g) for a in evaluated for g in (0, 1)] + [(OVERALL, -1)]
        columns = [c for c in columns if any(k[1:] == c for k in cells)]
        scale = max((abs(r["slope"]) for r in rows if _finite(r["slope"])), default=0.0)
        table = []
        for alloc in _order((r["alloc_attribute"] for r in rows), rank):
            row = []
            for attr, grp in columns:
                c = cells.get((alloc, attr, grp))
                row.append({"text": DASH, "bold": False, "style": "", "title": ""} if c is None else {
                    "text": fmt_signed(0.1 * c["slope"]), "bold": _excludes_zero(c),
                    "style": figures.shade(c["slope"], scale),
                    "title": f"per +10% α; 95% CI (seed t + paired test bootstrap) "
                             f"{fmt_ci(0.1 * c['ci_low'], 0.1 * c['ci_high'])}, p = {fmt_p(c['p_value'])}, "
                             f"{c['n']} runs, {c.get('n_seeds', '?')} seeds"})
            table.append({"alloc": alloc, "cells": row})
        out.append({"metric": metric, "metric_name": METRIC_NAMES[metric], "rows": table,
                    "columns": [OVERALL if a == OVERALL else f"{a} g{g}" for a, g in columns]})
    return out


def _null_cross(data: dict, metric: str) -> float:
    """The largest |cross slope| that allocating on a null partition produces: what noise alone moves."""
    null = [abs(c["slope"]) for c in data["cross_slopes"] if c["metric"] == metric and is_null_partition(c["alloc_attribute"])
            and c["attribute"] != OVERALL and _finite(c["slope"])]
    return max(null, default=0.0)


def _cross_warnings(data: dict) -> list[str]:
    """The largest side effects: allocating on A moves a group of another real attribute B, with a CI excluding 0
    and a slope larger than any that allocating on a null partition produces (the group-level intervals do not
    cover the pool partition; the null partitions do)."""
    out = []
    for metric in (LOSS, BAL_ACC):
        floor = _null_cross(data, metric)
        hits = [c for c in data["cross_slopes"] if c["metric"] == metric and c["attribute"] != c["alloc_attribute"]
                and c["attribute"] != OVERALL and not is_null_partition(c["attribute"])
                and not is_null_partition(c["alloc_attribute"]) and _finite(c["slope"]) and _excludes_zero(c)
                and abs(c["slope"]) > floor]
        for c in sorted(hits, key=lambda c: -abs(c["slope"]))[:CROSS_WARNINGS_PER_METRIC]:
            what = f"group {c['grp']} of {c['attribute']}'s {METRIC_NAMES[metric]}"
            out.append(f"Allocating on {c['alloc_attribute']} also moves {_per10(c, what)}.")
    return out


# ---------------------------------------------------------------- 1. summary; 8. provenance

def _recommendation(attribute: str, matters: bool, data: dict) -> str | None:
    if is_null_partition(attribute):
        return None
    if not matters:
        return "Its allocation curves are flat within noise: no allocation is preferred."
    best = _index([b for b in data["best_alpha"] if b["attribute"] == attribute and b["metric"] == BAL_ACC],
                  "criterion")
    parts = []
    for crit, goal in (("worst_group", "the worst group's balanced accuracy"),
                       ("mean", "the mean of the two groups' balanced accuracy")):
        b = best.get((crit,))
        if b is None or not _finite(b["alpha"]):
            continue
        has_ci = _finite(b["ci_low"]) and _finite(b["ci_high"])
        per_seed = str(b.get("interval", "")).startswith("per-seed")
        kind = b.get("interval") or "95% CI"
        ci = (f"{kind}: {fmt_num(b['ci_low'], 2)}–{fmt_num(b['ci_high'], 2)}" if per_seed and has_ci
              else f"95% CI {fmt_num(b['ci_low'], 2)}–{fmt_num(b['ci_high'], 2)}" if has_ci
              else "no interval: one seed" if b.get("n_seeds", 1) < 2
              else "no interval: one seed's runs are too few to fit alone")
        if has_ci and b["ci_high"] - b["ci_low"] >= FLAT_CI_WIDTH:
            parts.append(f"{goal} is nearly flat in α ({ci} for its best α), so it prefers no allocation")
        else:
            parts.append(f"to maximise {goal}, allocate α ≈ {fmt_num(b['alpha'], 2)} ({ci}) of the fine-tuning set "
                         f"to group 1 of {attribute}")
    if not parts:
        return "No best allocation could be read off the fitted curves (too few α values or seeds)."
    return "Recommendation: " + "; ".join(parts) + "."


def _null_group_note(data: dict) -> str | None:
    """How many of the null partitions' group-slope intervals exclude 0, and why that does not change a verdict."""
    rows = [r for r in data["slopes"] if is_null_partition(r["attribute"]) and r["metric"] in (LOSS, BAL_ACC)
            and _finite(r.get("ci_low"))]
    if not rows:
        return None
    off = [r for r in rows if _excludes_zero(r)]
    if not off:
        return (f"All {len(rows)} group-slope intervals of the null partitions (loss and balanced accuracy) include "
                f"0.")
    names = ", ".join(sorted({f"{r['attribute']} g{r['grp']} {SHORT_METRIC_NAMES[r['metric']]}" for r in off}))
    return (f"{len(off)} of the null partitions' {len(rows)} group-slope intervals (loss and balanced accuracy) "
            f"exclude 0 ({names}). A group slope of a random grouping is conditional on its pool partition: "
            f"{POOL_CAVEAT}. That shared movement of the head cancels in the paired attribute slope, which is what "
            f"the verdicts use.")


def _section_summary(data: dict, rank: dict[str, int], scatter: dict | None, bound: dict) -> dict:
    verdicts = sorted(data["verdicts"], key=lambda v: (rank.get(v["attribute"], len(rank)), v["attribute"]))
    return {
        "n_attributes": len(rank), "n_matter": sum(1 for v in verdicts if v["matters"]),
        "trial_counts": ", ".join(f"{t['count']} {t['status']}" for t in data["trials"]) or "no trials recorded",
        "verdicts": [{**v, "null": is_null_partition(v["attribute"]),
                      "advice": _recommendation(v["attribute"], bool(v["matters"]), data)} for v in verdicts],
        "warnings": _cross_warnings(data), "bound": _bound_sentence(bound),
        "correlation": scatter["label"] if scatter else correlation_label(None),
        "n_null": sum(1 for v in verdicts if is_null_partition(v["attribute"])),
        "null_groups": _null_group_note(data),
        "pool_caveat": POOL_CAVEAT,
    }


def _section_header(data: dict) -> dict:
    exp = data["experiment"]
    return {"name": exp.get("name", "unnamed"), "description": exp.get("description", ""),
            "created_at": exp.get("created_at") or DASH, "pooled": list(exp.get("pooled") or [])}


def _section_provenance(data: dict) -> dict:
    exp = data["experiment"]
    return {
        "git_commit": exp.get("git_commit") or DASH, "spec_path": exp.get("spec_path") or DASH,
        "spec_toml": exp.get("spec_toml"), "budget": exp.get("budget") or DASH, "mode": exp.get("mode") or DASH,
        "versions": sorted((exp.get("versions") or {}).items()),
        "variant": sorted((exp.get("variant") or {}).items()),
        "finetune_seeds": ", ".join(str(s) for s in sorted({r["seed"] for r in data["curves"]})) or DASH,
        "alphas": ", ".join(fmt_num(a, 2) for a in sorted({r["alpha"] for r in data["curves"]})) or DASH,
        "pretrain": sorted(data["pretrain"], key=lambda r: (str(r.get("experiment", "")), r["pretrain_seed"])),
        "stages": data["stages"], "trials": data["trials"],
        "dropped": ", ".join(f"{n} of {split}" for split, n in (data.get("dropped") or {}).items()),
        "excluded": ", ".join(f"{n} for {attr}" for attr, n in (data.get("excluded") or {}).items()),
    }


# ---------------------------------------------------------------- 8. intervention (pooled reports of regularisers)

def _section_intervention(data: dict) -> dict | None:
    """Regularised vs plain encoders (engine/intervention.py), when the pooled experiments differ in a penalty."""
    variants = data.get("intervention")
    if not variants:
        return None
    summary = intervention.summarise(variants)
    rows = summary["rows"]
    attribute = rows[0]["attribute"]
    controls = sorted({a for r in rows for a in r["controls"]}, key=lambda a: (is_null_partition(a), a))

    def sep_cell(row: dict | None) -> str:
        return DASH if row is None else fmt_pm(row.get("calibrated"), row.get("calibrated_sd"))

    def pm(d: dict | None) -> str:
        return DASH if not d or d.get("mean") is None else fmt_pm(d["mean"], d.get("sd"))

    table = []
    for r in rows:
        slope, best = r.get("slope") or {}, r.get("at_best") or {}
        table.append({
            "label": r["label"], "experiment": r["experiment"], "pareto": r["pareto"],
            "tv": fmt_num((r.get("tv") or {}).get("value")), "calibrated": sep_cell(r.get("tv")),
            "within": fmt_num((r.get("tv") or {}).get("within_sd")),
            "controls": [sep_cell(r["controls"].get(a)) for a in controls],
            "slope": slope, "acc": pm(r.get("acc")), "worst": pm(r.get("worst")),
            "cost": DASH if not _finite(r["cost"]) or not r["active"] else fmt_signed(-r["cost"], 3),
            "best_alpha": DASH if best.get("alpha") is None else fmt_num(best["alpha"], 2),
            "best_acc": pm(best.get("acc")), "best_worst": pm(best.get("worst")),
        })
    points = [{"label": r["label"], "acc": r["acc_mean"], "acc_sd": (r.get("acc") or {}).get("sd") or 0.0,
               "abs_slope": r["abs_slope"],
               "half_ci": ((r["slope"]["ci_high"] - r["slope"]["ci_low"]) / 2
                           if r.get("slope") and _finite(r["slope"].get("ci_low")) else 0.0),
               "worst": (r.get("worst") or {}).get("mean"), "worst_sd": (r.get("worst") or {}).get("sd") or 0.0,
               "pareto": r["pareto"]}
              for r in rows if _finite(r["acc_mean"]) and _finite(r["abs_slope"])
              and (r.get("worst") or {}).get("mean") is not None]
    alt = (f"Two scatter plots, one point per regulariser setting: overall accuracy of the pre-trained model against "
           f"the absolute loss slope of {attribute}, and against its worst group's balanced accuracy. "
           + summary["sentence"])
    svg = figures.pareto_figure(points, attribute, alt) if points else None
    return {"attribute": attribute, "controls": controls, "rows": table, "sentence": summary["sentence"],
            "beats": summary["beats"], "svg": svg, "tolerance": intervention.COST_TOLERANCE}


def _section_recommendations(data: dict) -> list[dict]:
    """`alloclab recommend` results stored for this experiment (engine/recommend.py), one row each."""
    rows = []
    for r in data.get("recommendations") or []:
        alts = json.loads(r["alternatives_json"])
        rows.append({
            "attribute": r["attribute"], "metric": METRIC_NAMES.get(r["metric"], r["metric"]),
            "objective": "worse group" if r["objective"] == "worst_group" else "mean of the groups",
            "budget": r["budget"], "k": r["k"], "alpha": fmt_num(r["alpha"], 3), "n": f"{r['n_g0']} + {r['n_g1']}",
            "pred": [f"{fmt_num(r[f'pred_g{g}'], 4)} {fmt_ci(r[f'pred_g{g}_low'], r[f'pred_g{g}_high'])}"
                     for g in (0, 1)],
            "bounds": ", ".join(f"group {g} ≥ {v:g}" for g, v in json.loads(r["min_share_json"]).items()) or DASH,
            "binding": r["binding"], "interval": r["interval"], "extrapolation": r["extrapolation"],
            "alternatives": "; ".join(f"{a['name']} (share {a['alpha']:.3f}): {fmt_signed(a['loses'], 4)}"
                                      for a in alts),
        })
    return rows


def _section_joint_recommendations(data: dict) -> list[dict]:
    """`alloclab recommend` on K-group attributes: one entry per stored joint allocation, its groups in order."""
    calls: dict[tuple, list[dict]] = {}
    for r in data.get("joint_recommendations") or []:
        calls.setdefault((r["attribute"], r["metric"], r["objective"], r["budget"], r["min_share_json"]), []).append(r)
    out = []
    for (attr, metric, objective, budget, bounds), rows in calls.items():
        rows = sorted(rows, key=lambda r: r["position"])
        first = rows[0]
        alts = json.loads(first["alternatives_json"])
        out.append({
            "attribute": attr, "metric": METRIC_NAMES.get(metric, metric),
            "objective": "worse group" if objective == "worst_group" else "mean of the groups",
            "budget": budget, "k": first["k"], "binding": first["binding"], "interval": first["interval"],
            "bounds": ", ".join(f"{g} ≥ {v:g}" for g, v in json.loads(bounds).items()) or DASH,
            "groups": [{"label": r["group_label"], "share": fmt_num(r["share"], 3), "n": r["n"],
                        "pred": f"{fmt_num(r['pred'], 4)} {fmt_ci(r['pred_low'], r['pred_high'])}"} for r in rows],
            "alternatives": "; ".join(f"{a['name']} ({' / '.join(f'{v:.3f}' for v in a['shares'])}): "
                                      f"{fmt_signed(a['loses'], 4)}" for a in alts),
            "extrapolation": first["extrapolation"], "assumption": first["assumption"],
            "check": (f"Checked on the other groups' sweeps ({first['check_n']} points): RMSE "
                      f"{fmt_num(first['check_rmse'], 4)}, mean error {fmt_signed(first['check_bias'], 4)}, against "
                      f"{fmt_num(first['fit_rmse'], 4)} on their own sweeps.") if first.get("check_n") else "",
            "warning": recommend.assumption_warning(first.get("check_rmse"), first.get("fit_rmse"),
                                                    first.get("check_n") or 0),
        })
    return out


def _section_group_matrices(data: dict) -> list[dict]:
    """Per attribute with K named groups or an intersection: the calibrated group × group TV as a heatmap."""
    out = []
    rows = data.get("group_separations") or []
    for attr in sorted({r["attribute"] for r in rows}):
        mine = [r for r in rows if r["attribute"] == attr]
        labels = list(dict.fromkeys([r["group_a"] for r in mine] + [r["group_b"] for r in mine]))
        matrix = np.full((len(labels), len(labels)), np.nan)
        for r in mine:
            i, j = labels.index(r["group_a"]), labels.index(r["group_b"])
            matrix[i, j] = matrix[j, i] = r["calibrated"] if r["calibrated"] is not None else np.nan
        alt = f"{attr}: calibrated TV between each pair of its {len(labels)} groups"
        out.append({"attribute": attr, "labels": labels, "names": ", ".join(f"{attr}={g}" for g in labels),
                    "figure": figures.heatmap_figure(attr, labels, matrix, f"{attr}: calibrated TV", alt),
                    "alt": alt})
    return out


# ---------------------------------------------------------------- protocol 'expand': collecting more data

def _section_expand(data: dict, rank: dict[str, int]) -> list[dict] | None:
    """Per attribute (most separated first): its verdict, and per grown group a figure of both groups' loss and
    balanced accuracy against the grown group's count, and the slopes per 1000 items with their intervals."""
    if data.get("protocol") != "expand":
        return None
    from engine.figures import expansion_figure, expansion_fit_line

    slopes, fitted, points = data["expansion_slopes"], data["expansion_fits"], data["expansion_points"]
    verdict = {v["attribute"]: v for v in data["verdicts"]}
    out = []
    for attr in _order({r["attribute"] for r in slopes}, rank):
        blocks = []
        for grown in sorted({r["grown"] for r in slopes if r["attribute"] == attr}):
            panels = []
            for metric in (LOSS, BAL_ACC):
                pts = {}
                for grp in (0, 1):
                    rows = [r for r in points if r["attribute"] == attr and r["grown"] == grown and r["grp"] == grp
                            and r["metric"] == metric and r["value"] is not None]
                    pts[grp] = np.array([[r["added"] for r in rows], [r["value"] for r in rows]], dtype=float)
                fit = next((f for f in fitted if f["attribute"] == attr and f["grown"] == grown
                            and f["metric"] == metric and f["preferred"]), None)
                line = expansion_fit_line(fit, grown, pts[grown][0]) if fit else None
                panels.append((METRIC_NAMES[metric], pts, line))
            rows = [r for r in slopes if r["attribute"] == attr and r["grown"] == grown and r["metric"] in (LOSS, BAL_ACC)]
            fits_here = [f for f in fitted if f["attribute"] == attr and f["grown"] == grown and f["preferred"]
                         and f["metric"] in (LOSS, BAL_ACC)]
            alt = (f"{attr}: loss and balanced accuracy of both groups as group {grown} grows from "
                   f"{rows[0]['n_min'] if rows else '?'} to {rows[0]['n_max'] if rows else '?'} items")
            blocks.append({"grown": grown, "figure": expansion_figure(attr, grown, panels, alt), "alt": alt,
                           "rows": [{**r, "what": EXPAND_ROLES[r["role"]].format(g=grown, o=1 - grown),
                                     "metric_name": SHORT_METRIC_NAMES.get(r["metric"], r["metric"])}
                                    for r in sorted(rows, key=lambda r: (r["metric"], ROLE_ORDER[r["role"]]))],
                           "fits": fits_here})
        v = verdict.get(attr, {})
        out.append({"attribute": attr, "null": is_null_partition(attr), "matters": bool(v.get("matters")),
                    "text": v.get("text", ""), "blocks": blocks})
    return out


EXPAND_ROLES = {"grown": "group {g} (grown)", "other": "group {o} (fixed)", "overall": "whole test set",
                "difference": "group {g} − group {o} (paired)"}
ROLE_ORDER = {"grown": 0, "other": 1, "difference": 2, "overall": 3}


def build_context(data: dict) -> dict:
    """Everything the template shows, computed here (the template does no arithmetic)."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"render_report: data is missing {missing}; expected keys {list(REQUIRED_KEYS)}")
    tv_table = _section_tv_table(data)
    rank = _rank(tv_table)
    scatter = _section_scatter(data)
    bound = _section_bound(data, rank)
    return {
        "header": _section_header(data), "generated_at": data["generated_at"],
        "summary": _section_summary(data, rank, scatter, bound), "tv_table": tv_table,
        "curves": _section_curves(data, rank), "sampler_note": _sampler_note(data), "scatter": scatter,
        "correlations": sorted(data["correlations"], key=lambda c: (c["distance"], c.get("x", "raw") != "calibrated",
                                                                    c["y"] != "slope", c["metric"])),
        "too_few": next((TOO_FEW.format(n=c["n"]) for c in data["correlations"] if not c.get("testable", True)), None),
        "explanations": _section_explanations(data), "bound": bound, "cross": _section_cross(data, rank),
        "metric_names": METRIC_NAMES, "provenance": _section_provenance(data),
        "intervention": _section_intervention(data), "recommendations": _section_recommendations(data),
        "joint_recommendations": _section_joint_recommendations(data),
        "expand": _section_expand(data, rank), "base": data.get("base"),
        "group_matrices": _section_group_matrices(data),
    }


def _environment(templates_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    return env


def render_report(data: dict, out_path: Path, templates_dir: Path | None = None) -> Path:
    """Render ``data`` (keys ``REQUIRED_KEYS``) to a self-contained HTML file at ``out_path`` and return the path."""
    context = build_context(data)
    html_text = _environment(templates_dir or DEFAULT_TEMPLATES).get_template(TEMPLATE).render(**context)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    try:
        tmp.write_text(html_text, encoding="utf-8")
        os.replace(tmp, out_path)  # never a half-written report under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
