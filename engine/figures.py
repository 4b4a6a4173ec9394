"""The report's figures: matplotlib drawn off-screen (no pyplot state) and serialised to inline SVG with alt text.

Each ``*_figure`` function takes numbers and already-worded labels (``engine.report`` decides the words, this module
only draws) and returns the SVG as ``Markup``. To add a figure: draw it on ``_figure(...)`` inside ``_style(salt)``
and return ``_svg(fig, alt_text)``; give it a unique, deterministic salt so SVG ids do not clash within one page.
"""

from __future__ import annotations

import html
import io
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from markupsafe import Markup

__all__ = ["Line", "BestAlpha", "fit_params", "preferred_lines", "shade", "curve_figure", "scatter_figure",
           "explanations_figure", "paper_quantity_figure"]

ALPHA_LABEL = "α = share of group 1 in the fine-tuning set"
GROUP_COLOURS = ("#1b6ca8", "#d1495b")  # group 0, group 1; marker shapes tell them apart in greyscale print
GROUP_MARKERS = ("o", "s")
ACCENT = "#2a9d47"  # best-α marker
REFERENCE = "#c0392b"  # the notebooks' "bound = 1" line


@dataclass(frozen=True)
class Line:
    """A fitted curve to draw over α: ``x`` are α values, ``y`` the metric, ``label`` names the model."""

    grp: int
    x: np.ndarray
    y: np.ndarray
    label: str


@dataclass(frozen=True)
class BestAlpha:
    """The recommended α with its CI, drawn as a vertical line and a band on the balanced-accuracy panel."""

    alpha: float
    ci_low: float
    ci_high: float
    label: str


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


