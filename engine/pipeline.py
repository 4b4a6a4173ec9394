"""The driver: run a plan's missing stages and trials through an executor and write each result to the store.

Order: dataset -> pretrain -> embed -> separation -> trials -> analysis, except that when the trial checkpoint's
seed finishes pre-training while other seeds still train, its embeddings and the trials run right away, beside those
seeds (which feed only the separation stage). What is already done in the store is skipped, so a second run of a
finished spec executes nothing and an interrupted one resumes. Each stage or trial is written in one transaction
with its completion row last. A failed trial is stored with its error and the run goes on (``retry_failed`` re-runs
them); a failed stage stops the stages that depend on it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from backends.base import Checkpoint
from engine import provenance
from engine.data import Prepared, check_against_data, check_decoded_shape, image_files, prepare, resolve_base
from engine.errors import BackendError, StoreError
from engine.executor import Executor
from engine.flow import PRIORITY, Flow
from engine.plan import TRIAL_SPLITS, Plan, PlannedStage, make_plan
from engine.sampling import expand_counts
from engine.spec import Spec
from engine.store import Store
from engine.trial import (METRICS, EmbedJob, EmbedResult, ModelRef, PretrainJob, PretrainResult, SeparationJob,
                          TrialBatch, TrialBatchResult, TrialData, TrialJob, TrialOutcome, TrialResult, TransferJob,
                          group_cells, group_metrics, resample_weights, run_embed, run_pretrain, run_separation,
                          run_transfer, run_trials)


@dataclass
class RunSummary:
    executed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # attempted in this run and failed
    failed_before: Counter[str] = field(default_factory=Counter)  # failed earlier, not retried this time
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """'trials: 12 run, 30 done before, 2 FAILED, 1 failed earlier (not retried)' per kind; "run" counts every
        attempt of this invocation, failed ones included."""
        kinds = ["dataset", "pretrain", "embed", "separation", "trials", "analysis"]
        parts = [f"{k}: {self.executed[k] + self.failed[k]} run, {self.skipped[k]} done before"
                 + (f", {self.failed[k]} FAILED" if self.failed[k] else "")
                 + (f", {self.failed_before[k]} failed earlier (not retried; --retry-failed)"
                    if self.failed_before[k] else "") for k in kinds]
        return "; ".join(parts)


# Last-layer trials per worker task at most (see Pipeline._trial_batches). On the CPU the compiled kernel trains a
# stack's heads one after another, so a bigger batch saves little (the val products and Python overhead per epoch)
# while a smaller one balances the CPUs better at the end and loses less to an interruption. At the demo scale a
# head costs about 1 s of one CPU, so a batch of 8 is about 8 s of work.
MAX_HEADS_PER_BATCH = 8


def _join_failures(failed: list[tuple[str, str]]) -> str:
    """'embed seed=0 test, embed seed=0 pool_train: DataError: …' : each distinct error once, with its stages."""
    by_error: dict[str, list[str]] = {}
    for label, error in failed:
        by_error.setdefault(error, []).append(label)
    return " | ".join(f"{', '.join(labels)}: {error}" for error, labels in by_error.items())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _bar(desc: str, total: int, show: bool) -> tqdm:
    return tqdm(total=total, desc=f"{desc:<10}", unit="job", disable=not show, file=sys.stderr, leave=True,
                dynamic_ncols=True, mininterval=0.5)


class Pipeline:
    """Runs one resolved spec against a store. Construct, then call :meth:`run`."""

    def __init__(self, spec: Spec, spec_path: Path, store: Store, executor: Executor, *, progress: bool = True,
                 retry_failed: bool = False, prepared: Prepared | None = None) -> None:
        self.spec = spec
        self.spec_path = spec_path
        self.store = store
        self.ex = executor
        self.progress = progress
        self.retry_failed = retry_failed
        self.plan: Plan = make_plan(spec)
        self.summary = RunSummary()
        self._prep = prepared
        self._model: ModelRef | None = None
        self._written: set[str] = set()  # stage ids this invocation wrote (done or failed)
        self._failed: dict[str, list[tuple[str, str]]] = {}  # stage kind -> (label, error) of this run's failures
        self._bars: dict[str, tqdm] = {}  # stage kind -> its progress bar while a flow runs
        self._fresh: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # trial-seed embed id -> (ids, vectors) just made
        self._base: int | None = None  # protocol 'expand': the resolved allocation.base

    # ---- helpers -------------------------------------------------------------------------------------------
    @property
    def model(self) -> ModelRef:
        """What workers load: the dataset (less the rows a missing = "drop" rule left out) and the backbone."""
        if self._model is None:
            sp = self.spec
            keep = self.prep.keep if any(self.prep.n_dropped(s) for s in self.prep.splits) else None
            transform = None if sp.backbone.transform is None else sp.backbone.transform.model_dump(mode="json")
            self._model = ModelRef(sp.dataset.kind, sp.dataset.options, sp.backbone.kind, sp.backbone.options, keep,
                                   transform, str(self.store.artifacts_dir.resolve() / "images"))
        return self._model

    @property
    def prep(self) -> Prepared:
        if self._prep is None:
            self._prep = prepare(self.spec, self.spec_path)
        return self._prep

    def _done(self, stages: Iterable[PlannedStage]) -> dict[str, str]:
        return self.store.status_of("stages", "stage_id", [s.stage_id for s in stages])

    def _pending(self, kind: str, stages: list[PlannedStage]) -> list[PlannedStage]:
        status = self._done(stages)
        todo = [s for s in stages if status.get(s.stage_id) != "done"]
        self.summary.skipped[kind] += sum(1 for s in stages if status.get(s.stage_id) == "done"
                                          and s.stage_id not in self._written)  # not the ones this run wrote
        return todo

    def _write_stage(self, st: PlannedStage, *, status: str = "done", error: str | None = None,
                     duration_s: float | None = None, artifact: str | None = None,
                     artifact_sha256: str | None = None, log: dict[str, Any] | None = None,
                     node_id: str | None = None) -> None:
        """The completion row; call inside the stage's transaction, after its data rows. ``node_id``: where an
        executor computed it (None for what the driver computes itself)."""
        self.store.insert_rows("stages", [{
            "stage_id": st.stage_id, "kind": st.kind, "key_json": json.dumps(st.key, sort_keys=True),
            "status": status, "error": error, "duration_s": duration_s, "artifact": artifact,
            "artifact_sha256": artifact_sha256,
            "log_json": json.dumps(log) if log is not None else None, "node_id": node_id, "finished_at": _now()}])
        counted = "separation" if st.kind == "transfer" else st.kind  # transfer is a distance: counted with them
        (self.summary.executed if status == "done" else self.summary.failed)[counted] += 1
        self._written.add(st.stage_id)

    def _link(self) -> None:
        rows = [{"experiment": self.plan.experiment, "stage_id": s.stage_id, "kind": s.kind, "label": s.label}
                for s in self.plan.stages()]
        trials = [{"experiment": self.plan.experiment, "trial_id": t.trial_id} for t in self.plan.trials]
        exp = {"experiment": self.plan.experiment}  # the experiment is what its spec says now: relink
        with self.store.transaction():
            self.store.insert_rows("experiment_stages", rows, replace_where=exp)
            self.store.insert_rows("experiment_trials", trials, replace_where=exp)

    def _register_experiment(self) -> None:
        spec_toml = self.spec_path.read_text(encoding="utf-8") if self.spec_path.exists() else ""
        existing = self.store.query("SELECT created_at FROM experiments WHERE name = ?", [self.spec.experiment.name])
        with self.store.transaction():
            self.store.insert_rows("experiments", [{
                "name": self.spec.experiment.name, "spec_path": str(self.spec_path), "spec_toml": spec_toml,
                "spec_json": self.spec.model_dump_json(), "variant_json": json.dumps(self.spec.variant, sort_keys=True),
                "git_commit": provenance.git_commit(), "versions_json": json.dumps(provenance.versions()),
                "created_at": existing[0]["created_at"] if existing else _now(), "updated_at": _now()}])

    # ---- stages --------------------------------------------------------------------------------------------
    def _group_rows(self, attributes: set[str] | None = None) -> list[dict[str, np.ndarray]]:
        parts = []
        for sd in self.prep.splits.values():
            for attr, g in sd.groups.items():
                if attributes is None or attr in attributes:
                    has = g >= 0  # items an attribute excludes (missing = "exclude") have no row for it
                    parts.append({"item_id": sd.ids[has], "attribute": np.full(int(has.sum()), attr, dtype=object),
                                  "grp": g[has]})
        return parts

    @staticmethod
    def _table(stage_id: str, parts: list[dict[str, np.ndarray]]) -> Any:
        import pyarrow as pa

        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(next(iter(cols.values())))
        return pa.table({"dataset_id": [stage_id] * n, **{k: pa.array(v) for k, v in cols.items()}})

    def _add_null_partitions(self, st: PlannedStage) -> None:
        """A finished dataset stage lacks the null partitions added to the spec since (a pure function of item ids
        and the seed, so not part of the stage's id): write their groups now."""
        have = {r["attribute"] for r in self.store.query(
            "SELECT DISTINCT attribute FROM item_groups WHERE dataset_id = ?", [st.stage_id])}
        missing = set(self.spec.null_attribute_names) - have
        if missing:
            with self.store.transaction():
                self.store.insert_rows("item_groups", self._table(st.stage_id, self._group_rows(missing)))

    def _stage_dataset(self) -> None:
        st = self.plan.dataset
        if not self._pending("dataset", [st]):
            self._add_null_partitions(st)
            return
        t0 = time.perf_counter()
        items = [{"item_id": sd.ids, "split": np.full(sd.ids.size, split, dtype=object), "y": sd.y}
                 for split, sd in self.prep.splits.items()]
        table = lambda parts: self._table(st.stage_id, parts)  # noqa: E731
        groups = self._group_rows()
        with self.store.transaction():
            self.store.insert_rows("items", table(items), replace_where={"dataset_id": st.stage_id})
            self.store.insert_rows("item_groups", table(groups), replace_where={"dataset_id": st.stage_id})
            counts = {s: self.prep.group_counts(s) for s in self.prep.splits}
            self._write_stage(st, duration_s=time.perf_counter() - t0,
                              log={"fingerprint": self.prep.bundle.fingerprint, "group_counts": counts,
                                   "dropped": self.prep.dropped,
                                   **({"excluded": self.prep.excluded} if self.prep.excluded else {}),
                                   "n_dropped": {s: self.prep.n_dropped(s) for s in self.prep.splits}})
            dropped = {s: self.prep.n_dropped(s) for s in self.prep.splits if self.prep.n_dropped(s)}
            if dropped:
                print(f"alloclab: {self.spec.experiment.name}: left out items with a missing value (missing = "
                      f"\"drop\"): " + ", ".join(f"{n} of {s}" for s, n in dropped.items()), file=sys.stderr)

    def _decode_images(self) -> None:
        """Image datasets: decode every split the pending stages read into the cache beside the database, here in
        the driver and before any training, so that a corrupt file stops the run at once and workers only
        memory-map the result (they never decode). Nothing to do when those stages are done."""
        if not image_files(self.prep.bundle):
            return
        def todo(stages: list[PlannedStage]) -> list[PlannedStage]:  # as _pending, without counting
            status = self._done(stages)
            return [s for s in stages if status.get(s.stage_id) != "done"]

        need: set[str] = set()
        if todo(list(self.plan.pretrain.values())) and self.spec.backbone.pretrain.max_epochs:
            need |= {"pretrain_train", "pretrain_val"}
        need |= {st.params["split"] for st in todo(list(self.plan.embed.values()))}
        if self.spec.finetune.mode != "last_layer":
            status = self.store.status_of("trials", "trial_id", [t.trial_id for t in self.plan.trials])
            if any(status.get(t.trial_id) != "done" for t in self.plan.trials):
                need |= {"pool_train", "pool_val", "test"}
        if not need:
            return
        t0 = time.perf_counter()
        bundle = self.model.bundle(verify=True)
        for split in sorted(need):
            x = bundle.inputs(split)
            if len(x):
                check_decoded_shape(self.spec, x.shape[1:], self.spec_path)
        self.summary.seconds["decode"] = time.perf_counter() - t0

    def _checkpoint_path(self, st: PlannedStage) -> Path:
        return self.store.artifacts_dir / f"{st.stage_id}.pt"

    def _read_checkpoint(self, stage_id: str) -> tuple[bytes | None, str | None, dict[str, Any]]:
        """(bytes, None, stage row) of a pre-training stage's checkpoint, verified against the SHA-256 recorded
        with it; or (None, why it cannot be trusted: missing, unreadable, not the bytes recorded, row)."""
        rows = self.store.query("SELECT artifact, artifact_sha256, log_json FROM stages WHERE stage_id = ?",
                                [stage_id])
        row = rows[0] if rows else {}
        path = self.store.path.parent / row["artifact"] if row.get("artifact") else self.store.artifacts_dir / (
            f"{stage_id}.pt")
        try:
            state = path.read_bytes()
        except FileNotFoundError:
            return None, "is missing", row
        except OSError as e:
            return None, f"cannot be read ({e.strerror})", row
        digest, want = hashlib.sha256(state).hexdigest(), row.get("artifact_sha256")
        if want is not None and digest != want:
            return None, (f"is not the file recorded (SHA-256 {digest[:12]}… instead of {want[:12]}…: truncated or "
                          "replaced)"), row
        return state, None, row

    def _add_pretrain(self, flow: Flow, ready: Callable[[int], None] | None = None) -> None:
        """Queue the pre-training of every seed not done. ``ready(seed)`` is called for each seed whose checkpoint
        exists: at once for those done before, else when its checkpoint is written (it may queue what that
        unlocks). A failed seed is recorded; :meth:`_run_flow` raises once the flow has ended."""
        stages = list(self.plan.pretrain.values())
        status = self._done(stages)
        todo = []
        for s in stages:
            if status.get(s.stage_id) != "done":
                todo.append(s)
            elif (problem := self._read_checkpoint(s.stage_id)[1]) is not None:  # stale: rebuild it, say so once
                print(f"alloclab: {s.label}: checkpoint {self._checkpoint_path(s)} {problem}; pre-training it again",
                      file=sys.stderr)
                todo.append(s)
        self.summary.skipped["pretrain"] += len(stages) - len(todo)
        done_before = [s.params["seed"] for s in stages if s not in todo]
        if todo:
            self._queue_pretrain(flow, todo, ready)
        if ready is not None:
            for seed in done_before:
                ready(seed)

    def _queue_pretrain(self, flow: Flow, todo: list[PlannedStage], ready: Callable[[int], None] | None) -> None:
        y_train, y_val = self.prep.splits["pretrain_train"].y, self.prep.splits["pretrain_val"].y
        settings, gpus = self._backbone_settings()
        reg = self.spec.regulariser
        reg_args: dict[str, Any] = {}
        if reg.applies_to("pretrain"):
            reg_args = {"regulariser": reg.model_dump(mode="json"),
                        "groups_train": self.prep.splits["pretrain_train"].groups[str(reg.attribute)]}
        by_id = {s.stage_id: s for s in todo}
        self.store.artifacts_dir.mkdir(parents=True, exist_ok=True)
        bar = self._progress("pretrain", len(todo))

        def on_done(sid: str, res: Any, err: BaseException | None) -> None:
            st = by_id[sid]
            if err is not None:
                with self.store.transaction():
                    self._write_stage(st, status="failed", error=f"{type(err).__name__}: {err}")
                self._failed.setdefault("pretrain", []).append((st.label, f"{type(err).__name__}: {err}"))
            else:
                assert isinstance(res, PretrainResult)
                path = self._checkpoint_path(st)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(res.checkpoint.state)
                os.replace(tmp, path)
                with self.store.transaction():
                    self._write_stage(st, duration_s=res.duration_s,
                                      artifact=str(path.relative_to(self.store.path.parent)),
                                      artifact_sha256=hashlib.sha256(res.checkpoint.state).hexdigest(),
                                      log=res.checkpoint.log, node_id=res.node_id)
            bar.update()
            if err is None and ready is not None:
                ready(st.params["seed"])

        cs = self.spec.backbone.checkpoint_seed
        for s in todo:
            job = PretrainJob(self.model, settings, s.params["seed"], y_train, y_val, self.ex.threads_per_task,
                              **reg_args)
            priority = PRIORITY["pretrain_trial_seed" if s.params["seed"] == cs else "pretrain"]
            flow.add("pretrain", priority, run_pretrain, [(s.stage_id, (job,))], on_done, gpus=gpus)

    def _progress(self, kind: str, n: int) -> tqdm:
        """The progress bar of ``kind`` (one per kind and run), grown by ``n`` jobs."""
        bar = self._bars.get(kind)
        if bar is None:
            bar = self._bars[kind] = _bar(kind, n, self.progress)
        else:
            bar.total += n
            bar.refresh()
        return bar

    def _run_flow(self, flow: Flow) -> None:
        """Run the queued tasks; then stop with the first stage that failed for good (pre-training, embedding),
        after everything it did not block has run and been stored."""
        try:
            flow.run()
        finally:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
        for kind, what in (("pretrain", "pre-training"), ("embed", "embedding")):
            if self._failed.get(kind):
                raise BackendError(f"{what} failed: {_join_failures(self._failed[kind])}; what needs it did not run, "
                                   "the rest is stored; fix: the cause above, then run again (only what is missing "
                                   "runs)")
        for kind in ("separation", "transfer"):
            if self._failed.get(kind):
                print(f"alloclab: warning: {kind} failed for " + _join_failures(self._failed.pop(kind)),
                      file=sys.stderr)

    def _load_checkpoint(self, pretrain_id: str) -> Checkpoint:
        """The checkpoint, verified against the SHA-256 recorded with its stage."""
        state, problem, row = self._read_checkpoint(pretrain_id)
        if state is None:
            raise StoreError(f"the checkpoint of stage {pretrain_id} {problem}; re-run `alloclab run` to pre-train "
                             "again")
        return Checkpoint(self.spec.backbone.kind, state, json.loads(row.get("log_json") or "{}"))

    def _check_vectors(self, st: PlannedStage, res: EmbedResult) -> None:
        n = self.prep.splits[st.params["split"]].ids.size
        v = res.vectors
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.shape[0] != n or v.dtype != np.float32:
            raise BackendError(f"backend '{self.spec.backbone.kind}' returned embeddings of shape "
                               f"{getattr(v, 'shape', None)} dtype {getattr(v, 'dtype', None)} for {st.label}; "
                               f"expected ({n}, d) float32")
        if not np.isfinite(v).all():
            raise BackendError(f"backend '{self.spec.backbone.kind}' returned non-finite embeddings for {st.label}")

    def _add_embed(self, flow: Flow, stages: list[PlannedStage], priority: int,
                   then: Callable[[], None] | None = None) -> None:
        """Queue the embedding stages of ``stages`` not done; ``then()`` once all of them exist (at once if they
        did before)."""
        todo = self._pending("embed", stages)
        if not todo:
            if then is not None:
                then()
            return
        from backends import backend_class

        has_head = getattr(backend_class(self.spec.backbone.kind), "has_head", True)  # precomputed: no classifier
        ckpts = {}
        for st in todo:
            pid = self.plan.pretrain[st.params["seed"]].stage_id
            if pid not in ckpts:
                ckpts[pid] = self.ex.put(self._load_checkpoint(pid))
        settings, gpus = self._backbone_settings()
        jobs = [(st.stage_id, (EmbedJob(self.model, settings, st.params["split"],
                                        has_head and st.params["split"] == "test", self.ex.threads_per_task),
                               ckpts[self.plan.pretrain[st.params["seed"]].stage_id]))
                for st in todo]
        by_id = {s.stage_id: s for s in todo}
        left = {"n": len(todo), "failed": 0}
        bar = self._progress("embed", len(jobs))
        cs = self.spec.backbone.checkpoint_seed

        def on_done(sid: str, res: Any, err: BaseException | None) -> None:
            st = by_id[sid]
            left["n"] -= 1
            if err is None:
                try:
                    self._check_vectors(st, res)
                except BackendError as e:
                    err = e
            if err is not None:
                with self.store.transaction():
                    self._write_stage(st, status="failed", error=f"{type(err).__name__}: {err}")
                self._failed.setdefault("embed", []).append((st.label, f"{type(err).__name__}: {err}"))
                left["failed"] += 1
            else:
                sd = self.prep.splits[st.params["split"]]
                with self.store.transaction():
                    self.store.insert_embeddings(st.stage_id, st.params["split"], sd.ids, res.vectors)
                    if res.proba is not None:
                        rows = [{"stage_id": st.stage_id, **r} for r in group_metrics(res.proba, sd.y, sd.groups)]
                        self.store.insert_rows("pretrained_metrics", rows, replace_where={"stage_id": st.stage_id})
                    self._write_stage(st, duration_s=res.duration_s,
                                      log={"n": int(res.vectors.shape[0]), "dim": int(res.vectors.shape[1])},
                                      node_id=res.node_id)
                if st.params["seed"] == cs and st.params["split"] in TRIAL_SPLITS:  # the trials read these next
                    self._fresh[st.stage_id] = (sd.ids, res.vectors)
            bar.update()
            if left["n"] == 0 and not left["failed"] and then is not None:
                then()

        flow.add("embed", priority, run_embed, jobs, on_done, gpus=gpus, later=True)  # 300 MB commits overlap

    def _add_separation(self, flow: Flow, stages: list[PlannedStage]) -> None:
        """Queue the separation stages of ``stages`` not done (their seeds' test embeddings exist)."""
        todo = self._pending("separation", stages)
        if not todo:
            return
        test = self.prep.splits["test"]
        order = np.argsort(test.ids, kind="stable")
        refs: dict[str, Any] = {}
        for eid in sorted({st.key["embed_id"] for st in todo}):  # each seed's test embeddings, shipped once
            ids, z = self.store.embeddings(eid, "test")
            if not np.array_equal(ids, test.ids[order]):
                raise StoreError(f"embeddings of stage {eid} do not match the test split's items")
            refs[eid] = self.ex.put(z)
        sep = self.spec.separation.model_dump(exclude={"min_effect"})
        jobs = [(st.stage_id, (SeparationJob(st.params["attribute"], test.y[order],
                                             test.groups[st.params["attribute"]][order], sep, self.ex.threads_per_task),
                               refs[st.key["embed_id"]])) for st in todo]
        self._add_distances(flow, "separation", run_separation, jobs, todo)

    def _add_distances(self, flow: Flow, what: str, fn: Callable[..., Any], jobs: list[tuple[str, tuple[Any, ...]]],
                       todo: list[PlannedStage], gpus: int = 0) -> None:
        """Queue separation-like stages (their results are rows of separation_values), each written as it ends. A
        failure is a warning (:meth:`_run_flow`): a bad estimator setting is no reason to stop the trials."""
        by_id = {st.stage_id: st for st in todo}
        bar = self._progress(what, len(jobs))

        def on_done(sid: str, res: Any, err: BaseException | None) -> None:
            st = by_id[sid]
            with self.store.transaction():
                if err is not None:
                    self._write_stage(st, status="failed", error=f"{type(err).__name__}: {err}")
                    self._failed.setdefault(what, []).append((st.label, f"{type(err).__name__}: {err}"))
                else:
                    rows = [{"stage_id": st.stage_id, "attribute": st.params["attribute"],
                             "pretrain_seed": st.params["seed"], **r} for r in res.rows]
                    self.store.insert_rows("separation_values", rows, replace_where={"stage_id": st.stage_id})
                    self._write_stage(st, duration_s=res.duration_s, node_id=res.node_id)
            bar.update()

        flow.add(what, PRIORITY["separation"], fn, jobs, on_done, gpus=gpus, later=True)

    def _stage_transfer(self, k: int, k_val: int) -> None:
        """The ``transfer`` distance per attribute (heads on one group's pool items, on the trial checkpoint's
        embeddings); its rows go to separation_values like every distance, counted with the separation stages."""
        todo = self._pending("separation", list(self.plan.transfer.values()))
        if not todo:
            return
        data_ref = self.ex.put(self._trial_data(with_embeddings=True))
        settings = self.spec.finetune.model_dump(exclude={"mode"})
        device = self._device(settings["device"])
        settings["device"] = device
        sep = self.spec.separation
        jobs = [(st.stage_id, (TransferJob(st.params["attribute"], k, k_val, sep.transfer_repeats, sep.seed, settings,
                                           device, self.ex.threads_per_task), data_ref)) for st in todo]
        flow = Flow(self.ex)
        self._add_distances(flow, "transfer", run_transfer, jobs, todo, gpus=1 if device.startswith("cuda") else 0)
        self._run_flow(flow)

    def _trial_data(self, with_embeddings: bool) -> TrialData:
        """Labels and groups of the trial splits in item-id order, plus their cached embeddings if asked."""
        cs = self.spec.backbone.checkpoint_seed
        z, y, groups = {}, {}, {}
        for split in TRIAL_SPLITS:
            sd = self.prep.splits[split]
            order = np.argsort(sd.ids, kind="stable")
            if with_embeddings:
                eid = self.plan.embed[(cs, split)].stage_id
                if eid in self._fresh:  # embedded by this run: the vectors it just stored, without reading them back
                    ids, vec = self._fresh[eid]
                    ids, vec = ids[order], vec[order]
                else:
                    ids, vec = self.store.embeddings(eid, split)
                if not np.array_equal(ids, sd.ids[order]):
                    raise StoreError(f"stored embeddings of {split} do not match the dataset's items; "
                                     "re-run with a new --db")
                z[split] = vec
            y[split] = sd.y[order]
            groups[split] = {a: g[order] for a, g in sd.groups.items()}
        an = self.spec.analysis  # the paired test resamples: drawn once here, shared by every trial
        boot = resample_weights(y["test"], groups["test"], an.test_resamples, an.test_resample_seed)
        return TrialData(z, y, groups, boot)

    def _add_trials(self, flow: Flow, k: int, k_val: int) -> None:
        """Queue the trials not done (or failed, with --retry-failed), in batches (:meth:`_trial_batches`)."""
        trials = self.plan.trials
        status = self.store.status_of("trials", "trial_id", [t.trial_id for t in trials])
        wanted = ("done", "failed") if not self.retry_failed else ("done",)
        todo = [t for t in trials if status.get(t.trial_id) not in wanted]
        self.summary.skipped["trials"] += sum(1 for t in trials if status.get(t.trial_id) == "done")
        if not self.retry_failed:  # failed earlier and not retried: still reported as failed
            self.summary.failed_before["trials"] += sum(1 for t in trials if status.get(t.trial_id) == "failed")
        if not todo:
            return
        mode, bb = self.spec.finetune.mode, self.spec.backbone
        data_ref = self.ex.put(self._trial_data(with_embeddings=mode == "last_layer"))
        self._fresh.clear()
        extra: tuple[Any, ...] = ()
        if mode != "last_layer":  # the workers fine-tune the backbone from the trial checkpoint: ship it once
            extra = (self.ex.put(self._load_checkpoint(self.plan.pretrain[bb.checkpoint_seed].stage_id)),)
        settings = self.spec.finetune.model_dump(exclude={"mode"})
        device = self._device(settings["device"])
        settings["device"] = device
        reg = self.spec.regulariser.model_dump(mode="json") if self.spec.regulariser.applies_to("finetune") else None
        jobs = [self._trial_job(t, k, k_val, settings, reg) for t in todo]
        job_of = {j.trial_id: j for j in jobs}
        batches = [(f"batch {i}", (TrialBatch(chunk, device), data_ref, *extra))
                   for i, chunk in enumerate(self._trial_batches(jobs, mode, device))]
        by_id = {t.trial_id: t for t in todo}
        members = {key: [j.trial_id for j in args[0].jobs] for key, args in batches}
        bar = self._progress("trials", len(jobs))

        def on_done(key: str, res: Any, err: BaseException | None) -> None:
            if err is not None:  # the whole batch was lost (e.g. its worker died past Ray's retries)
                outcomes = [TrialOutcome(tid, None, err) for tid in members[key]]
            else:
                assert isinstance(res, TrialBatchResult)
                outcomes = [TrialOutcome(o.trial_id, o.result if o.result is None else dataclasses.replace(
                    o.result, node_id=res.node_id), o.error) for o in res.outcomes]
            for o in outcomes:
                self._write_trial(by_id[o.trial_id], job_of[o.trial_id], o.result, o.error)
                bar.update()

        flow.add("trials", PRIORITY["trials"], run_trials, batches, on_done,
                 gpus=1 if device.startswith("cuda") else 0, later=True)

    def _trial_batches(self, jobs: list[TrialJob], mode: str, device: str) -> list[list[TrialJob]]:
        """Split the pending trials into the batches workers run: last-layer heads train together (more per batch
        amortises more), but every CPU gets at least two batches so none idles while one straggles, and a batch
        holds at most :data:`MAX_HEADS_PER_BATCH` so an interrupted run loses little and progress moves. A GPU
        takes all heads at once. 'full' / 'lora' trials run one per task."""
        if mode != "last_layer":
            return [[j] for j in jobs]
        if device.startswith("cuda"):
            size = len(jobs)
        else:
            size = max(1, min(MAX_HEADS_PER_BATCH, -(-len(jobs) // (2 * self.ex.slots()))))
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def _check_devices(self) -> None:
        """An explicit device = "cuda" without a GPU stops the run before any work, not after pre-training."""
        for wanted in (self.spec.backbone.pretrain.device, self.spec.finetune.device):
            if wanted == "cuda":
                self._device(wanted)

    def _backbone_settings(self) -> tuple[dict[str, Any], int]:
        """The backbone's settings for pre-training and embedding, ``device`` resolved; GPUs per task (0 or 1)."""
        settings = self.spec.backbone.pretrain.model_dump()
        settings["device"] = self._device(settings["device"])
        return settings, int(settings["device"].startswith("cuda"))

    def _device(self, wanted: str) -> str:
        """The spec's ``device`` resolved for this run: 'auto' = 'cuda' when the executor has a GPU, else 'cpu'."""
        if wanted == "cpu":
            return "cpu"
        gpus = self.ex.gpus()
        if wanted == "cuda" and gpus == 0:
            raise BackendError("device = \"cuda\" but no GPU is available to this run (torch.cuda.is_available() is "
                               "false, or the Ray cluster has no GPU); fix: device = \"auto\" or \"cpu\"")
        return "cuda" if gpus > 0 else "cpu"

    def _trial_job(self, t: Any, k: int, k_val: int, settings: dict[str, Any], reg: dict[str, Any] | None
                   ) -> TrialJob:
        """The worker's job of a planned trial. protocol 'expand': the grown group gets ``t.added`` items and the
        other the resolved base, so the train set's size (budget) and share of group 1 (alpha) follow the counts."""
        counts = None
        if t.grown is not None:
            if self._base is None:
                self._base = resolve_base(self.spec, self.prep)
            counts = expand_counts(self._base, t.added, t.grown)
        alpha, budget = (t.alpha, k) if counts is None else (counts[1] / sum(counts), sum(counts))
        return TrialJob(t.trial_id, t.attribute, alpha, t.seed, budget, k_val, self.spec.allocation.sampler, settings,
                        self.ex.threads_per_task, self.spec.finetune.mode, self.model, reg, counts)

    def _write_trial(self, t: Any, job: TrialJob, res: TrialResult | None, err: BaseException | None) -> None:
        row: dict[str, Any] = {
            "trial_id": t.trial_id, "experiment": self.plan.experiment, "attribute": t.attribute, "alpha": job.alpha,
            "seed": t.seed, "mode": t.mode, "budget": job.budget, "budget_val": job.budget_val,
            "config_json": json.dumps(t.key, sort_keys=True), "finished_at": _now()}
        with self.store.transaction():
            self.store.con.execute("DELETE FROM metrics WHERE trial_id = ?", [t.trial_id])
            self.store.con.execute("DELETE FROM metric_resamples WHERE trial_id = ?", [t.trial_id])
            if err is not None or res is None:
                row.update(status="failed", error=f"{type(err).__name__}: {err}"[:4000])
                self.summary.failed["trials"] += 1
            else:
                self.store.insert_rows("metrics", [{"trial_id": t.trial_id, **m} for m in res.metrics])
                if res.resamples.size:
                    self.store.insert_rows("metric_resamples", self._resample_table(t.trial_id, res.resamples))
                row.update(status="done", duration_s=res.duration_s, n_train_g1=res.n_train_g1,
                           p_y_train=res.p_y_train, epochs=res.epochs, best_val_bal_acc=res.best_val_bal_acc,
                           node_id=res.node_id)
                self.summary.executed["trials"] += 1
            self.store.insert_rows("trials", [row])

    def _resample_table(self, trial_id: str, boot: np.ndarray) -> Any:
        """(cells, metrics, B) -> the long metric_resamples rows of one trial, as one Arrow table."""
        import pyarrow as pa

        cells = group_cells(self.prep.splits["test"].groups)
        n_cells, n_metrics, b = boot.shape
        if n_cells != len(cells) or n_metrics != len(METRICS):
            raise BackendError(f"trial {trial_id}: resampled metrics of shape {boot.shape}; expected "
                               f"({len(cells)}, {len(METRICS)}, B)")
        per_cell = n_metrics * b
        return pa.table({
            "trial_id": pa.array([trial_id] * boot.size, pa.string()),
            "attribute": pa.array(np.repeat(np.array([c[0] for c in cells], dtype=object), per_cell)),
            "grp": pa.array(np.repeat(np.array([c[1] for c in cells], dtype=np.int32), per_cell)),
            "metric": pa.array(np.tile(np.repeat(np.array(METRICS, dtype=object), b), n_cells)),
            "b": pa.array(np.tile(np.arange(b, dtype=np.int32), n_cells * n_metrics)),
            "value": pa.array(boot.reshape(-1).astype(np.float64)),
        })

    def _stage_analysis(self, force: bool) -> None:
        from engine.results import write_analysis

        st = self.plan.analysis
        status = self._done([st])
        if status.get(st.stage_id) == "done" and not force:
            self.summary.skipped["analysis"] += 1
            return
        t0 = time.perf_counter()
        with self.store.transaction():
            write_analysis(self.store, self.plan.experiment)
            self._write_stage(st, duration_s=time.perf_counter() - t0)

    def outstanding(self) -> dict[str, Any]:
        """How much of the plan the store has: {'stages' | 'trials': (done, failed, total)}."""
        out: dict[str, Any] = {}
        for kind, ids in (("stages", [s.stage_id for s in self.plan.stages()]),
                          ("trials", [t.trial_id for t in self.plan.trials])):
            key = "stage_id" if kind == "stages" else "trial_id"
            status = self.store.status_of(kind, key, ids)
            done = sum(1 for v in status.values() if v == "done")
            failed = sum(1 for v in status.values() if v == "failed")
            out[kind] = (done, failed, len(ids))
        return out

    # ---- entry point ---------------------------------------------------------------------------------------
    def screen(self) -> list[dict[str, Any]]:
        """Only dataset -> pretrain -> embed (test set) -> separation; returns the ranked separations."""
        from engine.results import write_screen

        k, k_val = check_against_data(self.spec, self.prep, self.spec_path)
        self._check_devices()
        self._decode_images()
        self._register_experiment()
        self._link()
        self._stage_dataset()
        self._run_flow(self._flow(k, k_val, trials=False))
        self._stage_transfer(k, k_val)
        with self.store.transaction():
            return write_screen(self.store, self.plan.experiment)

    def _flow(self, k: int, k_val: int, *, trials: bool) -> Flow:
        """Every pending task from pre-training to separation (and the trials if ``trials``) as one :class:`Flow`:
        a seed's checkpoint queues its embeddings, the trial checkpoint's embeddings queue the trials (the
        checkpoint itself, for 'full' / 'lora' fine-tuning), and each seed's test embeddings its separation jobs.
        Without the trials (``alloclab screen``) a seed only needs its test embeddings, and the trial checkpoint's
        pools too when the transfer distance will read them."""
        flow = Flow(self.ex)
        cs = self.spec.backbone.checkpoint_seed
        last_layer = self.spec.finetune.mode == "last_layer"
        separations: dict[int, list[PlannedStage]] = {}
        for st in self.plan.separation.values():
            separations.setdefault(st.params["seed"], []).append(st)
        pools = trials or bool(self.plan.transfer)

        def seed_ready(seed: int) -> None:
            if trials and seed == cs and not last_layer:
                self._add_trials(flow, k, k_val)
            stages = [st for (s, split), st in self.plan.embed.items()
                      if s == seed and (split == "test" or (seed == cs and pools))]

            def embedded() -> None:
                if trials and seed == cs and last_layer:
                    self._add_trials(flow, k, k_val)
                self._add_separation(flow, separations.get(seed, []))

            self._add_embed(flow, stages, PRIORITY["embed_trial_seed" if seed == cs else "embed"], embedded)

        self._add_pretrain(flow, seed_ready)
        return flow

    def run(self) -> RunSummary:
        """Run what the store lacks: the dataset, then pre-training, embeddings, separation and trials as one
        :class:`~engine.flow.Flow` (stages overlap: ``summary.seconds`` gives each kind's span), then the transfer
        distance and the analysis."""
        t_all = time.perf_counter()
        k, k_val = check_against_data(self.spec, self.prep, self.spec_path)
        self._check_devices()
        self._decode_images()
        self._register_experiment()
        self._link()
        t0 = time.perf_counter()
        self._stage_dataset()
        self.summary.seconds["dataset"] = time.perf_counter() - t0
        flow = self._flow(k, k_val, trials=True)
        self._run_flow(flow)
        for kind in ("pretrain", "embed", "separation", "trials"):
            self.summary.seconds[kind] = flow.seconds(kind)
        t0 = time.perf_counter()
        self._stage_transfer(k, k_val)
        self.summary.seconds["transfer"] = time.perf_counter() - t0
        changed = sum(self.summary.executed.values()) + (self.summary.failed["trials"] if self.retry_failed else 0) > 0
        t0 = time.perf_counter()
        self._stage_analysis(force=changed)
        self.summary.seconds["analysis"] = time.perf_counter() - t0
        self.summary.seconds["total"] = time.perf_counter() - t_all
        return self.summary

