"""A regularised pre-training grid end to end through the real CLI: tiny real MNIST, a two-variant λ grid (0 and
the paper's 1e-2), `alloclab report SPEC --compare` with its intervention section, checked in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import duckdb
import pytest
from test_browser import browser, load  # noqa: F401  (the module-scoped Chromium fixture)

from tests.conftest import TINY_SPEC

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-slow` (CI runs them)

GRID = '''
[regulariser]
kind = "tv_surrogate"
attribute = "digit_group"

[grid]
"regulariser.weight" = [0.0, 0.01]
'''


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("regularised")
    spec = tmp / "reg.toml"
    spec.write_text(TINY_SPEC.read_text().replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]")
                    .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
                    .replace("max_epochs = 15", "max_epochs = 5") + GRID)
    run = run_cli("run", spec, "--num-cpus", "2", cwd=tmp)
    assert run.returncode == 0, run.stderr
    rep = run_cli("report", spec, "--compare", cwd=tmp)
    assert rep.returncode == 0, rep.stderr
    return {"dir": tmp, "spec": spec, "run": run, "html": tmp / rep.stdout.strip()}


def test_the_grid_shares_the_dataset_and_trains_a_second_encoder(compared):
    lines = [ln for ln in compared["run"].stdout.splitlines() if ln.startswith("tiny_mnist__")]
    assert len(lines) == 2 and "dataset: 0 run, 1 done before" in lines[1] and "pretrain: 1 run" in lines[1]
    con = duckdb.connect(str(compared["dir"] / "results.duckdb"), read_only=True)
    logs = [json.loads(r[0]) for r in con.sql("SELECT log_json FROM stages WHERE kind = 'pretrain'").fetchall()]
    with_penalty = [lg for lg in logs if "train_penalty" in lg["history"][0]]
    assert len(logs) == 2 and len(with_penalty) == 1  # the weight-0 encoder is the plain one
    assert all(h["train_penalty"] > 0 for h in with_penalty[0]["history"])
    tv = dict(con.sql("SELECT experiment, value FROM separations WHERE attribute = 'digit_group' "
                      "AND distance = 'tv_paper'").fetchall())
    assert tv["tiny_mnist__weight-0.01"] < tv["tiny_mnist__weight-0.0"]  # the penalty lowers the separation


def test_compare_report_has_the_intervention_section_from_the_database(compared):
    html = compared["html"].read_text()
    section = html[html.index('<section id="intervention">'):]
    section = section[:section.index("</section>")]
    assert "making the encoder invariant to <code>digit_group</code>" in section
    con = duckdb.connect(str(compared["dir"] / "results.duckdb"), read_only=True)
    slope = con.sql("SELECT slope FROM attribute_slopes WHERE experiment = 'tiny_mnist__weight-0.01' AND "
                    "attribute = 'digit_group' AND metric = 'loss'").fetchall()[0][0]
    assert f"{slope:+.4f}".replace("-", "−") in section  # the table shows the stored slope
    assert re.search(r"tv_surrogate λ=0\.01", section) and "<svg" in section
    assert re.search(r"(Best trade-off|Every penalty that lowers|No penalty lowered)", section)


def test_compare_needs_a_grid(compared, alloclab):
    res = alloclab("report", TINY_SPEC, "--compare", "--db", str(compared["dir"] / "results.duckdb"))
    assert res.returncode == 2 and "--compare needs a spec with a [grid]" in res.stderr


def test_compare_report_renders_cleanly_in_chromium(browser: Any, compared, tmp_path: Path) -> None:  # noqa: F811
    seen = load(browser, compared["html"])
    assert seen.problems() == []
    captions = [f["caption"] for f in seen.figures]
    assert any("Pareto front" in c for c in captions), captions


def test_full_finetuning_under_the_penalty_runs_every_trial(tmp_path: Path, alloclab) -> None:
    spec = tmp_path / "ft.toml"
    text = (TINY_SPEC.read_text().replace("pretrain_seeds = [0, 1]", "pretrain_seeds = [0]")
            .replace('kind = "colored_mnist"', 'kind = "colored_mnist"\nnull_partitions = 1')
            .replace('alpha = [0.0, 0.5, 1.0]', 'alpha = [0.25, 0.75]').replace("seeds = [1, 2]", "seeds = [1]")
            .replace('mode = "last_layer"\nmax_epochs = 15', 'mode = "full"\nmax_epochs = 1'))
    spec.write_text(text + '\n[regulariser]\nkind = "mmd"\nattribute = "colour"\nweight = 0.5\nstage = "finetune"\n')
    res = alloclab("run", spec, "--num-cpus", "2")
    assert res.returncode == 0, res.stderr
    con = duckdb.connect(str(tmp_path / "results.duckdb"), read_only=True)
    assert con.sql("SELECT status, count(*) FROM trials GROUP BY 1").fetchall() == [("done", 6)]
    logs = [json.loads(r[0]) for r in con.sql("SELECT log_json FROM stages WHERE kind = 'pretrain'").fetchall()]
    assert "train_penalty" not in logs[0]["history"][0]  # stage = "finetune": the encoder is pre-trained plainly
