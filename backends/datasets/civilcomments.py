"""CivilComments (Jigsaw Unintended Bias in Toxicity Classification, ``all_data.csv``) from a path the user gives.

The data is not shipped (its licence and size): download ``all_data.csv`` from the Kaggle competition
"jigsaw-unintended-bias-in-toxicity-classification" and set ``[dataset.options] path``. The rules are the paper's
(method.md §1.4):

- rows kept: ``identity_annotator_count > 0`` and a non-empty ``comment_text``;
- ``toxic`` (the task, int64 0/1) = ``toxicity >= 0.5``;
- ``gender``, ``orientation``, ``religion``, ``race`` (int64 0/1) = any identity column of the category
  (:data:`CATEGORIES`, the WILDS CivilComments definitions) ``>= 0.5``; a blank identity score counts as 0;
- ``year_2017`` (int64 0/1) = the year of ``created_date`` ``>= 2017``;
- ``text`` (object) = ``comment_text``. Item ids are the file's ``id`` column (must be unique).

Unlike the paper's code, which drew the test and pre-training sets independently from the full table (so they
overlap, method.md §1.4), the five splits here are one seeded PARTITION, stratified by ``toxic``, with equal texts
kept together (:mod:`backends.datasets.splits`). Default sizes follow the paper: test 5%, pre-training 4% (80/20
train/val), the pool the rest (15% of it validates, the paper's 85/15).

To add an attribute: add a category to :data:`CATEGORIES` (its identity columns become required) or a rule in
:func:`_columns`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import DatasetBundle, Split
from backends.datasets.splits import Fractions, partition, subset
from backends.errors import DataError

KIND = "civilcomments"
CATEGORIES: dict[str, tuple[str, ...]] = {  # attribute -> identity columns (WILDS civilcomments_dataset.py)
    "gender": ("male", "female", "transgender", "other_gender"),
    "orientation": ("heterosexual", "homosexual_gay_or_lesbian", "bisexual", "other_sexual_orientation"),
    "religion": ("christian", "jewish", "muslim", "hindu", "buddhist", "atheist", "other_religion"),
    "race": ("black", "white", "asian", "latino", "other_race_or_ethnicity"),
}
BASE_COLUMNS = ("id", "comment_text", "created_date", "toxicity", "identity_annotator_count")
REQUIRED = BASE_COLUMNS + tuple(c for cols in CATEGORIES.values() for c in cols)
THRESHOLD = 0.5  # toxicity and identity scores are annotator shares in [0, 1]
YEAR_CUTOFF = 2017
LAYOUT = (
    "expected: the Jigsaw Unintended Bias all_data.csv (https://www.kaggle.com/c/jigsaw-unintended-bias-in-toxicity-"
    "classification/data), a comma-separated file with a header row holding at least these columns: "
    + ", ".join(REQUIRED)
    + " (id: integer; comment_text: text; created_date: e.g. 2015-09-29 10:50:41.987077+00; toxicity, identity_"
    "annotator_count and the identity columns: numbers; other columns are ignored)"
)


class Options(BaseModel):
    """``[dataset.options]`` of a CivilComments spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Path of the Jigsaw Unintended Bias all_data.csv (user-provided).")
    split_seed: int = Field(42, ge=0, description="Seed of the split partition and of the 'limit' subset.")
    fractions: Fractions = Field(
        default_factory=lambda: Fractions(test=0.05, pretrain=0.04, pretrain_val=0.2, pool_val=0.15),
        description="Split sizes; default = the paper's (test 5%, pre-training 4% split 80/20, pool val 15%).",
    )
    limit: int | None = Field(
        None, ge=50, description="Use a seeded subset of about N kept rows, stratified by 'toxic'; None = all."
    )


def load(options: Options) -> DatasetBundle:
    """Splits, columns and fingerprint of CivilComments; ``bundle.inputs(split)`` gives the comment texts.

    Args:
        options: File path, split seed, fractions and optional size limit.

    Returns:
        A bundle with the five splits; columns ``text``, ``toxic``, ``gender``, ``orientation``, ``religion``,
        ``race``, ``year_2017`` and ``toxicity`` (the raw score, float64).

    Raises:
        DataError: the file is missing, unreadable, lacks a column (the message shows the expected layout), or has
            duplicate ids or bad values.
    """
    path = Path(options.path).expanduser().resolve()
    stat = _stat(path)
    table = _read(str(path), stat.st_size, stat.st_mtime_ns)
    keep = subset(table["toxic"], options.limit, options.split_seed)
    rows = {k: v[keep] for k, v in table.items()}
    positions = partition(rows["toxic"], rows["text"], options.fractions, options.split_seed)
    splits = {name: Split(name, rows["id"][pos], {k: v[pos] for k, v in rows.items() if k != "id"})
              for name, pos in positions.items()}
    texts = {name: split.columns["text"] for name, split in splits.items()}
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=_fingerprint(options, splits),
                         load_inputs=functools.partial(_inputs, texts))


