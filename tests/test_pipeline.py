"""The driver on real (small) MNIST with the in-process executor: failures are data, retries, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import pipeline as pipeline_mod
from engine import trial as trial_mod
from engine.executor import SerialExecutor
from engine.pipeline import Pipeline
from engine.spec import Spec, load_spec
from engine.store import open_store
from tests.conftest import TINY_SPEC


def small_spec(pretrain_seeds: tuple[int, ...] = (0,)) -> Spec:
    doc = load_spec(TINY_SPEC)[0].model_dump(mode="json")
    doc["experiment"]["name"] = "small"
    doc["backbone"]["pretrain_seeds"] = list(pretrain_seeds)
    doc["backbone"]["pretrain"]["max_epochs"] = 1
    doc["allocation"]["alpha"] = [0.0, 0.5, 1.0]
    doc["allocation"]["seeds"] = [1]
    doc["finetune"]["max_epochs"] = 3
    doc["dataset"]["null_partitions"] = 1  # one null partition keeps these runs small (see test_null_partitions_*)
    return Spec.model_validate(doc)


def run(spec: Spec, db: Path, **kw) -> pipeline_mod.RunSummary:
    with open_store(db) as store:
        return Pipeline(spec, TINY_SPEC, store, SerialExecutor(), progress=False, **kw).run()


def test_failed_trials_are_stored_and_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "r.duckdb"
    real = trial_mod._allocate

    def flaky(job, data):  # one trial of a batch fails; the heads trained with it in one stack are unaffected
        if job.attribute == "colour" and job.alpha == 0.5:
            raise FloatingPointError("simulated divergence")
        return real(job, data)

    monkeypatch.setattr(trial_mod, "_allocate", flaky)
    s1 = run(small_spec(), db)
    assert s1.executed["trials"] == 8 and s1.failed["trials"] == 1
    with open_store(db, read_only=True) as store:
        (row,) = store.query("SELECT status, error FROM trials WHERE status = 'failed'")
        assert row["error"] == "FloatingPointError: simulated divergence"
        # the analysis ran on what finished; the failed trial left no metrics behind
        assert store.query("SELECT count(*) AS n FROM slopes WHERE experiment = 'small'")[0]["n"] > 0

    s2 = run(small_spec(), db)  # without --retry-failed: nothing runs, the failure is still reported
    assert s2.executed["trials"] == 0 and s2.failed["trials"] == 0 and s2.skipped["trials"] == 8
    assert s2.failed_before["trials"] == 1 and "1 failed earlier (not retried" in s2.line()

    monkeypatch.setattr(trial_mod, "_allocate", real)
    s3 = run(small_spec(), db, retry_failed=True)
    assert s3.executed["trials"] == 1 and s3.failed["trials"] == 0
    with open_store(db, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM trials WHERE status = 'failed'")[0]["n"] == 0
        n_metrics = store.query("SELECT count(*) AS n FROM metrics")[0]["n"]
        # 9 trials x (overall + 3 attributes x 2 groups) x 4 metrics
        assert n_metrics == 9 * 7 * 4


def test_every_attribute_is_evaluated_in_every_trial(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    run(small_spec(), db)
    with open_store(db, read_only=True) as store:
        rows = store.query("SELECT t.attribute AS alloc, m.attribute, count(DISTINCT m.grp) AS g "
                           "FROM trials t JOIN metrics m USING (trial_id) GROUP BY 1, 2")
        assert {(r["alloc"], r["attribute"]) for r in rows} == {
            (a, b) for a in ("digit_group", "colour", "random") for b in ("digit_group", "colour", "random", "overall")}
        # the allocation itself: round(alpha*K) items of group 1
        for r in store.query("SELECT alpha, budget, n_train_g1 FROM trials"):
            assert r["n_train_g1"] == int(r["alpha"] * r["budget"] + 0.5)
        # embeddings for the three splits of the checkpoint seed, with the SimpleCNN's 1568 dimensions
        dims = store.query("SELECT split, count(*) AS n, min(len(vec)) AS d FROM embeddings GROUP BY split")
        assert {r["split"] for r in dims} == {"pool_train", "pool_val", "test"} and {r["d"] for r in dims} == {1568}
        # the checkpoint is an artifact beside the database, referenced from it, loadable with weights_only
        (art,) = store.query("SELECT artifact FROM stages WHERE kind = 'pretrain'")
        import torch

        state = torch.load(db.parent / art["artifact"], weights_only=True)
        assert any(k.endswith("weight") for k in state)


def test_full_finetuning_trials_start_from_the_checkpoint(tmp_path: Path) -> None:
    doc = small_spec().model_dump(mode="json")
    doc["finetune"].update(mode="full", max_epochs=1)
    doc["allocation"]["alpha"] = [0.0, 1.0]
    spec = Spec.model_validate(doc)
    db = tmp_path / "r.duckdb"
    summary = run(spec, db)
    assert summary.executed["trials"] == 6 and summary.failed["trials"] == 0
    assert summary.executed["embed"] == 1  # only the test set: full fine-tuning does not use cached pool embeddings
    with open_store(db, read_only=True) as store:
        rows = store.query("SELECT mode, epochs, config_json FROM trials")
        assert {r["mode"] for r in rows} == {"full"} and all(r["epochs"] == 1 for r in rows)
        assert all('"pretrain_id"' in r["config_json"] for r in rows)
        assert store.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 6 * 7 * 4


def test_a_mode_the_backbone_lacks_is_a_spec_error(tmp_path: Path) -> None:
    from engine.data import check_against_data, prepare
    from engine.errors import SpecError

    doc = small_spec().model_dump(mode="json")
    doc["finetune"]["mode"] = "lora"
    spec = Spec.model_validate(doc)
    with pytest.raises(SpecError, match="finetune.mode: 'lora' is not supported by backbone 'simple_cnn'"):
        check_against_data(spec, prepare(spec))


def test_null_partitions_join_a_finished_run_and_every_trial_stores_its_resamples(tmp_path: Path) -> None:
    db = tmp_path / "r.duckdb"
    run(small_spec(), db)
    doc = small_spec().model_dump(mode="json")
    doc["dataset"]["null_partitions"] = 2
    more = run(Spec.model_validate(doc), db)
    # the dataset, checkpoint and embeddings are re-used; only random_2's separation and trials run
    assert more.executed["trials"] == 3 and more.executed["pretrain"] == 0 and more.skipped["dataset"] == 1
    assert more.executed["separation"] == 1
    with open_store(db, read_only=True) as store:
        attrs = {r["attribute"] for r in store.query("SELECT DISTINCT attribute FROM item_groups")}
        assert attrs == {"digit_group", "colour", "random", "random_2"}
        per_trial = store.query("SELECT t.attribute, count(*) AS n, count(DISTINCT b) AS b FROM metric_resamples r "
                                "JOIN trials t USING (trial_id) GROUP BY t.trial_id, t.attribute")
        assert {r["b"] for r in per_trial} == {200}  # analysis.test_resamples' default
        new = [r["n"] for r in per_trial if r["attribute"] == "random_2"]
        assert new == [(1 + 4 * 2) * 4 * 200] * 3  # (overall + 4 attributes x 2 groups) x 4 metrics x B
        # each (trial, group, metric, resample) is stored exactly once
        dup = store.query("SELECT count(*) AS n FROM (SELECT trial_id, attribute, grp, metric, b, count(*) AS c "
                          "FROM metric_resamples GROUP BY ALL HAVING c > 1)")
        assert dup[0]["n"] == 0
        rows = store.query("SELECT attribute, null_partition, n_resamples FROM attribute_slopes WHERE metric = 'loss'")
        assert {r["attribute"]: r["null_partition"] for r in rows} == {"digit_group": False, "colour": False,
                                                                      "random": True, "random_2": True}
        assert all(r["n_resamples"] == 200 for r in rows)


def test_run_exit_code_and_plan_tell_the_truth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Every trial fails: `run` exits 1 with what is not done; `plan` shows the first error lines; a retry that
    fails again says how many it ran and how many failed."""
    from engine import cli

    def broken(job, data):
        raise FloatingPointError(f"simulated divergence in {job.attribute}")

    monkeypatch.setattr(trial_mod, "_allocate", broken)
    spec = tmp_path / "s.toml"
    spec.write_text(TINY_SPEC.read_text().replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
                    .replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]").replace("seeds = [1, 2]", "seeds = [1]")
                    .replace("max_epochs = 3, patience = 2", "max_epochs = 1, patience = 1"))
    db = str(tmp_path / "r.duckdb")
    assert cli.main(["run", str(spec), "--serial", "--quiet", "--db", db]) == 1
    err = capsys.readouterr().err
    assert "0 of 9 trials done, 9 failed" in err and "alloclab plan" in err
    assert cli.main(["run", str(spec), "--serial", "--quiet", "--db", db, "--retry-failed"]) == 1
    out = capsys.readouterr().out
    assert "trials: 9 run, 0 done before, 9 FAILED" in out
    assert cli.main(["plan", str(spec), "--db", db]) == 0
    plan = capsys.readouterr().out
    assert "failed: trial digit_group α=0 seed=1: FloatingPointError: simulated divergence in digit_group" in plan
    assert "and 4 more" in plan


