"""Spec -> stages and trials, each with a content-hash id. Pure: no I/O.

An id hashes a canonical JSON dump (sorted keys) of everything that can change the result: the resolved config,
the ids of the stages it depends on, and a code-version salt for its kind. Paths, experiment names and worker
counts are not hashed, so renaming an experiment or moving the database re-uses every result, and extending the
α grid or the seeds adds only new trials.

To add a stage kind: add a salt to CODE_VERSION, a dataclass-free ``PlannedStage`` in :func:`make_plan`, and a
runner for it in ``engine/pipeline.py``. Bump a salt when code changes the results of that kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from engine.spec import Spec

# Bump the salt of a kind when its code changes its results: every id of that kind (and downstream) changes.
CODE_VERSION: dict[str, str] = {
    "dataset": "1",
    "pretrain": "1",
    "embed": "1",
    "separation": "2",
    "trial": "3",  # 2: metrics on the paired test-item resamples; 3: last-layer heads trained as one batched problem
    "analysis": "3",  # 3: seed + test-set intervals, null partitions, exact small-n tests
    "transfer": "1",
}
STAGE_KINDS: tuple[str, ...] = ("dataset", "pretrain", "embed", "separation", "transfer", "trials", "analysis")
TRIAL_SPLITS: tuple[str, ...] = ("pool_train", "pool_val", "test")


def content_id(kind: str, key: dict[str, Any]) -> str:
    """Short, stable id: kind prefix + sha256 of the canonical JSON of the key and the kind's code salt."""
    doc = json.dumps({"kind": kind, "salt": CODE_VERSION[kind], "key": key}, sort_keys=True, separators=(",", ":"))
    return f"{kind[:2]}-{hashlib.sha256(doc.encode()).hexdigest()[:20]}"


@dataclass(frozen=True)
class PlannedStage:
    stage_id: str
    kind: str
    label: str
    key: dict[str, Any]
    deps: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)  # handy resolved values (seed, split, attribute...)


@dataclass(frozen=True)
class PlannedTrial:
    trial_id: str
    attribute: str
    alpha: float  # reallocate: the share of group 1; expand: 0.5 (resolved from the counts when it runs)
    seed: int
    mode: str
    key: dict[str, Any]
    grown: int | None = None  # expand: the group whose count grows
    added: int | None = None  # expand: its count (the other group has allocation.base)


@dataclass(frozen=True)
class Plan:
    experiment: str
    dataset: PlannedStage
    pretrain: dict[int, PlannedStage]  # by pre-training seed
    embed: dict[tuple[int, str], PlannedStage]  # by (pre-training seed, split)
    separation: dict[tuple[str, int], PlannedStage]  # by (attribute, pre-training seed)
    trials: list[PlannedTrial]
    analysis: PlannedStage
    transfer: dict[str, PlannedStage] = field(default_factory=dict)  # by attribute (separation.distances "transfer")

    def stages(self) -> list[PlannedStage]:
        return [self.dataset, *self.pretrain.values(), *self.embed.values(), *self.separation.values(),
                *self.transfer.values(), self.analysis]


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


def _settings(model: Any) -> Any:
    """Training settings as they change a result: never ``device`` (CPU and GPU agree up to summation order), and
    ``amp`` only when set, so the ids of runs without it stay as they were."""
    return model.model_dump(mode="json", exclude={"device"} | ({"amp"} if model.amp == "none" else set()))


def _rule(rule: Any) -> Any:
    """A binarisation rule's dump; fields added later are left out while unset (or at their default), so existing
    ids do not change. ``missing = "drop"`` is hashed: it changes which items the dataset holds."""
    skip = ({"expression"} if rule.expression is None else set()) | ({"missing"} if rule.missing == "error" else set())
    skip |= {f for f in ("intersection", "groups") if getattr(rule, f, None) is None}  # attribute-only fields
    return rule.model_dump(mode="json", exclude=skip)


