"""Backbone ``precomputed``: embeddings you already have (e.g. a foundation model's), looked up by item id.

Files: a Parquet file with the id column and a list (or fixed-size list) column of floats, or a ``.npy`` (n, d)
array with a parallel ids file (``.npy``, or ``.txt``/``.csv`` with one id per line, an optional header line).
Pair it with a dataset whose model inputs are item ids (the ``table`` dataset). Nothing is trained: ``pretrain``
records the file's sha256 and ``embed`` returns the rows of the requested ids. There is no classifier head, so
``predict_proba`` raises and the pipeline must skip pre-trained-model metrics; last-layer retraining works as usual.

To support another format: add a reader returning (ids int64, vectors float32 (n, d)) to :func:`_read` by suffix.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import Checkpoint
from backends.errors import BackendError, DataError

LAYOUT = ("a Parquet file with an integer id column and a list-of-floats column, or a .npy (n, d) array with "
          "ids_path (.npy or .txt/.csv, one id per line, same order)")


class Options(BaseModel):
    """``[backbone.options]`` of the precomputed backbone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Parquet or .npy embeddings file; relative to the current directory.")
    ids_path: str | None = Field(None, description="Ids parallel to a .npy file's rows (.npy or .txt/.csv).")
    id_column: str = Field("id", description="Id column of a Parquet file.")
    vector_column: str = Field("embedding", description="List-of-floats column of a Parquet file.")


