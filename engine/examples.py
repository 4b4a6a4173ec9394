"""Example data sets written to disk, so that the file-reading paths (``images``) can be tried without private data.

``coloured_mnist_images(out, ...)`` writes coloured-MNIST items (method.md §1.1) as PNG files plus a CSV that the
``images`` dataset reads (``specs/colored_mnist_efficientnet.toml``): the same pixels, ids, columns and splits as the
``colored_mnist`` dataset, so results on the two can be compared.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from backends.errors import DataError

EXAMPLES = ("coloured-mnist-images",)


def coloured_mnist_images(out: Path, *, limit_train: int | None, limit_test: int | None, colour_seed: int = 42,
                          splits: tuple[str, ...] = ("pretrain_train", "pretrain_val", "pool_train", "pool_val",
                                                     "test")) -> tuple[Path, int]:
    """Write ``out/images/<split>/<id>.png`` and ``out/coloured_mnist.csv`` (id, path, split, digit, parity, colour).

    Args:
        out: Folder (created). Existing files of the same names are overwritten; nothing else is touched.
        limit_train: The first N MNIST-train images (the pool), as the colored_mnist dataset's option.
        limit_test: The first N MNIST-test images (pre-training + test).
        colour_seed: The colours' seed.
        splits: Which splits to write.

    Returns:
        The CSV's path and the number of images written.
    """
    from PIL import Image

    from backends.datasets import colored_mnist

    bundle = colored_mnist.load(colored_mnist.Options(colour_seed=colour_seed, limit_train=limit_train,
                                                      limit_test=limit_test))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"example: cannot create {out} ({e.strerror}); fix: choose a writable folder") from None
    rows = []
    for split in splits:
        sp = bundle.splits[split]
        images = np.asarray(bundle.inputs(split))  # uint8 (n, 3, 28, 28)
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(sp.ids.tolist()):
            rel = f"images/{split}/{item}.png"
            Image.fromarray(images[i].transpose(1, 2, 0)).save(out / rel, optimize=False)
            rows.append({"id": item, "path": rel, "split": split, "digit": int(sp.columns["digit"][i]),
                         "parity": int(sp.columns["parity"][i]), "colour": int(sp.columns["colour"][i])})
    table = out / "coloured_mnist.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "path", "split", "digit", "parity", "colour"])
        w.writeheader()
        w.writerows(rows)
    return table, len(rows)
