"""Separation penalties (backends/regularisers.py): values on synthetic features with a known answer, gradients that
reach the encoder, the adversary's gradient reversal, stratified batches, and the training loop that uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backends.head import fit
from backends.regularisers import (Adversarial, ConditionalMMD, PenaltyTerm, Regularisation, TVSurrogate,
                                   reverse_gradient, stratified_order)

D = 6


def _features(shift: float, n: int = 200, seed: int = 0, identical: bool = False):
    """Two classes × two groups of Gaussian features; group 1 moved by ``shift`` along the first axis. With
    ``identical``, group 1 holds exactly group 0's points (the same empirical distribution)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    a = np.tile(np.repeat([0, 1], n // 2), 2)
    f = rng.normal(size=(2 * n, D)) + y[:, None] * 0.5
    if identical:
        for c in (0, 1):
            rows = np.flatnonzero(y == c)
            f[rows[n // 2:]] = f[rows[: n // 2]]
    f[a == 1, 0] += shift
    return torch.tensor(f, dtype=torch.float32), torch.tensor(y), torch.tensor(a)


def _trained_adversary(f: torch.Tensor, y: torch.Tensor, a: torch.Tensor, steps: int = 300) -> Adversarial:
    torch.manual_seed(0)
    adv = Adversarial(D, hidden=16)
    opt = torch.optim.Adam(adv.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        adv.cross_entropy(f, y, a).backward()
        opt.step()
    return adv


@pytest.mark.parametrize("make", [TVSurrogate, ConditionalMMD], ids=["tv_surrogate", "mmd"])
def test_penalty_is_zero_for_identical_groups_and_grows_with_the_shift(make):
    penalty = make()
    f, y, a = _features(0.0, identical=True)
    assert float(penalty(f, y, a)) == pytest.approx(0.0, abs=1e-6)
    values = [float(penalty(*_features(s, n=1000))) for s in (0.0, 0.5, 1.0, 2.0)]  # independent samples
    assert values == sorted(values) and values[-1] > 10 * values[0], values


def test_adversary_gain_is_zero_for_identical_groups_and_grows_with_the_shift():
    gains = {}
    for shift in (0.0, 1.0, 3.0):
        f, y, a = _features(shift, identical=shift == 0.0)
        gains[shift] = _trained_adversary(f, y, a).information_gain(f, y, a)
    assert abs(gains[0.0]) < 0.02, gains  # it cannot tell two copies of one sample apart
    assert gains[0.0] < gains[1.0] < gains[3.0] and gains[3.0] > 0.4, gains  # entropy of a 50/50 split: ln 2


def test_tv_surrogate_matches_its_formula():
    f, y, a = _features(1.0)
    want = []
    for c in (0, 1):
        fc, ac = f[y == c].double(), a[y == c]
        var = fc.var(0, unbiased=False) + 1e-6
        want.append(float(((fc[ac == 1].mean(0) - fc[ac == 0].mean(0)) ** 2 / var).sum()))
    assert float(TVSurrogate()(f, y, a)) == pytest.approx(np.mean(want), rel=1e-5)
    freq = TVSurrogate("frequency")(f, y, a)  # equal class sizes here: the same value
    assert float(freq) == pytest.approx(np.mean(want), rel=1e-5)


def test_a_class_without_two_items_per_group_is_skipped():
    f, y, a = _features(2.0, n=8)
    keep = ~((y == 1) & (a == 1))  # class 1 keeps only group 0
    keep[np.flatnonzero(((y == 1) & (a == 1)).numpy())[0]] = True  # ... and one item of group 1: < 2, skipped
    only0 = TVSurrogate()(f[y == 0], y[y == 0], a[y == 0])
    assert float(TVSurrogate()(f[keep], y[keep], a[keep])) == pytest.approx(float(only0))
    none = TVSurrogate()(f[a == 0], y[a == 0], a[a == 0].clone().requires_grad_(False))
    assert float(none) == 0.0


def test_reversal_flips_the_encoders_gradient():
    f, y, a = _features(1.0)
    adv = Adversarial(D, hidden=8)
    x1 = f.clone().requires_grad_(True)
    adv(x1, y, a).backward()  # through the reversal layer
    grads = [p.grad.clone() for p in adv.parameters()]
    adv.zero_grad()
    x2 = f.clone().requires_grad_(True)
    adv.cross_entropy(x2, y, a).backward()  # the same loss, without it
    assert torch.allclose(x1.grad, -x2.grad) and x2.grad.abs().sum() > 0
    # the classifier's own gradient is not reversed: it still learns to separate the groups
    assert all(torch.allclose(g, p.grad) for g, p in zip(grads, adv.parameters()))
    x = torch.ones(3, requires_grad=True)
    reverse_gradient(x).sum().backward()
    assert torch.equal(x.grad, -torch.ones(3))


class _Encoder(nn.Module):
    """features = a linear map of the inputs; a linear head on top (the shape fit() expects)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(D, D)
        self.fc = nn.Linear(D, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


@pytest.mark.parametrize("kind", ["tv_surrogate", "mmd", "adversarial"])
def test_gradients_move_the_encoder_toward_invariance(kind):
    """A few penalty-only steps on an encoder whose features carry the group (a 3-unit shift on axis 0): the group
    means' distance in feature space shrinks (measured by the surrogate, whatever the kind trained)."""
    x, y, a = _features(3.0, n=256)
    torch.manual_seed(0)
    model = _Encoder()
    reg = Regularisation(kind=kind, attribute="g", weight=1.0, groups=a.numpy(), hidden=16)
    term = PenaltyTerm.of(reg, D, len(y))
    params = list(model.enc.parameters()) + list(term.module.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    before = float(TVSurrogate()(model.features(x), y, a).detach())
    for _ in range(100):
        opt.zero_grad()
        term.module(model.features(x), y, a).backward()
        opt.step()
    after = float(TVSurrogate()(model.features(x), y, a).detach())
    assert model.enc.weight.grad is not None and model.enc.weight.grad.abs().sum() > 0
    assert after < 0.5 * before, (before, after)


def test_stratified_order_gives_every_batch_its_share_of_each_cell():
    rng = np.random.default_rng(1)
    n = 2000
    y = torch.tensor(rng.random(n) < 0.3).long()
    a = torch.tensor(rng.random(n) < np.where(y.numpy() == 1, 0.1, 0.6)).long()  # a rare cell: y=1, a=1 (~3%)
    order = stratified_order(y, a, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(n))
    cells = (y * 2 + a)[order]
    share = torch.bincount(y * 2 + a, minlength=4).double() / n
    batch = 128
    for start in range(0, n - batch + 1, batch):
        counts = torch.bincount(cells[start:start + batch], minlength=4).double()
        assert torch.all((counts - batch * share).abs() <= 2.0), (start, counts, batch * share)
    again = stratified_order(y, a, torch.Generator().manual_seed(0))
    other = stratified_order(y, a, torch.Generator().manual_seed(1))
    assert torch.equal(order, again) and not torch.equal(order, other)


def test_fit_with_a_penalty_logs_it_and_trains_the_adversary():
    x, y, a = _features(3.0, n=256)
    settings = {"lr": 0.01, "weight_decay": 0.0, "batch_size": 64, "max_epochs": 3, "patience": 5,
                "lr_patience": 5, "device": "cpu", "amp": "none"}
    torch.manual_seed(0)
    model = _Encoder()
    reg = Regularisation(kind="adversarial", attribute="g", weight=0.5, groups=a.numpy(), hidden=8, lr_ratio=2.0)
    term = PenaltyTerm.of(reg, D, len(y))
    start = [p.detach().clone() for p in term.module.parameters()]
    log = fit(model, x, y, lambda: model(x).argmax(1), y, settings=settings, seed=0, penalty=term)
    assert len(log.history) == 3 and all(h["train_penalty"] > 0 for h in log.history)
    assert any(not torch.equal(s, p) for s, p in zip(start, term.module.parameters()))
    with pytest.raises(ValueError, match="group values"):
        PenaltyTerm.of(reg, D, len(y) + 1)
