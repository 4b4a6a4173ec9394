"""Coloured MNIST (method.md §1.1): parity task, a random colour attribute, splits exactly as the paper.

The four official MNIST IDX files ship in ``mnist/`` beside this module (see ``mnist/ATTRIBUTION.md``).
Each image gets a colour S ~ Bernoulli(0.5), independent of the digit: the digit's intensity goes in full into
channel S (0 = red, 1 = green); the other two channels get intensity × U(0,1), drawn per pixel; the background
stays black.

Randomness depends only on ``(colour_seed, item id)``, never on ``limit_train``/``limit_test``: S comes from one
stream per MNIST source split, the pixel noise from fixed-size chunks of images, each chunk with its own stream.
So a limited load is a consistent subset of the full data, and images of any subset are generated without
touching the rest.

To add a column: compute it in :func:`_columns` from the digit/colour arrays (metadata must stay cheap: no images).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import zlib
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.model_selection import train_test_split

from backends.base import DatasetBundle, Split
from backends.errors import DataError

KIND = "colored_mnist"
FILES: dict[str, tuple[str, str]] = {  # source split -> (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SOURCE_INDEX = {"train": 0, "test": 1}  # part of every RNG seed, so the two source splits get independent streams
TEST_ID_OFFSET = 60000  # MNIST-test index j has item id 60000 + j; MNIST-train index i has id i
NOISE_CHUNK = 1000  # images per noise stream: a subset only pays for the chunks it touches
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # IDX magic numbers: 0x00000803 (uint8, 3-D), 0x00000801 (uint8, 1-D)


class Options(BaseModel):
    """``[dataset.options]`` of a coloured-MNIST spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    colour_seed: int = Field(42, ge=0, description="Seed of the colour S and the per-pixel noise.")
    limit_train: int | None = Field(
        None, ge=10, le=60000, description="Use only the first N MNIST-train images (the pool); None = all 60000."
    )
    limit_test: int | None = Field(
        None, ge=10, le=10000, description="Use only the first N MNIST-test images (pre-training + test); None = all."
    )


def load(options: Options) -> DatasetBundle:
    """Splits, columns and fingerprint of coloured MNIST; images are generated lazily by ``bundle.inputs(split)``.

    Args:
        options: Colour seed and optional prefix limits.

    Returns:
        A bundle with splits pretrain_train, pretrain_val, pool_train, pool_val and test; columns ``digit``,
        ``parity`` (1 = odd) and ``colour`` (S: 0 = red, 1 = green), all int64.

    Raises:
        DataError: a data file is missing or malformed.
    """
    ids = _split_ids(options)
    splits = {name: Split(name, split_ids, _columns(split_ids, options.colour_seed)) for name, split_ids in ids.items()}
    loader = functools.partial(_split_inputs, options.colour_seed, ids)
    return DatasetBundle(kind=KIND, splits=splits, fingerprint=_fingerprint(options), load_inputs=loader)


def _split_ids(options: Options) -> dict[str, np.ndarray]:
    """Item ids per split: the paper's 60/40 then 5/6 split of MNIST-test, and the sequential 80/20 pool."""
    n_test = _source_size("test", options.limit_test)
    pre, test = train_test_split(np.arange(n_test), test_size=0.4, random_state=42)
    pre_train, pre_val = train_test_split(pre, test_size=1 / 6, random_state=42)
    n_train = _source_size("train", options.limit_train)
    cut = n_train * 4 // 5  # first 80% of the pool trains, the last 20% validates (sequential, as the paper)
    pool = np.arange(n_train, dtype=np.int64)
    offset = np.int64(TEST_ID_OFFSET)
    return {
        "pretrain_train": pre_train.astype(np.int64) + offset,
        "pretrain_val": pre_val.astype(np.int64) + offset,
        "pool_train": pool[:cut],
        "pool_val": pool[cut:],
        "test": test.astype(np.int64) + offset,
    }


def _source_size(source: str, limit: int | None) -> int:
    n = len(_labels(source))
    return n if limit is None else min(limit, n)


def _to_source(ids: np.ndarray) -> tuple[str, np.ndarray]:
    """(source split, indices into it) of item ids that all come from one source split."""
    if len(ids) and ids.min() < TEST_ID_OFFSET <= ids.max():
        raise DataError("coloured MNIST: a split mixes MNIST-train and MNIST-test ids")
    if len(ids) and ids[0] >= TEST_ID_OFFSET:
        return "test", ids - TEST_ID_OFFSET
    return "train", ids


def _columns(ids: np.ndarray, colour_seed: int) -> dict[str, np.ndarray]:
    source, index = _to_source(ids)
    digit = _labels(source)[index].astype(np.int64)
    return {"digit": digit, "parity": digit % 2, "colour": _colours(colour_seed, source)[index]}


