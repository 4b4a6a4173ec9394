"""Your own embeddings: dataset kind `table` + backbone kind `precomputed`, through the real CLI and local Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

N, D = 1600, 12


def write_inputs(tmp: Path) -> tuple[Path, Path]:
    """Items whose embeddings separate groups of 'site' (a shifted cluster) but not of 'batch'."""
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 1000 + N)
    y = rng.integers(0, 2, N)
    site = rng.integers(0, 2, N)
    batch = rng.integers(0, 2, N)
    z = rng.normal(size=(N, D)).astype(np.float32)
    z[:, 0] += 1.5 * y  # the task signal
    z[:, 1:4] += 2.0 * site[:, None]  # site is separated in the latent space
    table = tmp / "items.csv"
    table.write_text("id,label,site,batch,age\n" + "".join(
        f"{i},{a},{b},{c},{20 + (i % 60)}\n" for i, a, b, c in zip(ids, y, site, batch)))
    emb = tmp / "emb.parquet"
    pq.write_table(pa.table({"id": ids[::-1], "embedding": pa.array(list(z[::-1]), pa.list_(pa.float32()))}), emb)
    return table, emb


SPEC = """
[experiment]
name = "own"
description = "Precomputed embeddings from a file."

[dataset]
kind = "table"
options = {{ path = "{table}", id_column = "id", test_fraction = 0.25, val_fraction = 0.2 }}
null_partitions = 1

[task]
column = "label"

[[attributes]]
name = "site"
column = "site"

[[attributes]]
name = "batch"
column = "batch"

[[attributes]]
name = "older"
column = "age"
threshold = 50

[backbone]
kind = "precomputed"
options = {{ path = "{emb}" }}

[separation]
distances = ["tv_paper", "tv", "wasserstein", "probe_auc"]
permutations = 100
bootstrap = 30

[allocation]
alpha = [0.0, 0.5, 1.0]
seeds = [1, 2]

[finetune]
max_epochs = 20
patience = 5
"""


@pytest.mark.slow
def test_screen_and_sweep_on_precomputed_embeddings(tmp_path: Path, alloclab) -> None:
    table, emb = write_inputs(tmp_path)
    spec = tmp_path / "own.toml"
    spec.write_text(SPEC.format(table=table, emb=emb))
    screen = alloclab("screen", spec, "--num-cpus", "2")
    assert screen.returncode == 0, screen.stderr
    lines = [ln.split() for ln in screen.stdout.splitlines() if re.match(r"\s+(site|batch|older|random)\s", ln)]
    tv = [ln for ln in lines if ln[1] == "tv_paper"]
    assert tv[0][0] == "site" and "separated:" in " ".join(tv[0])  # ranked first, called separated
    for row in tv[1:]:
        assert "not" in " ".join(row) or "null partition" in " ".join(row), row
    run = alloclab("run", spec, "--num-cpus", "2")
    assert run.returncode == 0, run.stderr
    assert "trials: 24 run, 0 done before" in run.stdout  # 3 attributes + 1 null partition x 3 α x 2 seeds
    assert "pretrain: 0 run, 1 done before" in run.stdout  # screening already did the upstream stages
    q = alloclab("sql", "SELECT attribute, distance, calibrated, p_value FROM separations", "--format", "json")
    seps = json.loads(q.stdout)
    random_cal = [r["calibrated"] for r in seps if r["attribute"] == "random"]
    assert random_cal and all(abs(c) < 0.05 for c in random_cal)  # the null baseline lands near zero
    rep = alloclab("report", spec)
    assert rep.returncode == 0, rep.stderr
    assert "site" in (tmp_path / "reports" / "own.html").read_text()


BAD_FILES = {
    "missing ids": (pa.table({"id": np.arange(1000, 1010), "embedding": pa.array([[0.0, 1.0]] * 10)}), "lacks"),
    "nan vectors": (None, "NaN"),
    "ragged rows": (None, "ragged"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_embedding_file_is_caught_by_validate_before_run_writes(tmp_path: Path, alloclab, case: str) -> None:
    table, good = write_inputs(tmp_path)
    emb = tmp_path / "bad.parquet"
    bad, expected = BAD_FILES[case]
    if bad is None:  # start from the good file and break one row
        rows = pq.read_table(good).to_pylist()
        rows[3]["embedding"] = [float("nan")] * len(rows[3]["embedding"]) if case == "nan vectors" \
            else rows[3]["embedding"][:-1]
        bad = pa.Table.from_pylist(rows)
    pq.write_table(bad, emb)
    spec = tmp_path / "own.toml"
    spec.write_text(SPEC.format(table=table, emb=emb))
    val = alloclab("validate", spec)
    assert val.returncode == 2 and "ok" not in val.stdout, val.stdout
    assert "Traceback" not in val.stderr and str(emb) in val.stderr and expected in val.stderr
    assert val.stderr.count(str(emb)) == 1  # said once, not once per stage
    res = alloclab("run", spec, "--num-cpus", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert not (tmp_path / "results.duckdb").exists()  # nothing was written before the check


def test_expression_rules(tmp_path: Path) -> None:
    """Binarisation by a SQL expression over several columns, and its error naming the field and the columns."""
    import pytest

    from engine.data import prepare
    from engine.errors import SpecError
    from engine.spec import parse_spec

    table, emb = write_inputs(tmp_path)
    doc = SPEC.format(table=table, emb=emb).replace('name = "older"\ncolumn = "age"\nthreshold = 50',
                                                     'name = "older_site"\nexpression = "age >= 50 AND site = 1"')
    import tomllib

    (spec,) = parse_spec(tomllib.loads(doc), tmp_path / "x.toml")
    prep = prepare(spec)
    for split in ("pool_train", "test"):
        sd = prep.splits[split]
        cols = prep.bundle.splits[split].columns
        expected = ((cols["age"] >= 50) & (cols["site"] == 1)).astype(int)
        assert np.array_equal(sd.groups["older_site"], expected)
    bad = tomllib.loads(doc.replace("age >= 50 AND site = 1", "agee >= 50"))
    (spec,) = parse_spec(bad, tmp_path / "x.toml")
    with pytest.raises(SpecError, match=r"attributes\[2\]\.expression: .*agee.*fix: a SQL boolean expression"):
        prepare(spec, tmp_path / "x.toml")
    with pytest.raises(SpecError, match="either 'column'"):
        parse_spec(tomllib.loads(doc.replace('name = "older_site"', 'name = "older_site"\ncolumn = "age"')),
                   tmp_path / "x.toml")