def _separation_key(spec: Spec) -> dict[str, Any]:
    """The separation settings that change a result; ``match_sizes`` only when set, so existing ids stay; the
    stage-computed distances (``transfer``) and their settings never (they have their own stage)."""
    skip = {"min_effect", "transfer_repeats"} | (set() if spec.separation.match_sizes else {"match_sizes"})
    key = spec.separation.model_dump(mode="json", exclude=skip)
    key["distances"] = [d for d in key["distances"] if d not in STAGE_DISTANCES]
    return key


STAGE_DISTANCES = ("transfer",)  # separation.distances with a stage of their own (engine.trial.STAGE_DISTANCES)


def _weights_digest(spec: Spec) -> str | None:
    """The content hash of weights files the backbone's options name (``weights_digest(options)`` of backbones that
    load them: torchvision, hf_vision), so that a replaced file re-runs; None for the others (their ids do not
    change). Options a backbone cannot read give None here: validation reports them."""
    from backends import backend_class

    try:
        digest = getattr(backend_class(spec.backbone.kind), "weights_digest", None)
        return None if digest is None else digest(spec.backbone.options)
    except (OSError, ValueError, RuntimeError):  # BackendError, pydantic's ValidationError, a missing file
        return None


def _expand_trials(spec: Spec, dataset_id: str, upstream: dict[str, Any], finetune: Any) -> list[PlannedTrial]:
    """protocol 'expand': per attribute, grown group, count and seed, one trial whose train set has ``count``
    items of the grown group and ``base`` of the other; its val set is the balanced K_val set of α = 0.5."""
    out = []
    for attr in spec.attribute_names:
        for grown in spec.allocation.grow:
            for added in spec.allocation.counts:
                for seed in spec.allocation.seeds:
                    tkey = {
                        "dataset_id": dataset_id, **upstream, "attribute": attr, "protocol": "expand",
                        "grown": grown, "added": added, "base": spec.allocation.base, "seed": seed,
                        "budget_val": spec.allocation.budget_val, "sampler": spec.allocation.sampler,
                        "finetune": finetune,
                        "test_resamples": {"n": spec.analysis.test_resamples, "seed": spec.analysis.test_resample_seed},
                    }
                    if spec.regulariser.applies_to("finetune"):
                        tkey["regulariser"] = spec.regulariser.result_key("finetune")
                    out.append(PlannedTrial(content_id("trial", tkey), attr, 0.5, seed, spec.finetune.mode, tkey,
                                            grown, added))
    return out


