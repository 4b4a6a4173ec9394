"""Image files as model inputs: decoding, a content-keyed uint8 cache, and the per-batch transform.

Image datasets (``images``, ``mimic_cxr``, ``ham10000``) hand the engine an :class:`ImageFiles` (paths, indexable
like an array). The engine turns it into a uint8 N×C×H×W array once per dataset and geometry with :func:`decode`
(Pillow; DICOM through pydicom when installed), cached as a ``.npy`` file beside the database that workers
memory-map, so trials never decode images again. The cache key hashes the geometry and every file's path, size and
modification time; the array's SHA-256 is recorded with it and checked when the driver opens it, and a cache that
does not match is rebuilt.

What happens where (``[backbone.transform]`` in a spec):
- *geometry* (``resize``, ``crop``, ``channels``) is applied once, when decoding: it is deterministic;
- *normalisation* and *training augmentations* (``flip``, ``random_resized_crop``) are applied by the backend to
  each float batch (:class:`BatchTransform`): augmentations only while training, drawn from torch's global RNG,
  which the backends seed.

16-bit greyscale images and DICOM pixel data are windowed per image to 0–255 (min–max); MONOCHROME1 DICOM is
inverted so that bright means dense everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backends.errors import DataError

if TYPE_CHECKING:  # torch stays out of `import backends.images` until a batch is transformed
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights expect these (RGB, on [0, 1] inputs)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = 1  # bump when decoding changes what a cached array holds
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True, eq=False)
class ImageFiles:
    """The image files of one split, parallel to its item ids: ``files[idx]`` is the subset (int64 positions)."""

    paths: np.ndarray  # object array of absolute path strings
    ids: np.ndarray  # int64 item ids (for error messages)

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def __getitem__(self, idx: Any) -> "ImageFiles":
        return ImageFiles(self.paths[idx], self.ids[idx])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)


@dataclass(frozen=True)
class Geometry:
    """What decoding does to each image: resize (shorter side to an int, or exact [h, w]), centre crop, channels."""

    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    channels: int = 3

    @classmethod
    def of(cls, transform: dict[str, Any] | None) -> "Geometry":
        t = transform or {}
        tup = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        return cls(tup(t.get("resize")), tup(t.get("crop")), int(t.get("channels") or 3))

    def key(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "channels": self.channels, "format": CACHE_FORMAT}


def missing_files(files: ImageFiles) -> list[tuple[int, str]]:
    """(item id, path) of every file that does not exist (or is not a file)."""
    return [(int(i), str(p)) for i, p in zip(files.ids, files.paths) if not os.path.isfile(p)]


def check_present(files: ImageFiles, where: str) -> None:
    """DataError naming the first few missing files and their count; nothing if all exist."""
    missing = missing_files(files)
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(files)} image files are missing "
                        f"({_few(missing)}); fix: correct the paths (dataset.options.root and the path column) "
                        "or remove those rows")


def read_image(path: str, geometry: Geometry) -> np.ndarray:
    """One image as uint8 (C, H, W) after the geometry. Raises whatever the decoder raises for a bad file."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    if path.lower().endswith(DICOM_SUFFIXES):
        img = Image.fromarray(_dicom_pixels(path))
    else:
        with Image.open(path) as opened:
            opened.load()  # decodes fully: a truncated file fails here, not later
            img = opened.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit greyscale: window per image
        img = Image.fromarray(_window(np.asarray(img)))
    img = img.convert("RGB" if geometry.channels == 3 else "L")
    if geometry.resize is not None:
        size = list(geometry.resize) if isinstance(geometry.resize, tuple) else [geometry.resize]
        img = F.resize(img, size, antialias=True)
    if geometry.crop is not None:
        crop = list(geometry.crop) if isinstance(geometry.crop, tuple) else [geometry.crop, geometry.crop]
        img = F.center_crop(img, crop)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _window(a: np.ndarray) -> np.ndarray:
    """Per-image min–max scaling of a high-bit-depth image to uint8."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _dicom_pixels(path: str) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise DataError(f"{path} is a DICOM file and pydicom is not installed; fix: pip install -e '.[dicom]' "
                        "(or convert the images to PNG)") from None
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 3 and pixels.shape[-1] != 3:  # multi-frame: the first frame
        pixels = pixels[0]
    if pixels.ndim == 3:
        return pixels.astype(np.uint8)
    out = _window(pixels)
    return 255 - out if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1" else out


def cache_key(files: ImageFiles, geometry: Geometry) -> str:
    """Hash of the geometry and each file's path, size and modification time (in order)."""
    h = hashlib.sha256(json.dumps(geometry.key(), sort_keys=True).encode())
    for p in files.paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:32]


