"""Image files as inputs (issue 11): the ``images`` dataset, decoding and its cache, ``[backbone.transform]``,
patient-level splits, bad files, and plugins (``package.module:Class`` and entry points) through the real CLI."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from backends.errors import DataError
from backends.images import BatchTransform, Geometry, ImageFiles, decode, read_image
from engine.examples import coloured_mnist_images
from tests.conftest import ROOT

PLUGINS = ROOT / "tests" / "plugins"


def _spec(kind: str, options: str, *, backbone: str = "simple_cnn", transform: str = "", extra: str = "",
          name: str = "img") -> str:
    return f"""
[experiment]
name = "{name}"
[dataset]
kind = "{kind}"
options = {options}
null_partitions = 1
[task]
column = "parity"
[[attributes]]
name = "colour"
column = "colour"
values = [1]
[backbone]
kind = "{backbone}"
pretrain = {{ max_epochs = 2, patience = 2 }}
{transform}
[allocation]
alpha = [0.0, 1.0]
budget = "auto"
budget_val = "auto"
seeds = [1]
[finetune]
mode = "last_layer"
max_epochs = 5
[analysis]
test_resamples = 10
{extra}
"""


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coloured MNIST written as PNG files: 400 pool + 200 pre-training/test digits."""
    out = tmp_path_factory.mktemp("cmi")
    table, n = coloured_mnist_images(out, limit_train=400, limit_test=200)
    assert n == 600 and table.name == "coloured_mnist.csv"
    return out


def _copy(example: Path, tmp: Path) -> Path:
    dest = tmp / "data"
    shutil.copytree(example, dest)
    return dest / "coloured_mnist.csv"


