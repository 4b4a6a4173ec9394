"""Time the demo pipeline stage by stage, and its two hot loops against baselines measured in the same run.

1. The pipeline: the spec run from an empty database with the Ray executor (wall time per stage), then a no-op
   re-run, and the share of the run's CPU time spent outside model compute:
   1 − (Σ worker CPU-seconds of pre-training, embedding and trials) / (CPUs × wall), and the same for the trial
   sweep alone (its workers' seconds against CPUs × the trials stage's wall time).
2. Last-layer trials, on the run's own cached embeddings, for a sample of its trials (one CPU thread each):
   (a) batched heads (what the engine runs: :func:`engine.trial.run_trials`, every head of the sample in one batch),
   (b) the previous path: one trial at a time, :func:`backends.head.train_head` (nn.Linear, torch.optim.Adam,
       mini-batches) then the same evaluation,
   (c) the loop a researcher would write: sklearn ``LogisticRegression`` (lbfgs, full batch) per trial on the same
       rows, then the same evaluation.
   Seconds per trial and each baseline / batched.
3. Pre-training (SimpleCNN specs): two epochs of the spec's pre-training, one CPU thread, with the compiled 2×2
   max pooling (:mod:`backends.pooling`) against torch's ``nn.MaxPool2d`` (the previous path), with a check that
   the two checkpoints are bit-identical.
   Where torch sees a GPU, both tables gain GPU rows: the same batch of heads on the GPU (with the largest
   difference of a test metric against the CPU's heads) and pre-training epochs on the GPU in float32 and bf16.
4. Separation: one attribute's test embeddings (the trial checkpoint's), the spec's estimator with its
   permutations and bootstrap, the batched replicates against the per-draw estimator (``engine.separation._BATCHED
   = False``), with a check that every field is identical.

    .venv/bin/python bench/bench_demo.py                                # tests/specs/tiny_mnist.toml (about 2 min)
    .venv/bin/python bench/bench_demo.py specs/colored_mnist.toml       # the full demo (about 10 min on 2 CPUs)
    .venv/bin/python bench/bench_demo.py specs/redditbias_minilm.toml --sample 0   # text: share outside compute
    python3 bench/bench_demo.py specs/colored_mnist.toml --serial --sample 8         # a GPU machine without Ray

Timings are wall-clock on a possibly shared machine: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402

from engine.data import check_against_data, prepare  # noqa: E402
from engine.executor import SerialExecutor, make_executor  # noqa: E402
from engine.pipeline import Pipeline, RunSummary  # noqa: E402
from engine.spec import load_spec  # noqa: E402
from engine.store import open_store  # noqa: E402

STAGES = ("dataset", "pretrain", "embed", "separation", "trials", "analysis", "total")


def model_seconds(db: Path, experiment: str) -> tuple[float, float]:
    """(CPU-seconds of model compute in workers: pre-training, embedding and every trial's fine-tuning; of them,
    the trials'). Each task holds one whole CPU (engine.flow), so its wall time is its CPU time."""
    with open_store(db, read_only=True) as store:
        pre = store.query("SELECT coalesce(sum(s.duration_s), 0) AS t FROM experiment_stages es JOIN stages s "
                          "ON s.stage_id = es.stage_id WHERE es.experiment = ? AND s.kind IN ('pretrain', 'embed')",
                          [experiment])[0]["t"]
        trials = store.query("SELECT coalesce(sum(t.duration_s), 0) AS t FROM experiment_trials et JOIN trials t "
                             "ON t.trial_id = et.trial_id WHERE et.experiment = ?", [experiment])[0]["t"]
    return float(pre) + float(trials), float(trials)


def run_pipeline(spec_path: Path, num_cpus: int, db: Path, serial: bool = False) -> tuple[RunSummary, float]:
    spec = load_spec(spec_path)[0]
    prep = prepare(spec, spec_path)
    check_against_data(spec, prep, spec_path)
    ex = make_executor("serial" if serial else "ray", num_cpus=num_cpus)
    t0 = time.perf_counter()
    try:
        with open_store(db) as store:
            summary = Pipeline(spec, spec_path, store, ex, progress=False, prepared=prep).run()
    finally:
        ex.shutdown()
    return summary, time.perf_counter() - t0


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_trials(spec_path: Path, db: Path, sample: int) -> list[tuple[str, float, float]]:
    """(method, seconds per trial, ratio to batched) for ``sample`` trials spread over the plan. Where torch sees a
    GPU, also the same batch on the GPU (first row; ratios stay against the CPU batch) and, printed, the largest
    difference of any test metric between the GPU's and the CPU's heads."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from backends.head import head_proba, resolve_settings, train_head
    from engine.trial import TrialBatch, TrialJob, _allocate, _result, item_major, run_trials

    torch.set_num_threads(1)
    spec = load_spec(spec_path)[0]
    with open_store(db, read_only=True) as store:
        pipe = Pipeline(spec, spec_path, store, SerialExecutor(), progress=False)
        data = pipe._trial_data(with_embeddings=True)
        k, k_val = check_against_data(spec, pipe.prep, spec_path)
    trials = pipe.plan.trials
    picks = [trials[i] for i in np.linspace(0, len(trials) - 1, min(sample, len(trials))).astype(int)]
    settings = {**spec.finetune.model_dump(exclude={"mode"}), "device": "cpu"}
    jobs = [TrialJob(t.trial_id, t.attribute, t.alpha, t.seed, k, k_val, spec.allocation.sampler, settings, 1)
            for t in picks]
    resamples = item_major(data.resamples or {})
    run_trials(TrialBatch(jobs[:1]), data)  # warm-up: the kernel's compiled code, thread pools

    def one_at_a_time() -> None:
        for job in jobs:
            tr, va = _allocate(job, data)
            head = train_head(data.z["pool_train"][tr], data.y["pool_train"][tr], data.z["pool_val"][va],
                              data.y["pool_val"][va], settings=resolve_settings(settings, "bench"), seed=job.seed)
            _result(job, data, tr, head_proba(head, data.z["test"]), head.epochs, head.best_val_bal_acc, resamples)

    def sklearn_loop() -> None:  # full-batch L-BFGS on the same rows, C from the weight decay (L2 = 1 / (C n))
        for job in jobs:
            tr, _ = _allocate(job, data)
            lr = LogisticRegression(C=1.0 / max(settings["weight_decay"] * len(tr), 1e-12), max_iter=1000)
            lr.fit(data.z["pool_train"][tr], data.y["pool_train"][tr])
            _result(job, data, tr, lr.predict_proba(data.z["test"])[:, 1], int(lr.n_iter_[0]), float("nan"),
                    resamples)

    cpu_out, batched = timed(lambda: run_trials(TrialBatch(jobs), data))
    gpu_rows = []
    if torch.cuda.is_available():
        gpu_jobs = [dataclasses.replace(j, settings={**j.settings, "device": "cuda"}) for j in jobs]
        run_trials(TrialBatch(gpu_jobs[:1], device="cuda"), data)  # warm-up: CUDA context, kernels
        gpu_out, on_gpu = timed(lambda: run_trials(TrialBatch(gpu_jobs, device="cuda"), data))
        diff = max(abs(a["value"] - b["value"]) for c, g in zip(cpu_out.outcomes, gpu_out.outcomes)
                   for a, b in zip(c.result.metrics, g.result.metrics) if a["value"] == a["value"])
        epochs = sum(c.result.epochs == g.result.epochs for c, g in zip(cpu_out.outcomes, gpu_out.outcomes))
        print(f"batched heads, GPU vs CPU, {len(jobs)} trials: the same epochs in {epochs}; largest difference of "
              f"a test metric (every group and metric): {diff:.2e}")
        gpu_rows = [(f"batched heads on {torch.cuda.get_device_name()}", on_gpu / len(jobs), on_gpu / batched)]
    _, single = timed(one_at_a_time)
    _, sk = timed(sklearn_loop)
    n = len(jobs)
    return gpu_rows + [("batched heads (alloclab, CPU)", batched / n, 1.0),
            ("one head at a time (before)", single / n, single / batched),
            ("sklearn LogisticRegression per trial", sk / n, sk / batched)]


def bench_separation(spec_path: Path, db: Path) -> list[tuple[str, float, float]]:
    """(method, seconds, ratio to batched) of one separation job; asserts both give identical fields."""
    import engine.separation as sep

    spec = load_spec(spec_path)[0]
    with open_store(db, read_only=True) as store:
        pipe = Pipeline(spec, spec_path, store, SerialExecutor(), progress=False)
        test = pipe.prep.splits["test"]
        order = np.argsort(test.ids, kind="stable")
        stage = pipe.plan.embed[(spec.backbone.checkpoint_seed, "test")].stage_id
        _, z = store.embeddings(stage, "test")
    attr = spec.attribute_names[0]
    st = spec.separation
    kwargs = dict(distance=st.distances[0], bins=st.bins, pca_variance=st.pca_variance, class_weights=st.class_weights,
                  permutations=st.permutations, bootstrap=st.bootstrap, seed=st.seed, match_sizes=st.match_sizes)
    y, g = test.y[order], test.groups[attr][order]
    fast, t_fast = timed(lambda: sep.estimate(z, y, g, **kwargs))
    sep._BATCHED = False
    try:
        slow, t_slow = timed(lambda: sep.estimate(z, y, g, **kwargs))
    finally:
        sep._BATCHED = True
    same = all(fast[k] == slow[k] or (fast[k] != fast[k] and slow[k] != slow[k]) for k in fast if k != "params")
    label = f"{kwargs['distance']}, R={st.permutations}, B={st.bootstrap}, {z.shape[0]}x{z.shape[1]}, '{attr}'"
    print(f"separation job ({label}): fields identical to the per-draw estimator: {same}")
    return [("batched replicates (alloclab)", t_fast, 1.0), ("per-draw estimator (before)", t_slow, t_slow / t_fast)]


def bench_pretrain(spec_path: Path, epochs: int = 2) -> list[tuple[str, float, float]]:
    """(method, seconds per epoch, ratio to compiled) of SimpleCNN pre-training; asserts identical checkpoints."""
    import torch
    from torch import nn

    import backends.vision as vision

    torch.set_num_threads(1)
    spec = load_spec(spec_path)[0]
    prep = prepare(spec, spec_path)
    bundle = prep.bundle
    args = (bundle.inputs("pretrain_train"), prep.splits["pretrain_train"].y, bundle.inputs("pretrain_val"),
            prep.splits["pretrain_val"].y)
    settings = {**spec.backbone.pretrain.model_dump(), "max_epochs": epochs, "device": "cpu"}
    compiled = vision.SimpleCNN.__init__

    def torch_pooling(self: Any) -> None:
        compiled(self)
        self.conv[1], self.conv[4] = nn.MaxPool2d(2), nn.MaxPool2d(2)

    states, seconds = [], []
    for init in (compiled, torch_pooling, compiled, torch_pooling):  # the first pair warms up (kernel load, oneDNN)
        vision.SimpleCNN.__init__ = init  # type: ignore[method-assign]
        try:
            ckpt, secs = timed(lambda: vision.SimpleCNNBackend(settings).pretrain(*args, seed=0))
        finally:
            vision.SimpleCNN.__init__ = compiled  # type: ignore[method-assign]
        states.append(ckpt.state)
        seconds.append(secs / ckpt.log["epochs"])
    same = len(set(states)) == 1
    print(f"pre-training ({len(args[0])} images, {epochs} epochs): checkpoints bit-identical: {same}")
    gpu_rows = []
    if torch.cuda.is_available():  # the GPU path: F.max_pool2d (cuDNN), float32 and bf16 autocast
        for amp in ("none", "none", "bf16"):  # the first run warms up (CUDA context, cuDNN handles)
            gpu = {**settings, "device": "cuda", "amp": amp}
            ckpt, secs = timed(lambda: vision.SimpleCNNBackend(gpu).pretrain(*args, seed=0))  # noqa: B023
            gpu_rows.append((f"{torch.cuda.get_device_name()}, amp={amp}", secs / ckpt.log["epochs"]))
        gpu_rows = gpu_rows[1:]
    return [("compiled 2x2 max pooling (alloclab)", seconds[2], 1.0),
            ("nn.MaxPool2d (before)", seconds[3], seconds[3] / seconds[2])] + [
            (name, secs, secs / seconds[2]) for name, secs in gpu_rows]


def table(title: str, rows: list[tuple[str, float, float]], unit: str) -> None:
    print(f"\n{title}")
    print(f"{'method':<40} {unit:>14} {'÷ alloclab':>11}")
    for name, secs, ratio in rows:
        print(f"{name:<40} {secs:>14.3f} {ratio:>10.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?", default=str(ROOT / "tests" / "specs" / "tiny_mnist.toml"))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sample", type=int, default=4, help="trials timed against the baselines (0 = skip)")
    ap.add_argument("--keep", metavar="DIR", help="keep the database in DIR (default: a temporary dir)")
    ap.add_argument("--serial", action="store_true", help="run the pipeline in this process, without Ray (a GPU "
                    "machine without Ray); the trials then run on the GPU as one batch when torch sees one")
    args = ap.parse_args()
    spec_path = Path(args.spec).resolve()
    name = load_spec(spec_path)[0].experiment.name
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(args.keep or scratch) / "results.duckdb"
        cpus = 1 if args.serial else args.num_cpus
        summary, wall = run_pipeline(spec_path, cpus, db, args.serial)
        compute, trial_compute = model_seconds(db, name)
        _, noop = run_pipeline(spec_path, cpus, db, args.serial)
        print(f"spec: {spec_path.name}   cpus: {cpus}{' (serial, no Ray)' if args.serial else ''}")
        print(f"{'stage (spans overlap)':<24} {'wall s':>8}")
        for stage in STAGES:
            print(f"{stage:<24} {summary.seconds.get(stage, float('nan')):>8.2f}")
        print(f"{'wall (incl. Ray start)':<24} {wall:>8.2f}")
        print(f"trials: {summary.executed['trials']} in {summary.seconds['trials']:.1f} s; no-op re-run: {noop:.2f} s")
        share = 1 - compute / (cpus * wall)
        print(f"{compute:.1f} CPU-seconds of model compute on {cpus} CPUs in {wall:.1f} s wall: "
              f"{100 * share:.0f}% of the CPU time went outside model compute (Ray start, data loading, DB writes, "
              "separation, analysis, idle CPUs)")
        sweep = summary.seconds.get("trials", 0.0)
        if sweep > 0 and summary.executed["trials"]:
            print(f"the trials: {trial_compute:.1f} CPU-seconds within their {sweep:.1f} s span, "
                  f"{100 * trial_compute / (cpus * sweep):.0f}% of {cpus} CPUs over it (the other stages' tasks "
                  "share the span: engine.flow)")
        spec = load_spec(spec_path)[0]
        if args.sample > 0 and spec.finetune.mode == "last_layer":
            table(f"last-layer trials ({args.sample} of the run's trials, one CPU thread)", bench_trials(
                spec_path, db, args.sample), "s per trial")
        if spec.backbone.kind == "simple_cnn":
            table("pre-training (one CPU thread)", bench_pretrain(spec_path), "s per epoch")
        table("separation (one job, one CPU)", bench_separation(spec_path, db), "s")


if __name__ == "__main__":
    main()