def test_a_damaged_checkpoint_is_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    db = tmp_path / "r.duckdb"
    run(small_spec(), db)
    with open_store(db, read_only=True) as store:
        (row,) = store.query("SELECT artifact, artifact_sha256 FROM stages WHERE kind = 'pretrain'")
    ckpt = db.parent / row["artifact"]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == row["artifact_sha256"]
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated, as a full disk or a killed copy leaves it
    again = run(small_spec(), db)
    assert again.executed["pretrain"] == 1 and again.executed["trials"] == 0
    err = capsys.readouterr().err
    assert "pretrain seed=0: checkpoint" in err and "is not the file recorded" in err and "pre-training it again" in err
    with open_store(db, read_only=True) as store:
        (row2,) = store.query("SELECT artifact_sha256 FROM stages WHERE kind = 'pretrain'")
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == row2["artifact_sha256"]
    assert run(small_spec(), db).executed["pretrain"] == 0  # verified and trusted now


def test_one_flow_pretrains_first_then_embeds_then_trials_then_separation(tmp_path: Path) -> None:
    """With two pre-training seeds the run is one flow (engine.flow): both seeds' pre-training first (the trial
    checkpoint's seed 0 first), then seed 0's embeddings (the trials' inputs), seed 1's, the trials, and the
    separation jobs last. In-process tasks run one at a time, so the finishing times show the priorities. Every
    stage still runs once and the summary counts each once."""
    db = tmp_path / "r.duckdb"
    spec = small_spec((0, 1))
    assert spec.backbone.checkpoint_seed == 0
    s = run(spec, db)
    assert (s.executed["pretrain"], s.skipped["pretrain"]) == (2, 0)
    assert (s.executed["embed"], s.skipped["embed"]) == (4, 0)
    assert (s.executed["trials"], s.skipped["trials"]) == (9, 0) and "trials: 9 run, 0 done before" in s.line()
    with open_store(db, read_only=True) as store:
        def times(kind: str, seed: int | None = None) -> list:
            rows = store.query("SELECT s.finished_at AS t, s.key_json FROM stages s JOIN experiment_stages e "
                               "USING (stage_id) WHERE s.kind = ?", [kind])
            if seed is not None and kind == "pretrain":
                rows = [r for r in rows if f'"seed": {seed},' in r["key_json"]]
            elif seed is not None:  # an embedding's key names its checkpoint: the seed's pretrain id
                (pid,) = [r["stage_id"] for r in store.query("SELECT stage_id, key_json FROM stages WHERE kind = "
                          "'pretrain'") if f'"seed": {seed},' in r["key_json"]]
                rows = [r for r in rows if pid in r["key_json"]]
            return sorted(r["t"] for r in rows)

        trials = [r["finished_at"] for r in store.query("SELECT finished_at FROM trials")]
        pre0, pre1, emb0, emb1 = times("pretrain", 0), times("pretrain", 1), times("embed", 0), times("embed", 1)
        assert len(pre0) == len(pre1) == 1 and len(emb0) == 3 and len(emb1) == 1
        assert pre0[0] < pre1[0] < emb0[0] and emb0[-1] < emb1[0] < min(trials)
        assert max(trials) < min(times("separation"))
    again = run(spec, db)
    assert sum(again.executed.values()) == 0 and again.skipped["trials"] == 9 and again.skipped["embed"] == 4


