"""A real two-node Ray cluster on this machine: a head node and one worker node started with `ray start`, the real
CLI joining it with `--address`, a node lost mid-run.

Isolation: both nodes live under their own short temp dir (/tmp/rc-XXXX: Ray's socket paths must stay under 107
characters) with their own ports, so nothing else on the machine joins them (`ray start --temp-dir` writes its
"latest cluster" file there, not in /tmp/ray) and they join nothing else. Clean-up never uses `ray stop`, which stops
every Ray instance of the user (the suite's own local one too): it kills exactly the processes whose command line
names that temp dir, plus their descendants (Ray's workers and agents rename themselves, `ray::IDLE`), and the drivers
this test started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psutil
import pytest

from tests.conftest import ALLOCLAB, TINY_SPEC, cli_env

RAY = Path(sys.executable).parent / "ray"
EXTRA = "extra"  # the worker node's custom resource


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _env() -> dict[str, str]:
    env = cli_env()
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray runs task workers at nice 15: on a machine busy with other work they would get a few percent of a core and
    # the test would take minutes. Nice 0 for the nodes and the reference run changes timing only, never placement.
    env["RAY_worker_niceness"] = "0"
    return env


class Driver:
    """`alloclab run` in a subprocess (its own process group), stderr (the progress bars) collected as it comes."""

    def __init__(self, *args: str | Path, cwd: Path) -> None:
        self.proc = subprocess.Popen([str(ALLOCLAB), "run", *map(str, args)], cwd=cwd, env=_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.out, self.err = bytearray(), bytearray()
        self._pumps = [threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                       for src, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._pumps:
            t.start()

    @staticmethod
    def _pump(src, dst: bytearray) -> None:
        while chunk := src.read1(4096):
            dst.extend(chunk)

    def trials_done(self) -> int:
        return max((int(n) for n in re.findall(rb"trials\s*:\s*\d+%\|[^|]*\|\s*(\d+)/", bytes(self.err))), default=0)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        for t in self._pumps:
            t.join(timeout=10)
        return self.proc.returncode, bytes(self.out).decode(errors="replace"), bytes(self.err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


class RayCluster:
    """A head node ("h") and a worker node ("w", custom resource EXTRA), one CPU each, on 127.0.0.1."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.drivers: list[Driver] = []

    def _ray_start(self, node: str, *args: str) -> None:
        res = subprocess.run(
            [str(RAY), "start", f"--temp-dir={self.root / node}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--disable-usage-stats", f"--object-store-memory={256 * 2**20}",
             f"--dashboard-agent-listen-port={_free_port()}", *args],
            env=_env(), capture_output=True, text=True, timeout=180, cwd=self.root)
        assert res.returncode == 0, f"ray start ({node}) failed:\n{res.stdout}\n{res.stderr}"

    def start(self) -> None:
        self._ray_start("h", "--head", f"--port={self.port}", "--include-dashboard=false",
                        f"--dashboard-port={_free_port()}")
        self._ray_start("w", f"--address={self.address}", f'--resources={{"{EXTRA}": 1}}')

    def processes(self, node: str = "") -> list[psutil.Process]:
        """Every process of one node ("h", "w") or of both (""), descendants included; never this one."""
        mark = str(self.root / node) if node else str(self.root)
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if p.pid != os.getpid() and any(mark + os.sep in a or a.endswith(mark) for a in cmd):
                    found[p.pid] = p
                    found.update((c.pid, c) for c in p.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return [p for p in found.values() if _alive(p)]

    def raylet(self, node: str) -> psutil.Process:
        (raylet,) = [p for p in self.processes(node) if p.name() == "raylet"]
        return raylet

    def node_id(self, node: str) -> str:
        """The node's Ray id, as `ray.get_runtime_context().get_node_id()` reports it inside a task."""
        cmd = self.raylet(node).cmdline()
        (arg,) = [a for a in cmd if a.startswith("--node_id=")]
        if node == "w":
            assert any(EXTRA in a for a in cmd if a.startswith("--static_resource_list=")), cmd
        return arg.split("=", 1)[1]

    @staticmethod
    def running(raylet: psutil.Process, task: str) -> bool:
        """Whether a worker process of that raylet is executing `task` (Ray titles it ray::<function>)."""
        try:
            children = raylet.children()
        except psutil.NoSuchProcess:
            return False
        for p in children:
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith(f"ray::{task}"):
                    return True
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return False

    def kill(self, node: str = "") -> None:
        """SIGKILL a node (all its processes at once, as a lost machine) or, with "", everything started here."""
        procs = self.processes(node)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 30  # not psutil.wait_procs: a zombie nobody reaps would count as running
        while any(_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)

    def driver(self, *args: str | Path, cwd: Path) -> Driver:
        d = Driver(*args, cwd=cwd)
        self.drivers.append(d)
        return d

    def stop(self) -> None:
        for d in self.drivers:
            d.kill()
        self.kill()
        left = self.processes()
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"processes of the test cluster survived: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture
def ray_cluster():
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _spec(alphas: str) -> str:
    """The tiny spec, smaller: one pre-training seed, one null partition, one trial seed, a cheap separation null."""
    text = TINY_SPEC.read_text()
    text = _sub(text, "pretrain_seeds = [0, 1]", "pretrain_seeds = [0]")
    text = _sub(text, 'kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
    text = _sub(text, "alpha = [0.0, 0.5, 1.0]", f"alpha = [{alphas}]")
    text = _sub(text, "seeds = [1, 2]", "seeds = [1]")
    return text + "\n[separation]\npermutations = 20\nbootstrap = 10\n"


def _mismatches(con: duckdb.DuckDBPyConnection, table: str, keys: list[str], numbers: list[str],
                exact: list[str] = (), where: str = "true") -> tuple[int, int]:
    """(rows of `table` in both databases, rows that differ or exist in only one): numbers up to 1e-9, NaN = NaN."""
    on = " AND ".join(f"x.{k} = y.{k}" for k in keys)
    diff = [f"(x.{c} IS DISTINCT FROM y.{c} AND NOT coalesce(abs(x.{c} - y.{c}) <= 1e-9, false))" for c in numbers]
    diff += [f"x.{c} IS DISTINCT FROM y.{c}" for c in exact]
    sql = (f"SELECT count(*) FILTER (WHERE x.{keys[0]} IS NOT NULL AND y.{keys[0]} IS NOT NULL), "
           f"count(*) FILTER (WHERE x.{keys[0]} IS NULL OR y.{keys[0]} IS NULL OR {' OR '.join(diff)}) "
           f"FROM (SELECT * FROM a.{table} WHERE {where}) x "
           f"FULL JOIN (SELECT * FROM b.{table} WHERE {where}) y ON {on}")
    return con.execute(sql).fetchone()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_cluster_matches_a_local_run_and_survives_losing_the_worker(tmp_path: Path, ray_cluster) -> None:
    small, full = tmp_path / "small.toml", tmp_path / "full.toml"
    small.write_text(_spec("0.0, 1.0"))
    full.write_text(_spec("0.0, 0.25, 0.5, 0.75, 1.0"))  # the same experiment, 3 more α: 9 more trials
    local_db, cluster_db = tmp_path / "local" / "results.duckdb", tmp_path / "cluster" / "results.duckdb"
    t0 = time.monotonic()

    # the reference: a local Ray instance, run alongside the cluster (it never joins it)
    local = ray_cluster.driver(full, "--num-cpus", "2", "--db", local_db, cwd=tmp_path)
    ray_cluster.start()
    head, worker = ray_cluster.node_id("h"), ray_cluster.node_id("w")
    assert head != worker

    # 1. every stage and trial through the cluster: tasks land on both nodes, each recorded with its node
    rc, out, err = ray_cluster.driver(small, "--address", ray_cluster.address, "--db", cluster_db,
                                      cwd=tmp_path).wait(timeout=300)
    assert rc == 0, out + err
    assert "trials: 6 run, 0 done before" in out, out
    with duckdb.connect(str(cluster_db), read_only=True) as con:
        nodes = {r[0] for r in con.execute("SELECT node_id FROM stages WHERE kind IN ('pretrain', 'embed', "
                                           "'separation') UNION ALL SELECT node_id FROM trials").fetchall()}
        assert nodes == {head, worker}, nodes
        driver_side = con.execute("SELECT DISTINCT node_id FROM stages WHERE kind IN ('dataset', 'analysis')")
        assert driver_side.fetchall() == [(None,)]
    t1 = time.monotonic()

    # 2. lose the worker node while it runs a trial: Ray re-runs that trial on the head, the run finishes
    run = ray_cluster.driver(full, "--address", ray_cluster.address, "--db", cluster_db, cwd=tmp_path)
    deadline, caught, raylet = time.monotonic() + 240, False, ray_cluster.raylet("w")
    while not caught and time.monotonic() < deadline and run.proc.poll() is None:
        caught = run.trials_done() >= 1 and ray_cluster.running(raylet, "run_trial")
        time.sleep(0.02)
    killed_at = run.trials_done()
    ray_cluster.kill("w")
    assert caught, "the worker node ran no trial before the run ended: " + bytes(run.err).decode(errors="replace")
    assert not ray_cluster.processes("w") and ray_cluster.processes("h")
    rc, out, err = run.wait(timeout=300)
    assert rc == 0, out + err
    assert "trials: 9 run, 6 done before" in out and "FAILED" not in out, out
    assert killed_at < 9
    t2 = time.monotonic()

    rc, out, err = local.wait(timeout=300)
    assert rc == 0, out + err

    # 3. identical results: same stage and trial ids, same checkpoint bytes, same numbers
    con = duckdb.connect()
    con.execute(f"ATTACH '{local_db}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{cluster_db}' AS b (READ_ONLY)")
    checks = {
        "stages": _mismatches(con, "stages", ["stage_id"], [], ["kind", "status", "artifact_sha256"],
                              where="kind <> 'analysis'"),
        "trials": _mismatches(con, "trials", ["trial_id"], ["alpha", "p_y_train", "best_val_bal_acc"],
                              ["status", "attribute", "seed", "n_train_g1", "epochs"]),
        "metrics": _mismatches(con, "metrics", ["trial_id", "attribute", "grp", "metric"], ["value"]),
        "metric_resamples": _mismatches(con, "metric_resamples", ["trial_id", "attribute", "grp", "metric", "b"],
                                        ["value"]),
        "separation_values": _mismatches(con, "separation_values", ["stage_id", "distance"],
                                         ["value", "value_y0", "value_y1", "null_mean", "null_std", "p_value",
                                          "calibrated", "ci_low", "ci_high"], ["n_g0", "n_g1"]),
    }
    assert checks["trials"][0] == 15 and checks["metrics"][0] > 0 and checks["separation_values"][0] == 3, checks
    assert all(bad == 0 for _, bad in checks.values()), checks
    statuses = con.execute("SELECT status, count(*) FROM b.trials GROUP BY 1").fetchall()
    assert statuses == [("done", 15)], statuses
    print(f"cluster run {t1 - t0:.0f} s, run with the worker killed after {killed_at} trials {t2 - t1:.0f} s, "
          f"total {time.monotonic() - t0:.0f} s")


def test_the_serial_executor_records_the_local_node() -> None:
    from engine.executor import LOCAL_NODE, SerialExecutor, run_all
    from engine.trial import SeparationResult

    def job(x: int) -> SeparationResult:
        if x < 0:
            raise ValueError("negative")
        return SeparationResult([{"x": x}], 0.5)

    (a, ra, ea), (b, rb, eb) = run_all(SerialExecutor(), job, [("a", (1,)), ("b", (-1,))])
    assert (a, ra, ea) == ("a", SeparationResult([{"x": 1}], 0.5, node_id=LOCAL_NODE), None)
    assert b == "b" and rb is None and isinstance(eb, ValueError)