def _stat(path: Path) -> os.stat_result:
    if not path.is_file():
        raise DataError(f"CivilComments: {path} does not exist; fix: set dataset.options.path to your all_data.csv. "
                        + LAYOUT)
    return path.stat()


@functools.lru_cache(maxsize=2)
def _read(path: str, size: int, mtime_ns: int) -> dict[str, np.ndarray]:
    """The kept rows' columns (cached per file version: size and mtime are part of the key)."""
    raw = _read_csv(path)
    annotated = np.nan_to_num(raw["identity_annotator_count"], nan=0.0) > 0
    text = raw["comment_text"]
    has_text = np.array([isinstance(t, str) and t.strip() != "" for t in text], dtype=bool)
    keep = annotated & has_text
    table = _columns({k: v[keep] for k, v in raw.items()}, path)
    if len(np.unique(table["id"])) != len(table["id"]):
        raise DataError(f"CivilComments: {path} has duplicate ids among the kept rows; ids must be unique")
    for array in table.values():
        array.setflags(write=False)
    return table


def _read_csv(path: str) -> dict[str, np.ndarray]:
    """The REQUIRED columns as numpy arrays (text columns as object arrays, None for blanks)."""
    import pyarrow as pa
    from pyarrow import csv as pacsv

    header = _header(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"CivilComments: {path} lacks column(s) {', '.join(missing)}; " + LAYOUT)
    types = {c: pa.float64() for c in REQUIRED}
    types.update({"id": pa.int64(), "comment_text": pa.string(), "created_date": pa.string()})
    try:
        table = pacsv.read_csv(
            path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(include_columns=list(REQUIRED), column_types=types,
                                                 strings_can_be_null=True),
        )
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"CivilComments: cannot parse {path} ({e}); " + LAYOUT) from e
    out = {}
    for name in REQUIRED:
        column = table.column(name)
        if name in ("comment_text", "created_date"):
            out[name] = np.asarray(column.to_pylist(), dtype=object)
        elif name == "id":
            if column.null_count:
                raise DataError(f"CivilComments: {path} has {column.null_count} rows without an id")
            out[name] = column.to_numpy().astype(np.int64)
        else:
            out[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
    return out


def _header(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"CivilComments: cannot read {path} ({e}); " + LAYOUT) from e
    return [c.strip().strip('"') for c in first.lstrip("\ufeff").rstrip("\r\n").split(",")]


def _toxic(toxicity: np.ndarray) -> np.ndarray:
    """Y = toxicity >= 0.5 as int64; a blank toxicity stays missing (a float column with NaN there), never "not
    toxic": the spec's ``missing`` rule then stops the run or drops those comments."""
    tox = np.asarray(toxicity, dtype=np.float64)
    blank = np.isnan(tox)
    if not blank.any():
        return (tox >= THRESHOLD).astype(np.int64)
    return np.where(blank, np.nan, (tox >= THRESHOLD).astype(np.float64))


def _columns(raw: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """The dataset's columns from the kept raw rows (method.md §1.4 rules)."""
    columns = {"id": raw["id"], "text": raw["comment_text"],
               "toxic": _toxic(raw["toxicity"]),
               "toxicity": raw["toxicity"]}
    for attribute, identities in CATEGORIES.items():
        scores = np.stack([np.nan_to_num(raw[c], nan=0.0) for c in identities], axis=1)
        columns[attribute] = (scores >= THRESHOLD).any(axis=1).astype(np.int64)
    columns["year_2017"] = (_years(raw["created_date"], path) >= YEAR_CUTOFF).astype(np.int64)
    return columns


def _years(dates: np.ndarray, path: str) -> np.ndarray:
    """Year of each ``created_date`` (its first four characters, as in '2015-09-29 10:50:41.987077+00')."""
    try:
        return np.array([int(d[:4]) for d in dates], dtype=np.int64)
    except (TypeError, ValueError) as e:
        bad = next(d for d in dates if not (isinstance(d, str) and d[:4].isdigit()))
        raise DataError(f"CivilComments: {path}: created_date {bad!r} does not start with a year; " + LAYOUT) from e


def _inputs(texts: dict[str, np.ndarray], split: str) -> np.ndarray:
    if split not in texts:
        raise DataError(f"CivilComments has no split '{split}'; known splits are: {', '.join(texts)}")
    return texts[split]


def _fingerprint(options: Options, splits: dict[str, Split]) -> str:
    """sha256 of the options (without the path: moving the file changes nothing) and of the data actually used."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"kind": KIND, "options": options.model_dump(exclude={"path"})}, sort_keys=True).encode())
    for name in sorted(splits):
        split = splits[name]
        digest.update(name.encode() + split.ids.tobytes())
        for column in sorted(split.columns):
            values = split.columns[column]
            data = "\x1f".join(values.tolist()).encode() if values.dtype == object else values.tobytes()
            digest.update(column.encode() + data)
    return digest.hexdigest()
