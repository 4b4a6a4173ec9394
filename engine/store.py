"""The results store: one DuckDB file (``results.duckdb`` by default). The schema is defined once, here.

SQLModel table classes declare every table (app-supplied string ids, ``Double`` floats). The one column type
SQLAlchemy cannot express, the embeddings' ``FLOAT[]`` list, has its native DDL right beside its model.
Only the driver process writes. Bulk data (items, embeddings, metrics) goes through DuckDB's native Arrow path,
never row by row through the ORM. Every stage or trial is written in one transaction whose completion row
(``stages`` / ``trials``) comes last, so a crash loses only what was in flight.

To add a table: add a SQLModel class below (``table=True``), write it through :meth:`Store.insert_rows` inside a
transaction, and document its columns in README.md.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import pyarrow as pa
from sqlalchemy import Double
from sqlmodel import Field, SQLModel, create_engine

from engine.errors import StoreError

SCHEMA_VERSION = 4  # 4: metric_resamples; seed + test-set intervals; null partitions; exact small-n tests


def _f() -> Any:
    return Field(default=None, sa_type=Double)


class Meta(SQLModel, table=True):
    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class Experiment(SQLModel, table=True):
    __tablename__ = "experiments"
    name: str = Field(primary_key=True)
    spec_path: str
    spec_toml: str
    spec_json: str
    variant_json: str
    git_commit: str
    versions_json: str
    created_at: dt.datetime
    updated_at: dt.datetime


class Stage(SQLModel, table=True):
    """Completion row of a stage (dataset, pretrain, embed, separation, analysis). Written last."""

    __tablename__ = "stages"
    stage_id: str = Field(primary_key=True)
    kind: str = Field(index=True)
    key_json: str  # the resolved config the id hashes
    status: str  # done | failed
    error: str | None = None
    duration_s: float | None = _f()
    artifact: str | None = None  # path of a file beside the database (checkpoints), relative to it
    artifact_sha256: str | None = None  # its SHA-256, checked before every use (a mismatch rebuilds the stage)
    log_json: str | None = None
    finished_at: dt.datetime
    node_id: str | None = None  # Ray node that computed it ('local' in-process); NULL: the driver (dataset, analysis)


class ExperimentStage(SQLModel, table=True):
    __tablename__ = "experiment_stages"
    experiment: str = Field(primary_key=True)
    stage_id: str = Field(primary_key=True)
    kind: str
    label: str  # e.g. "pretrain seed=0", "embed seed=0 split=test"


class Item(SQLModel, table=True):
    """Every item of a dataset stage: its split and task label."""

    __tablename__ = "items"
    dataset_id: str = Field(primary_key=True)
    item_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    split: str
    y: int


class ItemGroup(SQLModel, table=True):
    """The binary group (0/1) of every item for every attribute, `random` included."""

    __tablename__ = "item_groups"
    dataset_id: str = Field(primary_key=True)
    item_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    attribute: str = Field(primary_key=True)
    grp: int


class Embedding(SQLModel, table=True):
    """Penultimate features of one item under one embed stage. ``vec`` is FLOAT[]: see EMBEDDINGS_DDL."""

    __tablename__ = "embeddings"
    stage_id: str = Field(primary_key=True)
    item_id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    split: str


# SQLAlchemy has no portable list-of-float type, so the embeddings table is created natively (same columns).
EMBEDDINGS_DDL = """
CREATE TABLE IF NOT EXISTS embeddings (
    stage_id VARCHAR NOT NULL,
    item_id BIGINT NOT NULL,
    split VARCHAR NOT NULL,
    vec FLOAT[] NOT NULL,
    PRIMARY KEY (stage_id, item_id)
)"""


class PretrainedMetric(SQLModel, table=True):
    """The pre-trained model's own test metrics per group (its head, before any allocation)."""

    __tablename__ = "pretrained_metrics"
    stage_id: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    value: float | None = _f()


