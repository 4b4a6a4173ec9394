"""The spec DSL: TOML in, frozen pydantic models out.

A spec file describes one experiment: dataset, task label, subgroup attributes, backbone, regulariser, allocation
grid, fine-tuning. ``load_spec(path)`` validates it once, at the edge, and returns one :class:`Spec` per variant of
its ``[grid]`` table. Every problem becomes a :class:`SpecError` naming the file, the field path and the fix.

To add a field: add it to the model with a default and a ``description`` (it appears in ``alloclab schema``), and,
if it can change a result, make sure the planner hashes it (it does, for every field of the resolved sections).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import SpecError

RANDOM_ATTRIBUTE = "random"  # the null-baseline attribute every spec gets (method.md §1)
_NULL_NAME = re.compile(r"^random(_[0-9]+)?$")  # random, random_2, random_3, ...: the null partitions


def null_partition_name(k: int) -> str:
    """Name of the k-th null partition (1-based): 'random', then 'random_2', 'random_3', ..."""
    return RANDOM_ATTRIBUTE if k == 1 else f"{RANDOM_ATTRIBUTE}_{k}"


def is_null_partition(attribute: str) -> bool:
    """True for the null-baseline attributes ('random', 'random_2', ...; pooled reports prefix 'experiment:')."""
    return bool(_NULL_NAME.match(attribute.rsplit(":", 1)[-1]))


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _registered(kind: str, known: list[str], what: str) -> str:
    """``kind`` if it is one of ``known`` or names user code ('package.module:Class', imported only when the
    dataset or backbone is used); else an error listing the choices (spec errors turn it into the fix)."""
    if kind not in known and not _PLUGIN_REF.match(kind):
        raise ValueError(f"unknown {what} '{kind}'; known {what}s are: {', '.join(sorted(known))} (or your own "
                         "code as 'package.module:Class')")
    return kind


from backends.plugins import REF as _PLUGIN_REF  # noqa: E402  (light: no torch)


class ExperimentSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Experiment name (letters, digits, _ . -).")
    description: str = Field("", description="Free text shown in the report.")


class DatasetSpec(_Model):
    kind: str = Field(description="Dataset loader: one of backends.datasets.REGISTRY (e.g. 'colored_mnist'), an "
                      "installed plugin (entry point group 'alloclab.datasets'), or 'package.module:Loader'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Loader-specific options.")
    random_seed: int = Field(42, description="Seed of the Bernoulli(0.5) 'random' attribute (the null baseline).")
    null_partitions: int = Field(
        3, ge=1, le=50, description="Random 50/50 groupings run through the identical pipeline as the null baseline "
        "('random', 'random_2', ...). An attribute matters only if its effect lies outside the null partitions' "
        "range; 3 or more are needed for a null band (a pure function of item ids and random_seed, so adding "
        "partitions re-uses every other result).")

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        from backends.datasets import known_kinds

        return _registered(v, known_kinds(), "dataset")


class BinaryRule(_Model):
    """How raw columns become 0/1: ``column`` with ``threshold`` (value >= threshold -> 1) or ``values`` (value in
    list -> 1), or with neither when the column already holds only 0 and 1; or an ``expression``: one SQL boolean
    expression over the dataset's columns, evaluated by a sandboxed DuckDB (e.g. ``"age >= 60 AND sex = 'F'"``).

    A missing value (NaN, null, empty text; an expression that is NULL) is never a class: by default it is an
    error, and with ``missing = "drop"`` those items are left out of every split.
    """

    column: str | None = Field(None, description="Source column of the dataset.")
    threshold: float | None = Field(None, description="1 where the column's value >= threshold.")
    values: list[int | float | str] | None = Field(None, description="1 where the column's value is one of these.")
    expression: str | None = Field(
        None, description="1 where this SQL boolean expression over the columns is true: exactly one scalar "
        "expression (columns, constants, operators, CASE, CAST, scalar functions); no ';', subqueries, table "
        "functions or file access. Empty text and NaN in the columns are NULL here.")
    missing: Literal["error", "drop"] = Field(
        "error", description="Items whose value is missing (NaN, null, empty text; an expression that is NULL): "
        "'error' stops with their count and ids, 'drop' leaves them out of every split (the counts are logged).")

    @field_validator("expression")
    @classmethod
    def _one_expression(cls, v: str | None) -> str | None:
        # Caught here so `alloclab validate --no-data` rejects stacked statements too; the dataset stage then
        # checks the expression's syntax tree with DuckDB's parser before it evaluates anything.
        if v is None:
            return v
        if not v.strip():
            raise ValueError("the expression is empty: write a SQL boolean expression over the dataset's columns, "
                             "e.g. \"age >= 60 AND sex = 'F'\"")
        if ";" in v:
            raise ValueError("';' is not allowed: write one SQL boolean expression, not statements (for a ';' "
                             "inside a text constant write chr(59))")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> "BinaryRule":
        if getattr(self, "intersection", None) is not None:  # AttributeSpec: the product of other attributes
            return self
        if (self.column is None) == (self.expression is None):
            raise ValueError("give either 'column' (with 'threshold' or 'values' if needed) or 'expression'")
        if self.threshold is not None and self.values is not None:
            raise ValueError("give either 'threshold' or 'values', not both")
        if self.expression is not None and (self.threshold is not None or self.values is not None):
            raise ValueError("'threshold' and 'values' apply to 'column', not to 'expression'")
        if self.values is not None and not self.values:
            raise ValueError("'values' is empty: list the values that mean 1")
        return self


class TaskSpec(BinaryRule):
    """The binary task label Y."""


GROUP_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class AttributeSpec(BinaryRule):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$", description="Attribute name used in tables and the report.")
    values: list[int | float | str] | dict[str, list[int | float | str]] | None = Field(  # type: ignore[assignment]
        None, description="A list: 1 where the column's value is one of these. A table {group: [values], ...}: K "
        "named groups (K >= 2), run as K one-vs-rest attributes named 'attribute=group' (a value in no group is "
        "missing).")
    groups: Literal["categories"] | None = Field(
        None, description="'categories': every distinct value of `column` is a group (resolved from the data when "
        "the spec is loaded for a run; group names are the values, with characters other than letters, digits and "
        "_ . + - replaced by _).")
    intersection: list[str] | None = Field(
        None, min_length=2, description="Names of earlier attributes whose groups' product is this attribute's groups "
        "(e.g. ['sex', 'age_over_60']: 4 groups), run one-vs-rest as 'attribute=sex1_age_over_600'-style names; an "
        "item missing in any component is missing here.")
    missing: Literal["error", "drop", "exclude"] = Field(
        "error", description="Items whose value is missing: 'error' stops with their count and ids; 'drop' leaves "
        "them out of every split (and so of every attribute); 'exclude' keeps them everywhere but in this "
        "attribute: no group, never allocated, measured or scored as one of its groups (the paper's per-attribute "
        "NaN handling on MIMIC-CXR).")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == "overall" or is_null_partition(v):
            raise ValueError(f"'{v}' is reserved (alloclab adds the null partitions 'random', 'random_2', ... "
                             "itself); choose another name")
        return v

    @model_validator(mode="after")
    def _groups_rule(self) -> "AttributeSpec":
        if self.groups is not None and (self.column is None or self.threshold is not None
                                        or self.values is not None or self.intersection is not None):
            raise ValueError("groups = \"categories\" makes every value of 'column' a group: give 'column' and no "
                             "threshold, values or intersection")
        if self.intersection is not None:
            if self.column is not None or self.expression is not None or self.threshold is not None or (
                    self.values is not None):
                raise ValueError("'intersection' builds the groups from other attributes: give no column, "
                                 "expression, threshold or values with it")
            if len(set(self.intersection)) != len(self.intersection):
                raise ValueError("'intersection' names an attribute twice")
        if isinstance(self.values, dict):
            if len(self.values) < 2:
                raise ValueError("'values' as a table needs at least 2 groups, e.g. {white = [...], black = [...]}")
            bad = [g for g in self.values if not GROUP_NAME.match(g)]
            if bad:
                raise ValueError(f"group name(s) {bad} may use only letters, digits and _ . + -")
            seen: dict[Any, str] = {}
            for g, vals in self.values.items():
                if not vals:
                    raise ValueError(f"group '{g}' lists no values")
                for v in vals:
                    if v in seen:
                        raise ValueError(f"value {v!r} is in groups '{seen[v]}' and '{g}'; a value may be in one group")
                    seen[v] = g
        return self

    @property
    def is_binary(self) -> bool:
        """A 0/1 attribute (today's kind); False for K named groups and intersections."""
        return self.intersection is None and not isinstance(self.values, dict) and self.groups is None

    def group_names(self, components: dict[str, list[str]]) -> list[str]:
        """The group labels: '0'/'1' for a binary attribute, the table's keys, or the product of the components'
        labels ({component}{label} joined by '_') for an intersection."""
        if self.groups == "categories":
            raise SpecError(f"attribute '{self.name}': groups = \"categories\" is resolved from the data "
                            "(engine.data.resolve_categories) before the groups are known")
        if isinstance(self.values, dict):
            return list(self.values)
        if self.intersection is None:
            return ["0", "1"]
        labels = [[f"{c}{g}" for g in components[c]] for c in self.intersection]
        return ["_".join(p) for p in itertools.product(*labels)]

class TrainSettings(_Model):
    """Optimiser settings (Adam for vision and heads, AdamW for text); defaults are the paper's coloured-MNIST
    values (method.md §1.1)."""

    lr: float = Field(1.587e-3, gt=0, description="Learning rate.")
    weight_decay: float = Field(1.537e-3, ge=0, description="Weight decay.")
    batch_size: int = Field(128, ge=1, description="Mini-batch size.")
    max_epochs: int = Field(50, ge=1, description="Upper bound on epochs.")
    patience: int = Field(10, ge=1, description="Early stopping: epochs without val balanced-accuracy gain.")
    lr_patience: int = Field(10, ge=1, description="ReduceLROnPlateau patience (factor 0.1).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the arithmetic runs: auto = a GPU when the run has one (torch sees one, or the Ray "
        "cluster lists one), else the CPU. Not part of any result id: results agree across devices up to "
        "floating-point summation order.")
    amp: Literal["none", "bf16"] = Field(
        "none", description="Mixed precision of the backbone's forward passes (pre-training, 'full' fine-tuning, "
        "embedding): bf16 = torch.autocast to bfloat16 (fast on GPUs and on CPUs with AMX; changes results "
        "slightly, so it is part of the ids). Last-layer heads always train in float32.")


class PretrainSettings(TrainSettings):
    max_epochs: int = Field(50, ge=0, description="Upper bound on epochs; 0 = use the backbone as loaded (e.g. a "
                            "pre-trained text encoder) without training on the pre-training split.")


Size = Annotated[int, Field(ge=1)] | Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]