def decode(files: ImageFiles, geometry: Geometry, cache_dir: str | Path | None = None, *, where: str = "images",
           verify: bool = False, threads: int | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) images of ``files`` after ``geometry``; memory-mapped from ``cache_dir`` when given.

    Args:
        files: The split's files.
        geometry: Resize, crop and channels (all images must come out the same size: give ``resize`` as [h, w] or
            a ``crop``).
        cache_dir: Folder of the cache (created); None decodes in memory.
        where: Names the dataset in errors.
        verify: Check the cached array's SHA-256 (the driver does, once per run; workers then trust it).
        threads: Decoding threads (default: the CPUs this process may use).

    Raises:
        DataError: missing or unreadable files (the first few and the count), or images of different sizes.
    """
    if len(files) == 0:
        return np.zeros((0, geometry.channels, 1, 1), dtype=np.uint8)
    if cache_dir is None:
        return _decode_all(files, geometry, where, threads)
    cache_dir = Path(cache_dir)
    key = cache_key(files, geometry)
    data, meta = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
    cached = _open_cached(data, meta, verify)
    if cached is not None:
        return cached
    if meta.exists() or data.exists():
        print(f"alloclab: {where}: the decoded-image cache {data.name} does not match its record; rebuilding it",
              file=sys.stderr)
    array = _decode_all(files, geometry, where, threads)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = data.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    digest = _sha256_file(tmp)
    os.replace(tmp, data)
    record = {"shape": list(array.shape), "sha256": digest, "geometry": geometry.key(), "n": len(files)}
    tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record))
    os.replace(tmp_meta, meta)  # the record is written last: a cache without one is not trusted
    return np.load(data, mmap_mode="r")


def _open_cached(data: Path, meta: Path, verify: bool) -> np.ndarray | None:
    try:
        record = json.loads(meta.read_text())
        array = np.load(data, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if list(array.shape) != record.get("shape") or array.dtype != np.uint8:
        return None
    if verify and _sha256_file(data) != record.get("sha256"):
        return None
    return array


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _decode_all(files: ImageFiles, geometry: Geometry, where: str, threads: int | None) -> np.ndarray:
    check_present(files, where)
    n = len(files)
    threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

    def one(i: int) -> np.ndarray | str:
        try:
            return read_image(str(files.paths[i]), geometry)
        except DataError:
            raise
        except Exception as e:  # Pillow raises OSError, UnidentifiedImageError, ValueError, ...
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, range(n)))
    bad = [(int(files.ids[i]), str(files.paths[i]), r) for i, r in enumerate(results) if isinstance(r, str)]
    if bad:
        shown = "; ".join(f"id {i}: {p} ({why})" for i, p, why in bad[:3])
        raise DataError(f"{where}: {len(bad)} of {n} image files cannot be decoded ({shown}"
                        f"{', ...' if len(bad) > 3 else ''}); fix: replace or remove those files")
    shapes = {r.shape for r in results}  # type: ignore[union-attr]
    if len(shapes) > 1:
        raise DataError(f"{where}: images come out in {len(shapes)} different sizes (e.g. "
                        f"{', '.join(str(s) for s in sorted(shapes)[:3])}); fix: set backbone.transform.resize to "
                        "[height, width], or add backbone.transform.crop")
    out = np.empty((n, *next(iter(shapes))), dtype=np.uint8)
    for i, r in enumerate(results):
        out[i] = r
    return out


def _few(missing: list[tuple[int, str]], k: int = 3) -> str:
    shown = "; ".join(f"id {i}: {p}" for i, p in missing[:k])
    return shown + (f"; ... ({len(missing)} in all)" if len(missing) > k else "")


class BatchTransform:
    """uint8 (n, C, H, W) batches → float32, normalised; with ``train=True`` also the training augmentations.

    Args:
        transform: The spec's ``[backbone.transform]`` (or None: scale to [0, 1] only).
        imagenet: The backbone starts from ImageNet weights: ``normalize = "auto"`` then means ImageNet's mean/std.
        default: The backbone's own (mean, std) for ``normalize = "auto"`` (e.g. a transformers model's image
            processor config); takes precedence over ``imagenet``.
    """

    def __init__(self, transform: dict[str, Any] | None, *, imagenet: bool,
                 default: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        t = transform or {}
        norm = t.get("normalize", "auto")
        channels = int(t.get("channels") or 3)
        if t.get("mean") is not None:
            mean, std = tuple(t["mean"]), tuple(t["std"])
        elif norm == "auto" and default is not None:
            mean, std = tuple(default[0]), tuple(default[1])
        elif norm == "imagenet" or (norm == "auto" and imagenet):
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            if channels == 1:  # a one-channel input to an RGB-trained stem: the channels' mean
                mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        else:
            mean, std = None, None
        self.mean, self.std = mean, std
        self.flip = bool(t.get("flip", False))
        rrc = t.get("random_resized_crop")
        self.rrc_scale = None if rrc is None else (float(rrc[0]), float(rrc[1]))

    @property
    def augments(self) -> bool:
        return self.flip or self.rrc_scale is not None

    def __call__(self, batch: "torch.Tensor", *, train: bool = False) -> "torch.Tensor":
        import torch

        x = batch.float().div_(255.0)
        if train and self.augments:
            x = self._augment(x)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _augment(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch
        from torchvision.transforms import v2

        if self.rrc_scale is not None:  # per image (a v2 transform on a batch would crop every image alike)
            crop = v2.RandomResizedCrop(tuple(x.shape[-2:]), scale=self.rrc_scale, antialias=True)
            x = torch.stack([crop(img) for img in x])
        if self.flip:
            flip = torch.rand(len(x), device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x
