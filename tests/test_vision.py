"""Backend contract over every vision backbone in ``backends.REGISTRY``; last-layer retraining on coloured MNIST."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

import backends
from backends.base import Checkpoint, DatasetBundle
from backends.datasets import colored_mnist as cm
from backends.errors import BackendError
from backends.head import HeadResult, balanced_accuracy, head_proba, train_head

QUICK = {"max_epochs": 2}  # pre-training settings for the contract: two epochs on a few hundred digits


@pytest.fixture(scope="module")
def data() -> DatasetBundle:
    return cm.load(cm.Options(limit_test=800, limit_train=1000))


def _labels(bundle: DatasetBundle, split: str) -> np.ndarray:
    return bundle.splits[split].columns["parity"]


def _pretrain(kind: str, bundle: DatasetBundle, seed: int) -> Checkpoint:
    backend = backends.create(kind, QUICK)
    return backend.pretrain(
        bundle.inputs("pretrain_train"), _labels(bundle, "pretrain_train"),
        bundle.inputs("pretrain_val"), _labels(bundle, "pretrain_val"), seed=seed,
    )


# The image backbones; the text backend's contract is in test_text.py (its inputs are strings, not images).
VISION = sorted(kind for kind, entry in backends.REGISTRY.items() if entry.startswith("backends.vision:"))


@pytest.fixture(scope="module", params=VISION)
def trained(request: pytest.FixtureRequest, data: DatasetBundle) -> tuple[str, Checkpoint]:
    return request.param, _pretrain(request.param, data, seed=0)


def test_pretrain_returns_loadable_checkpoint(trained: tuple[str, Checkpoint]) -> None:
    kind, ckpt = trained
    assert ckpt.backbone == kind
    state = torch.load(io.BytesIO(ckpt.state), weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    log = ckpt.log
    assert log["epochs"] == 2 == len(log["history"]) and 1 <= log["best_epoch"] <= 2
    assert set(log["history"][0]) == {"epoch", "train_loss", "val_bal_acc"}
    assert log["best_val_bal_acc"] == max(h["val_bal_acc"] for h in log["history"])


def test_embed_and_predict_proba(trained: tuple[str, Checkpoint], data: DatasetBundle) -> None:
    kind, ckpt = trained
    backend = backends.create(kind, QUICK)
    images = data.inputs("test")
    z = backend.embed(ckpt, images)
    assert z.dtype == np.float32 and z.shape == (len(images), 1568) and np.isfinite(z).all()
    assert np.array_equal(z, backend.embed(ckpt, images))
    p = backend.predict_proba(ckpt, images)
    assert p.dtype == np.float64 and p.shape == (len(images),)
    assert ((p >= 0) & (p <= 1)).all()


def test_same_seed_same_embeddings(trained: tuple[str, Checkpoint], data: DatasetBundle) -> None:
    kind, ckpt = trained
    again = _pretrain(kind, data, seed=0)
    backend = backends.create(kind, QUICK)
    images = data.inputs("pretrain_val")
    assert again.log == ckpt.log
    assert np.array_equal(backend.embed(again, images), backend.embed(ckpt, images))


def test_outputs_do_not_depend_on_the_feature_batch(trained: tuple[str, Checkpoint], data: DatasetBundle,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU runs the convolutions 128 images at a time (faster than 1024, see vision.FEATURE_BATCH): embeddings
    and predictions are bit-identical to one pass of 1024 (the old path), so the pass size changes no result."""
    import backends.vision as vision

    kind, ckpt = trained
    if kind != "simple_cnn":
        pytest.skip("FEATURE_BATCH is SimpleCNN's")
    backend = backends.create(kind, {**QUICK, "device": "cpu"})
    images = np.concatenate([data.inputs(split) for split in data.splits])
    assert len(images) > 1500
    ref = backend.embed(ckpt, images), backend.predict_proba(ckpt, images)
    for size in (1024, 100, 37):
        monkeypatch.setitem(vision.FEATURE_BATCH, "cpu", size)
        out = backend.embed(ckpt, images), backend.predict_proba(ckpt, images)
        assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])


def test_read_only_inputs_accepted(trained: tuple[str, Checkpoint], data: DatasetBundle) -> None:
    kind, ckpt = trained
    images = data.inputs("pretrain_val")
    frozen = images.copy()
    frozen.setflags(write=False)  # as arrays from Ray's object store are
    backend = backends.create(kind, QUICK)
    assert np.array_equal(backend.embed(ckpt, frozen), backend.embed(ckpt, images))