class TransformSpec(_Model):
    """How images become model inputs (image datasets only). Geometry (resize, crop, channels) is applied once when
    the images are decoded into the cache; normalisation and augmentations per batch, augmentations only while
    training (pre-training and 'full'/'lora' fine-tuning; never for embeddings)."""

    resize: Size | None = Field(None, description="Resize: an int sets the shorter side (aspect kept), [h, w] the "
                                "exact size. None = as stored.")
    crop: Size | None = Field(None, description="Centre crop after resizing: an int (square) or [h, w].")
    channels: Literal[1, 3] = Field(3, description="3 = RGB (greyscale replicated to 3 channels), 1 = greyscale.")
    normalize: Literal["auto", "imagenet", "none"] = Field(
        "auto", description="auto = ImageNet mean/std when the backbone loads ImageNet weights, else [0, 1] only; "
        "or set mean and std.")
    mean: list[float] | None = Field(None, description="Per-channel mean on [0, 1] inputs (with std).")
    std: list[float] | None = Field(None, description="Per-channel standard deviation (with mean), each > 0.")
    flip: bool = Field(False, description="Training augmentation: horizontal flip with probability 0.5.")
    random_resized_crop: list[float] | None = Field(
        None, min_length=2, max_length=2, description="Training augmentation: [min, max] share of the image area a "
        "random crop keeps (resized back to the input size), e.g. [0.8, 1.0].")

    @model_validator(mode="after")
    def _consistent(self) -> "TransformSpec":
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None:
            if self.normalize != "auto":
                raise ValueError(f"normalize = '{self.normalize}' and mean/std are both set; keep one")
            if len(self.mean) != self.channels or len(self.std) != self.channels:  # type: ignore[arg-type]
                raise ValueError(f"mean and std need {self.channels} value(s), one per channel")
            if min(self.std) <= 0:  # type: ignore[type-var]
                raise ValueError("std values must be > 0")
        if self.random_resized_crop is not None:
            lo, hi = self.random_resized_crop
            if not 0 < lo <= hi <= 1:
                raise ValueError("random_resized_crop needs 0 < min <= max <= 1, e.g. [0.8, 1.0]")
        return self


