"""Spec DSL: parsing, grid expansion and the one-line errors a user sees for bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import SpecError
from engine.spec import load_spec
from tests.conftest import ROOT, TINY_SPEC

GOOD = TINY_SPEC.read_text()


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_spec_resolves() -> None:
    (spec,) = load_spec(ROOT / "specs" / "colored_mnist.toml")
    assert spec.allocation.alphas == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert spec.attribute_names == ["digit_group", "colour", "random", "random_2", "random_3"]
    assert spec.null_attribute_names == ["random", "random_2", "random_3"]
    assert spec.backbone.checkpoint_seed == 0
    assert spec.finetune.mode == "last_layer" and spec.regulariser.kind == "none"


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.toml")) + [TINY_SPEC], ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    assert load_spec(path)


def test_grid_expands_into_named_variants(tmp_path: Path) -> None:
    text = GOOD + '\n[grid]\n"allocation.budget" = [200, 400]\n"finetune.lr" = [0.001, 0.01]\n'
    specs = load_spec(write(tmp_path, text))
    assert len(specs) == 4
    names = {s.experiment.name for s in specs}
    assert "tiny_mnist__budget-200__lr-0.001" in names
    assert {(s.allocation.budget, s.finetune.lr) for s in specs} == {(200, 0.001), (200, 0.01), (400, 0.001),
                                                                      (400, 0.01)}


BAD_CASES = {
    # name: (edit of the good spec, expected fragments of the one-line error)
    "unknown key": (lambda t: t.replace("[finetune]\n", "[finetune]\nlearning_rate = 0.1\n"),
                    ["finetune.learning_rate", "unknown key", "fix"]),
    "wrong type": (lambda t: t.replace("seeds = [1, 2]", 'seeds = "many"'), ["allocation.seeds", "fix"]),
    "alpha out of range": (lambda t: t.replace("alpha = [0.0, 0.5, 1.0]", "alpha = [0.0, 1.5]"),
                           ["allocation.alpha", "less than or equal to 1"]),
    "empty grid": (lambda t: t + '\n[grid]\n"allocation.budget" = []\n', ['grid."allocation.budget"', "empty grid", "fix"]),
    "unknown backbone": (lambda t: t.replace('kind = "simple_cnn"', 'kind = "resnet5000"'),
                         ["backbone.kind", "unknown backbone 'resnet5000'", "simple_cnn"]),
    "unknown attribute column": (lambda t: t.replace('column = "colour"', 'column = "color"'),
                                 ["attributes[1].column", "'color'", "colour", "fix"]),
    "budget too large": (lambda t: t.replace('budget = "auto"', "budget = 100000"),
                         ["allocation.budget", "100000", "fix"]),
    "unknown dataset option": (lambda t: t.replace("limit_test = 1500", "limit_tset = 1500"),
                               ["dataset.options.limit_tset", "unknown option", "limit_test"]),
    "not TOML": (lambda t: t.replace("[task]", "[task"), ["not valid TOML"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_spec_fails_cleanly_and_writes_nothing(case: str, tmp_path: Path, alloclab) -> None:
    edit, fragments = BAD_CASES[case]
    spec = write(tmp_path, edit(GOOD), "bad.toml")
    res = alloclab("run", spec, "--db", tmp_path / "bad.duckdb", "--serial")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(spec) in lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert not (tmp_path / "bad.duckdb").exists()
    assert not (tmp_path / "artifacts").exists()
    # `validate` gives the same message
    val = alloclab("validate", spec)
    assert val.returncode == 2 and val.stderr.strip() == lines[0]


def test_missing_spec_file(alloclab, tmp_path: Path) -> None:
    res = alloclab("validate", tmp_path / "nope.toml")
    assert res.returncode == 2 and "no such spec file" in res.stderr and "Traceback" not in res.stderr


def test_validate_and_schema_cli(alloclab) -> None:
    res = alloclab("validate", TINY_SPEC)
    assert res.returncode == 0, res.stderr
    assert "ok  tiny_mnist" in res.stdout and "K=" in res.stdout and "trials=30" in res.stdout
    schema = json.loads(alloclab("schema").stdout)
    assert schema["title"] == "alloclab spec"
    assert {"experiment", "dataset", "allocation", "grid"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        raise SpecError("x")


def test_unknown_backbone_option(tmp_path: Path, alloclab) -> None:
    spec = write(tmp_path, GOOD.replace('kind = "simple_cnn"', 'kind = "simple_cnn"\noptions = { width = 2 }'))
    res = alloclab("validate", spec)
    assert res.returncode == 2
    assert "backbone.options.width: unknown option" in res.stderr and "Traceback" not in res.stderr
