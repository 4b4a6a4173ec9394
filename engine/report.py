"""Render a finished analysis as one self-contained HTML report (no scripts, no network, figures as inline SVG).

``render_report(data, out_path)`` takes the analysis tables as lists of row dicts (see ``REQUIRED_KEYS``); this module
prepares every number and figure in Python and ``reports/templates/report.html.j2`` only lays them out (Jinja2,
``autoescape=True``, ``StrictUndefined``; formatting filters are registered in ``FILTERS``).

To add a section: compute its rows or figure in a ``_section_*`` function here, add it to the context in
``build_context``, and lay it out in the template (or a partial beside it). Figures go through ``_svg`` so they
get alt text and lose the XML prolog; only that SVG is marked safe.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup

from engine.analysis import BAL_ACC, LOSS, TV_DISTANCE, own_share

__all__ = ["render_report", "build_context", "REQUIRED_KEYS", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = Path(__file__).resolve().parent.parent / "reports" / "templates"
TEMPLATE = "report.html.j2"
REQUIRED_KEYS = ("experiment", "separations", "curves", "slopes", "attribute_slopes", "correlations", "verdicts",
                 "trials", "stages", "pretrain", "generated_at")
ALPHA_LABEL = "α = share of group 1 in the fine-tuning set"
METRIC_NAMES = {BAL_ACC: "balanced accuracy", LOSS: "test loss (cross-entropy)", "acc": "accuracy", "auc": "AUC"}
GROUP_COLOURS = ("#1b6ca8", "#d1495b")  # group 0, group 1; distinguishable in greyscale print by marker shape too
GROUP_MARKERS = ("o", "s")
DASH = "—"


# ---------------------------------------------------------------- formatting filters (registered in Jinja)

def _finite(x: Any) -> bool:
    return isinstance(x, int | float | np.floating | np.integer) and math.isfinite(float(x))


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


def correlation_label(row: dict | None) -> str:
    """'Pearson r = …, r² = …, p = …, n = …' — r and r² labelled separately (the paper printed r² as "r")."""
    if row is None or not _finite(row["r"]):
        n = 0 if row is None else row["n"]
        if n >= 3:
            return f"no correlation: TV or the slope is constant across attributes (n = {n})"
        return f"not enough attributes for a correlation (n < 3; n = {n})"
    return (f"Pearson r = {fmt_num(row['r'])}, r² = {fmt_num(row['r2'])}, p = {fmt_p(row['p_value'])}, "
            f"n = {row['n']}")


# ---------------------------------------------------------------- figures

def _style(salt: str) -> Any:
    """Local matplotlib settings: text stays text in SVG; ``salt`` makes SVG ids unique per figure yet deterministic."""
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9})


def _svg(fig: Any, label: str) -> Markup:
    """Serialise a matplotlib figure to inline SVG with alt text; strip the prolog, DOCTYPE and metadata."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # call inside _style()
    text = buf.getvalue()
    # The xmlns declarations are dropped too: the HTML parser puts inline <svg> (and xlink:href) in the right
    # namespaces itself, so the report then holds no URL at all.
    text = re.sub(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<metadata>.*?</metadata>|\s+xmlns(?::xlink)?=\"[^\"]*\"", "",
                  text, flags=re.S).strip()
    text = text.replace("<svg ", f'<svg role="img" aria-label="{html.escape(label)}" ', 1)
    return Markup(text)  # our own matplotlib output; matplotlib escapes every text it writes into the SVG


