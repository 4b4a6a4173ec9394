"""The dataset stage: load a dataset, binarise the task label and attributes, check the spec against the data.

``prepare(spec)`` returns :class:`Prepared`: per split, item ids, Y and the 0/1 group of every attribute
(the ``random`` baseline included). ``check_against_data`` raises a SpecError for what only the data can tell:
an unknown column, a non-binary label, a missing value, a budget a group cannot supply.

A missing value (NaN, null, empty text, an expression that is NULL) is never read as a class: it is an error naming
the column, the count and the first ids, unless the rule says ``missing = "drop"``; then those items leave every
split and :attr:`Prepared.keep` / :attr:`Prepared.dropped` say which and how many.

Spec expressions come from files people share, so they are treated as untrusted: :func:`_check_expression` parses
one with DuckDB's own parser (``json_serialize_sql``, which parses without executing) and allows only a single
scalar expression over the dataset's columns, and :func:`_sandbox` evaluates it on an in-memory connection with
file access, extension loading and Python replacement scans off and the configuration locked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from backends import datasets
from backends.base import SPLITS, DatasetBundle
from engine.errors import DataError, SpecError
from engine.sampling import largest_feasible, shortfall
from engine.spec import BinaryRule, Spec, null_partition_name


@dataclass(frozen=True)
class SplitData:
    ids: np.ndarray  # int64
    y: np.ndarray  # int64 0/1
    groups: dict[str, np.ndarray]  # attribute -> int64 0/1


@dataclass(frozen=True)
class Prepared:
    """The prepared dataset. ``bundle`` is the data actually used: when rows were dropped it is the loaded bundle
    restricted to ``keep`` (its splits and ``inputs()`` line up with ``splits``).

    ``keep``: split -> boolean mask over the rows of the *loaded* bundle's split (as ``datasets.get(kind).load``
    returns it, e.g. in a worker): True = the item is used. All True unless a rule has ``missing = "drop"``.
    ``dropped``: rule path ('task', 'attributes[1]') -> split -> items whose value under that rule is missing, for
    every rule with ``missing = "drop"`` (an item missing under two rules counts under both; ``n_dropped`` is the
    number of distinct items left out). Empty for specs without ``missing = "drop"``.
    ``excluded``: the same counts for attributes with ``missing = "exclude"``: those items stay in every split and
    every other attribute, and hold group -1 (no group) in this one.
    """

    bundle: DatasetBundle
    splits: dict[str, SplitData]
    keep: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)

    def n_dropped(self, split: str) -> int:
        """Distinct items of ``split`` left out because a value is missing under a ``missing = "drop"`` rule."""
        k = self.keep.get(split)
        return 0 if k is None else int((~k).sum())

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


# ---- missing values -------------------------------------------------------------------------------------------

def _missing_object(x: Any) -> bool:
    if x is None:
        return True
    if isinstance(x, str):
        return not x.strip()
    if isinstance(x, (float, np.floating)):
        return bool(np.isnan(x))
    return False


def missing_mask(col: np.ndarray) -> np.ndarray:
    """True where a raw value is missing: NaN, NaT, None, or text that is empty or only blanks (a CSV's empty
    cell in a text column reads as '')."""
    col = np.asarray(col)
    kind = col.dtype.kind
    if kind in "fc":
        return np.isnan(col)
    if kind in "mM":
        return np.isnat(col)
    if kind in "US":
        return np.char.strip(col) == ("" if kind == "U" else b"")
    if kind == "O":
        return np.fromiter((_missing_object(x) for x in col), dtype=bool, count=col.shape[0])
    return np.zeros(col.shape[0], dtype=bool)  # ints and bools cannot hold a missing value


def _few_ids(ids: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:k])
    return shown + (", ..." if ids.size > k else "")


def _missing_error(path: Path | str, where: str, rule: BinaryRule, per_split: dict[str, np.ndarray]) -> SpecError:
    """One line: which rule, how many items in which splits, their first ids, and the two fixes."""
    n = sum(int(ids.size) for ids in per_split.values())
    splits = ", ".join(f"{s} {ids.size}" for s, ids in per_split.items() if ids.size)
    first = np.concatenate([ids for ids in per_split.values() if ids.size])
    if rule.expression is not None:
        text = " ".join(str(rule.expression).split())  # a multi-line TOML string stays one line here
        what = (f"{where}.expression: '{text}' is NULL for {n} item(s) ({splits}; ids {_few_ids(first)}): a "
                "column it reads is missing there (NaN, null or empty text) or it gives no value (CASE without ELSE)")
        fix = ("give those items a value in the data, handle NULL in the expression (e.g. coalesce(column, 0)), "
               f"or set missing = \"drop\" in {where} to leave them out")
    elif getattr(rule, "intersection", None) is not None:
        what = (f"{where}.intersection: {n} item(s) have no group in a component ({splits}; ids {_few_ids(first)})")
    elif isinstance(rule.values, dict):
        what = (f"{where}.values: {n} item(s) have a missing value in '{rule.column}' or one in no group ({splits}; "
                f"ids {_few_ids(first)})")
    else:
        what = (f"{where}.column: '{rule.column}' has {n} missing value(s) (NaN, null or empty text) ({splits}; "
                f"ids {_few_ids(first)}); a missing value is not a class")
        fix = f"give those items a value in the data, or set missing = \"drop\" in {where} to leave them out"
    if where.startswith("attributes"):
        fix += " (or missing = \"exclude\" to keep them for every other attribute)"
    return SpecError(f"{path}: {what}; fix: {fix}")


# ---- expressions: parsed and checked before they run, evaluated in a sandbox ------------------------------------

# The syntax-tree node classes a scalar expression over the columns may contain.
_ALLOWED_CLASSES = frozenset({"COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "CASE", "CAST",
                              "BETWEEN", "FUNCTION", "COLLATE", "TYPE"})
_CLASS_WORDS = {"SUBQUERY": "a subquery (SELECT ...)", "STAR": "'*' or COLUMNS(...)", "WINDOW": "a window function",
                "LAMBDA": "a lambda", "PARAMETER": "a query parameter", "POSITIONAL_REFERENCE": "a positional "
                "reference (#n)"}
# The query parts a bare `SELECT <expression>` leaves empty (anything else is a clause smuggled into the text).
_EMPTY_CLAUSES = {"modifiers": [], "where_clause": None, "group_expressions": [], "group_sets": [], "having": None,
                  "sample": None, "qualify": None, "aggregate_handling": "STANDARD_HANDLING"}
# Scalar functions whose value comes from the session, the clock or the catalog rather than from the item: a
# group must be a function of the data (the dataset id hashes only the expression's text). VOLATILE functions
# (random, nextval, write_log, sleep_ms, ...) are refused by their catalog stability.
_SESSION_FUNCTIONS = frozenset({
    "current_setting", "getvariable", "current_database", "current_catalog", "current_schema", "current_schemas",
    "current_query", "in_search_path", "txid_current", "now", "today", "current_date", "current_time",
    "current_timestamp", "current_localtime", "current_localtimestamp", "get_current_time", "get_current_timestamp",
    "transaction_timestamp", "version", "platform", "pragma_version"})


class _Refused(Exception):
    """An expression outside the allowed shape; the message says what (the caller adds file, field and fix)."""


def _sandbox() -> Any:
    """An in-memory DuckDB that cannot touch files, load extensions or read Python variables, locked that way
    (the same settings as `alloclab sql`: engine.store.SANDBOX)."""
    import duckdb

    from engine.store import SANDBOX

    return duckdb.connect(":memory:", config=SANDBOX)


def _parse(con: Any, sql_prefix: str, expression: str, sql_suffix: str = "") -> dict[str, Any]:
    """DuckDB's syntax tree of prefix + expression + suffix, parsed but not executed (the text is bound as a
    parameter, so it is never part of the query that parses it)."""
    (row,) = con.execute("SELECT json_serialize_sql(? || ? || ?)", [sql_prefix, expression, sql_suffix]).fetchall()
    doc = json.loads(row[0])
    if doc.get("error"):
        msg = str(doc.get("error_message", "cannot be parsed"))
        if doc.get("error_type") == "not implemented":  # a statement other than SELECT (COPY, ATTACH, SET, ...)
            msg = "it is not a single expression (it contains a statement other than a value)"
        raise _Refused(msg)
    return doc


def _select_node(doc: dict[str, Any]) -> dict[str, Any]:
    statements = doc.get("statements", [])
    if len(statements) != 1:
        raise _Refused(f"it holds {len(statements)} statements, not one expression")
    node = statements[0]["node"]
    if node.get("type") != "SELECT_NODE":
        raise _Refused("it combines queries (UNION, INTERSECT, EXCEPT, ...), not one expression")
    if node.get("cte_map", {}).get("map"):
        raise _Refused("it defines a WITH query, not one expression")
    for key, empty in _EMPTY_CLAUSES.items():
        if node.get(key, empty) != empty:
            raise _Refused(f"it adds a query clause ({key.split('_')[0].upper()}), not one expression")
    if len(node.get("select_list", [])) != 1:
        raise _Refused(f"it lists {len(node.get('select_list', []))} values separated by ',', not one expression")
    return node


def _function_refusal(con: Any, node: dict[str, Any]) -> str | None:
    """Why a function call is not allowed, or None for a deterministic scalar function of its arguments."""
    name = str(node.get("function_name", ""))
    if node.get("schema") or node.get("catalog"):
        return f"a qualified function name ({node.get('catalog') or node.get('schema')}.{name})"
    if (node.get("filter") is not None or node.get("distinct") or node.get("export_state")
            or node.get("order_bys", {}).get("orders")):
        return f"an aggregate call of {name} (FILTER, DISTINCT or ORDER BY)"
    if name.lower() in _SESSION_FUNCTIONS:
        return f"the function {name}, whose value depends on the session or the clock, not on the item"
    rows = con.execute("SELECT function_type, stability, macro_definition FROM duckdb_functions() "
                       "WHERE function_name = lower(?)", [name]).fetchall()
    if not rows:
        return f"the function {name}, which DuckDB does not know"
    for ftype, stability, macro in rows:
        if ftype not in ("scalar", "macro"):
            return f"the {ftype} function {name} (only scalar functions of an item's values are allowed)"
        if stability == "VOLATILE":
            return f"the function {name}, whose value is not a function of the item (volatile)"
        if ftype == "macro" and "select" in str(macro or "").lower():
            return f"the function {name}, which reads DuckDB's catalog"
    return None


def _check_tree(con: Any, node: Any, columns: dict[str, str]) -> None:
    """Walk the expression's syntax tree: only allowed node classes, dataset columns and scalar functions."""
    if isinstance(node, list):
        for child in node:
            _check_tree(con, child, columns)
        return
    if not isinstance(node, dict):
        return
    cls = node.get("class")
    if cls is None and node.get("type") not in (None, "ORDER_MODIFIER"):  # a table or query node, not a value
        raise _Refused(f"it refers to a table or a query ({node.get('type')}); only the item's columns are allowed")
    if cls is not None and cls not in _ALLOWED_CLASSES:
        raise _Refused(f"it contains {_CLASS_WORDS.get(cls, cls)}, which is not allowed")
    if cls == "COLUMN_REF":
        names = node.get("column_names", [])
        ref = ".".join(names)
        if len(names) != 1:
            raise _Refused(f"'{ref}' is a qualified name; use the bare column name")
        if names[0].lower() not in columns:  # DuckDB's identifiers are case-insensitive
            raise _Refused(f"'{ref}' is not a column of the dataset")
    if cls == "FUNCTION":
        why = _function_refusal(con, node)
        if why:
            raise _Refused(f"it calls {why}")
    for value in node.values():
        _check_tree(con, value, columns)


