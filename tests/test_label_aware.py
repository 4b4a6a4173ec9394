"""Label-aware separation: `tv_label` and `transfer` on synthetic embeddings with a known answer, through the CLI.

Three attributes of one item table (N items, D dimensions, the label on dimension 0):
- `ortho`: the groups are far apart, but only along dimensions 1-3, which carry no label information: TV is high,
  yet a head trained on either group uses dimension 0 and works on the other (transfer gap about 0);
- `flip`: the groups use different label directions (group 1's label is on dimension 4, not 0): a head trained on
  one group fails on the other (large transfer gap);
- `batch`: a random grouping (null).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.separation import estimate, estimate_label_tv

N, D = 4000, 8


def synthetic(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, N)
    ortho, flip, batch = (rng.integers(0, 2, N) for _ in range(3))
    z = rng.normal(size=(N, D))
    signal = 2.0 * (y - 0.5)
    z[:, 0] += np.where(flip == 1, 0.0, signal)  # flip: group 1 has its label on dimension 4 instead
    z[:, 4] += np.where(flip == 1, signal, 0.0)
    z[:, 1:4] += 2.5 * ortho[:, None]  # ortho: far apart along label-free directions
    return {"z": z.astype(np.float32), "y": y, "ortho": ortho, "flip": flip, "batch": batch}


def test_tv_label_sees_only_label_relevant_separation():
    d = synthetic()
    kw = {"permutations": 50, "bootstrap": 0, "seed": 0}
    for attr in ("ortho", "flip", "batch"):
        tv = estimate(d["z"], d["y"], d[attr], distance="tv_paper", **kw)
        lab = estimate_label_tv(d["z"], d["y"], d[attr], **kw)
        assert lab["distance"] == "tv_label" and lab["params"]["label_direction"].startswith("out-of-fold")
        if attr == "ortho":
            assert tv["calibrated"] > 0.1 and tv["p_value"] < 0.05  # TV: far apart
            assert abs(lab["calibrated"]) < 0.05  # along the label direction: not
        if attr == "batch":
            assert abs(tv["calibrated"]) < 0.03 and abs(lab["calibrated"]) < 0.05
        if attr == "flip":  # one pooled label direction, (dim 0 + dim 4)/√2: both groups sit at the same place
            assert tv["calibrated"] > 0.05  # on it, so tv_label misses what only transfer sees (the next test)
            assert abs(lab["calibrated"]) < 0.05


def write_inputs(tmp: Path) -> tuple[Path, Path]:
    d = synthetic()
    ids = np.arange(5000, 5000 + N)
    table = tmp / "items.csv"
    table.write_text("id,label,ortho,flip,batch\n" + "".join(
        f"{i},{a},{b},{c},{e}\n" for i, a, b, c, e in zip(ids, d["y"], d["ortho"], d["flip"], d["batch"])))
    emb = tmp / "emb.parquet"
    pq.write_table(pa.table({"id": ids, "embedding": pa.array(list(d["z"]), pa.list_(pa.float32()))}), emb)
    return table, emb


SPEC = """
[experiment]
name = "label_aware"

[dataset]
kind = "table"
options = {{ path = "{table}", id_column = "id", test_fraction = 0.3, val_fraction = 0.2 }}
null_partitions = 1

[task]
column = "label"

[[attributes]]
name = "ortho"
column = "ortho"

[[attributes]]
name = "flip"
column = "flip"

[[attributes]]
name = "batch"
column = "batch"

[backbone]
kind = "precomputed"
options = {{ path = "{emb}" }}

[separation]
distances = ["tv_paper", "tv_label", "transfer"]
permutations = 100
bootstrap = 20
transfer_repeats = 3

[allocation]
alpha = [0.0, 0.5, 1.0]
budget = "auto"
budget_val = "auto"
seeds = [1, 2]

[analysis]
test_resamples = 50

[finetune]
lr = 0.01
max_epochs = 20
patience = 5
"""


def test_screen_ranks_and_explains_with_label_aware_measures(tmp_path: Path, alloclab) -> None:
    table, emb = write_inputs(tmp_path)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(table=table, emb=emb))
    res = alloclab("screen", spec, "--num-cpus", "2")
    assert res.returncode == 0, res.stderr
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    rows = {(a, d): (v, lo, hi, verdict) for a, d, v, lo, hi, verdict in con.sql(
        "SELECT s.attribute, s.distance, s.value, v.ci_low, v.ci_high, s.verdict FROM separations s "
        "JOIN separation_values v ON v.attribute = s.attribute AND v.distance = s.distance").fetchall()}
    gap = {a: rows[(a, "transfer")][0] for a in ("ortho", "flip", "batch")}
    assert gap["flip"] > 0.2 and abs(gap["ortho"]) < 0.03 and abs(gap["batch"]) < 0.03, gap
    lo, hi = rows[("flip", "transfer")][1:3]
    assert lo < gap["flip"] < hi and lo > 0  # the interval over repeats and test resamples
    assert rows[("flip", "transfer_loss")][0] > 0.1
    assert "directions the head does not use" in rows[("ortho", "tv_paper")][3], rows[("ortho", "tv_paper")]
    assert "do not transfer" in rows[("flip", "transfer")][3]
    assert "transfer" in res.stdout and "tv_label" in res.stdout
    con.close()
    # a full run then correlates every predictor with the slopes: one row per distance
    run = alloclab("run", spec, "--num-cpus", "2")
    assert run.returncode == 0, run.stderr
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    dists = {r[0] for r in con.sql("SELECT DISTINCT distance FROM correlations WHERE experiment = 'label_aware'")
             .fetchall()}
    assert {"tv_paper", "tv_label", "transfer", "transfer_loss"} <= dists, dists