class BackboneSpec(_Model):
    kind: str = Field(description="Backbone: one of backends.REGISTRY (e.g. 'simple_cnn'), an installed plugin "
                      "(entry point group 'alloclab.backbones'), or your own class as 'package.module:Class'.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backbone-specific options (model dir, ...).")
    transform: TransformSpec | None = Field(None, description="Image preprocessing (image datasets).")
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings, description="Pre-training settings.")
    pretrain_seeds: list[int] = Field([0], min_length=1, description="Pre-training seeds; TV is averaged over them.")
    trial_seed: int | None = Field(
        None, description="Pre-training seed whose checkpoint the allocation trials start from (default: the first)."
    )

    @field_validator("kind")
    @classmethod
    def _known(cls, v: str) -> str:
        from backends import known_backbones

        return _registered(v, known_backbones(), "backbone")

    @model_validator(mode="after")
    def _trial_seed_known(self) -> "BackboneSpec":
        if len(set(self.pretrain_seeds)) != len(self.pretrain_seeds):
            raise ValueError("pretrain_seeds has duplicates")
        if self.trial_seed is not None and self.trial_seed not in self.pretrain_seeds:
            raise ValueError(f"trial_seed {self.trial_seed} is not one of pretrain_seeds {self.pretrain_seeds}")
        return self

    @property
    def checkpoint_seed(self) -> int:
        return self.pretrain_seeds[0] if self.trial_seed is None else self.trial_seed