class SeparationValue(SQLModel, table=True):
    """A latent distance of one attribute under one pre-training seed (a separation stage's result)."""

    __tablename__ = "separation_values"
    stage_id: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    distance: str = Field(primary_key=True)
    pretrain_seed: int
    value: float | None = _f()
    value_y0: float | None = _f()
    value_y1: float | None = _f()
    n_g0: int
    n_g1: int
    pca_k: int | None = None  # principal components kept (None: no PCA)
    null_mean: float | None = _f()  # permutation null: mean of the estimate with groups shuffled within class
    null_std: float | None = _f()
    p_value: float | None = _f()  # (1 + #null >= value) / (R + 1)
    calibrated: float | None = _f()  # value - null_mean
    ci_low: float | None = _f()  # bootstrap 95% interval of the sampling spread, centred on value
    ci_high: float | None = _f()
    boot_shift: float | None = _f()  # bootstrap median - value (resampling bias of the estimator)
    params_json: str


class Trial(SQLModel, table=True):
    """Completion row of one allocation trial. Written last in the trial's transaction."""

    __tablename__ = "trials"
    trial_id: str = Field(primary_key=True)
    experiment: str = Field(index=True)  # the experiment that first ran it (see experiment_trials)
    attribute: str
    alpha: float = Field(sa_type=Double)
    seed: int
    mode: str
    budget: int
    budget_val: int
    status: str  # done | failed
    error: str | None = None
    duration_s: float | None = _f()
    n_train_g1: int | None = None
    p_y_train: float | None = _f()
    epochs: int | None = None
    best_val_bal_acc: float | None = _f()
    config_json: str
    finished_at: dt.datetime
    node_id: str | None = None  # Ray node that ran it ('local' in-process)


class ExperimentTrial(SQLModel, table=True):
    __tablename__ = "experiment_trials"
    experiment: str = Field(primary_key=True)
    trial_id: str = Field(primary_key=True)


class Metric(SQLModel, table=True):
    """Test metric of one trial for one group of one attribute; attribute 'overall' (grp -1) = whole test set."""

    __tablename__ = "metrics"
    trial_id: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    value: float | None = _f()


class MetricResample(SQLModel, table=True):
    """A trial's metric on one of the B paired bootstrap resamples of the test items (b = 0 .. B-1).

    Method: per evaluated group, B resamples of that group's test items (with replacement, size kept), drawn once
    per experiment from ``analysis.test_resample_seed`` and shared by every trial, so all runs are scored on the
    same resample and differences between runs stay paired. ``value`` is the metric on resample b. Created
    natively (METRIC_RESAMPLES_DDL): no primary key, written in bulk per trial (delete-then-insert).
    """

    __tablename__ = "metric_resamples"
    trial_id: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    b: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    value: float | None = _f()


# About 9,000 rows per trial (11 groups x 4 metrics x B = 200): no key index to maintain, one bulk insert per trial.
METRIC_RESAMPLES_DDL = """
CREATE TABLE IF NOT EXISTS metric_resamples (
    trial_id VARCHAR NOT NULL,
    attribute VARCHAR NOT NULL,
    grp INTEGER NOT NULL,
    metric VARCHAR NOT NULL,
    b INTEGER NOT NULL,
    value DOUBLE
)"""

NATIVE_DDL = {"embeddings": EMBEDDINGS_DDL, "metric_resamples": METRIC_RESAMPLES_DDL}
_NO_KEY = {"metric_resamples"}


class Separation(SQLModel, table=True):
    """Per experiment: a latent distance per attribute over the pre-training seeds (mean, seed SD ddof 1, and
    the within-seed sampling spread, kept apart)."""

    __tablename__ = "separations"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    distance: str = Field(primary_key=True)
    value: float | None = _f()  # mean over pre-training seeds
    seed_sd: float | None = _f()  # SD over pre-training seeds (ddof 1; NULL with one seed): encoder-to-encoder
    within_sd: float | None = _f()  # sampling spread within a seed: RMS over seeds of (95% spread width / 3.92)
    value_y0: float | None = _f()
    value_y1: float | None = _f()
    calibrated: float | None = _f()  # mean over seeds of value - permutation-null mean
    calibrated_sd: float | None = _f()  # its SD over pre-training seeds (ddof 1; NULL with one seed)
    null_mean: float | None = _f()
    p_value: float | None = _f()  # the largest over seeds (conservative)
    pca_k: int | None = None
    n_seeds: int
    n_g0: int
    n_g1: int
    separated: bool | None = None  # the screen verdict (see engine.analysis.screen_verdicts)
    verdict: str | None = None


