"""Allocation samplers: which pool items form a trial's fine-tuning train and val sets.

``natural`` (the paper's, method.md §2): round(α·K) items from group 1 and K − round(α·K) from group 0, without
replacement, with no stratification by Y (so P(Y) follows P(Y|A) of each group). Each group is drawn as a prefix of
a seeded permutation that does not depend on α, so for a fixed seed the subsets are nested across α.

``stratified``: the same group counts, and within each group round(p·n_g) items of class 1 and the rest of class 0,
p = P(Y=1) of the whole pool split. Every allocated set then has P(Y) = p (to within one item per group) at every α,
the assumption of the paper's theorem, and P(Y | A) is the same in both groups. Each (group, class) cell is drawn as a
prefix of its own seeded permutation, so the subsets are nested across α as well.

To add a sampler: add a function with the same signature and a key in SAMPLERS; the spec's ``allocation.sampler``
Literal must list it too, and :func:`feasible` must know what it needs of the pool.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

TRAIN_STREAM, VAL_STREAM = 0, 1


def n_group1(alpha: float, k: int) -> int:
    """round(α·K) with halves rounded up (Python's round() would send 0.5 to the even neighbour)."""
    return int(math.floor(alpha * k + 0.5))


def natural(groups: np.ndarray, y: np.ndarray, alpha: float, k: int, seed: int, stream: int) -> np.ndarray:
    """Indices into ``groups`` (0/1 per pool item): n1 = round(α·K) from group 1, K − n1 from group 0 (``y`` is not
    used: P(Y) follows each group's P(Y | A))."""
    n1 = n_group1(alpha, k)
    return natural_counts(groups, y, k - n1, n1, seed, stream, f"α={alpha}, K={k}")


def natural_counts(groups: np.ndarray, y: np.ndarray, n0: int, n1: int, seed: int, stream: int,
                   what: str = "") -> np.ndarray:
    """:func:`natural` with the group counts given: ``n1`` items of group 1, then ``n0`` of group 0, each a prefix
    of its own seeded permutation (so subsets are nested as a count grows)."""
    picks = []
    for grp, n in ((1, n1), (0, n0)):
        members = np.flatnonzero(groups == grp)
        if n > members.size:
            raise ValueError(f"group {grp} has {members.size} items, {n} requested ({what or f'n0={n0}, n1={n1}'})")
        perm = np.random.default_rng([seed, stream, grp]).permutation(members.size)
        picks.append(members[perm[:n]])
    return np.concatenate(picks)


def pool_p(groups: np.ndarray, y: np.ndarray) -> float:
    """P(Y=1) of the pool items that have a group (an attribute's missing = "exclude" leaves some without)."""
    has = (groups == 0) | (groups == 1)
    return float(np.mean(y[has])) if has.any() else 0.0


def class_counts(n: int, p: float) -> tuple[int, int]:
    """(items of class 0, items of class 1) among ``n`` at P(Y=1) = ``p``: round(p·n) of class 1, halves up."""
    n_pos = int(math.floor(p * n + 0.5))
    return n - n_pos, n_pos


def stratified(groups: np.ndarray, y: np.ndarray, alpha: float, k: int, seed: int, stream: int) -> np.ndarray:
    """Indices into the pool: the group counts of :func:`natural`, and within each group the pool's P(Y=1)."""
    n1 = n_group1(alpha, k)
    return stratified_counts(groups, y, k - n1, n1, seed, stream, f"α={alpha}, K={k}")


def stratified_counts(groups: np.ndarray, y: np.ndarray, n0: int, n1: int, seed: int, stream: int,
                      what: str = "") -> np.ndarray:
    """:func:`stratified` with the group counts given."""
    p = pool_p(groups, y)
    picks = []
    for grp, n in ((1, n1), (0, n0)):
        for cls, need in enumerate(class_counts(n, p)):
            members = np.flatnonzero((groups == grp) & (y == cls))
            if need > members.size:
                raise ValueError(f"group {grp}, class {cls} has {members.size} items, {need} requested "
                                 f"({what or f'n0={n0}, n1={n1}'}, P(Y=1)={p:.3f})")
            perm = np.random.default_rng([seed, stream, grp, 2 + cls]).permutation(members.size)
            picks.append(members[perm[:need]])
    return np.concatenate(picks)


Sampler = Callable[[np.ndarray, np.ndarray, float, int, int, int], np.ndarray]
SAMPLERS: dict[str, Sampler] = {"natural": natural, "stratified": stratified}
COUNT_SAMPLERS = {"natural": natural_counts, "stratified": stratified_counts}  # the same draws, counts given


def expand_counts(base: int, size: int, grown: int) -> tuple[int, int]:
    """(n0, n1) of an ``expand`` trial: the grown group gets ``size`` items, the other ``base``."""
    return (size, base) if grown == 0 else (base, size)


def expand_shortfall(sampler: str, groups: np.ndarray, y: np.ndarray, base: int, sizes: list[int],
                     grow: list[int]) -> tuple[str, int, int] | None:
    """The first cell the pool cannot supply for an ``expand`` sweep (cell, needed, available), or None."""
    for g in grow:
        short = _short(sampler, groups, y, ((g, max(sizes)), (1 - g, base)))
        if short is not None:
            return short
    return None


def shortfall(sampler: str, groups: np.ndarray, y: np.ndarray, alphas: list[float],
              k: int) -> tuple[str, int, int] | None:
    """The first cell the pool cannot supply at budget ``k`` for some α: (cell name, needed, available), or None.
    A cell is a group for ``natural``, a (group, class) pair for ``stratified``."""
    for alpha in alphas:
        n1 = n_group1(alpha, k)
        short = _short(sampler, groups, y, ((1, n1), (0, k - n1)))
        if short is not None:
            return short
    return None


def _short(sampler: str, groups: np.ndarray, y: np.ndarray, wanted: tuple[tuple[int, int], ...]
           ) -> tuple[str, int, int] | None:
    """The first cell that cannot supply its items when each (group, count) of ``wanted`` is drawn: a group for
    ``natural``, a (group, class) pair for ``stratified`` (class counts at the pool's P(Y=1))."""
    p = pool_p(groups, y)
    for grp, n in wanted:
        if sampler == "natural":
            have = int((groups == grp).sum())
            if n > have:
                return f"group {grp}", n, have
            continue
        for cls, need in enumerate(class_counts(n, p)):
            have = int(((groups == grp) & (y == cls)).sum())
            if need > have:
                return f"group {grp}, class {cls}", need, have
    return None


def largest_feasible(sampler: str, groups: np.ndarray, y: np.ndarray, alphas: list[float], k_max: int) -> int:
    """The largest budget ≤ ``k_max`` the pool supplies at every α (0 if none); binary search (feasibility is
    monotone in K up to rounding, so the answer is checked)."""
    lo, hi = 0, k_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shortfall(sampler, groups, y, alphas, mid) is None:
            lo = mid
        else:
            hi = mid - 1
    while lo > 0 and shortfall(sampler, groups, y, alphas, lo) is not None:
        lo -= 1
    return lo
