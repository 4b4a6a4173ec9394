"""The bound check (method.md §6) and cross-attribute slopes on hand-made curves."""

from __future__ import annotations

import pytest

from engine.analysis import cross_slopes, curves_from_rows
from engine.bound import bounds


def curves(acc: dict[tuple[str, int, float], float]) -> list[dict]:
    """Rows for allocating on 'a' with accuracies given per (attribute, grp, alpha); two seeds, same values."""
    return [{"alloc_attribute": "a", "alpha": alpha, "seed": s, "attribute": attr, "grp": grp, "metric": "acc",
             "value": v} for (attr, grp, alpha), v in acc.items() for s in (1, 2)]


SEP = [{"attribute": "a", "distance": "tv_paper", "value": 0.05, "value_y0": 0.04, "value_y1": 0.06}]
GAPS = [{"attribute": "a", "metric": "bal_acc", "gap": 0.1}]


def test_bound_holds_and_is_computed_from_the_larger_class_tv() -> None:
    acc = {("overall", -1, 0.0): 0.90, ("overall", -1, 1.0): 0.91,
           ("a", 0, 0.0): 0.92, ("a", 0, 1.0): 0.90, ("a", 1, 0.0): 0.85, ("a", 1, 1.0): 0.93}
    py = [{"attribute": "a", "alpha": 0.0, "p_y": 0.5}, {"attribute": "a", "alpha": 1.0, "p_y": 0.5}]
    rows = {r["grp"]: r for r in bounds(curves(acc), SEP, py, GAPS)}
    g1 = rows[1]
    assert g1["epsilon"] == 0.06 and g1["overall_delta"] == pytest.approx(0.01)
    assert g1["bound"] == pytest.approx(4 * 0.06 + 0.01) and g1["observed"] == pytest.approx(0.08)
    assert not g1["violated"] and not g1["vacuous"] and g1["reason"] == ""
    assert g1["paper_quantity"] == pytest.approx(2 * 0.05 + 0.1)


def test_violation_names_the_broken_assumption() -> None:
    acc = {("overall", -1, 0.0): 0.90, ("overall", -1, 1.0): 0.90,
           ("a", 0, 0.0): 0.99, ("a", 0, 1.0): 0.60, ("a", 1, 0.0): 0.60, ("a", 1, 1.0): 0.99}
    py = [{"attribute": "a", "alpha": 0.0, "p_y": 0.40}, {"attribute": "a", "alpha": 1.0, "p_y": 0.60}]
    rows = bounds(curves(acc), SEP, py, GAPS)
    assert all(r["violated"] for r in rows)
    assert "P(Y=1) of the training sets differs (0.400 vs 0.600)" in rows[0]["reason"]
    assert "marginal" in rows[0]["reason"]
    full = bounds(curves(acc), SEP, py, GAPS, mode="full")
    assert "last-layer retraining only" in full[0]["reason"]


def test_vacuous_bound() -> None:
    acc = {("overall", -1, 0.0): 0.5, ("overall", -1, 1.0): 0.9, ("a", 0, 0.0): 0.5, ("a", 0, 1.0): 0.6,
           ("a", 1, 0.0): 0.5, ("a", 1, 1.0): 0.6}
    sep = [{**SEP[0], "value_y1": 0.2}]
    rows = bounds(curves(acc), sep, [], GAPS)
    assert all(r["vacuous"] for r in rows)  # 4 * 0.2 + 0.4 > 1


def test_cross_slopes_cover_every_attribute() -> None:
    rows = []
    for alpha in (0.0, 0.5, 1.0):
        for seed in (1, 2):
            rows += [
                {"alloc_attribute": "a", "alpha": alpha, "seed": seed, "attribute": "a", "grp": 1, "metric": "loss",
                 "value": 0.5 - 0.2 * alpha},
                {"alloc_attribute": "a", "alpha": alpha, "seed": seed, "attribute": "a", "grp": 0, "metric": "loss",
                 "value": 0.3 + 0.1 * alpha},
                {"alloc_attribute": "a", "alpha": alpha, "seed": seed, "attribute": "b", "grp": 1, "metric": "loss",
                 "value": 0.4 + 0.05 * alpha},
            ]
    out = {(r["attribute"], r["grp"]): r for r in cross_slopes(curves_from_rows(rows))}
    assert out[("a", 1)]["slope"] == pytest.approx(-0.2)
    assert out[("a", 0)]["slope"] == pytest.approx(0.1)  # per unit alpha, i.e. minus the own-share slope
    assert out[("b", 1)]["slope"] == pytest.approx(0.05) and out[("b", 1)]["n"] == 6


def test_epsilon_comes_from_the_checkpoint_encoder() -> None:
    acc = {("overall", -1, 0.0): 0.90, ("overall", -1, 1.0): 0.91,
           ("a", 0, 0.0): 0.92, ("a", 0, 1.0): 0.90, ("a", 1, 0.0): 0.85, ("a", 1, 1.0): 0.93}
    ckpt = [{"attribute": "a", "distance": "tv_paper", "value": 0.02, "value_y0": 0.015, "value_y1": 0.025,
             "pretrain_seed": 7}]
    rows = bounds(curves(acc), SEP, [], GAPS, epsilon_rows=ckpt)
    assert all(r["epsilon"] == 0.025 and r["epsilon_seed"] == 7 for r in rows)
    assert rows[0]["paper_quantity"] == pytest.approx(2 * 0.05 + 0.1)  # the notebooks' quantity keeps the mean TV


def _noisy(diffs: list[float]) -> list[dict]:
    """Group 1's accuracy rises by diffs[s] from α=0 to α=1 in seed s; overall accuracy is flat."""
    out = []
    for s, d in enumerate(diffs):
        for alpha, v in ((0.0, 0.8), (1.0, 0.8 + d)):
            out.append({"alloc_attribute": "a", "alpha": alpha, "seed": s, "attribute": "a", "grp": 1,
                        "metric": "acc", "value": v})
            out.append({"alloc_attribute": "a", "alpha": alpha, "seed": s, "attribute": "overall", "grp": -1,
                        "metric": "acc", "value": 0.9})
    return out


def test_violated_only_beyond_seed_noise() -> None:
    sep = [{"attribute": "a", "distance": "tv_paper", "value": 0.01, "value_y0": 0.01, "value_y1": 0.01}]
    # bound = 4 * 0.01 = 0.04; the mean difference 0.05 exceeds it, but the seeds disagree widely
    (noisy,) = bounds(_noisy([0.01, 0.09, 0.05]), sep, [], GAPS)
    assert noisy["observed"] == pytest.approx(0.05) and noisy["status"] == "within noise of the bound"
    assert not noisy["violated"] and noisy["excess_se"] > 0
    (clear,) = bounds(_noisy([0.10, 0.11, 0.12]), sep, [], GAPS)
    assert clear["status"] == "violated" and clear["violated"] and clear["reason"]
    (holds,) = bounds(_noisy([0.01, 0.02, 0.03]), sep, [], GAPS)
    assert holds["status"] == "holds" and not holds["violated"]
