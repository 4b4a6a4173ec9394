"""engine.analysis: slopes on own share, gaps, attribute aggregation, correlations and verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from engine.analysis import attribute_slopes, correlations, group_slopes, verdicts

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SEEDS = [42, 43, 44]


def _rows(attr: str, slope: dict[int, float], noise: float = 0.0, skip: set[tuple[float, int]] | None = None,
          metric: str = "loss") -> list[dict]:
    """Metric rows for allocating on ``attr``: value = 0.5 + slope[grp] * own share (+ seeded noise)."""
    rng = np.random.default_rng(0)
    rows = []
    for alpha in ALPHAS:
        for seed in SEEDS:
            if skip and (alpha, seed) in skip:
                continue
            for grp in (0, 1):
                share = alpha if grp == 1 else 1 - alpha
                value = 0.5 + slope[grp] * share + noise * rng.normal()
                rows.append({"alloc_attribute": attr, "alpha": alpha, "seed": seed, "attribute": attr, "grp": grp,
                             "metric": metric, "value": value})
            # rows that must be ignored: overall, and another attribute's groups in the same trial
            rows.append({"alloc_attribute": attr, "alpha": alpha, "seed": seed, "attribute": "overall", "grp": -1,
                         "metric": metric, "value": 99.0})
            rows.append({"alloc_attribute": attr, "alpha": alpha, "seed": seed, "attribute": "other", "grp": 1,
                         "metric": metric, "value": -99.0})
    return rows


def _by(rows: list[dict], **keys: object) -> dict:
    (hit,) = [r for r in rows if all(r[k] == v for k, v in keys.items())]
    return hit


def test_known_slopes_with_missing_trials_are_exact() -> None:
    # an uneven design: the paper's values[::-1] trick would pair the wrong runs here
    skip = {(0.0, 43), (0.0, 44), (0.3, 42), (0.9, 44)}
    out = group_slopes(_rows("a", {0: -0.2, 1: 0.07}, skip=skip))
    g0, g1 = _by(out, grp=0), _by(out, grp=1)
    assert g0["slope"] == pytest.approx(-0.2, abs=1e-12)
    assert g1["slope"] == pytest.approx(0.07, abs=1e-12)
    assert g0["intercept"] == pytest.approx(0.5, abs=1e-12)
    assert g0["n"] == g1["n"] == 33 - len(skip)
    assert g1["gap"] == pytest.approx(0.07, abs=1e-12)  # own share 1 (α=1) minus own share 0 (α=0)
    assert g0["gap"] == pytest.approx(-0.2, abs=1e-12)  # own share 1 is α=0 for group 0
    assert math.isnan(g0["gap_stderr"])  # only one run left at α = 0
    assert set(g0) == {"attribute", "grp", "metric", "slope", "intercept", "stderr", "ci_low", "ci_high", "r",
                       "p_value", "n", "gap", "gap_stderr"}


def test_matches_scipy_on_noisy_data() -> None:
    rows = _rows("a", {0: -0.05, 1: 0.02}, noise=0.01)
    out = group_slopes(rows)
    for grp in (0, 1):
        mine = [r for r in rows if r["attribute"] == "a" and r["grp"] == grp]
        x = [r["alpha"] if grp == 1 else 1 - r["alpha"] for r in mine]
        v = [r["value"] for r in mine]
        ref = stats.linregress(x, v)
        row = _by(out, grp=grp)
        half = stats.t.ppf(0.975, len(x) - 2) * ref.stderr
        assert row["slope"] == pytest.approx(ref.slope, rel=1e-12)
        assert row["stderr"] == pytest.approx(ref.stderr, rel=1e-12)
        assert row["r"] == pytest.approx(ref.rvalue, rel=1e-12)
        assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-12)
        full = [r["value"] for r in mine if math.isclose(r["alpha"], float(grp))]
        zero = [r["value"] for r in mine if math.isclose(r["alpha"], float(1 - grp))]
        se = math.sqrt(np.var(full, ddof=1) / 3 + np.var(zero, ddof=1) / 3)
        assert row["gap"] == pytest.approx(np.mean(full) - np.mean(zero), rel=1e-12)
        assert row["gap_stderr"] == pytest.approx(se, rel=1e-12)


def test_too_few_points_or_constant_x_gives_nan_row() -> None:
    rows = [r for r in _rows("a", {0: 0.1, 1: 0.1}) if r["alpha"] in (0.5,)]
    out = group_slopes(rows)
    assert len(out) == 2 and all(math.isnan(r["slope"]) and r["n"] == 3 for r in out)
    few = [r for r in _rows("b", {0: 0.1, 1: 0.1}) if r["alpha"] in (0.0, 1.0) and r["seed"] == 42]
    assert all(math.isnan(r["slope"]) and r["n"] == 2 for r in group_slopes(few))


def test_attribute_slope_and_stderr_formula() -> None:
    groups = [
        {"attribute": "a", "grp": 0, "metric": "loss", "slope": -0.04, "stderr": 0.003, "gap": -0.05,
         "gap_stderr": 0.01, "n": 33},
        {"attribute": "a", "grp": 1, "metric": "loss", "slope": -0.02, "stderr": 0.004, "gap": -0.03,
         "gap_stderr": 0.02, "n": 31},
    ]
    (row,) = attribute_slopes(groups)
    se = math.sqrt(0.003**2 + 0.004**2) / 2
    assert row["slope"] == pytest.approx(-0.03)
    assert row["stderr"] == pytest.approx(se)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((-0.03 - 1.96 * se, -0.03 + 1.96 * se))
    assert row["gap"] == pytest.approx(-0.04)
    assert row["gap_stderr"] == pytest.approx(math.sqrt(0.01**2 + 0.02**2) / 2)
    assert row["n"] == 31
    assert set(row) == {"attribute", "metric", "slope", "stderr", "ci_low", "ci_high", "gap", "gap_stderr", "n"}
    (lonely,) = attribute_slopes(groups[:1])
    assert math.isnan(lonely["slope"]) and lonely["n"] == 0


def _attr_rows(values: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"attribute": a, "metric": "loss", "slope": s, "stderr": 0.001, "ci_low": s - 0.002, "ci_high": s + 0.002,
             "gap": g, "gap_stderr": 0.01, "n": 33} for a, (s, g) in values.items()]


def test_correlations_equal_scipy() -> None:
    tv = {"a": 0.11, "b": 0.04, "c": 0.09, "random": 0.037}
    slope_gap = {"a": (-0.03, -0.05), "b": (-0.001, 0.002), "c": (-0.02, -0.01), "random": (0.0005, -0.003)}
    seps = [{"attribute": a, "distance": "tv_paper", "value": v} for a, v in tv.items()]
    out = correlations(seps, _attr_rows(slope_gap))
    assert {(r["y"], r["metric"]) for r in out} == {("slope", "loss"), ("gap", "loss")}
    attrs = sorted(tv)
    for y, idx in (("slope", 0), ("gap", 1)):
        row = _by(out, y=y)
        x, v = [tv[a] for a in attrs], [slope_gap[a][idx] for a in attrs]
        pr, sr = stats.pearsonr(x, v), stats.spearmanr(x, v)
        assert row["r"] == pytest.approx(pr.statistic, rel=1e-12)
        assert row["r2"] == row["r"] ** 2
        assert row["p_value"] == pytest.approx(pr.pvalue, rel=1e-9)
        assert row["spearman_rho"] == pytest.approx(sr.statistic, rel=1e-12)
        assert row["spearman_p"] == pytest.approx(sr.pvalue, rel=1e-9)
        assert row["n"] == 4
    assert set(out[0]) == {"distance", "metric", "y", "r", "r2", "p_value", "spearman_rho", "spearman_p",
                           "r_ci_low", "r_ci_high", "n"}
    # a bootstrap CI of r over the 4 attributes, which contains r
    for row in out:
        assert row["r_ci_low"] <= row["r"] <= row["r_ci_high"]


def test_correlations_need_three_attributes() -> None:
    seps = [{"attribute": a, "distance": "tv_paper", "value": v} for a, v in {"a": 0.1, "random": 0.03}.items()]
    out = correlations(seps, _attr_rows({"a": (-0.02, -0.01), "random": (0.0, 0.0)}))
    assert all(r["n"] == 2 and math.isnan(r["r"]) and math.isnan(r["r2"]) for r in out)


def test_verdicts() -> None:
    rows = _attr_rows({"digit_group": (-0.21, -0.1), "colour": (0.0005, 0.0)})
    rows += [{**r, "metric": "bal_acc", "slope": -r["slope"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"]}
             for r in rows]
    seps = [{"attribute": "digit_group", "distance": "tv_paper", "value": 0.11}]
    out = {v["attribute"]: v for v in verdicts(rows, seps)}
    assert out["digit_group"]["matters"] is True
    assert "matters" in out["digit_group"]["text"] and "\u22120.021" in out["digit_group"]["text"]
    assert "TV = 0.110" in out["digit_group"]["text"]
    assert out["colour"]["matters"] is False
    assert "no detectable effect" in out["colour"]["text"]
    # the random baseline: never "matters", and an attribute must beat it, not only 0
    rows2 = _attr_rows({"digit_group": (-0.21, -0.1), "colour": (0.004, 0.0035), "random": (0.003, 0.0032)})
    out2 = {v["attribute"]: v for v in verdicts(rows2, seps)}
    assert out2["random"]["matters"] is False and "null baseline" in out2["random"]["text"]
    assert out2["digit_group"]["matters"] is True
    # colour's CI excludes 0 (0.002 to 0.006) but it is within noise of random's slope
    assert out2["colour"]["matters"] is False and "beyond the random baseline" in out2["colour"]["text"]
    (missing,) = verdicts([{**rows[0], "slope": float("nan"), "stderr": float("nan"), "ci_low": float("nan"),
                            "ci_high": float("nan")}], [])
    assert missing["matters"] is False and "not enough" in missing["text"]
