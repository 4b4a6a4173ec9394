"""Attributes with K >= 3 groups and intersections (issue 13, part 4, first slice): run as one one-vs-rest binary
attribute per group ('region=north', ...), through the real CLI on a generated table with precomputed embeddings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine.errors import SpecError
from engine.spec import parse_spec

N = 600
SPLITS = ["pool_train"] * 6 + ["pool_val"] * 2 + ["test"] * 2


def _data(tmp: Path) -> Path:
    """600 items: region a/b/c (c carries a shift in the embedding), sex and old 0/1, a label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    region = np.array(["a", "b", "c"])[np.arange(N) % 3]
    sex, old = rng.integers(0, 2, N), rng.integers(0, 2, N)
    y = rng.integers(0, 2, N)
    emb = rng.normal(size=(N, 6)) + np.outer(y, [1.0, 0, 0, 0, 0, 0]) + np.outer(region == "c", [0, 1.5, 0, 0, 0, 0])
    ids = np.arange(5000, 5000 + N)
    rows = ["id,split,label,region,sex,old"] + [f"{ids[i]},{SPLITS[i % 10]},{y[i]},{region[i]},{sex[i]},{old[i]}"
                                                for i in range(N)]
    (tmp / "items.csv").write_text("\n".join(rows) + "\n")
    pq.write_table(pa.table({"id": ids, "embedding": pa.array(emb.tolist())}), tmp / "emb.parquet")
    return tmp / "items.csv"


SPEC = """
[experiment]
name = "groups"
[dataset]
kind = "table"
options = {{ path = "{table}", split_column = "split" }}
null_partitions = 1
[task]
column = "label"
[[attributes]]
name = "region"
column = "region"
values = {{ north = ["a"], south = ["b"], east = ["c"] }}
[[attributes]]
name = "sex"
column = "sex"
[[attributes]]
name = "old"
column = "old"
[[attributes]]
name = "sex_old"
intersection = ["sex", "old"]
[backbone]
kind = "precomputed"
options = {{ path = "{emb}" }}
pretrain = {{ max_epochs = 0 }}
[allocation]
alpha = [0.0, 0.25, 0.5, 0.75, 1.0]
budget = 20
budget_val = 8
seeds = [1, 2]
[finetune]
mode = "last_layer"
max_epochs = 10
[separation]
permutations = 20
bootstrap = 0
[analysis]
test_resamples = 20
"""


