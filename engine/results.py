"""Cross-trial results: compute and write an experiment's analysis tables; gather what its report shows.

SQL does the sets (joins, group-bys); ``engine.analysis`` does the statistics; this module moves rows between them.
Both functions read only the experiment's current plan (``experiment_trials`` / ``experiment_stages``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from engine import analysis, correlate, expansion, fits, groups
from engine.bound import bounds
from engine.errors import StoreError
from engine.spec import BackboneSpec
from engine.store import Store

ANALYSIS_TABLES = ("separations", "slopes", "attribute_slopes", "correlations", "fits", "best_alpha", "cross_slopes",
                   "explanations", "explanation_correlations", "bounds", "verdicts")

_CURVES_SQL = """
SELECT t.attribute AS alloc_attribute, t.alpha, t.seed, m.attribute, m.grp, m.metric, m.value
FROM experiment_trials et
JOIN trials t ON t.trial_id = et.trial_id
JOIN metrics m ON m.trial_id = t.trial_id
WHERE et.experiment = ? AND t.status = 'done'
ORDER BY 1, 2, 3, 4, 5, 6
"""

# The metric rows with their values on the B paired test resamples (a list per row, in resample order).
_CURVES_BOOT_SQL = """
WITH et AS (SELECT t.trial_id, t.attribute AS alloc_attribute, t.alpha, t.seed,
                   TRY_CAST(json_extract_string(t.config_json, '$.grown') AS INTEGER) AS grown,
                   TRY_CAST(json_extract_string(t.config_json, '$.added') AS INTEGER) AS added
            FROM experiment_trials e JOIN trials t ON t.trial_id = e.trial_id
            WHERE e.experiment = ? AND t.status = 'done'),
rs AS (SELECT r.trial_id, r.attribute, r.grp, r.metric, list(r.value ORDER BY r.b) AS boot
       FROM metric_resamples r JOIN et ON et.trial_id = r.trial_id
       GROUP BY r.trial_id, r.attribute, r.grp, r.metric)
SELECT et.alloc_attribute, et.alpha, et.seed, m.attribute, m.grp, m.metric, m.value, rs.boot, et.grown, et.added
FROM et JOIN metrics m ON m.trial_id = et.trial_id
LEFT JOIN rs ON rs.trial_id = m.trial_id AND rs.attribute = m.attribute AND rs.grp = m.grp AND rs.metric = m.metric
ORDER BY 1, 2, 3, 4, 5, 6
"""

# Per attribute and distance over the pre-training seeds: the mean, the seed-to-seed SD (ddof 1) and, kept apart,
# the within-seed sampling spread (RMS over seeds of the bootstrap SD, read from each seed's 95% half-width / 1.96).
_SEPARATIONS_SQL = """
SELECT sv.attribute, sv.distance, avg(sv.value) AS value, stddev_samp(sv.value) AS seed_sd,
       sqrt(avg(pow((sv.ci_high - sv.ci_low) / (2 * 1.959964), 2))) AS within_sd,
       avg(sv.value_y0) AS value_y0, avg(sv.value_y1) AS value_y1,
       avg(sv.calibrated) AS calibrated, stddev_samp(sv.calibrated) AS calibrated_sd,
       avg(sv.null_mean) AS null_mean, max(sv.p_value) AS p_value, max(sv.pca_k) AS pca_k,
       count(*) AS n_seeds, min(sv.n_g0) AS n_g0, min(sv.n_g1) AS n_g1
FROM experiment_stages es
JOIN separation_values sv ON sv.stage_id = es.stage_id
WHERE es.experiment = ?
GROUP BY sv.attribute, sv.distance
ORDER BY value DESC
"""


# The encoder the heads were trained on (the checkpoint seed): the bound's ε comes from its own TV.
_EPSILON_SQL = """
SELECT sv.attribute, sv.distance, sv.value, sv.value_y0, sv.value_y1, sv.pretrain_seed
FROM experiment_stages es JOIN separation_values sv ON sv.stage_id = es.stage_id
WHERE es.experiment = ? AND sv.pretrain_seed = ?
"""

# The pre-training train set: each group's share and its class prevalence P(Y=1 | A=a) (method.md §8).
_PRETRAIN_GROUPS_SQL = """
WITH ds AS (SELECT DISTINCT s.stage_id FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id
            WHERE es.experiment = ? AND s.kind = 'dataset')
