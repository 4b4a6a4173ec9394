"""engine.analysis and engine.correlate: per-seed slopes with seed + test-set intervals, the paired attribute slope,
the null range, verdicts, and small-n correlations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from engine.analysis import attribute_slopes, cross_slopes, curves_from_rows, group_slopes, verdicts
from engine.correlate import correlate, correlations, explanation_correlations

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SEEDS = [42, 43, 44]


def _rows(attr: str, slope: dict[int, float], noise: float = 0.0, shared: float = 0.0,
          skip: set[tuple[float, int]] | None = None, metric: str = "loss", boot: int = 0,
          seed: int = 0) -> list[dict]:
    """Metric rows for allocating on ``attr``: value = 0.5 + slope[grp] * own share + per-seed drift + noise.

    ``shared``: noise common to both groups of a run (one head scores both). ``boot``: B resample values per row
    (value + small noise), as the workers store them.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for s in SEEDS:
        drift = noise * rng.normal()
        for alpha in ALPHAS:
            if skip and (alpha, s) in skip:
                continue
            head = shared * rng.normal()
            for grp in (0, 1):
                share = alpha if grp == 1 else 1 - alpha
                value = 0.5 + (slope[grp] + drift) * share + head + noise * rng.normal()
                row = {"alloc_attribute": attr, "alpha": alpha, "seed": s, "attribute": attr, "grp": grp,
                       "metric": metric, "value": value}
                if boot:
                    row["boot"] = value + 0.001 * rng.normal(size=boot)
                rows.append(row)
            # rows that must be ignored by the group slopes: overall, and another attribute's groups
            rows.append({"alloc_attribute": attr, "alpha": alpha, "seed": s, "attribute": "overall", "grp": -1,
                         "metric": metric, "value": 99.0})
            rows.append({"alloc_attribute": attr, "alpha": alpha, "seed": s, "attribute": "other", "grp": 1,
                         "metric": metric, "value": -99.0})
    return rows


def _by(rows: list[dict], **keys: object) -> dict:
    (hit,) = [r for r in rows if all(r[k] == v for k, v in keys.items())]
    return hit


def test_known_slopes_with_missing_trials_are_exact() -> None:
    # an uneven design: the paper's values[::-1] trick would pair the wrong runs here
    skip = {(0.0, 43), (0.3, 42), (0.9, 44)}
    out = group_slopes(curves_from_rows(_rows("a", {0: -0.2, 1: 0.07}, skip=skip)))
    g0, g1 = _by(out, grp=0), _by(out, grp=1)
    assert g0["slope"] == pytest.approx(-0.2, abs=1e-12) and g1["slope"] == pytest.approx(0.07, abs=1e-12)
    assert g0["intercept"] == pytest.approx(0.5, abs=1e-12)
    assert g0["n"] == g1["n"] == 33 - len(skip) and g0["n_seeds"] == 3
    assert g1["gap"] == pytest.approx(0.07, abs=1e-12)  # own share 1 (α=1) minus own share 0 (α=0)
    assert g0["gap"] == pytest.approx(-0.2, abs=1e-12)  # own share 1 is α=0 for group 0
    assert g0["method"].startswith("seed t") and g0["n_resamples"] == 0  # no resamples: the seed t interval


def test_group_slope_is_the_mean_of_per_seed_ols_with_a_seed_t_interval() -> None:
    rows = _rows("a", {0: -0.05, 1: 0.02}, noise=0.01)
    row = _by(group_slopes(curves_from_rows(rows)), grp=1)
    per_seed = []
    for s in SEEDS:
        mine = [r for r in rows if r["attribute"] == "a" and r["grp"] == 1 and r["seed"] == s]
        per_seed.append(stats.linregress([r["alpha"] for r in mine], [r["value"] for r in mine]).slope)
    ref = stats.ttest_1samp(per_seed, 0.0)
    assert row["slope"] == pytest.approx(np.mean(per_seed), rel=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)), rel=1e-10)
    assert (row["seed_min"], row["seed_max"]) == pytest.approx((min(per_seed), max(per_seed)))
    assert row["df"] == 2


def test_test_resamples_widen_the_interval() -> None:
    rows = _rows("a", {0: -0.05, 1: 0.02}, noise=0.002, boot=50)
    with_boot = _by(group_slopes(curves_from_rows(rows)), grp=1)
    without = _by(group_slopes(curves_from_rows([{k: v for k, v in r.items() if k != "boot"} for r in rows])), grp=1)
    assert with_boot["slope"] == without["slope"]
    assert with_boot["n_resamples"] == 50 and with_boot["se_test"] > 0
    assert with_boot["stderr"] == pytest.approx(math.hypot(with_boot["se_seed"], with_boot["se_test"]))
    assert "test bootstrap" in with_boot["method"]