class _Interval(SQLModel):
    """An estimate as the mean over seeds of a per-seed statistic, with its seed + test-set 95% interval."""

    stderr: float | None = _f()  # sqrt(se_seed² + se_test²)
    se_seed: float | None = _f()  # SD of the per-seed estimates / sqrt(n_seeds)
    se_test: float | None = _f()  # SD of the seed-mean estimate over the paired test resamples
    df: float | None = _f()  # Welch–Satterthwaite degrees of freedom of the t interval
    ci_low: float | None = _f()
    ci_high: float | None = _f()
    p_value: float | None = _f()  # two-sided, against 0, same t reference
    seed_min: float | None = _f()  # the range of the per-seed estimates
    seed_max: float | None = _f()
    n: int  # runs (points) used
    n_seeds: int
    n_resamples: int  # test resamples used
    n_dropped: int = 0  # NaN metric values dropped (failed or undefined)
    method: str = ""  # how the interval was built (engine.intervals.METHOD_*)


class _Gap(SQLModel):
    gap: float | None = _f()  # full-shot minus zero-shot (own share 1 minus own share 0), mean over seeds
    gap_stderr: float | None = _f()  # same construction as the slope's stderr
    gap_ci_low: float | None = _f()
    gap_ci_high: float | None = _f()


class Slope(_Interval, _Gap, table=True):
    """A group's slope of a metric on its own share (x = α for group 1, 1 − α for group 0): OLS per seed, mean
    over seeds, seed + test-set interval. For a null partition it is conditional on the pool partition."""

    __tablename__ = "slopes"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    slope: float | None = _f()
    intercept: float | None = _f()  # mean over seeds of the per-seed intercepts


class AttributeSlope(_Interval, _Gap, table=True):
    """The attribute slope = mean of its two groups' own-share slopes = the slope of (v₁ − v₀)/2 on α, fitted per
    seed (paired: what one head does to both groups cancels), mean over seeds, seed + test-set interval."""

    __tablename__ = "attribute_slopes"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    metric: str = Field(primary_key=True)
    slope: float | None = _f()
    null_partition: bool = False  # a random grouping (the null baseline)
    null_low: float | None = _f()  # the null range: span of 0 and every null partition's slope
    null_high: float | None = _f()
    n_null: int = 0  # null partitions behind the range
    beyond_null: bool | None = None  # the 95% interval lies entirely outside the null range


class Correlation(SQLModel, table=True):
    """Across attributes: a distance vs the attribute slope (y='slope') or gap (y='gap') of a metric."""

    __tablename__ = "correlations"
    experiment: str = Field(primary_key=True)
    distance: str = Field(primary_key=True)
    metric: str = Field(primary_key=True)
    y: str = Field(primary_key=True)
    x: str = Field(primary_key=True)  # calibrated (value − permutation-null mean) | raw
    r: float | None = _f()  # Pearson r
    r2: float | None = _f()  # r squared
    p_value: float | None = _f()  # permutation test of r (exact when n <= 8), two-sided
    spearman_rho: float | None = _f()
    spearman_p: float | None = _f()  # permutation test of rho, same pairings
    r_ci_low: float | None = _f()  # Fisher z 95% interval of r (NaN below 4 points)
    r_ci_high: float | None = _f()
    n: int  # independent points: attributes, the null partitions counting as one
    testable: bool  # n >= 5: below that r and r² are descriptions only
    p_method: str


class Fit(SQLModel, table=True):
    """A curve model of a group's metric against its own sample count (linear in share, or a power law)."""

    __tablename__ = "fits"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    model: str = Field(primary_key=True)  # linear | power
    params_json: str  # linear: [a, b] in share; power: [a, b, c] in count
    r2: float | None = _f()
    rmse: float | None = _f()
    aic: float | None = _f()
    n: int
    preferred: bool  # lower AIC of the two on the same points (every seed's runs pooled: descriptive, not a test)
    seeds_preferring: int = 0  # seeds whose own runs, fitted alone, also give this model the lower AIC
    n_seeds: int = 0


