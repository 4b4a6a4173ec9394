"""`alloclab` command line: parsing and printing only; the work lives in the engine modules.

User mistakes (a bad spec, missing data, a locked database) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.errors import USER_ERRORS, SpecError

DEFAULT_DB = "results.duckdb"


def _specs(path: str, *, data: bool = True) -> list[Any]:
    """The spec's variants; attributes with groups = "categories" resolved from the data (unless ``data`` is
    False)."""
    from engine.data import resolve_categories
    from engine.spec import load_spec

    specs = load_spec(path)
    return [resolve_categories(s, path) for s in specs] if data else specs


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.data import check_against_data, prepare
    from engine.plan import make_plan

    for spec in _specs(args.spec, data=not args.no_data):
        line = f"ok  {spec.experiment.name}"
        if not args.no_data:
            k, k_val = check_against_data(spec, prepare(spec, args.spec), args.spec)
            line += f"  K={k} K_val={k_val}"
        if any(a.groups == "categories" for a in spec.attributes):  # --no-data: the groups come from the data
            print(line + "  (groups = \"categories\": attributes and trials are known once the data is read)")
            continue
        plan = make_plan(spec)
        line += f"  attributes={','.join(spec.attribute_names)}  trials={len(plan.trials)}"
        print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from engine.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from engine.plan import make_plan
    from engine.store import open_store

    specs = _specs(args.spec)
    db = Path(args.db)
    store = open_store(db, read_only=True) if db.exists() else None
    try:
        for spec in specs:
            plan = make_plan(spec)
            groups: dict[str, list[str]] = {"dataset": [plan.dataset.stage_id],
                                            "pretrain": [s.stage_id for s in plan.pretrain.values()],
                                            "embed": [s.stage_id for s in plan.embed.values()],
                                            # the transfer distance's stages count as separation, as in `run`
                                            "separation": [s.stage_id for s in (*plan.separation.values(),
                                                                                *plan.transfer.values())],
                                            "analysis": [plan.analysis.stage_id]}
            print(f"{spec.experiment.name}  ({db})")
            print(f"  {'stage':<11}{'total':>7}{'done':>7}{'failed':>8}{'pending':>9}")
            rows = [(k, store.status_of("stages", "stage_id", ids) if store else {}, len(ids))
                    for k, ids in groups.items()]
            tids = [t.trial_id for t in plan.trials]
            rows.insert(4, ("trials", store.status_of("trials", "trial_id", tids) if store else {}, len(tids)))
            for kind, status, total in rows:
                done = sum(1 for v in status.values() if v == "done")
                failed = sum(1 for v in status.values() if v == "failed")
                print(f"  {kind:<11}{total:>7}{done:>7}{failed:>8}{total - done - failed:>9}")
            if store:
                _print_failures(store, plan)
    finally:
        if store:
            store.close()
    return 0


MAX_FAILURES_SHOWN = 5


def _print_failures(store: Any, plan: Any) -> None:
    """The first failed stages and trials of ``plan`` with the first line of their error."""
    stages = {s.stage_id: s.label for s in plan.stages()}
    trials = {t.trial_id: (f"trial {t.attribute} α={t.alpha:g} seed={t.seed}" if t.grown is None else
                           f"trial {t.attribute} group {t.grown} n={t.added} seed={t.seed}") for t in plan.trials}
    rows = []
    for table, key, labels in (("stages", "stage_id", stages), ("trials", "trial_id", trials)):
        failed = [i for i, v in store.status_of(table, key, list(labels)).items() if v == "failed"]
        if failed:
            errs = store.query(f"SELECT {key} AS id, error FROM {table} WHERE {key} IN "
                               f"(SELECT unnest(?::VARCHAR[])) ORDER BY finished_at", [failed])
            rows += [(labels[r["id"]], (r["error"] or "").strip().splitlines()[0] if r["error"] else "") for r in errs]
    for label, err in rows[:MAX_FAILURES_SHOWN]:
        print(f"  failed: {label}: {err}")
    if len(rows) > MAX_FAILURES_SHOWN:
        print(f"  ... and {len(rows) - MAX_FAILURES_SHOWN} more (SELECT * FROM trials WHERE status = 'failed')")


def _pipelines(args: argparse.Namespace, **kw: Any) -> Iterator[Any]:
    """A Pipeline per variant of the spec, sharing one store and one executor, closed when the caller is done.

    Every variant is checked against its data before the database is touched: a bad spec writes nothing.
    """
    from engine.executor import make_executor
    from engine.pipeline import Pipeline
    from engine.store import open_store

    variants = _prepared(args.spec)
    store = open_store(args.db)
    executor = None
    try:
        executor = make_executor("serial" if args.serial else "ray", num_cpus=args.num_cpus, address=args.address)
        for spec, prep in variants:
            print(f"== {spec.experiment.name}", file=sys.stderr)
            yield Pipeline(spec, Path(args.spec), store, executor, progress=not args.quiet, prepared=prep, **kw)
    finally:
        if executor is not None:
            executor.shutdown()
        store.close()


def cmd_run(args: argparse.Namespace) -> int:
    """Exit 0 only when every planned stage and trial of every variant is done; else 1 with what is not."""
    rc = 0
    for pipe in _pipelines(args, retry_failed=args.retry_failed):
        summary = pipe.run()
        name = pipe.spec.experiment.name
        print(f"{name}: {summary.line()} ({summary.seconds['total']:.1f} s)")
        left = pipe.outstanding()
        (t_done, t_failed, t_total), (s_done, s_failed, s_total) = left["trials"], left["stages"]
        if t_done < t_total or s_done < s_total:
            rc = 1
            print(f"alloclab: {name}: {t_done} of {t_total} trials done, {t_failed} failed; {s_done} of {s_total} "
                  f"stages done, {s_failed} failed (see `alloclab plan {args.spec}`; `--retry-failed` re-runs "
                  "failed trials)", file=sys.stderr)
    return rc


def _prepared(spec_path: str) -> list[tuple[Any, Any]]:
    """Every variant of a spec with its dataset, all checked before the database is touched."""
    from engine.data import check_against_data, prepare

    out = []
    for spec in _specs(spec_path):
        prep = prepare(spec, spec_path)
        check_against_data(spec, prep, spec_path)
        out.append((spec, prep))
    return out


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def cmd_screen(args: argparse.Namespace) -> int:
    for pipe in _pipelines(args):
        _print_screen(pipe.spec.experiment.name, pipe.screen())
    return 0


def _print_screen(name: str, rows: list[dict[str, Any]]) -> None:
    rows = sorted(rows, key=lambda r: (r["distance"], -(r["calibrated"] if r["calibrated"] is not None
                                                         else r["value"])))
    print(f"{name}: latent separation of each attribute's groups (test set; mean over pre-training seeds; seed SD = "
          "spread over pre-training seeds, ddof 1; spread = within-seed sampling spread SD, which covers the "
          "estimator's expectation, not the true distance; p = permutation p-value, for transfer distances the "
          "t-test of the gap against 0)")
    head = f"  {'attribute':<16}{'distance':<12}{'estimate':>9}{'seed SD':>9}{'spread':>8}{'calibrated':>11}" \
           f"{'p':>9}{'n g0':>7}{'n g1':>7}  verdict"
    print(head)
    for r in rows:
        print(f"  {r['attribute']:<16}{r['distance']:<12}{_fmt(r['value']):>9}{_fmt(r['seed_sd']):>9}"
              f"{_fmt(r['within_sd']):>8}{_fmt(r['calibrated']):>11}{_fmt(r['p_value'], '.3g'):>9}{r['n_g0']:>7}"
              f"{r['n_g1']:>7}  {r['verdict']}")


def cmd_report(args: argparse.Namespace) -> int:
    from engine.report import render_report
    from engine.results import pooled_report_data, report_data
    from engine.store import open_store

    if (args.spec is None) == (args.experiments is None):
        raise SpecError("report: give a SPEC file or --experiments a,b,c (one of the two)")
    if args.compare and args.spec is None:
        raise SpecError("report: --compare pools the grid variants of a SPEC; with --experiments the named "
                        "experiments are pooled already (drop --compare)")
    out_dir = Path(args.out)
    with open_store(args.db, read_only=True) as store:
        names = None
        if args.experiments:
            names = [n.strip() for n in args.experiments.split(",") if n.strip()]
        elif args.compare:
            names = [s.experiment.name for s in _specs(args.spec, data=False)]
            if len(names) < 2:
                raise SpecError(f"{args.spec}: --compare needs a spec with a [grid] of at least two variants; this "
                                "one has one (report it without --compare)")
        if names is not None:
            pooled = pooled_report_data(store, names)
            data = [(pooled["experiment"]["name"], pooled)]
        else:
            data = [(n, report_data(store, n)) for n in (s.experiment.name for s in _specs(args.spec, data=False))]
    for name, d in data:
        print(render_report(d, out_dir / f"{report_file_name(name)}.html"))
    return 0


MAX_NAME = 100  # file systems refuse names over 255 bytes; grid variants and pooled reports get long


def report_file_name(name: str) -> str:
    """The report's file name: the experiment name when short, else its first 80 characters and a hash of it."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    if len(safe) <= MAX_NAME:
        return safe
    return f"{safe[:80]}__{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _min_shares(specs: list[str], binary: list[str], joint: dict[str, list[str]]) -> dict[str, dict[Any, float]]:
    """--min-share values -> attribute -> {group: share}. Binary attributes take GROUP 0 or 1 (int keys); a K-group
    attribute takes its group labels (str keys). A value without 'ATTR:' applies to every attribute that has
    that group."""
    out: dict[str, dict[Any, float]] = {a: {} for a in [*binary, *joint]}
    for text in specs:
        target, _, rest = text.rpartition(":")
        grp, sep, share = rest.partition("=")
        try:
            v = float(share)
        except ValueError:
            v = -1.0
        if not sep or not grp or not 0.0 <= v <= 1.0:
            raise SpecError(f"--min-share {text!r}: write [ATTRIBUTE:]GROUP=SHARE with SHARE in [0, 1], e.g. 1=0.2, "
                            "digit_group:0=0.3 or region:east=0.25")
        if target and target not in out:
            raise SpecError(f"--min-share {text!r}: no attribute {target!r}; fix: use one of {', '.join(out)}")
        hits = 0
        for a in ([target] if target else list(out)):
            if a in joint and grp in joint[a]:
                out[a][grp] = v
                hits += 1
            elif a not in joint and grp in ("0", "1"):
                out[a][int(grp)] = v
                hits += 1
        if not hits:
            where = f"{target}'s groups are {', '.join(joint.get(target, ['0', '1']))}" if target else \
                "no attribute has it"
            raise SpecError(f"--min-share {text!r}: no group {grp!r} ({where}); fix: name one of its groups")
    for a, bounds in out.items():
        if sum(bounds.values()) > 1.0 + 1e-12:
            raise SpecError(f"--min-share for {a}: the lower bounds add up to more than 1 ({bounds})")
    return out


