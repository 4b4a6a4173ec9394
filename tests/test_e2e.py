"""End to end through the real CLI in subprocesses, with real local Ray, real DuckDB and real MNIST digits."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ALLOCLAB, TINY_SPEC, cli_env

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-slow` (CI runs them)


def summary(stdout: str, kind: str) -> tuple[int, int]:
    m = re.search(rf"{kind}: (\d+) run, (\d+) done before", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


ONE_NULL = ('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')  # keeps the suite short


def test_run_rerun_extend_report_sql(tmp_path: Path, alloclab) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC.read_text().replace(*ONE_NULL))
    first = alloclab("run", spec, "--num-cpus", "2")
    assert first.returncode == 0, first.stderr
    assert summary(first.stdout, "trials") == (18, 0)  # 3 attributes (1 null partition) x 3 α x 2 seeds
    assert "trials" in first.stderr and "18/18" in first.stderr  # a progress bar per stage

    second = alloclab("run", spec, "--num-cpus", "2")
    assert second.returncode == 0, second.stderr
    for kind, n in [("dataset", 1), ("pretrain", 2), ("embed", 4), ("separation", 6), ("trials", 18), ("analysis", 1)]:
        assert summary(second.stdout, kind) == (0, n), kind

    plan = alloclab("plan", spec)
    assert re.search(r"trials\s+18\s+18\s+0\s+0", plan.stdout), plan.stdout

    # extend the alpha grid and add a seed: only the new trials run
    spec.write_text(TINY_SPEC.read_text().replace(*ONE_NULL)
                    .replace("alpha = [0.0, 0.5, 1.0]", "alpha = [0.0, 0.25, 0.5, 1.0]")
                    .replace("seeds = [1, 2]", "seeds = [1, 2, 3]"))
    assert re.search(r"trials\s+36\s+18\s+0\s+18", alloclab("plan", spec).stdout)
    third = alloclab("run", spec, "--num-cpus", "2")
    assert third.returncode == 0, third.stderr
    assert summary(third.stdout, "trials") == (18, 18)
    assert summary(third.stdout, "pretrain") == (0, 2)

    rep = alloclab("report", spec)
    assert rep.returncode == 0, rep.stderr
    html = (tmp_path / "reports" / "tiny_mnist.html").read_text()
    assert "<svg" in html and "digit_group" in html and "r²" in html

    q = alloclab("sql", "SELECT attribute, distance, value FROM separations ORDER BY value DESC", "--format", "json")
    assert q.returncode == 0, q.stderr
    rows = json.loads(q.stdout)
    assert [r["attribute"] for r in rows][0] == "digit_group"
    assert {r["attribute"] for r in rows} == {"digit_group", "colour", "random"}
    csv_out = alloclab("sql", "SELECT count(*) AS n FROM trials WHERE status = 'done'", "--format", "csv")
    assert csv_out.stdout.split() == ["n", "36"]
    table = alloclab("sql", "SELECT metric, r, r2, n FROM correlations WHERE y = 'slope' ORDER BY metric")
    assert "r2" in table.stdout and "(8 rows)" in table.stdout  # 4 metrics x (calibrated, raw)
    # read-only: a write is refused with one clear line
    bad = alloclab("sql", "DELETE FROM trials")
    assert bad.returncode == 2 and "read-only" in bad.stderr.lower() and "Traceback" not in bad.stderr

    # every derived table is in the database and exports to Parquet
    exported = alloclab("export", "--parquet", tmp_path / "pq")
    assert exported.returncode == 0, exported.stderr
    import pyarrow.parquet as pq

    for table in ("slopes", "fits", "correlations", "explanations", "bounds", "cross_slopes", "best_alpha", "metrics"):
        assert pq.read_table(tmp_path / "pq" / f"{table}.parquet").num_rows > 0, table
    assert pq.read_table(tmp_path / "pq" / "embeddings.parquet").num_rows == 1500 * 0.4 + 2400 + 600 + 600


def test_grid_variants_share_work_and_pool_into_one_report(tmp_path: Path, alloclab) -> None:
    spec = tmp_path / "grid.toml"
    spec.write_text(TINY_SPEC.read_text().replace('pretrain_seeds = [0, 1]', 'pretrain_seeds = [0]')
                    .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
                    + '\n[grid]\n"finetune.weight_decay" = [0.0, 1.537e-3]\n')
    res = alloclab("run", spec, "--num-cpus", "2")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("tiny_mnist__")]
    assert len(lines) == 2
    # the second variant re-uses the dataset, checkpoint and embeddings of the first
    assert "pretrain: 0 run, 1 done before" in lines[1] and "trials: 18 run, 0 done before" in lines[1]
    names = sorted(ln.split(":")[0] for ln in lines)
    rep = alloclab("report", "--experiments", ",".join(names))
    assert rep.returncode == 0, rep.stderr
    html = Path(tmp_path / rep.stdout.strip()).read_text()
    assert all(n in html for n in names)
    one = alloclab("report", "--experiments", names[0])
    assert one.returncode == 2 and "at least two" in one.stderr


def test_a_killed_run_resumes(tmp_path: Path, alloclab) -> None:
    spec = tmp_path / "kill.toml"
    spec.write_text(TINY_SPEC.read_text().replace("alpha = [0.0, 0.5, 1.0]", "alpha = [0.0, 0.25, 0.5, 0.75, 1.0]")
                    .replace("seeds = [1, 2]", "seeds = [1, 2, 3, 4]").replace("max_epochs = 15", "max_epochs = 30")
                    .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1'))
    total = 3 * 5 * 4
    proc = subprocess.Popen([str(ALLOCLAB), "run", str(spec), "--num-cpus", "2"], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err = bytearray()

    def pump() -> None:
        while chunk := proc.stderr.read1(4096):
            err.extend(chunk)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(n) for n in re.findall(rb"trials\s*:\s*\d+%\|[^|]*\|\s*(\d+)/", bytes(err))]
        if done and max(done) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray workers and raylet: as a crash would
            killed_at = max(done)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < total, "the run finished before it could be killed"

    resumed = alloclab("run", spec, "--num-cpus", "2")
    assert resumed.returncode == 0, resumed.stderr
    ran, before = summary(resumed.stdout, "trials")
    assert before >= killed_at and ran + before == total
    # the trials start once the trial checkpoint exists, while the other seed may still pre-train: what the kill
    # left of pre-training and embedding depends on timing, but nothing is done twice and the trial seed was done
    assert sum(summary(resumed.stdout, "pretrain")) == 2 and summary(resumed.stdout, "pretrain")[1] >= 1
    assert sum(summary(resumed.stdout, "embed")) == 4 and summary(resumed.stdout, "embed")[1] >= 3
    done = alloclab("sql", "SELECT count(*) FROM trials WHERE status = 'done'", "--format", "csv")
    assert done.stdout.split()[-1] == str(total)