def _figure(size: tuple[float, float], ncols: int = 1) -> tuple[Any, Any]:
    """A pyplot-free figure on the Agg canvas (no global pyplot state, safe in threads and tests)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _curve_panel(ax: Any, rows: list[dict], fits: dict[int, dict], metric: str) -> None:
    alphas_grid = np.linspace(0.0, 1.0, 2)
    for grp in (0, 1):
        pts = [(r["alpha"], r["value"]) for r in rows if r["grp"] == grp and r["metric"] == metric]
        if not pts:
            continue
        col, mk = GROUP_COLOURS[grp], GROUP_MARKERS[grp]
        a, v = np.array(pts, dtype=float).T
        ax.scatter(a, v, s=10, color=col, marker=mk, alpha=0.45, linewidths=0, label=f"group {grp}: runs (seeds)")
        ux = np.unique(a)
        ax.plot(ux, [v[a == x].mean() for x in ux], color=col, lw=1.2, label=f"group {grp}: mean over seeds")
        fit = fits.get(grp)
        if fit and _finite(fit["slope"]):
            y = [fit["intercept"] + fit["slope"] * own_share(x, grp) for x in alphas_grid]
            ax.plot(alphas_grid, y, color=col, lw=1.2, ls="--", label=f"group {grp}: OLS fit")
    ax.set_title(METRIC_NAMES.get(metric, metric))
    ax.set_xlabel(ALPHA_LABEL)
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def _curve_alt(attribute: str, fits: dict[tuple[int, str], dict]) -> str:
    parts = []
    for metric in (BAL_ACC, LOSS):
        for grp in (0, 1):
            fit = fits.get((grp, metric))
            slope = fmt_signed(fit["slope"]) if fit else DASH
            parts.append(f"group {grp} {METRIC_NAMES[metric]} slope {slope} per unit of own share")
    return (f"Allocation curves for {attribute}: balanced accuracy and loss of group 0 and group 1 versus α, "
            f"the share of group 1. " + "; ".join(parts) + ".")


def curve_figure(attribute: str, rows: list[dict], slopes: list[dict]) -> dict:
    """Two panels (balanced accuracy, loss) vs α for both groups of ``attribute``: runs, per-α mean, OLS line."""
    fits = {(s["grp"], s["metric"]): s for s in slopes if s["attribute"] == attribute}
    alt = _curve_alt(attribute, fits)
    with _style(f"curves-{attribute}"):
        fig, axes = _figure((8.0, 3.4), ncols=2)
        for ax, metric in zip(axes, (BAL_ACC, LOSS), strict=True):
            _curve_panel(ax, rows, {g: f for (g, m), f in fits.items() if m == metric}, metric)
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
        fig.suptitle(f"Allocating on {attribute}", fontsize=10)
        svg = _svg(fig, alt)
    caption = (f"Allocating on {attribute}: each point is one fine-tuning run (seed); solid lines join the per-α "
               f"means, dashed lines are OLS fits on each group's own share (α for group 1, 1 − α for group 0).")
    return {"attribute": attribute, "svg": svg, "caption": caption}


def scatter_figure(points: list[dict], corr: dict | None) -> dict:
    """TV vs mean loss slope, one annotated point per attribute, with the least-squares line when n ≥ 3."""
    label = correlation_label(corr)
    with _style("scatter-tv-loss"):
        fig, (ax,) = _figure((6.0, 4.2))
        _draw_scatter(ax, points, corr, label)
        alt = f"Scatter of TV against the loss slope, one point per attribute; {label}."
        svg = _svg(fig, alt)
    caption = (f"Latent separation (TV) against the mean loss slope of the two groups, one point per attribute "
               f"(the random attribute is the null baseline). {label}.")
    return {"svg": svg, "caption": caption, "label": label}


def _draw_scatter(ax: Any, points: list[dict], corr: dict | None, label: str) -> None:
    x = np.array([p["tv"] for p in points], dtype=float)
    y = np.array([p["slope"] for p in points], dtype=float)
    ax.errorbar(x, y, xerr=[p["tv_std"] for p in points], yerr=[p["half_ci"] for p in points], fmt="o",
                color=GROUP_COLOURS[0], ecolor="#999999", capsize=2, ms=5)
    for p in points:
        ax.annotate(p["attribute"], (p["tv"], p["slope"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if corr is not None and _finite(corr["r"]):
        fit = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, np.polyval(fit, xs), color=GROUP_COLOURS[1], lw=1.2, ls="--", label="least-squares line")
        ax.legend(loc="best", fontsize=7, frameon=False)
    ax.axhline(0.0, color="#444444", lw=0.6)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("latent separation TV (pre-trained encoder; mean ± std over seeds)")
    ax.set_ylabel("attribute loss slope (per unit share; ±95% CI)")
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------- sections

def _index(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in rows}


def _section_tv_table(data: dict) -> dict:
    """Rows ranked by TV (descending), with the attribute loss and bal_acc slopes alongside."""
    seps = _index(data["separations"], "attribute", "distance")
    distances = sorted({d for _, d in seps}, key=lambda d: (d != TV_DISTANCE, d))
    slopes = _index(data["attribute_slopes"], "attribute", "metric")
    attributes = {a for a, _ in seps} | {a for a, _ in slopes}
    primary = distances[0] if distances else None

    def rank_key(a: str) -> tuple[bool, float, str]:
        v = seps.get((a, primary), {}).get("value")
        return (not _finite(v), -float(v) if _finite(v) else 0.0, a)

    rows = []
    for a in sorted(attributes, key=rank_key):
        first = next((seps[(a, d)] for d in distances if (a, d) in seps), {})
        rows.append({
            "attribute": a, "dists": [seps.get((a, d), {"value": None, "std": None}) for d in distances],
            "n_seeds": first.get("n_seeds", DASH), "n_g0": first.get("n_g0", DASH), "n_g1": first.get("n_g1", DASH),
            "loss": slopes.get((a, LOSS)), "bal_acc": slopes.get((a, BAL_ACC)),
        })
    return {"distances": distances, "rows": rows}


def _rank(tv_table: dict) -> dict[str, int]:
    return {row["attribute"]: i for i, row in enumerate(tv_table["rows"])}


def _section_curves(data: dict, rank: dict[str, int]) -> list[dict]:
    """One small-multiple figure per allocated attribute, in the TV table's order."""
    by_alloc: dict[str, list[dict]] = defaultdict(list)
    for r in data["curves"]:
        if r["attribute"] == r["alloc_attribute"] and r["grp"] in (0, 1):
            by_alloc[r["alloc_attribute"]].append(r)
    order = sorted(by_alloc, key=lambda a: (rank.get(a, len(rank)), a))
    return [curve_figure(a, by_alloc[a], data["slopes"]) for a in order]