class BestAlpha(SQLModel, table=True):
    """The α maximising the worst group's metric (or the mean of both), from the preferred fits, with a CI."""

    __tablename__ = "best_alpha"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    metric: str = Field(primary_key=True)
    criterion: str = Field(primary_key=True)  # worst_group | mean
    alpha: float | None = _f()
    value: float | None = _f()
    ci_low: float | None = _f()
    ci_high: float | None = _f()
    interval: str  # "per-seed range (N seeds)" (< 5 seeds) | "percentile bootstrap over seeds[ and test resamples]"
    n_seeds: int
    n_boot: int


class CrossSlope(_Interval, table=True):
    """Allocating on one attribute: the slope (per unit α) of a metric of every attribute's groups, OLS per seed,
    mean over seeds, seed + test-set interval."""

    __tablename__ = "cross_slopes"
    experiment: str = Field(primary_key=True)
    alloc_attribute: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    slope: float | None = _f()


class Explanation(SQLModel, table=True):
    """Per group: its loss slope beside TV and the conventional explanations (method.md §8)."""

    __tablename__ = "explanations"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    loss_slope: float | None = _f()
    tv: float | None = _f()
    pretrain_share: float | None = _f()
    pretrained_bal_acc: float | None = _f()
    class_prevalence: float | None = _f()
    null_partition: bool = False  # a group of a random grouping (only 'random' enters the correlations)


class ExplanationCorrelation(SQLModel, table=True):
    """An explanation vs the loss slope: TV per attribute vs the attribute slope (unit 'attribute'); the
    group-level explanations per group vs the group slope (unit 'group'). Tests as in ``correlations``."""

    __tablename__ = "explanation_correlations"
    experiment: str = Field(primary_key=True)
    explanation: str = Field(primary_key=True)
    unit: str = "group"  # attribute | group: what one point is
    r: float | None = _f()
    r2: float | None = _f()
    p_value: float | None = _f()
    spearman_rho: float | None = _f()
    spearman_p: float | None = _f()
    r_ci_low: float | None = _f()
    r_ci_high: float | None = _f()
    n: int
    testable: bool = False
    p_method: str = ""


class Bound(SQLModel, table=True):
    """The bound |Acc_a' − Acc_a''| ≤ 4ε + |Acc' − Acc''| checked for a group and a pair of allocations."""

    __tablename__ = "bounds"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grp: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    alpha_a: float = Field(primary_key=True, sa_type=Double)
    alpha_b: float = Field(primary_key=True, sa_type=Double)
    observed: float | None = _f()
    epsilon: float | None = _f()  # the checkpoint encoder's TV, the larger per-class value
    epsilon_seed: int | None = None  # the pre-training seed whose encoder the heads were trained on
    overall_delta: float | None = _f()
    bound: float | None = _f()
    vacuous: bool
    violated: bool  # observed exceeds the bound beyond its seed-level uncertainty
    excess_se: float | None = _f()  # seed-level standard error of observed − bound
    status: str = ""  # holds | within noise of the bound | violated
    p_y_a: float | None = _f()
    p_y_b: float | None = _f()
    paper_quantity: float | None = _f()  # 2·TV + balanced-accuracy gap, as the authors' notebooks plot
    reason: str


class Verdict(SQLModel, table=True):
    __tablename__ = "verdicts"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    matters: bool
    text: str
    n_runs: int = 0  # runs behind the loss slope
    n_seeds: int = 0


class ExpansionSlope(_Interval, table=True):
    """protocol 'expand' (engine/expansion.py): the slope per 1000 added items of the grown group (role 'grown'),
    of the other group ('other'), of the whole test set ('overall') and of the paired difference grown − other
    ('difference'), per seed, mean over seeds, seed + test-set interval; ``gain`` = value at the largest count minus
    at the smallest. Added in place: older databases get the table on their next writable open."""

    __tablename__ = "expansion_slopes"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grown: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    role: str = Field(primary_key=True)  # grown | other | overall | difference
    metric: str = Field(primary_key=True)
    slope: float | None = _f()  # per 1000 added items of the grown group
    gain: float | None = _f()
    gain_ci_low: float | None = _f()
    gain_ci_high: float | None = _f()
    n_min: int = 0  # the grown group's smallest and largest count run
    n_max: int = 0
    null_partition: bool = False
    null_low: float | None = _f()  # difference rows: the span of 0 and every null partition's difference slope
    null_high: float | None = _f()
    beyond_null: bool | None = None


