"""Your own images: a CSV or Parquet table (ids, label and attribute columns, as ``table``) plus a column of image
paths resolved against ``root`` (issue 11).

Any format Pillow reads (PNG, JPEG, TIFF, 16-bit greyscale) and DICOM (``.dcm``, with ``pip install -e '.[dicom]'``).
Splits as ``table``: a split column, or seeded fractions; with ``group_column`` (e.g. a patient id) the fractions
apply to groups so that no patient is in two splits, and a split column that puts a patient in two splits is an
error.

Model inputs are :class:`backends.images.ImageFiles`; the engine decodes them once into a uint8 cache beside the
database, with the geometry of ``[backbone.transform]`` (:mod:`backends.images`). Paths must stay inside ``root``:
a table from someone else cannot make alloclab read files elsewhere (``..`` or absolute paths outside ``root`` are
an error).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import Field

from backends.base import DatasetBundle, Split
from backends.datasets import table
from backends.errors import DataError
from backends.images import ImageFiles

KIND = "images"


class Options(table.Options):
    """``[dataset.options]`` of an images spec: the table's options plus where the images are."""

    root: str | None = Field(None, description="Folder the image paths are relative to; None = the table's folder. "
                             "Every image must lie inside it.")
    path_column: str = Field("path", description="Column with each item's image path (relative to root).")


def load(options: Options) -> DatasetBundle:
    """Splits with ids and every column of the table; inputs are the image files of each split.

    Raises:
        DataError: the table problems of ``table.load``; a missing path column; paths that are empty or leave
            ``root``. (Missing or unreadable image files are reported by the engine before any training.)
    """
    base = table.load(options)
    path = Path(options.path).resolve()
    root = Path(options.root).resolve() if options.root is not None else path.parent
    if not root.is_dir():
        raise DataError(f"images: root folder {root} not found; fix: set dataset.options.root to the folder that "
                        "holds the images")
    files: dict[str, ImageFiles] = {}
    bad: list[tuple[int, str]] = []
    for name, split in base.splits.items():
        if options.path_column not in split.columns:
            raise DataError(f"images: {path} has no path column '{options.path_column}' (columns: "
                            f"{', '.join(split.columns)}); fix: set dataset.options.path_column")
        files[name] = ImageFiles(_resolve(split.columns[options.path_column], split.ids, root, bad), split.ids)
    if bad:
        bad.sort()
        shown = ", ".join(f"id {i}: '{t}'" for i, t in bad[:3])
        raise DataError(f"images: {path}: {len(bad)} path(s) are empty or lead outside root {root} ({shown}"
                        f"{', ...' if len(bad) > 3 else ''}); fix: give paths relative to root, or set "
                        "dataset.options.root to a folder that contains them")
    splits = {name: Split(name, s.ids, s.columns) for name, s in base.splits.items()}
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=_fingerprint(base.fingerprint, options),
                         load_inputs=lambda split: _files(files, split), images=True)


def _resolve(raw: np.ndarray, ids: np.ndarray, root: Path, bad: list[tuple[int, str]]) -> np.ndarray:
    """Absolute paths inside ``root``; (id, text) of each empty or escaping path is appended to ``bad``."""
    out = np.empty(len(raw), dtype=object)
    for i, (item, value) in enumerate(zip(ids.tolist(), raw.tolist())):
        text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
        full = (root / text).resolve() if text else None
        if full is None or not full.is_relative_to(root):
            bad.append((item, text))
            continue
        out[i] = str(full)
    return out


def _files(files: dict[str, ImageFiles], split: str) -> ImageFiles:
    if split not in files:
        raise DataError(f"images has no split '{split}'; known splits are: {', '.join(files)}")
    return files[split]


def _fingerprint(table_fingerprint: str, options: Options) -> str:
    """The table's fingerprint (its bytes and options) and the image options; the images' own state is in the
    decoded-image cache key (:func:`backends.images.cache_key`)."""
    extra = options.model_dump(include={"path_column"})
    return hashlib.sha256(json.dumps({"kind": KIND, "table": table_fingerprint, "options": extra},
                                     sort_keys=True).encode()).hexdigest()
