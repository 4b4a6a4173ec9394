"""Allocation samplers: which pool items form a trial's fine-tuning train and val sets.

``natural`` (the paper's, method.md §2): round(α·K) items from group 1 and K − round(α·K) from group 0, without
replacement, with no stratification by Y (so P(Y) follows P(Y|A) of each group). Each group is drawn as a prefix of
a seeded permutation that does not depend on α, so for a fixed seed the subsets are nested across α.

To add a sampler (e.g. label-stratified): add a function with the same signature and a key in SAMPLERS; the spec's
``allocation.sampler`` Literal must list it too.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

TRAIN_STREAM, VAL_STREAM = 0, 1


def n_group1(alpha: float, k: int) -> int:
    """round(α·K) with halves rounded up (Python's round() would send 0.5 to the even neighbour)."""
    return int(math.floor(alpha * k + 0.5))


def natural(groups: np.ndarray, alpha: float, k: int, seed: int, stream: int) -> np.ndarray:
    """Indices into ``groups`` (0/1 per pool item): n1 = round(α·K) from group 1, K − n1 from group 0."""
    n1 = n_group1(alpha, k)
    picks = []
    for grp, n in ((1, n1), (0, k - n1)):
        members = np.flatnonzero(groups == grp)
        if n > members.size:
            raise ValueError(f"group {grp} has {members.size} items, {n} requested (α={alpha}, K={k})")
        perm = np.random.default_rng([seed, stream, grp]).permutation(members.size)
        picks.append(members[perm[:n]])
    return np.concatenate(picks)


SAMPLERS: dict[str, Callable[[np.ndarray, float, int, int, int], np.ndarray]] = {"natural": natural}
