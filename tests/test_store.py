"""The DuckDB store: schema, bulk writes, idempotency, the single-writer lock."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.errors import StoreError
from engine.store import TABLES, open_store


def trial_row(tid: str, status: str = "done") -> dict:
    return {"trial_id": tid, "experiment": "e", "attribute": "a", "alpha": 0.1, "seed": 1, "mode": "last_layer",
            "budget": 10, "budget_val": 5, "status": status, "config_json": "{}",
            "finished_at": dt.datetime(2026, 1, 1)}


def dump(path: Path) -> dict[str, list]:
    with open_store(path, read_only=True) as s:
        return {t: sorted(map(str, s.con.execute(f"SELECT * FROM {t}").fetchall())) for t in TABLES}


def test_schema_and_doubles(tmp_path: Path) -> None:
    with open_store(tmp_path / "r.duckdb") as s:
        names = {r["name"] for r in s.query("SHOW TABLES")}
        assert set(TABLES) <= names
        with s.transaction():
            s.insert_rows("metrics", [{"trial_id": "t", "attribute": "a", "grp": 0, "metric": "acc", "value": 0.9}])
        assert s.query("SELECT value FROM metrics")[0]["value"] == 0.9  # DOUBLE, not a 4-byte FLOAT
        types = {r["column_name"]: r["data_type"] for r in s.query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'embeddings'")}
        assert types["vec"] == "FLOAT[]"


def test_writing_twice_leaves_the_same_database(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    z = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    for _ in range(2):
        with open_store(db) as s, s.transaction():
            s.insert_embeddings("em-1", "test", np.arange(50), z)
            s.insert_rows("trials", [trial_row("t1")])
            s.insert_rows("metrics", [{"trial_id": "t1", "attribute": "a", "grp": 1, "metric": "acc", "value": 0.5}],
                          replace_where={"trial_id": "t1"})
        if _ == 0:
            first = dump(db)
    assert dump(db) == first
    with open_store(db, read_only=True) as s:
        ids, vec = s.embeddings("em-1", "test")
        assert np.array_equal(ids, np.arange(50)) and np.array_equal(vec, z) and vec.dtype == np.float32


def test_transaction_rolls_back(tmp_path: Path) -> None:
    with open_store(tmp_path / "r.duckdb") as s:
        with pytest.raises(RuntimeError), s.transaction():
            s.insert_rows("trials", [trial_row("t1")])
            raise RuntimeError("worker died")
        assert s.query("SELECT count(*) AS n FROM trials")[0]["n"] == 0


def test_status_of(tmp_path: Path) -> None:
    with open_store(tmp_path / "r.duckdb") as s, s.transaction():
        s.insert_rows("trials", [trial_row("t1"), trial_row("t2", "failed")])
    with open_store(tmp_path / "r.duckdb") as s:
        assert s.status_of("trials", "trial_id", ["t1", "t2", "t3"]) == {"t1": "done", "t2": "failed"}


def test_read_only_needs_an_existing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no results database"):
        open_store(tmp_path / "missing.duckdb", read_only=True)


def test_locked_database_names_the_holder(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    open_store(db).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=r"locked by .*PID") as err:
            open_store(db, read_only=True)
        assert "--db" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
