"""RedditBias (Barikeri et al., ACL 2021): real Reddit comments labelled biased / not biased, five target groups.

The five annotated CSVs ship gzipped in ``redditbias/`` beside this module (MIT; see ``redditbias/ATTRIBUTION.md``).
The text is offensive by design.

Cleaning: the label is the column ``bias_sent``; only rows whose label is exactly ``"0"`` or ``"1"`` are kept (the
files also hold blanks, ``"2"`` and annotator notes), which leaves 11,492 comments. Columns of every split:

- ``text`` (str, object array): the comment;
- ``biased`` (int64 0/1): the task, ``bias_sent``;
- ``target`` (str): the file's group, one of :data:`TARGETS`;
- ``gender``, ``orientation``, ``race``, ``religion`` (int64 0/1): one-vs-rest membership of the target's dimension
  (``religion`` = jews + muslims).

Item ids are ``file index × 1,000,000 + record index``: stable and unique (the files' own ``id`` column is missing or
blank in two of them). Splits are a seeded partition stratified by file, with equal texts kept together
(:mod:`backends.datasets.splits`).

To add a target group: add its file to :data:`FILES` (the order fixes the ids: append, never insert) and its
dimension to :data:`DIMENSIONS`.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import zlib
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import DatasetBundle, Split
from backends.datasets.splits import Fractions, partition, subset
from backends.errors import DataError

KIND = "redditbias"
FILES: tuple[tuple[str, str], ...] = (  # (target group, file); the index is part of the item id
    ("female", "reddit_comments_gender_female_processed_phrase_annotated.csv.gz"),
    ("lgbtq", "reddit_comments_orientation_lgbtq_processed_phrase_annotated.csv.gz"),
    ("black", "reddit_comments_race_black_processed_phrase_annotated.csv.gz"),
    ("jews", "reddit_comments_religion1_jews_processed_phrase_annotated.csv.gz"),
    ("muslims", "reddit_comments_religion2_muslims_processed_phrase_annotated.csv.gz"),
)
TARGETS: tuple[str, ...] = tuple(t for t, _ in FILES)
DIMENSIONS: dict[str, tuple[str, ...]] = {  # one-vs-rest attribute -> the target groups in group 1
    "gender": ("female",),
    "orientation": ("lgbtq",),
    "race": ("black",),
    "religion": ("jews", "muslims"),
}
LABEL_COLUMN, TEXT_COLUMN = "bias_sent", "comment"
ID_STRIDE = 1_000_000  # item id = file index * ID_STRIDE + record index


class Options(BaseModel):
    """``[dataset.options]`` of a RedditBias spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split_seed: int = Field(42, ge=0, description="Seed of the split partition and of the 'limit' subset.")
    fractions: Fractions = Field(default_factory=Fractions, description="Split sizes (test, pretrain, ...).")
    limit: int | None = Field(
        None, ge=50, description="Use a seeded subset of about N comments, stratified by file (fast tests); None = all."
    )


@functools.lru_cache(maxsize=1)
def labelled() -> dict[str, np.ndarray]:
    """Every labelled comment of the five files, in file then record order (read-only arrays).

    Returns:
        ``id`` (int64), ``text`` (object), ``biased`` (int64) and ``target`` (object) arrays.
    """
    ids, texts, labels, targets = [], [], [], []
    for index, (target, name) in enumerate(FILES):
        for record, row in enumerate(_records(name)):
            if row[LABEL_COLUMN] in ("0", "1"):
                ids.append(index * ID_STRIDE + record)
                texts.append(row[TEXT_COLUMN])
                labels.append(int(row[LABEL_COLUMN]))
                targets.append(target)
    table = {"id": np.asarray(ids, dtype=np.int64), "text": np.asarray(texts, dtype=object),
             "biased": np.asarray(labels, dtype=np.int64), "target": np.asarray(targets, dtype=object)}
    for array in table.values():
        array.setflags(write=False)
    return table


def load(options: Options) -> DatasetBundle:
    """Splits, columns and fingerprint of RedditBias; ``bundle.inputs(split)`` gives the texts.

    Args:
        options: Split seed, fractions and optional size limit.

    Returns:
        A bundle with the five splits; columns ``text``, ``biased``, ``target``, ``gender``, ``orientation``,
        ``race`` and ``religion``.

    Raises:
        DataError: a data file is missing or malformed.
    """
    table = labelled()
    keep = subset(table["target"], options.limit, options.split_seed)
    rows = {k: v[keep] for k, v in table.items()}
    positions = partition(rows["target"], rows["text"], options.fractions, options.split_seed)
    splits = {name: Split(name, rows["id"][pos], _columns(rows, pos)) for name, pos in positions.items()}
    texts = {name: split.columns["text"] for name, split in splits.items()}
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=_fingerprint(options),
                         load_inputs=functools.partial(_inputs, texts))


def _columns(rows: dict[str, np.ndarray], pos: np.ndarray) -> dict[str, np.ndarray]:
    target = rows["target"][pos]
    columns = {"text": rows["text"][pos], "biased": rows["biased"][pos], "target": target}
    for dimension, groups in DIMENSIONS.items():
        columns[dimension] = np.isin(target, groups).astype(np.int64)
    return columns


def _inputs(texts: dict[str, np.ndarray], split: str) -> np.ndarray:
    if split not in texts:
        raise DataError(f"RedditBias has no split '{split}'; known splits are: {', '.join(texts)}")
    return texts[split]


def _records(name: str) -> list[dict[str, str]]:
    """The CSV records of one file (header excluded), as dicts; DataError if the label or text column is missing."""
    reader = csv.DictReader(io.StringIO(_decode(_raw(name)), newline=""))
    missing = {LABEL_COLUMN, TEXT_COLUMN} - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"RedditBias: {_path(name)} lacks column(s) {sorted(missing)} (header: {reader.fieldnames}); "
                        "restore it from the alloclab sources")
    return list(reader)


def _decode(raw: bytes) -> str:
    """UTF-8, or Mac Roman for a file that is not valid UTF-8 (the jews file's one stray byte; ATTRIBUTION.md)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("mac_roman")


@functools.lru_cache(maxsize=len(FILES))
def _raw(name: str) -> bytes:
    try:
        return gzip.decompress(_path(name).read_bytes())
    except FileNotFoundError as e:
        raise DataError(f"RedditBias: data file {_path(name)} is missing; reinstall alloclab (pip install -e .)") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"RedditBias: {_path(name)} is not a valid gzip file ({e}); "
                        "restore it from the alloclab sources") from e


def _path(name: str) -> Traversable:
    return resources.files("backends.datasets") / "redditbias" / name


def _fingerprint(options: Options) -> str:
    """sha256 of the options and of the decompressed files: changes exactly when the data used can change."""
    files = {name: hashlib.sha256(_raw(name)).hexdigest() for _, name in FILES}
    payload = json.dumps({"kind": KIND, "options": options.model_dump(), "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
