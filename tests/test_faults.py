"""The environment's faults give one line and an honest exit code, never a traceback or a file a later run trusts.

Disk full is a file-size limit (RLIMIT_FSIZE with SIGXFSZ ignored: writes fail with EFBIG, as on a full disk).
Permissions cannot be tested by chmod as root (CI runs as root), so an unwritable --out is a path under a file.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

from engine.spec import load_spec
from engine.store import open_store
from tests.conftest import ALLOCLAB, TINY_SPEC, cli_env


def _limited(max_bytes: int):  # noqa: ANN202 - a preexec_fn
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def _run(args: list, cwd: Path, max_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ALLOCLAB), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=cli_env(), preexec_fn=_limited(max_bytes) if max_bytes else None)


def _one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("alloclab:")]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    return lines[0]


def test_disk_full_during_a_run(tmp_path: Path) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_SPEC.read_text().replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]"))
    res = _run(["run", spec, "--serial", "--quiet", "--db", tmp_path / "r.duckdb"], tmp_path, max_bytes=300_000)
    assert res.returncode == 1
    assert "could not be written" in _one_line(res) and "File too large" in res.stderr
    plan = _run(["plan", spec, "--db", tmp_path / "r.duckdb"], tmp_path)  # the database is still readable
    assert plan.returncode == 0, plan.stderr


def _store_with_experiment(tmp_path: Path, name: str) -> Path:
    (spec,) = load_spec(TINY_SPEC)
    doc = spec.model_dump(mode="json")
    doc["experiment"]["name"] = name
    db = tmp_path / "r.duckdb"
    with open_store(db) as store, store.transaction():
        store.insert_rows("experiments", [{
            "name": name, "spec_path": "s.toml", "spec_toml": "", "spec_json": json.dumps(doc), "variant_json": "{}",
            "git_commit": "x", "versions_json": "{}", "created_at": "2026-01-01", "updated_at": "2026-01-01"}])
    text = TINY_SPEC.read_text().replace('name = "tiny_mnist"', f'name = "{name}"')
    (tmp_path / "s.toml").write_text(text)
    return db


def test_a_very_long_experiment_name_gets_a_short_report_file(tmp_path: Path) -> None:
    name = "x" * 300
    db = _store_with_experiment(tmp_path, name)
    res = _run(["report", "s.toml", "--db", db], tmp_path)
    assert res.returncode == 0, res.stderr
    out = Path(tmp_path / res.stdout.strip())
    assert out.exists() and len(out.name) < 120 and out.name.startswith("x" * 80 + "__")
    assert name in out.read_text()  # the report still names the experiment in full


def test_report_into_an_unwritable_place(tmp_path: Path) -> None:
    db = _store_with_experiment(tmp_path, "short")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = _run(["report", "s.toml", "--db", db, "--out", blocker / "reports"], tmp_path)
    assert res.returncode == 1 and "Not a directory" in _one_line(res)


def test_export_on_a_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    db = _store_with_experiment(tmp_path, "short")
    out = tmp_path / "pq"
    res = _run(["export", "--parquet", out, "--db", db], tmp_path, max_bytes=2_000)
    assert res.returncode == 1 and "File too large" in _one_line(res)
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert os.access(db, os.R_OK)


def test_a_database_that_cannot_be_written_beside(tmp_path: Path) -> None:
    """As root a chmod'ed folder stays writable, so the unwritable spot is the write-ahead log's path itself."""
    db = tmp_path / "r.duckdb"
    with open_store(db):
        pass
    (tmp_path / "r.duckdb.wal").mkdir()
    res = _run(["run", TINY_SPEC, "--serial", "--quiet", "--db", db], tmp_path)
    assert res.returncode == 1 and "cannot open the results database" in _one_line(res)


def test_losing_the_schema_race_is_one_line(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Two runs started at the same instant: the loser passes the lock probe, then the DDL meets the winner's lock.
    SQLAlchemy wraps DuckDB's error in two lines; the user gets one."""
    import pytest
    from sqlalchemy.exc import OperationalError

    from engine import store as store_mod
    from engine.errors import StoreError

    def locked(path: Path) -> None:
        raise OperationalError("CREATE TABLE ...", {}, Exception(
            f'IO Error: Could not set lock on file "{path}": Conflicting lock is held in python (PID 1)'))

    monkeypatch.setattr(store_mod, "_create_schema", locked)
    with pytest.raises(StoreError) as e:
        open_store(tmp_path / "r.duckdb")
    assert "\n" not in str(e.value) and "locked by another process" in str(e.value)
