"""Batched last-layer heads (backends.head.train_heads) against heads trained one at a time (train_head).

Tolerance: the two differ only in the order floating-point sums are taken (the compiled kernel and torch's batched
products sum a mini-batch's gradient in another order than nn.Linear's matrix product), so after up to 40 epochs of
Adam the weights agree to 1e-5 (measured: about 5e-8 at d = 64), every head stops at the same epoch and keeps the
same one, and the test-set probabilities agree to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from backends import head as head_mod
from backends.errors import BackendError
from backends.head import HeadTask, head_proba, heads_proba, train_head, train_heads
from engine.trial import TrialBatch, TrialData, TrialJob, run_trial, run_trials

ATOL = 1e-5


def embeddings(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ReLU-like features (many exact zeros) whose label depends on a direction plus noise, so heads stop early at
    different epochs."""
    rng = np.random.default_rng(seed)
    z = np.maximum(rng.standard_normal((n, d), dtype=np.float32) + 0.3, 0)
    direction = np.random.default_rng(99).standard_normal(d).astype(np.float32)
    score = (z - z.mean(0)) @ direction / np.sqrt(d)
    y = (score + 0.8 * rng.standard_normal(n) > 0).astype(np.int64)
    return z, y


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    z, y = embeddings(2400, 48, 0)
    vz, vy = embeddings(800, 48, 1)
    tz, _ = embeddings(500, 48, 2)
    return {"z": z, "y": y, "vz": vz, "vy": vy, "tz": tz}


def tasks_for(data: dict[str, np.ndarray], sizes: list[tuple[int, int]], seeds: list[int]) -> list[HeadTask]:
    rng = np.random.default_rng(7)
    return [HeadTask(rng.choice(len(data["y"]), n, replace=False), rng.choice(len(data["vy"]), m, replace=False), s)
            for (n, m), s in zip(sizes, seeds)]


SETTINGS = {"max_epochs": 40, "patience": 4, "lr_patience": 2, "batch_size": 64, "lr": 3e-3, "device": "cpu"}
GPU = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")


def alone(data: dict[str, np.ndarray], task: HeadTask):
    return train_head(data["z"][task.train_rows], data["y"][task.train_rows], data["vz"][task.val_rows],
                      data["vy"][task.val_rows], settings=SETTINGS, seed=task.seed)