RegulariserKind = Literal["none", "tv_surrogate", "mmd", "adversarial"]
MIN_BATCH_REGULARISED = 8  # 2 classes x 2 groups x 2 items: the least a mini-batch needs for a penalty term


class RegulariserSpec(_Model):
    """A separation penalty added while the encoder trains, to make it separate one attribute's groups less
    (method.md §7; backends/regularisers.py). The loss is CE + weight · penalty(features, y, a)."""

    kind: RegulariserKind = Field(
        "none", description="'tv_surrogate' (the paper's: squared diagonal-Mahalanobis distance of the group means "
        "within each class), 'mmd' (class-conditional Gaussian-kernel MMD², median-heuristic bandwidth), "
        "'adversarial' (a group classifier behind a gradient-reversal layer, DANN), or 'none'.")
    attribute: str | None = Field(None, description="The attribute the encoder is made invariant to (one of "
                                  "[[attributes]]; not a null partition).")
    weight: float = Field(1e-2, ge=0, description="λ (the paper: 1e-2 for tv_surrogate). 0 = no regulariser (the "
                          "same results as kind = 'none', so a λ grid starting at 0 re-uses the plain encoder).")
    stage: Literal["pretrain", "finetune", "both"] = Field(
        "pretrain", description="Where the penalty applies: pre-training, 'full'/'lora' fine-tuning, or both.")
    class_weights: Literal["equal", "frequency"] = Field(
        "equal", description="How the per-class terms are averaged: equally (the paper) or by class frequency.")
    hidden: int = Field(64, ge=0, description="adversarial: hidden width of the group classifier (0 = linear).")
    lr_ratio: float = Field(1.0, gt=0, description="adversarial: the classifier's learning rate ÷ the encoder's.")
    conditioning: Literal["per_class", "label_input"] = Field(
        "per_class", description="adversarial: one classifier output per class, or the label as an input.")

    @property
    def active(self) -> bool:
        """True when a penalty is applied (a kind other than 'none' with weight > 0)."""
        return self.kind != "none" and self.weight > 0

    def applies_to(self, stage: str) -> bool:
        """Whether the penalty is applied in ``stage`` ('pretrain' or 'finetune')."""
        return self.active and self.stage in (stage, "both")

    def result_key(self, stage: str) -> dict[str, Any]:
        """What changes the results of ``stage``: {'kind': 'none'} when inactive there, else the kind's own options
        (so ids do not change with options a kind does not read)."""
        if not self.applies_to(stage):
            return {"kind": "none"}
        used = {"kind", "attribute", "weight", "class_weights"}
        if self.kind == "adversarial":
            used |= {"hidden", "lr_ratio", "conditioning"}
        return self.model_dump(mode="json", include=used)


class AlphaRange(_Model):
    start: float = Field(ge=0, le=1)
    stop: float = Field(ge=0, le=1)
    step: float = Field(gt=0, le=1)

    def values(self) -> list[float]:
        n = int(math.floor((self.stop - self.start) / self.step + 1e-9)) + 1
        return [round(self.start + i * self.step, 10) for i in range(max(n, 0))]


Alpha = Annotated[float, Field(ge=0, le=1)]
Budget = int | Literal["auto"]


class SizeRange(_Model):
    """Geometrically spaced counts from ``start`` to ``stop`` (inclusive), ``num`` of them, rounded to integers."""

    start: int = Field(ge=1)
    stop: int = Field(ge=1)
    num: int = Field(ge=2, le=50)

    def values(self) -> list[int]:
        ratio = (self.stop / self.start) ** (1 / (self.num - 1))
        return sorted({int(round(self.start * ratio**i)) for i in range(self.num)})


