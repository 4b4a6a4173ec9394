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
            .replace('budget = "auto"\n', f'budget = {budget}\nsampler = "{sampler}"\n'))


def test_stratified_holds_p_y_fixed_across_alpha(tmp_path: Path, alloclab) -> None:
    (tmp_path / "s.toml").write_text(tiny("stratified"))
    (tmp_path / "n.toml").write_text(tiny("natural").replace('name = "tiny_mnist"', 'name = "tiny_natural"'))
    for spec in ("s.toml", "n.toml"):
        res = alloclab("run", spec, "--num-cpus", "2")
        assert res.returncode == 0, res.stderr
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    rows = con.sql("SELECT e.experiment, t.alpha, t.p_y_train, t.budget FROM experiment_trials e JOIN trials t "
                   "USING (trial_id) WHERE t.attribute = 'digit_group' AND t.status = 'done'").fetchall()
    strat = [(a, p, k) for s, a, p, k in rows if s == "tiny_mnist"]
    nat = [(a, p) for s, a, p, _ in rows if s == "tiny_natural"]
    k = strat[0][2]
    assert max(p for _, p, _ in strat) - min(p for _, p, _ in strat) <= 2 / k  # one item per group of rounding
    by_alpha = {a: p for a, p in nat}
    assert by_alpha[1.0] - by_alpha[0.0] > 0.1  # parity's P(Y=1) is 0.6 among digits >= 5, 0.4 below
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