def assert_same(batched, single, tz: np.ndarray) -> None:
    assert (batched.epochs, batched.best_epoch) == (single.epochs, single.best_epoch)
    assert batched.best_val_bal_acc == pytest.approx(single.best_val_bal_acc, abs=1e-12)
    np.testing.assert_allclose(batched.weight, single.weight, atol=ATOL, rtol=0)
    np.testing.assert_allclose(batched.bias, single.bias, atol=ATOL, rtol=0)
    np.testing.assert_allclose(heads_proba([batched], tz)[0], head_proba(single, tz), atol=ATOL, rtol=0)


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_batched_equals_independent(data: dict[str, np.ndarray], path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five heads: two stacks (two train/val sizes), seeds shared and not, early stops at different epochs and
    learning-rate drops; the compiled CPU kernel and torch's batched products (two heads per stack) both match."""
    if path == "torch":
        monkeypatch.setattr(head_mod, "_cpu_kernel", lambda: None)
    tasks = tasks_for(data, [(700, 300), (700, 300), (700, 300), (400, 200), (400, 200)], [0, 1, 1, 2, 3])
    batched = train_heads(data["z"], data["y"], data["vz"], data["vy"], tasks, settings=SETTINGS,
                          max_heads=2 if path == "torch" else None)
    singles = [alone(data, t) for t in tasks]
    for b, s in zip(batched, singles):
        assert_same(b, s, data["tz"])
    assert len({s.epochs for s in singles}) > 1, "the heads should stop at different epochs (compaction exercised)"
    assert any(s.epochs < SETTINGS["max_epochs"] for s in singles)


def test_bad_task_fails_alone(data: dict[str, np.ndarray]) -> None:
    good = tasks_for(data, [(500, 200), (500, 200)], [4, 5])
    bad = HeadTask(np.array([0, 1, len(data["y"]) + 3]), good[0].val_rows, 6)
    out = train_heads(data["z"], data["y"], data["vz"], data["vy"], [good[0], bad, good[1]], settings=SETTINGS)
    assert isinstance(out[1], BackendError) and "out of range" in str(out[1])
    assert_same(out[0], alone(data, good[0]), data["tz"])
    assert_same(out[2], alone(data, good[1]), data["tz"])


def test_trial_batch_isolates_failures(data: dict[str, np.ndarray]) -> None:
    """run_trials: an infeasible allocation fails its own trial; the others equal run_trial (one at a time)."""
    rng = np.random.default_rng(3)
    groups = {split: {"a": (rng.random(n) < 0.3).astype(np.int64)}
              for split, n in (("pool_train", 2400), ("pool_val", 800), ("test", 500))}
    trial_data = TrialData(z={"pool_train": data["z"], "pool_val": data["vz"], "test": data["tz"]},
                           y={"pool_train": data["y"], "pool_val": data["vy"],
                              "test": (data["tz"].sum(1) > np.median(data["tz"].sum(1))).astype(np.int64)},
                           groups=groups)
    settings = {**SETTINGS, "device": "cpu", "amp": "none"}
    jobs = [TrialJob(f"t{i}", "a", alpha, seed, 800, 200, "natural", settings)
            for i, (alpha, seed) in enumerate([(0.0, 1), (0.5, 2), (1.0, 3), (0.2, 1)])]
    out = run_trials(TrialBatch(jobs), trial_data)
    assert [o.trial_id for o in out.outcomes] == ["t0", "t1", "t2", "t3"]
    failed = out.outcomes[2]  # α = 1 asks for 800 items of group 1, which has about 720
    assert failed.result is None and isinstance(failed.error, ValueError) and "requested" in str(failed.error)
    for o, job in zip(out.outcomes, jobs):
        if o is failed:
            continue
        single = run_trial(job, trial_data)
        assert o.error is None and o.result is not None
        assert (o.result.epochs, o.result.n_train_g1) == (single.epochs, single.n_train_g1)
        for m_b, m_s in zip(o.result.metrics, single.metrics):
            assert (m_b["attribute"], m_b["grp"], m_b["metric"]) == (m_s["attribute"], m_s["grp"], m_s["metric"])
            assert m_b["value"] == pytest.approx(m_s["value"], abs=1e-9, nan_ok=True)
    assert sum(o.result.duration_s for o in out.outcomes if o.result) <= out.duration_s + 1e-6


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_a_head_does_not_depend_on_its_stack(data: dict[str, np.ndarray], device: str) -> None:
    """The same head trained alone, with two others, or with three more: on the CPU bit-identical, so results do not
    depend on how the engine batches trials (local vs cluster, a resumed run). On a GPU cuBLAS picks its batched
    product's kernel by the stack's size, so the weights agree to float32 rounding only (measured on an H200: 1 ulp,
    about 1e-8), while the epochs, the kept epoch and its val score (float64 val logits) stay exactly equal."""
    tasks = tasks_for(data, [(600, 250)] * 4, [0, 1, 2, 3])
    args = (data["z"], data["y"], data["vz"], data["vy"])
    alone_ = train_heads(*args, [tasks[0]], settings=SETTINGS, device=device)[0]
    trio = train_heads(*args, tasks[:3], settings=SETTINGS, device=device)[0]
    four = train_heads(*args, [tasks[3], tasks[2], tasks[1], tasks[0]], settings=SETTINGS, device=device)[3]
    for other in (trio, four):
        assert (other.epochs, other.best_epoch, other.best_val_bal_acc) == (alone_.epochs, alone_.best_epoch,
                                                                            alone_.best_val_bal_acc)
        if device == "cpu":
            assert np.array_equal(other.weight, alone_.weight) and np.array_equal(other.bias, alone_.bias)
        else:
            assert_same(other, alone_, data["tz"])


def test_device_resolution() -> None:
    """'auto' is the CPU where torch sees no GPU; asking for 'cuda' there is a clear error, not a crash."""
    import torch

    from backends.head import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(BackendError, match="torch sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(BackendError, match="unknown device"):
        resolve_device("tpu")


@GPU
def test_gpu_heads_equal_cpu_heads(data: dict[str, np.ndarray]) -> None:
    """Batched heads on the GPU equal the CPU's, and heads trained one at a time on the GPU (train_head), to ATOL;
    training twice on the GPU gives the same bits (deterministic for fixed shapes)."""
    tasks = tasks_for(data, [(700, 300)] * 3, [0, 1, 2])
    cpu = train_heads(data["z"], data["y"], data["vz"], data["vy"], tasks, settings=SETTINGS, device="cpu")
    gpu = train_heads(data["z"], data["y"], data["vz"], data["vy"], tasks, settings=SETTINGS, device="cuda")
    again = train_heads(data["z"], data["y"], data["vz"], data["vy"], tasks, settings=SETTINGS, device="cuda")
    for g, c, a, t in zip(gpu, cpu, again, tasks):
        assert_same(g, c, data["tz"])
        single = train_head(data["z"][t.train_rows], data["y"][t.train_rows], data["vz"][t.val_rows],
                            data["vy"][t.val_rows], settings={**SETTINGS, "device": "cuda"}, seed=t.seed)
        assert_same(g, single, data["tz"])
        assert np.array_equal(g.weight, a.weight) and np.array_equal(g.bias, a.bias)
