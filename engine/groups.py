"""Attributes with K named groups or intersections (issue 13, part 4): the group × group separation matrix.

Such an attribute runs as K one-vs-rest binary attributes ('region=north', ...: engine.data.prepare). Their
separations measure each group against the rest; this module adds every pair of groups: the paper's class-conditional
``tv_paper`` between group a and group b, on the test embeddings of each pre-training seed, with a permutation null
(groups shuffled within class among the pair's items) for ``calibrated``, averaged over seeds. It runs at analysis
time in the driver, from the embeddings and groups in the database.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from engine.separation import estimate
from engine.spec import Spec

PERMUTATIONS = 50  # per pair and seed (the matrix is descriptive: its p-values are not used by any verdict)


def pairwise(store: Any, experiment: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``group_separations`` for every non-binary attribute of ``experiment`` (none: [])."""
    model = Spec.model_validate(spec)
    multi = [a for a in model.attributes if not a.is_binary]
    if not multi:
        return []
    groups_of = model.groups_of
    embeds = store.query(
        "SELECT s.stage_id, s.key_json, p.key_json AS pretrain_key FROM experiment_stages es "
        "JOIN stages s ON s.stage_id = es.stage_id "
        "JOIN stages p ON p.stage_id = json_extract_string(s.key_json, '$.pretrain_id') "
        "WHERE es.experiment = ? AND s.kind = 'embed' AND s.status = 'done' "
        "AND json_extract_string(s.key_json, '$.split') = 'test'", [experiment])
    if not embeds:
        return []
    dataset = store.query("SELECT s.stage_id FROM experiment_stages es JOIN stages s ON s.stage_id = es.stage_id "
                          "WHERE es.experiment = ? AND s.kind = 'dataset'", [experiment])
    if not dataset:
        return []
    dataset_id = dataset[0]["stage_id"]
    y_of = {r["item_id"]: r["y"] for r in store.query(
        "SELECT item_id, y FROM items WHERE split = 'test' AND dataset_id = ?", [dataset_id])}
    rows = []
    for a in multi:
        names = [f"{a.name}={g}" for g in groups_of[a.name]]
        member = store.query("SELECT item_id, attribute FROM item_groups WHERE dataset_id = ? AND grp = 1 AND "
                             "attribute IN (" + ", ".join("?" * len(names)) + ")", [dataset_id, *names])
        code_of = {r["item_id"]: names.index(r["attribute"]) for r in member}
        per_pair: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for e in embeds:
            seed = json.loads(e["pretrain_key"])["seed"]
            ids, z = store.embeddings(e["stage_id"], "test")
            code = np.array([code_of.get(int(i), -1) for i in ids])
            y = np.array([y_of.get(int(i), -1) for i in ids])
            for i, j in itertools.combinations(range(len(names)), 2):
                keep = ((code == i) | (code == j)) & (y >= 0)
                g = (code[keep] == i).astype(np.int64)
                try:
                    res = estimate(z[keep], y[keep], g, distance="tv_paper", permutations=PERMUTATIONS, seed=seed)
                except ValueError:  # a class without both groups
                    continue
                per_pair.setdefault((i, j), []).append(res)
        labels_a = groups_of[a.name]
        for (i, j), results in per_pair.items():
            rows.append({
                "attribute": a.name, "group_a": labels_a[i], "group_b": labels_a[j], "distance": "tv_paper",
                "value": float(np.mean([r["value"] for r in results])),
                "calibrated": float(np.mean([r["calibrated"] for r in results])),
                "p_value": float(np.max([r["p_value"] for r in results])),
                "n_a": int(results[0]["n_g1"]), "n_b": int(results[0]["n_g0"]), "n_seeds": len(results),
            })
    return rows
