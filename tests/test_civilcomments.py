"""CivilComments adapter on a small file with the exact Jigsaw ``all_data.csv`` columns."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from backends import datasets
from backends.base import SPLITS
from backends.datasets import civilcomments
from backends.datasets.splits import Fractions
from backends.errors import DataError

# The header of the Kaggle all_data.csv, in its order.
JIGSAW_COLUMNS = (
    "id,comment_text,split,created_date,publication_id,parent_id,article_id,rating,funny,wow,sad,likes,disagree,"
    "toxicity,severe_toxicity,obscene,sexual_explicit,identity_attack,insult,threat,male,female,transgender,"
    "other_gender,heterosexual,homosexual_gay_or_lesbian,bisexual,other_sexual_orientation,christian,jewish,muslim,"
    "hindu,buddhist,atheist,other_religion,black,white,asian,latino,other_race_or_ethnicity,physical_disability,"
    "intellectual_or_learning_disability,psychiatric_or_mental_illness,other_disability,identity_annotator_count,"
    "toxicity_annotator_count"
).split(",")
IDENTITIES = [c for cols in civilcomments.CATEGORIES.values() for c in cols]


def make_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    """``n`` rows with random scores; every 10th has no identity annotators, every 25th no text."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row: dict[str, object] = {c: "" for c in JIGSAW_COLUMNS}
        annotated = i % 10 != 0
        row.update(id=1000 + i, split="train", rating="approved", toxicity=round(float(rng.random()), 3),
                   created_date=f"{2015 + i % 3}-0{1 + i % 9}-12 10:50:41.987077+00",
                   comment_text="" if i % 25 == 3 else f'comment {i}, with "quotes",\nand a newline',
                   identity_annotator_count=4 if annotated else 0, toxicity_annotator_count=10)
        if annotated:  # unannotated rows have blank identity scores, as in the real file
            row.update({c: round(float(rng.random() ** 4), 2) for c in IDENTITIES})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, object]], columns: list[str] = JIGSAW_COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def small_file(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    rows = make_rows(400)
    return write_csv(tmp_path / "all_data.csv", rows), rows


def options(path: Path, **kw: object) -> civilcomments.Options:
    return civilcomments.Options(path=str(path), **kw)


def test_rules(small_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, rows = small_file
    bundle = civilcomments.load(options(path))
    by_id = {r["id"]: r for r in rows}
    kept = [r for r in rows if r["identity_annotator_count"] > 0 and r["comment_text"]]
    assert sum(len(s) for s in bundle.splits.values()) == len(kept)
    for split in bundle.splits.values():
        for k, item in enumerate(split.ids.tolist()):
            row, c = by_id[item], {name: col[k] for name, col in split.columns.items()}
            assert c["text"] == row["comment_text"]  # quotes, commas and newlines survive
            assert c["toxic"] == int(row["toxicity"] >= 0.5)
            for attribute, identities in civilcomments.CATEGORIES.items():
                assert c[attribute] == int(any(row[i] >= 0.5 for i in identities))
            assert c["year_2017"] == int(int(str(row["created_date"])[:4]) >= 2017)
        assert all(split.columns[a].dtype == np.int64 for a in ("toxic", "gender", "race", "year_2017"))


def test_test_set_is_disjoint_from_pretraining_and_pool(small_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, _ = small_file
    bundle = civilcomments.load(options(path, fractions=Fractions(test=0.2, pretrain=0.2)))
    ids = {name: set(split.ids.tolist()) for name, split in bundle.splits.items()}
    assert set(ids) == set(SPLITS)
    for a in SPLITS:
        assert ids[a], f"{a} is empty"
        for b in SPLITS:
            if a < b:
                assert not ids[a] & ids[b], f"{a} and {b} overlap"
    again = civilcomments.load(options(path, fractions=Fractions(test=0.2, pretrain=0.2)))
    assert all(np.array_equal(again.splits[s].ids, bundle.splits[s].ids) for s in SPLITS)
    assert again.fingerprint == bundle.fingerprint


def test_default_fractions_are_the_papers(small_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, _ = small_file
    bundle = civilcomments.load(options(path))
    n = sum(len(s) for s in bundle.splits.values())
    assert len(bundle.splits["test"]) == pytest.approx(0.05 * n, abs=2)
    assert len(bundle.splits["pretrain_train"]) + len(bundle.splits["pretrain_val"]) == pytest.approx(0.04 * n, abs=2)


def test_limit_and_inputs(small_file: tuple[Path, list[dict[str, object]]]) -> None:
    path, _ = small_file
    bundle = civilcomments.load(options(path, limit=100))
    assert abs(sum(len(s) for s in bundle.splits.values()) - 100) <= 2
    texts = bundle.inputs("pool_train")
    assert texts.dtype == object and list(texts) == list(bundle.splits["pool_train"].columns["text"])


def test_missing_file_shows_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        civilcomments.load(options(tmp_path / "nope.csv"))
    assert "nope.csv does not exist" in str(err.value)
    assert "identity_annotator_count" in str(err.value) and "homosexual_gay_or_lesbian" in str(err.value)


def test_missing_column_shows_the_layout(tmp_path: Path) -> None:
    columns = [c for c in JIGSAW_COLUMNS if c != "bisexual"]
    path = write_csv(tmp_path / "all_data.csv", make_rows(30), columns)
    with pytest.raises(DataError, match="lacks column\\(s\\) bisexual; expected: .*comment_text"):
        civilcomments.load(options(path))


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    rows = make_rows(30)
    rows[5]["id"] = rows[4]["id"]
    with pytest.raises(DataError, match="duplicate ids"):
        civilcomments.load(options(write_csv(tmp_path / "all_data.csv", rows)))


def test_registered() -> None:
    assert datasets.get("civilcomments") is civilcomments


def test_short_sweep_through_the_cli(tmp_path: Path, alloclab) -> None:
    """The adapter end to end: a fixture file with the exact columns, MiniLM as loaded, last-layer trials."""
    data = write_csv(tmp_path / "all_data.csv", make_rows(700, seed=3))
    spec = tmp_path / "cc.toml"
    text = (Path(__file__).resolve().parent.parent / "specs" / "civilcomments.toml").read_text()
    text = (text.replace('path = "data/civilcomments/all_data.csv"',
                         f'path = "{data}", fractions = {{ test = 0.25, pretrain = 0.1, pretrain_val = 0.2, '
                         'pool_val = 0.2 }')
            .replace("pretrain_seeds = [0, 1, 2]", "pretrain_seeds = [0]")
            .replace("max_epochs = 1, patience = 1", "max_epochs = 0, patience = 1")
            .replace('options = { pooling = "mean", max_length = 128 }', 'options = { pooling = "mean", max_length = 32 }')
            .replace("alpha = { start = 0.0, stop = 1.0, step = 0.1 }", "alpha = [0.0, 1.0]")
            .replace("seeds = [42, 43, 44]", "seeds = [1]").replace("max_epochs = 30", "max_epochs = 5"))
    spec.write_text(text)
    res = alloclab("run", spec, "--num-cpus", "2")
    assert res.returncode == 0, res.stderr
    assert "trials: 16 run, 0 done before" in res.stdout  # 5 attributes + 3 null partitions x 2 alphas x 1 seed
    q = alloclab("sql", "SELECT count(DISTINCT attribute) AS n FROM metrics", "--format", "csv")
    assert q.stdout.split()[-1] == "9"  # every attribute's groups + overall, in every trial
    missing = tmp_path / "nope.toml"
    missing.write_text(text.replace(str(data), str(tmp_path / "absent.csv")))
    bad = alloclab("validate", missing)
    assert bad.returncode == 2 and "comment_text" in bad.stderr and "Traceback" not in bad.stderr


def test_a_blank_toxicity_is_missing_not_non_toxic(tmp_path: Path) -> None:
    """A comment without a toxicity score has an unknown label: it stays in its split as NaN (not 0, and not
    silently outside every split), so the spec's missing rule decides."""
    rows = make_rows(200)
    blank = next(r for r in rows if r["identity_annotator_count"] > 0 and r["comment_text"])
    blank["toxicity"] = ""
    bundle = civilcomments.load(options(write_csv(tmp_path / "all_data.csv", rows)))
    kept = [r for r in rows if r["identity_annotator_count"] > 0 and r["comment_text"]]
    assert sum(len(s) for s in bundle.splits.values()) == len(kept)  # nobody falls out of the partition
    (split,) = [s for s in bundle.splits.values() if blank["id"] in s.ids]
    at = list(split.ids).index(blank["id"])
    assert np.isnan(split.columns["toxic"][at])
    assert np.isfinite(np.delete(split.columns["toxic"], at)).all()

    from engine.data import binarise
    from engine.spec import TaskSpec

    _, missing = binarise(split.columns["toxic"], TaskSpec(column="toxic"), "task", "s.toml")
    assert missing.sum() == 1 and missing[at]