class ExpansionFit(SQLModel, table=True):
    """protocol 'expand': the grown group's metric against its own count, linear or power law (pooled over seeds:
    descriptive), and the change the fit expects from the next 1000 items at the largest count (an extrapolation)."""

    __tablename__ = "expansion_fits"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    grown: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    metric: str = Field(primary_key=True)
    model: str = Field(primary_key=True)  # linear | power
    params_json: str  # linear: [a, b] in count / n_max; power: [a, b, c] in count
    r2: float | None = _f()
    rmse: float | None = _f()
    aic: float | None = _f()
    preferred: bool
    n_min: int = 0
    n_max: int = 0
    next_1000: float | None = _f()
    null_partition: bool = False


class GroupSeparation(SQLModel, table=True):
    """Attributes with K named groups or intersections: the separation of every pair of their groups (tv_paper on
    the test embeddings, mean over pre-training seeds; ``calibrated`` = value − its permutation-null mean;
    ``p_value`` the largest over seeds). engine/groups.py. Added in place on a writable open."""

    __tablename__ = "group_separations"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    group_a: str = Field(primary_key=True)
    group_b: str = Field(primary_key=True)
    distance: str
    value: float | None = _f()
    calibrated: float | None = _f()
    p_value: float | None = _f()
    n_a: int = 0
    n_b: int = 0
    n_seeds: int = 0


class Recommendation(SQLModel, table=True):
    """`alloclab recommend`: the allocation of a budget between an attribute's groups that maximises an objective
    under minimum shares, predicted from the fitted curves (engine/recommend.py). Added in place: older databases
    get the table on their next writable open."""

    __tablename__ = "recommendations"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)
    metric: str = Field(primary_key=True)
    objective: str = Field(primary_key=True)  # worst_group | mean
    budget: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})  # N, the budget to allocate
    min_share_json: str = Field(primary_key=True)  # {"0": share, "1": share}: the lower bounds asked for
    k: int  # the budget the study ran (the curves' own budget)
    alpha: float | None = _f()  # share of group 1 recommended
    n_g0: int
    n_g1: int
    pred_g0: float | None = _f()  # predicted metric of each group at the recommendation
    pred_g0_low: float | None = _f()
    pred_g0_high: float | None = _f()
    pred_g1: float | None = _f()
    pred_g1_low: float | None = _f()
    pred_g1_high: float | None = _f()
    objective_value: float | None = _f()
    interval: str  # how the intervals were made: per-seed range (< 5 seeds) or expanded percentile bootstrap
    n_seeds: int
    binding: bool  # the minimum shares moved the answer away from the unconstrained optimum
    alternatives_json: str  # balanced 50/50 and (if binding) the unconstrained optimum: shares, predictions, loss
    extrapolation: str  # "" or which group's sample count lies outside the fitted range
    created_at: dt.datetime


class JointRecommendation(SQLModel, table=True):
    """`alloclab recommend` on a K-group or intersection attribute: the budget split among all its groups at once
    (engine/recommend.py::recommend_joint), one row per group. Added in place like ``recommendations``."""

    __tablename__ = "joint_recommendations"
    experiment: str = Field(primary_key=True)
    attribute: str = Field(primary_key=True)  # the K-group attribute (its one-vs-rest runs are 'attribute=group')
    metric: str = Field(primary_key=True)
    objective: str = Field(primary_key=True)  # worst_group | mean
    budget: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})  # N, the budget to allocate
    min_share_json: str = Field(primary_key=True)  # {"group": share}: the lower bounds asked for
    group_label: str = Field(primary_key=True)  # this row's group
    position: int  # the group's place in the attribute's group order
    k: int  # the budget the study ran (the curves' own budget)
    share: float  # the share of the budget recommended for this group
    n: int  # its item count (shares × N, rounded by largest remainder; the counts sum to N)
    pred: float | None = _f()  # its predicted metric at that share, with the interval
    pred_low: float | None = _f()
    pred_high: float | None = _f()
    objective_value: float | None = _f()  # of the whole allocation (the same on every row of it)
    interval: str
    n_seeds: int
    binding: bool  # the minimum shares moved the answer away from the unconstrained optimum
    alternatives_json: str  # equal shares and (if binding) the unconstrained optimum: shares, predictions, loss
    extrapolation: str  # "" or which groups' counts lie outside their fitted range
    assumption: str  # what predicting each group from its own one-vs-rest curve assumes
    check_rmse: float | None = _f()  # the curves' error on the other groups' sweeps (the assumption, checked)
    check_bias: float | None = _f()  # mean observed − predicted there
    check_n: int  # points checked
    fit_rmse: float | None = _f()  # the curves' error on their own sweeps (what check_rmse is read against)
    created_at: dt.datetime


