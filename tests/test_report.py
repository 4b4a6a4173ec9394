"""engine.report: a self-contained, escaped, accessible HTML report from a realistic analysis."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from engine.analysis import attribute_slopes, correlations, group_slopes, verdicts
from engine.report import render_report

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SEEDS = [42, 43, 44]
# (TV, per-unit-share loss slope) per attribute, MNIST-like (method.md §9)
TRUTH = {"digit_group": (0.110, -0.20), "colour": (0.041, -0.01), "random": (0.037, 0.0)}
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
                rows.append({"alloc_attribute": alloc, "alpha": alpha, "seed": seed, "attribute": "overall",
                             "grp": -1, "metric": "loss", "value": 0.3})
    return rows


def make_data(attrs: dict[str, tuple[float, float]] = TRUTH, description: str = EVIL) -> dict:
    """A hand-made but realistic `data` dict, with the analysis computed by engine.analysis."""
    curves = _curves(np.random.default_rng(0), attrs)
    seps = [{"attribute": a, "distance": "tv_paper", "value": tv, "std": 0.004, "n_seeds": 3, "n_g0": 2010,
             "n_g1": 1990} for a, (tv, _) in attrs.items()]
    slopes = group_slopes(curves)
    attr = attribute_slopes(slopes)
    return {
        "experiment": {"name": "colored_mnist", "description": description, "spec_path": "specs/colored_mnist.toml",
                       "spec_toml": '[experiment]\nname = "colored_mnist"  # <b>not bold</b>\n',
                       "created_at": "2026-01-01T00:00:00Z", "git_commit": "298afa6",
                       "versions": {"numpy": "2.4.6", "torch": "2.14.1"}, "variant": {"sampler": "natural"}},
        "separations": seps,
        "curves": curves,
        "slopes": [{**r, "experiment": "colored_mnist"} for r in slopes],
        "attribute_slopes": attr,
        "correlations": correlations(seps, attr),
        "verdicts": verdicts(attr, seps),
        "trials": [{"status": "done", "count": 99}, {"status": "failed", "count": 0}],
        "stages": [{"kind": "pretrain", "count": 3, "duration_s": 95.2}, {"kind": "finetune", "count": 99,
                                                                          "duration_s": 410.0}],
        "pretrain": [{"pretrain_seed": s, "epochs": 12, "best_val_bal_acc": 0.95} for s in (0, 1, 2)],
        "generated_at": "2026-01-02T00:00:00Z",
    }


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
    positions = [report.index(f'id="{s}"') for s in ("summary", "separation", "curves", "correlation", "provenance")]
    assert positions == sorted(positions)
    assert "α = share of group 1 in the fine-tuning set" in report
    assert "group 0" in report and "group 1" in report


def test_labels_r_and_r2(report: str) -> None:
    assert "r²" in report and "r =" in report
    assert re.search(r"Pearson r = −?\d\.\d{3}, r² = \d\.\d{3}, p = [\d.e−]+, n = 3", report)


def test_inline_svg_with_alt_text_and_no_network(report: str) -> None:
    svgs = re.findall(r"<svg\b[^>]*>", report)
    assert len(svgs) >= 4  # three allocation figures + the scatter
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
    assert "not enough attributes for a correlation (n &lt; 3" in two
    empty = {k: [] for k in ("separations", "curves", "slopes", "attribute_slopes", "correlations", "verdicts",
                             "trials", "stages", "pretrain")}
    data = {**make_data(), **empty}
    html = render_report(data, tmp_path / "empty.html").read_text()
    assert "No finished allocation trials to plot." in html and "<svg" not in html
    with pytest.raises(ValueError, match="missing"):
        render_report({"experiment": {}}, tmp_path / "bad.html")