def test_a_run_with_nothing_to_do_never_starts_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished spec re-run with the Ray executor is a no-op that does not start (or join) Ray: the flow asks
    the executor for its CPUs only once a task is queued."""
    from engine.executor import RayExecutor

    db = tmp_path / "r.duckdb"
    spec = small_spec()
    run(spec, db)
    starts: list[int] = []
    real = RayExecutor._ensure_started
    monkeypatch.setattr(RayExecutor, "_ensure_started", lambda self: (starts.append(1), real(self))[1])
    ex = RayExecutor(num_cpus=1)
    try:
        with open_store(db) as store:
            again = Pipeline(spec, TINY_SPEC, store, ex, progress=False).run()
    finally:
        ex.shutdown() if starts else None
    assert sum(again.executed.values()) == 0 and again.skipped["trials"] == 9
    assert starts == []


def test_a_failed_seed_stops_only_what_needs_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed 1's pre-training fails: the run still stores everything that does not need it (seed 0's checkpoint,
    embeddings, separation and every trial), then stops with one error naming the seed; the next run pre-trains only
    seed 1 and does the rest of its work."""
    from engine.errors import BackendError

    real = pipeline_mod.run_pretrain

    def flaky(job):  # noqa: ANN001, ANN202 - the worker function, failing for one seed
        if job.seed == 1:
            raise RuntimeError("out of memory on seed 1")
        return real(job)

    db = tmp_path / "r.duckdb"
    spec = small_spec((0, 1))
    monkeypatch.setattr(pipeline_mod, "run_pretrain", flaky)
    with pytest.raises(BackendError, match=r"pre-training failed.*seed=1.*out of memory") as err:
        run(spec, db)
    assert "the rest is stored" in str(err.value)
    with open_store(db, read_only=True) as store:
        kinds = {r["kind"]: r["n"] for r in store.query(
            "SELECT kind, count(*) AS n FROM stages WHERE status = 'done' GROUP BY kind")}
        per_seed = len(spec.attribute_names)  # one separation stage per attribute and seed
        assert kinds["pretrain"] == 1 and kinds["embed"] == 3 and kinds["separation"] == per_seed  # seed 0's
        assert store.query("SELECT count(*) AS n FROM trials WHERE status = 'done'")[0]["n"] == 9
    monkeypatch.setattr(pipeline_mod, "run_pretrain", real)
    again = run(spec, db)
    assert (again.executed["pretrain"], again.skipped["pretrain"]) == (1, 1)
    assert (again.executed["trials"], again.skipped["trials"]) == (0, 9)
    assert (again.executed["separation"], again.skipped["separation"]) == (per_seed, per_seed)
    assert (again.executed["embed"], again.skipped["embed"]) == (1, 3)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_without_a_gpu_stops_before_any_work(tmp_path: Path) -> None:
    from engine.errors import BackendError

    doc = small_spec().model_dump(mode="json")
    doc["finetune"]["device"] = "cuda"
    db = tmp_path / "r.duckdb"
    with pytest.raises(BackendError, match='device = "cuda" but no GPU'):
        run(Spec.model_validate(doc), db)
    with open_store(db, read_only=True) as store:
        assert store.query("SELECT count(*) AS n FROM stages")[0]["n"] == 0
