"""engine.report: a self-contained, escaped, accessible HTML report from a realistic analysis."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from engine import fits
from engine.analysis import attribute_slopes, cross_slopes, curves_from_rows, explanations, group_slopes, verdicts
from engine.correlate import correlations, explanation_correlations
from engine.bound import bounds
from engine.report import REQUIRED_KEYS, render_report

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SEEDS = [42, 43, 44]
BUDGET = 2000
# (TV, per-unit-share loss slope) per attribute, MNIST-like (method.md §9): digit group matters, colour is flat
TRUTH = {"digit_group": (0.110, -0.20), "colour": (0.041, 0.0), "random": (0.037, 0.0), "random_2": (0.036, 0.0),
         "random_3": (0.038, 0.0)}
EVIL = "<script>alert(1)</script>"


def _curves(rng: np.random.Generator, attrs: dict[str, tuple[float, float]]) -> list[dict]:
    rows = []
    for alloc, (_, slope) in attrs.items():
        for alpha in ALPHAS:
            for seed in SEEDS:
                for attr in attrs:
                    for grp in (0, 1):
                        share = (alpha if grp == 1 else 1 - alpha) if attr == alloc else 0.5
                        loss = 0.3 + slope * share + 0.005 * rng.normal()
                        for metric, value in (("loss", loss), ("bal_acc", 1 - loss / 2), ("acc", 1 - loss / 2),
                                              ("auc", 0.97)):
                            rows.append({"alloc_attribute": alloc, "alpha": alpha, "seed": seed, "attribute": attr,
                                         "grp": grp, "metric": metric, "value": value})
                for metric, value in (("loss", 0.3), ("acc", 0.85)):
                    rows.append({"alloc_attribute": alloc, "alpha": alpha, "seed": seed, "attribute": "overall",
                                 "grp": -1, "metric": metric, "value": value})
    return rows


def make_data(attrs: dict[str, tuple[float, float]] = TRUTH, description: str = EVIL, budget: int | None = BUDGET,
              p_y_shift: float = 0.0) -> dict:
    """A hand-made but realistic `data` dict (the shape of engine.results.report_data), with every analysis table
    computed by the real engine.analysis / engine.fits / engine.bound functions.

    ``p_y_shift``: P(Y=1) of the training sets changes by this much from α = 0 to α = 1 (breaks the bound's
    assumption, so a violation gets that reason).
    """
    curves = _curves(np.random.default_rng(0), attrs)
    seps = [{"attribute": a, "distance": "tv_paper", "value": tv, "seed_sd": 0.004, "within_sd": 0.003,
             "value_y0": 0.9 * tv, "value_y1": 1.1 * tv, "n_seeds": 3, "n_g0": 2010, "n_g1": 1990}
            for a, (tv, _) in attrs.items()]
    cells = curves_from_rows(curves)
    slopes = group_slopes(cells)
    attr = attribute_slopes(cells)
    groups = [{"attribute": a, "grp": g, "share": 0.3 + 0.4 * g, "prevalence": 0.4 + 0.1 * g + 0.1 * i}
              for i, a in enumerate(attrs) for g in (0, 1)]
    pretrained = [{"attribute": a, "grp": g, "value": 0.9 - 0.2 * tv * g} for a, (tv, _) in attrs.items()
                  for g in (0, 1)]
    expl = explanations(slopes, seps, groups, pretrained)
    p_y = [{"attribute": a, "alpha": alpha, "p_y": 0.5 + p_y_shift * alpha} for a in attrs for alpha in ALPHAS]
    fit_rows = fits.fit_curves(curves, budget or BUDGET)
    return {
        "experiment": {"name": "colored_mnist", "description": description, "spec_path": "specs/colored_mnist.toml",
                       "spec_toml": '[experiment]\nname = "colored_mnist"  # <b>not bold</b>\n',
                       "created_at": "2026-01-01T00:00:00Z", "git_commit": "298afa6",
                       "versions": {"numpy": "2.4.6", "torch": "2.14.1"}, "variant": {"sampler": "natural"},
                       "budget": budget, "mode": "last_layer"},
        "separations": seps,
        "curves": curves,
        "slopes": [{**r, "experiment": "colored_mnist"} for r in slopes],
        "attribute_slopes": attr,
        "correlations": correlations(seps, attr),
        "verdicts": verdicts(attr, seps),
        "fits": [{**{k: v for k, v in r.items() if k != "params"}, "params_json": json.dumps(r["params"])}
                 for r in fit_rows],
        "best_alpha": fits.best_alpha([c for c in curves if c["metric"] in ("loss", "bal_acc")], budget or BUDGET,
                                      n_boot=50),
        "cross_slopes": cross_slopes(cells),
        "explanations": expl,
        "explanation_correlations": explanation_correlations(expl, seps, attr),
        "bounds": bounds(curves, seps, p_y, attr, "last_layer"),
        "trials": [{"status": "done", "count": 99}, {"status": "failed", "count": 0}],
        "stages": [{"kind": "pretrain", "count": 3, "duration_s": 95.2}, {"kind": "finetune", "count": 99,
                                                                          "duration_s": 410.0}],
        "pretrain": [{"pretrain_seed": s, "epochs": 12, "best_val_bal_acc": 0.95} for s in (0, 1, 2)],
        "generated_at": "2026-01-02T00:00:00Z",
    }


def pooled(data: dict, names: tuple[str, ...] = ("mnist_a", "mnist_b")) -> dict:
    """The pooled shape (engine.results.pooled_report_data): attributes "experiment:attribute", experiment.pooled."""
    out = {k: v for k, v in data.items()}
    out["experiment"] = {"name": "pooled__" + "__".join(names), "pooled": list(names), "description": "Pooled.",
                         "budget": None, "mode": "last_layer"}
    for key in ("separations", "slopes", "attribute_slopes", "verdicts", "fits", "best_alpha", "explanations",
                "bounds"):
        out[key] = [{**r, "attribute": f"{n}:{r['attribute']}"} for n in names for r in data[key]]
    for key in ("curves", "cross_slopes"):
        out[key] = [{**r, "alloc_attribute": f"{n}:{r['alloc_attribute']}",
                     "attribute": r["attribute"] if r["attribute"] == "overall" else f"{n}:{r['attribute']}"}
                    for n in names for r in data[key]]
    return out


SECTIONS = ("summary", "separation", "curves", "correlation", "explanations", "bound", "cross", "provenance")


def _section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}"')
    return html[start:html.index("</section>", start)]


class _Balance(HTMLParser):
    """Checks that every non-void element is closed in order."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack[-3:]}"
        self.stack.pop()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = render_report(make_data(), tmp_path_factory.mktemp("r") / "sub" / "report.html")
    return out.read_text(encoding="utf-8")