def _strip_locations(node: Any) -> Any:
    """A syntax tree without its text offsets (the same expression sits at another offset in another query)."""
    if isinstance(node, dict):
        return {k: _strip_locations(v) for k, v in node.items() if not k.startswith("query_location")}
    if isinstance(node, list):
        return [_strip_locations(v) for v in node]
    return node


def _check_expression(con: Any, expression: str, columns: list[str]) -> str:
    """The query that evaluates ``expression`` over ``items``, once the expression is known to be one scalar
    expression over ``columns``; raises _Refused otherwise.

    Two parses: ``SELECT <expr>`` must be a lone SELECT with exactly one value and no FROM or other clause, every
    node of that value allowed; then the query that will run must parse to that same value over ``items`` (so the
    text checked is the text executed, whatever the expression does with quotes, comments or parentheses).
    """
    if ";" in expression:
        raise _Refused("';' is not allowed (one expression, not statements)")
    node = _select_node(_parse(con, "SELECT ", expression))
    if node.get("from_table", {}).get("type") != "EMPTY":
        raise _Refused("it has a FROM clause; the expression sees the item's columns without one")
    value = node["select_list"][0]
    if value.get("alias"):
        raise _Refused(f"it names its value (AS {value['alias']}); remove the alias")
    _check_tree(con, value, {c.lower(): c for c in columns})
    # the newline ends a trailing -- comment before the closing parenthesis
    sql = ("SELECT (", expression, "\n)::BOOLEAN AS v FROM items")
    run = _select_node(_parse(con, *sql))
    source = run.get("from_table", {})
    cast = run["select_list"][0]
    if (source.get("type") != "BASE_TABLE" or source.get("table_name") != "items" or source.get("schema_name")
            or source.get("catalog_name") or source.get("sample") is not None or source.get("at_clause") is not None
            or cast.get("class") != "CAST" or _strip_locations(cast.get("child")) != _strip_locations(value)):
        raise _Refused("it does not stay one expression when evaluated; check its quotes and parentheses")
    return "".join(sql)