class AllocationSpec(_Model):
    protocol: Literal["reallocate", "expand"] = Field(
        "reallocate", description="'reallocate' (the paper's): a fixed budget K split between the groups at each α; "
        "'expand': one group's count fixed at `base`, the other's grown along `sizes` (collect more data: what do "
        "n more items of a group buy?).")
    alpha: list[Alpha] | AlphaRange | None = Field(
        None, description="Share of group 1 in the fine-tuning set: a list, or {start, stop, step} (inclusive). "
        "Required with protocol 'reallocate'."
    )
    base: Budget | None = Field(
        None, description="expand: the count of the group that is not grown; 'auto' = half the smallest (attribute, "
        "group) size in the train pool.")
    sizes: list[Annotated[int, Field(ge=1)]] | SizeRange | None = Field(
        None, description="expand: the grown group's counts, a list or {start, stop, num} (geometric).")
    grow: list[Literal[0, 1]] = Field(
        [0, 1], min_length=1, description="expand: which groups are grown (one sweep each; the other stays at base).")
    budget: Budget = Field("auto", description="K: fine-tuning train-set size, or 'auto' = smallest group in the pool.")
    budget_val: Budget = Field("auto", description="K_val: fine-tuning val-set size, or 'auto' likewise.")
    seeds: list[int] = Field([42, 43, 44], min_length=1, description="Replicate seeds (subsample and training).")
    sampler: Literal["natural", "stratified"] = Field(
        "natural", description="'natural': P(Y|A) as in the pool, so P(Y) of the fine-tuning set moves with α when "
        "the groups' P(Y|A) differ (the paper's); 'stratified': within each group the pool's P(Y), so P(Y) stays "
        "fixed across α (the theorem's assumption). 'auto' budgets then resolve to what every cell can supply.")

    @field_validator("budget", "budget_val")
    @classmethod
    def _positive(cls, v: Budget) -> Budget:
        if v != "auto" and v < 1:
            raise ValueError("must be a positive integer or \"auto\"")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds has duplicates")
        return v

    @model_validator(mode="after")
    def _protocol_fields(self) -> "AllocationSpec":
        if self.protocol == "reallocate":
            if self.alpha is None:
                raise ValueError("allocation.alpha: missing; fix: give the shares of group 1 to run, e.g. "
                                 "alpha = { start = 0.0, stop = 1.0, step = 0.1 }")
            extra = [f for f in ("base", "sizes") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"allocation.{extra[0]}: applies to protocol = \"expand\" only; fix: remove it or "
                                 "set allocation.protocol = \"expand\"")
            return self
        if self.alpha is not None:
            raise ValueError("allocation.alpha: protocol 'expand' grows a group's count instead of re-allocating a "
                             "budget; fix: remove alpha and give base and sizes")
        if self.sizes is None:
            raise ValueError("allocation.sizes: missing for protocol 'expand'; fix: give the grown group's counts, "
                             "e.g. sizes = [250, 500, 1000, 2000] or sizes = { start = 250, stop = 4000, num = 5 }")
        if len(self.counts) < 2:
            raise ValueError("allocation.sizes: needs at least 2 different counts to fit a slope")
        if self.base is None:
            raise ValueError("allocation.base: missing for protocol 'expand'; fix: the fixed group's count, or "
                             "\"auto\"")
        if self.base != "auto" and self.base < 1:
            raise ValueError("allocation.base: must be a positive integer or \"auto\"")
        if len(set(self.grow)) != len(self.grow):
            raise ValueError("allocation.grow: has duplicates")
        return self

    @property
    def counts(self) -> list[int]:
        """expand: the grown group's counts, sorted and unique ([] for reallocate)."""
        if self.sizes is None:
            return []
        return self.sizes.values() if isinstance(self.sizes, SizeRange) else sorted(set(self.sizes))

    @property
    def alphas(self) -> list[float]:
        """The shares of group 1 that are run; for 'expand', 0.5: the val sets are balanced at every count."""
        if self.protocol == "expand" or self.alpha is None:
            return [0.5]
        vals = self.alpha.values() if isinstance(self.alpha, AlphaRange) else list(self.alpha)
        return sorted(set(round(a, 10) for a in vals))


class FinetuneSpec(TrainSettings):
    mode: Literal["last_layer", "full", "lora"] = Field(
        "last_layer", description="'last_layer': a fresh linear head on frozen (cached) embeddings; 'full': the "
        "whole backbone from the pre-trained state with a fresh head; 'lora': adapters + a fresh head (text)."
    )


DistanceName = Literal["tv_paper", "tv", "wasserstein", "frechet", "mmd", "probe_auc", "tv_label", "transfer"]