@functools.lru_cache(maxsize=8)
def _colours(colour_seed: int, source: str) -> np.ndarray:
    """S for every image of the FULL source split (so a limit never changes an item's colour)."""
    rng = np.random.default_rng([colour_seed, SOURCE_INDEX[source], 0])
    s = rng.integers(0, 2, size=len(_labels(source)), dtype=np.int64)
    s.setflags(write=False)
    return s


def _noise(colour_seed: int, source: str, chunk: int) -> np.ndarray:
    """U(0,1) float32 of shape (NOISE_CHUNK, 2, 28, 28): the two non-foreground channels of one chunk of images."""
    rng = np.random.default_rng([colour_seed, SOURCE_INDEX[source], 1, chunk])
    return rng.random((NOISE_CHUNK, 2, 28, 28), dtype=np.float32)


def _split_inputs(colour_seed: int, ids_by_split: dict[str, np.ndarray], split: str) -> np.ndarray:
    """uint8 images N×3×28×28 of ``split``, in the split's id order."""
    if split not in ids_by_split:
        raise DataError(f"coloured MNIST has no split '{split}'; known splits are: {', '.join(ids_by_split)}")
    source, index = _to_source(ids_by_split[split])
    grey, colour = _images(source), _colours(colour_seed, source)
    out = np.empty((len(index), 3, 28, 28), dtype=np.uint8)
    chunks = index // NOISE_CHUNK
    for chunk in np.unique(chunks):
        pos = np.flatnonzero(chunks == chunk)
        noise = _noise(colour_seed, source, int(chunk))[index[pos] % NOISE_CHUNK]
        out[pos] = colourise(grey[index[pos]], colour[index[pos]], noise)
    return out


def colourise(grey: np.ndarray, colour: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Paper's ``add_colour_fg``: full intensity in channel ``colour``, intensity × noise in the other two.

    Args:
        grey: uint8 (m, 28, 28) digit intensities.
        colour: int (m,) foreground channel, 0 = red, 1 = green.
        noise: float32 (m, 2, 28, 28) in [0, 1): factors of the two other channels, in channel order.

    Returns:
        uint8 (m, 3, 28, 28). Dimmed channels are truncated to integers, so they never exceed the intensity.
    """
    m = len(grey)
    rows = np.arange(m)
    others = np.where(colour[:, None] == 0, [1, 2], [0, 2])  # the two channels that are not the foreground
    out = np.empty((m, 3, 28, 28), dtype=np.uint8)
    out[rows, colour] = grey
    out[rows[:, None], others] = (grey[:, None].astype(np.float32) * noise).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=2)
def _labels(source: str) -> np.ndarray:
    return _read_idx(FILES[source][1], _LABELS_MAGIC, ndim=1)


@functools.lru_cache(maxsize=2)
def _images(source: str) -> np.ndarray:
    images = _read_idx(FILES[source][0], _IMAGES_MAGIC, ndim=3)
    if len(images) != len(_labels(source)):
        raise DataError(f"coloured MNIST: {FILES[source][0]} has {len(images)} images but its labels file has "
                        f"{len(_labels(source))}; reinstall alloclab (pip install -e .)")
    return images


def _read_idx(name: str, magic: int, ndim: int) -> np.ndarray:
    """A read-only uint8 array from a gzipped IDX file (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS")."""
    raw = _decompress(name)
    header = 4 * (1 + ndim)
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"coloured MNIST: {_path(name)} is not an IDX file (bad magic number); "
                        "restore it from the alloclab sources")
    shape = tuple(int.from_bytes(raw[4 * (i + 1): 4 * (i + 2)], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"coloured MNIST: {_path(name)} is truncated (header says shape {shape}, "
                        f"got {len(raw) - header} bytes of data); restore it from the alloclab sources")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    return data  # frombuffer over bytes is read-only: the cached arrays cannot be mutated by callers


def _decompress(name: str) -> bytes:
    try:
        return gzip.decompress(_path(name).read_bytes())
    except FileNotFoundError as e:
        raise _missing(name) from e
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"coloured MNIST: {_path(name)} is not a valid gzip file ({e}); "
                        "restore it from the alloclab sources") from e


def _missing(name: str) -> DataError:
    return DataError(f"coloured MNIST: data file {_path(name)} is missing; reinstall alloclab (pip install -e .)")


def _path(name: str) -> Traversable:
    return resources.files("backends.datasets") / "mnist" / name


@functools.lru_cache(maxsize=8)
def _file_sha256(name: str) -> str:
    try:
        return hashlib.sha256(_path(name).read_bytes()).hexdigest()
    except FileNotFoundError as e:
        raise _missing(name) from e


def _fingerprint(options: Options) -> str:
    """sha256 of the options and of the four data files: changes exactly when the data used can change."""
    files = {name: _file_sha256(name) for pair in FILES.values() for name in pair}
    payload = json.dumps({"kind": KIND, "options": options.model_dump(), "files": files}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
