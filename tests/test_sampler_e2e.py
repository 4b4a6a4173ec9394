"""allocation.sampler = "stratified" through the CLI on tiny real MNIST: P(Y) of every fine-tuning set stays at the
pool's while α moves (natural lets it drift: parity depends on the digit group), the report says which sampler ran
and shows P(Y) per α, and an infeasible budget is refused at validation naming the cell and the largest budget."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from tests.conftest import TINY_SPEC


def tiny(sampler: str, budget: str = '"auto"') -> str:
    return (TINY_SPEC.read_text().replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]")
            .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
            .replace('budget = "auto"\n', f'budget = {budget}\nsampler = "{sampler}"\n')
            .replace("max_epochs = 15", "max_epochs = 5"))


def test_stratified_holds_p_y_fixed_across_alpha(tmp_path: Path, alloclab) -> None:
    (tmp_path / "s.toml").write_text(tiny("stratified"))
    res = alloclab("run", "s.toml", "--num-cpus", "2")
    assert res.returncode == 0, res.stderr
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    rows = con.sql("SELECT t.alpha, t.p_y_train, t.budget FROM trials t WHERE t.attribute = 'digit_group' "
                   "AND t.status = 'done'").fetchall()
    # what the natural sampler would give at α = 0 and 1: each group's own P(Y=1) in the pool (parity is 0.6
    # among digits >= 5, 0.4 below), so P(Y) of its sets drifts with α; tests/test_sampling.py runs both samplers
    own = dict(con.sql("SELECT g.grp, avg(i.y) FROM items i JOIN item_groups g USING (dataset_id, item_id) "
                       "WHERE i.split = 'pool_train' AND g.attribute = 'digit_group' GROUP BY 1").fetchall())
    con.close()
    k = rows[0][2]
    assert max(p for _, p, _ in rows) - min(p for _, p, _ in rows) <= 2 / k  # one item per group of rounding
    assert own[1] - own[0] > 0.1
    html = alloclab("report", "s.toml")
    assert html.returncode == 0, html.stderr
    text = (tmp_path / html.stdout.strip()).read_text()
    assert "Sampler: stratified" in text and "P(Y=1) of the allocated fine-tuning train set per α" in text


def test_a_budget_a_cell_cannot_supply_is_refused_at_validation(tmp_path: Path, alloclab) -> None:
    (tmp_path / "s.toml").write_text(tiny("stratified", budget="1000"))
    res = alloclab("validate", "s.toml")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "allocation.budget: 1000 needs" in res.stderr and re.search(r"items from group [01], class [01] of .digit_group.", res.stderr)
    most = int(res.stderr.split("use at most ")[1].split()[0])
    (tmp_path / "ok.toml").write_text(tiny("stratified", budget=str(most)))
    ok = alloclab("validate", "ok.toml")
    assert ok.returncode == 0, ok.stderr