def test_images_run_equals_the_in_memory_dataset(example: Path, tmp_path: Path, alloclab) -> None:
    """The same pixels through PNG files, the images dataset and the decoded cache give a bit-identical
    checkpoint and the same TV as the colored_mnist dataset; a re-run is a no-op and decodes nothing."""
    table = _copy(example, tmp_path)
    (tmp_path / "img.toml").write_text(_spec("images", f'{{ path = "{table}", split_column = "split" }}',
                                             transform="transform = { resize = [28, 28] }"))
    (tmp_path / "cm.toml").write_text(_spec("colored_mnist", "{ limit_train = 400, limit_test = 200 }", name="cm"))
    for spec in ("img.toml", "cm.toml"):
        r = alloclab("run", spec, "--serial", "--quiet")
        assert r.returncode == 0, r.stderr
    pts = sorted((tmp_path / "artifacts").glob("pr-*.pt"))
    assert len(pts) == 2 and pts[0].read_bytes() == pts[1].read_bytes()
    cached = sorted((tmp_path / "artifacts" / "images").glob("images-*.npy"))
    assert len(cached) == 5  # one per split
    r = alloclab("sql", "SELECT e.experiment, round(avg(v.value), 9) AS tv FROM separation_values v JOIN "
                 "experiment_stages e USING (stage_id) WHERE v.distance = 'tv_paper' AND v.attribute = 'colour' "
                 "GROUP BY 1 ORDER BY 1", "--format", "json")
    assert r.returncode == 0, r.stderr
    tv = {row["experiment"]: row["tv"] for row in json.loads(r.stdout)}
    assert tv["img"] == tv["cm"] and 0 < tv["img"] < 1
    mtimes = [p.stat().st_mtime_ns for p in cached]
    r = alloclab("run", "img.toml", "--serial", "--quiet")
    assert r.returncode == 0 and "pretrain: 0 run, 1 done before" in r.stdout + r.stderr
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_missing_and_corrupt_files_stop_before_training(example: Path, tmp_path: Path, alloclab) -> None:
    table = _copy(example, tmp_path)
    data = table.parent
    (tmp_path / "img.toml").write_text(_spec("images", f'{{ path = "{table}", split_column = "split" }}'))
    victims = sorted((data / "images" / "pool_train").glob("*.png"))[:4]
    for p in victims:
        p.unlink()
    r = alloclab("validate", "img.toml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "4 of 320 image files are missing" in r.stderr and f"id {victims[0].stem}" in r.stderr
    assert "Traceback" not in r.stderr
    shutil.copytree(example / "images" / "pool_train", data / "images" / "pool_train", dirs_exist_ok=True)
    bad = sorted((data / "images" / "test").glob("*.png"))[3]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    r = alloclab("run", "img.toml", "--serial", "--quiet")
    assert r.returncode == 2 and "1 of 80 image files cannot be decoded" in r.stderr and f"id {bad.stem}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "artifacts").glob("pr-*.pt"))  # nothing trained


def test_decoded_cache_is_rebuilt_when_corrupt(example: Path, tmp_path: Path, capsys) -> None:
    paths = np.array(sorted(str(p) for p in (example / "images" / "test").glob("*.png"))[:20], dtype=object)
    files = ImageFiles(paths, np.arange(20, dtype=np.int64))
    geo = Geometry(resize=(16, 16))
    first = np.array(decode(files, geo, tmp_path))
    assert first.shape == (20, 3, 16, 16) and first.dtype == np.uint8
    (npy,) = tmp_path.glob("images-*.npy")
    raw = bytearray(npy.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte: same size and header
    npy.write_bytes(bytes(raw))
    assert not np.array_equal(np.load(npy), first)
    again = np.array(decode(files, geo, tmp_path, verify=True))
    assert np.array_equal(again, first) and "rebuilding it" in capsys.readouterr().err
    npy.write_bytes(npy.read_bytes()[:100])  # truncated: even without verify it is not trusted
    assert np.array_equal(np.array(decode(files, geo, tmp_path)), first)


def test_geometry_channels_and_high_bit_depth(tmp_path: Path) -> None:
    from PIL import Image

    grey16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50 + 1000)  # 12-bit-ish range
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    a = read_image(str(tmp_path / "g16.png"), Geometry(channels=1))
    assert a.shape == (1, 30, 40) and a.min() == 0 and a.max() == 255  # windowed per image
    rgb = read_image(str(tmp_path / "g16.png"), Geometry(resize=15, crop=12, channels=3))
    assert rgb.shape == (3, 12, 12) and np.array_equal(rgb[0], rgb[1])  # grey replicated, shorter side 15 then crop
    b = read_image(str(tmp_path / "g16.png"), Geometry(resize=(10, 20), channels=1))
    assert b.shape == (1, 10, 20)


def test_dicom_is_read_with_pydicom(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
    ds.PhotometricInterpretation = "MONOCHROME1"  # inverted: bright = low values
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
    a = read_image(str(tmp_path / "x.dcm"), Geometry(channels=1))
    assert a.shape == (1, 8, 8) and a[0, 0, 0] == 255 and a[0, 7, 7] == 0
    assert pydicom.__version__


def test_paths_must_stay_inside_root(tmp_path: Path) -> None:
    from backends.datasets import images

    (tmp_path / "root").mkdir()
    table = tmp_path / "root" / "t.csv"
    table.write_text("id,path,y\n1,a.png,0\n2,../secret.png,1\n3,/etc/passwd,0\n")
    with pytest.raises(DataError, match=r"2 path\(s\) are empty or lead outside root .*id 2: '../secret.png'"):
        images.load(images.Options(path=str(table)))


def _patients_table(tmp_path: Path, n_patients: int = 40, per: int = 3) -> Path:
    rows = ["id,patient,y"] + [f"{p * per + k},P{p:03d},{(p + k) % 2}" for p in range(n_patients) for k in range(per)]
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    return table


def _split_of_patient(bundle) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for name, sp in bundle.splits.items():
        for p in sp.columns["patient"].tolist():
            where.setdefault(p, set()).add(name)
    return where


def test_group_column_keeps_each_patient_in_one_split(tmp_path: Path) -> None:
    from backends.datasets import table as tbl

    path = _patients_table(tmp_path)
    opts = dict(path=str(path), test_fraction=0.25, pretrain_fraction=0.2, val_fraction=0.2)
    rows_alone = _split_of_patient(tbl.load(tbl.Options(**opts)))
    assert any(len(s) > 1 for s in rows_alone.values())  # without group_column patients straddle splits
    grouped = tbl.load(tbl.Options(**opts, group_column="patient"))
    where = _split_of_patient(grouped)
    assert all(len(s) == 1 for s in where.values()) and len(where) == 40
    assert sum(len(sp) for sp in grouped.splits.values()) == 120
    assert 0 < len(grouped.splits["test"]) < 60 and len(grouped.splits["pretrain_train"]) > 0
    # a split column that puts one patient in two splits is an error naming the patient
    split_csv = tmp_path / "s.csv"
    split_csv.write_text("id,patient,split\n1,P1,pool_train\n2,P1,test\n3,P2,test\n")
    with pytest.raises(DataError, match=r"1 group\(s\) of 'patient' appear in more than one split \(P1 in "
                                        r"pool_train, test\)"):
        tbl.load(tbl.Options(path=str(split_csv), split_column="split", group_column="patient"))


def test_transform_is_checked_against_the_data_and_the_backbone(example: Path, tmp_path: Path, alloclab) -> None:
    table = _copy(example, tmp_path)
    opts = f'{{ path = "{table}", split_column = "split" }}'
    cases = {
        "cm": (_spec("colored_mnist", "{ limit_train = 400, limit_test = 200 }", transform="transform = { resize = 28 }"),
               "does not read image files"),
        "norm": (_spec("images", opts, transform='transform = { normalize = "imagenet", flip = true }'),
                 "flip, normalize cannot apply"),
        "shape": (_spec("images", opts, transform="transform = { resize = [32, 32] }"),
                  "needs (3, 28, 28); fix: set [backbone.transform] resize = [28, 28]"),
        "meanstd": (_spec("images", opts, transform="transform = { mean = [0.5], std = [0.2] }"),
                    "mean and std need 3 value(s)"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / f"{name}.toml").write_text(text)
        r = alloclab("run", f"{name}.toml", "--serial", "--quiet")
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)


def test_batch_transform_normalises_and_augments_only_in_training() -> None:
    import torch

    batch = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    batch[:, :, :, :4] = 0
    plain = BatchTransform(None, imagenet=False)(batch)
    assert torch.allclose(plain[0, 0, 0, 5], torch.tensor(128 / 255))
    net = BatchTransform({"flip": True}, imagenet=True)
    evaluated = net(batch, train=False)
    assert torch.allclose(evaluated[:, 0, 0, 5], torch.tensor((128 / 255 - 0.485) / 0.229))
    torch.manual_seed(0)
    trained = net(batch, train=True)
    flipped = [bool(torch.equal(trained[i], evaluated[i].flip(-1))) for i in range(4)]
    assert any(flipped) and not all(flipped)  # per image, p = 0.5 (seeded)
    custom = BatchTransform({"channels": 1, "mean": [0.5], "std": [0.25]}, imagenet=True)
    assert custom.mean == (0.5,) and custom.std == (0.25,)


def test_plugin_backbone_by_reference_runs_through_the_cli(example: Path, tmp_path: Path) -> None:
    """The README's example backbone, named as 'module:Class' in a spec, runs end to end; a bad reference is a
    one-line error."""
    from tests.conftest import cli_env
    import subprocess

    table = _copy(example, tmp_path)
    (tmp_path / "plug.toml").write_text(_spec("images", f'{{ path = "{table}", split_column = "split" }}',
                                              backbone="pixel_pool:PixelPool", name="plug").replace(
        "pretrain = { max_epochs = 2, patience = 2 }", "options = { grid = 4 }\npretrain = { max_epochs = 0 }"))
    env = cli_env() | {"PYTHONPATH": str(PLUGINS)}
    alloclab = Path(sys.executable).parent / "alloclab"
    r = subprocess.run([str(alloclab), "run", "plug.toml", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(alloclab), "sql", "SELECT count(*) AS n, max(len(vec)) AS d FROM embeddings", "--format",
                        "json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"n": 480, "d": 48}]  # pool_train + pool_val + test; 3 channels x 4 x 4
    (tmp_path / "bad.toml").write_text((tmp_path / "plug.toml").read_text().replace("pixel_pool:PixelPool",
                                                                                    "pixel_pool:Nothing"))
    r = subprocess.run([str(alloclab), "validate", "bad.toml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "module pixel_pool has no 'Nothing'" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad2.toml").write_text((tmp_path / "plug.toml").read_text().replace("pixel_pool:PixelPool",
                                                                                     "json:JSONDecoder"))
    r = subprocess.run([str(alloclab), "validate", "bad2.toml"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "does not fit the backbone contract: it lacks Options, pretrain, embed" in r.stderr


def test_entry_point_plugins_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package's entry points (group alloclab.backbones / alloclab.datasets) register kinds."""
    import backends
    from backends import datasets
    from engine.spec import BackboneSpec

    dist = tmp_path / "pixel_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pixel-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[alloclab.backbones]\npixels = pixel_pool:PixelPool\n\n"
                                           "[alloclab.datasets]\ntable_copy = backends.datasets.table\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(PLUGINS))
    assert "pixels" in backends.known_backbones() and "table_copy" in datasets.known_kinds()
    cls = backends.backend_class("pixels")
    assert cls.__name__ == "PixelPool" and BackboneSpec(kind="pixels").kind == "pixels"
    assert datasets.get("table_copy").KIND == "table"


def test_contract_of_every_registered_kind() -> None:
    """Every backbone kind has the contract's methods and an Options model; every dataset kind Options and load."""
    import backends
    from backends import datasets

    for kind in backends.known_backbones():
        cls = backends.backend_class(kind)
        for attr in ("Options", "pretrain", "embed", "predict_proba", "modes", "name"):
            assert hasattr(cls, attr), (kind, attr)
        assert cls.name == kind and "last_layer" in cls.modes
        assert cls.Options.model_config.get("extra") == "forbid", kind
    for kind in datasets.known_kinds():
        module = datasets.get(kind)
        assert hasattr(module, "Options") and hasattr(module, "load"), kind
        assert module.Options.model_config.get("extra") == "forbid", kind


def test_png_writer_is_standard(example: Path) -> None:
    """The example's PNGs are plain 8-bit RGB files any tool reads (checked from the header bytes)."""
    png = next((example / "images" / "test").glob("*.png")).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, colour) == (28, 28, 8, 2)
    assert zlib.crc32(png[12:29]) == struct.unpack(">I", png[29:33])[0]


def test_a_patient_in_two_splits_through_the_cli(example: Path, tmp_path: Path, alloclab) -> None:
    """The example's CSV with a patient column whose patient 'P1' has images in pool_train and test: accepted
    without group_column (the tool cannot know), refused with it, naming the patient."""
    import csv

    table = _copy(example, tmp_path)
    rows = list(csv.DictReader(open(table)))
    for i, row in enumerate(rows):
        row["patient"] = f"P{i // 2}" if row["split"] != "test" else f"T{i}"
    first_test = next(i for i, r in enumerate(rows) if r["split"] == "test")
    rows[first_test]["patient"] = "P1"  # P1 also has pool or pre-training images
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    opts = f'{{ path = "{table}", split_column = "split" }}'
    (tmp_path / "alone.toml").write_text(_spec("images", opts, transform="transform = { resize = [28, 28] }"))
    r = alloclab("validate", "alone.toml")
    assert r.returncode == 0, r.stderr
    (tmp_path / "grouped.toml").write_text(_spec("images", opts.replace("}", ', group_column = "patient" }'),
                                                 transform="transform = { resize = [28, 28] }"))
    r = alloclab("validate", "grouped.toml")
    assert r.returncode == 2 and "group(s) of 'patient' appear in more than one split (P1 in " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_the_readme_shows_the_plugin_file_as_it_is() -> None:
    """README's example backbone is tests/plugins/pixel_pool.py (less its module docstring), so the example a user
    copies is the one the tests run."""
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("embeds images as average-pooled pixels:\n\n```python\n", 1)[1].split("```", 1)[0]
    source = (PLUGINS / "pixel_pool.py").read_text()
    code = source.split('"""', 2)[2].lstrip("\n")
    assert shown.strip() == code.strip()
    assert len(code.strip().splitlines()) <= 35
