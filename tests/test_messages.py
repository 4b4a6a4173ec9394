"""One clear line for the mistakes users make: the branch of a union they wrote, a fix the pattern accepts, an
empty table."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.errors import DataError, SpecError
from engine.spec import parse_spec
from tests.conftest import TINY_SPEC


def _error(old: str, new: str) -> str:
    text = TINY_SPEC.read_text()
    assert old in text
    with pytest.raises(SpecError) as e:
        parse_spec(tomllib.loads(text.replace(old, new)), Path("s.toml"))
    return str(e.value)


def test_an_alpha_table_gets_the_table_branch_error() -> None:
    msg = _error("alpha = [0.0, 0.5, 1.0]", "alpha = { start = 0.0, stop = 1.5, step = 0.1 }")
    assert "allocation.alpha.stop" in msg and "less than or equal to 1" in msg and "valid list" not in msg


def test_an_alpha_list_gets_the_list_branch_error() -> None:
    msg = _error("alpha = [0.0, 0.5, 1.0]", "alpha = [0.0, 1.5]")
    assert "allocation.alpha[1]" in msg and "valid dictionary" not in msg


def test_name_fixes_suggest_only_allowed_characters() -> None:
    attr = _error('name = "digit_group"', 'name = "digit.group"')
    assert "attributes[0].name" in attr and "letters, digits and '_' only" in attr and "'.'" not in attr
    exp = _error('name = "tiny_mnist"', 'name = "tiny mnist"')
    assert "experiment.name" in exp and "'.' or '-'" in exp


def test_a_fix_is_given_once() -> None:
    msg = _error('column = "digit"\nthreshold = 5', 'expression = "digit >= 5; SELECT 1"')
    assert "attributes[0].expression" in msg and msg.count("fix:") == 1


def test_a_header_only_table(tmp_path: Path) -> None:
    from backends.datasets import table

    csv = tmp_path / "t.csv"
    csv.write_text("id,label,split\n")
    with pytest.raises(DataError, match="has a header but no rows"):
        table.load(table.Options(path=str(csv)))
