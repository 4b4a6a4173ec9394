"""The ``text`` backend on real RedditBias comments and the bundled MiniLM (CPU, tiny subsets, one epoch)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import backends
from backends import text, text_model
from backends.base import Checkpoint
from backends.datasets import redditbias
from backends.errors import BackendError

TRAIN = {"lr": 1e-4, "weight_decay": 0.01, "batch_size": 16, "max_epochs": 1, "patience": 1, "lr_patience": 1}
OPTIONS = {"max_length": 32}


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(texts, labels): 64 / 16 pre-training, 48 / 16 pool and 24 test texts, all real RedditBias comments."""
    bundle = redditbias.load(redditbias.Options(limit=600))

    def take(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        assert len(bundle.splits[split]) >= n
        return bundle.inputs(split)[:n], bundle.splits[split].columns["biased"][:n]

    return {"pre": take("pretrain_train", 64), "pre_val": take("pretrain_val", 16), "train": take("pool_train", 48),
            "val": take("pool_val", 16), "test": take("test", 24)}


@pytest.fixture(scope="module")
def backend() -> text.TextBackend:
    return text.TextBackend(dict(TRAIN), dict(OPTIONS))


@pytest.fixture(scope="module")
def untrained(backend: text.TextBackend) -> Checkpoint:
    return text.TextBackend({"max_epochs": 0}, dict(OPTIONS)).pretrain(np.array([], dtype=object), np.zeros(0),
                                                                       np.array([], dtype=object), np.zeros(0), seed=0)


@pytest.fixture(scope="module")
def pretrained(backend: text.TextBackend, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> Checkpoint:
    (x, y), (vx, vy) = data["pre"], data["pre_val"]
    return backend.pretrain(x, y, vx, vy, seed=0)


def test_registered_and_options_validated() -> None:
    assert isinstance(backends.create("text", {}, {"pooling": "cls"}), text.TextBackend)
    with pytest.raises(Exception, match="extra"):
        text.TextBackend({}, {"polling": "mean"})


def test_embeddings_shape_dtype_and_determinism(untrained: Checkpoint, data: dict) -> None:
    texts = data["test"][0]
    a = text.TextBackend({}, OPTIONS).embed(untrained, texts)
    text_model.TOKEN_CACHE.clear()
    b = text.TextBackend({}, OPTIONS).embed(untrained, texts)
    assert a.shape == (len(texts), 384) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.isfinite(a).all()


def test_padding_does_not_change_an_embedding(untrained: Checkpoint, data: dict) -> None:
    texts = data["test"][0][:6]
    batched = text.TextBackend({}, {**OPTIONS, "batch_size": 6}).embed(untrained, texts)
    alone = np.stack([text.TextBackend({}, OPTIONS).embed(untrained, texts[i : i + 1])[0] for i in range(6)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_pooling_modes_differ_and_pooler_works(data: dict) -> None:
    texts = data["test"][0][:8]
    out = {}
    for pooling in text.POOLINGS:
        b = text.TextBackend({"max_epochs": 0}, {**OPTIONS, "pooling": pooling})
        ckpt = b.pretrain(texts[:0], np.zeros(0), texts[:0], np.zeros(0), seed=0)
        out[pooling] = b.embed(ckpt, texts)
        assert out[pooling].shape == (8, 384)
    assert np.abs(out["pooler"]).max() <= 1.0  # BERT's pooler ends in tanh
    for a, b in (("cls", "pooler"), ("cls", "mean"), ("pooler", "mean")):
        assert not np.allclose(out[a], out[b])


def test_missing_model_dir_names_it(tmp_path: Path, data: dict) -> None:
    texts = data["test"][0][:2]
    missing = tmp_path / "no_such_model"
    b = text.TextBackend({"max_epochs": 0}, {"model_dir": str(missing)})
    with pytest.raises(BackendError, match=f"model directory {missing} does not exist"):
        b.embed(b.pretrain(texts[:0], np.zeros(0), texts[:0], np.zeros(0), seed=0), texts)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(BackendError, match="partial lacks tokenizer files .*; weights"):
        text.TextBackend({}, {"model_dir": str(partial)})._tokens(texts, "inputs")


def test_broken_model_dir_is_a_backend_error(tmp_path: Path, data: dict) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "vocab.txt", "model.safetensors"):
        (broken / name).write_text("not what it should be")
    with pytest.raises(BackendError, match="cannot load the model in .*broken"):
        text.TextBackend({}, {"model_dir": str(broken)})._tokens(data["test"][0][:2], "inputs")


def test_untrained_checkpoint_has_no_head(backend: text.TextBackend, untrained: Checkpoint, data: dict) -> None:
    assert len(untrained.state) < 10_000  # the unchanged encoder is not copied into the checkpoint
    with pytest.raises(BackendError, match="no task head"):
        backend.predict_proba(untrained, data["test"][0])


def test_pretrain_then_predict_proba(backend: text.TextBackend, pretrained: Checkpoint, untrained: Checkpoint,
                                     data: dict) -> None:
    state = torch.load(io.BytesIO(pretrained.state), weights_only=True)
    assert set(state) == {"format", "pooling", "encoder", "head"} and state["head"]["weight"].shape == (2, 384)
    assert pretrained.log["epochs"] == 1 and len(pretrained.log["history"]) == 1
    p = backend.predict_proba(pretrained, data["test"][0])
    assert p.shape == (24,) and p.dtype == np.float64 and ((p >= 0) & (p <= 1)).all()
    assert not np.allclose(backend.embed(pretrained, data["test"][0]), backend.embed(untrained, data["test"][0]))


def test_checkpoint_pooling_must_match(pretrained: Checkpoint, data: dict) -> None:
    with pytest.raises(BackendError, match="pooling 'mean' but the options say 'cls'"):
        text.TextBackend({}, {**OPTIONS, "pooling": "cls"}).embed(pretrained, data["test"][0][:2])


def test_lora_trains_only_adapters_and_head(backend: text.TextBackend, pretrained: Checkpoint) -> None:
    model = backend.build_model(pretrained, mode="lora", seed=0)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    lora = text.LoraOptions()
    n_layers, hidden = 6, 384  # MiniLM-L6-H384; adapters on query and value: A (r×h) + B (h×r) each
    assert sum(trainable.values()) == n_layers * 2 * 2 * lora.r * hidden + (2 * hidden + 2)
    full = backend.build_model(pretrained, mode="full", seed=0)
    assert all(p.requires_grad for p in full.parameters())


def test_finetune_modes_are_checked(backend: text.TextBackend, pretrained: Checkpoint, data: dict) -> None:
    (x, y), (vx, vy) = data["train"], data["val"]
    for mode in ("last_layer", "scratch"):
        with pytest.raises(BackendError, match="known modes are: full, lora"):
            backend.finetune(pretrained, x, y, vx, vy, mode=mode, settings=TRAIN, seed=0)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune(backend: text.TextBackend, pretrained: Checkpoint, data: dict, mode: str) -> None:
    (x, y), (vx, vy), (tx, _) = data["train"], data["val"], data["test"]
    tuned = backend.finetune(pretrained, x, y, vx, vy, mode=mode, settings=TRAIN, seed=1)
    assert tuned.backbone == "text" and tuned.log["mode"] == mode and tuned.log["epochs"] == 1
    p = backend.predict_proba(tuned, tx)
    assert p.shape == (24,) and ((p >= 0) & (p <= 1)).all()
    assert not np.allclose(p, backend.predict_proba(pretrained, tx))
    before = torch.load(io.BytesIO(pretrained.state), weights_only=True)["encoder"]
    after = torch.load(io.BytesIO(tuned.state), weights_only=True)["encoder"]
    assert set(after) == set(before)  # LoRA adapters are merged: same layout as the pre-trained encoder
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "lora":
        assert changed and all("query.weight" in k or "value.weight" in k for k in changed)
    else:
        assert any("intermediate" in k for k in changed)


def test_finetune_is_deterministic(backend: text.TextBackend, pretrained: Checkpoint, data: dict) -> None:
    (x, y), (vx, vy), (tx, _) = data["train"], data["val"], data["test"]
    runs = [backend.finetune(pretrained, x, y, vx, vy, mode="lora", settings=TRAIN, seed=3) for _ in range(2)]
    assert runs[0].log["history"] == runs[1].log["history"]
    np.testing.assert_array_equal(backend.predict_proba(runs[0], tx), backend.predict_proba(runs[1], tx))


def test_bfloat16_inference_is_close_to_float32(untrained: Checkpoint, data: dict) -> None:
    texts = data["test"][0][:8]
    f32 = text.TextBackend({}, OPTIONS).embed(untrained, texts)
    bf16 = text.TextBackend({}, {**OPTIONS, "dtype": "bfloat16"}).embed(untrained, texts)
    assert bf16.dtype == np.float32
    cos = (f32 * bf16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99


def test_fingerprint_follows_options_and_files(tmp_path: Path) -> None:
    a = text.TextBackend({}, OPTIONS).fingerprint()
    assert a == text.TextBackend({}, OPTIONS).fingerprint() != text.TextBackend({}, {"max_length": 64}).fingerprint()
    with pytest.raises(BackendError, match="does not exist"):
        text.TextBackend({}, {"model_dir": str(tmp_path / "none")}).fingerprint()


@pytest.mark.parametrize("kind", ["tv_surrogate", "adversarial"])
def test_text_pretraining_and_full_finetuning_take_a_regulariser(backend: text.TextBackend, pretrained: Checkpoint,
                                                                 data: dict, kind: str) -> None:
    """The penalty reaches the text encoder: it is logged, and it changes the trained weights."""
    from backends.regularisers import Regularisation

    (x, y), (vx, vy) = data["pre"], data["pre_val"]
    groups = (np.char.str_len(x.astype(str)) > np.median(np.char.str_len(x.astype(str)))).astype(np.int64)
    reg = Regularisation(kind=kind, attribute="long", weight=1.0, groups=groups, hidden=8)
    ckpt = backend.pretrain(x, y, vx, vy, seed=0, regulariser=reg)
    assert ckpt.log["history"][0]["train_penalty"] > 0
    plain = torch.load(io.BytesIO(pretrained.state), weights_only=True)["encoder"]
    reg_state = torch.load(io.BytesIO(ckpt.state), weights_only=True)["encoder"]
    assert any(not torch.equal(plain[k], reg_state[k]) for k in plain)
    (tx, ty), (tvx, tvy) = data["train"], data["val"]
    tgroups = (np.arange(len(ty)) % 2).astype(np.int64)
    tuned = backend.finetune(pretrained, tx, ty, tvx, tvy, mode="full", settings=TRAIN, seed=1,
                             regulariser=Regularisation(kind=kind, attribute="odd", weight=1.0, groups=tgroups))
    assert tuned.log["epochs"] == 1