def test_parses_and_has_sections_in_order(report: str) -> None:
    parser = _Balance()
    parser.feed(report)
    parser.close()
    assert parser.stack == []
    positions = [report.index(f'<section id="{s}"') for s in SECTIONS]
    assert positions == sorted(positions)
    headings = re.findall(r"<h2>(\d)\. ([^<]+)</h2>", report)
    assert [int(n) for n, _ in headings] == list(range(1, 9))
    assert [t for _, t in headings][0] == "Summary and recommendations"
    assert "α = share of group 1 in the fine-tuning set" in report
    assert "group 0" in report and "group 1" in report


def test_labels_r_and_r2(report: str) -> None:
    assert "r²" in report and "r =" in report
    # three points (digit_group, colour, the null partitions as one): described, not tested
    assert re.search(r"Pearson r = −?\d\.\d{3}, r² = \d\.\d{3} \(too few attributes to test a correlation "
                     r"\(n = 3\): add attributes or datasets", report)
    corr = _section(report, "correlation")
    assert "Not a test." in corr and "1/3 at n = 3" in corr
    rows = re.findall(r"<tr><td>tv_paper</td><td>(calibrated|raw)</td>.*?</tr>", corr, flags=re.S)
    assert rows and all("<td>no</td>" in r for r in re.findall(r"<tr><td>tv_paper</td>.*?</tr>", corr, flags=re.S))
    assert not re.search(r"p = 0\.[0-2]", corr)  # no p-value is offered at n = 3
    # the group-level explanation panels: n = 6 groups (of the null partitions only 'random'), exact permutation p
    # and the Fisher z interval of r
    section = _section(report, "explanations")
    labels = re.findall(r"Pearson r = −?\d\.\d{3}, r² = \d\.\d{3}, p = [\d.e−]+ \(exact permutation \(720 "
                        r"pairings\)\), n = 6; Fisher z 95% CI of r \[−?\d\.\d{3}, −?\d\.\d{3}\]", section)
    assert len(labels) >= 3  # one per group-level panel in the figure's alt text (and its caption / table)


