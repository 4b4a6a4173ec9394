"""The ``hf_vision`` backend on tiny random ViT, DINOv2, CLIP and SigLIP models saved to disk and loaded through the
real offline path (CPU, 32×32 images, a couple of epochs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

import backends
from backends import hf_vision
from backends.base import Checkpoint
from backends.errors import BackendError
from backends.images import IMAGENET_MEAN, IMAGENET_STD
from backends.regularisers import Regularisation

TRAIN = {"lr": 1e-3, "weight_decay": 0.01, "batch_size": 16, "max_epochs": 2, "patience": 5, "lr_patience": 5}
FT = {**TRAIN, "max_epochs": 1}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 8}
PROC_MEAN, PROC_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _save(model: torch.nn.Module, path: Path, processor: dict | None = None) -> str:
    model.save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Folders of tiny random models: vit (with a preprocessor config), vit_plain (same weights, none), dinov2,
    clip_vision, clip (a full CLIPModel), clip_tower (that CLIPModel's vision tower alone), siglip (vision)."""
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                              SiglipVisionConfig, SiglipVisionModel, ViTConfig, ViTModel)

    root = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY))
    out = {"vit": _save(vit, root / "vit", {"image_mean": PROC_MEAN, "image_std": PROC_STD}),
           "vit_plain": _save(vit, root / "vit_plain")}
    out["dinov2"] = _save(Dinov2Model(Dinov2Config(**TINY)), root / "dinov2")
    out["clip_vision"] = _save(CLIPVisionModel(CLIPVisionConfig(**TINY)), root / "clip_vision")
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    clip = CLIPModel(CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16))
    out["clip"] = _save(clip, root / "clip")
    out["clip_tower"] = _save(clip.vision_model, root / "clip_tower")
    out["siglip"] = _save(SiglipVisionModel(SiglipVisionConfig(**TINY)), root / "siglip")
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random uint8 32×32 RGB images whose label is 'left half brighter than the right half'."""
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 160, (n, 3, 32, 32))
        x[y == 1, :, :, :16] += 90
        x[y == 0, :, :, 16:] += 90
        return x.astype(np.uint8), y.astype(np.int64)

    return {"pre": make(48), "pre_val": make(16), "train": make(32), "val": make(16), "test": make(12)}


def _backend(model_dir: str, settings: dict | None = None, **options) -> hf_vision.HFVisionBackend:
    return hf_vision.HFVisionBackend(dict(TRAIN if settings is None else settings), {"model_dir": model_dir,
                                                                                      **options})


def _untrained(backend: hf_vision.HFVisionBackend) -> Checkpoint:
    b = hf_vision.HFVisionBackend({"max_epochs": 0}, backend.options.model_dump(exclude_unset=True), backend.transform)
    return b.pretrain(np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0), np.zeros((0, 3, 32, 32), np.uint8),
                      np.zeros(0), seed=0)


def _encoder_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(ckpt.state), weights_only=True)["encoder"]


@pytest.fixture(scope="module")
def pretrained(models: dict[str, str], data: dict) -> Checkpoint:
    (x, y), (vx, vy) = data["pre"], data["pre_val"]
    return _backend(models["vit"]).pretrain(x, y, vx, vy, seed=0)


def test_registered_and_options_validated(models: dict[str, str]) -> None:
    b = backends.create("hf_vision", {}, {"model_dir": models["vit"]}, transform={"flip": True})
    assert isinstance(b, hf_vision.HFVisionBackend) and b.transform == {"flip": True}
    cls = backends.backend_class("hf_vision")
    assert cls.name == "hf_vision" and cls.modes == ("last_layer", "full", "lora")
    assert cls.regularisable and cls.takes_transform
    assert b.options.optimizer == "adamw" and b.options.schedule == "plateau" and b.options.pooling == "cls"
    with pytest.raises(pydantic.ValidationError, match="model_dir"):
        hf_vision.HFVisionBackend({}, {})
    with pytest.raises(pydantic.ValidationError, match="extra"):
        hf_vision.HFVisionBackend({}, {"model_dir": models["vit"], "polling": "cls"})
    with pytest.raises(pydantic.ValidationError, match="warmup_epochs needs schedule"):
        hf_vision.HFVisionBackend({}, {"model_dir": models["vit"], "warmup_epochs": 2})


def test_missing_or_unloadable_model_dir(tmp_path: Path, data: dict) -> None:
    x, y = data["test"]
    with pytest.raises(BackendError, match="does not exist; fix: set backbone.options.model_dir"):
        _backend(str(tmp_path / "nowhere")).pretrain(x, y, x, y, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="lacks weights"):
        _untrained(_backend(str(tmp_path / "empty")))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(BackendError, match="cannot load the model"):
        _untrained(_backend(str(tmp_path / "broken")))
    from transformers import BertConfig, BertModel  # a text model is not a vision encoder

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                vocab_size=64))
    with pytest.raises(BackendError, match="not a vision encoder"):
        _untrained(_backend(_save(bert, tmp_path / "bert")))


@pytest.mark.parametrize("kind, pooling", [("vit", "cls"), ("vit", "mean"), ("vit", "pooler"), ("dinov2", "cls"),
                                           ("dinov2", "pooler"), ("clip_vision", "mean"), ("siglip", "pooler"),
                                           ("siglip", "mean")])
def test_embedding_dims_and_determinism(models: dict[str, str], data: dict, kind: str, pooling: str) -> None:
    x = data["test"][0]
    b = _backend(models[kind], pooling=pooling, batch_size=5)
    ckpt = _untrained(b)
    a = b.embed(ckpt, x)
    assert a.shape == (len(x), 32) and a.dtype == np.float32 and np.isfinite(a).all()
    again = _backend(models[kind], pooling=pooling, batch_size=64).embed(ckpt, x)  # other batching, same numbers
    np.testing.assert_allclose(a, again, atol=1e-5)
    assert np.array_equal(a, b.embed(ckpt, x))


def test_poolings_differ_and_siglip_has_no_cls(models: dict[str, str], data: dict) -> None:
    x = data["test"][0]
    out = {p: _backend(models["vit"], pooling=p).embed(_untrained(_backend(models["vit"], pooling=p)), x)
           for p in hf_vision.POOLINGS}
    assert not np.allclose(out["cls"], out["mean"]) and not np.allclose(out["cls"], out["pooler"])
    with pytest.raises(BackendError, match="no CLS token.*pooling = 'pooler'"):
        _untrained(_backend(models["siglip"], pooling="cls"))


def test_full_clip_folder_uses_its_vision_tower(models: dict[str, str], data: dict) -> None:
    x = data["test"][0]
    full, tower = _backend(models["clip"], pooling="pooler"), _backend(models["clip_tower"], pooling="pooler")
    a, b = full.embed(_untrained(full), x), tower.embed(_untrained(tower), x)
    np.testing.assert_allclose(a, b, atol=1e-6)
    encoder = hf_vision.load_encoder(Path(models["clip"]))
    assert type(encoder).__name__ == "CLIPVisionModel"


def test_pretrain_two_epochs(pretrained: Checkpoint, models: dict[str, str], data: dict) -> None:
    log = pretrained.log
    assert pretrained.backbone == "hf_vision" and log["trained"] and log["epochs"] == 2
    assert len(log["history"]) == 2 and 1 <= log["best_epoch"] <= 2 and log["trainable_params"] > 0
    b = _backend(models["vit"])
    x = data["test"][0]
    trained, untrained = b.embed(pretrained, x), b.embed(_untrained(b), x)
    assert trained.shape == (len(x), 32) and not np.allclose(trained, untrained)
    p = b.predict_proba(pretrained, x)
    assert p.shape == (len(x),) and p.dtype == np.float64 and ((p >= 0) & (p <= 1)).all()
    state = torch.load(io.BytesIO(pretrained.state), weights_only=True)
    assert set(state) == {"format", "pooling", "encoder", "head"} and state["encoder"] and state["head"]
    (px, py), (vx, vy) = data["pre"], data["pre_val"]
    again = _backend(models["vit"]).pretrain(px, py, vx, vy, seed=0)  # same seed, same weights on the CPU
    assert all(torch.equal(v, _encoder_state(again)[k]) for k, v in state["encoder"].items())


def test_zero_epochs_is_small_and_untrained(pretrained: Checkpoint, models: dict[str, str], data: dict) -> None:
    (x, y), (vx, vy) = data["pre"], data["pre_val"]
    ckpt = _backend(models["vit"], {**TRAIN, "max_epochs": 0}).pretrain(x, y, vx, vy, seed=0)
    assert ckpt.log["trained"] is False and ckpt.log["epochs"] == 0
    assert len(ckpt.state) < 2000 < len(pretrained.state)
    assert _encoder_state(ckpt) == {}
    with pytest.raises(BackendError, match="no task head"):
        _backend(models["vit"]).predict_proba(ckpt, data["test"][0])


@pytest.mark.parametrize("kind", ["vit", "clip_vision"])
def test_full_and_lora_finetuning(models: dict[str, str], data: dict, kind: str) -> None:
    b = _backend(models[kind], pooling="mean", schedule="cosine", warmup_epochs=1, grad_clip=1.0,
                 lora={"r": 4, "alpha": 8})
    base = _untrained(b)
    (x, y), (vx, vy), tx = data["train"], data["val"], data["test"][0]
    before = b.embed(base, tx)
    full = b.finetune(base, x, y, vx, vy, mode="full", settings=FT, seed=1)
    lora = b.finetune(base, x, y, vx, vy, mode="lora", settings=FT, seed=1)
    for ckpt in (full, lora):
        assert ckpt.log["trained"] and ckpt.log["epochs"] == 1
        assert not np.allclose(b.embed(ckpt, tx), before, atol=1e-6)
        assert b.predict_proba(ckpt, tx).shape == (len(tx),)
    linear = {n.rsplit(".", 1)[-1] for n, m in hf_vision.load_encoder(Path(models[kind])).named_modules()
              if isinstance(m, torch.nn.Linear)}
    targets = ["q_proj", "v_proj"] if "q_proj" in linear else ["query", "value"]  # transformers 5 / older ViT
    assert lora.log["mode"] == "lora" and lora.log["lora"]["target_modules"] == targets
    assert lora.log["trainable_params"] < full.log["trainable_params"]
    keys_full, keys_lora = set(_encoder_state(full)), set(_encoder_state(lora))
    assert keys_lora == keys_full == set(hf_vision.load_encoder(Path(models[kind])).state_dict())
    assert not any("lora" in k or "base_model" in k for k in keys_lora)  # adapters merged, no peft layout
    with pytest.raises(BackendError, match="not supported"):
        b.finetune(base, x, y, vx, vy, mode="last_layer", settings=FT, seed=1)
    own = _backend(models[kind], lora={"r": 2, "target_modules": ["fc1"]})
    assert own.finetune(base, x, y, vx, vy, mode="lora", settings=FT, seed=1).log["lora"]["target_modules"] == ["fc1"]
    with pytest.raises(BackendError, match="lora.target_modules"):
        _backend(models[kind], lora={"target_modules": ["nope"]}).finetune(base, x, y, vx, vy, mode="lora",
                                                                          settings=FT, seed=1)


def test_wrong_image_size_and_interpolation(models: dict[str, str], data: dict) -> None:
    x = data["test"][0][:, :, :24, :24].copy()
    b = _backend(models["vit"])
    with pytest.raises(BackendError, match=r"24×24 images .* takes 32×32 .*resize = \[32, 32\]"):
        b.embed(_untrained(b), x)
    with pytest.raises(BackendError, match="uint8 images"):
        b.embed(_untrained(b), x.astype(np.float32))
    for kind in ("vit", "dinov2"):
        b = _backend(models[kind], interpolate_pos_encoding=True)
        assert b.embed(_untrained(b), x).shape == (len(x), 32)


def test_one_channel_images_are_repeated(models: dict[str, str], data: dict) -> None:
    grey = data["test"][0][:, :1].copy()
    b = _backend(models["vit"])
    ckpt = _untrained(b)
    np.testing.assert_array_equal(b.embed(ckpt, grey), b.embed(ckpt, np.repeat(grey, 3, axis=1)))
    with pytest.raises(BackendError, match="channels = 3"):
        b.embed(ckpt, np.repeat(grey, 2, axis=1))


def test_mean_std_from_the_preprocessor_config(models: dict[str, str], data: dict) -> None:
    x = data["test"][0]
    with_config, plain = _backend(models["vit"]), _backend(models["vit_plain"])
    assert with_config._batch_transform().mean == tuple(PROC_MEAN)
    assert with_config._batch_transform().std == tuple(PROC_STD)
    assert plain._batch_transform().mean == IMAGENET_MEAN and plain._batch_transform().std == IMAGENET_STD
    own = with_config.embed(_untrained(with_config), x)
    same = hf_vision.HFVisionBackend({}, {"model_dir": models["vit_plain"]}, {"mean": PROC_MEAN, "std": PROC_STD})
    np.testing.assert_allclose(own, same.embed(_untrained(same), x), atol=1e-6)  # the same weights, same mean/std
    assert not np.allclose(own, plain.embed(_untrained(plain), x))  # ImageNet's mean/std


def test_memmap_inputs_augmentations_and_regulariser(models: dict[str, str], data: dict, tmp_path: Path) -> None:
    (x, y), (vx, vy) = data["train"], data["val"]
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    b = hf_vision.HFVisionBackend({**TRAIN, "max_epochs": 1}, {"model_dir": models["dinov2"]},
                                  {"flip": True, "random_resized_crop": [0.8, 1.0]})
    groups = (np.arange(len(y)) % 2).astype(np.int64)
    ckpt = b.pretrain(mm, y, vx, vy, seed=3,
                      regulariser=Regularisation(kind="tv_surrogate", attribute="g", weight=1.0, groups=groups))
    assert "train_penalty" in ckpt.log["history"][0]
    np.testing.assert_array_equal(b.embed(ckpt, mm), b.embed(ckpt, x))


def test_bad_checkpoints(pretrained: Checkpoint, models: dict[str, str], data: dict) -> None:
    b, x = _backend(models["vit"]), data["test"][0]
    with pytest.raises(BackendError, match="from backbone 'text'"):
        b.embed(Checkpoint(backbone="text", state=pretrained.state, log={}), x)
    with pytest.raises(BackendError, match="corrupt"):
        b.embed(Checkpoint(backbone="hf_vision", state=b"not a checkpoint", log={}), x)
    with pytest.raises(BackendError, match="pooling 'cls'"):
        _backend(models["vit"], pooling="mean").embed(pretrained, x)
    with pytest.raises(BackendError, match="does not fit"):
        _backend(models["clip_vision"]).embed(pretrained, x)


def test_fingerprint(models: dict[str, str]) -> None:
    a = _backend(models["vit"]).fingerprint()
    assert a == _backend(models["vit"]).fingerprint() != _backend(models["vit"], pooling="mean").fingerprint()
    assert a != _backend(models["dinov2"]).fingerprint()


def test_bfloat16_inference_and_amp_training(models: dict[str, str], data: dict) -> None:
    x = data["test"][0]
    b32, b16 = _backend(models["vit"]), _backend(models["vit"], dtype="bfloat16")
    ckpt = _untrained(b32)
    a, b = b32.embed(ckpt, x), b16.embed(ckpt, x)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, atol=0.15, rtol=0.05)
    (tx, ty), (vx, vy) = data["train"], data["val"]
    amp = _backend(models["vit"], {**FT, "amp": "bf16"}).pretrain(tx, ty, vx, vy, seed=0)
    assert amp.log["trained"] and np.isfinite(_backend(models["vit"]).embed(amp, x)).all()
