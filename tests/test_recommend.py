"""The allocation recommender (engine/recommend.py) on curves with a known optimum, and `alloclab recommend`
through the CLI on a tiny real run, with a constraint that binds."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from engine.recommend import recommend_one
from tests.conftest import TINY_SPEC

K = 1000


def curve(n: np.ndarray, top: float) -> np.ndarray:
    return top - 2.0 * np.power(np.maximum(n, 1.0), -0.5)


def curves(seeds=(1, 2, 3), noise: float = 0.002) -> list[dict]:
    """Group 1 is harder (a lower ceiling): the worse group gains from more than half the budget."""
    rng = np.random.default_rng(0)
    rows = []
    for s in seeds:
        for alpha in np.round(np.linspace(0, 1, 11), 2):
            for grp, n, top in ((0, (1 - alpha) * K, 0.95), (1, alpha * K, 0.85)):
                rows.append({"alloc_attribute": "A", "attribute": "A", "grp": grp, "metric": "bal_acc",
                             "alpha": float(alpha), "seed": s, "boot": None,
                             "value": float(curve(np.array(n), top) + rng.normal(0, noise))})
    return rows


def worst_optimum(budget: int) -> float:
    grid = np.linspace(0.005, 0.995, 199)
    return float(grid[np.argmax(np.minimum(curve((1 - grid) * budget, 0.95), curve(grid * budget, 0.85)))])


def test_recommends_the_known_optimum_with_intervals():
    rec = recommend_one(curves(), "A", k=K, budget=K)
    assert abs(rec["alpha"] - worst_optimum(K)) <= 0.02 and rec["alpha"] > 0.5
    assert rec["n_g0"] + rec["n_g1"] == K and rec["extrapolation"] == "" and not rec["binding"]
    for g in (0, 1):
        assert rec[f"pred_g{g}_low"] <= rec[f"pred_g{g}"] <= rec[f"pred_g{g}_high"]
    assert rec["interval"] == "per-seed range (3 seeds)"
    (balanced,) = rec["alternatives"]
    assert balanced["name"].startswith("balanced") and balanced["loses"] > 0  # 50/50 leaves group 1 worse off


def test_a_binding_minimum_share_and_the_bootstrap():
    rec = recommend_one(curves(seeds=range(1, 7)), "A", k=K, budget=K, min_share={0: 0.6})
    assert rec["binding"] and rec["alpha"] == pytest.approx(0.4)
    free = [a for a in rec["alternatives"] if a["name"] == "unconstrained optimum"][0]
    assert free["alpha"] > 0.5 and free["loses"] < 0  # the constraint costs the worse group something
    assert rec["interval"].startswith("expanded percentile bootstrap over seeds")
    with pytest.raises(ValueError, match="add up to more than 1"):
        recommend_one(curves(), "A", k=K, budget=K, min_share={0: 0.6, 1: 0.6})


def test_a_larger_budget_extrapolates_and_says_so():
    rec = recommend_one(curves(), "A", k=K, budget=5 * K)
    assert "extrapolates" in rec["extrapolation"] and "above the fitted range" in rec["extrapolation"]
    assert abs(rec["alpha"] - worst_optimum(5 * K)) <= 0.03


def test_mean_objective_and_loss_metric():
    rows = [{**r, "metric": "loss", "value": 1.0 - r["value"]} for r in curves()]
    worst = recommend_one(rows, "A", k=K, budget=K, metric="loss")
    mean = recommend_one(rows, "A", k=K, budget=K, metric="loss", objective="mean")
    assert worst["alpha"] > 0.5 and worst["objective_value"] == pytest.approx(max(worst["pred_g0"], worst["pred_g1"]))
    assert mean["objective_value"] == pytest.approx((mean["pred_g0"] + mean["pred_g1"]) / 2)


@pytest.mark.slow
def test_recommend_cli_writes_the_table_and_the_report_shows_it(tmp_path: Path, alloclab) -> None:
    spec = tmp_path / "t.toml"
    spec.write_text(TINY_SPEC.read_text().replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]")
                    .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
                    .replace("alpha = [0.0, 0.5, 1.0]", "alpha = [0.0, 0.25, 0.5, 0.75, 1.0]")
                    .replace("max_epochs = 15", "max_epochs = 5"))
    assert alloclab("run", spec, "--num-cpus", "2").returncode == 0
    res = alloclab("recommend", spec, "--budget", "400", "--min-share", "digit_group:1=0.9")
    assert res.returncode == 0, res.stderr
    assert "digit_group: group 1 share 0.9" in res.stdout and "binding" in res.stdout, res.stdout
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    rows = con.sql("SELECT attribute, round(alpha, 6), binding, min_share_json, budget FROM recommendations").fetchall()
    con.close()
    assert ("digit_group", 0.9, True, json.dumps({"1": 0.9}), 400) in rows and len(rows) == 2  # and colour
    rep = alloclab("report", spec)
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / rep.stdout.strip()).read_text()
    assert 'id="recommendations"' in html and "group 1 ≥ 0.9" in html
    bad = alloclab("recommend", spec, "--budget", "400", "--min-share", "1=1.5")
    assert bad.returncode == 2 and "--min-share '1=1.5'" in bad.stderr
    unknown = alloclab("recommend", spec, "--budget", "400", "--attribute", "random")
    assert unknown.returncode == 2 and "--attribute 'random': not an allocated attribute" in unknown.stderr


# --- joint allocation among K groups ----------------------------------------------------------------------------

TOPS = {"a": 0.90, "b": 0.88, "c": 0.84}  # group c is hardest: the worst group gains from the largest share


POOL = {"a": 3000, "b": 2000, "c": 1000}  # items per group in the fine-tuning pool


def joint_curves(seeds=(1, 2, 3), noise: float = 0.002, crowding: float = 0.0, rng_seed: int = 1) -> list[dict]:
    """One-vs-rest sweeps of a 3-group attribute R: in trials of 'R=g', group 1 (= g) has share α and every other
    group h its pool proportion of the rest, and is scored too. ``crowding`` > 0 breaks the joint assumption: a
    group then also loses that much per unit of another group's share."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for s in seeds:
        for g, top in TOPS.items():
            for alpha in np.round(np.linspace(0, 1, 11), 2):
                rows.append({"alloc_attribute": f"R={g}", "attribute": f"R={g}", "grp": 1, "metric": "bal_acc",
                             "alpha": float(alpha), "seed": s, "boot": None,
                             "value": float(curve(np.array(alpha * K), top) + rng.normal(0, noise))})
                rows.append({**rows[-1], "grp": 0, "value": 0.9})  # the rest: not used by the joint fit
                for h, top_h in TOPS.items():
                    if h != g:
                        share = (1 - alpha) * POOL[h] / (sum(POOL.values()) - POOL[g])
                        value = curve(np.array(share * K), top_h) - crowding * alpha + rng.normal(0, noise)
                        rows.append({**rows[-1], "attribute": f"R={h}", "grp": 1, "value": float(value)})
    return rows


