"""The intervention comparison (engine/intervention.py): Pareto front, the trade-off sentence, and the question
whether another kind beats the paper's surrogate, on rows with a known answer."""

from __future__ import annotations

import math

from engine.intervention import beats_surrogate, label, pareto, summarise


def variant(kind: str, weight: float, acc: float, slope: float, lo: float | None = None, hi: float | None = None,
            tv: float = 0.2) -> dict:
    return {"experiment": f"{kind}-{weight}", "regulariser": {"kind": kind, "weight": weight},
            "attribute": "digit_group", "tv": {"value": tv}, "controls": {},
            "slope": {"slope": slope, "ci_low": slope - 0.01 if lo is None else lo,
                      "ci_high": slope + 0.01 if hi is None else hi},
            "acc": {"mean": acc, "sd": 0.01, "n": 3}, "worst": {"mean": acc - 0.05, "sd": 0.01, "n": 3}}


def test_labels():
    assert label({"kind": "none"}) == "none" and label({"kind": "mmd", "weight": 0.0}) == "none"
    assert label({"kind": "tv_surrogate", "weight": 0.01}) == "tv_surrogate λ=0.01"


def test_pareto_front():
    pts = [(0.95, 0.5), (0.94, 0.1), (0.90, 0.2), (0.95, 0.5), (math.nan, 0.0), (0.80, 0.05)]
    # (0.90, 0.2) is dominated by (0.94, 0.1); a tie is not domination; a missing value is never on the front
    assert pareto(pts) == [True, True, False, True, False, True]


def test_best_trade_off_is_the_smallest_slope_within_the_cost_tolerance():
    rows = [variant("tv_surrogate", 0.0, 0.96, -0.56), variant("tv_surrogate", 1e-3, 0.955, -0.10),
            variant("tv_surrogate", 1e-2, 0.80, -0.02, lo=-0.05, hi=0.01), variant("mmd", 1.0, 0.50, 0.0)]
    out = summarise(rows)
    s = out["sentence"]
    assert s.startswith("Best trade-off") and "tv_surrogate λ=0.001: |loss slope| 0.1000" in s, s
    assert "the smallest slope, mmd λ=1" in s and "costs more" in s, s
    assert [r["pareto"] for r in out["rows"]] == [True, True, True, True]
    assert math.isclose(out["rows"][1]["cost"], 0.005) and out["baseline"]["label"] == "none"


def test_when_every_reduction_is_costly_the_sentence_says_so():
    rows = [variant("tv_surrogate", 0.0, 0.96, -0.56), variant("tv_surrogate", 1e-2, 0.80, -0.02, lo=-0.05, hi=0.01),
            variant("adversarial", 1.0, 0.90, -0.30)]
    s = summarise(rows)["sentence"]
    assert s.startswith("Every penalty that lowers the slope") and "the cheapest is adversarial λ=1" in s, s
    assert "includes 0" in s  # the smallest slope's interval [−0.05, +0.01]


def test_no_reduction_and_no_baseline():
    assert "No penalty lowered" in summarise([variant("tv_surrogate", 0.0, 0.96, -0.1),
                                               variant("mmd", 0.5, 0.95, -0.2)])["sentence"]
    assert "No unregularised variant" in summarise([variant("mmd", 0.5, 0.95, -0.2)])["sentence"]


def test_does_another_kind_beat_the_surrogate():
    rows = summarise([variant("tv_surrogate", 0.0, 0.96, -0.56), variant("tv_surrogate", 1e-2, 0.80, -0.10),
                      variant("adversarial", 1.0, 0.85, -0.05), variant("mmd", 1.0, 0.70, -0.20)])["rows"]
    out = beats_surrogate(rows)
    assert out["adversarial"].startswith("yes: adversarial λ=1 dominates tv_surrogate λ=0.01")
    assert out["mmd"].startswith("no")
    assert beats_surrogate(summarise([variant("mmd", 1.0, 0.7, -0.2)])["rows"]) == {
        "mmd": "no tv_surrogate setting to compare"}
