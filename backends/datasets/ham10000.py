"""HAM10000 (+ the ISIC 2018 Task 3 test set, concatenated as the paper did; method.md §1.3) from your own copy.

Nothing is shipped: set ``[dataset.options] root`` to the folder of your download. Files read there:

- ``HAM10000_metadata.csv`` (comma or tab separated; Harvard Dataverse also ships it as ``HAM10000_metadata`` or
  ``.tab``): lesion_id, image_id, dx, dx_type, age, sex, localization and, in newer releases, dataset;
- optionally ``ISIC2018_Task3_Test_GroundTruth.csv``, in either published layout: the HAM10000 columns above (the
  Dataverse release), or the challenge's one-hot layout (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC), whose
  lesion_id, age, sex, localization, dx_type and dataset come from ``isic2018_test_metadata`` (a file in the
  HAM10000 layout, joined on image_id) when you give one, else are unknown;
- images ``<image_id>.jpg``, looked up in ``image_dirs`` (default: the two HAM10000 part folders, a single
  ``HAM10000_images`` folder, the ISIC test image folders, and root itself), first folder first.

Columns of every split (the paper's names, ``final_notebooks/process_data.ipynb``):

- ``label`` (the task, int64): 1 if dx is 'mel' or 'akiec', else 0;
- ``Sex_binary``: 1 = 'male', 0 = 'female', NaN otherwise ('unknown', empty);
- ``Age_binary``: 1 if age > 50, 0 if age <= 50, NaN without an age;
- ``Dataset_binary``: 1 if dataset is 'vidir_molemax' or 'rosendahl', else 0 (an empty cell too, as the paper's
  code); NaN everywhere when ``HAM10000_metadata.csv`` has no dataset column (older releases: leave that attribute
  out of the spec);
- ``Localization_binary`` (int64): 1 = "extremity" (lower extremity, upper extremity, foot, hand, acral, unknown),
  else 0 ("central", also an empty cell, as the paper's code);
- raw: lesion_id, image_id, dx, dx_type, age (float64), sex, localization, dataset, source ('HAM10000' or
  'ISIC2018_test'). Item ids are the number in image_id (ISIC_0027419 -> 27419).

The Sex/Age/Dataset attributes are float64 (NaN where the rule gives none); ``label`` and Localization_binary
are int64.

Splits: the paper's recipe at the LESION level (rows without a lesion_id are their own lesion), so no lesion is
in two splits. A row is *incomplete* when any of lesion_id, dx, dx_type, age, sex, localization, dataset (the
columns HAM10000_metadata.csv has) is empty or its Sex/Age attribute is NaN. Pre-training gets every lesion with an
incomplete row (as the paper put every row with a NaN there) plus complete lesions in the order of
``numpy.random.RandomState(split_seed).permutation`` of the sorted lesion ids until it holds ``pretrain_images``
images (the paper's 2000 rows, ``sample(random_state=42)``), split by ``train_test_split(test_size=0.2,
random_state=split_seed)`` into train/val (the paper's 80/20). The other lesions: ``train_test_split(test_size=0.11,
random_state=split_seed)`` gives the test set; the rest is the pool. The paper split each K-sized allocation 85/15
into train/val per seed; alloclab draws allocations from a fixed pool_train and pool_val, so the pool's lesions are
split once, ``train_test_split(test_size=pool_val_fraction (0.15), random_state=split_seed)``.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import SPLITS, DatasetBundle, Split
from backends.datasets.mimic_cxr import csv_header, fingerprint, read_csv, split_keys
from backends.errors import DataError
from backends.images import ImageFiles

KIND = "ham10000"
METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata", "HAM10000_metadata.tab")
ISIC_TEST = "ISIC2018_Task3_Test_GroundTruth.csv"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
REQUIRED = COLUMNS[:-1]  # 'dataset' came with newer releases
ONE_HOT = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
POSITIVE = ("mel", "akiec")
EXTREMITY = ("lower extremity", "upper extremity", "foot", "hand", "acral", "unknown")
DATASET_ONE = ("vidir_molemax", "rosendahl")
AGE_CUTOFF = 50  # Age_binary = 1 above this age
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "ISIC2018_Task3_Test_Images",
              "ISIC2018_Task3_Test_Input", ".")
LAYOUT = (
    f"expected: root = your HAM10000 folder holding HAM10000_metadata.csv (columns {', '.join(COLUMNS)}; dataset "
    "optional), optionally ISIC2018_Task3_Test_GroundTruth.csv (the same columns, or image plus the one-hot "
    f"columns {', '.join(ONE_HOT)}), and the images <image_id>.jpg in the folders of image_dirs (default "
    f"{', '.join(IMAGE_DIRS)})"
)


class Options(BaseModel):
    """``[dataset.options]`` of a HAM10000 spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: str = Field(description="Folder of your HAM10000 download (metadata CSVs and image folders).")
    image_dirs: list[str] = Field(list(IMAGE_DIRS), min_length=1, description="Folders (relative to root) searched "
                                  "for <image_id>.jpg, first folder first.")
    isic2018_test: Literal["auto", "require", "skip"] = Field(
        "auto", description="Concatenate ISIC2018_Task3_Test_GroundTruth.csv as the paper did: when present "
        "(auto), always (require: an error without it) or never (skip).")
    isic2018_test_metadata: str | None = Field(
        None, description="For a one-hot ground-truth file: a CSV in the HAM10000 metadata layout (relative to "
        "root) with the test images' lesion_id, age, sex, localization, dx_type, dataset.")
    split_seed: int = Field(42, ge=0, description="random_state of every split (the paper's 42).")
    pretrain_images: int = Field(2000, ge=1, description="Images in the pre-training set (the paper's 2000); "
                                 "lesions with incomplete rows go there first.")
    pool_val_fraction: float = Field(0.15, gt=0, lt=1, description="Share of the pool's lesions in pool_val "
                                     "(the paper's 85/15 train/val).")
    limit: int | None = Field(None, ge=20, description="Keep a seeded subset of about this many lesions (a quick "
                              "look; pretrain_images shrinks in proportion); None = all.")


