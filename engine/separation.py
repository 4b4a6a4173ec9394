"""Latent separation of an attribute's two groups, per class, calibrated and with uncertainty (method.md §4, §10.5).

:func:`estimate` is the one entry point: optional PCA, a distance from :data:`engine.distances.DISTANCES` per class
y in {0, 1}, class aggregation, a permutation null (group labels shuffled within each class) and a bootstrap sampling
spread (items resampled within each (class, group) cell; it covers the estimator's expectation, not the true
distance: see :func:`_bootstrap_ci`). With ``match_sizes`` both groups of a class are first subsampled to the smaller
group's size, so they are compared at equal size (a histogram TV's floor depends on both sizes; see :func:`estimate`).
:func:`attribute_tv` is the paper's TV alone (kept for callers of the first version).

Nulls, bootstraps and size-matched draws reuse work across replicates. A replicate is a pair of item multiplicity
vectors (w0, w1) over a class's items: a permutation or a size-matched subsample is 0/1 membership, a bootstrap draw
counts copies. A null's (or bootstrap's) replicates are drawn first, in the order of the per-replicate loop, and each
class's batch goes to its Stat's ``many`` where it has one (:func:`_replicate_values`); ``_BATCHED = False`` runs the
loop instead, one ``__call__`` per replicate and class: the reference, equal bit for bit. What is shared:

- ``tv_paper`` and ``tv``: each dimension is sorted once per class. One replicate (``_SortedHistogram.__call__``)
  gathers its multiplicities in sorted order, finds the new min/max (``tv_paper``: group 0's; ``tv``: both groups'),
  locates the edges with ``searchsorted`` and sums multiplicities between them. A batch (``_SortedHistogram.many``)
  locates each distinct set of edges once and sums all replicates with one sparse product per block of dimensions.
  No value is re-binned: both equal the estimator on the permuted, resampled or size-matched data exactly (same
  edges, same comparisons), and each other bit for bit.
- ``wasserstein``: the same sorted order; a replicate recomputes the two ECDFs with a cumulative sum. 0.066 s against
  0.41 s for ``scipy.stats.wasserstein_distance`` per dimension on the materialised replicate (0.86 s with scipy's
  ``u_weights``/``v_weights``); equal to scipy to 1e-12 (tests/test_separation.py).
- ``mmd``: the subsample, bandwidth and kernel matrix are computed once; a replicate is two matrix-vector products.
- ``frechet``, ``probe_auc`` (and any new distance): recomputed on the materialised replicate (``np.repeat``).
  Both are slow at high dimension: use ``pca_variance``, or few replicates.

Timings, per-replicate loop -> batched, at the 4000 x 1568 float32 demo scale (two classes of about 2000 items), 50
bins, R = 200, B = 100, on this machine's 2 CPU cores shared with other work (bench/bench_separation.py; "one
replicate" is one class, from interleaved runs). Loads vary, and they slowed the batched path more than the loop:
in a busier hour the same bench gave 36.0 s -> 4.5 s for tv_paper (8x).

    estimate(distance="tv_paper", permutations=200, bootstrap=100)   31.7 s  -> 2.8 s
    estimate(distance="tv", permutations=200, bootstrap=100)         29.2 s  -> 2.2 s
    tv_paper, one permutation replicate                              0.039 s -> 0.0031 s
    tv_paper, one bootstrap replicate                                0.062 s -> 0.0041 s
    tv, one permutation replicate                                    0.029 s -> 0.0012 s
    tv, one bootstrap replicate                                      0.066 s -> 0.0035 s

To add a fast path for a new distance: write a class like :class:`_SortedWasserstein` (``__call__(w0, w1) ->
float``) and return it from :func:`_prepare`; a ``many(w0s, w1s)`` method, if it can share work across replicates.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from engine.distances import (
    DISTANCES, MMD_MAX_PER_GROUP, PROBE_FOLDS, as_samples, call_distance, distance_function, histogram_edges,
    mmd_from_kernel, rbf_kernel_median, tv_from_counts, tv_paper,
)

__all__ = ["estimate", "estimate_label_tv", "label_scores", "attribute_tv", "pca_reduce", "tv_paper", "DISTANCES",
           "CLASS_WEIGHTS", "MATCH_DRAWS"]

CLASS_WEIGHTS = ("unweighted", "prevalence")  # paper: unweighted mean over y; prevalence: weighted by P(Y=y)
# Level of the bootstrap sampling spread, centred on the estimate: it covers the estimator's expectation, not the
# true distance (a histogram TV is biased upwards; see _bootstrap_ci). Not a confidence interval of the distance.
CI_LEVEL = 0.95
# Size-matched subsamples averaged into the observed value with match_sizes=True: 10 divides the variance due to
# which items are drawn by 10 (a third of its standard deviation) for 10 distance evaluations per class.
MATCH_DRAWS = 10
_MIN_PER_GROUP = {"frechet": 2, "mmd": 2, "probe_auc": 2}  # others need 1 item per group and class
_TIE_TOL = 1e-12  # null >= observed up to floating-point noise counts as "as extreme" (identical relabellings)
# Replicates are drawn first, in the order of the per-replicate loop, and evaluated together through Stat.many (see
# _replicate_values). False runs that loop instead (one Stat.__call__ per replicate and class): the reference, equal
# bit for bit (tests/test_separation.py, bench/bench_separation.py).
_BATCHED = True
_REPLICATE_CHUNK = 256  # replicates drawn and evaluated together (fewer if their weights would pass _REPLICATE_BYTES)
_REPLICATE_BYTES = 1 << 26  # weights (w0, w1, int32) of one chunk of replicates, all classes: 64 MB


class Stat(Protocol):
    """A distance as a function of item multiplicities (w0, w1) over ``items`` (indices into the class's rows).

    A Stat may also offer ``many(w0s, w1s) -> np.ndarray``: the values of a batch of replicates (rows of w0s, w1s),
    equal to calling it on each; :func:`_evaluate` uses it where present.
    """

    items: np.ndarray

    def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float: ...


def pca_reduce(z: np.ndarray, variance: float = 0.70) -> tuple[np.ndarray, int]:
    """StandardScaler + PCA keeping the first k components reaching ``variance`` of the explained variance.

    k = ``argmax(cumsum(explained_variance_ratio) >= variance) + 1`` (the paper's foundation-model notebook). Fit on
    the embeddings passed (the test set, as the paper does). Deterministic (exact solvers only).

    Args:
        z: (n, d) embeddings.
        variance: target cumulative explained-variance ratio in (0, 1].

    Returns:
        (the first k principal-component scores as float64 (n, k), k).
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if not 0.0 < variance <= 1.0:
        raise ValueError(f"pca_variance must be in (0, 1], got {variance}")
    x = StandardScaler().fit_transform(as_samples(z, "z").astype(np.float64))
    solver = "covariance_eigh" if x.shape[0] >= 10 * x.shape[1] else "full"
    pca = PCA(svd_solver=solver).fit(x)
    cum = np.cumsum(pca.explained_variance_ratio_)
    k = int(np.argmax(cum >= variance - 1e-12)) + 1 if cum[-1] >= variance - 1e-12 else len(cum)
    return pca.transform(x)[:, :k], k


def estimate(z: np.ndarray, y: np.ndarray, g: np.ndarray, *, distance: str, bins: int = 50,
             pca_variance: float | None = None, class_weights: str = "unweighted", permutations: int = 0,
             bootstrap: int = 0, seed: int = 0, match_sizes: bool = False) -> dict[str, Any]:
    """Separation of the groups g in {0, 1} within each class y in {0, 1}, aggregated over classes.

    Args:
        z: (n, d) embeddings (the test set).
        y: (n,) binary task labels.
        g: (n,) binary group labels of one attribute.
        distance: a key of :data:`DISTANCES` ("tv_paper", "tv", "wasserstein", "frechet", "mmd", "probe_auc").
        bins: histogram bins per dimension (histogram TVs only).
        pca_variance: if set, StandardScaler + PCA to this explained variance first (k stored as ``pca_k``).
        class_weights: "unweighted" (the paper) or "prevalence" (weights P(Y=y) in this set).
        permutations: R, permutations of g within each class for the null (0 = none).
        bootstrap: B, bootstrap resamples of items within each (class, group) cell (0 = none).
        seed: permutations use ``np.random.default_rng(seed)``, the bootstrap ``default_rng([seed, 1])``, the
            size-matched draws of the observed value ``default_rng([seed, 2])``; mmd and probe_auc get ``seed`` for
            their subsample / folds.
        match_sizes: within each class, subsample both groups without replacement to the smaller group's size and
            average the distance over :data:`MATCH_DRAWS` such draws, so that both groups are compared at equal
            size. It does not remove the small-sample floor, it moves it: with no real difference (20-d Gaussians,
            3000 items in group 0) raw ``tv_paper`` is about 0.40 / 0.13 / 0.06 for 30 / 300 / 3000 items in group
            1, matched about 0.61 / 0.20 / 0.06, the raw values at (30, 30) / (300, 300) / (3000, 3000). Compare
            attributes whose smaller groups differ in size by ``calibrated``. The null and the bootstrap then use
            one fresh size-matched draw per replicate (see Returns).

    Returns:
        ``distance, value, value_y0, value_y1, n_g0, n_g1, pca_k, null_mean, null_std, p_value, calibrated, ci_low,
        ci_high, boot_shift, params``. ``value_y*`` is NaN for a class lacking one group (it is then left out of
        ``value``). ``n_g*`` are the full group sizes, also with ``match_sizes``.
        Null fields are None without permutations: ``p_value = (1 + #{null >= value}) / (R + 1)``, ``calibrated =
        value - null_mean``. ``ci_low``/``ci_high`` are a sampling spread (covers the estimator's expectation, not
        the true distance): the bootstrap's central 95% spread, centred on ``value``; ``boot_shift`` = the bootstrap
        median minus ``value``. They are None without bootstrap.
        With ``match_sizes`` the observed value averages :data:`MATCH_DRAWS` draws but each null replicate is a
        single draw: same expectation, larger variance. The null's upper tail is therefore wider than that of the
        averaged statistic, which makes the p-value conservative: under no difference it errs large (measured: 1% of
        p-values <= 0.1 instead of 10%), at some cost in power. ``calibrated`` is unaffected in expectation. Likewise
        the bootstrap spread is that of a single draw, wider than the averaged value's.

    Raises:
        ValueError: unknown distance or class weighting, mismatched lengths, or no class with both groups.
    """
    distance_function(distance)
    if class_weights not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class_weights '{class_weights}'; known: {', '.join(CLASS_WEIGHTS)}")
    z, y, g = _check_inputs(z, y, g)
    pca_k = None
    if pca_variance is not None:
        z, pca_k = pca_reduce(z, pca_variance)
    params = {"distance": distance, "bins": bins, "pca_variance": pca_variance, "class_weights": class_weights,
              "permutations": permutations, "bootstrap": bootstrap, "seed": seed, "ci_level": CI_LEVEL}
    if match_sizes:  # only when set, so the default record stays as it was
        params.update(match_sizes=True, match_draws=MATCH_DRAWS)
    if distance == "mmd":
        params["mmd_max_per_group"] = MMD_MAX_PER_GROUP
    if distance == "probe_auc":
        params["probe_folds"] = PROBE_FOLDS
    cells = _classes(z, y, g, distance, class_weights)
    stats = None
    if match_sizes or permutations > 0 or bootstrap > 0:
        stats = {c: _prepare(distance, cell, params) for c, cell in cells.items()}
    if match_sizes:
        rng = np.random.default_rng([seed, 2])
        per_class = {}
        for c, cell in cells.items():
            draws = [_matched(cell["g"][stats[c].items], rng) for _ in range(MATCH_DRAWS)]
            per_class[c] = float(np.mean(_evaluate(stats[c], draws) if _BATCHED else [stats[c](*w) for w in draws]))
    else:
        per_class = {c: call_distance(distance, cell["x0"], cell["x1"], params) for c, cell in cells.items()}
    value = _aggregate(per_class, cells)
    out: dict[str, Any] = {
        "distance": distance, "value": value,
        "value_y0": per_class.get(0, float("nan")), "value_y1": per_class.get(1, float("nan")),
        "n_g0": int(np.sum(g == 0)), "n_g1": int(np.sum(g == 1)), "pca_k": pca_k,
        "null_mean": None, "null_std": None, "p_value": None, "calibrated": None, "ci_low": None, "ci_high": None,
        "boot_shift": None,
        "params": params,
    }
    if permutations > 0:
        out.update(_permutation_null(stats, cells, value, permutations, np.random.default_rng(seed), match_sizes,
                                     batched=_BATCHED))
    if bootstrap > 0:
        out.update(_bootstrap_ci(stats, cells, bootstrap, np.random.default_rng([seed, 1]), value, match_sizes,
                                 batched=_BATCHED))
    return out


LABEL_FOLDS = 2  # tv_label: the label direction of each half of the items is fitted on the other half


def label_scores(z: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each item's position along the label-relevant direction, (n, 1): the LDA discriminant of y (sklearn,
    ``solver="lsqr"`` with Ledoit-Wolf shrinkage, so 1568 dimensions and a few thousand items are fine), fitted on
    the other fold of a seeded stratified 2-fold split (out of fold: an item never defines its own direction).
    The direction depends on y only, never on a group, so the permutation null of the groups stays valid."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold

    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    out = np.empty(len(y), dtype=np.float64)
    folds = StratifiedKFold(n_splits=LABEL_FOLDS, shuffle=True, random_state=seed)
    for fit_rows, score_rows in folds.split(z, y):
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(z[fit_rows], y[fit_rows])
        out[score_rows] = lda.decision_function(z[score_rows])
    return out[:, None]


def estimate_label_tv(z: np.ndarray, y: np.ndarray, g: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """``tv_label``: the paper's histogram TV between the groups along the label direction only
    (:func:`label_scores`), per class, with the same null and bootstrap as :func:`estimate` (``pca_variance`` is
    ignored: there is one dimension). Separation the head cannot use (orthogonal to the label direction) does not
    count here."""
    seed = int(kwargs.get("seed", 0))
    kwargs = {**kwargs, "pca_variance": None, "distance": "tv_paper"}
    z, y, g = _check_inputs(z, y, g)
    out = estimate(label_scores(z, y, seed), y, g, **kwargs)
    out["distance"] = "tv_label"
    out["params"] = {**out["params"], "distance": "tv_label", "label_direction": "out-of-fold LDA (lsqr, Ledoit-Wolf)",
                     "label_folds": LABEL_FOLDS}
    return out


def attribute_tv(z: np.ndarray, y: np.ndarray, g: np.ndarray, bins: int = 50) -> dict[str, Any]:
    """The paper's class-conditional TV of one attribute: ``tv_paper`` per class, unweighted mean (method.md §4).

    Returns:
        ``{"value", "value_y0", "value_y1", "n_g0", "n_g1"}`` (see :func:`estimate`).
    """
    res = estimate(z, y, g, distance="tv_paper", bins=bins)
    return {k: res[k] for k in ("value", "value_y0", "value_y1", "n_g0", "n_g1")}


def _check_inputs(z: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.asarray(z)
    y, g = np.asarray(y).ravel(), np.asarray(g).ravel()
    if not (len(z) == len(y) == len(g)):
        raise ValueError(f"z, y and g must have the same length, got {len(z)}, {len(y)} and {len(g)}")
    keep = (g == 0) | (g == 1)  # an item without a group (-1: missing = "exclude") is not in either group
    if not keep.all():
        z, y, g = z[keep], y[keep], g[keep]
    return z, y, g


def _classes(z: np.ndarray, y: np.ndarray, g: np.ndarray, distance: str, class_weights: str) -> dict[int, dict]:
    """Per class with enough items in both groups: its rows, group labels, both groups' embeddings and weight."""
    need = _MIN_PER_GROUP.get(distance, 1)
    cells = {}
    for c in (0, 1):
        rows = np.flatnonzero(y == c)
        gc = g[rows]
        if min(np.sum(gc == 0), np.sum(gc == 1)) >= need:
            zc = z[rows]
            cells[c] = {"z": zc, "g": gc, "x0": zc[gc == 0], "x1": zc[gc == 1],
                        "weight": 1.0 if class_weights == "unweighted" else len(rows) / len(y)}
    if not cells:
        raise ValueError(f"{distance}: no class y in {{0, 1}} has at least {need} sample(s) from both groups 0 and 1")
    return cells


def _aggregate(per_class: dict[int, float], cells: dict[int, dict]) -> float:
    w = np.array([cells[c]["weight"] for c in per_class])
    return float(np.sum(w * np.array(list(per_class.values()))) / np.sum(w))


def _permutation_null(stats: dict[int, Stat], cells: dict[int, dict], value: float, r: int,
                      rng: np.random.Generator, match_sizes: bool, batched: bool = True) -> dict[str, Any]:
    """Null distribution of the aggregated distance under group labels shuffled within each class.

    With ``match_sizes`` each replicate is one size-matched draw from the shuffled groups (a single draw, while the
    observed value averages :data:`MATCH_DRAWS`: the p-value is conservative, see :func:`estimate`).
    """
    def draw(c: int) -> tuple[np.ndarray, np.ndarray]:
        perm = rng.permutation(cells[c]["g"][stats[c].items])
        if match_sizes:
            return _matched(perm, rng)
        w0 = (perm == 0).astype(np.int32)
        return w0, 1 - w0

    null = _replicate_values(stats, cells, r, draw, batched)
    tol = _TIE_TOL * max(1.0, abs(value))
    mean = float(null.mean())
    return {"null_mean": mean, "null_std": float(null.std(ddof=1)) if r > 1 else float("nan"),
            "p_value": float((1 + np.sum(null >= value - tol)) / (r + 1)), "calibrated": value - mean}


def _bootstrap_ci(stats: dict[int, Stat], cells: dict[int, dict], b: int, rng: np.random.Generator,
                  value: float, match_sizes: bool, batched: bool = True) -> dict[str, Any]:
    """Sampling spread (covers the estimator's expectation, not the true distance), centred on the estimate.

    Resampling items with replacement duplicates them, which inflates a histogram TV: the bootstrap distribution
    sits above the estimate (``boot_shift`` = its median − the estimate). A plain percentile interval can then
    exclude the estimate itself. We keep the spread (median − 2.5 %, 97.5 % − median) and put it around the
    estimate. That interval describes how much the estimate moves between samples of this size; it is centred on
    a biased estimate, so it covers the estimator's own expectation at this sample size, not the true distance
    (tests/test_separation.py::test_bootstrap_spread_covers_expectation_not_truth: N(0,1) vs N(0.3,1), true TV 0.12,
    200 items per group, estimates about 0.27, the truth inside 1 interval of 40, the expectation inside 37). Hence
    the name "sampling spread", not "confidence interval"; the estimator's upward floor is what the permutation null
    (``calibrated``) removes.

    With ``match_sizes`` each replicate draws, within each class, the smaller group's size with replacement from
    each group: one size-matched draw of an ordinary bootstrap resample (m of the n i.i.d. draws are m i.i.d.
    draws). Its spread is a single draw's, wider than that of the averaged value.
    """
    def draw(c: int) -> tuple[np.ndarray, np.ndarray]:
        g = cells[c]["g"][stats[c].items]
        m = min(np.sum(g == 0), np.sum(g == 1)) if match_sizes else None
        w0, w1 = (_resample(g == k, rng, m) for k in (0, 1))
        return w0, w1

    values = _replicate_values(stats, cells, b, draw, batched)
    alpha = (1.0 - CI_LEVEL) / 2
    low, mid, high = np.quantile(values, [alpha, 0.5, 1.0 - alpha])
    return {"ci_low": float(value - (mid - low)), "ci_high": float(value + (high - mid)),
            "boot_shift": float(mid - value)}


def _replicate_values(stats: dict[int, Stat], cells: dict[int, dict], count: int,
                      draw: Callable[[int], tuple[np.ndarray, np.ndarray]], batched: bool) -> np.ndarray:
    """Aggregated distance of ``count`` replicates; ``draw(c)`` gives class c's multiplicities (w0, w1).

    ``draw`` is called replicate by replicate and, within one, class by class: the order of the per-replicate loop,
    so both consume the random generator identically. Batched, a chunk of replicates is drawn first and each class's
    draws are evaluated together (:func:`_evaluate`); otherwise each replicate is evaluated as it is drawn.
    """
    if not batched:
        return np.array([_aggregate({c: stats[c](*draw(c)) for c in cells}, cells) for _ in range(count)])
    out = np.empty(count)
    items = sum(len(stats[c].items) for c in cells)
    step = max(1, min(_REPLICATE_CHUNK, _REPLICATE_BYTES // (8 * items)))
    for start in range(0, count, step):
        k = min(step, count - start)
        draws: dict[int, list] = {c: [] for c in cells}
        for _ in range(k):
            for c in cells:
                draws[c].append(draw(c))
        values = {c: _evaluate(stats[c], draws[c]) for c in cells}
        out[start:start + k] = [_aggregate({c: values[c][i] for c in cells}, cells) for i in range(k)]
    return out


def _evaluate(stat: Stat, draws: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The stat on each replicate (w0, w1) of ``draws``: through its ``many`` where it has one, else call by call."""
    many = getattr(stat, "many", None)
    if many is None:
        return np.array([stat(w0, w1) for w0, w1 in draws])
    return many(np.array([w[0] for w in draws]), np.array([w[1] for w in draws]))


def _resample(members: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """Multiplicities of ``size`` draws with replacement (default: as many as there are) from the items where
    ``members``."""
    idx = np.flatnonzero(members)
    draws = idx[rng.integers(0, len(idx), size=len(idx) if size is None else size)]
    return np.bincount(draws, minlength=len(members)).astype(np.int32)


def _matched(g: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """0/1 multiplicities (w0, w1) of a size-matched subsample: each group drawn without replacement down to the
    smaller group's size (the smaller group is kept whole)."""
    members = [np.flatnonzero(g == k) for k in (0, 1)]
    m = min(len(idx) for idx in members)
    out = []
    for idx in members:
        w = np.zeros(len(g), dtype=np.int32)
        w[idx if len(idx) == m else rng.choice(idx, m, replace=False)] = 1
        out.append(w)
    return out[0], out[1]


def _prepare(distance: str, cell: dict, params: dict[str, Any]) -> Stat:
    """A function of item multiplicities (w0, w1) over the class's items that equals the distance on that sample."""
    z = cell["z"]
    if distance in ("tv_paper", "tv"):
        return _SortedHistogram(as_samples(z, "z"), params["bins"], shared=distance == "tv")
    if distance == "wasserstein":
        return _SortedWasserstein(as_samples(z, "z"))
    if distance == "mmd":
        return _KernelMMD(cell, params["seed"])
    return _Materialised(distance, z, params)


class _Materialised:
    """Generic replicate: write out the copies and call the distance."""

    def __init__(self, distance: str, z: np.ndarray, params: dict[str, Any]) -> None:
        self.distance, self.z, self.params = distance, z, params
        self.items = np.arange(len(z))

    def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float:
        x0, x1 = np.repeat(self.z, w0, axis=0), np.repeat(self.z, w1, axis=0)
        return call_distance(self.distance, x0, x1, self.params)


class _SortedHistogram:
    """``tv_paper`` (edges from group 0's support) or ``tv`` (edges from both) on weighted samples, sorted once.

    ``__call__`` evaluates one replicate; :meth:`many` evaluates a batch of replicates with the same result, bit for
    bit (see there).
    """

    def __init__(self, z: np.ndarray, bins: int, shared: bool) -> None:
        zt = np.ascontiguousarray(z.T)
        # Not a stable sort (2x faster): the order among tied values changes no count, since every edge position
        # (a searchsorted on the values) has all copies of a value on one side.
        self.order = np.argsort(zt, axis=1)
        self.sorted = np.sort(zt, axis=1)  # = zt[order] row by row (as values), 4x faster than take_along_axis
        self.bins, self.shared = bins, shared
        self.items = np.arange(zt.shape[1])
        self._lo: np.ndarray | None = None
        self._hi: np.ndarray | None = None
        self._bounds = np.zeros((zt.shape[0], bins + 1), dtype=np.intp)
        self._edges = np.zeros((zt.shape[0], bins + 1), dtype=zt.dtype)

    def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float:
        s0 = w0[self.order]
        complement = bool(np.all(w0 + w1 == 1))  # a permutation: group 1 is everything else
        s1 = None if complement else w1[self.order]
        if self.shared:
            support = np.ones_like(s0, dtype=bool) if complement else (s0 + s1) > 0
        else:
            support = s0 > 0
        bounds = self._positions(*self._range(support))
        c0 = _segment_sums(s0, bounds)
        c1 = np.diff(bounds, axis=1) - c0 if s1 is None else _segment_sums(s1, bounds)
        return float(np.mean(tv_from_counts(c0, c1, None if self.shared else self._edges)))

    def _range(self, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = support.shape[1]
        first = support.argmax(axis=1)
        last = n - 1 - support[:, ::-1].argmax(axis=1)
        rows = np.arange(len(first))
        return self.sorted[rows, first], self.sorted[rows, last]

    def _positions(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sorted positions of every edge (left for inner edges, right for the closed last edge), cached per row."""
        changed = np.ones(len(lo), bool) if self._lo is None else (lo != self._lo) | (hi != self._hi)
        rows = np.flatnonzero(changed)
        if len(rows):
            edges = histogram_edges(lo[rows], hi[rows], self.bins)
            self._edges[rows] = edges
            for i, d in enumerate(rows):  # 51 binary searches per changed dimension; no value is re-binned
                self._bounds[d, :-1] = np.searchsorted(self.sorted[d], edges[i, :-1], side="left")
                self._bounds[d, -1] = np.searchsorted(self.sorted[d], edges[i, -1], side="right")
            self._lo, self._hi = lo, hi
        return self._bounds

    def many(self, w0s: np.ndarray, w1s: np.ndarray) -> np.ndarray:
        """``[self(w0, w1) for w0, w1 in zip(w0s, w1s)]`` bit for bit, with the work shared across replicates.

        ``__call__`` needs, per replicate and dimension, the weight of each group between consecutive edge positions
        in the sorted order (exact integers), then :func:`tv_from_counts`. Here, per chunk of replicates:

        1. A replicate's edges depend only on its support's min and max per dimension (found from the ends of the
           sorted order). The distinct (dimension, min, max) combinations are few: one per dimension for ``tv``
           permutations; for ``tv_paper`` only group 0's extreme items change (about 27 combinations per Gaussian
           dimension, 8 per ReLU one, in 200 permutations). Edges and their positions are computed once for each.
        2. Per block of dimensions, the union of those positions cuts the sorted order into segments, and one sparse
           product (segments x items) @ (items x replicates) gives every segment's weight in every replicate, in
           uint16 (uint32 for very large groups), where scipy's loop vectorises. Each dimension's longest segment
           (a ReLU dimension's zeros) is left out and recovered as the replicate's total minus the rest.
        3. A cumulative sum over the segments, 4 replicates at a time (the uint16 columns viewed as uint64 lanes; a
           lane never reaches 2 ** 16 within a block, so no carry crosses lanes), read at each replicate's own edge
           positions, gives its counts; :func:`tv_from_counts` then runs on blocks of rows (row-wise: same result).
        """
        w0s, w1s = np.asarray(w0s), np.asarray(w1s)
        out = np.empty(len(w0s))
        for a in range(0, len(w0s), _CHUNK_DRAWS):
            out[a:a + _CHUNK_DRAWS] = self._many(w0s[a:a + _CHUNK_DRAWS], w1s[a:a + _CHUNK_DRAWS])
        return out

    def _many(self, w0s: np.ndarray, w1s: np.ndarray) -> np.ndarray:
        d, n = self.order.shape
        m, bins = len(w0s), self.bins
        complement = bool(np.all(w0s + w1s == 1))
        fixed = self.shared and complement  # every replicate's support is every item: one combination per dimension
        if fixed:
            du, lo, hi = np.arange(d), self.sorted[:, 0], self.sorted[:, -1]
            inv = np.broadcast_to(np.arange(d), (m, d))
        else:
            du, lo, hi, inv = self._combinations(w0s > 0 if not self.shared else (w0s + w1s) > 0)
        edges = histogram_edges(lo, hi, bins)
        pos = self._edge_positions(du, edges)
        width = None if self.shared else np.diff(edges, axis=1).astype(np.float64)
        sizes = np.diff(pos, axis=1).astype(np.float64) if complement else None
        parts = [w0s] if complement else [w0s, w1s]  # a permutation's group 1 is the rest: its counts come from sizes
        totals = np.array([w.sum(axis=1) for w in parts])
        top = max(1, int(totals.max()))
        bits = 16 if top <= 0xFFFF // 8 else 32 if top <= 0xFFFFFFFF else 64  # lanes hold 8+ dimensions' sums
        x, lanes = _pack(parts, bits), 64 // bits
        per_dim = np.bincount(du, minlength=d)
        starts = np.concatenate([[0], np.cumsum(per_dim)])
        column = np.arange(len(parts))[:, None] * (x.shape[1] // len(parts)) + np.arange(m)  # (part, replicate)
        tv = np.empty((m, d))
        for da, db in _blocks(per_dim, n, bins, x.shape[1] // lanes, min(d, (2 ** bits - 1) // top)):
            ca, cb, k = starts[da], starts[db], db - da
            cuts, edge_row, bound, skip, holder = _segments(du[ca:cb] - da, pos[ca:cb], n, k)
            v = self._prefix_sums(x, cuts, skip, da * n)
            span = len(cuts) * lanes  # entries of one uint64 column of the prefix sums, viewed as lanes
            at_edge, at_bound = edge_row * lanes, bound * lanes  # offset of a cut within a column
            at_rep = column // lanes * span + column % lanes  # offset of each replicate's lane
            step = max(1, _TV_ROWS // k)  # replicates per sub-chunk: its arrays stay in cache
            for ra in range(0, m, step):
                rb = min(m, ra + step)
                # Each replicate's combination; with one per dimension (tv permutations), broadcast, not gathered.
                sel = slice(None) if fixed else inv[ra:rb, da:db] - ca
                fix = np.broadcast_to(holder[sel], (rb - ra, k))
                r_fix, d_fix = np.nonzero(fix >= 0)
                counts = []
                for rep, total in zip(at_rep[:, ra:rb], totals[:, ra:rb]):
                    c = np.diff(v[at_edge[sel] + rep[:, None, None]], axis=2).astype(np.float64)  # exact integers
                    # The left-out segment's weight: the replicate's total minus the rest of its dimension.
                    rest = total[:, None] - np.diff(v[at_bound + rep[:, None]].astype(np.float64), axis=1)
                    c[r_fix, d_fix, fix[r_fix, d_fix]] += rest[r_fix, d_fix]
                    counts.append(c)
                c1 = np.subtract(sizes[ca:cb][sel], counts[0]) if complement else counts[1]
                w = None if width is None else np.broadcast_to(width[ca:cb][sel], c1.shape).reshape(-1, bins)
                tv[ra:rb, da:db] = tv_from_counts(counts[0].reshape(-1, bins), c1.reshape(-1, bins),
                                                  width=w).reshape(rb - ra, k)
        return np.array([np.mean(row) for row in tv])

    def _combinations(self, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Distinct (dimension, support min, support max) of the replicates: (du, lo, hi), sorted by dimension, and
        the (m, d) index of each replicate's combination. Positions in a run of tied values are one combination."""
        d, n = self.order.shape
        first, last = _first_hit(support, self.order), n - 1 - _first_hit(support, self.order[:, ::-1])
        keys, inv = np.unique((np.arange(d, dtype=np.int64) * n + first) * n + last, return_inverse=True)
        du = keys // (n * n)
        lo, hi = self.sorted[du, keys // n % n], self.sorted[du, keys % n]
        order = np.lexsort((hi, lo, du))  # then merge positions with equal values (the same edges)
        new = np.ones(len(order), dtype=bool)
        new[1:] = (np.diff(du[order]) != 0) | (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
        group = np.empty(len(order), dtype=np.intp)
        group[order] = np.cumsum(new) - 1
        keep = order[new]
        return du[keep], lo[keep], hi[keep], group[inv].reshape(support.shape[0], d)

    def _prefix_sums(self, x: np.ndarray, cuts: np.ndarray, skip: np.ndarray, offset: int) -> np.ndarray:
        """Prefix sums of the weights ``x`` (items x replicates) over the segments between ``cuts`` (positions in the
        block's flattened sorted order, from ``offset``), segments ``skip`` left out (counted as 0). Returned flat,
        as lanes: replicate column r's sum up to cut j at ``(r // lanes * len(cuts) + j) * lanes + r % lanes``."""
        import scipy.sparse

        block = self.order.reshape(-1)[offset + cuts[0]:offset + cuts[-1]]  # items, in sorted order per dimension
        ends = np.concatenate([cuts[skip], [cuts[-1]]]) - cuts[0]
        starts = np.concatenate([[0], cuts[skip + 1] - cuts[0]])
        cols = np.concatenate([block[a:b] for a, b in zip(starts, ends)],
                              dtype=np.int32 if x.shape[0] < 2 ** 31 and len(block) < 2 ** 31 else np.int64)
        removed = np.zeros(len(cuts), dtype=np.int64)
        removed[skip + 1] = cuts[skip + 1] - cuts[skip]
        indptr = (cuts - cuts[0] - np.cumsum(removed)).astype(cols.dtype)
        # One replicate per column, in the lanes' own dtype: scipy's loop vectorises over 16-bit columns.
        seg = scipy.sparse.csr_matrix((np.ones(len(cols), dtype=x.dtype), cols, indptr),
                                      shape=(len(cuts) - 1, x.shape[0])) @ x
        # Viewed as uint64, an entry holds 64 // bits replicates: one cumsum adds them lane by lane (no lane reaches
        # 2 ** bits within a block, so no carry crosses lanes) and viewing back gives each replicate its own.
        seg = seg.view(np.uint64)
        prefix = np.empty((seg.shape[1], len(cuts)), dtype=np.uint64)  # (uint64 column, cut): cumsum along rows
        prefix[:, 0] = 0
        np.cumsum(seg.T, axis=1, out=prefix[:, 1:])
        return prefix.view(x.dtype).ravel()

    def _edge_positions(self, du: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Sorted positions of each row's edges in dimension ``du`` (as :meth:`_positions`), one search per dim."""
        needles = edges.copy()
        needles[:, -1] = np.nextafter(edges[:, -1], np.inf)  # v < nextafter(e) iff v <= e: side="right" of the last
        pos = np.empty(edges.shape, dtype=np.intp)
        bounds = np.searchsorted(du, np.arange(self.order.shape[0] + 1))
        for d in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[d], bounds[d + 1]
            pos[a:b] = np.searchsorted(self.sorted[d], needles[a:b])
        return pos


_CHUNK_DRAWS = 256  # replicates a batched Stat evaluates together (more: more distinct edges per dimension)
_BLOCK_BYTES = 1 << 24  # working memory of one block of dimensions in _SortedHistogram.many (about 16 MB)
_SKIP_MIN = 8  # a dimension's longest segment is left out of the sparse product from this length on
_TV_ROWS = 1024  # (replicate, dimension) rows whose counts and TV are computed together (about 0.4 MB per array)


def _pack(parts: list[np.ndarray], bits: int) -> np.ndarray:
    """Weights (m, n) of each part side by side as (n, parts * m') unsigned ``bits``-bit ints, m' = m rounded up to a
    multiple of 64 // bits: viewed as uint64, column c is lane c % lanes of uint64 column c // lanes."""
    lanes = 64 // bits
    m, n = parts[0].shape
    mp = -(-m // lanes) * lanes
    out = np.zeros((n, len(parts) * mp), dtype=f"u{bits // 8}")
    for i, w in enumerate(parts):
        out[:, i * mp:i * mp + m] = w.T
    return out


def _blocks(per_dim: np.ndarray, n: int, bins: int, cols: int, max_dims: int) -> list[tuple[int, int]]:
    """Consecutive blocks of dimensions whose segment sums and prefix sums fit in _BLOCK_BYTES."""
    cost = (np.minimum(per_dim * (bins + 1), n) + 2) * cols * 16  # bytes: at most one segment per item, + bounds
    out, a = [], 0
    while a < len(per_dim):
        b, used = a + 1, cost[a]
        while b < len(per_dim) and b - a < max_dims and used + cost[b] <= _BLOCK_BYTES:
            used += cost[b]
            b += 1
        out.append((a, b))
        a = b
    return out


def _segments(dim: np.ndarray, pos: np.ndarray, n: int, k: int) -> tuple[np.ndarray, ...]:
    """Cut a block of ``k`` dimensions' flattened sorted order at every edge position.

    Args:
        dim: each combination's dimension within the block.
        pos: (combinations, bins + 1) edge positions in that dimension's sorted order.
        n: items per dimension.
        k: dimensions in the block.

    Returns:
        ``cuts`` (the sorted distinct positions, dimension boundaries included, so that no segment spans two
        dimensions), ``edge_row`` (each edge's index in ``cuts``), ``bound`` (the index of each dimension's start and
        end), ``skip`` (the segments left out: the longest of each dimension, a ReLU dimension's zeros say, from
        _SKIP_MIN items on; its weight is recovered as the replicate's total minus the rest of the dimension) and
        ``holder`` (per combination, the bin holding its dimension's left-out segment; -1: none or out of range).
    """
    gp = dim[:, None] * n + pos
    mark = np.zeros(k * n + 1, dtype=bool)
    mark[gp] = True
    mark[::n] = True
    cuts = np.flatnonzero(mark)
    rank = np.cumsum(mark) - 1
    edge_row, bound = rank[gp], rank[::n]
    seglen = np.diff(cuts)
    longest = np.maximum.reduceat(seglen, bound[:-1])
    tops = np.flatnonzero(seglen == np.repeat(longest, np.diff(bound)))
    big = tops[np.searchsorted(tops, bound[:-1])]  # first longest segment of each dimension
    big[longest < _SKIP_MIN] = -1
    holder = (edge_row <= big[dim][:, None]).sum(axis=1) - 1
    holder[(big[dim] < 0) | (holder >= pos.shape[1] - 1)] = -1
    return cuts, edge_row, bound, big[big >= 0], holder


def _first_hit(support: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each replicate r and row d of ``order``: the first column p with ``support[r, order[d, p]]`` (0 if none)."""
    m, (d, n) = support.shape[0], order.shape
    k = min(4, n)
    hit = support[:, order[:, :k]]
    pos = hit.argmax(axis=2).ravel()
    todo = np.flatnonzero(~hit.any(axis=2).ravel())
    start, width = k, 8
    while len(todo) and start < n:
        r, rd = np.divmod(todo, d)
        stop = min(start + width, n)
        h = support[r[:, None], order[rd, start:stop]]
        found = h.any(axis=1)
        pos[todo[found]] = start + h[found].argmax(axis=1)
        todo, start, width = todo[~found], stop, width * 2
    pos[todo] = 0
    return pos.reshape(m, d)


def _segment_sums(s: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sums of each row of ``s`` between consecutive ``bounds`` positions: (d, n) and (d, k + 1) -> (d, k)."""
    cs = np.zeros((s.shape[0], s.shape[1] + 1), dtype=np.int64)
    np.cumsum(s, axis=1, out=cs[:, 1:])
    return np.diff(np.take_along_axis(cs, bounds, axis=1), axis=1)


class _SortedWasserstein:
    """Mean 1-D Wasserstein-1 over dimensions for weighted samples; the pooled sort is done once."""

    def __init__(self, z: np.ndarray) -> None:
        zt = np.ascontiguousarray(z.T).astype(np.float64)
        self.order = np.argsort(zt, axis=1, kind="stable")
        self.gaps = np.diff(np.take_along_axis(zt, self.order, axis=1), axis=1)
        self.items = np.arange(zt.shape[1])

    def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float:
        f0 = np.cumsum(w0[self.order], axis=1)[:, :-1] / w0.sum()
        f1 = np.cumsum(w1[self.order], axis=1)[:, :-1] / w1.sum()
        return float(np.mean(np.sum(np.abs(f0 - f1) * self.gaps, axis=1)))


class _KernelMMD:
    """MMD² on the same per-group subsample as :func:`engine.distances.mmd`; the kernel matrix is computed once.

    ``items`` is that subsample: replicates permute, resample or size-match within it (the null and spread are
    conditional on it). Every replicate keeps that subsample's kernel, bandwidth included: a bootstrap or
    size-matched replicate is MMD² with this fixed kernel, not ``mmd`` recomputed on the replicate (which would take
    the replicate's own median distance). A permutation keeps the pooled items, so there the two are equal.
    """

    def __init__(self, cell: dict, seed: int, max_per_group: int = MMD_MAX_PER_GROUP) -> None:
        rng = np.random.default_rng(seed)  # the same draws as mmd(x0, x1, seed)
        keep = []
        for k in (0, 1):
            idx = np.flatnonzero(cell["g"] == k)
            keep.append(idx if len(idx) <= max_per_group else idx[rng.choice(len(idx), max_per_group, replace=False)])
        self.items = np.concatenate(keep)
        self.kernel = rbf_kernel_median(as_samples(cell["z"][self.items], "z"))

    def __call__(self, w0: np.ndarray, w1: np.ndarray) -> float:
        return mmd_from_kernel(self.kernel, w0.astype(np.float64), w1.astype(np.float64))