def test_inline_svg_with_alt_text_and_no_network(report: str) -> None:
    svgs = re.findall(r"<svg\b[^>]*>", report)
    assert len(svgs) == 8  # five allocation figures, the TV scatter, the explanations, the notebooks' quantity
    assert all('role="img"' in s and "aria-label=" in s for s in svgs)
    assert report.count("<figcaption>") == len(svgs)
    assert "<?xml" not in report and "<!DOCTYPE svg" not in report
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", report)
    assert "http" not in report  # not even the SVG namespace URIs (the HTML parser supplies those)
    assert "@import" not in report and not re.search(r"url\(\s*[^#\s]", report)  # only url(#id) references


def test_autoescape(report: str) -> None:
    assert "<script" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report
    assert "&lt;b&gt;not bold&lt;/b&gt;" in report  # the spec TOML is text too


def test_verdicts_and_tv_ranking(report: str) -> None:
    table = report[report.index('id="separation"'):report.index('id="curves"')]
    order = [table.index(f">{a}<") for a in ("digit_group", "colour", "random")]
    assert order == sorted(order)
    assert "Balancing on digit_group" in report and "allocation matters" in report


def test_small_and_empty_inputs_render(tmp_path: Path) -> None:
    two = render_report(make_data({"a": (0.1, -0.2), "random": (0.03, 0.0)}), tmp_path / "two.html").read_text()
    assert "not enough points for a correlation (n &lt; 3" in two
    empty = {k: [] for k in REQUIRED_KEYS if k not in ("experiment", "generated_at")}
    data = {**make_data(), **empty}
    html = render_report(data, tmp_path / "empty.html").read_text()
    assert "No finished allocation trials to plot." in html and "<svg" not in html
    with pytest.raises(ValueError, match="missing"):
        render_report({"experiment": {}}, tmp_path / "bad.html")


def test_recommendations_only_where_allocation_matters(report: str) -> None:
    summary = _section(report, "summary")
    assert re.search(r"to maximise the worst group&#39;s balanced accuracy, allocate α ≈ 0\.\d\d \(per-seed range \(3 "
                     r"seeds\): 0\.\d\d–0\.\d\d\) of the fine-tuning set to group 1 of digit_group", summary)
    # the mean of two mirror-image linear curves does not depend on α: said so, no α recommended for it
    assert "mean of the two groups&#39; balanced accuracy is nearly flat in α" in summary
    colour = summary[summary.index("colour: no"):]
    colour = colour[:colour.index("</li>")]
    assert "flat within noise" in colour and "no allocation is preferred" in colour
    assert "α ≈" not in colour and "allocate" not in colour
    assert summary.count("α ≈") == 1  # digit_group's worst group only
    assert "holds in all 550 checked pairs" in summary


def test_curves_show_fits_and_best_alpha(report: str) -> None:
    curves = _section(report, "curves")
    for attr in ("digit_group", "colour", "random", "random_2", "random_3"):
        assert f"Curve fits for {attr}" in curves
    assert curves.count("best α for the worst group") == 1  # the marker only for digit_group, which matters
    assert "fitted power law" in curves or "fitted line" in curves
    rows = re.findall(r"<tr class=\"(preferred|)\"><td>(bal\. acc\.|loss)</td>", curves)
    assert len(rows) == 5 * 2 * 2 * 2  # attributes × metrics × groups × models
    assert sum(1 for cls, _ in rows if cls == "preferred") == 5 * 2 * 2
    assert "null band" in curves  # the null partitions' slopes drawn behind each real attribute's curves


def test_power_law_needs_the_budget(tmp_path: Path) -> None:
    """Without K (pooled reports), a preferred power law cannot be drawn in share units: fall back and say so."""
    data = make_data(budget=None)
    data["fits"] = [{**f, "preferred": f["model"] == "power"} for f in data["fits"]]
    html = render_report(data, tmp_path / "nok.html").read_text()
    assert "budget K is unknown" in html and "fitted power law" not in html and "fitted line" in html