def joint_optimum(budget: int, bounds: dict[str, float] | None = None) -> np.ndarray:
    """The worst group's optimum of the true curves, searched on a fine grid of its own."""
    grid = np.array([(a, b, 1 - a - b) for a in np.linspace(0, 1, 401) for b in np.linspace(0, 1, 401)
                     if a + b <= 1 + 1e-12])
    low = np.array([(bounds or {}).get(g, 0.0) for g in TOPS])
    grid = grid[(grid >= low - 1e-12).all(axis=1) & (grid > 0).all(axis=1)]
    worst = np.min([curve(grid[:, j] * budget, top) for j, top in enumerate(TOPS.values())], axis=0)
    return grid[np.argmax(worst)]


def test_simplex_grid_and_whole_counts():
    from engine.recommend import simplex_grid, whole_counts

    for k_groups, step in ((2, 0.005), (3, 0.01), (4, 0.025)):
        grid = simplex_grid(k_groups)
        assert np.allclose(grid.sum(axis=1), 1.0) and (grid >= 0).all() and len(np.unique(grid, axis=0)) == len(grid)
        assert np.min(grid[grid > 0]) == pytest.approx(step)
    assert whole_counts(np.array([1 / 3, 1 / 3, 1 / 3]), 100) == [34, 33, 33]
    assert sum(whole_counts(np.array([0.125, 0.375, 0.5]), 7)) == 7


def test_joint_recommendation_finds_the_known_optimum():
    from engine.recommend import recommend_joint

    rec = recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=K)
    truth = joint_optimum(K)
    assert np.abs(np.array(rec["shares"]) - truth).max() <= 0.03, (rec["shares"], truth)
    assert rec["shares"][2] > rec["shares"][1] > rec["shares"][0]  # the harder the group, the larger its share
    assert sum(rec["counts"]) == K and rec["extrapolation"] == "" and not rec["binding"]
    assert all(lo <= p <= hi for lo, p, hi in zip(rec["pred_low"], rec["preds"], rec["pred_high"]))
    assert rec["objective_value"] == pytest.approx(min(rec["preds"]))
    (equal,) = rec["alternatives"]
    assert equal["shares"] == pytest.approx([0.33, 0.33, 0.34]) and equal["loses"] > 0
    assert "own share only" in rec["assumption"]


