"""Planner: content-hashed ids that are stable, name-independent, and change only with what changes results."""

from __future__ import annotations

from engine.plan import make_plan
from engine.spec import Spec, load_spec
from tests.conftest import TINY_SPEC


def tiny() -> Spec:
    return load_spec(TINY_SPEC)[0]


def edit(spec: Spec, **sections: dict) -> Spec:
    doc = spec.model_dump(mode="json")
    for section, changes in sections.items():
        doc[section] = {**doc[section], **changes}
    return Spec.model_validate(doc)


def test_golden_ids() -> None:
    """Ids are part of the store's contract: changing them silently re-runs every user's experiments."""
    plan = make_plan(tiny())
    assert plan.dataset.stage_id == "da-56d0e1675d402d96c0c0"
    assert plan.pretrain[0].stage_id == "pr-114c8ba6e6d256aea211"
    first = plan.trials[0]
    assert (first.attribute, first.alpha, first.seed) == ("digit_group", 0.0, 1)
    # trial salt 3 (last-layer heads trained as one batched problem): every trial id changed once, on purpose
    assert first.trial_id == "tr-6981cc08ebdd6d942342"


def test_plan_shape() -> None:
    plan = make_plan(tiny())
    assert len(plan.pretrain) == 2
    # the trial checkpoint's seed embeds the pools and the test set; other seeds only the test set (for TV)
    assert set(plan.embed) == {(0, "pool_train"), (0, "pool_val"), (0, "test"), (1, "test")}
    assert len(plan.separation) == 5 * 2  # digit_group, colour and 3 null partitions x 2 pre-training seeds
    assert len(plan.trials) == 5 * 3 * 2
    assert len({t.trial_id for t in plan.trials}) == len(plan.trials)


def test_ids_ignore_the_experiment_name() -> None:
    a, b = make_plan(tiny()), make_plan(edit(tiny(), experiment={"name": "renamed"}))
    assert [t.trial_id for t in a.trials] == [t.trial_id for t in b.trials]
    assert a.pretrain[0].stage_id == b.pretrain[0].stage_id
    assert a.analysis.stage_id != b.analysis.stage_id  # the analysis is per experiment


def test_extending_the_grid_keeps_finished_ids() -> None:
    base = make_plan(tiny())
    more = make_plan(edit(tiny(), allocation={"alpha": [0.0, 0.25, 0.5, 1.0], "seeds": [1, 2, 3]}))
    old, new = {t.trial_id for t in base.trials}, {t.trial_id for t in more.trials}
    assert old < new
    assert len(new - old) == 5 * 4 * 3 - 5 * 3 * 2


def test_a_result_changing_field_changes_only_downstream_ids() -> None:
    base = make_plan(tiny())
    lr = make_plan(edit(tiny(), finetune={"lr": 0.01}))
    assert base.pretrain[0].stage_id == lr.pretrain[0].stage_id
    assert base.embed[(0, "test")].stage_id == lr.embed[(0, "test")].stage_id
    assert not {t.trial_id for t in base.trials} & {t.trial_id for t in lr.trials}
    pre = make_plan(edit(tiny(), backbone={"pretrain": {"max_epochs": 4, "patience": 2}}))
    assert pre.dataset.stage_id == base.dataset.stage_id
    assert pre.pretrain[0].stage_id != base.pretrain[0].stage_id
    assert not {t.trial_id for t in base.trials} & {t.trial_id for t in pre.trials}


def test_null_partitions_and_match_sizes_leave_other_ids_alone() -> None:
    base = make_plan(tiny())
    fewer = make_plan(edit(tiny(), dataset={"null_partitions": 1}))
    assert fewer.dataset.stage_id == base.dataset.stage_id and fewer.pretrain[0].stage_id == base.pretrain[0].stage_id
    assert {t.trial_id for t in fewer.trials} < {t.trial_id for t in base.trials}
    assert {t.attribute for t in base.trials} - {t.attribute for t in fewer.trials} == {"random_2", "random_3"}
    matched = make_plan(edit(tiny(), separation={"match_sizes": True}))
    assert {s.stage_id for s in matched.separation.values()}.isdisjoint(s.stage_id for s in base.separation.values())
    assert [t.trial_id for t in matched.trials] == [t.trial_id for t in base.trials]
    boot = make_plan(edit(tiny(), analysis={"test_resamples": 500}))
    assert {t.trial_id for t in boot.trials}.isdisjoint(t.trial_id for t in base.trials)  # trials store them