def cmd_recommend(args: argparse.Namespace) -> int:
    from engine.results import joint_recommendations, recommendations
    from engine.store import open_store

    if args.budget < 2:
        raise SpecError(f"--budget {args.budget}: give the number of items to allocate (at least 2)")
    with open_store(args.db) as store:
        for spec in _specs(args.spec, data=True):
            joint_groups = {a.name: spec.groups_of[a.name] for a in spec.attributes if not a.is_binary}
            binary = [a.name for a in spec.attributes if a.is_binary]
            names = args.attribute or [*binary, *joint_groups]  # K-group attributes: all their groups at once
            known = [*spec.allocated_names, *joint_groups]
            unknown = [n for n in names if n not in known]
            if unknown:
                raise SpecError(f"--attribute {unknown[0]!r}: not an allocated attribute of "
                                f"'{spec.experiment.name}'; fix: use one of {', '.join(known)}")
            derived = [n for n in names if n not in joint_groups and n not in binary]  # 'attribute=group'
            bounds = _min_shares(args.min_share, [*binary, *derived], joint_groups)
            goal = "minimise" if args.metric == "loss" else "maximise"
            print(f"== {spec.experiment.name}: allocate N = {args.budget} to {goal} the "
                  f"{'worse group' if args.objective == 'worst_group' else 'mean'}'s {args.metric}")
            for name in names:
                with store.transaction():
                    if name in joint_groups:
                        recs = joint_recommendations(store, spec.experiment.name, budget=args.budget,
                                                     objective=args.objective, metric=args.metric,
                                                     min_share=bounds, attributes=[name])
                        for rec in recs:
                            _print_joint(rec)
                        rows: list[Any] = recs
                    else:
                        rows = recommendations(store, spec.experiment.name, budget=args.budget,
                                               objective=args.objective, metric=args.metric,
                                               min_share=bounds[name], attributes=[name])
                        for r in rows:
                            _print_recommendation(r)
                if not rows:
                    print(f"  {name}: no recommendation (a group has no fitted curve for {args.metric})")
    return 0