def test_groups_and_intersections_run_one_vs_rest(tmp_path: Path, alloclab) -> None:
    table = _data(tmp_path)
    (tmp_path / "g.toml").write_text(SPEC.format(table=table, emb=tmp_path / "emb.parquet"))
    r = alloclab("run", "g.toml", "--serial", "--quiet")
    assert r.returncode == 0, r.stderr
    r = alloclab("sql", "SELECT attribute, sum(grp) AS n1, count(*) AS n FROM item_groups GROUP BY 1 ORDER BY 1",
                 "--format", "json")
    groups = {x["attribute"]: (x["n1"], x["n"]) for x in json.loads(r.stdout)}
    expected = {"region=north", "region=south", "region=east", "sex", "old", "sex_old=sex0_old0",
                "sex_old=sex0_old1", "sex_old=sex1_old0", "sex_old=sex1_old1", "random"}
    assert set(groups) == expected
    assert all(groups[f"region={g}"] == (N // 3, N) for g in ("north", "south", "east"))  # one vs the rest
    assert sum(groups[f"sex_old=sex{s}_old{o}"][0] for s in (0, 1) for o in (0, 1)) == N  # the cells partition
    r = alloclab("sql", "SELECT attribute, count(*) AS n FROM trials WHERE status = 'done' GROUP BY 1", "--format",
                 "json")
    assert {x["attribute"]: x["n"] for x in json.loads(r.stdout)} == {a: 10 for a in expected}
    r = alloclab("sql", "SELECT attribute, value FROM separations WHERE distance = 'tv_paper'", "--format", "json")
    tv = {x["attribute"]: x["value"] for x in json.loads(r.stdout)}
    assert tv["region=east"] > max(tv["region=north"], tv["region=south"])  # the shifted group stands out
    r = alloclab("sql", "SELECT attribute, group_a, group_b, calibrated FROM group_separations ORDER BY 1, 2, 3",
                 "--format", "json")
    pairs = {(x["attribute"], x["group_a"], x["group_b"]): x["calibrated"] for x in json.loads(r.stdout)}
    assert len([k for k in pairs if k[0] == "region"]) == 3 and len([k for k in pairs if k[0] == "sex_old"]) == 6
    # east carries the shift: it is further from north and south than they are from each other
    assert min(pairs[("region", "north", "east")], pairs[("region", "south", "east")]) > pairs[
        ("region", "north", "south")]
    # the budget split among region's three groups at once, under a lower bound on north that binds (east, the
    # shifted group, stays the worst and takes everything it is allowed)
    r = alloclab("recommend", "g.toml", "--budget", "20", "--attribute", "region", "--min-share", "region:north=0.3")
    assert r.returncode == 0, r.stderr
    assert "region (3 groups at once): north " in r.stdout and "assumes: each group's metric" in r.stdout
    assert "checked on the other groups' sweeps (48 points)" in r.stdout  # 3 sweeps x 2 others x 4 shares x 2 seeds
    assert "vs unconstrained optimum (0.000 / 0.000 / 1.000)" in r.stdout
    r = alloclab("sql", "SELECT group_label, share, n, pred, pred_low, pred_high, binding FROM joint_recommendations "
                 "ORDER BY position", "--format", "json")
    joint = json.loads(r.stdout)
    assert [x["group_label"] for x in joint] == ["north", "south", "east"]
    assert sum(x["share"] for x in joint) == pytest.approx(1.0) and sum(x["n"] for x in joint) == 20
    assert joint[0]["share"] == pytest.approx(0.3) and joint[2]["share"] == pytest.approx(0.7) and joint[0]["binding"]
    assert all(x["pred_low"] <= x["pred"] <= x["pred_high"] for x in joint)
    bad = alloclab("recommend", "g.toml", "--budget", "20", "--min-share", "region:west=0.2")
    assert bad.returncode == 2 and "no group 'west'" in bad.stderr
    r = alloclab("report", "g.toml")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "reports" / "groups.html").read_text()
    assert "split among its 3" in html and "joint_recommendations" in html
    assert "region=east" in html and "sex_old=sex1_old0" in html and "Groups of region" in html
    assert 'aria-label="region: calibrated TV between each pair of its 3 groups"' in html


def test_group_rules_are_checked(tmp_path: Path) -> None:
    base = {"experiment": {"name": "x"}, "dataset": {"kind": "table", "options": {"path": "t.csv"}},
            "task": {"column": "label"}, "backbone": {"kind": "precomputed"}, "allocation": {"alpha": [0.5]}}
    cases = {
        "one group": ([{"name": "r", "column": "r", "values": {"a": [1]}}], "at least 2 groups"),
        "shared value": ([{"name": "r", "column": "r", "values": {"a": [1], "b": [1, 2]}}], "in groups 'a' and 'b'"),
        "later component": ([{"name": "i", "intersection": ["s", "o"]}, {"name": "s", "column": "s"},
                             {"name": "o", "column": "o"}], re.escape("x.toml: attributes[0].intersection: ['s', 'o'] not among")),
        "column and intersection": ([{"name": "s", "column": "s"}, {"name": "o", "column": "o"},
                                     {"name": "i", "column": "s", "intersection": ["s", "o"]}], "give no column"),
    }
    for name, (attrs, message) in cases.items():
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, "attributes": attrs}, tmp_path / "x.toml")
    spec = parse_spec({**base, "attributes": [{"name": "s", "column": "s"}, {"name": "r", "column": "r", "values": {
        "a": [1], "b": [2], "c": [3]}}, {"name": "i", "intersection": ["s", "r"]}]}, tmp_path / "x.toml")[0]
    assert spec.allocated_names == ["s", "r=a", "r=b", "r=c", "i=s0_ra", "i=s0_rb", "i=s0_rc", "i=s1_ra", "i=s1_rb",
                                    "i=s1_rc"]


def test_categories_become_groups_from_the_data(tmp_path: Path, alloclab) -> None:
    """groups = "categories": every distinct value of the column is a group, resolved when the spec is run."""
    table = _data(tmp_path)
    text = SPEC.format(table=table, emb=tmp_path / "emb.parquet").replace(
        'values = {{ north = ["a"], south = ["b"], east = ["c"] }}'.replace("{{", "{").replace("}}", "}"),
        'groups = "categories"')
    (tmp_path / "c.toml").write_text(text)
    r = alloclab("validate", "c.toml", "--no-data")
    assert r.returncode == 0 and "known once the data is read" in r.stdout, r.stderr
    r = alloclab("validate", "c.toml")
    assert r.returncode == 0 and "region=a,region=b,region=c" in r.stdout, r.stdout + r.stderr
    r = alloclab("plan", "c.toml")
    assert r.returncode == 0, r.stderr
