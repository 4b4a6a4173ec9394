"""Latent separation between the two groups of an attribute (method.md §4).

``tv_paper`` is the paper's histogram TV estimator, transcribed from ``compute_tvd`` in the authors'
``src/utils/distance_utils.py``; ``attribute_tv`` applies it per class and averages the classes, as the paper does.

To add a distance: write ``my_distance(x0, x1, ...) -> float`` next to ``tv_paper`` (same input contract: two
(n, d) arrays, group 0 first), give ``attribute_tv`` a ``distance`` argument or a sibling function, and add the name to
``Literal[...]`` of ``separation.distances`` in ``engine/spec.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["tv_paper", "attribute_tv"]


def _as_samples(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a finite float64 (n, d) array; a 1-D array is one dimension."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected an (n, d) array of embeddings, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no samples (empty group); TV needs at least one embedding per group")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf; drop or impute those embeddings first")
    return arr


def _tv_dimension(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """TV between 1-D samples ``a`` and ``b`` on ``bins`` equal-width bins spanning ``a``."""
    # Counts normalised to sum 1 equal the paper's `density=True` histograms normalised to sum 1, because the
    # bins are equal-width; counts avoid the 0/0 that `density=True` gives when b has no mass inside a's range.
    p, edges = np.histogram(a, bins=bins)
    q, _ = np.histogram(b, bins=edges)
    q_total = q.sum()
    if q_total == 0:
        return 1.0
    return 0.5 * float(np.abs(p / p.sum() - q / q_total).sum())


def tv_paper(x0: np.ndarray, x1: np.ndarray, bins: int = 50) -> float:
    """The paper's per-dimension histogram total variation, averaged over dimensions.

    For each dimension d: edges from ``np.histogram(x0[:, d], bins=bins, density=True)``, ``x1[:, d]`` histogrammed on
    those edges, both histograms normalised to sum 1, ``TV_d = 0.5 * sum(|p - q|)``. Returns ``mean_d TV_d``.
    Asymmetric by design (group-1 mass outside group 0's range is dropped), like the original.

    Deliberate deviation: where group 1 has no mass inside group 0's edges the paper's code divides 0 by 0 and
    yields NaN; here ``TV_d = 1.0`` (the supports are disjoint on that dimension, which is maximal separation).

    Args:
        x0: group-0 embeddings, shape (n0, d) (1-D means d = 1).
        x1: group-1 embeddings, shape (n1, d).
        bins: histogram bins per dimension (the paper: 50).

    Raises:
        ValueError: empty group, NaN/inf values, mismatched dimensions or ``bins < 1``.
    """
    a = _as_samples(x0, "x0 (group 0)")
    b = _as_samples(x1, "x1 (group 1)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x0 has {a.shape[1]} dimensions but x1 has {b.shape[1]}; embed both with the same model")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    # Per-dimension loop: contiguous columns make each np.histogram call cheap. A vectorised version is future work.
    a_cols, b_cols = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    return float(np.mean([_tv_dimension(a_cols[d], b_cols[d], bins) for d in range(a.shape[1])]))


def attribute_tv(z: np.ndarray, y: np.ndarray, g: np.ndarray, bins: int = 50) -> dict:
    """Class-conditional TV between the two groups of one attribute (method.md §4).

    ``value`` is the unweighted mean over classes y in {0, 1} of ``tv_paper(z[g==0 & y==c], z[g==1 & y==c])``.
    A class where either group is empty is skipped (its ``value_y*`` is NaN) and ``value`` is the mean over the
    remaining class; that is our choice, the paper never meets the case.

    Args:
        z: embeddings, shape (n, d).
        y: binary task labels, shape (n,).
        g: binary group labels of the attribute, shape (n,).
        bins: histogram bins per dimension.

    Returns:
        ``{"value", "value_y0", "value_y1", "n_g0", "n_g1"}``; ``n_g*`` count each group over both classes.

    Raises:
        ValueError: mismatched lengths, or no class has samples from both groups.
    """
    z = np.asarray(z)
    y, g = np.asarray(y).ravel(), np.asarray(g).ravel()
    if not (len(z) == len(y) == len(g)):
        raise ValueError(f"z, y and g must have the same length, got {len(z)}, {len(y)} and {len(g)}")
    per_class: dict[int, float] = {}
    for c in (0, 1):
        x0, x1 = z[(y == c) & (g == 0)], z[(y == c) & (g == 1)]
        per_class[c] = tv_paper(x0, x1, bins) if len(x0) and len(x1) else float("nan")
    present = [v for v in per_class.values() if not np.isnan(v)]
    if not present:
        raise ValueError("attribute_tv: no class y in {0, 1} has samples from both groups 0 and 1")
    return {
        "value": float(np.mean(present)),
        "value_y0": per_class[0],
        "value_y1": per_class[1],
        "n_g0": int(np.sum(g == 0)),
        "n_g1": int(np.sum(g == 1)),
    }