def _print_recommendation(r: dict[str, Any]) -> None:
    bounds = json.loads(r["min_share_json"])
    print(f"  {r['attribute']}: group 1 share {r['alpha']:.3f} -> n = {r['n_g0']} (group 0) + {r['n_g1']} "
          f"(group 1)" + (f"   [minimum shares {bounds}{', binding' if r['binding'] else ''}]" if bounds else ""))
    for g in (0, 1):
        print(f"    group {g}: predicted {r['metric']} {r[f'pred_g{g}']:.4f} "
              f"[{r[f'pred_g{g}_low']:.4f}, {r[f'pred_g{g}_high']:.4f}]")
    print(f"    intervals: {r['interval']}; the study ran K = {r['k']}")
    for alt in json.loads(r["alternatives_json"]):
        print(f"    vs {alt['name']} (share {alt['alpha']:.3f}): objective {alt['objective_value']:.4f}, the "
              f"recommendation gains {alt['loses']:+.4f}")
    if r["extrapolation"]:
        print(f"    {r['extrapolation']}")


def _print_joint(r: dict[str, Any]) -> None:
    from engine.recommend import assumption_warning

    bounds = r["min_share"]
    print(f"  {r['attribute']} ({len(r['groups'])} groups at once): "
          + ", ".join(f"{g} {s:.3f}" for g, s in zip(r["groups"], r["shares"]))
          + f" -> n = {' + '.join(str(n) for n in r['counts'])}"
          + (f"   [minimum shares {bounds}{', binding' if r['binding'] else ''}]" if bounds else ""))
    for g, p, lo, hi in zip(r["groups"], r["preds"], r["pred_low"], r["pred_high"]):
        print(f"    {g}: predicted {r['metric']} {p:.4f} [{lo:.4f}, {hi:.4f}]")
    print(f"    intervals: {r['interval']}; the study ran K = {r['k']}")
    for alt in r["alternatives"]:
        print(f"    vs {alt['name']} ({' / '.join(f'{s:.3f}' for s in alt['shares'])}): objective "
              f"{alt['objective_value']:.4f}, the recommendation gains {alt['loses']:+.4f}")
    print(f"    assumes: {r['assumption']}")
    if r["check_n"]:
        print(f"    checked on the other groups' sweeps ({r['check_n']} points): these curves predict a group's "
              f"{r['metric']} there with RMSE {r['check_rmse']:.4f} (mean error {r['check_bias']:+.4f}), against "
              f"{r['fit_rmse']:.4f} on their own sweeps")
        if warning := assumption_warning(r["check_rmse"], r["fit_rmse"], r["check_n"]):
            print(f"    warning: {warning}")
    if r["extrapolation"]:
        print(f"    {r['extrapolation']}")


