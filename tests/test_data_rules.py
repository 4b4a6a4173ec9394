"""Binarisation rules against the data: spec expressions are one sandboxed scalar expression (a shared spec must
not be able to run statements, read or write files), and a missing value is never silently a class."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.data import _evaluate, _sandbox, prepare
from engine.errors import SpecError
from engine.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
N = 200
SPLIT_CYCLE = ["pretrain_train", "pool_train", "pool_train", "pool_val", "test"]


def write_table(tmp: Path, *, score: dict[int, str] | None = None, sex: dict[int, str] | None = None,
                age: dict[int, str] | None = None) -> Path:
    """A CSV of N items with ids 1000.. and a fixed split per row; the dicts override cells by id (e.g. '' = empty)."""
    rng = np.random.default_rng(0)
    rows = ["id,split,label,score,site,age,sex,x"]
    for i in range(N):
        item = 1000 + i
        cells = {
            "label": str(int(rng.integers(0, 2))),
            "score": f"{rng.normal():.3f}",
            "site": str(int(rng.integers(0, 2))),
            "age": str(20 + (i * 7) % 60),
            "sex": "F" if i % 3 else "m",
            "x": "" if i % 10 == 0 else f"{rng.uniform(0, 3):.2f}",  # x has missing values on purpose
        }
        for col, over in (("score", score), ("sex", sex), ("age", age)):
            if over and item in over:
                cells[col] = over[item]
        rows.append(",".join([str(item), SPLIT_CYCLE[i % len(SPLIT_CYCLE)]] + [cells[c] for c in
                                                                                ("label", "score", "site", "age",
                                                                                 "sex", "x")]))
    path = tmp / "data" / "items.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def raw_spec(table: Path, rule: dict[str, Any], task: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "experiment": {"name": "rules"},
        "dataset": {"kind": "table", "options": {"path": str(table), "split_column": "split"}},
        "task": task or {"column": "label"},
        "attributes": [{"name": "site", "column": "site"}, {"name": "rule", **rule}],
        "backbone": {"kind": "precomputed", "options": {"path": str(table.parent / "emb.parquet")}},
        "allocation": {"alpha": [0.0, 1.0]},
    }


def spec_of(raw: dict[str, Any], tmp: Path) -> Any:
    (spec,) = parse_spec(copy.deepcopy(raw), tmp / "x.toml")
    return spec


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_line(err: pytest.ExceptionInfo[SpecError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---- A: expressions cannot run statements or touch files -----------------------------------------------------------

ATTACKS = [
    "1=1; COPY (SELECT 1) TO '{out}'",
    "site = 1; ATTACH '{db}' AS x",
    "COPY (SELECT 1) TO '{out}'",
    "ATTACH '{db}'",
    "EXISTS (SELECT * FROM read_csv('{secret}'))",
    "(SELECT count(*) FROM items) > 0",
    "site IN (SELECT 1)",
    "1 FROM read_csv('{secret}')",
    "site = 1 UNION SELECT true FROM read_csv('{secret}')",
    "read_text('{secret}') <> ''",
    "read_text('/etc/passwd') <> ''",
    "getenv('HOME') <> ''",  # a CLI-only DuckDB function: unknown here, and refused either way
    "current_setting('enable_external_access')",
    "count(*) > 0",
    "random() < 0.5",
    "write_log('x') IS NULL",
    "site = 1, 2",
]


@pytest.mark.parametrize("template", ATTACKS)
def test_expression_attacks_are_spec_errors_and_write_nothing(tmp_path: Path, template: str) -> None:
    table = write_table(tmp_path)
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    expression = template.format(out=tmp_path / "pwned.csv", db=tmp_path / "x.duckdb", secret=secret)
    before = listing(tmp_path)
    with pytest.raises(SpecError) as err:
        prepare(spec_of(raw_spec(table, {"expression": expression}), tmp_path), tmp_path / "x.toml")
    msg = one_line(err)
    assert msg.startswith(f"{tmp_path / 'x.toml'}: attributes[1].expression: ") and "fix: " in msg, msg
    assert listing(tmp_path) == before


@pytest.mark.parametrize("template", ATTACKS)
def test_evaluate_refuses_attacks_without_the_spec_check(tmp_path: Path, template: str) -> None:
    """The data stage does not rely on the spec validator: the same texts straight into _evaluate."""
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    expression = template.format(out=tmp_path / "pwned.csv", db=tmp_path / "x.duckdb", secret=secret)
    cols = {"site": np.array([0, 1, 1]), "age": np.array([30.0, 55.0, 70.0])}
    before = listing(tmp_path)
    with pytest.raises(SpecError, match=r"^s\.toml: task\.expression: .*; fix: a SQL boolean expression over the "
                                        r"columns \(age, site\)"):
        _evaluate(cols, expression, "task", "s.toml")
    assert listing(tmp_path) == before


def test_stacked_statements_are_caught_without_data(tmp_path: Path) -> None:
    """`alloclab validate --no-data` reads only the spec: a ';' or an empty expression fails there already."""
    table = tmp_path / "absent.csv"  # never read
    with pytest.raises(SpecError) as err:
        spec_of(raw_spec(table, {"expression": "site = 1; COPY (SELECT 1) TO 'x.csv'"}), tmp_path)
    assert "attributes[1].expression: ';' is not allowed" in one_line(err)
    with pytest.raises(SpecError, match=r"task\.expression: the expression is empty"):
        spec_of(raw_spec(table, {"column": "site"}, task={"expression": "  "}), tmp_path)


def test_validate_cli_rejects_a_stacked_copy(tmp_path: Path, alloclab) -> None:
    """The reported attack: a colleague's spec whose expression writes a file during `alloclab validate`."""
    table = write_table(tmp_path)
    out = tmp_path / "pwned.csv"
    spec = tmp_path / "shared.toml"
    spec.write_text(f'''
[experiment]
name = "shared"
[dataset]
kind = "table"
options = {{ path = "{table}", split_column = "split" }}
[task]
column = "label"
[[attributes]]
name = "site"
expression = "site = 1; COPY (SELECT 42) TO '{out}'"
[backbone]
kind = "precomputed"
options = {{ path = "emb.parquet" }}
[allocation]
alpha = [0.0, 1.0]
''')
    before = listing(tmp_path)
    for args in (("validate", spec), ("validate", "--no-data", spec)):
        res = alloclab(*args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "attributes[0].expression: ';' is not allowed" in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and listing(tmp_path) == before


def test_sandbox_connection_refuses_files_even_if_asked_directly(tmp_path: Path) -> None:
    """Defence in depth: the evaluation connection itself cannot write, attach, read or be unlocked."""
    import duckdb

    con = _sandbox()
    try:
        before = listing(tmp_path)
        for sql in (f"COPY (SELECT 1) TO '{tmp_path / 'a.csv'}'", f"ATTACH '{tmp_path / 'b.duckdb'}'",
                    "SELECT * FROM read_text('/etc/passwd')", "SET enable_external_access = true",
                    "SET lock_configuration = false", "LOAD httpfs"):
            with pytest.raises(duckdb.Error):
                con.execute(sql).fetchall()
        assert listing(tmp_path) == before
    finally:
        con.close()


@pytest.mark.parametrize("expression,expected", [
    ("age >= 50 AND site = 1", lambda c: (c["age"] >= 50) & (c["site"] == 1)),
    ("CASE WHEN age > 60 THEN true ELSE false END", lambda c: c["age"] > 60),
    ("lower(sex) = 'f'", lambda c: np.array([s.lower() == "f" for s in c["sex"]])),
    ("coalesce(x, 0) > 1", lambda c: np.nan_to_num(c["x"], nan=0.0) > 1),
    ("age BETWEEN 30 AND 40 OR sex IN ('m') -- a comment", lambda c: ((c["age"] >= 30) & (c["age"] <= 40))
     | (c["sex"] == "m")),
])
def test_legitimate_expressions_still_work(tmp_path: Path, expression: str, expected: Any) -> None:
    prep = prepare(spec_of(raw_spec(write_table(tmp_path), {"expression": expression}), tmp_path))
    assert prep.dropped == {}
    for split, sd in prep.splits.items():
        cols = prep.bundle.splits[split].columns
        assert np.array_equal(sd.groups["rule"], expected(cols).astype(np.int64)), split


# ---- B: missing values are never a class ----------------------------------------------------------------------

def test_nan_label_with_threshold_is_an_error_with_column_count_and_ids(tmp_path: Path) -> None:
    table = write_table(tmp_path, score={1001: "", 1007: "NaN"})
    spec = spec_of(raw_spec(table, {"column": "age", "threshold": 50}, task={"column": "score", "threshold": 0.0}),
                   tmp_path)
    with pytest.raises(SpecError) as err:
        prepare(spec, tmp_path / "x.toml")
    msg = one_line(err)
    assert "task.column: 'score' has 2 missing value(s)" in msg, msg
    assert "pool_train 2" in msg and "ids 1001, 1007" in msg and 'missing = "drop"' in msg, msg


def test_empty_text_with_values_is_an_error(tmp_path: Path) -> None:
    table = write_table(tmp_path, sex={1002: "", 1011: "  "})
    with pytest.raises(SpecError) as err:
        prepare(spec_of(raw_spec(table, {"column": "sex", "values": ["F"]}), tmp_path))
    msg = one_line(err)
    assert "attributes[1].column: 'sex' has 2 missing value(s)" in msg and "ids 1002, 1011" in msg, msg


def test_nan_in_a_0_1_column_is_missing_not_a_bad_label(tmp_path: Path) -> None:
    table = write_table(tmp_path)
    text = table.read_text().splitlines()
    text[3] = ",".join(c if k != 2 else "" for k, c in enumerate(text[3].split(",")))  # id 1002: empty label
    table.write_text("\n".join(text) + "\n")
    with pytest.raises(SpecError, match=r"task\.column: 'label' has 1 missing value\(s\) .*ids 1002\)"):
        prepare(spec_of(raw_spec(table, {"column": "site"}), tmp_path))


def test_null_from_an_expression_is_an_error(tmp_path: Path) -> None:
    """'x' has empty cells: 'x > 1' is NULL there (not false; and NaN would even compare as true in DuckDB)."""
    table = write_table(tmp_path)
    with pytest.raises(SpecError) as err:
        prepare(spec_of(raw_spec(table, {"expression": "x > 1"}), tmp_path))
    msg = one_line(err)
    assert "attributes[1].expression: 'x > 1' is NULL for 20 item(s)" in msg and "ids 1000, 1010" in msg, msg
    assert "coalesce" in msg and 'missing = "drop"' in msg, msg
    cols = {"x": np.array([np.nan, 5.0, 0.0]), "s": np.array(["a", "", None], dtype=object)}
    values, missing = _evaluate(cols, "x > 1", "task", "s.toml")
    assert missing.tolist() == [True, False, False] and values.tolist() == [0, 1, 0]
    values, missing = _evaluate(cols, "s = 'a'", "task", "s.toml")
    assert missing.tolist() == [False, True, True]


def test_drop_leaves_the_items_out_of_every_split_and_records_counts(tmp_path: Path) -> None:
    # 1001, 1006: pool_train; 1003: pool_val; 1004: test (both rules); 1010 (and every 10th): x is empty
    table = write_table(tmp_path, score={1001: "", 1004: "", 1006: "nan"}, sex={1003: "", 1004: ""})
    raw = raw_spec(table, {"column": "sex", "values": ["F"], "missing": "drop"},
                   task={"column": "score", "threshold": 0.0, "missing": "drop"})
    prep = prepare(spec_of(raw, tmp_path))
    assert prep.dropped == {
        "task": {"pretrain_train": 0, "pretrain_val": 0, "pool_train": 2, "pool_val": 0, "test": 1},
        "attributes[1]": {"pretrain_train": 0, "pretrain_val": 0, "pool_train": 0, "pool_val": 1, "test": 1},
    }
    assert {s: prep.n_dropped(s) for s in prep.splits} == {"pretrain_train": 0, "pretrain_val": 0,
                                                            "pool_train": 2, "pool_val": 1, "test": 1}
    from backends.datasets import table as table_ds

    loaded = table_ds.load(table_ds.Options(path=str(table), split_column="split"))  # what a worker loads
    gone = {1001, 1003, 1004, 1006}
    for split, sd in prep.splits.items():
        raw_split = loaded.splits[split]
        keep = prep.keep[split]
        assert keep.shape == raw_split.ids.shape and keep.dtype == bool
        assert np.array_equal(raw_split.ids[keep], sd.ids)
        assert not gone & set(sd.ids.tolist()) and set(raw_split.ids[~keep].tolist()) <= gone
        n = sd.ids.size
        assert sd.y.shape == (n,) and all(g.shape == (n,) for g in sd.groups.values())
        assert set(sd.groups) == {"site", "rule", "random", "random_2", "random_3"}
        # the prepared bundle is restricted the same way: columns, ids and model inputs line up with sd
        kept = prep.bundle.splits[split]
        assert np.array_equal(kept.ids, sd.ids) and np.array_equal(prep.bundle.inputs(split), sd.ids)
        assert np.array_equal(sd.y, (kept.columns["score"] >= 0.0).astype(np.int64))
        assert np.array_equal(sd.groups["site"], kept.columns["site"].astype(np.int64))
        assert np.array_equal(sd.groups["rule"], (kept.columns["sex"] == "F").astype(np.int64))
        assert np.array_equal(raw_split.columns["site"][keep], kept.columns["site"])


def test_drop_on_one_rule_does_not_excuse_another(tmp_path: Path) -> None:
    table = write_table(tmp_path, score={1001: ""}, sex={1003: ""})
    raw = raw_spec(table, {"column": "sex", "values": ["F"]}, task={"column": "score", "threshold": 0.0,
                                                                    "missing": "drop"})
    with pytest.raises(SpecError, match=r"attributes\[1\]\.column: 'sex' has 1 missing value\(s\)"):
        prepare(spec_of(raw, tmp_path))


def test_missing_is_error_drop_or_exclude_only(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"attributes\[1\]\.missing: .*'error', 'drop' or 'exclude'"):
        spec_of(raw_spec(tmp_path / "t.csv", {"column": "site", "missing": "zero"}), tmp_path)
    with pytest.raises(SpecError, match=r"task\.missing: .*'error' or 'drop'"):  # the task has no 'exclude'
        spec_of(raw_spec(tmp_path / "t.csv", {"column": "site"}, task={"column": "score", "threshold": 0.0,
                                                                       "missing": "exclude"}), tmp_path)


def test_exclude_keeps_the_items_for_every_other_attribute(tmp_path: Path) -> None:
    """missing = "exclude": the items stay in every split and every other attribute; in this one they have no
    group, are never allocated (a full run's heads train on them only through other attributes), measured or
    scored as one of its groups, and have no item_groups row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.executor import SerialExecutor
    from engine.pipeline import Pipeline
    from engine.sampling import natural
    from engine.store import open_store

    gone = {1003, 1004, 1011, 1012, 1013, 1021}
    table = write_table(tmp_path, sex={i: "" for i in gone})
    raw = raw_spec(table, {"column": "sex", "values": ["F"], "missing": "exclude"})
    prep = prepare(spec_of(raw, tmp_path))
    assert prep.dropped == {} and all(prep.keep[s].all() for s in prep.splits)
    assert sum(prep.excluded["attributes[1]"].values()) == len(gone)
    for sd in prep.splits.values():
        none = set(sd.ids[sd.groups["rule"] == -1].tolist())
        assert none == gone & set(sd.ids.tolist()) and (sd.groups["site"] >= 0).all()
    pool = prep.splits["pool_train"]
    g = pool.groups["rule"]
    for alpha in (0.0, 0.5, 1.0):
        picked = natural(g, pool.y, alpha, int(min((g == 0).sum(), (g == 1).sum())), 3, 0)
        assert (g[picked] >= 0).all()
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"id": np.arange(1000, 1000 + N), "embedding": pa.array(rng.normal(size=(N, 4)).tolist())}),
                   table.parent / "emb.parquet")
    raw["backbone"]["pretrain_seeds"] = [0]
    raw["allocation"].update(seeds=[1], budget=20, budget_val=5)
    raw["dataset"]["null_partitions"] = 1
    raw["separation"] = {"permutations": 0, "bootstrap": 0}
    raw["analysis"] = {"test_resamples": 20}
    with open_store(tmp_path / "r.duckdb") as store:
        summary = Pipeline(spec_of(raw, tmp_path), tmp_path / "x.toml", store, SerialExecutor(), progress=False).run()
        assert summary.failed["trials"] == 0, summary
        rows = store.query("SELECT attribute, count(*) AS n FROM item_groups GROUP BY 1 ORDER BY 1")
        sep = store.query("SELECT attribute, n_g0 + n_g1 AS n FROM separation_values WHERE distance = 'tv_paper'")
        n_test_rule = store.query("SELECT count(*) AS n FROM item_groups ig JOIN items i USING (dataset_id, item_id) "
                                  "WHERE i.split = 'test' AND ig.attribute = 'rule'")[0]["n"]
        items = store.query("SELECT count(*) AS n FROM items")[0]["n"]
        from engine.report import render_report
        from engine.results import report_data

        data = report_data(store, "rules")
    assert data["excluded"] == {"rule": len(gone)} and data["dropped"] == {}
    html = render_report(data, tmp_path / "r.html").read_text()
    assert f"{len(gone)} for rule" in html
    assert items == N and {r["attribute"]: r["n"] for r in rows} == {"random": N, "rule": N - len(gone), "site": N}
    assert {r["attribute"]: r["n"] for r in sep}["rule"] == n_test_rule < {r["attribute"]: r["n"] for r in sep}["site"]


@pytest.mark.parametrize("path", [ROOT / "tests" / "specs" / "tiny_mnist.toml", ROOT / "specs" / "colored_mnist.toml"])
def test_shipped_specs_prepare_with_no_drops(path: Path) -> None:
    (spec,) = load_spec(path)
    prepare(spec, path)  # the first call loads (and caches) the digits
    t0 = time.perf_counter()
    prep = prepare(spec, path)
    elapsed = time.perf_counter() - t0
    assert prep.dropped == {}
    assert all(prep.n_dropped(s) == 0 and prep.keep[s].all() for s in prep.splits)
    assert all(prep.splits[s].ids.size == len(prep.bundle.splits[s]) for s in prep.splits)
    if "tiny" in path.name:
        assert elapsed < 1.0, f"prepare() of the tiny spec took {elapsed:.2f} s without the load"


def test_drop_runs_end_to_end_and_the_report_says_so(tmp_path: Path) -> None:
    """A run with dropped items: workers load the same rows as the driver (embeddings, heads and metrics line up),
    the dataset stage logs the counts, the report shows them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.executor import SerialExecutor
    from engine.pipeline import Pipeline
    from engine.report import render_report
    from engine.results import report_data
    from engine.store import open_store

    table = write_table(tmp_path, score={1001: "", 1006: "nan"})
    rng = np.random.default_rng(1)
    ids = np.arange(1000, 1000 + N)
    pq.write_table(pa.table({"id": ids, "embedding": pa.array(rng.normal(size=(N, 4)).tolist())}),
                   table.parent / "emb.parquet")
    raw = raw_spec(table, {"column": "sex", "values": ["F"]}, task={"column": "score", "threshold": 0.0,
                                                                  "missing": "drop"})
    raw["backbone"]["pretrain_seeds"] = [0]
    raw["allocation"].update(seeds=[1], budget=20, budget_val=5)
    raw["dataset"]["null_partitions"] = 1
    raw["separation"] = {"permutations": 0, "bootstrap": 0}
    raw["analysis"] = {"test_resamples": 20}
    spec = spec_of(raw, tmp_path)
    db = tmp_path / "r.duckdb"
    with open_store(db) as store:
        summary = Pipeline(spec, tmp_path / "x.toml", store, SerialExecutor(), progress=False).run()
        assert summary.failed["trials"] == 0 and summary.executed["trials"] == 6, summary
        data = report_data(store, "rules")
        n_emb = store.query("SELECT count(*) AS n FROM embeddings WHERE split = 'pool_train'")[0]["n"]
    assert data["dropped"] == {"pool_train": 2}
    assert n_emb == N * 2 // 5 - 2  # pool_train rows less the two dropped
    html = render_report(data, tmp_path / "r.html").read_text()
    assert "items left out" in html and "2 of pool_train" in html