TABLES: dict[str, type[SQLModel]] = {
    m.__tablename__: m  # type: ignore[misc]
    for m in (Meta, Experiment, Stage, ExperimentStage, Item, ItemGroup, Embedding, PretrainedMetric,
              SeparationValue, Trial, ExperimentTrial, Metric, MetricResample, Separation, Slope, AttributeSlope, Correlation, Fit,
              BestAlpha, CrossSlope, Explanation, ExplanationCorrelation, Bound, Verdict, Recommendation,
              ExpansionSlope, ExpansionFit, GroupSeparation, JointRecommendation)
}


# A connection for SQL someone else may have written (`alloclab sql`, a spec's expression): it reads its own
# database and nothing else. No file access (COPY TO, ATTACH, EXPORT, read_csv, read_text, glob, INSTALL), no
# extension loading, no Python replacement scans (SQL reading the caller's variables), and the configuration locked
# so no statement can switch any of that back on.
SANDBOX: dict[str, Any] = {"enable_external_access": False, "autoinstall_known_extensions": False,
                           "autoload_known_extensions": False, "allow_community_extensions": False,
                           "python_enable_replacements": False, "lock_configuration": True}


def _connect(path: Path, read_only: bool, wait_s: float,
             config: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except duckdb.IOException as e:
            if "lock" not in str(e).lower():  # the file system's doing (read-only folder, full disk): exit 1
                raise OSError(f"{path}: cannot open the results database: {str(e).splitlines()[0]}") from None
            if time.monotonic() >= deadline:
                holder = str(e).split("Conflicting lock is held in")[-1].strip() if "held in" in str(e) else "another process"
                raise StoreError(
                    f"{path}: the results database is locked by {holder}; DuckDB allows one writer and no readers "
                    "beside it. Wait for that run to finish (or stop it), or pass --db to use another file."
                ) from None
            time.sleep(0.25)


_IO_SIGNS = ("could not write", "no space left", "file too large", "read-only file system", "permission denied",
             "disk quota")


def _io_fault(path: Path, e: BaseException) -> OSError | None:
    """A DuckDB error that is the file system's doing (disk full, read-only) as an OSError, else None: the CLI
    reports those in one line with exit 1 (the environment), not 2 (the user's input). Nothing partial is kept:
    the transaction was rolled back, so the stage or trial simply runs again next time."""
    if not isinstance(e, duckdb.Error):
        return None
    first = str(e).splitlines()[0]
    if not any(sign in first.lower() for sign in _IO_SIGNS):
        return None
    return OSError(f"the results database {path} could not be written ({first.split(': ', 1)[-1]})")


class Store:
    """A connection to the results database. Open with :func:`open_store`; only the driver writes."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.path = path
        self.con = con
        self.read_only = read_only

    @property
    def artifacts_dir(self) -> Path:
        return self.path.parent / "artifacts"

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- reads -------------------------------------------------------------------------------------------
    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def status_of(self, table: str, key: str, ids: list[str]) -> dict[str, str]:
        """{id: status} for the ids present in ``stages`` or ``trials``."""
        if not ids:
            return {}
        assert table in ("stages", "trials") and key in ("stage_id", "trial_id")
        self.con.execute("CREATE OR REPLACE TEMP TABLE _ids AS SELECT unnest(?::VARCHAR[]) AS id", [ids])
        rows = self.con.execute(f"SELECT t.{key}, t.status FROM {table} t JOIN _ids ON t.{key} = _ids.id").fetchall()
        return {r[0]: r[1] for r in rows}

    def embeddings(self, stage_id: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(item_ids int64, vectors float32 (n, d)) of one split of an embed stage, in item order."""
        tbl = self.con.sql(
            "SELECT item_id, vec FROM embeddings WHERE stage_id = $1 AND split = $2 ORDER BY item_id",
            params=[stage_id, split],
        ).to_arrow_table()
        if tbl.num_rows == 0:
            raise StoreError(f"{self.path}: no embeddings for stage {stage_id} split {split}; re-run `alloclab run`")
        ids = tbl.column("item_id").to_numpy()
        vec = tbl.column("vec").combine_chunks()
        flat = vec.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return ids, flat.reshape(tbl.num_rows, -1)

    # ---- writes ------------------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; only `alloclab run` writes")
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException as e:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT or a broken WAL leaves nothing to roll back
            raise _io_fault(self.path, e) or e
        try:
            self.con.execute("COMMIT")
        except duckdb.Error as e:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise _io_fault(self.path, e) or StoreError(f"{self.path}: commit failed: {str(e).splitlines()[0]}") from None

    def insert_rows(self, table: str, rows: list[dict[str, Any]] | pa.Table, replace_where: dict[str, Any] | None = None) -> None:
        """Bulk insert through Arrow. ``replace_where`` deletes matching rows first (idempotent rewrites)."""
        if table not in TABLES:
            raise KeyError(table)
        if replace_where:
            cond = " AND ".join(f"{k} = ?" for k in replace_where)
            self.con.execute(f"DELETE FROM {table} WHERE {cond}", list(replace_where.values()))
        arrow = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        if arrow.num_rows == 0:
            return
        cols = ", ".join(arrow.column_names)
        verb = "INSERT" if table in _NO_KEY else "INSERT OR REPLACE"  # keyless bulk tables: delete, then insert
        self.con.register("_bulk", arrow)
        try:
            self.con.execute(f"{verb} INTO {table} ({cols}) SELECT {cols} FROM _bulk")
        finally:
            self.con.unregister("_bulk")

    def insert_embeddings(self, stage_id: str, split: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        n, d = vectors.shape
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
        tbl = pa.table({
            "stage_id": pa.array([stage_id] * n, pa.string()),
            "item_id": pa.array(ids.astype(np.int64)),
            "split": pa.array([split] * n, pa.string()),
            "vec": pa.ListArray.from_arrays(offsets, flat),
        })
        self.con.execute("DELETE FROM embeddings WHERE stage_id = ? AND split = ?", [stage_id, split])
        self.con.register("_emb", tbl)
        try:
            self.con.execute("INSERT INTO embeddings SELECT stage_id, item_id, split, vec FROM _emb")
        finally:
            self.con.unregister("_emb")


def _create_schema(path: Path) -> None:
    engine = create_engine(f"duckdb:///{path}")
    try:
        with engine.begin() as conn:
            for ddl in NATIVE_DDL.values():
                conn.exec_driver_sql(ddl)
        tables = [m.__table__ for name, m in TABLES.items() if name not in NATIVE_DDL]  # type: ignore[attr-defined]
        SQLModel.metadata.create_all(engine, tables=tables)
    finally:
        engine.dispose()


def open_store(path: str | Path, *, read_only: bool = False, wait_s: float = 0.0, sandboxed: bool = False) -> Store:
    """Open (creating when writable and missing) the results database at ``path``.

    ``sandboxed`` (read-only only): the connection can touch no file but the database (see :data:`SANDBOX`).
    """
    path = Path(path).resolve()
    if read_only:
        if not path.exists():
            raise StoreError(f"{path}: no results database here; run `alloclab run SPEC` first or pass --db PATH")
        return Store(path, _connect(path, True, wait_s, SANDBOX if sandboxed else None), True)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, False, wait_s)  # take the lock first: fail fast if another run holds it
    con.close()
    try:
        _create_schema(path)
    except Exception as e:  # noqa: BLE001 - any DDL failure means the file is unusable
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        if "lock" in first.lower():  # another run took the file between our lock probe and the DDL
            raise StoreError(f"{path}: the results database is locked by another process that started at the same "
                             "time; DuckDB allows one writer. Wait for that run to finish, or pass --db to use "
                             "another file.") from None
        raise StoreError(f"{path}: cannot create the schema: {first}") from None
    store = Store(path, _connect(path, False, wait_s), False)
    row = store.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        store.con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    elif int(row[0]) != SCHEMA_VERSION:
        store.close()
        raise StoreError(f"{path}: schema version {row[0]}, this alloclab writes {SCHEMA_VERSION}; use another --db")
    return store
