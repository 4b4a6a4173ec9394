"""protocol 'expand' (issue 13, part 3): spec rules, the count samplers, the expansion slopes' interval coverage by
simulation, and an expand run through the real CLI on real MNIST digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import expansion
from engine.sampling import COUNT_SAMPLERS, SAMPLERS, expand_counts, n_group1
from engine.spec import AllocationSpec, SizeRange

# ---------------------------------------------------------------- spec


def test_expand_fields_and_their_rules() -> None:
    a = AllocationSpec(protocol="expand", base=300, sizes={"start": 100, "stop": 1600, "num": 5})
    assert a.counts == [100, 200, 400, 800, 1600] and a.alphas == [0.5] and a.grow == [0, 1]
    assert SizeRange(start=250, stop=4000, num=5).values() == [250, 500, 1000, 2000, 4000]
    assert AllocationSpec(protocol="expand", base="auto", sizes=[400, 100, 100, 200]).counts == [100, 200, 400]
    for kwargs, message in [
        ({"protocol": "expand", "base": 300}, "allocation.sizes: missing"),
        ({"protocol": "expand", "sizes": [1, 2]}, "allocation.base: missing"),
        ({"protocol": "expand", "base": 3, "sizes": [5, 5]}, "at least 2 different counts"),
        ({"protocol": "expand", "base": 3, "sizes": [5, 6], "alpha": [0.5]}, "allocation.alpha: protocol 'expand'"),
        ({"alpha": [0.5], "base": 300}, "allocation.base: applies to protocol = \"expand\" only"),
        ({}, "allocation.alpha: missing"),
    ]:
        with pytest.raises(ValueError, match=message):
            AllocationSpec(**kwargs)


def test_count_samplers_draw_what_the_alpha_samplers_draw() -> None:
    """Re-allocation trials keep their subsets (same streams); counts grow nested, the other group stays fixed."""
    rng = np.random.default_rng(0)
    groups, y = rng.integers(0, 2, size=3000), rng.integers(0, 2, size=3000)
    for name in ("natural", "stratified"):
        for alpha in (0.0, 0.3, 0.5, 1.0):
            n1 = n_group1(alpha, 800)
            a = SAMPLERS[name](groups, y, alpha, 800, 7, 0)
            b = COUNT_SAMPLERS[name](groups, y, 800 - n1, n1, 7, 0)
            assert np.array_equal(a, b)
        small = set(COUNT_SAMPLERS[name](groups, y, *expand_counts(200, 100, 1), 7, 0).tolist())
        large = set(COUNT_SAMPLERS[name](groups, y, *expand_counts(200, 600, 1), 7, 0).tolist())
        assert small < large  # nested as group 1 grows
        assert {i for i in small if groups[i] == 0} == {i for i in large if groups[i] == 0}  # group 0 fixed
        assert sum(groups[i] == 1 for i in large) == 600


# ---------------------------------------------------------------- intervals: coverage by simulation

SIZES = np.array([100, 200, 400, 800, 1600])
SEEDS, N_ITEMS, B, DRAWS = (1, 2, 3), 250, 200, 300


def _study(rng: np.random.Generator, beta_own: float, beta_other: float) -> list[dict]:
    """One expand study's metric rows: per seed and size, the grown group (1) and the fixed group (0) on one finite
    test set, with a head shared by both groups (per-seed offset and drift), nested subsets (a random walk along the
    sizes), per-group drifts and an item-by-run interaction; B paired test resamples shared by every run."""
    x = SIZES / 1000.0
    rows = []
    shared = {s: 0.01 * rng.normal() + 0.004 * rng.normal() * x + np.cumsum(0.002 * rng.normal(size=x.size))
              for s in SEEDS}
    for grp, beta in ((1, beta_own), (0, beta_other)):
        a = 0.3 + 0.2 * rng.normal(size=N_ITEMS)
        c = beta + 0.05 * rng.normal(size=N_ITEMS)
        idx = rng.integers(0, N_ITEMS, size=(B, N_ITEMS)) + (np.arange(B) * N_ITEMS)[:, None]
        w = np.bincount(idx.ravel(), minlength=B * N_ITEMS).reshape(B, N_ITEMS).astype(float)
        for s in SEEDS:
            drift = 0.003 * rng.normal() * x + np.cumsum(0.001 * rng.normal(size=x.size))
            items = (a[:, None] + c[:, None] * x[None, :] + (shared[s] + drift)[None, :]
                     + 0.02 * rng.normal(size=(N_ITEMS, x.size)))
            boot = w @ items / N_ITEMS
            for j, size in enumerate(SIZES):
                rows.append({"alloc_attribute": "a", "grown": 1, "added": int(size), "seed": s, "attribute": "a",
                             "grp": grp, "metric": "loss", "value": float(items[:, j].mean()), "boot": boot[:, j]})
    return rows


def test_expansion_slope_intervals_cover_the_truth() -> None:
    rng = np.random.default_rng(5)
    beta_own, beta_other = -0.05, 0.02
    truth = {"grown": beta_own, "other": beta_other, "difference": beta_own - beta_other}
    hits = dict.fromkeys(truth, 0)
    for _ in range(DRAWS):
        rows = {r["role"]: r for r in expansion.slope_rows(expansion.cells(_study(rng, beta_own, beta_other)))}
        for role, b in truth.items():
            hits[role] += rows[role]["ci_low"] <= b <= rows[role]["ci_high"]
    for role, h in hits.items():
        assert 0.90 <= h / DRAWS <= 0.99, (role, h / DRAWS)


def test_fits_prefer_the_power_law_on_a_saturating_curve() -> None:
    rows = []
    for s in SEEDS:
        for size in SIZES:
            for grp in (0, 1):
                v = 0.2 + 3.0 * size ** -0.6 if grp == 1 else 0.4
                rows.append({"alloc_attribute": "a", "grown": 1, "added": int(size), "seed": s, "attribute": "a",
                             "grp": grp, "metric": "loss", "value": v + 1e-4 * s, "boot": None})
    fitted = {f["model"]: f for f in expansion.fit_rows(expansion.cells(rows))}
    assert fitted["power"]["preferred"] and not fitted["linear"]["preferred"]
    expected = 3.0 * (2600 ** -0.6 - 1600 ** -0.6)
    assert fitted["power"]["next_1000"] == pytest.approx(expected, rel=0.05)


def test_attribute_rows_average_the_difference_over_grown_groups():
    slopes = [{"attribute": "a", "metric": "loss", "role": "difference", "grown": 0, "slope": -0.2},
              {"attribute": "a", "metric": "loss", "role": "difference", "grown": 1, "slope": -0.4},
              {"attribute": "a", "metric": "loss", "role": "grown", "grown": 1, "slope": -0.9},
              {"attribute": "random", "metric": "loss", "role": "difference", "grown": 1, "slope": float("nan")}]
    assert expansion.attribute_rows(slopes) == [{"attribute": "a", "metric": "loss", "slope": pytest.approx(-0.3)}]


# ---------------------------------------------------------------- the CLI on real digits

SPEC = """
[experiment]
name = "expand_mnist"
[dataset]
kind = "colored_mnist"
options = { limit_train = 1600, limit_test = 800 }
null_partitions = 2
[task]
column = "parity"
[[attributes]]
name = "digit_group"
column = "digit"
threshold = 5
[backbone]
kind = "simple_cnn"
pretrain = { max_epochs = 2, patience = 2 }
[allocation]
protocol = "expand"
base = 150
sizes = [50, 100, 200, 400]
seeds = [1, 2, 3]
[finetune]
mode = "last_layer"
max_epochs = 12
patience = 4
[analysis]
test_resamples = 30
"""


@pytest.mark.slow
def test_expand_run_through_the_cli(tmp_path: Path, alloclab) -> None:
    (tmp_path / "ex.toml").write_text(SPEC)
    r = alloclab("run", "ex.toml", "--quiet")
    assert r.returncode == 0, r.stderr
    r = alloclab("sql", "SELECT attribute, CAST(json_extract(config_json, '$.grown') AS INTEGER) AS grown, budget, "
                 "n_train_g1 FROM trials WHERE json_extract_string(config_json, '$.added') = '400' ORDER BY 1, 2",
                 "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {(x["grown"], x["budget"], x["n_train_g1"]) for x in rows} == {(0, 550, 150), (1, 550, 400)}
    r = alloclab("sql", "SELECT attribute, grown, slope, ci_low, ci_high, beyond_null FROM expansion_slopes "
                 "WHERE metric = 'loss' AND role = 'difference' ORDER BY 1, 2", "--format", "json")
    diff = {(x["attribute"], x["grown"]): x for x in json.loads(r.stdout)}
    assert len(diff) == 6  # digit_group, random, random_2; two grown groups each
    # a digit group's own data helps it more than the other group (with 3 seeds of a tiny run, one of the two
    # differences is beyond the null range; the other's seed interval is wide)
    assert all(diff[("digit_group", g)]["slope"] < -0.2 for g in (0, 1))
    assert any(diff[("digit_group", g)]["beyond_null"] is True for g in (0, 1))
    assert all(diff[(a, g)]["beyond_null"] is None for a in ("random", "random_2") for g in (0, 1))
    r = alloclab("sql", "SELECT attribute, matters, text FROM verdicts", "--format", "json")
    verdict = {x["attribute"]: x for x in json.loads(r.stdout)}
    assert verdict["digit_group"]["matters"] and "each extra 1000 items of group 1" in verdict["digit_group"]["text"]
    r = alloclab("sql", "SELECT count(*) AS n FROM slopes", "--format", "json")
    assert json.loads(r.stdout) == [{"n": 0}]  # no α: the re-allocation tables stay empty
    r = alloclab("sql", "SELECT DISTINCT y, n FROM correlations WHERE distance = 'tv_paper'", "--format", "json")
    assert json.loads(r.stdout) == [{"y": "slope", "n": 2}]  # digit_group and the null partitions as one point
    r = alloclab("report", "ex.toml")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "reports" / "expand_mnist.html").read_text()
    assert "Does separation predict what more data buys?" in html
    assert 'id="expand"' in html and "group 0 − group 1 (paired)" in html and 'id="curves"' not in html
    r = alloclab("recommend", "ex.toml", "--budget", "500")
    assert r.returncode == 2 and "protocol 'expand'" in r.stderr
    r = alloclab("report", "--experiments", "expand_mnist,expand_mnist")
    assert r.returncode == 2 and "ran protocol 'expand', and a pooled report" in r.stderr
    r = alloclab("run", "ex.toml", "--serial", "--quiet")
    assert r.returncode == 0 and "trials: 0 run, 72 done before" in r.stdout


def test_a_bad_expand_spec_is_one_line(tmp_path: Path, alloclab) -> None:
    (tmp_path / "bad.toml").write_text(SPEC.replace("sizes = [50, 100, 200, 400]\n", ""))
    r = alloclab("validate", "bad.toml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "bad.toml: allocation.sizes: missing for protocol 'expand'; fix:" in r.stderr
    (tmp_path / "big.toml").write_text(SPEC.replace("[50, 100, 200, 400]", "[50, 100, 200, 4000]"))
    r = alloclab("validate", "big.toml")
    assert r.returncode == 2 and "allocation.sizes: needs 4000 items from group" in r.stderr