SELECT ig.attribute, ig.grp, count(*) / sum(count(*)) OVER (PARTITION BY ig.attribute) AS share,
       avg(i.y) AS prevalence
FROM items i JOIN item_groups ig ON ig.dataset_id = i.dataset_id AND ig.item_id = i.item_id
WHERE i.dataset_id IN (SELECT stage_id FROM ds) AND i.split = 'pretrain_train'
GROUP BY ig.attribute, ig.grp
"""

# The pre-trained model's own balanced accuracy per group on the test set, mean over pre-training seeds.
_PRETRAINED_SQL = """
SELECT pm.attribute, pm.grp, avg(pm.value) AS value
FROM experiment_stages es JOIN pretrained_metrics pm ON pm.stage_id = es.stage_id
WHERE es.experiment = ? AND pm.metric = 'bal_acc'
GROUP BY pm.attribute, pm.grp
"""

_P_Y_SQL = """
SELECT t.attribute, t.alpha, avg(t.p_y_train) AS p_y, max(t.budget) AS budget
FROM experiment_trials et JOIN trials t ON t.trial_id = et.trial_id
WHERE et.experiment = ? AND t.status = 'done'
GROUP BY t.attribute, t.alpha
"""


_POOL_GROUPS_SQL = """
SELECT ig.attribute, sum(ig.grp) AS n
FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id AND s.kind = 'dataset'
JOIN item_groups ig ON ig.dataset_id = s.stage_id
JOIN items i ON i.dataset_id = ig.dataset_id AND i.item_id = ig.item_id
WHERE es.experiment = ? AND i.split = 'pool_train' AND ig.grp >= 0
GROUP BY ig.attribute
"""  # items of group 1 of every attribute in the fine-tuning pool


def _spec(store: Store, experiment: str) -> dict[str, Any]:
    """The resolved spec the experiment was last run with."""
    row = store.query("SELECT spec_json FROM experiments WHERE name = ?", [experiment])
    if not row:
        raise StoreError(f"{store.path}: no experiment '{experiment}'; fix: run `alloclab run SPEC` first")
    return json.loads(row[0]["spec_json"])


def separations_with_verdicts(store: Store, experiment: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The experiment's separations (aggregated over pre-training seeds) with the screen verdict of each."""
    seps = store.query(_SEPARATIONS_SQL, [experiment])
    verdict = analysis.screen_verdicts(seps, min_effect=spec["separation"]["min_effect"],
                                       permutations=spec["separation"]["permutations"])
    return [{**r, **verdict[(r["attribute"], r["distance"])]} for r in seps]


def write_screen(store: Store, experiment: str) -> list[dict[str, Any]]:
    """Write (and return) the separations table of ``experiment``; call inside a transaction."""
    rows = separations_with_verdicts(store, experiment, _spec(store, experiment))
    tag = {"experiment": experiment}
    store.insert_rows("separations", [{**tag, **r} for r in rows], replace_where=tag)
    return rows


def curves_with_resamples(store: Store, experiment: str) -> list[dict[str, Any]]:
    """The experiment's metric rows, each with ``boot``: its values on the test resamples (numpy, or None)."""
    tbl = store.con.sql(_CURVES_BOOT_SQL, params=[experiment]).to_arrow_table()
    rows = tbl.drop_columns(["boot"]).to_pylist()
    boot = tbl.column("boot").combine_chunks()
    flat = boot.flatten().to_numpy(zero_copy_only=False).astype(float)
    offsets = boot.offsets.to_numpy()
    valid = boot.is_valid().to_numpy(zero_copy_only=False)
    for i, r in enumerate(rows):
        r["boot"] = flat[offsets[i]:offsets[i + 1]] if valid[i] else None
    return rows