@pytest.mark.parametrize("state", [b"not a checkpoint", b""])
def test_corrupt_checkpoint_raises(trained: tuple[str, Checkpoint], data: DatasetBundle, state: bytes) -> None:
    kind, ckpt = trained
    backend = backends.create(kind, QUICK)
    for bad in (dataclasses.replace(ckpt, state=state), dataclasses.replace(ckpt, state=ckpt.state[:200])):
        with pytest.raises(BackendError, match=kind):
            backend.embed(bad, data.inputs("pretrain_val"))


def test_wrong_inputs_raise(trained: tuple[str, Checkpoint]) -> None:
    kind, ckpt = trained
    with pytest.raises(BackendError, match="uint8"):
        backends.create(kind, QUICK).embed(ckpt, np.zeros((2, 3, 28, 28), dtype=np.float32))


def test_unknown_backbone_and_setting() -> None:
    with pytest.raises(BackendError, match="simple_cnn"):
        backends.create("simple_cn", {})
    assert backends.known_backbones() == sorted(backends.REGISTRY)
    backend = backends.create("simple_cnn", {"learning_rate": 0.1})  # stored, validated on use
    images = np.zeros((4, 3, 28, 28), dtype=np.uint8)
    with pytest.raises(BackendError, match="learning_rate"):
        backend.pretrain(images, np.array([0, 1, 0, 1]), images, np.array([0, 1, 0, 1]), seed=0)


def test_import_is_light() -> None:
    code = "import sys, backends, backends.datasets; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- last-layer retraining -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embeddings(data: DatasetBundle) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real SimpleCNN embeddings (pre-trained 2 epochs on parity) of the pool and test splits, with parity labels."""
    ckpt = _pretrain("simple_cnn", data, seed=0)
    backend = backends.create("simple_cnn", QUICK)
    return {s: (backend.embed(ckpt, data.inputs(s)), _labels(data, s)) for s in ("pool_train", "pool_val", "test")}


def _head(embeddings: dict[str, tuple[np.ndarray, np.ndarray]], seed: int, **settings: int) -> HeadResult:
    (z, y), (vz, vy) = embeddings["pool_train"], embeddings["pool_val"]
    return train_head(z, y, vz, vy, settings={"max_epochs": 15, **settings}, seed=seed)


def test_head_learns_parity(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    result = _head(embeddings, seed=1)
    assert result.weight.shape == (2, 1568) and result.weight.dtype == np.float32
    assert result.bias.shape == (2,) and result.bias.dtype == np.float32
    assert 1 <= result.best_epoch <= result.epochs <= 15
    z, y = embeddings["test"]
    p = head_proba(result, z)
    assert p.dtype == np.float64 and ((p >= 0) & (p <= 1)).all()
    assert balanced_accuracy_score(y, p > 0.5) > 0.65 and result.best_val_bal_acc > 0.65


def test_head_same_seed_same_weights(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    a, b = _head(embeddings, seed=3, max_epochs=3), _head(embeddings, seed=3, max_epochs=3)
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)
    c = _head(embeddings, seed=4, max_epochs=3)
    assert not np.array_equal(a.weight, c.weight)


def test_head_single_class_train_set(embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    (z, y), (vz, vy) = embeddings["pool_train"], embeddings["pool_val"]
    result = train_head(z[y == 1], y[y == 1], vz, vy, settings={"max_epochs": 3}, seed=0)
    assert result.best_val_bal_acc == pytest.approx(0.5)  # predicts the one class it saw: recall 1 and 0
    assert np.isfinite(result.weight).all()


def test_head_proba_is_softmax() -> None:
    rng = np.random.default_rng(0)
    result = HeadResult(rng.standard_normal((2, 5)).astype(np.float32), np.float32([0.3, -0.2]), 1, 1, 0.5)
    z = rng.standard_normal((7, 5)).astype(np.float32) * 100
    logits = torch.from_numpy(z).double() @ torch.from_numpy(result.weight).double().T + torch.from_numpy(result.bias)
    assert np.allclose(head_proba(result, z), torch.softmax(logits, dim=1)[:, 1].numpy())


@pytest.mark.parametrize("seed", range(5))
def test_balanced_accuracy_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 50) if seed else np.ones(50, dtype=np.int64)  # seed 0: one class present
    y_pred = rng.integers(0, 2, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when y_pred has a class y_true lacks
        expected = balanced_accuracy_score(y_true, y_pred)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(expected)


def test_pool_then_relu_is_the_papers_network() -> None:
    """SimpleCNN computes Conv → MaxPool → ReLU (faster); the paper's Conv → ReLU → MaxPool gives the same
    embedding, logits and weight gradients on real digits."""
    import torch
    from torch import nn

    from backends.datasets import colored_mnist as cm
    from backends.vision import SimpleCNN

    x = torch.as_tensor(cm.load(cm.Options(limit_test=200)).inputs("test")[:64]).float() / 255
    torch.manual_seed(0)
    ours = SimpleCNN()
    paper = SimpleCNN()
    paper.conv = nn.Sequential(ours.conv[0], nn.ReLU(), nn.MaxPool2d(2), ours.conv[3], nn.ReLU(), nn.MaxPool2d(2))
    paper.fc = ours.fc
    y = torch.arange(64) % 2
    grads = []
    for model in (ours, paper):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.clone() for p in (ours.conv[0].weight, ours.conv[3].weight, ours.fc.weight)])
    assert torch.equal(ours.features(x), paper.features(x))
    for g_ours, g_paper in zip(*grads):
        torch.testing.assert_close(g_ours, g_paper, rtol=1e-6, atol=1e-7)