def test_a_nan_metric_is_dropped_and_counted() -> None:
    rows = _rows("a", {0: -0.1, 1: 0.1})
    hit = next(r for r in rows if r["grp"] == 1 and r["alpha"] == 0.4 and r["seed"] == 43)
    hit["value"] = float("nan")
    g1 = _by(group_slopes(curves_from_rows(rows)), grp=1)
    assert g1["slope"] == pytest.approx(0.1, abs=1e-12) and g1["n"] == 32 and g1["n_dropped"] == 1


def test_too_few_points_gives_a_nan_row() -> None:
    rows = [r for r in _rows("a", {0: 0.1, 1: 0.1}) if r["alpha"] == 0.5]
    out = group_slopes(curves_from_rows(rows))
    assert len(out) == 2 and all(math.isnan(r["slope"]) and r["n"] == 3 for r in out)


def test_paired_attribute_slope_cancels_the_shared_head() -> None:
    rows = _rows("a", {0: -0.04, 1: -0.02}, shared=0.02, seed=3)  # big per-run noise shared by both groups
    cells = curves_from_rows(rows)
    (att,) = [r for r in attribute_slopes(cells) if r["metric"] == "loss"]
    g = {r["grp"]: r for r in group_slopes(cells)}
    assert att["slope"] == pytest.approx((g[0]["slope"] + g[1]["slope"]) / 2, abs=1e-12)
    assert att["slope"] == pytest.approx(-0.03, abs=1e-12)  # the head noise cancels exactly
    assert att["stderr"] < 1e-10 < g[1]["stderr"]
    assert att["gap"] == pytest.approx(-0.03, abs=1e-12)


def test_null_range_and_beyond_null() -> None:
    rows = _rows("digit", {0: -0.3, 1: -0.2}, noise=0.003, seed=1) + _rows("colour", {0: 0.004, 1: 0.003},
                                                                            noise=0.0005, seed=2)
    rows += _rows("random", {0: 0.01, 1: 0.0}, noise=0.001, seed=4)
    rows += _rows("random_2", {0: -0.002, 1: 0.0}, noise=0.001, seed=5)
    att = {r["attribute"]: r for r in attribute_slopes(curves_from_rows(rows))}
    assert att["random"]["null_partition"] and att["random"]["beyond_null"] is None
    assert (att["digit"]["null_low"], att["digit"]["null_high"]) == pytest.approx(
        (min(0.0, att["random_2"]["slope"]), max(0.0, att["random"]["slope"])))
    assert att["digit"]["n_null"] == 2 and att["digit"]["beyond_null"] is True
    # colour's interval excludes 0 but overlaps the null range: it does not beat the null partitions
    assert att["colour"]["ci_low"] > 0 and att["colour"]["beyond_null"] is False


def test_verdicts_quote_the_null_range_and_the_basis() -> None:
    rows = _rows("digit", {0: -0.3, 1: -0.2}, noise=0.003, seed=1) + _rows("colour", {0: 0.004, 1: 0.003},
                                                                            noise=0.0005, seed=2)
    rows += _rows("random", {0: 0.02, 1: 0.01}, noise=0.0005, seed=4)  # a null partition whose CI excludes 0
    rows += _rows("random_2", {0: -0.002, 1: 0.0}, noise=0.002, seed=5)
    att = attribute_slopes(curves_from_rows(rows))
    seps = [{"attribute": "digit", "distance": "tv_paper", "value": 0.11}]
    out = {v["attribute"]: v for v in verdicts(att, seps)}
    assert out["digit"]["matters"] is True and "beyond the null range" in out["digit"]["text"]
    assert "TV = 0.110" in out["digit"]["text"] and "33 runs over 3 seeds" in out["digit"]["text"]
    assert out["digit"]["n_runs"] == 33 and out["digit"]["n_seeds"] == 3
    assert out["colour"]["matters"] is False and "beyond the null partitions" in out["colour"]["text"]
    assert out["random"]["matters"] is False and "pool partition" in out["random"]["text"]
    assert "include 0" in out["random_2"]["text"]