def test_joint_recommendation_under_binding_bounds_and_a_larger_budget():
    from engine.recommend import recommend_joint

    rec = recommend_joint(joint_curves(seeds=range(1, 7)), "R", list(TOPS), k=K, budget=K, min_share={"a": 0.4})
    assert rec["binding"] and rec["shares"][0] == pytest.approx(0.4)
    assert np.abs(np.array(rec["shares"]) - joint_optimum(K, {"a": 0.4})).max() <= 0.03
    free = [a for a in rec["alternatives"] if a["name"] == "unconstrained optimum"][0]
    assert free["shares"][0] < 0.4 and free["loses"] < 0
    assert rec["interval"].startswith("expanded percentile bootstrap over seeds")
    big = recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=4 * K)
    assert "above the fitted range" in big["extrapolation"]
    with pytest.raises(ValueError, match="no group 'z'"):
        recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=K, min_share={"z": 0.1})
    with pytest.raises(ValueError, match="add up to more than 1"):
        recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=K, min_share={"a": 0.6, "b": 0.6})


def test_the_joint_assumption_is_checked_on_the_other_sweeps():
    """Where a group's metric depends on its own share only, its curve predicts it in the other groups' sweeps as
    well as in its own; where the others' shares also cost it (crowding), the check says so."""
    from engine.recommend import recommend_joint

    holds = recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=K, pool=POOL)
    assert holds["check_n"] == 3 * 2 * 10 * 3  # 3 sweeps x 2 other groups x 10 shares > 0 x 3 seeds
    assert holds["check_rmse"] < 2 * holds["fit_rmse"] and abs(holds["check_bias"]) < 0.002
    broken = recommend_joint(joint_curves(crowding=0.1), "R", list(TOPS), k=K, budget=K, pool=POOL)
    assert broken["check_rmse"] > 10 * broken["fit_rmse"] and broken["check_bias"] < -0.03
    assert np.isnan(recommend_joint(joint_curves(), "R", list(TOPS), k=K, budget=K)["check_rmse"])
    from engine.recommend import assumption_warning

    assert assumption_warning(holds["check_rmse"], holds["fit_rmse"], holds["check_n"]) == ""
    warning = assumption_warning(broken["check_rmse"], broken["fit_rmse"], broken["check_n"])
    assert "does not hold well here" in warning and "rough guide" in warning
    assert assumption_warning(float("nan"), 0.01, 0) == ""


def test_recommendation_intervals_cover_the_true_curves():
    """Coverage by simulation. Unit of replication: the seed (each seed's sweep has its own noise); the interval is
    the expanded percentile bootstrap over 6 seeds (Hesterberg), for each group's expected metric at the
    recommended shares. Measured with 200 draws over 40 studies: binary 95%, joint (3 groups) 92.5%; the plain
    percentile interval gave 91% and 85%. Here, with 100 draws (run time), both recommenders: 90.5% of 200 cells;
    the test fails below 88%."""
    from engine.recommend import recommend_joint

    rng = np.random.default_rng(7)
    hits = []
    for study in range(40):
        rec = recommend_joint(joint_curves(seeds=range(1, 7), noise=0.01, rng_seed=100 + study), "R", list(TOPS),
                              k=K, budget=K, n_boot=100, seed=study)
        assert rec["interval"] == "expanded percentile bootstrap over seeds"
        for share, lo, hi, top in zip(rec["shares"], rec["pred_low"], rec["pred_high"], TOPS.values()):
            hits.append(lo <= float(curve(np.array(share * K), top)) <= hi)
        rows = [{**r, "value": r["value"] + float(rng.normal(0, 0.01))} for r in curves(seeds=range(1, 7), noise=0.0)]
        one = recommend_one(rows, "A", k=K, budget=K, n_boot=100, seed=study)
        for g, top, share in ((0, 0.95, 1 - one["alpha"]), (1, 0.85, one["alpha"])):
            hits.append(one[f"pred_g{g}_low"] <= float(curve(np.array(share * K), top)) <= one[f"pred_g{g}_high"])
    assert np.mean(hits) >= 0.88, np.mean(hits)