def test_bound_statuses_and_violation_reason(report: str, tmp_path: Path) -> None:
    bound = _section(report, "bound")
    assert "Checked 550 pairs: 0 vacuous, 0 violated beyond\n    seed-level noise" in bound
    assert bound.count("<strong>holds</strong>") == 10  # 5 attributes × 2 groups, lowest vs highest α
    assert "2·TV + Δ balanced accuracy" in bound and "bound = 1" in bound
    # a tiny TV with a large effect violates it; P(Y) moving with α is the reason; a large TV makes it vacuous
    attrs = {"a": (0.005, -0.4), "b": (0.30, -0.01), "random": (0.03, 0.0)}
    html = render_report(make_data(attrs, p_y_shift=0.2), tmp_path / "violated.html").read_text()
    bound = _section(html, "bound")
    assert re.search(r"Checked 330 pairs: 110 vacuous, \d+ violated beyond", bound)
    assert "<strong>VIOLATED</strong>: P(Y=1) of the training sets differs (0.500 vs 0.700)" in bound
    assert "<strong>holds; vacuous (&gt; 1)</strong>" in bound and "<strong>holds</strong>" in bound
    assert "is VIOLATED beyond seed-level noise in" in _section(html, "summary")


def test_cross_matrix_shape_and_marks(report: str) -> None:
    cross = _section(report, "cross")
    tables = re.findall(r"<table class=\"cross\">(.*?)</table>", cross, flags=re.S)
    assert len(tables) == 2  # loss, balanced accuracy
    loss = tables[0]
    header = re.findall(r"<th scope=\"col\">([^<]+)</th>", loss)
    assert header[1:5] == ["digit_group g0", "digit_group g1", "colour g0", "colour g1"]
    assert {h for h in header[5:-1]} == {f"{r} g{g}" for r in ("random", "random_2", "random_3") for g in (0, 1)}
    assert header[-1] == "overall"
    rows = re.findall(r"<tr><th scope=\"row\">([^<]+)</th>(.*?)</tr>", loss, flags=re.S)
    assert [r[0] for r in rows][:2] == ["digit_group", "colour"] and len(rows) == 5
    assert all(len(re.findall(r"<td ", cells)) == 11 for _, cells in rows)
    digit = rows[0][1]
    assert "<strong>+0.0200</strong>" in digit or re.search(r"<strong>\+0\.0[12]\d\d</strong>", digit)
    assert "background-color: rgba(209, 73, 91" in digit and "background-color: rgba(27, 108, 168" in digit
    # the balanced-accuracy table has no overall column: the fixture has no overall balanced accuracy
    assert "overall" not in re.findall(r"<thead>.*?</thead>", tables[1], flags=re.S)[0]


def test_cross_warnings_name_side_effects(tmp_path: Path) -> None:
    data = make_data()
    data["cross_slopes"].append({"alloc_attribute": "digit_group", "attribute": "colour", "grp": 1, "metric": "loss",
                                 "slope": 0.05, "stderr": 0.01, "ci_low": 0.03, "ci_high": 0.07, "p_value": 1e-4,
                                 "n": 33})
    data["cross_slopes"] = [c for c in data["cross_slopes"] if not (
        c["alloc_attribute"] == "digit_group" and c["attribute"] == "colour" and c["grp"] == 1 and c["metric"] == "loss"
        and c["slope"] != 0.05)]
    summary = _section(render_report(data, tmp_path / "w.html").read_text(), "summary")
    assert ("Allocating on digit_group also moves group 1 of colour&#39;s test loss (cross-entropy) by +0.0050 per "
            "+10% α (95% CI +0.0030 to +0.0070).") in summary


def test_missing_explanation_statistics_render_blank(tmp_path: Path) -> None:
    data = make_data()
    data["explanation_correlations"] = [c for c in data["explanation_correlations"] if c["explanation"] != "tv"]
    html = render_report(data, tmp_path / "e.html").read_text()
    assert "not enough points for a correlation (n &lt; 3; n = 0)" in _section(html, "explanations")


def test_pooled_report(tmp_path: Path) -> None:
    html = render_report(pooled(make_data()), tmp_path / "pooled.html").read_text()
    header = html[:html.index('<section id="summary"')]
    assert "Pooled report" in header and "<code>mnist_a</code>" in header and "<code>mnist_b</code>" in header
    assert "mnist_a:digit_group" in _section(html, "curves") and "budget K is unknown" not in header
    assert "The spec is not available for this report." in html
    parser = _Balance()
    parser.feed(html)
    assert parser.stack == []
