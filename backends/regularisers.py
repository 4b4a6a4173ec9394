"""Separation penalties: train an encoder so that it separates one attribute's groups less (method.md §7).

A penalty is a small ``nn.Module`` with one signature, ``penalty(features, y, a) -> scalar tensor``: the
penultimate features of a mini-batch (n, d), its labels y and its groups a (0/1), all on one device. Training adds
``weight * penalty`` to the cross-entropy (:func:`backends.head.fit`). Three kinds:

- ``tv_surrogate`` (the paper's ``sep_surrogate_conditional``): within each class, the squared diagonal-Mahalanobis
  distance between the two groups' mean features, δ² = Σ_d (μ1_d − μ0_d)² / (σ²_d + 1e-6), σ² the biased variance of
  the class's pooled features. It sees only the means.
- ``mmd``: within each class, the squared maximum mean discrepancy between the groups' features under a Gaussian
  kernel whose bandwidth is the median pairwise squared distance of the batch's class (the median heuristic). It
  matches every moment, not only the means.
- ``adversarial`` (DANN): a small group classifier reads the features through a gradient-reversal layer; it learns to
  tell the groups apart while the encoder receives the reversed gradient and learns to make that impossible. Its
  term is the classifier's cross-entropy; the class enters per class (one output per class) or as an input.

A class of the batch is skipped when it has fewer than ``2 * MIN_PER_CELL`` items or a group with fewer than
``MIN_PER_CELL`` (the paper's rule); a batch where every class is skipped adds 0. :func:`stratified_order` makes
such batches rare: every mini-batch gets each (class, group) cell in its training-set proportion.

To add a kind: write the module, add it to :data:`PENALTIES`, and add the kind to ``engine.spec.RegulariserSpec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from backends.base import MIN_PER_CELL  # items of each group a class needs in a batch (the paper's min_per_cell)

VAR_EPS = 1e-6  # added to the pooled variance in tv_surrogate (the paper's)


def _classes(y: torch.Tensor, a: torch.Tensor, class_weights: str) -> list[tuple[torch.Tensor, float]]:
    """(mask of class c, its weight) for each class whose groups both have ``MIN_PER_CELL`` items in the batch."""
    out = []
    for c in (0, 1):
        in_c = y == c
        n = int(in_c.sum())
        n1 = int((in_c & (a == 1)).sum())
        if n < 2 * MIN_PER_CELL or n1 < MIN_PER_CELL or n - n1 < MIN_PER_CELL:
            continue
        out.append((in_c, 1.0 if class_weights == "equal" else float(n)))
    return out


def _weighted(terms: list[tuple[torch.Tensor, float]], like: torch.Tensor) -> torch.Tensor:
    """Σ w·t / Σ w, or a zero that keeps the graph (so backward works on a batch with no usable class)."""
    if not terms:
        return like.sum() * 0.0
    total = sum(w for _, w in terms)
    return sum(t * (w / total) for t, w in terms)  # type: ignore[return-value]


class _ClassConditional(nn.Module):
    """A penalty computed within each usable class of the batch from its features and its group mask (``term``),
    then averaged over the classes as ``class_weights`` says."""

    def __init__(self, class_weights: str = "equal") -> None:
        super().__init__()
        self.class_weights = class_weights

    def term(self, features: torch.Tensor, in_group1: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        terms = []
        for in_c, w in _classes(y, a, self.class_weights):
            t = self.term(features[in_c], a[in_c] == 1)
            if t is not None:
                terms.append((t, w))
        return _weighted(terms, features)


class TVSurrogate(_ClassConditional):
    """The paper's class-conditional surrogate of TV: squared diagonal-Mahalanobis distance of the group means."""

    def term(self, features: torch.Tensor, in_group1: torch.Tensor) -> torch.Tensor | None:
        var = features.var(dim=0, unbiased=False) + VAR_EPS
        d2 = ((features[in_group1].mean(dim=0) - features[~in_group1].mean(dim=0)).pow(2) / var).sum()
        return None if float(d2.detach()) == 0.0 else d2  # the paper skips a class whose δ² is exactly 0


def _sq_dists(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m), clamped at 0 (the expanded form can go slightly negative)."""
    return (x.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2.0 * x @ z.T).clamp_min(0.0)


class ConditionalMMD(_ClassConditional):
    """Class-conditional squared MMD (biased V-statistic: ≥ 0, and 0 when both groups hold the same points) with a
    Gaussian kernel exp(−‖x − z‖² / h), h = the median pairwise squared distance within the class (not
    differentiated: the bandwidth follows the features without being a way to shrink the penalty)."""

    def term(self, features: torch.Tensor, in_group1: torch.Tensor) -> torch.Tensor | None:
        d = _sq_dists(features, features)
        off = d[~torch.eye(len(features), dtype=torch.bool, device=features.device)]
        k = torch.exp(-d / off.detach().median().clamp_min(1e-12))
        g0, g1 = ~in_group1, in_group1
        return (k[g0][:, g0].mean() + k[g1][:, g1].mean() - 2.0 * k[g0][:, g1].mean()).clamp_min(0.0)


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient is negated on the way back (Ganin & Lempitsky's gradient reversal)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def reverse_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged; its gradient reaches the layers below with the opposite sign."""
    return _Reverse.apply(x)