def write_analysis(store: Store, experiment: str) -> None:
    """(Re)compute every analysis table of ``experiment`` (ANALYSIS_TABLES); call inside a transaction."""
    spec = _spec(store, experiment)
    if spec["allocation"].get("protocol", "reallocate") == "expand":
        return _write_expand_analysis(store, experiment, spec)
    boot, seed = spec["analysis"]["bootstrap"], spec["analysis"]["seed"]
    q = [experiment]
    curves = curves_with_resamples(store, experiment)
    cells = analysis.curves_from_rows(curves)
    seps = separations_with_verdicts(store, experiment, spec)
    p_y = store.query(_P_Y_SQL, q)
    budget = max((int(r["budget"]) for r in p_y), default=0)
    group_rows = analysis.group_slopes(cells)
    attr_rows = analysis.attribute_slopes(cells)
    expl = analysis.explanations(group_rows, seps, store.query(_PRETRAIN_GROUPS_SQL, q), store.query(_PRETRAINED_SQL, q))
    eps = store.query(_EPSILON_SQL, [experiment, BackboneSpec.model_validate(spec["backbone"]).checkpoint_seed])
    tables: dict[str, list[dict[str, Any]]] = {
        "separations": seps,
        "slopes": group_rows,
        "attribute_slopes": attr_rows,
        "correlations": correlate.correlations(seps, attr_rows, seed=seed),
        "fits": [{**{k: v for k, v in r.items() if k != "params"}, "params_json": json.dumps(r["params"])}
                 for r in fits.fit_curves(curves, budget)] if budget else [],
        "best_alpha": fits.best_alpha([c for c in curves if c["metric"] in ("loss", "bal_acc", "acc")], budget,
                                      n_boot=min(boot, 200), seed=seed) if budget else [],
        "cross_slopes": analysis.cross_slopes(cells),
        "explanations": expl,
        "explanation_correlations": correlate.explanation_correlations(expl, seps, attr_rows, seed=seed),
        "bounds": bounds(curves, seps, p_y, attr_rows, spec["finetune"]["mode"], epsilon_rows=eps),
        "verdicts": analysis.verdicts(attr_rows, seps),
        **{name: [] for name in EXPAND_TABLES},  # an experiment that ran 'expand' before under this name
        "group_separations": groups.pairwise(store, experiment, spec),
    }
    tag = {"experiment": experiment}
    for name, rows in tables.items():
        store.insert_rows(name, [{**tag, **r} for r in rows], replace_where=tag)


EXPAND_TABLES = ("expansion_slopes", "expansion_fits")


def _write_expand_analysis(store: Store, experiment: str, spec: dict[str, Any]) -> None:
    """protocol 'expand' (engine/expansion.py): separations, expansion slopes and fits, verdicts. The tables of
    re-allocation (slopes on α, best α, the bound, ...) are emptied for this experiment: they have no α to use."""
    c = expansion.cells(curves_with_resamples(store, experiment))
    slopes = expansion.slope_rows(c)
    fitted = expansion.fit_rows(c)
    seps = separations_with_verdicts(store, experiment, spec)
    tables: dict[str, list[dict[str, Any]]] = {name: [] for name in ANALYSIS_TABLES}
    tables.update({
        "separations": seps,
        "correlations": [r for r in correlate.correlations(seps, expansion.attribute_rows(slopes),
                                                           seed=int(spec["analysis"]["seed"])) if r["y"] == "slope"],
        "expansion_slopes": slopes,
        "expansion_fits": [{**{k: v for k, v in r.items() if k != "params"}, "params_json": json.dumps(r["params"])}
                           for r in fitted],
        "verdicts": expansion.verdicts(slopes, fitted),
        "group_separations": groups.pairwise(store, experiment, spec),
    })
    tag = {"experiment": experiment}
    for name, rows in tables.items():
        store.insert_rows(name, [{**tag, **r} for r in rows], replace_where=tag)


