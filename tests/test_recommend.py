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
    assert rec["interval"].startswith("percentile bootstrap over seeds")
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
    assert unknown.returncode == 2 and "unknown attribute 'random'" in unknown.stderr
