"""Cross-trial results: compute and write an experiment's analysis tables; gather what its report shows.

SQL does the sets (joins, group-bys); ``engine.analysis`` does the statistics; this module moves rows between them.
Both functions read only the experiment's current plan (``experiment_trials`` / ``experiment_stages``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from engine import analysis
from engine.errors import StoreError
from engine.store import Store

ANALYSIS_TABLES = ("separations", "slopes", "attribute_slopes", "correlations", "verdicts")

_CURVES_SQL = """
SELECT t.attribute AS alloc_attribute, t.alpha, t.seed, m.attribute, m.grp, m.metric, m.value
FROM experiment_trials et
JOIN trials t ON t.trial_id = et.trial_id
JOIN metrics m ON m.trial_id = t.trial_id
WHERE et.experiment = ? AND t.status = 'done'
ORDER BY 1, 2, 3, 4, 5, 6
"""

_SEPARATIONS_SQL = """
SELECT sv.attribute, sv.distance, avg(sv.value) AS value, stddev_pop(sv.value) AS std,
       count(*) AS n_seeds, min(sv.n_g0) AS n_g0, min(sv.n_g1) AS n_g1
FROM experiment_stages es
JOIN separation_values sv ON sv.stage_id = es.stage_id
WHERE es.experiment = ?
GROUP BY sv.attribute, sv.distance
ORDER BY value DESC
"""


def write_analysis(store: Store, experiment: str) -> None:
    """(Re)compute separations, slopes, correlations and verdicts of ``experiment``; call inside a transaction."""
    curves = store.query(_CURVES_SQL, [experiment])
    seps = store.query(_SEPARATIONS_SQL, [experiment])
    group_rows = analysis.group_slopes(curves)
    attr_rows = analysis.attribute_slopes(group_rows)
    corr_rows = analysis.correlations(seps, attr_rows)
    verdict_rows = analysis.verdicts(attr_rows, seps)
    tag = {"experiment": experiment}
    store.insert_rows("separations", [{**tag, **r} for r in seps], replace_where=tag)
    store.insert_rows("slopes", [{**tag, **r} for r in group_rows], replace_where=tag)
    store.insert_rows("attribute_slopes", [{**tag, **r} for r in attr_rows], replace_where=tag)
    store.insert_rows("correlations", [{**tag, **r} for r in corr_rows], replace_where=tag)
    store.insert_rows("verdicts", [{**tag, **r} for r in verdict_rows], replace_where=tag)


def report_data(store: Store, experiment: str) -> dict[str, Any]:
    """Everything the report shows for ``experiment``, as plain rows (see engine.report.render_report)."""
    exp = store.query("SELECT * FROM experiments WHERE name = ?", [experiment])
    if not exp:
        known = [r["name"] for r in store.query("SELECT name FROM experiments ORDER BY name")]
        raise StoreError(f"{store.path}: no experiment '{experiment}' (known: {', '.join(known) or 'none'}); "
                         "fix: run `alloclab run SPEC` first")
    e = exp[0]
    q = [experiment]
    tag = "WHERE experiment = ?"
    return {
        "experiment": {
            "name": e["name"], "description": json.loads(e["spec_json"])["experiment"]["description"],
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
                                    "ORDER BY distance, metric, y", q),
        "verdicts": store.query(f"SELECT * EXCLUDE (experiment) FROM verdicts {tag} ORDER BY attribute", q),
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
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