def _arrow_column(v: np.ndarray) -> Any:
    """A column as DuckDB sees it: a missing value (NaN, None, empty text) is NULL, so comparisons with it are NULL
    (and reported) rather than false, or, for NaN, true (DuckDB orders NaN above every number)."""
    import pyarrow as pa

    v = np.asarray(v)
    m = missing_mask(v)
    return pa.array(v, mask=m if m.any() else None, from_pandas=True)


def _evaluate(cols: dict[str, np.ndarray], expression: str, where: str, path: Path | str
              ) -> tuple[np.ndarray, np.ndarray]:
    """A SQL boolean expression over the split's columns -> (0/1 int64, missing): missing where it is NULL.

    Raises SpecError (one line: file, field, what, fix) for anything but one scalar expression over the columns.
    """
    import duckdb
    import pyarrow as pa

    table = pa.table({k: _arrow_column(v) for k, v in cols.items() if np.asarray(v).ndim == 1})
    names = sorted(table.column_names)
    shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
    fix = (f"a SQL boolean expression over the columns ({shown}) using constants, operators, CASE, CAST and "
           "scalar functions only")
    con = _sandbox()
    try:
        query = _check_expression(con, expression, table.column_names)
        con.register("items", table)
        out = next(iter(con.execute(query).fetchnumpy().values()))
    except _Refused as e:
        raise SpecError(f"{path}: {where}.expression: {e}; fix: {fix}") from None
    except duckdb.Error as e:
        msg = str(e).splitlines()[0]
        raise SpecError(f"{path}: {where}.expression: {msg}; fix: {fix}") from None
    finally:
        con.close()
    if out.shape[0] != table.num_rows:  # the tree check refuses aggregates; this keeps values and items paired anyway
        raise SpecError(f"{path}: {where}.expression: gives {out.shape[0]} values for {table.num_rows} items; "
                        f"fix: {fix}")
    missing = np.ma.getmaskarray(out)
    values = np.where(missing, False, np.ma.getdata(out).astype(bool)).astype(np.int64)
    return values, missing