def make_plan(spec: Spec) -> Plan:
    """Expand a resolved spec into content-hashed stages and trials."""
    ds_key = {
        # null_partitions only adds attributes (a pure function of item ids and random_seed): not in the id
        "dataset": spec.dataset.model_dump(mode="json", exclude={"null_partitions"}),
        "task": _rule(spec.task),
        "attributes": [_rule(a) for a in spec.attributes],
    }
    dataset = PlannedStage(content_id("dataset", ds_key), "dataset", f"dataset {spec.dataset.kind}", ds_key)

    pretrain: dict[int, PlannedStage] = {}
    embed: dict[tuple[int, str], PlannedStage] = {}
    weights = _weights_digest(spec)
    for seed in spec.backbone.pretrain_seeds:
        key = {
            "dataset_id": dataset.stage_id,
            "backbone": spec.backbone.kind,
            "options": spec.backbone.options,
            "settings": _settings(spec.backbone.pretrain),
            # {"kind": "none"} when no penalty applies in pre-training (weight 0 included): the plain encoder's id
            "regulariser": spec.regulariser.result_key("pretrain"),
            "seed": seed,
        }
        if spec.backbone.transform is not None:  # only when set, so the ids of specs without one stay as they were
            key["transform"] = spec.backbone.transform.model_dump(mode="json")
        if weights is not None:
            key["weights_sha256"] = weights
        pretrain[seed] = PlannedStage(content_id("pretrain", key), "pretrain", f"pretrain seed={seed}", key,
                                      (dataset.stage_id,), {"seed": seed})
        # the trial checkpoint's pools are embedded for last-layer trials (they train on cached embeddings) and for
        # the transfer distance (heads trained on one group's pool items)
        pools = seed == spec.backbone.checkpoint_seed and (
            spec.finetune.mode == "last_layer" or "transfer" in spec.separation.distances)
        splits = TRIAL_SPLITS if pools else ("test",)
        for split in splits:
            ekey = {"pretrain_id": pretrain[seed].stage_id, "split": split}
            embed[(seed, split)] = PlannedStage(content_id("embed", ekey), "embed", f"embed seed={seed} {split}",
                                                ekey, (pretrain[seed].stage_id,), {"seed": seed, "split": split})

    separation: dict[tuple[str, int], PlannedStage] = {}
    for attr in spec.attribute_names:
        for seed in spec.backbone.pretrain_seeds:
            skey = {
                "embed_id": embed[(seed, "test")].stage_id,
                "dataset_id": dataset.stage_id,
                "attribute": attr,
                "separation": _separation_key(spec),
            }
            separation[(attr, seed)] = PlannedStage(
                content_id("separation", skey), "separation", f"separation {attr} seed={seed}", skey,
                (embed[(seed, "test")].stage_id, dataset.stage_id), {"attribute": attr, "seed": seed})

    cs = spec.backbone.checkpoint_seed
    finetune = _settings(spec.finetune)
    transfer: dict[str, PlannedStage] = {}
    if "transfer" in spec.separation.distances:
        for attr in spec.attribute_names:
            tkey = {
                "dataset_id": dataset.stage_id, "embed_ids": {s: embed[(cs, s)].stage_id for s in TRIAL_SPLITS},
                "attribute": attr, "budget": spec.allocation.budget, "budget_val": spec.allocation.budget_val,
                "head": {k: v for k, v in finetune.items() if k != "mode"}, "repeats": spec.separation.transfer_repeats,
                "seed": spec.separation.seed,
                "test_resamples": {"n": spec.analysis.test_resamples, "seed": spec.analysis.test_resample_seed},
            }
            transfer[attr] = PlannedStage(content_id("transfer", tkey), "transfer", f"transfer {attr}", tkey,
                                          tuple(sorted({*tkey["embed_ids"].values(), dataset.stage_id})),
                                          {"attribute": attr, "seed": cs})
    trials = []
    # last-layer trials depend on the cached embeddings; the others on the checkpoint itself
    upstream: dict[str, Any] = (
        {"embed_ids": {s: embed[(cs, s)].stage_id for s in TRIAL_SPLITS}}
        if spec.finetune.mode == "last_layer" else {"pretrain_id": pretrain[cs].stage_id})
    if spec.allocation.protocol == "expand":
        trials = _expand_trials(spec, dataset.stage_id, upstream, finetune)
    for attr in spec.attribute_names if spec.allocation.protocol == "reallocate" else ():
        for alpha in spec.allocation.alphas:
            for seed in spec.allocation.seeds:
                tkey = {
                    "dataset_id": dataset.stage_id,
                    **upstream,
                    "attribute": attr,
                    "alpha": alpha,
                    "seed": seed,
                    "budget": spec.allocation.budget,
                    "budget_val": spec.allocation.budget_val,
                    "sampler": spec.allocation.sampler,
                    "finetune": finetune,
                    "test_resamples": {"n": spec.analysis.test_resamples, "seed": spec.analysis.test_resample_seed},
                }
                if spec.regulariser.applies_to("finetune"):  # only then, so other trials' ids stay as they were
                    tkey["regulariser"] = spec.regulariser.result_key("finetune")
                trials.append(PlannedTrial(content_id("trial", tkey), attr, alpha, seed, spec.finetune.mode, tkey))

    akey = {
        "experiment": spec.experiment.name,
        "analysis": _dump(spec.analysis),
        "trials": sorted(t.trial_id for t in trials),
        "separations": sorted(s.stage_id for s in separation.values()),
        **({"transfer": sorted(s.stage_id for s in transfer.values())} if transfer else {}),
        "embeds": sorted(e.stage_id for e in embed.values()),
    }
    analysis = PlannedStage(content_id("analysis", akey), "analysis", "analysis", akey)
    return Plan(spec.experiment.name, dataset, pretrain, embed, separation, trials, analysis, transfer)

