"""Seeded, stratified partitions of a table into the five splits of :data:`backends.base.SPLITS`.

Used by the text datasets (RedditBias, CivilComments). Rows that share a ``key`` (e.g. the same comment text) always
land in the same split, so a duplicated text is never both trained on and tested. The split sizes are fractions of
each stratum, so every stratum (a source file, a label) keeps its share in every split.

To add a split rule (e.g. grouped by author), compute the grouping ``keys`` in the dataset module and pass them here.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from backends.base import SPLITS


class Fractions(BaseModel):
    """Split sizes, as fractions. Test and pre-training are drawn first; the rest is the fine-tuning pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    test: float = Field(0.2, gt=0, lt=1, description="Share of all rows in the test set.")
    pretrain: float = Field(0.2, ge=0, lt=1, description="Share of all rows in the pre-training set (train + val).")
    pretrain_val: float = Field(0.2, gt=0, lt=1, description="Share of the pre-training set used for validation.")
    pool_val: float = Field(0.2, gt=0, lt=1, description="Share of the pool used for validation (pool_val).")


def subset(strata: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row positions of a seeded subset of about ``limit`` rows, proportional per stratum.

    Args:
        strata: Stratum of each row (any comparable values).
        limit: Rows wanted; None (or >= the number of rows) keeps every row.
        seed: Seeds the choice; each stratum has its own stream, so a stratum's choice does not depend on the others.

    Returns:
        int64 positions, ascending.
    """
    n = len(strata)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    chosen = []
    codes = _stratum_codes(strata)
    for i in range(int(codes.max()) + 1 if n else 0):
        pos = np.flatnonzero(codes == i)
        take = max(1, round(limit * len(pos) / n))
        chosen.append(np.random.default_rng([seed, i, 0]).permutation(pos)[:take])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def partition(strata: np.ndarray, keys: np.ndarray, fractions: Fractions, seed: int) -> dict[str, np.ndarray]:
    """Row positions of each split: disjoint, covering every row, seeded, stratified, grouped by ``keys``.

    Args:
        strata: Stratum of each row; a key's stratum is that of its first row.
        keys: Grouping key of each row (rows with equal keys share a split).
        fractions: Split sizes (rounded per stratum).
        seed: Seeds the per-stratum shuffles.

    Returns:
        Split name -> ascending int64 row positions, for every name in :data:`backends.base.SPLITS`.
    """
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    key_split = np.empty(len(uniq), dtype=np.int64)
    key_strata = _stratum_codes(strata[first])
    for i in range(int(key_strata.max()) + 1 if len(key_strata) else 0):
        members = np.random.default_rng([seed, i, 1]).permutation(np.flatnonzero(key_strata == i))
        key_split[members] = _codes(len(members), fractions)
    row_split = key_split[inverse.reshape(-1)]
    return {name: np.flatnonzero(row_split == code).astype(np.int64) for code, name in enumerate(SPLITS)}


def _stratum_codes(strata: np.ndarray) -> np.ndarray:
    """0.. per distinct stratum in sorted order; every NaN is one stratum (sorted last), not a value equal to
    nothing, which would leave its rows in no split (a missing label must reach the spec's missing rule)."""
    _, codes = np.unique(strata, return_inverse=True, equal_nan=True)
    return codes.reshape(-1)


def _codes(n: int, f: Fractions) -> np.ndarray:
    """Split codes (indices into SPLITS) for ``n`` shuffled keys: test, pretrain_train/val, pool_train/val blocks."""
    n_test = round(n * f.test)
    n_pre = round(n * f.pretrain)
    n_pre_val = round(n_pre * f.pretrain_val)
    n_pool_val = round((n - n_test - n_pre) * f.pool_val)
    n_pool_train = n - n_test - n_pre - n_pool_val
    sizes = {"pretrain_train": n_pre - n_pre_val, "pretrain_val": n_pre_val, "pool_train": n_pool_train,
             "pool_val": n_pool_val, "test": n_test}
    order = ("test", "pretrain_train", "pretrain_val", "pool_val", "pool_train")
    return np.concatenate([np.full(sizes[s], SPLITS.index(s), dtype=np.int64) for s in order])
