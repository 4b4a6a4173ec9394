"""`alloclab sql` reads the results database and nothing else; `export` never pastes a path into SQL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from engine.store import open_store


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def dbs(tmp_path: Path) -> Path:
    with open_store(tmp_path / "results.duckdb") as store, store.transaction():
        store.insert_rows("meta", [{"key": "probe", "value": "1"}])
    with open_store(tmp_path / "other.duckdb"):
        pass
    return tmp_path


ATTEMPTS = [
    "COPY trials TO 'x.csv'",
    "COPY meta TO 'other.duckdb'",  # it overwrote another results database before
    "ATTACH 'other.duckdb' AS o (READ_WRITE)",
    "ATTACH 'other.duckdb' AS o (READ_WRITE); INSERT INTO o.meta VALUES ('k', 'v')",
    "EXPORT DATABASE 'dump'",
    "INSTALL httpfs",  # tried the network before
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('*')",
    "DELETE FROM meta",
    "CREATE TABLE t AS SELECT 1",
    "PRAGMA enable_profiling = 'json'",
    "SET profiling_output = 'p.json'",
]


@pytest.mark.parametrize("query", ATTEMPTS)
def test_sql_writes_nothing_and_reaches_nothing(dbs: Path, alloclab, query: str) -> None:
    before = _snapshot(dbs)
    res = alloclab("sql", query, "--db", dbs / "results.duckdb")
    assert res.returncode == 2, (query, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alloclab: error: SQL error:") and "Traceback" not in res.stderr
    assert "fix:" in lines[0]
    assert _snapshot(dbs) == before  # no file written, changed or created, the other database included


def test_sql_still_reads(dbs: Path, alloclab) -> None:
    res = alloclab("sql", "SELECT value FROM meta WHERE key = 'probe'", "--db", dbs / "results.duckdb",
                   "--format", "csv")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["value", "1"]


def test_export_to_a_path_with_quotes(dbs: Path, alloclab) -> None:
    out = dbs / "it's \"quoted\"; DROP TABLE meta; --"
    res = alloclab("export", "--parquet", out, "--db", dbs / "results.duckdb")
    assert res.returncode == 0, res.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(out / "meta.parquet").num_rows == 2  # schema_version and the probe
    assert not list(out.glob("*.partial"))
    check = alloclab("sql", "SELECT count(*) AS n FROM meta", "--db", dbs / "results.duckdb", "--format", "csv")
    assert check.stdout.split() == ["n", "2"]