def _section_scatter(data: dict) -> dict | None:
    tv = {r["attribute"]: r for r in data["separations"] if r["distance"] == TV_DISTANCE}
    slopes = {r["attribute"]: r for r in data["attribute_slopes"] if r["metric"] == LOSS}
    points = [
        {"attribute": a, "tv": tv[a]["value"], "tv_std": tv[a]["std"] if _finite(tv[a]["std"]) else 0.0,
         "slope": slopes[a]["slope"], "half_ci": 1.96 * slopes[a]["stderr"] if _finite(slopes[a]["stderr"]) else 0.0}
        for a in sorted(tv) if a in slopes and _finite(tv[a]["value"]) and _finite(slopes[a]["slope"])
    ]
    if not points:
        return None
    corr = next((c for c in data["correlations"]
                 if c["distance"] == TV_DISTANCE and c["metric"] == LOSS and c["y"] == "slope"), None)
    return scatter_figure(points, corr)


def _section_summary(data: dict, tv_table: dict, scatter: dict | None) -> dict:
    rank = _rank(tv_table)  # verdicts in TV order
    verdicts = sorted(data["verdicts"], key=lambda v: (rank.get(v["attribute"], len(rank)), v["attribute"]))
    return {
        "n_attributes": len(tv_table["rows"]),
        "n_matter": sum(1 for v in verdicts if v["matters"]),
        "trial_counts": ", ".join(f"{t['count']} {t['status']}" for t in data["trials"]) or "no trials recorded",
        "verdicts": verdicts,
        "correlation": scatter["label"] if scatter else correlation_label(None),
    }


def _section_provenance(data: dict) -> dict:
    exp = data["experiment"]
    return {
        "git_commit": exp.get("git_commit") or DASH,
        "versions": sorted(exp.get("versions", {}).items()),
        "variant": sorted(exp.get("variant", {}).items()),
        "finetune_seeds": ", ".join(str(s) for s in sorted({r["seed"] for r in data["curves"]})) or DASH,
        "alphas": ", ".join(fmt_num(a, 2) for a in sorted({r["alpha"] for r in data["curves"]})) or DASH,
        "pretrain": sorted(data["pretrain"], key=lambda r: r["pretrain_seed"]),
        "stages": data["stages"], "trials": data["trials"],
    }


def build_context(data: dict) -> dict:
    """Everything the template shows, computed here (the template does no arithmetic)."""
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"render_report: data is missing {missing}; expected keys {list(REQUIRED_KEYS)}")
    tv_table = _section_tv_table(data)
    scatter = _section_scatter(data)
    correlations = sorted(data["correlations"], key=lambda c: (c["distance"], c["y"] != "slope", c["metric"]))
    return {
        "experiment": data["experiment"], "generated_at": data["generated_at"],
        "summary": _section_summary(data, tv_table, scatter), "tv_table": tv_table,
        "curves": _section_curves(data, _rank(tv_table)), "scatter": scatter, "correlations": correlations,
        "metric_names": METRIC_NAMES, "provenance": _section_provenance(data),
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
    out_path.write_text(html_text, encoding="utf-8")
    return out_path