class SeparationSpec(_Model):
    distances: list[DistanceName] = Field(
        ["tv_paper"], min_length=1, description="Latent distances: tv_paper (the paper's code), tv (shared edges), "
        "wasserstein, frechet, mmd, probe_auc (cross-validated AUC of a linear group probe); label-aware: tv_label "
        "(tv_paper along the out-of-fold LDA direction of the label: separation the head can use) and transfer "
        "(heads trained on one group's pool items only, applied to the other group: the drop in balanced accuracy, "
        "stored as 'transfer', and the rise in loss, 'transfer_loss'; on the trial checkpoint's embeddings).")
    transfer_repeats: int = Field(5, ge=2, description="transfer: seeded repeats (allocation subsets and head "
                                  "initialisations) per attribute; its interval is over these and the test set.")
    bins: int = Field(50, ge=2, description="Histogram bins per dimension (the paper: 50).")
    pca_variance: float | None = Field(
        None, gt=0, le=1, description="StandardScaler + PCA keeping the first k components reaching this explained "
        "variance before estimating (the paper's text: 0.70; its code: none).")
    class_weights: Literal["unweighted", "prevalence"] = Field(
        "unweighted", description="Mean over the two classes: unweighted (the paper) or weighted by P(Y).")
    permutations: int = Field(200, ge=0, description="Permutation null draws (group labels shuffled within class); "
                              "the smallest p-value is 1/(R+1).")
    bootstrap: int = Field(100, ge=0, description="Bootstrap resamples of items for the 95% interval.")
    seed: int = Field(0, description="Seed of the permutations and the bootstrap.")
    match_sizes: bool = Field(
        False, description="Subsample both groups (within each class) to the smaller group's size, averaged over "
        "draws: the estimate is then the one at equal group sizes, so the part of a histogram TV that comes from "
        "unequal sizes is gone (both groups become as noisy as the smaller one, so the floor rises; the calibrated "
        "value, estimate minus permutation null, is what compares attributes whose small groups differ in size).")
    min_effect: float = Field(
        0.02, ge=0, description="`screen` calls an attribute separated only if its calibrated distance reaches this "
        "(a detectable but smaller separation is reported as not meaningful). Not part of any result id.")


class AnalysisSpec(_Model):
    bootstrap: int = Field(1000, ge=0, description="Bootstrap draws for the best-α interval, at most 200 are used (each "
                           "refits both curves; seeds and a test resample drawn per draw). With fewer than 5 seeds "
                           "the range of per-seed optima is reported instead.")
    seed: int = Field(0, description="Seed of the analysis bootstraps and of the Monte Carlo permutation tests.")
    test_resamples: int = Field(
        200, ge=0, description="B: paired bootstrap resamples of the test items (per group, drawn once and shared "
        "by every trial). Every trial's metrics are also computed on each resample, so slope intervals cover the "
        "finite test set as well as seed-to-seed variation. 0 = seed variation only (not recommended). Changing it "
        "re-runs the trials.")
    test_resample_seed: int = Field(0, description="Seed of the test-item resamples (changing it re-runs the trials).")


class Spec(_Model):
    """One resolved experiment (one grid variant)."""

    experiment: ExperimentSpec
    dataset: DatasetSpec
    task: TaskSpec
    attributes: list[AttributeSpec] = Field(min_length=1)
    backbone: BackboneSpec
    regulariser: RegulariserSpec = Field(default_factory=RegulariserSpec)
    allocation: AllocationSpec
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    separation: SeparationSpec = Field(default_factory=SeparationSpec)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    variant: dict[str, Any] = Field(default_factory=dict, description="Grid values of this variant (set by load_spec).")

    @model_validator(mode="after")
    def _unique_attributes(self) -> "Spec":
        names = [a.name for a in self.attributes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"attribute names repeat: {dup}")
        for i, a in enumerate(self.attributes):
            unknown = [c for c in a.intersection or [] if c not in names[:i]]
            if unknown:
                raise ValueError(f"attributes[{i}].intersection: {unknown} not among the attributes before "
                                 f"'{a.name}' ({', '.join(names[:i]) or 'none'}); fix: list the components first")
        if not self.allocation.alphas:
            raise ValueError("allocation.alpha gives no values")
        self._check_regulariser()
        return self

    def _check_regulariser(self) -> None:
        reg = self.regulariser
        if reg.kind == "none":
            return
        names = [a.name for a in self.attributes if a.is_binary]
        if reg.attribute is None:
            raise ValueError(f"regulariser.attribute: missing; fix: name the attribute to make the encoder "
                             f"invariant to: one of {', '.join(names)}")
        excluded = [a.name for a in self.attributes if a.missing == "exclude"]
        if reg.attribute in excluded:
            raise ValueError(f"regulariser.attribute: '{reg.attribute}' has missing = \"exclude\" (items without a "
                             "group), which a separation penalty cannot use; fix: regularise another attribute, or "
                             "set missing = \"drop\" for it")
        if is_null_partition(reg.attribute):
            raise ValueError(f"regulariser.attribute: '{reg.attribute}' is a null partition (random groups); fix: "
                             f"regularise a real attribute: one of {', '.join(names)}")
        if reg.attribute not in names:
            raise ValueError(f"regulariser.attribute: '{reg.attribute}' is not an attribute of this spec; fix: use one "
                             f"of {', '.join(names)}")
        if reg.stage in ("finetune", "both") and self.finetune.mode == "last_layer":
            raise ValueError(f"regulariser.stage: '{reg.stage}' needs an encoder that trains while fine-tuning, and "
                             "finetune.mode is 'last_layer'; fix: use stage = 'pretrain', or finetune.mode 'full'")
        if reg.stage in ("pretrain", "both") and self.backbone.pretrain.max_epochs == 0:
            raise ValueError("regulariser.stage: includes 'pretrain' but backbone.pretrain.max_epochs is 0 (nothing "
                             "trains); fix: set max_epochs >= 1, or stage = 'finetune'")
        for where, stage, batch in (("backbone.pretrain", "pretrain", self.backbone.pretrain.batch_size),
                                    ("finetune", "finetune", self.finetune.batch_size)):
            if reg.stage in (stage, "both") and batch < MIN_BATCH_REGULARISED:
                raise ValueError(f"{where}.batch_size: {batch} cannot hold 2 items of each group in each class, "
                                 f"which the regulariser needs; fix: use batch_size >= {MIN_BATCH_REGULARISED} (the "
                                 "data check names the size each class and group needs)")

    @property
    def null_attribute_names(self) -> list[str]:
        return [null_partition_name(k) for k in range(1, self.dataset.null_partitions + 1)]

    @property
    def groups_of(self) -> dict[str, list[str]]:
        """attribute -> its group labels (binary: '0', '1')."""
        out: dict[str, list[str]] = {}
        for a in self.attributes:
            out[a.name] = a.group_names(out)
        return out

    @property
    def allocated_names(self) -> list[str]:
        """The binary attributes the pipeline runs: a binary attribute as itself, a K-group or intersection
        attribute as one one-vs-rest attribute per group, named 'attribute=group'."""
        groups = self.groups_of
        out = []
        for a in self.attributes:
            out += [a.name] if a.is_binary else [f"{a.name}={g}" for g in groups[a.name]]
        return out

    @property
    def attribute_names(self) -> list[str]:
        return self.allocated_names + self.null_attribute_names


