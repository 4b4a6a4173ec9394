"""Coloured MNIST on the real files: IDX reading, the paper's splits, colouring, determinism, limits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from backends import datasets
from backends.base import SPLITS, DatasetBundle
from backends.datasets import colored_mnist as cm
from backends.errors import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def full() -> DatasetBundle:
    return cm.load(cm.Options())


@pytest.fixture(scope="module")
def limited() -> DatasetBundle:
    return cm.load(cm.Options(limit_train=3000, limit_test=500))


def _digits(bundle: DatasetBundle, names: list[str]) -> np.ndarray:
    return np.concatenate([bundle.splits[n].columns["digit"] for n in names])


def test_registry_lookup() -> None:
    assert datasets.get("colored_mnist") is cm
    with pytest.raises(DataError, match="colored_mnist"):
        datasets.get("coloured_mnist")


def test_idx_reader_gives_official_counts(full: DatasetBundle) -> None:
    train = _digits(full, ["pool_train", "pool_val"])
    test = _digits(full, ["pretrain_train", "pretrain_val", "test"])
    assert np.bincount(train).tolist() == TRAIN_COUNTS
    assert np.bincount(test).tolist() == TEST_COUNTS
    assert full.splits["pool_train"].columns["digit"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_split_sizes_and_disjoint_ids(full: DatasetBundle) -> None:
    sizes = {name: len(split) for name, split in full.splits.items()}
    assert sizes == {"pretrain_train": 5000, "pretrain_val": 1000, "pool_train": 48000, "pool_val": 12000, "test": 4000}
    assert set(full.splits) == set(SPLITS)
    all_ids = np.concatenate([s.ids for s in full.splits.values()])
    assert all_ids.dtype == np.int64
    assert np.array_equal(np.sort(all_ids), np.arange(70000))
    assert np.array_equal(full.splits["pool_train"].ids, np.arange(48000))  # sequential: first 80%
    assert full.splits["test"].ids.min() >= cm.TEST_ID_OFFSET


def test_columns(full: DatasetBundle) -> None:
    for split in full.splits.values():
        assert set(split.columns) == {"digit", "parity", "colour"}
        for column in split.columns.values():
            assert column.dtype == np.int64 and column.shape == split.ids.shape
        assert np.array_equal(split.columns["parity"], split.columns["digit"] % 2)
        assert set(np.unique(split.columns["colour"])) == {0, 1}


def test_colour_balanced_and_independent_of_parity(full: DatasetBundle) -> None:
    cols = full.splits["pool_train"].columns
    s, parity = cols["colour"], cols["parity"]
    assert abs(s.mean() - 0.5) < 0.01
    assert abs(s[parity == 1].mean() - s[parity == 0].mean()) < 0.02


def test_colouring_matches_the_paper(full: DatasetBundle) -> None:
    split = full.splits["test"]
    images = full.inputs("test")
    assert images.dtype == np.uint8 and images.shape == (4000, 3, 28, 28)
    grey = cm._images("test")[split.ids - cm.TEST_ID_OFFSET]
    s = split.columns["colour"]
    rows = np.arange(len(s))
    fg = images[rows, s]
    assert np.array_equal(fg, grey)  # full intensity in the chosen channel
    assert np.array_equal(fg.max(axis=(1, 2)), grey.max(axis=(1, 2)))
    others = np.stack([images[rows, np.where(s == 0, 1, 0)], images[:, 2]], axis=1)
    assert (others <= grey[:, None]).all()  # the other two channels are dimmed, never brighter
    assert (images[np.broadcast_to(grey[:, None] == 0, images.shape)] == 0).all()  # black background
    lit = grey >= 128
    ratio = others[:, 0][lit].astype(float) / grey[lit]
    assert 0.45 < ratio.mean() < 0.55 and ratio.std() > 0.25  # ~U(0,1), per pixel


def test_deterministic(full: DatasetBundle) -> None:
    again = cm.load(cm.Options())
    assert again.fingerprint == full.fingerprint
    for name in SPLITS:
        assert np.array_equal(again.splits[name].ids, full.splits[name].ids)
        assert np.array_equal(again.splits[name].columns["colour"], full.splits[name].columns["colour"])
    assert np.array_equal(again.inputs("pretrain_val"), full.inputs("pretrain_val"))
    other = cm.load(cm.Options(colour_seed=7))
    assert other.fingerprint != full.fingerprint
    assert not np.array_equal(other.splits["test"].columns["colour"], full.splits["test"].columns["colour"])


def test_limits_are_consistent_subsets(full: DatasetBundle, limited: DatasetBundle) -> None:
    assert len(limited.splits["pool_train"]) == 2400 and len(limited.splits["pool_val"]) == 600
    assert sum(len(limited.splits[n]) for n in ("pretrain_train", "pretrain_val", "test")) == 500
    assert limited.fingerprint != full.fingerprint
    full_ids = np.concatenate([full.splits[n].ids for n in SPLITS])
    full_colour = np.concatenate([full.splits[n].columns["colour"] for n in SPLITS])
    by_id = dict(zip(full_ids.tolist(), full_colour.tolist()))
    for name in SPLITS:
        split = limited.splits[name]
        assert [by_id[i] for i in split.ids.tolist()] == split.columns["colour"].tolist()
    # same pixels for the same id, whichever split and limit produced it
    from_test = ("pretrain_train", "pretrain_val", "test")
    ids = np.concatenate([full.splits[n].ids for n in from_test])
    images = np.concatenate([full.inputs(n) for n in from_test])
    order = np.argsort(ids)
    for name in from_test:
        rows = order[np.searchsorted(ids[order], limited.splits[name].ids)]
        assert np.array_equal(limited.inputs(name), images[rows])
    # pool_val of the limited data (ids 2400..2999) lies in the full pool_train
    assert np.array_equal(limited.inputs("pool_val"), full.inputs("pool_train")[2400:3000])


def test_unknown_option_and_bad_limit_rejected() -> None:
    with pytest.raises(ValidationError):
        cm.Options(colour_sed=1)
    with pytest.raises(ValidationError):
        cm.Options(limit_test=0)


def test_unknown_split_raises(limited: DatasetBundle) -> None:
    with pytest.raises(DataError, match="pretrain_train"):
        limited.inputs("training")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (gzip.compress(b"\x00\x00\x08\x02" + b"\x00" * 20), "bad magic"),
        (gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x10" + b"\x00" * 3), "truncated"),
        (b"not gzip at all", "gzip"),
    ],
)
def test_broken_file_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, match: str
) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / name).write_bytes(content)
    monkeypatch.setattr(cm, "_path", lambda n: tmp_path / n)
    with pytest.raises(DataError, match=match) as info:
        cm._read_idx(name, 2049, ndim=1)
    assert name in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cm, "_path", lambda n: tmp_path / n)
    with pytest.raises(DataError, match="missing") as info:
        cm._read_idx("train-labels-idx1-ubyte.gz", 2049, ndim=1)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)
