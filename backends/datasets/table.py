"""Your own table: a CSV or Parquet file with an id column, the label column and attribute columns (issue 3).

Expected layout: one row per item, an integer ``id`` column (unique, no NaN) and any other columns (the spec
binarises the label and the attributes from them). Splits come either from a ``split_column`` whose values are
among pretrain_train, pretrain_val, pool_train, pool_val and test, or from seeded fractions: ``test_fraction`` of
the rows is the test set, ``pretrain_fraction`` of the rest pre-trains (0 for precomputed embeddings: the pretrain
splits are then empty, which is allowed) and ``val_fraction`` of each remaining part validates.

Model inputs are the split's ids (int64): the ``precomputed`` backbone looks embeddings up by id. To use a model
backbone on a table, extend ``load`` with a ``load_inputs`` that reads what the model needs (image paths, text).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import SPLITS, DatasetBundle, Split
from backends.errors import DataError

KIND = "table"
LAYOUT = ("a CSV or Parquet file with one row per item: an integer id column (unique, no missing values), "
          "the label column and the attribute columns")


class Options(BaseModel):
    """``[dataset.options]`` of a table spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="CSV (.csv) or Parquet (.parquet/.pq) file; relative to the current directory.")
    id_column: str = Field("id", description="Integer item ids, unique.")
    split_column: str | None = Field(None, description="Column naming each row's split; None = seeded fractions.")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of rows in the test set.")
    pretrain_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the non-test rows for pre-training.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of the pool (and of pre-training) for val.")
    split_seed: int = Field(42, ge=0, description="Seed of the fraction split.")
    group_column: str | None = Field(
        None, description="Rows that share this column's value (e.g. a patient id) stay in one split: the fractions "
        "apply to groups, and a split_column that puts one group in two splits is an error. None = rows alone.")


def load(options: Options) -> DatasetBundle:
    """Splits with ids and every column of the file; inputs are the ids (for the precomputed backbone).

    Raises:
        DataError: missing or unreadable file, missing id/split column, non-integer/NaN/duplicate ids, unknown
            split names.
    """
    path = Path(options.path).resolve()
    columns = read_table(path)
    ids = _ids(columns, options.id_column, path)
    masks = _split_masks(columns, ids, options, path)
    splits = {name: Split(name, ids[m], {k: v[m] for k, v in columns.items()}) for name, m in masks.items()}
    by_split = {name: s.ids for name, s in splits.items()}
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=_fingerprint(path, options),
                         load_inputs=lambda split: _split_ids(by_split, split))


def read_table(path: Path) -> dict[str, np.ndarray]:
    """All columns of a CSV or Parquet file as numpy arrays (strings as object arrays)."""
    if not path.is_file():
        raise DataError(f"table: file {path} not found; expected {LAYOUT}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix in (".csv", ".txt"):
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            raise DataError(f"table: {path} has suffix '{suffix}'; use .csv or .parquet ({LAYOUT})")
    except DataError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... with the parse position
        raise DataError(f"table: cannot read {path} ({e}); expected {LAYOUT}") from e
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _ids(columns: dict[str, np.ndarray], id_column: str, path: Path) -> np.ndarray:
    if id_column not in columns:
        raise DataError(f"table: {path} has no id column '{id_column}' (columns: {', '.join(columns)}); "
                        f"set dataset.options.id_column")
    raw = columns[id_column]
    n = len(raw)
    if n == 0:
        raise DataError(f"table: {path} has a header but no rows; fix: the table needs one row per item")
    if raw.dtype.kind == "f":
        bad = np.flatnonzero(np.isnan(raw))
        if len(bad):
            raise DataError(f"table: {path}: id column '{id_column}' has {len(bad)} missing value(s) of {n} rows "
                            f"(rows {_few(bad)}); every item needs an id")
        if np.any(raw != np.round(raw)):
            raise DataError(f"table: {path}: id column '{id_column}' has non-integer values; ids must be integers")
    elif raw.dtype.kind not in "iu":
        raise DataError(f"table: {path}: id column '{id_column}' is {raw.dtype} (e.g. {raw[:3].tolist()}), "
                        f"not integers; ids must be integers")
    ids = raw.astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) < n:
        dup = uniq[counts > 1]
        raise DataError(f"table: {path}: {len(dup)} duplicate id(s) in '{id_column}' among {n} rows "
                        f"(e.g. {_few(dup)}); ids must be unique")
    return ids