def cmd_export(args: argparse.Namespace) -> int:
    from engine.store import TABLES, open_store

    import pyarrow.parquet as pq

    out = Path(args.parquet)
    out.mkdir(parents=True, exist_ok=True)
    with open_store(args.db, read_only=True, sandboxed=True) as store:
        for table in sorted(TABLES):  # table names are our constants; the path never enters SQL
            path = out / f"{table}.parquet"
            data = store.con.sql(f"SELECT * FROM {table}").to_arrow_table()
            tmp = path.with_name(path.name + ".partial")
            try:
                pq.write_table(data, tmp)
                os.replace(tmp, path)  # a reader never sees half a file
            finally:
                tmp.unlink(missing_ok=True)
            print(f"{path}  {data.num_rows} rows")
    return 0


def _print_table(cols: list[str], rows: list[tuple[Any, ...]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (list, tuple)) and len(v) > 6:
            return "[" + ", ".join(fmt(x) for x in v[:6]) + f", … ({len(v)} values)]"
        return "NULL" if v is None else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from engine.store import open_store

    with open_store(args.db, read_only=True, sandboxed=True) as store:
        try:
            cur = store.con.execute(args.query)
        except duckdb.Error as e:
            msg = str(e).splitlines()[0]
            fix = "check the query (tables: SHOW TABLES)"
            if "disabled by configuration" in msg or "read-only" in msg or "configuration has been locked" in msg:
                fix = ("`alloclab sql` only reads this database: it writes no file, attaches nothing and changes no "
                       "setting; to get files use `alloclab export --parquet DIR`")
            raise SpecError(f"SQL error: {msg}; fix: {fix}") from None
        if cur.description is None:
            return 0
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
    if args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    elif args.format == "json":
        print(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1))
    else:
        _print_table(cols, rows)
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from engine.examples import coloured_mnist_images

    table, n = coloured_mnist_images(Path(args.dir), limit_train=args.limit_train, limit_test=args.limit_test,
                                     colour_seed=args.colour_seed)
    print(f"wrote {n} PNG images and {table}; run them with: alloclab run specs/colored_mnist_efficientnet.toml "
          f"(its dataset.options.path expects {table})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloclab", description="Subgroup allocation experiments (arXiv 2512.09496).")
    sub = p.add_subparsers(dest="command", required=True)

    def with_db(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--db", default=DEFAULT_DB, help=f"results database (default: ./{DEFAULT_DB})")
        return sp

    v = sub.add_parser("validate", help="check a spec (and the data it names) without running anything")
    v.add_argument("spec")
    v.add_argument("--no-data", action="store_true", help="skip the checks that need to load the dataset")
    v.set_defaults(fn=cmd_validate)
    sub.add_parser("schema", help="print the spec's JSON Schema (for editor completion)").set_defaults(fn=cmd_schema)
    pl = with_db(sub.add_parser("plan", help="show done / failed / pending stages and trials"))
    pl.add_argument("spec")
    pl.set_defaults(fn=cmd_plan)
    r = with_db(sub.add_parser("run", help="run what is missing (resumes; a finished spec is a no-op)"))
    r.add_argument("spec")
    r.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    r.add_argument("--retry-failed", action="store_true", help="re-run trials stored as failed")
    r.add_argument("--serial", action="store_true", help="run in this process without Ray (debugging)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(fn=cmd_run)
    sc = with_db(sub.add_parser("screen", help="only pre-train, embed and measure separation: which attributes "
                                "are worth balancing? (a ranked table)"))
    sc.add_argument("spec")
    sc.add_argument("--address", help="join an existing Ray cluster (default: start a local one)")
    sc.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    sc.add_argument("--serial", action="store_true", help="run in this process without Ray (debugging)")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    sc.set_defaults(fn=cmd_screen)
    rep = with_db(sub.add_parser("report", help="render reports/<experiment>.html"))
    rep.add_argument("spec", nargs="?", help="the spec whose experiments (grid variants) to report")
    rep.add_argument("--experiments", help="pool these experiments (comma-separated names) into one report")
    rep.add_argument("--compare", action="store_true", help="pool the SPEC's grid variants into one report (with "
                     "an intervention section when they differ in [regulariser])")
    rep.add_argument("--out", default="reports", help="output folder (default: ./reports)")
    rep.set_defaults(fn=cmd_report)
    rc = with_db(sub.add_parser("recommend", help="how to allocate a budget between an attribute's groups, from "
                                "the fitted curves (writes the recommendations table)"))
    rc.add_argument("spec")
    rc.add_argument("--budget", type=int, required=True, metavar="N", help="items to allocate")
    rc.add_argument("--objective", choices=["worst_group", "mean"], default="worst_group",
                    help="maximise the worse group's metric (default) or the mean of the two")
    rc.add_argument("--metric", choices=["bal_acc", "acc", "auc", "loss"], default="bal_acc")
    rc.add_argument("--min-share", action="append", default=[], metavar="[ATTR:]GROUP=SHARE",
                    help="a lower bound on a group's share, e.g. 1=0.2, digit_group:0=0.3 or region:east=0.25 "
                    "(repeatable)")
    rc.add_argument("--attribute", action="append", default=None, help="only this attribute (repeatable): a binary "
                    "one, a K-group one (all its groups at once) or one of its one-vs-rest runs ('region=east')")
    rc.set_defaults(fn=cmd_recommend)
    exp = with_db(sub.add_parser("export", help="write every table of the database to Parquet files"))
    exp.add_argument("--parquet", required=True, metavar="DIR", help="output folder (one <table>.parquet each)")
    exp.set_defaults(fn=cmd_export)
    ex = sub.add_parser("example", help="write an example data set to disk (coloured-mnist-images: coloured MNIST as "
                        "PNG files and a CSV, for the images dataset)")
    ex.add_argument("name", choices=["coloured-mnist-images"])
    ex.add_argument("dir", help="output folder")
    ex.add_argument("--limit-train", type=int, default=None, metavar="N",
                    help="the first N MNIST-train images (the pool; default all 60000)")
    ex.add_argument("--limit-test", type=int, default=None, metavar="N",
                    help="the first N MNIST-test images (pre-training + test; default all 10000)")
    ex.add_argument("--colour-seed", type=int, default=42)
    ex.set_defaults(fn=cmd_example)
    s = with_db(sub.add_parser("sql", help="query the results database (read-only)"))
    s.add_argument("query")
    s.add_argument("--format", choices=["table", "csv", "json"], default="table")
    s.set_defaults(fn=cmd_sql)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except USER_ERRORS as e:
        print(f"alloclab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `alloclab sql ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the environment, not the user's input: a full disk, a read-only folder, a long name
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"alloclab: error: {e.strerror or e}{where}; fix: free space or choose a writable location "
              "(--db, --out), then run again: finished work is kept", file=sys.stderr)
        return 1
    except Exception as e:  # DuckDB's I/O errors (disk full while writing the WAL) are not OSErrors
        if type(e).__module__.split(".")[0] not in ("duckdb", "_duckdb") or "IO" not in type(e).__name__:
            raise
        print(f"alloclab: error: the results database could not be written: {str(e).splitlines()[0]}; fix: free "
              "space or choose a writable --db, then run again: finished work is kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alloclab: interrupted; finished stages and trials are saved, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