def test_cross_slopes_cover_every_evaluated_group() -> None:
    rows = _rows("a", {0: -0.1, 1: 0.1})
    out = cross_slopes(curves_from_rows(rows))
    assert {(r["attribute"], r["grp"]) for r in out} == {("a", 0), ("a", 1), ("overall", -1), ("other", 1)}
    assert _by(out, attribute="a", grp=0)["slope"] == pytest.approx(0.1, abs=1e-12)  # −(slope on own share)
    assert _by(out, attribute="overall", grp=-1)["slope"] == pytest.approx(0.0, abs=1e-12)


# ---- correlations ------------------------------------------------------------------------------------------

def test_three_points_never_give_a_p_below_one_third() -> None:
    res = correlate(np.array([0.14, 0.007, 0.0]), np.array([-0.6, 0.0003, 0.001]))
    assert res["n"] == 3 and res["testable"] is False
    assert res["p_value"] >= 1 / 3 - 1e-12 and res["spearman_p"] >= 1 / 3 - 1e-12
    assert math.isnan(res["r_ci_low"])  # Fisher z needs 4 points
    assert res["r2"] == pytest.approx(res["r"] ** 2)


def test_exact_permutation_p_and_fisher_interval_equal_scipy() -> None:
    x = np.array([0.3, 0.1, 0.25, 0.05, 0.2, 0.12])
    y = np.array([-0.05, -0.01, -0.03, 0.002, -0.04, -0.02])
    res = correlate(x, y)
    ref = stats.permutation_test((x,), lambda xp: stats.pearsonr(xp, y).statistic, permutation_type="pairings",
                                 n_resamples=np.inf)
    ci = stats.pearsonr(x, y).confidence_interval(0.95)
    assert res["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (res["r_ci_low"], res["r_ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert res["testable"] is True and res["p_method"].startswith("exact permutation (720")
    assert res["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic)


def test_correlations_merge_null_partitions_and_offer_calibrated_and_raw_x() -> None:
    seps = [{"attribute": a, "distance": "tv_paper", "value": v, "calibrated": c} for a, v, c in
            [("a", 0.3, 0.2), ("b", 0.1, 0.01), ("c", 0.2, 0.1), ("random", 0.09, 0.0), ("random_2", 0.1, 0.002)]]
    slopes = [{"attribute": a, "metric": "loss", "slope": s, "gap": g} for a, s, g in
              [("a", -0.3, -0.3), ("b", 0.0, 0.01), ("c", -0.1, -0.1), ("random", 0.001, 0.0),
               ("random_2", -0.001, 0.0)]]
    out = correlations(seps, slopes)
    assert {(r["x"], r["y"]) for r in out} == {("calibrated", "slope"), ("raw", "slope"), ("calibrated", "gap"),
                                               ("raw", "gap")}
    cal = _by(out, x="calibrated", y="slope")
    assert cal["n"] == 4  # a, b, c and one null point
    xs, ys = [0.2, 0.01, 0.1, 0.001], [-0.3, 0.0, -0.1, 0.0]
    assert cal["r"] == pytest.approx(stats.pearsonr(xs, ys).statistic, rel=1e-12)
    assert cal["testable"] is False


def test_explanation_correlations_count_independent_points() -> None:
    expl = [{"attribute": a, "grp": g, "loss_slope": s, "tv": 0.1, "pretrain_share": sh,
             "pretrained_bal_acc": 0.9, "class_prevalence": 0.5 + 0.01 * g}
            for a, g, s, sh in [("a", 0, -0.1, 0.3), ("a", 1, -0.2, 0.7), ("b", 0, 0.0, 0.5), ("b", 1, 0.01, 0.5),
                                ("random", 0, 0.0, 0.5), ("random", 1, 0.001, 0.5), ("random_2", 0, 0.0, 0.49),
                                ("random_2", 1, 0.0, 0.51)]]
    seps = [{"attribute": a, "distance": "tv_paper", "value": v, "calibrated": None}
            for a, v in [("a", 0.3), ("b", 0.1), ("random", 0.09), ("random_2", 0.08)]]
    slopes = [{"attribute": a, "metric": "loss", "slope": s} for a, s in
              [("a", -0.15), ("b", 0.005), ("random", 0.0), ("random_2", 0.0)]]
    out = {r["explanation"]: r for r in explanation_correlations(expl, seps, slopes)}
    assert out["tv"]["unit"] == "attribute" and out["tv"]["n"] == 3  # a, b, one null point
    assert out["pretrain_share"]["unit"] == "group" and out["pretrain_share"]["n"] == 6  # random_2 left out
