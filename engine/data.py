"""The dataset stage: load a dataset, binarise the task label and attributes, check the spec against the data.

``prepare(spec)`` returns :class:`Prepared`: per split, item ids, Y and the 0/1 group of every attribute
(the ``random`` baseline included). ``check_against_data`` raises a SpecError for what only the data can tell:
an unknown column, a non-binary label, a budget a group cannot supply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from backends import datasets
from backends.base import SPLITS, DatasetBundle
from engine.errors import DataError, SpecError
from engine.sampling import n_group1
from engine.spec import BinaryRule, Spec, null_partition_name


@dataclass(frozen=True)
class SplitData:
    ids: np.ndarray  # int64
    y: np.ndarray  # int64 0/1
    groups: dict[str, np.ndarray]  # attribute -> int64 0/1


@dataclass(frozen=True)
class Prepared:
    bundle: DatasetBundle
    splits: dict[str, SplitData]

    def group_counts(self, split: str) -> dict[str, tuple[int, int]]:
        g = self.splits[split].groups
        return {a: (int((v == 0).sum()), int((v == 1).sum())) for a, v in g.items()}


def random_groups(ids: np.ndarray, seed: int) -> np.ndarray:
    """Bernoulli(0.5) per item, a pure function of (seed, item id): stable under subsetting (splitmix64)."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(63)).astype(np.int64)


def null_partition_seed(random_seed: int, k: int) -> int:
    """Seed of the k-th null partition: ``random_seed`` itself for the first ('random', as before), then a
    different stream per k (a large odd stride keeps the partitions' hash inputs apart)."""
    return random_seed if k == 1 else (random_seed + 0x5851F42D * (k - 1)) & 0xFFFFFFFF


def _evaluate(cols: dict[str, np.ndarray], expression: str, where: str, path: Path | str) -> np.ndarray:
    """A SQL boolean expression over the split's columns, evaluated by an in-memory DuckDB; NULL counts as 0."""
    import duckdb
    import pyarrow as pa

    table = pa.table({k: pa.array(v) for k, v in cols.items() if np.asarray(v).ndim == 1})
    con = duckdb.connect()
    try:
        con.register("items", table)
        out = con.execute(f"SELECT coalesce(({expression})::BOOLEAN, false) FROM items").fetchnumpy()
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise SpecError(f"{path}: {where}.expression: {msg}; fix: a SQL boolean expression over the columns "
                        f"({', '.join(sorted(table.column_names))})") from None
    finally:
        con.close()
    return np.asarray(next(iter(out.values()))).astype(np.int64)


def binarise(col: np.ndarray, rule: BinaryRule, where: str, path: Path | str) -> np.ndarray:
    if rule.threshold is not None:
        if not np.issubdtype(col.dtype, np.number):
            raise SpecError(f"{path}: {where}.threshold: column '{rule.column}' is not numeric; fix: use 'values'")
        return (col >= rule.threshold).astype(np.int64)
    if rule.values is not None:
        return np.isin(col, np.asarray(rule.values, dtype=col.dtype if col.dtype.kind in "iuf" else object)).astype(np.int64)
    uniq = set(np.unique(col).tolist())
    if not uniq <= {0, 1}:
        shown = sorted(uniq, key=str)[:5]
        raise SpecError(f"{path}: {where}: column '{rule.column}' is not 0/1 (values {shown}...); "
                        "fix: add 'threshold = ...' or 'values = [...]'")
    return col.astype(np.int64)


def load_bundle(spec: Spec, path: Path | str) -> DatasetBundle:
    try:
        module = datasets.get(spec.dataset.kind)
    except DataError as e:
        raise SpecError(f"{path}: dataset.kind: {e}") from None
    try:
        options = module.Options.model_validate(spec.dataset.options)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
        known = ", ".join(module.Options.model_fields)
        raise SpecError(f"{path}: dataset.options.{loc}: {msg}; fix: options of '{spec.dataset.kind}' are: {known}") from None
    return module.load(options)


