"""backends.datasets.table and backends.precomputed on small files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import backends
import backends.datasets
from backends.base import SPLITS
from backends.datasets import table
from backends.errors import BackendError, DataError
from backends.precomputed import PrecomputedBackend

N, D = 600, 16


def _frame(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1000, 1000 + N)).astype(np.int64)
    group = rng.integers(0, 2, N)
    return {"id": ids, "label": rng.integers(0, 2, N), "sex": np.where(group == 1, "F", "M"),
            "age": rng.uniform(20, 90, N)}


def _vectors(frame: dict[str, np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(N, D)) + (frame["sex"] == "F")[:, None] * 0.5).astype(np.float32)


def _write_csv(path: Path, frame: dict[str, np.ndarray]) -> Path:
    import pyarrow.csv as pcsv

    pcsv.write_csv(pa.table(frame), path)
    return path


def _write_parquet_vectors(path: Path, ids: np.ndarray, vectors: list) -> Path:
    pq.write_table(pa.table({"id": ids, "embedding": vectors}), path)
    return path


def test_registries_list_the_new_kinds() -> None:
    assert backends.datasets.get("table") is table
    assert backends.backend_class("precomputed") is PrecomputedBackend


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_load_fraction_splits(tmp_path: Path, fmt: str) -> None:
    frame = _frame()
    path = tmp_path / f"t.{fmt}"
    _write_csv(path, frame) if fmt == "csv" else pq.write_table(pa.table(frame), path)
    bundle = table.load(table.Options(path=str(path), test_fraction=0.25, pretrain_fraction=0.2))
    sizes = {s: len(bundle.splits[s]) for s in SPLITS}
    assert sum(sizes.values()) == N and sizes["test"] == 150 and sizes["pretrain_train"] + sizes["pretrain_val"] == 90
    all_ids = np.concatenate([bundle.splits[s].ids for s in SPLITS])
    assert len(np.unique(all_ids)) == N  # disjoint and complete
    test = bundle.splits["test"]
    assert set(test.columns) == {"id", "label", "sex", "age"} and test.ids.dtype == np.int64
    row = int(np.flatnonzero(frame["id"] == test.ids[0])[0])
    assert test.columns["sex"][0] == frame["sex"][row] and test.columns["age"][0] == pytest.approx(frame["age"][row])
    np.testing.assert_array_equal(bundle.inputs("test"), test.ids)
    again = table.load(table.Options(path=str(path), test_fraction=0.25, pretrain_fraction=0.2))
    np.testing.assert_array_equal(again.splits["test"].ids, test.ids)
    assert again.fingerprint == bundle.fingerprint
    other = table.load(table.Options(path=str(path), test_fraction=0.25, pretrain_fraction=0.2, split_seed=1))
    assert not np.array_equal(other.splits["test"].ids, test.ids) and other.fingerprint != bundle.fingerprint


def test_default_has_empty_pretrain_splits_and_split_column(tmp_path: Path) -> None:
    frame = _frame()
    bundle = table.load(table.Options(path=str(_write_csv(tmp_path / "t.csv", frame))))
    assert len(bundle.splits["pretrain_train"]) == len(bundle.splits["pretrain_val"]) == 0
    frame["split"] = np.array(["pool_train", "pool_val", "test"])[np.arange(N) % 3]
    bundle = table.load(table.Options(path=str(_write_csv(tmp_path / "s.csv", frame)), split_column="split"))
    assert len(bundle.splits["test"]) == 200 and len(bundle.splits["pretrain_train"]) == 0


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f.pop("id"), r"no id column 'id'"),
        (lambda f: f.__setitem__("id", np.r_[f["id"][:-2], f["id"][:2]]), r"2 duplicate id\(s\) .*600 rows"),
        (lambda f: f.__setitem__("id", np.r_[np.nan, f["id"][1:].astype(float)]), r"1 missing value.*rows 0"),
        (lambda f: f.__setitem__("id", f["id"] + 0.5), "non-integer"),
        (lambda f: f.__setitem__("id", np.array([f"x{i}" for i in range(N)])), "not integers"),
    ],
)
def test_table_errors(tmp_path: Path, edit, match: str) -> None:  # noqa: ANN001
    frame = _frame()
    edit(frame)
    path = _write_csv(tmp_path / "bad.csv", frame)
    with pytest.raises(DataError, match=match) as e:
        table.load(table.Options(path=str(path)))
    assert str(path) in str(e.value)


def test_table_missing_file_and_split_values(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found; expected a CSV or Parquet file"):
        table.load(table.Options(path=str(tmp_path / "nope.csv")))
    frame = _frame()
    frame["split"] = np.where(np.arange(N) < 3, "train", "test")
    with pytest.raises(DataError, match=r"unknown value\(s\) \['train'\] in 3 rows"):
        table.load(table.Options(path=str(_write_csv(tmp_path / "t.csv", frame)), split_column="split"))


def _backend(**options: str) -> PrecomputedBackend:
    return PrecomputedBackend({}, options)


@pytest.mark.parametrize("fmt", ["parquet", "npy+npy", "npy+txt"])
def test_backend_contract(tmp_path: Path, fmt: str) -> None:
    frame = _frame()
    vectors = _vectors(frame)
    if fmt == "parquet":
        be = _backend(path=str(_write_parquet_vectors(tmp_path / "e.parquet", frame["id"], vectors.tolist())))
    else:
        np.save(tmp_path / "e.npy", vectors)
        if fmt == "npy+npy":
            np.save(tmp_path / "ids.npy", frame["id"])
            ids_path = tmp_path / "ids.npy"
        else:
            ids_path = tmp_path / "ids.txt"
            ids_path.write_text("id\n" + "\n".join(str(i) for i in frame["id"]) + "\n")
        be = _backend(path=str(tmp_path / "e.npy"), ids_path=str(ids_path))
    ckpt = be.pretrain(None, np.zeros(0), None, np.zeros(0), seed=0)
    assert ckpt.log["note"] == "precomputed: no pre-training"
    want = frame["id"][::-7][:50]
    out = be.embed(ckpt, want)
    assert out.shape == (50, D) and out.dtype == np.float32
    rows = [int(np.flatnonzero(frame["id"] == i)[0]) for i in want]
    np.testing.assert_array_equal(out, vectors[rows])
    np.testing.assert_array_equal(be.embed(ckpt, want), out)
    assert be.pretrain(None, np.zeros(0), None, np.zeros(0), seed=1).state == ckpt.state
    with pytest.raises(BackendError, match="no classifier head"):
        be.predict_proba(ckpt, want)


def test_table_and_precomputed_together(tmp_path: Path) -> None:
    frame = _frame()
    bundle = table.load(table.Options(path=str(_write_csv(tmp_path / "t.csv", frame))))
    be = _backend(path=str(_write_parquet_vectors(tmp_path / "e.parquet", frame["id"], _vectors(frame).tolist())))
    ckpt = be.pretrain(None, np.zeros(0), None, np.zeros(0), seed=0)
    z = be.embed(ckpt, bundle.inputs("test"))
    assert z.shape == (len(bundle.splits["test"]), D)


def test_backend_errors(tmp_path: Path) -> None:
    frame = _frame()
    vectors = _vectors(frame)
    be = _backend(path=str(_write_parquet_vectors(tmp_path / "e.parquet", frame["id"], vectors.tolist())))
    ckpt = be.pretrain(None, np.zeros(0), None, np.zeros(0), seed=0)
    with pytest.raises(DataError, match=r"3 of 5 requested ids are missing from .*e\.parquet \(600 rows\)"):
        be.embed(ckpt, np.r_[frame["id"][:2], [1, 2, 3]])

    bad = vectors.copy()
    bad[[4, 9]] = np.nan
    be = _backend(path=str(_write_parquet_vectors(tmp_path / "nan.parquet", frame["id"], bad.tolist())))
    with pytest.raises(DataError, match=r"2 of 600 rows have NaN or inf values \(rows \[4, 9\]"):
        be.embed(be.pretrain(None, None, None, None, seed=0), frame["id"][:3])

    ragged = vectors.tolist()
    ragged[7] = ragged[7][:-1]
    be = _backend(path=str(_write_parquet_vectors(tmp_path / "rag.parquet", frame["id"], ragged)))
    with pytest.raises(DataError, match=r"ragged 'embedding': 1 of 600 rows differ from length 16 \(rows \[7\] have "
                                        r"lengths \[15\]\)"):
        be.embed(be.pretrain(None, None, None, None, seed=0), frame["id"][:3])

    np.save(tmp_path / "e.npy", vectors)
    np.save(tmp_path / "short.npy", frame["id"][:-1])
    be = _backend(path=str(tmp_path / "e.npy"), ids_path=str(tmp_path / "short.npy"))
    with pytest.raises(DataError, match="has 599 ids but .*e.npy has 600 rows"):
        be.embed(be.pretrain(None, None, None, None, seed=0), frame["id"][:3])

    with pytest.raises(DataError, match="not found"):
        _backend(path=str(tmp_path / "missing.parquet")).pretrain(None, None, None, None, seed=0)