def load(options: Options) -> DatasetBundle:
    """The five lesion-level splits with the paper's columns; ``bundle.inputs(split)`` gives the JPEG files.

    Raises:
        DataError: a metadata file is missing or lacks a column (the message gives the expected layout), an
            image_id without a number or repeated, a one-hot row without exactly one class, too few lesions.
    """
    root = Path(options.root).expanduser().resolve()
    files = _files(root, options)
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    table = _table(stats, options.isic2018_test_metadata is not None)
    keys = table["lesion_key"]
    n_images = len(keys)
    target = options.pretrain_images
    if options.limit is not None:
        lesions = np.unique(keys)
        if options.limit < len(lesions):
            chosen = np.random.default_rng(options.split_seed).permutation(lesions)[:options.limit]
            keep = np.isin(keys, chosen)
            table = {k: v[keep] for k, v in table.items()}
            target = max(1, round(options.pretrain_images * int(keep.sum()) / n_images))
    parts = lesion_splits(table["lesion_key"], table["incomplete"], target, options)
    paths = _image_paths(table["image_id"], root, options.image_dirs)
    splits, files_of = {}, {}
    for name in SPLITS:
        pos = np.flatnonzero(np.isin(table["lesion_key"], parts[name]))
        columns = {k: v[pos] for k, v in table.items() if k not in ("id", "lesion_key", "incomplete")}
        splits[name] = Split(name, table["id"][pos], columns)
        files_of[name] = ImageFiles(paths[pos], table["id"][pos])
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=fingerprint(KIND, options, files, ("root",)),
                         load_inputs=functools.partial(_inputs, files_of), images=True)


def _files(root: Path, options: Options) -> list[Path]:
    """[metadata, ISIC ground truth (if used), its metadata (if given)]."""
    meta = next((root / n for n in METADATA_NAMES if (root / n).is_file()), None)
    if meta is None:
        raise DataError(f"HAM10000: {root / METADATA_NAMES[0]} not found; fix: set dataset.options.root to the folder "
                        f"of your HAM10000 download. {LAYOUT}")
    files = [meta]
    isic = root / ISIC_TEST
    if options.isic2018_test == "require" and not isic.is_file():
        raise DataError(f"HAM10000: {isic} not found (isic2018_test = 'require'); fix: put the ISIC 2018 Task 3 test "
                        f"ground truth there, or set isic2018_test = 'auto' or 'skip'. {LAYOUT}")
    if options.isic2018_test != "skip" and isic.is_file():
        files.append(isic)
        if options.isic2018_test_metadata is not None:
            extra = (root / options.isic2018_test_metadata).resolve()
            if not extra.is_file():
                raise DataError(f"HAM10000: isic2018_test_metadata {extra} not found; fix: give a CSV in the HAM10000 "
                                f"metadata layout relative to root, or remove the option. {LAYOUT}")
            files.append(extra)
    return files


