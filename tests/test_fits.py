"""Curve fits on curves with known parameters, the best allocation, and its bootstrap CI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.fits import best_alpha, fit_curves

K = 1000
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SEEDS = [1, 2, 3, 4, 5]


def rows_from(f0, f1, metric: str = "bal_acc", noise: float = 0.0, attr: str = "a") -> list[dict]:
    """Curves of an allocation on ``attr``: group g's metric = f_g(own sample count) (+ seeded noise)."""
    rng = np.random.default_rng(0)
    out = []
    for alpha in ALPHAS:
        for seed in SEEDS:
            for grp, f, share in ((0, f0, 1 - alpha), (1, f1, alpha)):
                out.append({"alloc_attribute": attr, "alpha": alpha, "seed": seed, "attribute": attr, "grp": grp,
                            "metric": metric, "value": float(f(share * K)) + noise * rng.normal()})
            out.append({"alloc_attribute": attr, "alpha": alpha, "seed": seed, "attribute": "overall", "grp": -1,
                        "metric": metric, "value": 0.5})
    return out


def power(a: float, b: float, c: float):
    return lambda n: a + b * np.maximum(n, 1.0) ** (-c)


def test_power_law_recovers_known_parameters() -> None:
    curves = rows_from(power(0.95, -0.5, 0.5), power(0.90, -0.8, 0.3))
    fits = {(r["grp"], r["model"]): r for r in fit_curves(curves, K)}
    a, b, c = fits[(0, "power")]["params"]
    assert a == pytest.approx(0.95, abs=2e-3) and b == pytest.approx(-0.5, rel=0.05) and c == pytest.approx(0.5, rel=0.05)
    assert fits[(1, "power")]["params"][2] == pytest.approx(0.3, rel=0.05)
    assert fits[(0, "power")]["preferred"] and not fits[(0, "linear")]["preferred"]
    assert fits[(0, "power")]["seeds_preferring"] == fits[(0, "power")]["n_seeds"] == len(SEEDS)
    assert fits[(0, "power")]["r2"] > 0.999 > fits[(0, "linear")]["r2"]
    assert json.dumps(fits[(0, "power")]["params"])  # JSON-able for the fits table


def test_linear_curve_prefers_the_line() -> None:
    curves = rows_from(lambda n: 0.8 + 0.1 * n / K, lambda n: 0.7 + 0.2 * n / K, noise=0.002)
    fits = {(r["grp"], r["model"]): r for r in fit_curves(curves, K)}
    a, b = fits[(1, "linear")]["params"]
    assert a == pytest.approx(0.7, abs=0.005) and b == pytest.approx(0.2, abs=0.01)
    assert fits[(1, "linear")]["preferred"]


def test_best_alpha_for_symmetric_and_asymmetric_groups() -> None:
    same = rows_from(power(0.95, -0.5, 0.5), power(0.95, -0.5, 0.5))
    best = {(r["metric"], r["criterion"]): r for r in best_alpha(same, K, n_boot=50)}
    assert best[("bal_acc", "worst_group")]["alpha"] == pytest.approx(0.5, abs=0.01)
    # a group that learns more slowly needs more of the budget: the worst-group optimum moves towards it
    slow1 = rows_from(power(0.95, -0.5, 0.5), power(0.95, -0.9, 0.3), noise=0.001)
    r = {(x["metric"], x["criterion"]): x for x in best_alpha(slow1, K, n_boot=100, seed=1)}
    worst = r[("bal_acc", "worst_group")]
    assert worst["alpha"] > 0.55
    assert worst["ci_low"] <= worst["alpha"] <= worst["ci_high"] and worst["n_seeds"] == len(SEEDS)
    # the worst group's value at the optimum: both groups equal there (the curves cross)
    f0, f1 = power(0.95, -0.5, 0.5), power(0.95, -0.9, 0.3)
    a = worst["alpha"]
    assert worst["value"] == pytest.approx(min(f0((1 - a) * K), f1(a * K)), abs=0.003)


def test_loss_is_minimised() -> None:
    loss = rows_from(power(0.1, 2.0, 0.5), power(0.1, 2.0, 0.5), metric="loss")
    best = {r["criterion"]: r for r in best_alpha(loss, K, n_boot=20)}
    assert best["worst_group"]["alpha"] == pytest.approx(0.5, abs=0.01)
    assert best["worst_group"]["value"] == pytest.approx(0.1 + 2.0 * (500 ** -0.5), abs=1e-3)


def test_bootstrap_is_seeded() -> None:
    curves = rows_from(power(0.95, -0.5, 0.5), power(0.95, -0.9, 0.3), noise=0.003)
    assert best_alpha(curves, K, n_boot=40, seed=3) == best_alpha(curves, K, n_boot=40, seed=3)


def test_best_alpha_stays_inside_the_fitted_range() -> None:
    """Group 1 saturates after a handful of items: the curves cross near α ≈ 0.02, between α = 0 (group 1 has no
    data: its observed value there is used) and the smallest α fitted (0.2). Nothing is extrapolated into that gap."""
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    out = []
    for alpha in alphas:
        for seed in (1, 2, 3):
            f1 = 0.5 if alpha == 0 else 0.95 - 0.9 * (alpha * K) ** -1.5
            f0 = 0.9 + 0.05 * (1 - alpha)
            out += [{"alloc_attribute": "a", "alpha": alpha, "seed": seed, "attribute": "a", "grp": g,
                     "metric": "bal_acc", "value": v} for g, v in ((0, f0), (1, f1))]
    (worst,) = [r for r in best_alpha(out, K) if r["criterion"] == "worst_group"]
    assert worst["alpha"] == pytest.approx(0.2, abs=1e-9)
    assert worst["interval"] == "per-seed range (3 seeds)" and worst["n_boot"] == 0
    assert worst["ci_low"] == worst["ci_high"] == pytest.approx(0.2)  # identical seeds: no spread


def test_fewer_than_five_seeds_report_the_range_of_per_seed_optima() -> None:
    curves = [r for r in rows_from(power(0.95, -0.5, 0.5), power(0.95, -0.9, 0.3), noise=0.003) if r["seed"] <= 3]
    r = {(x["metric"], x["criterion"]): x for x in best_alpha(curves, K)}
    worst = r[("bal_acc", "worst_group")]
    per_seed = []
    for s in (1, 2, 3):
        (one,) = [x for x in best_alpha([c for c in curves if c["seed"] == s], K)
                  if x["metric"] == "bal_acc" and x["criterion"] == "worst_group"]
        per_seed.append(one["alpha"])
    assert (worst["ci_low"], worst["ci_high"]) == pytest.approx((min(per_seed), max(per_seed)))
    assert worst["interval"].startswith("per-seed range")