def _figure(size: tuple[float, float], ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A pyplot-free figure on the Agg canvas (no global pyplot state, safe in threads and tests)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _legend(fig: Any, axes: Any) -> None:
    """One legend below the figure, each label once, from all panels."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncol=3, frameon=False,
                   fontsize=7.5)


def shade(value: float, scale: float) -> str:
    """A table cell's CSS background: blue for negative, red for positive, more opaque with √(|value| / scale)."""
    if value is None or not np.isfinite(value) or scale <= 0:
        return ""
    alpha = 0.08 + 0.6 * np.sqrt(min(abs(value) / scale, 1.0))
    rgb = "27, 108, 168" if value < 0 else "209, 73, 91"
    return f"background-color: rgba({rgb}, {alpha:.2f})"


# ---------------------------------------------------------------- fitted curves (engine.fits rows -> lines over α)

def fit_params(fit: dict) -> list[float] | None:
    """A ``fits`` row's parameters: ``params_json`` as stored in DuckDB, or ``params`` as engine.fits returns them."""
    params = json.loads(fit["params_json"]) if "params_json" in fit else fit.get("params")
    return None if params is None else [float(p) for p in params]


def _fit_line(fit: dict, grp: int, shares: np.ndarray, budget: int | None) -> Line | None:
    """The fitted curve over the observed own-share range where n = share·K ≥ 1 (what the fit saw; no extrapolation:
    a power law shoots up towards n = 1). None for a power law when K is unknown."""
    params = fit_params(fit)
    seen = shares[shares * budget >= 1] if budget else shares[shares > 0]
    if params is None or seen.size == 0 or fit["model"] not in ("linear", "power"):
        return None
    if fit["model"] == "power" and not budget:
        return None
    share = np.linspace(seen.min(), seen.max(), 120)
    if fit["model"] == "linear":
        y, label = params[0] + params[1] * share, "fitted line"
    else:
        y, label = params[0] + params[1] * np.power(share * budget, -params[2]), "fitted power law"
    return Line(grp, share if grp == 1 else 1.0 - share, y, label)


def preferred_lines(fits: Sequence[dict], slopes: Sequence[dict], attribute: str, metric: str,
                    points: dict[int, np.ndarray], budget: int | None) -> list[Line]:
    """Per group: the preferred fit; the other model when that one cannot be drawn (a power law without K); else
    the ``slopes`` table's OLS line over all of α."""
    lines = []
    for grp, pts in points.items():
        shares = (pts[0] if grp == 1 else 1.0 - pts[0]) if pts.size else np.zeros(0)
        mine = sorted((f for f in fits if f["attribute"] == attribute and f["metric"] == metric and f["grp"] == grp),
                      key=lambda f: not f["preferred"])
        line = next((ln for f in mine if (ln := _fit_line(f, grp, shares, budget)) is not None), None)
        ols = next((s for s in slopes if s["attribute"] == attribute and s["metric"] == metric and s["grp"] == grp
                    and s["slope"] is not None and np.isfinite(s["slope"])), None)
        if line is None and ols is not None:
            share = np.array([0.0, 1.0])
            line = Line(grp, share if grp == 1 else 1.0 - share, ols["intercept"] + ols["slope"] * share, "OLS line")
        if line is not None:
            lines.append(line)
    return lines


# ---------------------------------------------------------------- allocation curves

def _curve_panel(ax: Any, points: dict[int, np.ndarray], lines: Sequence[Line], title: str,
                 best: BestAlpha | None, band: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None) -> None:
    """Runs (faint), per-α means (thin solid), the preferred fit (dashed) and the null band (grey) for each group."""
    for grp, (x, lo, hi) in (band or {}).items():
        ax.fill_between(x, lo, hi, color=GROUP_COLOURS[grp], alpha=0.10, lw=0,
                        label="null band: slopes the null partitions reach")
    for grp, pts in points.items():
        if pts.size == 0:
            continue
        col, mk = GROUP_COLOURS[grp], GROUP_MARKERS[grp]
        a, v = pts
        ax.scatter(a, v, s=10, color=col, marker=mk, alpha=0.4, linewidths=0, label=f"group {grp}: runs (seeds)")
        ux = np.unique(a)
        ax.plot(ux, [v[a == x].mean() for x in ux], color=col, lw=0.9, marker=mk, ms=3,
                label=f"group {grp}: mean over seeds")
    for line in lines:
        ax.plot(line.x, line.y, color=GROUP_COLOURS[line.grp], lw=1.6, ls="--", label=f"group {line.grp}: {line.label}")
    if best is not None:
        if best.ci_high > best.ci_low:
            ax.axvspan(best.ci_low, best.ci_high, color=ACCENT, alpha=0.15, lw=0)
        ax.axvline(best.alpha, color=ACCENT, lw=1.4, label=best.label)
    ax.set_title(title)
    ax.set_xlabel(ALPHA_LABEL)
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def curve_figure(attribute: str, panels: Sequence[tuple[str, dict[int, np.ndarray], Sequence[Line]]],
                 best: BestAlpha | None, alt: str,
                 bands: Sequence[dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None] | None = None) -> Markup:
    """Small multiples (one panel per metric) of the allocation curves of ``attribute``'s two groups.

    ``panels``: (title, {grp: 2×n array of (α, value)}, fitted lines); ``best`` is drawn on the first panel;
    ``bands``: per panel, {grp: (α, low, high)} the null band drawn behind the group's curve.
    """
    with _style(f"curves-{attribute}"):
        fig, axes = _figure((9.6, 4.0), ncols=len(panels))
        for i, (ax, (title, points, lines)) in enumerate(zip(axes, panels, strict=True)):
            _curve_panel(ax, points, lines, title, best if i == 0 else None, bands[i] if bands else None)
        _legend(fig, axes)
        return _svg(fig, alt)


# ---------------------------------------------------------------- scatter plots

def _scatter(ax: Any, x: np.ndarray, y: np.ndarray, names: Sequence[str], colours: Sequence[str],
             xerr: Sequence[float] | None = None, yerr: Sequence[float] | None = None, line: bool = False) -> None:
    if xerr is not None or yerr is not None:
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#999999", capsize=2, lw=0.8)
    ax.scatter(x, y, c=list(colours), s=28, zorder=3)
    for xi, yi, name in zip(x, y, names, strict=True):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if line and len(x) >= 3 and np.ptp(x) > 0:
        fit = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, np.polyval(fit, xs), color="#555555", lw=1.0, ls="--", label="least-squares line")
        ax.legend(loc="best", fontsize=7, frameon=False)
    ax.axhline(0.0, color="#444444", lw=0.6)
    ax.grid(alpha=0.3)


