"""RedditBias loader: cleaning against the real files, one-vs-rest attributes, disjoint seeded splits."""

from __future__ import annotations

import collections
import csv
import io

import numpy as np
import pytest

from backends import datasets
from backends.base import SPLITS
from backends.datasets import redditbias
from backends.datasets.splits import Fractions
from backends.errors import DataError

# Labelled (bias_sent "0" / "1") comments per file, as counted in ../shared/feasibility.md.
EXPECTED = {"female": (943, 2033), "lgbtq": (864, 1119), "black": (1438, 1182), "jews": (1012, 1099),
            "muslims": (643, 1159)}


def raw_labels(name: str) -> list[str]:
    text = redditbias._decode(redditbias._raw(name))
    return [row["bias_sent"] for row in csv.DictReader(io.StringIO(text, newline=""))]


def test_counts_match_the_real_files() -> None:
    table = redditbias.labelled()
    assert len(table["id"]) == 11492
    counts = collections.Counter(zip(table["target"].tolist(), table["biased"].tolist()))
    assert {t: (counts[(t, 0)], counts[(t, 1)]) for t in redditbias.TARGETS} == EXPECTED


def test_only_labels_0_and_1_are_kept() -> None:
    dropped = collections.Counter()
    for target, name in redditbias.FILES:
        labels = raw_labels(name)
        kept = [label for label in labels if label in ("0", "1")]
        assert len(kept) == sum(EXPECTED[target])
        dropped.update(label for label in labels if label not in ("0", "1"))
    assert {"", "2", "biased?"} <= set(dropped)  # blanks, "2" and notes are in the files and are dropped
    table = redditbias.labelled()
    assert set(np.unique(table["biased"]).tolist()) == {0, 1}
    assert all(isinstance(t, str) and t for t in table["text"])


def test_ids_are_unique_and_encode_file_and_record() -> None:
    ids = redditbias.labelled()["id"]
    assert len(np.unique(ids)) == len(ids)
    files = ids // redditbias.ID_STRIDE
    targets = np.asarray(redditbias.TARGETS, dtype=object)[files]
    assert (targets == redditbias.labelled()["target"]).all()


def test_one_vs_rest_attributes() -> None:
    bundle = redditbias.load(redditbias.Options())
    for split in bundle.splits.values():
        c = split.columns
        assert (c["gender"] == (c["target"] == "female")).all()
        assert (c["orientation"] == (c["target"] == "lgbtq")).all()
        assert (c["race"] == (c["target"] == "black")).all()
        assert (c["religion"] == np.isin(c["target"], ["jews", "muslims"])).all()
        one_hot = c["gender"] + c["orientation"] + c["race"] + c["religion"]
        assert (one_hot == 1).all()
        for name in ("biased", "gender", "orientation", "race", "religion"):
            assert c[name].dtype == np.int64


def test_splits_partition_the_data_disjointly_and_keep_equal_texts_together() -> None:
    bundle = redditbias.load(redditbias.Options())
    assert set(bundle.splits) == set(SPLITS)
    all_ids = np.concatenate([s.ids for s in bundle.splits.values()])
    assert len(all_ids) == 11492 and len(np.unique(all_ids)) == len(all_ids)
    split_of_text: dict[str, str] = {}
    for name, split in bundle.splits.items():
        for text in split.columns["text"]:
            assert split_of_text.setdefault(text, name) == name
    sizes = {name: len(s) for name, s in bundle.splits.items()}
    assert sizes["test"] == pytest.approx(0.2 * 11492, rel=0.01)
    assert sizes["pretrain_train"] + sizes["pretrain_val"] == pytest.approx(0.2 * 11492, rel=0.01)
    for split in bundle.splits.values():  # stratified by file: every split has every target at its overall share
        share = np.mean(split.columns["target"] == "female")
        assert share == pytest.approx(2976 / 11492, abs=0.02)


def test_splits_are_seeded() -> None:
    a = redditbias.load(redditbias.Options(split_seed=1))
    b = redditbias.load(redditbias.Options(split_seed=1))
    c = redditbias.load(redditbias.Options(split_seed=2))
    for name in SPLITS:
        assert np.array_equal(a.splits[name].ids, b.splits[name].ids)
    assert not np.array_equal(a.splits["test"].ids, c.splits["test"].ids)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_fractions_and_limit() -> None:
    options = redditbias.Options(limit=500, fractions=Fractions(test=0.3, pretrain=0.1, pool_val=0.25))
    bundle = redditbias.load(options)
    n = sum(len(s) for s in bundle.splits.values())
    assert abs(n - 500) <= 5
    assert len(bundle.splits["test"]) == pytest.approx(0.3 * n, abs=5)
    full = set(redditbias.labelled()["id"].tolist())
    targets = collections.Counter()
    for split in bundle.splits.values():
        assert set(split.ids.tolist()) <= full
        targets.update(split.columns["target"].tolist())
    assert targets["female"] == pytest.approx(500 * 2976 / 11492, abs=2)


def test_inputs_are_the_texts_in_item_order() -> None:
    bundle = redditbias.load(redditbias.Options(limit=200))
    texts = bundle.inputs("pool_train")
    assert texts.dtype == object and texts.shape == (len(bundle.splits["pool_train"]),)
    assert list(texts) == list(bundle.splits["pool_train"].columns["text"])
    assert list(texts[np.array([1, 0])]) == [texts[1], texts[0]]  # indexable by int arrays
    with pytest.raises(DataError, match="no split 'nope'"):
        bundle.inputs("nope")


def test_registered() -> None:
    assert datasets.get("redditbias") is redditbias
    with pytest.raises(Exception, match="extra"):
        redditbias.Options(seed=1)
