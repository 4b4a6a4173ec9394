"""Each image kind end to end through the real CLI on a few hundred generated images (issue 11): the torchvision
backbone (EfficientNet-Lite0 with its shipped ImageNet weights; a state-dict file with wrong keys), hf_vision (a
tiny random ViT saved to a folder), and the mimic_cxr / ham10000 layouts (fixture trees, SimpleCNN at 28 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.examples import coloured_mnist_images
from tests.medical_fixtures import write_ham, write_mimic

RUN_TAIL = """
[allocation]
alpha = [0.0, 0.5, 1.0]
budget = "auto"
budget_val = "auto"
seeds = [1]
[finetune]
mode = "last_layer"
max_epochs = 5
[analysis]
test_resamples = 10
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    table, _ = coloured_mnist_images(out, limit_train=300, limit_test=150,
                                     splits=("pool_train", "pool_val", "test"))
    return table


def _digits_spec(table: Path, backbone: str, name: str) -> str:
    return f"""
[experiment]
name = "{name}"
[dataset]
kind = "images"
options = {{ path = "{table}", split_column = "split" }}
null_partitions = 1
[task]
column = "parity"
[[attributes]]
name = "colour"
column = "colour"
values = [1]
{backbone}
{RUN_TAIL}"""


def _rows(alloclab, query: str) -> list[dict]:
    r = alloclab("sql", query, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_efficientnet_lite0_imagenet_weights_end_to_end(digits: Path, tmp_path: Path, alloclab) -> None:
    backbone = """[backbone]
kind = "torchvision"
options = { arch = "efficientnet_lite0", batch_size = 16 }
pretrain = { max_epochs = 0 }
transform = { resize = [64, 64] }"""
    (tmp_path / "eff.toml").write_text(_digits_spec(digits, backbone, "eff"))
    r = alloclab("run", "eff.toml", "--quiet")
    assert r.returncode == 0, r.stderr
    (row,) = _rows(alloclab, "SELECT count(*) AS n, min(len(vec)) AS d FROM embeddings")
    assert row == {"n": 300 + 60, "d": 1280}  # pools + test (pre-training splits were not written)
    done = _rows(alloclab, "SELECT status, count(*) AS n FROM trials GROUP BY 1")
    assert done == [{"status": "done", "n": 6}]
    ckpt = next((tmp_path / "artifacts").glob("pr-*.pt"))
    assert ckpt.stat().st_size < 100_000  # weights used as loaded are not copied into the checkpoint
    r = alloclab("report", "eff.toml")
    assert r.returncode == 0, r.stderr


def test_wrong_weight_keys_stop_the_run_with_one_line(digits: Path, tmp_path: Path, alloclab) -> None:
    import torch

    torch.save({"conv.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, tmp_path / "bad.pth")
    backbone = """[backbone]
kind = "torchvision"
options = { arch = "resnet18", weights = "bad.pth" }
pretrain = { max_epochs = 0 }
transform = { resize = [32, 32] }"""
    (tmp_path / "bad.toml").write_text(_digits_spec(digits, backbone, "bad"))
    r = alloclab("run", "bad.toml", "--serial", "--quiet")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    out = r.stdout + r.stderr
    assert "missing" in out and "conv1.weight" in out and "unexpected" in out and "conv.weight" in out, out


def test_hf_vision_tiny_vit_from_a_folder_end_to_end(digits: Path, tmp_path: Path, alloclab) -> None:
    from transformers import ViTConfig, ViTModel

    import torch

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    backbone = f"""[backbone]
kind = "hf_vision"
options = {{ model_dir = "{tmp_path / 'vit'}", pooling = "cls" }}
pretrain = {{ max_epochs = 0 }}
transform = {{ resize = [28, 28] }}"""
    (tmp_path / "wrong.toml").write_text(_digits_spec(digits, backbone, "vit"))
    r = alloclab("run", "wrong.toml", "--serial", "--quiet")  # 28 px images, a 32 px model: refused up front
    assert r.returncode == 2 and "resize = [32, 32]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / "artifacts").glob("pr-*.pt"))
    (tmp_path / "vit.toml").write_text(_digits_spec(digits, backbone.replace("[28, 28]", "[32, 32]"), "vit"))
    r = alloclab("run", "vit.toml", "--serial", "--quiet")  # Ray is exercised by the EfficientNet run
    assert r.returncode == 0, r.stderr
    (row,) = _rows(alloclab, "SELECT count(*) AS n, min(len(vec)) AS d FROM embeddings")
    assert row == {"n": 360, "d": 32}


def _medical_spec(kind: str, options: str, attrs: list[tuple[str, str]], name: str) -> str:
    attributes = "".join(f'[[attributes]]\nname = "{a}"\ncolumn = "{c}"\nmissing = "exclude"\n' for a, c in attrs)
    return f"""
[experiment]
name = "{name}"
[dataset]
kind = "{kind}"
options = {options}
null_partitions = 1
[task]
column = "{'Pleural_Effusion' if kind == 'mimic_cxr' else 'label'}"
missing = "drop"
{attributes}
[backbone]
kind = "simple_cnn"
pretrain = {{ max_epochs = 1, batch_size = 16 }}
transform = {{ resize = [28, 28], channels = 3 }}
{RUN_TAIL}"""


@pytest.mark.parametrize("kind", ["mimic_cxr", "ham10000"])
def test_medical_layouts_end_to_end(kind: str, tmp_path: Path, alloclab) -> None:
    """A fixture tree in the published layout (synthetic pixels) runs pre-training, embedding, separation and
    trials; no patient / lesion is in two splits of the stored items."""
    if kind == "mimic_cxr":
        cxr, iv = write_mimic(tmp_path, n_fillers=80)
        options = f'{{ root = "{cxr}", mimic_iv_root = "{iv}" }}'
        attrs, key = [("view", "ViewPosition_binary"), ("age", "Age_binary")], "subject_id"
    else:
        root = write_ham(tmp_path, n_fillers=150)
        options = f'{{ root = "{root}", pretrain_images = 60 }}'
        attrs, key = [("sex", "Sex_binary"), ("age", "Age_binary")], "lesion_id"
    (tmp_path / "med.toml").write_text(_medical_spec(kind, options, attrs, kind))
    r = alloclab("run", "med.toml", "--serial", "--quiet")
    assert r.returncode == 0, r.stderr
    trials = _rows(alloclab, "SELECT status, count(*) AS n FROM trials GROUP BY 1")
    assert trials == [{"status": "done", "n": 9}]
    from backends import datasets

    module = datasets.get(kind)
    spec_options = {"root": str(cxr), "mimic_iv_root": str(iv)} if kind == "mimic_cxr" else {
        "root": str(root), "pretrain_images": 60}
    bundle = module.load(module.Options(**spec_options))
    where: dict[str, set[str]] = {}
    for split, sp in bundle.splits.items():
        for patient in np.asarray(sp.columns[key]).tolist():
            where.setdefault(str(patient), set()).add(split)
    assert len(where) > 80 and all(len(s) == 1 for s in where.values())


def test_a_replaced_weights_file_changes_the_pretraining_id(digits: Path, tmp_path: Path) -> None:
    """Ids hash the weights' bytes: the same path with other bytes re-runs; the same bytes written again do not."""
    import torch
    import torchvision

    from engine.plan import make_plan
    from engine.spec import load_spec

    def pretrain_id(weights: Path) -> str:
        backbone = f"""[backbone]
kind = "torchvision"
options = {{ arch = "resnet18", weights = "{weights}" }}
pretrain = {{ max_epochs = 0 }}
transform = {{ resize = [32, 32] }}"""
        (tmp_path / "w.toml").write_text(_digits_spec(digits, backbone, "w"))
        (spec,) = load_spec(tmp_path / "w.toml")
        return next(iter(make_plan(spec).pretrain.values())).stage_id

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "a.pth")
    first = pretrain_id(tmp_path / "a.pth")
    raw = (tmp_path / "a.pth").read_bytes()
    (tmp_path / "a.pth").unlink()
    (tmp_path / "a.pth").write_bytes(raw)  # the same bytes, a new file (new mtime)
    assert pretrain_id(tmp_path / "a.pth") == first
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "a.pth")  # other random weights, same path
    assert pretrain_id(tmp_path / "a.pth") != first