class PrecomputedBackend:
    """Embeddings from a file; see the module docstring."""

    name = "precomputed"
    modes = ("last_layer",)  # no model to fine-tune: heads on the given embeddings only
    has_head = False  # no classifier of its own: no pre-trained metrics
    Options = Options

    def __init__(self, settings: dict[str, Any], options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = Options(**options)

    def pretrain(self, inputs: Any, y: np.ndarray, val_inputs: Any, val_y: np.ndarray, *, seed: int) -> Checkpoint:
        """Train nothing: a checkpoint naming the file and its sha256 (so a changed file changes the checkpoint)."""
        path = Path(self.options.path).resolve()
        if not path.is_file():
            raise DataError(f"precomputed: embeddings file {path} not found; expected {LAYOUT}")
        state = {"path": str(path), "sha256": _sha256(path)}
        return Checkpoint(backbone=self.name, state=json.dumps(state, sort_keys=True).encode(),
                          log={"note": "precomputed: no pre-training", "seed": seed})

    def embed(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """float32 (len(inputs), d): the vectors of the ids ``inputs``, in that order."""
        ids_wanted = np.asarray(inputs).astype(np.int64).ravel()
        state = json.loads(checkpoint.state)
        ids, vectors, path = _read(self.options, state["path"])
        if _sha256(Path(path)) != state["sha256"]:
            raise DataError(f"precomputed: {path} changed since its checkpoint was made; re-run to re-register it")
        lookup = {int(i): r for r, i in enumerate(ids)}
        missing = [int(i) for i in ids_wanted if int(i) not in lookup]
        if missing:
            raise DataError(f"precomputed: {len(missing)} of {len(ids_wanted)} requested ids are missing from "
                            f"{path} ({len(ids)} rows), e.g. {missing[:5]}; embed every item of the dataset")
        return vectors[np.array([lookup[int(i)] for i in ids_wanted], dtype=np.intp)]

    @staticmethod
    def check_inputs(options: dict[str, Any], inputs: dict[str, Any]) -> None:
        """Before anything runs (``validate`` and ``run`` alike): the file exists, reads, has no NaN/inf vectors,
        ragged rows or duplicate ids, and holds every id of every split (``inputs``: split -> ids).

        Raises:
            DataError: naming the file, the problem, counts and the first offending ids.
        """
        opts = Options(**options)
        path = Path(opts.path).resolve()
        if not path.is_file():
            raise DataError(f"precomputed: embeddings file {path} not found; expected {LAYOUT}")
        ids, _, _ = _read(opts, str(path))
        have = set(np.asarray(ids).astype(np.int64).tolist())
        for split, wanted in inputs.items():
            wanted = np.asarray(wanted).astype(np.int64).ravel()
            missing = [int(i) for i in wanted if int(i) not in have]
            if missing:
                raise DataError(f"precomputed: {path} lacks {len(missing)} of the {len(wanted)} ids of split "
                                f"'{split}', e.g. {missing[:5]}; fix: embed every item of the dataset")

    def predict_proba(self, checkpoint: Checkpoint, inputs: Any) -> np.ndarray:
        """Not available: precomputed embeddings have no classifier head."""
        raise BackendError("precomputed embeddings have no classifier head: pre-trained model metrics are not "
                           "available for backbone 'precomputed' (last-layer retraining works on the embeddings)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(options: Options, path_str: str) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(path_str)
    ids_path = Path(options.ids_path).resolve() if options.ids_path else None
    return (*_read_cached(path, ids_path, options.id_column, options.vector_column, path.stat().st_mtime_ns),
            str(path))


@functools.lru_cache(maxsize=4)
def _read_cached(path: Path, ids_path: Path | None, id_column: str, vector_column: str, mtime: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        ids, vectors = _read_npy(path, ids_path)
    elif suffix in (".parquet", ".pq"):
        ids, vectors = _read_parquet(path, id_column, vector_column)
    else:
        raise DataError(f"precomputed: {path} has suffix '{suffix}'; expected {LAYOUT}")
    _check_vectors(vectors, path)
    _check_ids(ids, path)
    ids.setflags(write=False)
    vectors.setflags(write=False)
    return ids, vectors


def _read_npy(path: Path, ids_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if ids_path is None:
        raise DataError(f"precomputed: {path} is a .npy file; set backbone.options.ids_path to its ids file")
    vectors = np.load(path, allow_pickle=False)
    if vectors.ndim != 2:
        raise DataError(f"precomputed: {path} holds an array of shape {vectors.shape}; expected (n items, d)")
    if not ids_path.is_file():
        raise DataError(f"precomputed: ids file {ids_path} not found; expected one id per row of {path}")
    if ids_path.suffix.lower() == ".npy":
        ids = np.load(ids_path, allow_pickle=False).ravel()
    else:
        lines = [s.strip() for s in ids_path.read_text().splitlines() if s.strip()]
        if lines and not lines[0].lstrip("-").isdigit():
            lines = lines[1:]  # a header line
        try:
            ids = np.array([int(s) for s in lines], dtype=np.int64)
        except ValueError as e:
            raise DataError(f"precomputed: {ids_path} has a non-integer id ({e}); one integer id per line") from e
    if len(ids) != len(vectors):
        raise DataError(f"precomputed: {ids_path} has {len(ids)} ids but {path} has {len(vectors)} rows; "
                        f"they must be parallel (one id per row, same order)")
    return ids.astype(np.int64), vectors.astype(np.float32)


def _read_parquet(path: Path, id_column: str, vector_column: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError
        raise DataError(f"precomputed: cannot read {path} ({e}); expected {LAYOUT}") from e
    for col in (id_column, vector_column):
        if col not in table.column_names:
            raise DataError(f"precomputed: {path} has no column '{col}' (columns: {', '.join(table.column_names)})")
    ids = table.column(id_column).to_numpy(zero_copy_only=False)
    if ids.dtype.kind not in "iu":
        raise DataError(f"precomputed: {path}: id column '{id_column}' is {ids.dtype}, not integers")
    rows = table.column(vector_column).to_pylist()
    lengths = np.array([-1 if r is None else len(r) for r in rows])
    if len(rows) and np.any(lengths != lengths[0]):
        common = int(np.bincount(lengths[lengths >= 0]).argmax()) if np.any(lengths >= 0) else -1
        bad = np.flatnonzero(lengths != common)
        raise DataError(f"precomputed: {path}: ragged '{vector_column}': {len(bad)} of {len(rows)} rows differ from "
                        f"length {common} (rows {bad[:5].tolist()} have lengths {lengths[bad[:5]].tolist()})")
    vectors = np.array(rows, dtype=np.float32).reshape(len(rows), -1)
    return ids.astype(np.int64), vectors


def _check_vectors(vectors: np.ndarray, path: Path) -> None:
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise DataError(f"precomputed: {path}: {len(bad)} of {len(vectors)} rows have NaN or inf values (rows "
                        f"{bad[:5].tolist()}{', ...' if len(bad) > 5 else ''}); drop or re-compute them")


def _check_ids(ids: np.ndarray, path: Path) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) < len(ids):
        dup = uniq[counts > 1]
        raise DataError(f"precomputed: {path}: {len(dup)} duplicate id(s) among {len(ids)} rows "
                        f"(e.g. {dup[:5].tolist()}); one vector per item")