@functools.lru_cache(maxsize=2)
def _table(stats: tuple[tuple[str, int, int], ...], with_isic_metadata: bool) -> dict[str, np.ndarray]:
    """All rows (HAM10000, then the ISIC test rows) with every column, cached per file version."""
    paths = [Path(s[0]) for s in stats]
    ham = read_csv(paths[0], REQUIRED, ("dataset",), {"age": "float64"}, "HAM10000", LAYOUT)
    has_dataset = "dataset" in ham
    parts = [_complete(ham, "HAM10000")]
    if len(paths) > 1:
        extra = paths[2] if with_isic_metadata and len(paths) > 2 else None
        parts.append(_complete(_isic(paths[1], extra), "ISIC2018_test"))
    rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    rows["age"] = rows["age"].astype(np.float64)
    out = {"id": _ids(rows["image_id"], paths), **rows, **binarise(rows, has_dataset)}
    lesion = rows["lesion_id"]
    out["lesion_key"] = np.array([l if l else f"image:{i}" for l, i in zip(lesion.tolist(),
                                                                          rows["image_id"].tolist())], dtype=object)
    considered = [c for c in COLUMNS if c != "image_id" and (c != "dataset" or has_dataset)]
    incomplete = np.isnan(out["Sex_binary"]) | np.isnan(out["Age_binary"])
    for c in considered:
        incomplete |= _missing(rows[c])
    out["incomplete"] = incomplete
    for array in out.values():
        array.setflags(write=False)
    return out