class Adversarial(nn.Module):
    """A group classifier on the features behind a gradient-reversal layer (DANN). Its term is its cross-entropy
    (mean over the usable classes, weighted as ``class_weights``): the classifier descends it, the encoder ascends it.

    Args:
        dim: Feature width.
        hidden: Width of the classifier's hidden layer (0 = a linear classifier).
        conditioning: 'per_class': one output per class (the logit of the item's class is used); 'label_input': the
            label is appended to the features.
        class_weights: 'equal' or 'frequency'.
    """

    def __init__(self, dim: int, hidden: int = 64, conditioning: str = "per_class",
                 class_weights: str = "equal") -> None:
        super().__init__()
        self.conditioning = conditioning
        self.class_weights = class_weights
        width_in = dim + (1 if conditioning == "label_input" else 0)
        width_out = 2 if conditioning == "per_class" else 1
        self.net = (nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, width_out)) if hidden
                    else nn.Linear(width_in, width_out))

    def logits(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The classifier's group logit per item (no gradient reversal)."""
        if self.conditioning == "label_input":
            return self.net(torch.cat([features, y.to(features.dtype).unsqueeze(1)], dim=1)).squeeze(1)
        return self.net(features).gather(1, y.long().unsqueeze(1)).squeeze(1)

    def cross_entropy(self, features: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        logit = self.logits(features, y)
        terms = [(F.binary_cross_entropy_with_logits(logit[in_c], a[in_c].to(logit.dtype)), w)
                 for in_c, w in _classes(y, a, self.class_weights)]
        return _weighted(terms, logit)

    def forward(self, features: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy(reverse_gradient(features), y, a)

    def information_gain(self, features: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> float:
        """How much better than chance the classifier tells the groups apart, in nats: the entropy of the group
        shares minus its cross-entropy, per usable class (0 for groups it cannot tell apart)."""
        with torch.no_grad():
            logit = self.logits(features, y)
            gains = []
            for in_c, w in _classes(y, a, self.class_weights):
                p = float(a[in_c].float().mean())
                entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
                ce = float(F.binary_cross_entropy_with_logits(logit[in_c], a[in_c].to(logit.dtype)))
                gains.append((entropy - ce, w))
        total = sum(w for _, w in gains)
        return sum(g * w / total for g, w in gains) if gains else 0.0


PENALTIES: dict[str, Callable[..., nn.Module]] = {
    "tv_surrogate": lambda dim, r: TVSurrogate(r.class_weights),
    "mmd": lambda dim, r: ConditionalMMD(r.class_weights),
    "adversarial": lambda dim, r: Adversarial(dim, r.hidden, r.conditioning, r.class_weights),
}


@dataclass(frozen=True)
class Regularisation:
    """What a backend needs to regularise one training run: the kind and its options (``[regulariser]`` of the
    spec) and the regularised attribute's group (0/1) of every training item, in the order of the inputs."""

    kind: str
    attribute: str
    weight: float
    groups: np.ndarray
    class_weights: str = "equal"
    hidden: int = 64
    lr_ratio: float = 1.0
    conditioning: str = "per_class"

    @classmethod
    def from_spec(cls, settings: dict[str, Any], groups: np.ndarray) -> "Regularisation":
        """From the spec's ``[regulariser]`` dump (extra keys such as ``stage`` are ignored)."""
        keys = ("kind", "attribute", "weight", "class_weights", "hidden", "lr_ratio", "conditioning")
        return cls(groups=np.asarray(groups, dtype=np.int64), **{k: settings[k] for k in keys if k in settings})

    def build(self, dim: int) -> nn.Module:
        """The penalty module for features of width ``dim`` (its parameters, if any, are initialised from torch's
        global generator: seed it first)."""
        if self.kind not in PENALTIES:
            raise ValueError(f"unknown regulariser '{self.kind}'; known: {', '.join(sorted(PENALTIES))}")
        return PENALTIES[self.kind](dim, self)


@dataclass
class PenaltyTerm:
    """A built penalty in a training loop: the module, its weight λ, the training items' groups (int64 tensor) and
    the learning-rate ratio of its own parameters (the adversary's)."""

    module: nn.Module
    weight: float
    groups: torch.Tensor
    lr_ratio: float = 1.0

    @classmethod
    def of(cls, regularisation: Regularisation | None, dim: int, n: int) -> "PenaltyTerm | None":
        """Build the term for ``n`` training items, or None when there is no regulariser."""
        if regularisation is None:
            return None
        groups = torch.from_numpy(np.ascontiguousarray(regularisation.groups, dtype=np.int64))
        if groups.shape != (n,):
            raise ValueError(f"regulariser: {groups.shape[0]} group values for {n} training items")
        return cls(regularisation.build(dim), float(regularisation.weight), groups, float(regularisation.lr_ratio))


def stratified_order(y: torch.Tensor, a: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random order of the items in which every (class, group) cell is spread evenly, so that any run of B
    consecutive items holds each cell in its overall proportion, to within one item.

    Each cell's items are shuffled and placed at evenly spaced keys (rank + u_cell) / n_cell, with one uniform offset
    u_cell per cell; the order sorts the keys (ties broken by a random permutation)."""
    n = len(y)
    perm = torch.randperm(n, generator=generator)
    cells = (y.long() * 2 + a.long())[perm]
    key = torch.empty(n, dtype=torch.float64)
    for c in range(4):
        in_c = cells == c
        k = int(in_c.sum())
        if k:
            offset = torch.rand((), generator=generator, dtype=torch.float64)
            key[in_c] = (torch.arange(k, dtype=torch.float64) + offset) / k
    return perm[torch.argsort(key, stable=True)]