class SpecFile(_Model):
    """The file as written: a spec plus an optional [grid] table of dotted keys -> lists of values."""

    experiment: dict[str, Any]
    dataset: dict[str, Any]
    task: dict[str, Any]
    attributes: list[dict[str, Any]]
    backbone: dict[str, Any]
    regulariser: dict[str, Any] = Field(default_factory=dict)
    allocation: dict[str, Any]
    finetune: dict[str, Any] = Field(default_factory=dict)
    separation: dict[str, Any] = Field(default_factory=dict)
    analysis: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


_FIXES = {
    "extra_forbidden": "remove it or check its spelling (alloclab schema lists every field)",
    "missing": "add it",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "greater_than": "use a larger value",
    "literal_error": "use one of the allowed values",
    "too_short": "give at least one value",
    "string_pattern_mismatch": "use only the characters the pattern allows",
    "list_type": "give a list, e.g. [1, 2]",
    "int_type": "give an integer",
    "int_parsing": "give an integer",
    "int_from_float": "give an integer",
    "float_type": "give a number",
    "float_parsing": "give a number",
    "string_type": "give a quoted string",
    "bool_type": "give true or false",
    "dict_type": "give a table",
    "model_type": "give a table",
}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("AlphaRange", "list[constrained-float]", "int", "literal['auto']", "function-after[_positive()]"):
            continue  # pydantic's union-branch tags: not part of the user's field path
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


_PATTERN_FIXES = {  # what each name pattern allows, in words (the fix must not suggest a refused character)
    r"^[A-Za-z0-9_.-]+$": "use letters, digits, '_', '.' or '-'",
    r"^[A-Za-z0-9_]+$": "use letters, digits and '_' only",
}
_BRANCH_TYPE_ERRORS = {"list_type", "model_type", "dict_type", "model_attributes_type", "literal_error", "int_type",
                       "int_parsing", "float_type", "float_parsing", "string_type"}


def _first_error(err: ValidationError) -> dict[str, Any]:
    """The error to report. Where a field is a union (``alpha``: a list or a {start, stop, step} table), pydantic
    reports every branch; the branch the user wrote is the one whose error is not "wrong type" at its root."""
    errors = err.errors()
    for e in errors:
        same_field = [o for o in errors if o is not e and _loc(tuple(o["loc"])).split(".")[:1]
                      == _loc(tuple(e["loc"])).split(".")[:1]]
        branch_mismatch = e["type"] in _BRANCH_TYPE_ERRORS and any(o["type"] not in _BRANCH_TYPE_ERRORS
                                                                  for o in same_field)
        if not branch_mismatch:
            return e
    return errors[0]