def binarise(col: np.ndarray, rule: BinaryRule, where: str, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A column under ``rule`` -> (0/1 int64, missing). Missing rows hold 0 in the first array; the caller must
    not use them as a class (``prepare`` raises or drops them)."""
    col = np.asarray(col)
    missing = missing_mask(col)
    present = col[~missing]
    out = np.zeros(col.shape[0], dtype=np.int64)
    if rule.threshold is not None:
        if not np.issubdtype(col.dtype, np.number):
            raise SpecError(f"{path}: {where}.threshold: column '{rule.column}' is not numeric; fix: use 'values'")
        out[~missing] = present >= rule.threshold
        return out, missing
    if rule.values is not None:
        wanted = np.asarray(rule.values, dtype=col.dtype if col.dtype.kind in "iuf" else object)
        out[~missing] = np.isin(present, wanted)
        return out, missing
    uniq = set(np.unique(present).tolist())
    if not uniq <= {0, 1}:
        shown = sorted(uniq, key=str)[:5]
        raise SpecError(f"{path}: {where}: column '{rule.column}' is not 0/1 (values {shown}...); "
                        "fix: add 'threshold = ...' or 'values = [...]'")
    out[~missing] = present.astype(np.int64)
    return out, missing


def categorise(col: np.ndarray, groups: dict[str, list[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """A column under K named groups -> (group index 0..K-1, missing). A value in no group counts as missing
    (the spec's ``missing`` rule then applies); missing rows hold 0 in the first array."""
    col = np.asarray(col)
    missing = missing_mask(col)
    codes = np.full(col.shape[0], -1, dtype=np.int64)
    for j, vals in enumerate(groups.values()):
        wanted = np.asarray(vals, dtype=col.dtype if col.dtype.kind in "iuf" else object)
        codes[~missing & np.isin(col, wanted)] = j
    none = codes < 0
    return np.where(none, 0, codes), missing | none


def _product(parts: list[tuple[tuple[np.ndarray, np.ndarray], int]]) -> tuple[np.ndarray, np.ndarray]:
    """The intersection of attributes: mixed-radix product of the components' group indices (the first component
    varies slowest, as ``itertools.product``); missing where any component is missing or has no group."""
    code = np.zeros(parts[0][0][0].shape[0], dtype=np.int64)
    missing = np.zeros(code.shape[0], dtype=bool)
    for (g, m), k in parts:
        code = code * k + np.maximum(g, 0)
        missing |= m | (g < 0)
    return np.where(missing, 0, code), missing


def restrict(bundle: DatasetBundle, keep: dict[str, np.ndarray]) -> DatasetBundle:
    """``bundle`` with only the rows ``keep`` marks, in every split: ids, columns and model inputs alike (inputs
    are indexed with int64 positions, as the backend contract allows). A split without a mask stays whole."""
    from dataclasses import replace

    from backends.base import Split

    index = {s: np.flatnonzero(m).astype(np.int64) for s, m in keep.items() if not m.all()}
    if not index:
        return bundle
    splits = {}
    for name, sp in bundle.splits.items():
        if name not in index:
            splits[name] = sp
            continue
        idx = index[name]
        splits[name] = Split(sp.name, sp.ids[idx], {k: np.asarray(v)[idx] for k, v in sp.columns.items()})
    load = bundle.load_inputs

    def load_kept(split: str) -> Any:
        x = load(split)  # type: ignore[misc]
        return x[index[split]] if split in index else x

    return replace(bundle, splits=splits, load_inputs=None if load is None else load_kept)


def decoded_inputs(bundle: DatasetBundle, transform: dict[str, Any] | None, cache_dir: str | None, *,
                   verify: bool = False) -> DatasetBundle:
    """``bundle`` whose image-file inputs (:class:`backends.images.ImageFiles`) come decoded as uint8 N×C×H×W with
    the transform's geometry, memory-mapped from ``cache_dir``; other inputs pass unchanged."""
    from dataclasses import replace

    from backends.images import Geometry, ImageFiles, decode

    load = bundle.load_inputs
    if load is None:
        return bundle
    geometry = Geometry.of(transform)

    def load_decoded(split: str) -> Any:
        x = load(split)
        if isinstance(x, ImageFiles):
            return decode(x, geometry, cache_dir, where=f"{bundle.kind} ({split})", verify=verify)
        return x

    return replace(bundle, load_inputs=load_decoded)


def image_files(bundle: DatasetBundle) -> dict[str, Any]:
    """split -> :class:`backends.images.ImageFiles` of a dataset whose inputs are image files; {} otherwise."""
    from backends.images import ImageFiles

    if not bundle.images or bundle.load_inputs is None:
        return {}
    out = {s: bundle.inputs(s) for s in bundle.splits}
    wrong = sorted({type(x).__name__ for x in out.values() if not isinstance(x, ImageFiles)})
    if wrong:
        raise DataError(f"dataset '{bundle.kind}' says its inputs are image files but gives {', '.join(wrong)}; "
                        "fix (in the loader): return backends.images.ImageFiles from load_inputs")
    return out


def check_images(spec: Spec, prep: Prepared, path: Path | str = "<spec>") -> None:
    """Image datasets: every file exists (the first few missing and their count otherwise); ``[backbone.transform]``
    is given only where it can apply."""
    from backends import backend_class
    from backends.images import check_present

    files = image_files(prep.bundle)
    transform = spec.backbone.transform
    if not files:
        if transform is not None:
            raise SpecError(f"{path}: backbone.transform: dataset '{spec.dataset.kind}' does not read image files, so "
                            "there is nothing to transform; fix: remove [backbone.transform] (it applies to the "
                            "images, mimic_cxr and ham10000 datasets)")
        return
    for split, f in files.items():
        check_present(f, f"dataset {spec.dataset.kind} ({split})")
    if transform is None or getattr(backend_class(spec.backbone.kind), "takes_transform", False):
        return
    per_batch = transform.model_dump(include={"normalize", "mean", "std", "flip", "random_resized_crop"},
                                     exclude_defaults=True)
    if per_batch:
        raise SpecError(f"{path}: backbone.transform: backbone '{spec.backbone.kind}' takes images as they are "
                        f"decoded, so {', '.join(sorted(per_batch))} cannot apply; fix: keep only resize, crop and "
                        "channels, or use an image backbone (torchvision, hf_vision)")


def check_decoded_shape(spec: Spec, shape: tuple[int, ...], path: Path | str = "<spec>") -> None:
    """A backbone with a fixed input shape (class attribute ``input_shape``, e.g. simple_cnn's (3, 28, 28)) gets
    images of that shape, else a SpecError with the transform that gives it; a backbone whose shape depends on its
    options checks it in ``check_image_shape(options, shape)`` (raising BackendError)."""
    from backends import backend_class

    cls = backend_class(spec.backbone.kind)
    check = getattr(cls, "check_image_shape", None)  # a shape that depends on the options (a model's image size)
    if check is not None:
        check(spec.backbone.options, tuple(shape))
    want = getattr(cls, "input_shape", None)
    if want is not None and tuple(shape) != tuple(want):
        raise SpecError(f"{path}: backbone.transform: images decode to {tuple(shape)} (channels, height, width) and "
                        f"backbone '{spec.backbone.kind}' needs {tuple(want)}; fix: set [backbone.transform] "
                        f"resize = [{want[1]}, {want[2]}], channels = {want[0]}")


ID_RANGE = (-(2**31), 2**31 - 1)  # the database's items / item_groups tables store item ids as 32-bit integers


def _check_id_range(bundle: DatasetBundle, spec: Spec) -> None:
    for name, sp in bundle.splits.items():
        ids = np.asarray(sp.ids)
        if len(ids) and (ids.min() < ID_RANGE[0] or ids.max() > ID_RANGE[1]):
            bad = ids[(ids < ID_RANGE[0]) | (ids > ID_RANGE[1])]
            raise DataError(f"dataset {spec.dataset.kind} ({name}): {len(bad)} item id(s) do not fit 32 bits (e.g. "
                            f"{bad[0]}); the results database stores ids as 32-bit integers; fix: renumber the items "
                            f"(e.g. the row number) and keep your own id as another column")


def resolve_categories(spec: Spec, path: Path | str = "<spec>", bundle: DatasetBundle | None = None) -> Spec:
    """``spec`` with every ``groups = "categories"`` attribute turned into its named groups: one per distinct
    non-missing value of its column over all splits (sorted as text), named by the value (characters outside
    letters, digits and _ . + - become _; a clash gets a numeric suffix). Specs without one are returned as they are.
    """
    import re

    todo = [i for i, a in enumerate(spec.attributes) if a.groups == "categories"]
    if not todo:
        return spec
    bundle = bundle or load_bundle(spec, path)
    attributes = [a.model_dump(mode="json") for a in spec.attributes]
    for i in todo:
        col = spec.attributes[i].column
        values: set[Any] = set()
        for name in SPLITS:
            cols = bundle.splits[name].columns
            if col not in cols:
                raise SpecError(f"{path}: attributes[{i}].column: '{col}' is not a column of dataset "
                                f"'{spec.dataset.kind}' (columns: {', '.join(sorted(cols))}); fix: use one of those")
            raw = np.asarray(cols[col])
            values |= set(raw[~missing_mask(raw)].tolist())
        if len(values) < 2:
            raise SpecError(f"{path}: attributes[{i}].groups: column '{col}' has {len(values)} distinct value(s); "
                            "an attribute needs at least 2 groups")
        groups: dict[str, list[Any]] = {}
        for v in sorted(values, key=str):
            label = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(v)) or "_"
            base, k = label, 2
            while label in groups:
                label, k = f"{base}_{k}", k + 1
            groups[label] = [v]
        attributes[i].update(groups=None, values=groups)
    raw_spec = spec.model_dump(mode="json")
    raw_spec["attributes"] = attributes
    return Spec.model_validate(raw_spec)


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
    """Load the dataset and derive Y and every attribute's groups for every split.

    A value missing under a rule is an error (all splits are looked at first, so the message has the full count),
    or, with ``missing = "drop"``, the item leaves its split: ids, Y, every group and the bundle stay parallel.
    """
    bundle = load_bundle(spec, path)
    _check_id_range(bundle, spec)
    rules = [("task", spec.task)] + [(f"attributes[{i}]", a) for i, a in enumerate(spec.attributes)]
    derived: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # split -> per rule: (0/1, missing)
    groups_of = spec.groups_of
    index_of = {a.name: i + 1 for i, a in enumerate(spec.attributes)}  # position in ``rules``
    for name in SPLITS:
        cols = bundle.splits[name].columns
        for where, rule in rules:
            if rule.column is not None and rule.column not in cols:
                raise SpecError(f"{path}: {where}.column: '{rule.column}' is not a column of dataset "
                                f"'{spec.dataset.kind}' (columns: {', '.join(sorted(cols))}); fix: use one of those")
        derived[name] = []
        for w, r in rules:
            if getattr(r, "intersection", None) is not None:  # the product of earlier attributes' groups
                parts = [(derived[name][index_of[c]], len(groups_of[c])) for c in r.intersection]
                derived[name].append(_product(parts))
            elif isinstance(r.values, dict):
                derived[name].append(categorise(cols[r.column], r.values))  # type: ignore[index]
            elif r.expression is not None:
                derived[name].append(_evaluate(cols, r.expression, w, path))
            else:
                derived[name].append(binarise(cols[r.column], r, w, path))  # type: ignore[index]
    keep = {name: np.ones(len(bundle.splits[name]), dtype=bool) for name in SPLITS}
    dropped: dict[str, dict[str, int]] = {}
    excluded: dict[str, dict[str, int]] = {}
    for i, (where, rule) in enumerate(rules):
        missing = {name: derived[name][i][1] for name in SPLITS}
        if rule.missing == "exclude":  # attributes only: the item stays, with no group of this attribute (-1)
            excluded[where] = {name: int(m.sum()) for name, m in missing.items()}
            for name, m in missing.items():
                derived[name][i] = (np.where(m, -1, derived[name][i][0]), m)
        elif rule.missing == "drop":
            dropped[where] = {name: int(m.sum()) for name, m in missing.items()}
            for name, m in missing.items():
                keep[name] &= ~m
        elif any(m.any() for m in missing.values()):
            raise _missing_error(path, where, rule, {name: bundle.splits[name].ids[m] for name, m in missing.items()})
    out = {}
    for name in SPLITS:
        k = keep[name]
        ids = bundle.splits[name].ids.astype(np.int64)[k]
        y = derived[name][0][0][k]
        groups = {}
        for a, (g, _) in zip(spec.attributes, derived[name][1:]):
            if a.is_binary:
                groups[a.name] = g[k]
                continue
            for j, label in enumerate(groups_of[a.name]):  # one-vs-rest: this group 1, the others 0; -1 kept
                groups[f"{a.name}={label}"] = np.where(g[k] < 0, -1, (g[k] == j).astype(np.int64))
        for j in range(1, spec.dataset.null_partitions + 1):  # the null baseline: independent random partitions
            groups[null_partition_name(j)] = random_groups(ids, null_partition_seed(spec.dataset.random_seed, j))
        out[name] = SplitData(ids, y, groups)
    return Prepared(restrict(bundle, keep), out, keep, dropped, excluded)


def resolve_budgets(spec: Spec, prep: Prepared) -> tuple[int, int]:
    """K and K_val: numbers as given, or 'auto' = the smallest (attribute, group) size in the pool (the paper); with
    the stratified sampler, the largest budget up to that which every attribute's (group, class) cells supply at
    every α."""
    def resolve(value: int | str, split: str) -> int:
        if value != "auto":
            return int(value)
        k = min(min(c) for c in prep.group_counts(split).values())
        if spec.allocation.sampler != "natural":
            sd = prep.splits[split]
            k = min([largest_feasible(spec.allocation.sampler, g, sd.y, spec.allocation.alphas, k)
                     for g in sd.groups.values()], default=k)
        return k
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


def check_backbone_inputs(spec: Spec, prep: Prepared) -> None:
    """A backend that reads files the user supplies (precomputed embeddings) checks them against every split's
    items here, so `validate` says ok only when `run` will not fail on them, and `run` fails before it writes."""
    from backends import backend_class

    check = getattr(backend_class(spec.backbone.kind), "check_inputs", None)
    if check is not None:
        check(spec.backbone.options, {split: prep.bundle.inputs(split) for split in prep.splits})


def batch_shortfalls(y: np.ndarray, a: np.ndarray, batch_size: int) -> list[tuple[int, int, float, int]]:
    """(class, group) cells to which a stratified mini-batch of ``batch_size`` cannot give ``MIN_PER_CELL`` items:
    (class, group, expected items per batch, smallest batch size that would; -1 if the cell is empty)."""
    from backends.base import MIN_PER_CELL

    y, a = np.asarray(y), np.asarray(a)
    out = []
    for c in (0, 1):
        for g in (0, 1):
            k = int(((y == c) & (a == g)).sum())
            expected = batch_size * k / len(y) if len(y) else 0.0
            if expected < MIN_PER_CELL + 1:  # stratified batches hold a cell's share to within one item
                out.append((c, g, expected, math.ceil((MIN_PER_CELL + 1) * len(y) / k) if k else -1))
    return out


def check_regulariser(spec: Spec, prep: Prepared, path: Path | str = "<spec>") -> None:
    """A regulariser needs a backbone that trains and, in pre-training, mini-batches that hold both groups of each
    class (stratified batches give each (class, group) cell its share of every batch)."""
    from backends import backend_class

    reg = spec.regulariser
    if not reg.active:
        return
    if not getattr(backend_class(spec.backbone.kind), "regularisable", False):
        raise SpecError(f"{path}: regulariser.kind: backbone '{spec.backbone.kind}' trains no encoder, so there is "
                        "nothing to regularise; fix: set regulariser.kind = \"none\" or use a backbone that trains "
                        "(e.g. simple_cnn, text)")
    if not reg.applies_to("pretrain"):
        return
    split = prep.splits["pretrain_train"]
    batch = spec.backbone.pretrain.batch_size
    short = batch_shortfalls(split.y, split.groups[str(reg.attribute)], batch)
    if short:
        c, g, expected, need = short[0]
        fix = (f"use backbone.pretrain.batch_size >= {max(n for *_, n in short)}" if need > 0
               else "regularise an attribute with both groups in both classes")
        raise SpecError(f"{path}: backbone.pretrain.batch_size: {batch} gives class {c}, group {g} of "
                        f"'{reg.attribute}' {expected:.1f} items per mini-batch in pretrain_train, and the regulariser "
                        f"needs 2 of each group in each class; fix: {fix}")


def check_against_data(spec: Spec, prep: Prepared, path: Path | str = "<spec>") -> tuple[int, int]:
    """Checks that need the data (and the backend's options); returns the resolved (K, K_val)."""
    check_backbone_options(spec, path)
    check_images(spec, prep, path)
    check_backbone_inputs(spec, prep)
    check_regulariser(spec, prep, path)
    k, k_val = resolve_budgets(spec, prep)
    for key, split, budget in (("budget", "pool_train", k), ("budget_val", "pool_val", k_val)):
        if budget < 1:
            raise SpecError(f"{path}: allocation.{key}: resolves to {budget}: a group is empty in {split}")
        sd, sampler = prep.splits[split], spec.allocation.sampler
        for attr, groups in sd.groups.items():
            short = shortfall(sampler, groups, sd.y, spec.allocation.alphas, budget)
            if short is not None:
                cell, need, have = short
                most = largest_feasible(sampler, groups, sd.y, spec.allocation.alphas, budget)
                raise SpecError(
                    f"{path}: allocation.{key}: {budget} needs {need} items from {cell} of '{attr}' (sampler "
                    f"{sampler}) but {split} has only {have}; fix: use at most {most} or \"auto\"")
    if spec.allocation.protocol == "expand":
        check_expand(spec, prep, path)
    return k, k_val


def resolve_base(spec: Spec, prep: Prepared) -> int:
    """protocol 'expand': ``allocation.base`` as given, or 'auto' = half the smallest (attribute, group) size in
    the train pool (half the paper's K)."""
    base = spec.allocation.base
    if base is None or base == "auto":
        return min(min(c) for c in prep.group_counts("pool_train").values()) // 2
    return int(base)


def check_expand(spec: Spec, prep: Prepared, path: Path | str = "<spec>") -> int:
    """Every attribute's pool supplies the largest count of each grown group and the base of the other; returns
    the resolved base."""
    from engine.sampling import expand_shortfall

    base = resolve_base(spec, prep)
    if base < 1:
        raise SpecError(f"{path}: allocation.base: resolves to {base}: a group is nearly empty in pool_train; fix: "
                        "give a positive base")
    sd, alloc = prep.splits["pool_train"], spec.allocation
    for attr, groups in sd.groups.items():
        short = expand_shortfall(alloc.sampler, groups, sd.y, base, alloc.counts, alloc.grow)
        if short is not None:
            cell, need, have = short
            which = "sizes" if need == max(alloc.counts) else "base"
            raise SpecError(f"{path}: allocation.{which}: needs {need} items from {cell} of '{attr}' (sampler "
                            f"{alloc.sampler}) but pool_train has only {have}; fix: use at most {have}")
    return base