def prepare(spec: Spec, path: Path | str = "<spec>") -> Prepared:
    """Load the dataset and derive Y and every attribute's groups for every split."""
    bundle = load_bundle(spec, path)
    out = {}
    for name in SPLITS:
        sp = bundle.splits[name]
        cols = sp.columns
        rules = [("task", spec.task)] + [(f"attributes[{i}]", a) for i, a in enumerate(spec.attributes)]
        for where, rule in rules:
            if rule.column is not None and rule.column not in cols:
                raise SpecError(f"{path}: {where}.column: '{rule.column}' is not a column of dataset "
                                f"'{spec.dataset.kind}' (columns: {', '.join(sorted(cols))}); fix: use one of those")
        derived = [_evaluate(cols, r.expression, w, path) if r.expression is not None
                   else binarise(cols[r.column], r, w, path) for w, r in rules]  # type: ignore[index]
        y = derived[0]
        groups = {a.name: g for a, g in zip(spec.attributes, derived[1:])}
        for k in range(1, spec.dataset.null_partitions + 1):  # the null baseline: independent random partitions
            groups[null_partition_name(k)] = random_groups(sp.ids, null_partition_seed(spec.dataset.random_seed, k))
        out[name] = SplitData(sp.ids.astype(np.int64), y, groups)
    return Prepared(bundle, out)


def resolve_budgets(spec: Spec, prep: Prepared) -> tuple[int, int]:
    """K and K_val: numbers as given, or 'auto' = the smallest (attribute, group) size in the pool (the paper)."""
    def resolve(value: int | str, split: str) -> int:
        if value != "auto":
            return int(value)
        return min(min(c) for c in prep.group_counts(split).values())
    return resolve(spec.allocation.budget, "pool_train"), resolve(spec.allocation.budget_val, "pool_val")


def check_backbone_options(spec: Spec, path: Path | str = "<spec>") -> None:
    """Validate ``[backbone] options`` with the backend class's ``Options`` model (imports the backend)."""
    from backends import backend_class

    cls = backend_class(spec.backbone.kind)
    modes = getattr(cls, "modes", ("last_layer",))
    if spec.finetune.mode not in modes:
        raise SpecError(f"{path}: finetune.mode: '{spec.finetune.mode}' is not supported by backbone "
                        f"'{spec.backbone.kind}'; fix: use one of: {', '.join(modes)}")
    options_model = getattr(cls, "Options", None)
    if options_model is None:
        return
    try:
        options_model.model_validate(spec.backbone.options)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
        known = ", ".join(options_model.model_fields) or "none"
        raise SpecError(f"{path}: backbone.options.{loc}: {msg}; fix: options of '{spec.backbone.kind}' are: {known}"
                        ) from None


def check_against_data(spec: Spec, prep: Prepared, path: Path | str = "<spec>") -> tuple[int, int]:
    """Checks that need the data (and the backend's options); returns the resolved (K, K_val)."""
    check_backbone_options(spec, path)
    k, k_val = resolve_budgets(spec, prep)
    for field, split, budget in (("budget", "pool_train", k), ("budget_val", "pool_val", k_val)):
        if budget < 1:
            raise SpecError(f"{path}: allocation.{field}: resolves to {budget}: a group is empty in {split}")
        for attr, (n0, n1) in prep.group_counts(split).items():
            need1 = max(n_group1(a, budget) for a in spec.allocation.alphas)
            need0 = max(budget - n_group1(a, budget) for a in spec.allocation.alphas)
            for grp, need, have in ((1, need1, n1), (0, need0, n0)):
                if need > have:
                    raise SpecError(
                        f"{path}: allocation.{field}: {budget} needs {need} items from group {grp} of '{attr}' but "
                        f"{split} has only {have}; fix: use at most {min(n0, n1)} or \"auto\"")
    return k, k_val