def _split_masks(columns: dict[str, np.ndarray], ids: np.ndarray, options: Options, path: Path
                 ) -> dict[str, np.ndarray]:
    groups = _groups(columns, options, path)
    if options.split_column is not None:
        if options.split_column not in columns:
            raise DataError(f"table: {path} has no split column '{options.split_column}' "
                            f"(columns: {', '.join(columns)})")
        names = columns[options.split_column].astype(str)
        unknown = sorted(set(np.unique(names).tolist()) - set(SPLITS))
        if unknown:
            rows = np.flatnonzero(~np.isin(names, SPLITS))
            raise DataError(f"table: {path}: split column '{options.split_column}' has unknown value(s) {unknown} "
                            f"in {len(rows)} rows (e.g. rows {_few(rows)}); use {', '.join(SPLITS)}")
        masks = {s: names == s for s in SPLITS}
        if groups is not None:
            _check_groups_within_splits(groups, names, options.group_column, path)  # type: ignore[arg-type]
        return masks
    if groups is None:
        return _fraction_masks(len(ids), options)
    uniq, inverse = np.unique(groups, return_inverse=True)
    group_masks = _fraction_masks(len(uniq), options)  # the fractions apply to groups, in sorted group order
    return {s: m[inverse.reshape(-1)] for s, m in group_masks.items()}


def _groups(columns: dict[str, np.ndarray], options: Options, path: Path) -> np.ndarray | None:
    """The group key of each row as text (None without a group_column); a missing key is an error."""
    if options.group_column is None:
        return None
    if options.group_column not in columns:
        raise DataError(f"table: {path} has no group column '{options.group_column}' (columns: {', '.join(columns)})"
                        "; fix: set dataset.options.group_column to the column that holds the patient (or group) id")
    raw = columns[options.group_column]
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) or v == "" for v in raw.tolist()],
                       dtype=bool)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise DataError(f"table: {path}: group column '{options.group_column}' is missing in {len(rows)} rows "
                        f"(rows {_few(rows)}); every row needs a group")
    return np.array([str(v) for v in raw.tolist()], dtype=object)


def _check_groups_within_splits(groups: np.ndarray, names: np.ndarray, column: str, path: Path) -> None:
    pairs = sorted(set(zip(groups.tolist(), names.tolist())))
    seen: dict[str, list[str]] = {}
    for g, s in pairs:
        seen.setdefault(g, []).append(s)
    crossing = [(g, ss) for g, ss in seen.items() if len(ss) > 1]
    if crossing:
        shown = "; ".join(f"{g} in {', '.join(ss)}" for g, ss in crossing[:3])
        raise DataError(f"table: {path}: {len(crossing)} group(s) of '{column}' appear in more than one split "
                        f"({shown}{', ...' if len(crossing) > 3 else ''}); the same patient in training and test "
                        "inflates every metric; fix: assign each group to one split in the split column")


def _fraction_masks(n: int, options: Options) -> dict[str, np.ndarray]:
    """Seeded split of ``n`` units (rows, or groups) by fractions; depends on the units' order and the seed only."""
    rng = np.random.default_rng(options.split_seed)
    perm = rng.permutation(n)
    n_test = int(round(options.test_fraction * n))
    rest = perm[n_test:]
    n_pre = int(round(options.pretrain_fraction * len(rest)))
    parts = {"test": perm[:n_test]}
    for prefix, part in (("pretrain", rest[:n_pre]), ("pool", rest[n_pre:])):
        n_val = int(round(options.val_fraction * len(part)))
        parts[f"{prefix}_val"], parts[f"{prefix}_train"] = part[:n_val], part[n_val:]
    masks = {}
    for s in SPLITS:
        m = np.zeros(n, dtype=bool)
        m[parts[s]] = True
        masks[s] = m
    return masks


def _split_ids(by_split: dict[str, np.ndarray], split: str) -> np.ndarray:
    if split not in by_split:
        raise DataError(f"table has no split '{split}'; known splits are: {', '.join(by_split)}")
    return by_split[split].astype(np.int64)


def _few(values: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:k].tolist())
    return shown + (f", ... ({len(values)} in all)" if len(values) > k else "")


def _fingerprint(path: Path, options: Options) -> str:
    """sha256 of the file's bytes and the options (not the path: moving the file keeps finished work)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    opts = options.model_dump(exclude={"path"})
    return hashlib.sha256(json.dumps({"kind": KIND, "file": digest, "options": opts}, sort_keys=True).encode()
                          ).hexdigest()