def _spec_error(path: Path, err: ValidationError, prefix: str = "") -> SpecError:
    first = _first_error(err)
    where = _loc(tuple(first["loc"]))
    where = f"{prefix}{where}" if prefix else where
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    fix = _FIXES.get(first["type"], "see `alloclab schema` for the field's type and range")
    if first["type"] == "string_pattern_mismatch":
        fix = _PATTERN_FIXES.get((first.get("ctx") or {}).get("pattern", ""), fix)
    if first["type"] == "value_error" and "; known" in msg:
        msg, _, known = msg.partition("; ")
        fix = f"use one of the {known.split(' are: ')[0].replace('known ', '')}: {known.split(' are: ')[-1]}"
    msg = msg.removeprefix("Value error, ")
    field = re.match(r"^([a-z_]+(?:\[[0-9]+\])?(?:\.[a-z_]+(?:\[[0-9]+\])?)+): ", msg)
    if field and where.endswith("(top level)"):  # a cross-field check names the field it is about
        where = where.replace("(top level)", field.group(1))
        msg = msg[field.end():]
    elif field and field.group(1).startswith(where.rsplit(" ", 1)[-1] + "."):  # a section's check names its field
        where = where[: len(where) - len(where.rsplit(" ", 1)[-1])] + field.group(1)
        msg = msg[field.end():]
    if "; fix:" in msg:  # the validator already said how to fix it
        fix = ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return SpecError(f"{path}: {where}: {msg}" + (f"; fix: {fix}" if fix else "") + more)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, path: Path) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise SpecError(f"{path}: grid.\"{key}\": '{'.'.join(parts[: i + 1])}' is not a table; fix: use a field path")
    if not isinstance(node, dict):
        raise SpecError(f"{path}: grid.\"{key}\": not a field path; fix: use e.g. \"allocation.budget\"")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):  # a table sets its keys, keeps the rest
        value = {**node[parts[-1]], **value}
    node[parts[-1]] = value


def expand_grid(raw: dict[str, Any], grid: dict[str, list[Any]], path: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Cartesian product of the grid: [(raw spec of the variant, {dotted key: value})]."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{path}: grid.\"{key}\": empty grid; fix: give a non-empty list of values")
    keys = sorted(grid)
    variants = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        doc = copy.deepcopy(raw)
        for k, v in zip(keys, combo):
            _set_dotted(doc, k, v, path)
        variants.append((doc, dict(zip(keys, combo))))
    return variants


def _value_text(value: Any) -> str:
    """A grid value in an experiment name: a table {kind = "mmd", weight = 1.0} becomes kind-mmd-weight-1.0."""
    if isinstance(value, dict):
        return "-".join(f"{k}-{_value_text(v)}" for k, v in sorted(value.items()))
    return json.dumps(value, sort_keys=True).strip(chr(34))


def variant_name(base: str, variant: dict[str, Any]) -> str:
    if not variant:
        return base
    parts = [f"{k.split('.')[-1]}-{_value_text(v)}" for k, v in sorted(variant.items())]
    return base + "__" + "__".join(p.replace(" ", "") for p in parts)


def parse_spec(raw: dict[str, Any], path: Path) -> list[Spec]:
    """Validate a parsed TOML document and expand its grid into resolved specs."""
    try:
        sf = SpecFile.model_validate(raw)
    except ValidationError as e:
        raise _spec_error(path, e) from None
    body = {k: v for k, v in raw.items() if k != "grid"}
    specs = []
    for doc, variant in expand_grid(body, sf.grid, path):
        doc["variant"] = variant
        doc["experiment"] = {**doc["experiment"]}
        if "name" in doc["experiment"]:
            doc["experiment"]["name"] = variant_name(str(doc["experiment"]["name"]), variant)
        try:
            specs.append(Spec.model_validate(doc))
        except ValidationError as e:
            prefix = "" if not variant else f"[grid variant {variant}] "
            raise _spec_error(path, e, prefix) from None
    return specs


def load_spec(path: str | Path) -> list[Spec]:
    """Read and validate a TOML spec; one Spec per grid variant. Raises SpecError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file; fix: check the path (specs/ holds the examples)") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}; fix: check the syntax at that line") from None
    return parse_spec(raw, path)


def json_schema() -> dict[str, Any]:
    """JSON Schema of a spec file (for editor completion): the resolved sections plus [grid]."""
    schema = Spec.model_json_schema()
    schema["properties"].pop("variant", None)
    schema["properties"]["grid"] = {
        "type": "object",
        "description": "Dotted field path -> list of values; each combination is one variant of the experiment.",
        "additionalProperties": {"type": "array", "minItems": 1},
    }
    schema["title"] = "alloclab spec"
    return schema