def report_data(store: Store, experiment: str) -> dict[str, Any]:
    """Everything the report shows for ``experiment``, as plain rows (see engine.report.render_report)."""
    exp = store.query("SELECT * FROM experiments WHERE name = ?", [experiment])
    if not exp:
        known = [r["name"] for r in store.query("SELECT name FROM experiments ORDER BY name")]
        raise StoreError(f"{store.path}: no experiment '{experiment}' (known: {', '.join(known) or 'none'}); "
                         "fix: run `alloclab run SPEC` first")
    e = exp[0]
    spec = json.loads(e["spec_json"])
    q = [experiment]
    tag = "WHERE experiment = ?"
    budget = store.query(_P_Y_SQL, q)
    return {
        "experiment": {
            "name": e["name"], "description": spec["experiment"]["description"],
            "budget": max((int(r["budget"]) for r in budget), default=None), "mode": spec["finetune"]["mode"],
            "sampler": spec["allocation"].get("sampler", "natural"),
            "spec_path": e["spec_path"], "spec_toml": e["spec_toml"], "created_at": str(e["created_at"]),
            "git_commit": e["git_commit"], "versions": json.loads(e["versions_json"]),
            "variant": json.loads(e["variant_json"]),
        },
        "separations": store.query(f"SELECT * EXCLUDE (experiment) FROM separations {tag} ORDER BY value DESC", q),
        "curves": store.query(_CURVES_SQL, q),
        "slopes": store.query(f"SELECT * FROM slopes {tag} ORDER BY attribute, metric, grp", q),
        "attribute_slopes": store.query(f"SELECT * EXCLUDE (experiment) FROM attribute_slopes {tag} "
                                        "ORDER BY attribute, metric", q),
        "correlations": store.query(f"SELECT * EXCLUDE (experiment) FROM correlations {tag} "
                                    "ORDER BY distance, x, metric, y", q),
        "verdicts": store.query(f"SELECT * EXCLUDE (experiment) FROM verdicts {tag} ORDER BY attribute", q),
        "fits": store.query(f"SELECT * EXCLUDE (experiment) FROM fits {tag} ORDER BY attribute, metric, grp, model", q),
        "best_alpha": store.query(f"SELECT * EXCLUDE (experiment) FROM best_alpha {tag} "
                                  "ORDER BY attribute, metric, criterion", q),
        "cross_slopes": store.query(f"SELECT * EXCLUDE (experiment) FROM cross_slopes {tag} "
                                    "ORDER BY alloc_attribute, attribute, grp, metric", q),
        "explanations": store.query(f"SELECT * EXCLUDE (experiment) FROM explanations {tag} "
                                    "ORDER BY attribute, grp", q),
        "explanation_correlations": store.query(f"SELECT * EXCLUDE (experiment) FROM explanation_correlations {tag}",
                                                q),
        "bounds": store.query(f"SELECT * EXCLUDE (experiment) FROM bounds {tag} "
                              "ORDER BY attribute, grp, alpha_a, alpha_b", q),
        "trials": store.query("SELECT t.status, count(*) AS count FROM experiment_trials et JOIN trials t "
                              "ON t.trial_id = et.trial_id WHERE et.experiment = ? GROUP BY 1 ORDER BY 1", q),
        "stages": store.query("SELECT s.kind, count(*) AS count, sum(s.duration_s) AS duration_s "
                              "FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id "
                              "WHERE es.experiment = ? GROUP BY 1 ORDER BY min(s.finished_at)", q)
                  + store.query("SELECT 'trials' AS kind, count(*) AS count, sum(t.duration_s) AS duration_s "
                                "FROM experiment_trials et JOIN trials t ON t.trial_id = et.trial_id "
                                "WHERE et.experiment = ? AND t.status = 'done'", q),
        "pretrain": [
            {"pretrain_seed": json.loads(r["key_json"])["seed"], **{k: json.loads(r["log_json"] or "{}").get(k)
                                                                    for k in ("epochs", "best_val_bal_acc")}}
            for r in store.query("SELECT s.key_json, s.log_json FROM experiment_stages es JOIN stages s "
                                 "ON s.stage_id = es.stage_id WHERE es.experiment = ? AND s.kind = 'pretrain' "
                                 "AND s.status = 'done'", q)
        ],
        "dropped": _dropped(store, experiment),
        "excluded": _excluded(store, experiment, spec),
        "p_y": [{k: r[k] for k in ("attribute", "alpha", "p_y")} for r in budget],
        "recommendations": stored_recommendations(store, experiment),
        "joint_recommendations": stored_joint_recommendations(store, experiment),
        "protocol": spec["allocation"].get("protocol", "reallocate"),
        "group_separations": store.query(f"SELECT * EXCLUDE (experiment) FROM group_separations {tag} "
                                         "ORDER BY attribute, group_a, group_b", q),
        "expansion_slopes": store.query(f"SELECT * EXCLUDE (experiment) FROM expansion_slopes {tag} "
                                        "ORDER BY attribute, grown, metric, role", q),
        "expansion_fits": store.query(f"SELECT * EXCLUDE (experiment) FROM expansion_fits {tag} "
                                      "ORDER BY attribute, grown, metric, model", q),
        "expansion_points": store.query(_EXPAND_POINTS_SQL, q),
        "base": spec["allocation"].get("base"),
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# protocol 'expand': each run's metric of the allocated attribute's two groups against the grown group's count
_EXPAND_POINTS_SQL = """
SELECT t.attribute, TRY_CAST(json_extract_string(t.config_json, '$.grown') AS INTEGER) AS grown,
       TRY_CAST(json_extract_string(t.config_json, '$.added') AS INTEGER) AS added, t.seed, m.grp, m.metric, m.value
FROM experiment_trials et
JOIN trials t ON t.trial_id = et.trial_id
JOIN metrics m ON m.trial_id = t.trial_id AND m.attribute = t.attribute
WHERE et.experiment = ? AND t.status = 'done' AND json_extract_string(t.config_json, '$.protocol') = 'expand'
ORDER BY 1, 2, 3, 4, 5, 6
"""


def _dropped(store: Store, experiment: str) -> dict[str, int]:
    """Items left out per split by a ``missing = "drop"`` rule, from the dataset stage's log."""
    rows = store.query("SELECT s.log_json FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id "
                       "WHERE es.experiment = ? AND s.kind = 'dataset' AND s.status = 'done'", [experiment])
    log = json.loads(rows[0]["log_json"] or "{}") if rows else {}
    return {k: int(v) for k, v in (log.get("n_dropped") or {}).items() if v}


def _excluded(store: Store, experiment: str, spec: dict[str, Any]) -> dict[str, int]:
    """attribute -> items without a group of it (``missing = "exclude"``), over all splits, from the dataset log."""
    rows = store.query("SELECT s.log_json FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id "
                       "WHERE es.experiment = ? AND s.kind = 'dataset' AND s.status = 'done'", [experiment])
    log = json.loads(rows[0]["log_json"] or "{}") if rows else {}
    out = {}
    for where, per_split in (log.get("excluded") or {}).items():  # 'attributes[2]' -> the spec's attribute name
        i = int(where.split("[")[1].rstrip("]")) if where.startswith("attributes[") else -1
        name = spec["attributes"][i]["name"] if 0 <= i < len(spec["attributes"]) else where
        if sum(per_split.values()):
            out[name] = int(sum(per_split.values()))
    return out


def pooled_report_data(store: Store, experiments: list[str]) -> dict[str, Any]:
    """One report over several experiments: attributes become "experiment:attribute" and the correlations across
    attributes are recomputed over the pooled set (the paper pools attributes within a dataset; this pools across)."""
    if len(experiments) < 2:
        raise StoreError("--experiments needs at least two experiment names, separated by commas")
    parts = [report_data(store, name) for name in experiments]
    expand = [name for name, p in zip(experiments, parts) if p.get("protocol") == "expand"]
    if expand:
        raise StoreError(f"experiment(s) {', '.join(expand)} ran protocol 'expand', and a pooled report compares "
                         "re-allocation curves; fix: report them on their own (alloclab report SPEC)")
    out: dict[str, Any] = {"experiment": {
        "name": "pooled__" + "__".join(experiments), "pooled": list(experiments),
        "description": "Pooled over experiments: " + ", ".join(experiments) + ".",
        "spec_path": "; ".join(p["experiment"]["spec_path"] for p in parts),
        "spec_toml": "\n\n".join(f"# ---- {p['experiment']['name']} ----\n{p['experiment']['spec_toml']}"
                                  for p in parts),
        "created_at": min(p["experiment"]["created_at"] for p in parts),
        "git_commit": ", ".join(sorted({p["experiment"]["git_commit"] for p in parts})),
        "versions": parts[0]["experiment"]["versions"], "variant": {},
        "budget": None, "mode": ", ".join(sorted({str(p["experiment"]["mode"]) for p in parts})),
        "sampler": ", ".join(sorted({str(p["experiment"].get("sampler", "natural")) for p in parts})),
    }}
    renamed = ("separations", "slopes", "attribute_slopes", "verdicts", "fits", "best_alpha", "explanations", "bounds",
               "p_y", "recommendations", "joint_recommendations")
    for key in renamed:
        out[key] = [{**r, "attribute": f"{p['experiment']['name']}:{r['attribute']}"} for p in parts for r in p[key]]
    out["curves"] = [{**r, "alloc_attribute": f"{p['experiment']['name']}:{r['alloc_attribute']}",
                      "attribute": r["attribute"] if r["attribute"] == "overall"
                      else f"{p['experiment']['name']}:{r['attribute']}"} for p in parts for r in p["curves"]]
    out["cross_slopes"] = [{**r, "alloc_attribute": f"{p['experiment']['name']}:{r['alloc_attribute']}",
                            "attribute": r["attribute"] if r["attribute"] == "overall"
                            else f"{p['experiment']['name']}:{r['attribute']}"} for p in parts for r in p["cross_slopes"]]
    out["correlations"] = correlate.correlations(out["separations"], out["attribute_slopes"])
    out["explanation_correlations"] = correlate.explanation_correlations(out["explanations"], out["separations"],
                                                                         out["attribute_slopes"])
    for key in ("trials", "stages", "pretrain"):
        out[key] = [{**r, "experiment": p["experiment"]["name"]} for p in parts for r in p[key]]
    out["generated_at"] = parts[0]["generated_at"]
    out["intervention"] = intervention_data(store, experiments)
    return out


# ---- the intervention comparison (regularised vs plain encoders) ----------------------------------------------

# Per pre-training seed: the pre-trained model's overall accuracy and, per attribute, its worst group's balanced
# accuracy on the test set (pretrained_metrics is written with the test embedding of each seed).
_PRETRAINED_SEEDS_SQL = """
WITH pm AS (SELECT es.stage_id, pm.attribute, pm.grp, pm.metric, pm.value
            FROM experiment_stages es JOIN pretrained_metrics pm ON pm.stage_id = es.stage_id
            WHERE es.experiment = ?)
SELECT 'overall' AS attribute, stage_id, max(value) AS value FROM pm
WHERE attribute = 'overall' AND metric = 'acc' GROUP BY stage_id
UNION ALL
SELECT attribute, stage_id, min(value) AS value FROM pm
WHERE attribute <> 'overall' AND metric = 'bal_acc' GROUP BY attribute, stage_id
"""

# The heads allocating ``attribute`` at the α grid point nearest a target: overall accuracy and the worst group's
# balanced accuracy (of that attribute), per seed.
_AT_ALPHA_SQL = """
WITH t AS (SELECT t.trial_id, t.alpha, t.seed FROM experiment_trials et JOIN trials t ON t.trial_id = et.trial_id
           WHERE et.experiment = ? AND t.status = 'done' AND t.attribute = ?),
nearest AS (SELECT alpha FROM t ORDER BY abs(alpha - ?), alpha LIMIT 1)
SELECT t.seed, any_value(t.alpha) AS alpha,
       max(m.value) FILTER (WHERE m.attribute = 'overall' AND m.metric = 'acc') AS acc,
       min(m.value) FILTER (WHERE m.attribute = ? AND m.metric = 'bal_acc') AS worst
FROM t JOIN metrics m ON m.trial_id = t.trial_id
WHERE t.alpha = (SELECT alpha FROM nearest)
GROUP BY t.seed
"""


def _mean_sd(values: list[float]) -> dict[str, Any]:
    import statistics

    vals = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def intervention_data(store: Store, experiments: list[str]) -> list[dict[str, Any]] | None:
    """Per experiment, what the intervention section compares (see :func:`engine.intervention.summarise`); None
    when no experiment has an active regulariser (a plain pooled report has no such section)."""
    from engine.intervention import is_active

    specs = {name: _spec(store, name) for name in experiments}
    regs = {name: spec.get("regulariser") or {"kind": "none"} for name, spec in specs.items()}
    if not any(is_active(r) for r in regs.values()):
        return None
    target = next(r["attribute"] for r in regs.values() if is_active(r))
    out = []
    for name in experiments:
        attribute = regs[name].get("attribute") if is_active(regs[name]) else target
        seps = {r["attribute"]: r for r in store.query(
            "SELECT * EXCLUDE (experiment) FROM separations WHERE experiment = ? AND distance = 'tv_paper'", [name])}
        slopes = {r["attribute"]: r for r in store.query(
            "SELECT * EXCLUDE (experiment) FROM attribute_slopes WHERE experiment = ? AND metric = 'loss'", [name])}
        seeds = store.query(_PRETRAINED_SEEDS_SQL, [name])
        best = store.query("SELECT alpha, ci_low, ci_high, interval FROM best_alpha WHERE experiment = ? AND "
                           "attribute = ? AND metric = 'bal_acc' AND criterion = 'worst_group'", [name, attribute])
        at_best = None
        if best and best[0]["alpha"] is not None:
            per_seed = store.query(_AT_ALPHA_SQL, [name, attribute, best[0]["alpha"], attribute])
            at_best = {**best[0], "grid_alpha": per_seed[0]["alpha"] if per_seed else None,
                       "acc": _mean_sd([r["acc"] for r in per_seed]),
                       "worst": _mean_sd([r["worst"] for r in per_seed])}
        controls = {a: r for a, r in seps.items() if a != attribute}
        out.append({
            "experiment": name, "regulariser": regs[name], "attribute": attribute,
            "tv": seps.get(attribute), "controls": controls, "slope": slopes.get(attribute),
            "control_slopes": {a: r for a, r in slopes.items() if a != attribute},
            "acc": _mean_sd([r["value"] for r in seeds if r["attribute"] == "overall"]),
            "worst": _mean_sd([r["value"] for r in seeds if r["attribute"] == attribute]),
            "at_best": at_best,
        })
    return out


# ---- recommendations (`alloclab recommend`) ----------------------------------------------------------------------

def _recommend_inputs(store: Store, experiment: str) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(spec, curve rows with resamples, the study's budget K) for `recommend`; StoreError for an expand
    experiment or one without finished trials."""
    spec = _spec(store, experiment)
    if spec["allocation"].get("protocol", "reallocate") == "expand":
        raise StoreError(f"experiment '{experiment}' ran protocol 'expand' (growing one group's count), and "
                         "`recommend` splits a fixed budget from re-allocation curves; fix: read the expansion section "
                         "of its report (or the expansion_slopes table), or run a re-allocation spec")
    curves = curves_with_resamples(store, experiment)
    budgets = store.query(_P_Y_SQL, [experiment])
    if not curves or not budgets:
        raise StoreError(f"{store.path}: experiment '{experiment}' has no finished trials; fix: run `alloclab run "
                         "SPEC` first")
    return spec, curves, max(int(r["budget"]) for r in budgets)


def recommendations(store: Store, experiment: str, *, budget: int, objective: str, metric: str,
                    min_share: dict[int, float], attributes: list[str] | None = None) -> list[dict[str, Any]]:
    """Recommend an allocation of ``budget`` for each real attribute of ``experiment`` (or ``attributes``) from its
    finished trials, and write the rows to ``recommendations``; call inside a transaction."""
    from engine.recommend import recommend_one
    from engine.spec import is_null_partition

    spec, curves, k = _recommend_inputs(store, experiment)
    from engine.spec import Spec

    names = Spec.model_validate({k: v for k, v in spec.items()}).allocated_names
    chosen = attributes or names
    unknown = [a for a in chosen if a not in names or is_null_partition(a)]
    if unknown:
        raise StoreError(f"recommend: unknown attribute {unknown[0]!r} in '{experiment}'; fix: use one of "
                         f"{', '.join(names)}")
    out = []
    for attr in chosen:
        rec = recommend_one(curves, attr, k=k, budget=budget, objective=objective, metric=metric,
                            min_share=min_share, n_boot=min(int(spec["analysis"]["bootstrap"]), 200),
                            seed=int(spec["analysis"]["seed"]))
        if rec is None:
            continue
        row = {"experiment": experiment, **{c: rec[c] for c in (
            "attribute", "metric", "objective", "budget", "k", "alpha", "n_g0", "n_g1", "pred_g0", "pred_g0_low",
            "pred_g0_high", "pred_g1", "pred_g1_low", "pred_g1_high", "objective_value", "interval", "n_seeds",
            "binding", "extrapolation")},
            "min_share_json": json.dumps(rec["min_share"], sort_keys=True),
            "alternatives_json": json.dumps(rec["alternatives"]), "created_at": dt.datetime.now(dt.timezone.utc)}
        store.insert_rows("recommendations", [row])
        out.append(row)
    return out


def joint_recommendations(store: Store, experiment: str, *, budget: int, objective: str, metric: str,
                          min_share: dict[str, dict[str, float]], attributes: list[str] | None = None
                          ) -> list[dict[str, Any]]:
    """Split ``budget`` among all groups of each K-group or intersection attribute of ``experiment`` (or of
    ``attributes``) at once (:func:`engine.recommend.recommend_joint`), and write one ``joint_recommendations`` row
    per group; returns one dict per attribute (the recommendation). Call inside a transaction."""
    from engine.recommend import recommend_joint
    from engine.spec import Spec

    spec, curves, k = _recommend_inputs(store, experiment)
    parsed = Spec.model_validate(spec)
    groups = {a.name: parsed.groups_of[a.name] for a in parsed.attributes if not a.is_binary}
    unknown = [a for a in (attributes or []) if a not in groups]
    if unknown:
        raise StoreError(f"recommend: {unknown[0]!r} is not an attribute with several groups in '{experiment}'"
                         + (f"; fix: use one of {', '.join(groups)}" if groups else ""))
    pool_rows = store.query(_POOL_GROUPS_SQL, [experiment])
    out = []
    for attr in attributes or list(groups):
        pool = {str(r["attribute"])[len(attr) + 1:]: int(r["n"]) for r in pool_rows
                if str(r["attribute"]).startswith(f"{attr}=")}
        rec = recommend_joint(curves, attr, groups[attr], k=k, budget=budget, objective=objective, metric=metric,
                              min_share=min_share.get(attr, {}), n_boot=min(int(spec["analysis"]["bootstrap"]), 200),
                              seed=int(spec["analysis"]["seed"]), pool=pool)
        if rec is None:
            continue
        head = {"experiment": experiment, "attribute": attr, "metric": metric, "objective": objective,
                "budget": int(budget), "min_share_json": json.dumps(rec["min_share"], sort_keys=True), "k": k,
                "objective_value": rec["objective_value"], "interval": rec["interval"], "n_seeds": rec["n_seeds"],
                "binding": rec["binding"], "alternatives_json": json.dumps(rec["alternatives"]),
                "extrapolation": rec["extrapolation"], "assumption": rec["assumption"],
                **{c: rec[c] for c in ("check_rmse", "check_bias", "check_n", "fit_rmse")},
                "created_at": dt.datetime.now(dt.timezone.utc)}
        store.insert_rows("joint_recommendations", [
            {**head, "group_label": g, "position": j, "share": rec["shares"][j], "n": rec["counts"][j],
             "pred": rec["preds"][j], "pred_low": rec["pred_low"][j], "pred_high": rec["pred_high"][j]}
            for j, g in enumerate(rec["groups"])])
        out.append(rec)
    return out


def stored_joint_recommendations(store: Store, experiment: str) -> list[dict[str, Any]]:
    """The experiment's stored joint recommendations, one row per group (none before the table existed)."""
    if not store.query("SELECT 1 FROM information_schema.tables WHERE table_name = 'joint_recommendations'"):
        return []
    return store.query("SELECT * EXCLUDE (experiment) FROM joint_recommendations WHERE experiment = ? "
                       "ORDER BY attribute, metric, objective, budget, min_share_json, position", [experiment])


def stored_recommendations(store: Store, experiment: str) -> list[dict[str, Any]]:
    """The experiment's stored recommendations (none in a database from before the table existed)."""
    if not store.query("SELECT 1 FROM information_schema.tables WHERE table_name = 'recommendations'"):
        return []
    return store.query("SELECT * EXCLUDE (experiment) FROM recommendations WHERE experiment = ? "
                       "ORDER BY attribute, metric, objective, budget, min_share_json", [experiment])