# --- the compiled 2×2 max pooling (backends/pooling.py) --------------------------------------------------------


def _with_ties_and_specials(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random values with whole tied regions (as a conv gives on black background), NaN and -inf windows."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x[:, :, : shape[2] // 3] = 0.25  # every window of these rows is a 4-way tie
    x[0, 0, -2:, -2:] = -float("inf")  # a window of -inf only: its index is the window's first element
    x[0, 0, -2, 0] = float("nan")  # NaN wins its window, as in torch's kernel
    x[-1, -1, 1, 1] = x[-1, -1, 0, 0] = 3.0  # a tie between the last and first element of one window
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 16, 28, 28), (8, 32, 14, 14), (2, 3, 4, 6)])
def test_max_pool_2x2_is_torchs_max_pool(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Same outputs, same gradients (so the same indices on ties, NaN and -inf) as F.max_pool2d, with and without
    autograd, in float32 and in bfloat16 (``amp = "bf16"``: widened to float32 for the scan)."""
    from backends.pooling import max_pool_2x2

    x = _with_ties_and_specials(shape, seed=sum(shape)).to(dtype)
    x[0, 0, 0, 2], x[0, 0, 0, 3] = -0.0, 0.0  # signed zeros tie: the first one is kept, as in torch
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = max_pool_2x2(ours), torch.nn.functional.max_pool2d(theirs, 2)
    assert torch.equal(out_ours.isnan(), out_theirs.isnan())
    assert torch.equal(out_ours.detach().nan_to_num(), out_theirs.detach().nan_to_num())
    grad = torch.randn(out_theirs.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    signs = [o.detach().signbit() & ~o.detach().isnan() for o in (out_ours, out_theirs)]  # a NaN's sign means nothing
    assert out_ours.dtype == dtype and torch.equal(*signs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    with torch.inference_mode():  # the values-only kernel
        inf_ours, inf_theirs = max_pool_2x2(x), torch.nn.functional.max_pool2d(x, 2)
        assert torch.equal(inf_ours.isnan(), inf_theirs.isnan())
        assert torch.equal(inf_ours.nan_to_num(), inf_theirs.nan_to_num())


def test_max_pool_2x2_falls_back_to_torch() -> None:
    """Odd sizes, non-contiguous inputs and other dtypes take F.max_pool2d (same results by construction)."""
    from backends.pooling import max_pool_2x2

    odd = torch.randn(2, 3, 5, 7)
    assert torch.equal(max_pool_2x2(odd), torch.nn.functional.max_pool2d(odd, 2))
    strided = torch.randn(2, 3, 8, 8).transpose(2, 3)
    assert torch.equal(max_pool_2x2(strided), torch.nn.functional.max_pool2d(strided, 2))
    half = torch.randn(2, 3, 8, 8).half()
    assert torch.equal(max_pool_2x2(half), torch.nn.functional.max_pool2d(half, 2))


def test_training_with_compiled_pooling_is_bit_identical(data: DatasetBundle) -> None:
    """Ten Adam steps of SimpleCNN on real digits: the weights with the compiled pooling equal, bit for bit, those
    with nn.MaxPool2d (so checkpoints, embeddings and ids are unchanged)."""
    from torch import nn

    from backends.vision import SimpleCNN

    x = torch.as_tensor(data.inputs("pretrain_train")[:320]).float() / 255
    y = torch.as_tensor(_labels(data, "pretrain_train")[:320])
    states = []
    for pool in ("compiled", "torch"):
        torch.manual_seed(3)
        model = SimpleCNN()
        if pool == "torch":
            model.conv[1], model.conv[4] = nn.MaxPool2d(2), nn.MaxPool2d(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
        for step in range(10):
            batch = slice(32 * step, 32 * (step + 1))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
