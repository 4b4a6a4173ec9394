"""Time the demo pipeline stage by stage: Ray executor vs the in-process serial executor (the baseline).

Both runs start from an empty database in a temporary folder and run the same spec, so every stage executes.
Prints wall time per stage, trials/s, and the ratio serial / Ray (above 1 = Ray is faster), the time of a no-op
re-run (everything already done), and the share of the Ray run's wall time spent outside model compute:
1 − (Σ worker seconds of pre-training, embedding and trial training) / (CPUs × wall).

    .venv/bin/python bench/bench_demo.py                      # tests/specs/tiny_mnist.toml (about a minute)
    .venv/bin/python bench/bench_demo.py specs/colored_mnist.toml --skip-serial   # the full demo
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from engine.data import check_against_data, prepare  # noqa: E402
from engine.executor import make_executor  # noqa: E402
from engine.pipeline import Pipeline, RunSummary  # noqa: E402
from engine.spec import load_spec  # noqa: E402
from engine.store import open_store  # noqa: E402

STAGES = ("dataset", "pretrain", "embed", "separation", "trials", "analysis", "total")


def model_seconds(db: Path, experiment: str) -> float:
    """Worker-side seconds of model compute: pre-training, embedding and every trial's fine-tuning."""
    with open_store(db, read_only=True) as store:
        stages = store.query("SELECT coalesce(sum(s.duration_s), 0) AS t FROM experiment_stages es JOIN stages s "
                             "ON s.stage_id = es.stage_id WHERE es.experiment = ? AND s.kind IN ('pretrain', 'embed')",
                             [experiment])[0]["t"]
        trials = store.query("SELECT coalesce(sum(t.duration_s), 0) AS t FROM experiment_trials et JOIN trials t "
                             "ON t.trial_id = et.trial_id WHERE et.experiment = ?", [experiment])[0]["t"]
    return float(stages) + float(trials)


def run_once(spec_path: Path, executor_kind: str, num_cpus: int, db: Path) -> tuple[RunSummary, float]:
    (spec,) = load_spec(spec_path)[:1]
    prep = prepare(spec, spec_path)
    check_against_data(spec, prep, spec_path)
    ex = make_executor(executor_kind, num_cpus=num_cpus)
    t0 = time.perf_counter()
    try:
        with open_store(db) as store:
            summary = Pipeline(spec, spec_path, store, ex, progress=False, prepared=prep).run()
    finally:
        ex.shutdown()
    return summary, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?", default=str(ROOT / "tests" / "specs" / "tiny_mnist.toml"))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-serial", action="store_true", help="only the Ray run (the full demo takes long serially)")
    ap.add_argument("--keep", metavar="DIR", help="keep the databases in DIR/<executor>/ (default: a temporary dir)")
    args = ap.parse_args()
    spec_path = Path(args.spec).resolve()
    results: dict[str, RunSummary] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        kinds = ["ray"] + ([] if args.skip_serial else ["serial"])
        for kind in kinds:
            db = Path(tmp) / kind / "results.duckdb"
            results[kind], wall = run_once(spec_path, kind, args.num_cpus, db)
            results[kind].seconds["wall (incl. Ray start)"] = wall
        name = load_spec(spec_path)[0].experiment.name
        compute = model_seconds(Path(tmp) / "ray" / "results.duckdb", name)
        _, noop = run_once(spec_path, "ray", args.num_cpus, Path(tmp) / "ray" / "results.duckdb")

    cols = ["stage"] + [f"{k} (s)" for k in results] + (["serial/ray"] if "serial" in results else [])
    print(f"spec: {spec_path.name}   cpus: {args.num_cpus}")
    print("  ".join(f"{c:>22}" for c in cols))
    for stage in (*STAGES, "wall (incl. Ray start)"):
        vals = [results[k].seconds.get(stage, float("nan")) for k in results]
        row = [f"{stage:>22}"] + [f"{v:>22.2f}" for v in vals]
        if "serial" in results:
            row.append(f"{vals[1] / vals[0]:>21.2f}x" if vals[0] > 0 else f"{'-':>22}")
        print("  ".join(row))
    for k, s in results.items():
        n = s.executed["trials"]
        print(f"{k}: {n} trials, {n / s.seconds['trials']:.2f} trials/s")
    print(f"no-op re-run of the finished spec: {noop:.2f} s")
    wall = results["ray"].seconds["wall (incl. Ray start)"]
    share = 1 - compute / (args.num_cpus * wall)
    print(f"ray run: {compute:.1f} worker-seconds of model compute on {args.num_cpus} CPUs in {wall:.1f} s wall: "
          f"{100 * share:.0f}% of the CPU time went outside model compute (Ray start, data loading, DB writes, "
          "separation, analysis, idle workers)")


if __name__ == "__main__":
    main()
