"""The allocation samplers: natural (method.md §2) and stratified (P(Y) fixed across α)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import (TRAIN_STREAM, VAL_STREAM, largest_feasible, n_group1, natural, shortfall,
                             stratified)

GROUPS = (np.arange(1000) % 3 == 0).astype(np.int64)  # 334 in group 1, 666 in group 0
# P(Y=1 | A) differs: 70 % in group 1, about 25 % in group 0 (so the natural sampler lets P(Y) drift with α)
Y = np.where(GROUPS == 1, np.arange(1000) % 10 < 7, np.arange(1000) % 4 == 0).astype(np.int64)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_counts_are_exact(alpha: float) -> None:
    idx = natural(GROUPS, Y, alpha, 300, seed=42, stream=TRAIN_STREAM)
    assert idx.size == 300 == np.unique(idx).size  # without replacement
    assert GROUPS[idx].sum() == n_group1(alpha, 300) == int(np.floor(alpha * 300 + 0.5))


def test_round_half_up() -> None:
    assert n_group1(0.5, 5) == 3 and n_group1(0.5, 7) == 4 and n_group1(0.1, 15) == 2


def test_deterministic_and_seeded() -> None:
    a = natural(GROUPS, Y, 0.3, 200, seed=1, stream=TRAIN_STREAM)
    assert np.array_equal(a, natural(GROUPS, Y, 0.3, 200, seed=1, stream=TRAIN_STREAM))
    assert not np.array_equal(np.sort(a), np.sort(natural(GROUPS, Y, 0.3, 200, seed=2, stream=TRAIN_STREAM)))
    assert not np.array_equal(np.sort(a), np.sort(natural(GROUPS, Y, 0.3, 200, seed=1, stream=VAL_STREAM)))


def test_subsets_are_nested_across_alpha() -> None:
    """With a fixed seed, more allocation to a group only adds items of that group (as the paper's sampler)."""
    prev1: set[int] = set()
    prev0 = set(natural(GROUPS, Y, 0.0, 300, seed=7, stream=0).tolist())
    for alpha in np.linspace(0, 1, 11):
        idx = natural(GROUPS, Y, float(alpha), 300, seed=7, stream=0)
        g1 = {i for i in idx.tolist() if GROUPS[i] == 1}
        g0 = {i for i in idx.tolist() if GROUPS[i] == 0}
        assert prev1 <= g1 and g0 <= prev0
        prev1, prev0 = g1, g0


def test_too_few_items_raises() -> None:
    with pytest.raises(ValueError, match="group 1 has 334 items, 400 requested"):
        natural(GROUPS, Y, 1.0, 400, seed=0, stream=0)


def test_stratified_keeps_p_y_of_the_pool_at_every_alpha_and_natural_does_not() -> None:
    p = Y.mean()
    strat, nat = [], []
    for alpha in np.linspace(0, 1, 11):
        idx = stratified(GROUPS, Y, float(alpha), 150, seed=3, stream=TRAIN_STREAM)
        assert len(idx) == len(set(idx.tolist())) == 150
        assert int(GROUPS[idx].sum()) == n_group1(float(alpha), 150)  # the group shares α asks for
        for grp in (0, 1):  # each group at the pool's P(Y=1), to within rounding
            in_g = idx[GROUPS[idx] == grp]
            if len(in_g):
                assert abs(Y[in_g].sum() - p * len(in_g)) <= 0.5 + 1e-9
        strat.append(Y[idx].mean())
        nat.append(Y[natural(GROUPS, Y, float(alpha), 150, seed=3, stream=TRAIN_STREAM)].mean())
    assert np.ptp(strat) <= 1 / 150 + 1e-12 and np.ptp(nat) > 0.3


def test_stratified_subsets_are_nested_and_seeded() -> None:
    prev = set()
    for alpha in (0.0, 0.2, 0.5):  # group 0 shrinks as α grows: its picks are nested the other way
        cur = set(stratified(GROUPS, Y, alpha, 300, seed=7, stream=0)[
            GROUPS[stratified(GROUPS, Y, alpha, 300, seed=7, stream=0)] == 1].tolist())
        assert prev <= cur
        prev = cur
    a = stratified(GROUPS, Y, 0.3, 200, seed=1, stream=TRAIN_STREAM)
    assert np.array_equal(a, stratified(GROUPS, Y, 0.3, 200, seed=1, stream=TRAIN_STREAM))
    assert not np.array_equal(np.sort(a), np.sort(stratified(GROUPS, Y, 0.3, 200, seed=1, stream=VAL_STREAM)))


def test_shortfall_names_the_cell_and_the_largest_feasible_budget() -> None:
    alphas = [0.0, 0.5, 1.0]
    # at α = 1 all K items come from group 1, which has 334 items, 100 of class 0; the pool's P(Y=1) = 0.40 asks
    # for 60 % of class 0: at most 166 items
    k = largest_feasible("stratified", GROUPS, Y, alphas, 334)
    assert shortfall("stratified", GROUPS, Y, alphas, k) is None
    cell, need, have = shortfall("stratified", GROUPS, Y, alphas, k + 1)
    assert cell == "group 1, class 0" and need == have + 1
    assert largest_feasible("natural", GROUPS, Y, alphas, 1000) == 334
    with pytest.raises(ValueError, match="group 1, class 0 has 100 items"):
        stratified(GROUPS, Y, 1.0, 300, seed=0, stream=0)
