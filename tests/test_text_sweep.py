"""Text through the engine: RedditBias + MiniLM, last-layer and LoRA trials, on a small real subset."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.executor import SerialExecutor
from engine.pipeline import Pipeline
from engine.spec import load_spec, Spec
from engine.store import open_store

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "redditbias_minilm.toml"


def small(mode: str) -> Spec:
    doc = load_spec(SPEC)[0].model_dump(mode="json")
    doc["experiment"]["name"] = f"rb_{mode}"
    doc["dataset"]["options"] = {"split_seed": 42, "limit": 600}
    doc["attributes"] = [a for a in doc["attributes"] if a["name"] == "gender"]
    doc["backbone"]["pretrain_seeds"] = [0]
    doc["dataset"]["null_partitions"] = 1
    doc["backbone"]["pretrain"]["max_epochs"] = 0  # MiniLM as shipped
    doc["backbone"]["options"]["max_length"] = 32
    doc["allocation"].update(alpha=[0.0, 1.0], seeds=[1], budget=40, budget_val=10)
    doc["finetune"].update(mode=mode, max_epochs=1, lr=1e-3 if mode == "lora" else 6e-4, batch_size=16)
    return Spec.model_validate(doc)


@pytest.mark.parametrize("mode", ["last_layer", "lora"])
def test_text_trials(mode: str, tmp_path: Path) -> None:
    from engine.data import check_against_data, prepare

    spec = small(mode)
    prep = prepare(spec, SPEC)
    check_against_data(spec, prep, SPEC)
    db = tmp_path / "r.duckdb"
    with open_store(db) as store:
        summary = Pipeline(spec, SPEC, store, SerialExecutor(), progress=False, prepared=prep).run()
    assert summary.executed["trials"] == 4 and summary.failed["trials"] == 0, summary
    with open_store(db, read_only=True) as store:
        (dim,) = store.query("SELECT DISTINCT len(vec) AS d FROM embeddings")
        assert dim["d"] == 384  # MiniLM's hidden size
        # a backbone used as loaded has no task head: no pre-trained metrics, but the trials have their own
        assert store.query("SELECT count(*) AS n FROM pretrained_metrics")[0]["n"] == 0
        rows = store.query("SELECT mode, epochs, n_train_g1, budget FROM trials ORDER BY n_train_g1")
        assert {r["mode"] for r in rows} == {mode} and all(r["epochs"] == 1 for r in rows)
        assert [r["n_train_g1"] for r in rows][-1] == 40
        aucs = store.query("SELECT value FROM metrics WHERE attribute = 'overall' AND metric = 'auc'")
        assert len(aucs) == 4 and all(0.0 <= r["value"] <= 1.0 for r in aucs)