def scatter_figure(points: Sequence[dict], title: str, alt: str, draw_line: bool,
                   xlabel: str = "latent separation TV (pre-trained encoder; mean ± SD over seeds)") -> Markup:
    """TV vs attribute loss slope, one annotated point per attribute (keys tv, tv_std, slope, half_ci, attribute)."""
    with _style("scatter-tv-loss"):
        fig, (ax,) = _figure((6.0, 4.2))
        x = np.array([p["tv"] for p in points], dtype=float)
        y = np.array([p["slope"] for p in points], dtype=float)
        _scatter(ax, x, y, [p["attribute"] for p in points], [GROUP_COLOURS[0]] * len(points),
                 xerr=[p["tv_std"] for p in points], yerr=[p["half_ci"] for p in points], line=draw_line)
        ax.set_title(textwrap.fill(title, 80), fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("paired attribute loss slope (per unit share; ± 95% interval)")
        return _svg(fig, alt)


def explanations_figure(panels: Sequence[tuple[str, str, Sequence[dict]]], alt: str) -> Markup:
    """2×2 scatter panels of the per-group loss slope against each explanation.

    ``panels``: (x-axis label, title with the correlation statistics, points with keys x, y, name, grp).
    """
    with _style("explanations"):
        fig, axes = _figure((9.6, 8.4), ncols=2, nrows=2)
        for ax, (xlabel, title, pts) in zip(axes, panels, strict=False):
            x = np.array([p["x"] for p in pts], dtype=float)
            y = np.array([p["y"] for p in pts], dtype=float)
            _scatter(ax, x, y, [p["name"] for p in pts], [GROUP_COLOURS[p["grp"] % 2] for p in pts], line=True)
            ax.set_title(textwrap.fill(title, 58), fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("group loss slope (per unit own share)")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        return _svg(fig, alt)


def paper_quantity_figure(names: Sequence[str], values: Sequence[float], alt: str) -> Markup:
    """Horizontal bars of the notebooks' 2·TV + Δ balanced accuracy per attribute, with their 'bound = 1' line."""
    with _style("paper-bound"):
        fig, (ax,) = _figure((6.0, 0.5 + 0.35 * max(len(names), 1)))
        ax.barh(list(names), list(values), color=GROUP_COLOURS[0], height=0.6)
        ax.axvline(1.0, color=REFERENCE, lw=1.2, label="bound = 1 (the notebooks' reference line)")
        ax.invert_yaxis()
        ax.set_xlabel("2·TV + Δ balanced accuracy (full-shot − zero-shot, mean of the two groups)")
        ax.set_xlim(min(0.0, *values) - 0.02, max(1.1, *values) + 0.05)
        ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        return _svg(fig, alt)


# ---------------------------------------------------------------- intervention (regularisers)

def pareto_figure(points: Sequence[dict], attribute: str, alt: str) -> Markup:
    """Two panels, one point per variant (keys label, acc, acc_sd, abs_slope, half_ci, worst, worst_sd, pareto):
    overall accuracy of the pre-trained model against |loss slope| of ``attribute`` (the Pareto front joined) and
    against its worst group's balanced accuracy."""
    with _style("pareto-" + attribute):
        fig, (ax1, ax2) = _figure((9.0, 3.8), ncols=2)
        x = np.array([p["acc"] for p in points], dtype=float)
        xerr = [p["acc_sd"] for p in points]
        names = [p["label"] for p in points]
        colours = [GROUP_COLOURS[1] if p["pareto"] else GROUP_COLOURS[0] for p in points]
        y1 = np.array([p["abs_slope"] for p in points], dtype=float)
        _scatter(ax1, x, y1, names, colours, xerr=xerr, yerr=[p["half_ci"] for p in points])
        front = sorted((xi, yi) for xi, yi, p in zip(x, y1, points, strict=True) if p["pareto"])
        if len(front) >= 2:
            ax1.plot([f[0] for f in front], [f[1] for f in front], color=GROUP_COLOURS[1], lw=1.0, ls="--",
                     label="Pareto front")
            ax1.legend(loc="best", fontsize=7, frameon=False)
        ax1.set_xlabel("overall accuracy, pre-trained model (± SD over seeds)")
        ax1.set_ylabel(f"|loss slope| of {attribute} (± 95% interval half-width)")
        ax1.set_title("cost vs allocation sensitivity (lower right is better)", fontsize=9)
        y2 = np.array([p["worst"] for p in points], dtype=float)
        ax2.errorbar(x, y2, xerr=xerr, yerr=[p["worst_sd"] for p in points], fmt="none", ecolor="#999999",
                     capsize=2, lw=0.8)
        ax2.scatter(x, y2, c=colours, s=28, zorder=3)
        for xi, yi, name in zip(x, y2, names, strict=True):
            ax2.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax2.grid(alpha=0.3)
        ax2.set_xlabel("overall accuracy, pre-trained model (± SD over seeds)")
        ax2.set_ylabel(f"worst-group balanced accuracy ({attribute})")
        ax2.set_title("cost vs the worst group (upper right is better)", fontsize=9)
        return _svg(fig, alt)


# ---------------------------------------------------------------- protocol 'expand': metric against the added count

def expansion_figure(attribute: str, grown: int,
                     panels: Sequence[tuple[str, dict[int, np.ndarray], Line | None]], alt: str) -> Markup:
    """One panel per metric: both groups' metric against the grown group's count (the other group's count fixed),
    runs faint, the mean over seeds solid, the grown group's preferred fit dashed. ``panels``: (title,
    {grp: 2×n array of (count, value)}, fitted line of the grown group or None)."""
    with _style(f"expand-{attribute}-{grown}"):
        fig, axes = _figure((9.6, 3.6), ncols=len(panels))
        for ax, (title, points, line) in zip(axes, panels, strict=True):
            for grp, pts in sorted(points.items()):
                if pts.size == 0:
                    continue
                col, mk = GROUP_COLOURS[grp], GROUP_MARKERS[grp]
                role = "grown" if grp == grown else "fixed"
                n, v = pts
                ax.scatter(n, v, s=10, color=col, marker=mk, alpha=0.4, linewidths=0,
                           label=f"group {grp} ({role}): runs (seeds)")
                un = np.unique(n)
                ax.plot(un, [v[n == x].mean() for x in un], color=col, lw=0.9, marker=mk, ms=3,
                        label=f"group {grp} ({role}): mean over seeds")
            if line is not None:
                ax.plot(line.x, line.y, color=GROUP_COLOURS[line.grp], lw=1.6, ls="--",
                        label=f"group {line.grp}: {line.label}")
            ax.set_title(title)
            ax.set_xlabel(f"items of group {grown} in the fine-tuning set")
            ax.grid(alpha=0.3)
        _legend(fig, axes)
        return _svg(fig, alt)


def expansion_fit_line(fit: dict, grown: int, counts: np.ndarray) -> Line | None:
    """An ``expansion_fits`` row as a line over the counts run (no extrapolation)."""
    params = fit_params(fit)
    if not params or counts.size == 0:
        return None
    n = np.linspace(max(counts.min(), 1.0), counts.max(), 120)
    if fit["model"] == "linear":  # fits.linear is in count / n_max (the fit's scale)
        y, label = params[0] + params[1] * n / max(int(fit["n_max"]), 1), "fitted line"
    else:
        y, label = params[0] + params[1] * np.power(n, -params[2]), "fitted power law"
    return Line(grown, n, y, label)


# ---------------------------------------------------------------- K-group attributes: the group × group matrix

def heatmap_figure(attribute: str, labels: Sequence[str], matrix: np.ndarray, title: str, alt: str) -> Markup:
    """A symmetric group × group matrix (NaN on the diagonal) with each cell's value written in it."""
    with _style(f"heatmap-{attribute}"):
        k = len(labels)
        fig, (ax,) = _figure((1.6 + 0.8 * k, 1.2 + 0.7 * k))
        shown = np.ma.masked_invalid(matrix)
        im = ax.imshow(shown, cmap="Blues", vmin=min(0.0, float(np.nanmin(matrix))) if np.isfinite(matrix).any()
                       else 0.0)
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels)
        for i in range(k):
            for j in range(k):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=7.5)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, shrink=0.8)
        return _svg(fig, alt)