def _complete(rows: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Every column of COLUMNS (an absent one empty) plus ``source``."""
    n = len(rows["image_id"])
    out = {c: rows[c] if c in rows else (np.full(n, np.nan) if c == "age" else np.full(n, None, dtype=object))
           for c in COLUMNS}
    out["source"] = np.full(n, source, dtype=object)
    return out


def _isic(path: Path, metadata: Path | None) -> dict[str, np.ndarray]:
    """The ISIC 2018 Task 3 test rows in the HAM10000 layout (either published layout of the ground truth)."""
    header, _ = csv_header(path, "HAM10000", LAYOUT)
    if "image_id" in header and "dx" in header:
        return read_csv(path, ("image_id", "dx"), COLUMNS, {"age": "float64"}, "HAM10000", LAYOUT)
    gt = read_csv(path, ("image", *ONE_HOT), (), {c: "float64" for c in ONE_HOT}, "HAM10000",
                  f"{path.name} must have either the HAM10000 metadata columns or image plus {', '.join(ONE_HOT)}; "
                  + LAYOUT)
    hot = np.stack([gt[c] for c in ONE_HOT], axis=1) == 1
    bad = np.flatnonzero(hot.sum(axis=1) != 1)
    if len(bad):
        shown = ", ".join(str(gt["image"][i]) for i in bad[:3])
        raise DataError(f"HAM10000: {path}: {len(bad)} row(s) do not mark exactly one of {', '.join(ONE_HOT)} with 1 "
                        f"(e.g. {shown}); each test image needs one diagnosis")
    rows: dict[str, np.ndarray] = {"image_id": gt["image"],
                                   "dx": np.array([ONE_HOT[j].lower() for j in hot.argmax(axis=1)], dtype=object)}
    if metadata is not None:
        meta = read_csv(metadata, ("image_id",), COLUMNS, {"age": "float64"}, "HAM10000", LAYOUT)
        index = {k: i for i, k in enumerate(meta["image_id"].tolist())}
        found = np.array([index.get(k, -1) for k in rows["image_id"].tolist()], dtype=np.int64)
        for c in COLUMNS:
            if c in meta and c not in rows:
                values = meta[c][np.maximum(found, 0)] if len(meta[c]) else np.full(len(found), None, dtype=object)
                rows[c] = np.where(found >= 0, values, np.nan if c == "age" else None)
                if c == "age":
                    rows[c] = rows[c].astype(np.float64)
    return rows


def binarise(rows: dict[str, np.ndarray], has_dataset: bool) -> dict[str, np.ndarray]:
    """The paper's task and attributes (module docstring) from the raw columns."""
    sex, age = rows["sex"].tolist(), rows["age"]
    with np.errstate(invalid="ignore"):
        age_binary = np.where(np.isnan(age), np.nan, (age > AGE_CUTOFF).astype(np.float64))
    dataset = (np.array([d in DATASET_ONE for d in rows["dataset"].tolist()], dtype=np.float64) if has_dataset
               else np.full(len(age), np.nan))
    return {
        "label": np.array([d in POSITIVE for d in rows["dx"].tolist()], dtype=np.int64),
        "Sex_binary": np.array([1.0 if s == "male" else 0.0 if s == "female" else np.nan for s in sex]),
        "Age_binary": age_binary,
        "Dataset_binary": dataset,
        "Localization_binary": np.array([loc in EXTREMITY for loc in rows["localization"].tolist()], dtype=np.int64),
    }


def lesion_splits(keys: np.ndarray, incomplete: np.ndarray, pretrain_images: int, options: Options
                  ) -> dict[str, np.ndarray]:
    """Lesion keys of each split (the recipe of the module docstring)."""
    lesions, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    bad = np.zeros(len(lesions), dtype=bool)
    np.logical_or.at(bad, inverse.reshape(-1), incomplete)
    needed = max(0, pretrain_images - int(counts[bad].sum()))
    complete = np.flatnonzero(~bad)
    order = complete[np.random.RandomState(options.split_seed).permutation(len(complete))]
    take = int(np.searchsorted(np.cumsum(counts[order]), needed, side="left")) + 1 if needed else 0
    pretrain = np.sort(lesions[np.concatenate([np.flatnonzero(bad), order[:take]])])
    rest = lesions[np.sort(order[take:])]
    seed = options.split_seed
    pretrain_train, pretrain_val = split_keys(pretrain, 0.2, seed, "pre-training lesions")
    pool, test = split_keys(rest, 0.11, seed, "lesions outside pre-training")
    pool_train, pool_val = split_keys(np.sort(pool), options.pool_val_fraction, seed, "pool lesions")
    return {"pretrain_train": pretrain_train, "pretrain_val": pretrain_val, "pool_train": pool_train,
            "pool_val": pool_val, "test": test}


def _ids(image_ids: np.ndarray, paths: list[Path]) -> np.ndarray:
    """The number of each image_id (ISIC_0027419 -> 27419); DataError when one has none or repeats."""
    out = np.empty(len(image_ids), dtype=np.int64)
    for i, image in enumerate(image_ids.tolist()):
        m = re.fullmatch(r"\D*(\d+)", str(image or "").strip())
        if m is None:
            raise DataError(f"HAM10000: image_id {image!r} (row {i + 1} of {', '.join(str(p) for p in paths)}) has no "
                            "number; expected ids like ISIC_0027419")
        out[i] = int(m.group(1))
    uniq, counts = np.unique(out, return_counts=True)
    if len(uniq) < len(out):
        dup = [str(image_ids[i]) for i in np.flatnonzero(np.isin(out, uniq[counts > 1]))[:3]]
        raise DataError(f"HAM10000: image {', '.join(dup)} appears more than once in "
                        f"{', '.join(str(p) for p in paths)}; each image needs one row (is the ISIC test set listed "
                        "in HAM10000_metadata.csv too? then set isic2018_test = 'skip')")
    return out


def _image_paths(image_ids: np.ndarray, root: Path, image_dirs: list[str]) -> np.ndarray:
    """Absolute path of each image: the first folder of ``image_dirs`` that holds it, else the first existing one
    (the engine then reports it missing)."""
    folders = [(root / d).resolve() for d in image_dirs]
    listing = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as it:
                listing[folder] = {e.name for e in it}
    default = next(iter(listing), folders[0])
    out = np.empty(len(image_ids), dtype=object)
    for i, image in enumerate(image_ids.tolist()):
        name = f"{image}.jpg"
        folder = next((f for f, names in listing.items() if name in names), default)
        out[i] = str(folder / name)
    return out


def _missing(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return np.isnan(values)
    return np.array([v is None or (isinstance(v, str) and not v.strip()) for v in values.tolist()], dtype=bool)


def _inputs(files: dict[str, ImageFiles], split: str) -> ImageFiles:
    if split not in files:
        raise DataError(f"{KIND} has no split '{split}'; known splits are: {', '.join(files)}")
    return files[split]
