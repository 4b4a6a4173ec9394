"""The natural allocation sampler (method.md §2)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import TRAIN_STREAM, VAL_STREAM, n_group1, natural

GROUPS = (np.arange(1000) % 3 == 0).astype(np.int64)  # 334 in group 1, 666 in group 0


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_counts_are_exact(alpha: float) -> None:
    idx = natural(GROUPS, alpha, 300, seed=42, stream=TRAIN_STREAM)
    assert idx.size == 300 == np.unique(idx).size  # without replacement
    assert GROUPS[idx].sum() == n_group1(alpha, 300) == int(np.floor(alpha * 300 + 0.5))


def test_round_half_up() -> None:
    assert n_group1(0.5, 5) == 3 and n_group1(0.5, 7) == 4 and n_group1(0.1, 15) == 2


def test_deterministic_and_seeded() -> None:
    a = natural(GROUPS, 0.3, 200, seed=1, stream=TRAIN_STREAM)
    assert np.array_equal(a, natural(GROUPS, 0.3, 200, seed=1, stream=TRAIN_STREAM))
    assert not np.array_equal(np.sort(a), np.sort(natural(GROUPS, 0.3, 200, seed=2, stream=TRAIN_STREAM)))
    assert not np.array_equal(np.sort(a), np.sort(natural(GROUPS, 0.3, 200, seed=1, stream=VAL_STREAM)))


def test_subsets_are_nested_across_alpha() -> None:
    """With a fixed seed, more allocation to a group only adds items of that group (as the paper's sampler)."""
    prev1: set[int] = set()
    prev0 = set(natural(GROUPS, 0.0, 300, seed=7, stream=0).tolist())
    for alpha in np.linspace(0, 1, 11):
        idx = natural(GROUPS, float(alpha), 300, seed=7, stream=0)
        g1 = {i for i in idx.tolist() if GROUPS[i] == 1}
        g0 = {i for i in idx.tolist() if GROUPS[i] == 0}
        assert prev1 <= g1 and g0 <= prev0
        prev1, prev0 = g1, g0


def test_too_few_items_raises() -> None:
    with pytest.raises(ValueError, match="group 1 has 334 items, 400 requested"):
        natural(GROUPS, 1.0, 400, seed=0, stream=0)
