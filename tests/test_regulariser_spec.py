"""[regulariser] in a spec: one-line errors for bad input, ids that change only when a penalty applies, grids of
λ and kinds, and the data check of the mini-batch size."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data import batch_shortfalls, check_regulariser, prepare
from engine.errors import SpecError
from engine.plan import make_plan
from engine.spec import load_spec
from tests.conftest import TINY_SPEC

GOOD = TINY_SPEC.read_text()
REG = '\n[regulariser]\nkind = "tv_surrogate"\nattribute = "digit_group"\nweight = 0.01\n'


def spec_of(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("body, where, says", [
    ('\n[regulariser]\nkind = "tv_surrogate"\nattribute = "digit_group"\nweight = -0.1\n', "regulariser.weight",
     "greater than or equal to 0"),
    ('\n[regulariser]\nkind = "mmd"\nattribute = "age"\n', "regulariser.attribute", "not an attribute"),
    ('\n[regulariser]\nkind = "mmd"\nattribute = "random_2"\n', "regulariser.attribute", "null partition"),
    ('\n[regulariser]\nkind = "mmd"\n', "regulariser.attribute", "missing"),
    ('\n[regulariser]\nkind = "l2"\nattribute = "colour"\n', "regulariser.kind", "tv_surrogate"),
    ('\n[regulariser]\nkind = "adversarial"\nattribute = "colour"\nstage = "finetune"\n', "regulariser.stage",
     "last_layer"),
])
def test_bad_regulariser_is_one_line_naming_the_field(tmp_path, body, where, says):
    with pytest.raises(SpecError) as e:
        load_spec(spec_of(tmp_path, GOOD + body))
    msg = str(e.value)
    assert "\n" not in msg and f": {where}: " in msg and says in msg and "fix:" in msg, msg


def test_batch_too_small_for_both_groups_is_refused_before_data(tmp_path):
    text = GOOD.replace("pretrain = { max_epochs = 3, patience = 2 }",
                        "pretrain = { max_epochs = 3, patience = 2, batch_size = 6 }") + REG
    with pytest.raises(SpecError, match=r"backbone\.pretrain\.batch_size: 6 .*fix: use batch_size >= 8"):
        load_spec(spec_of(tmp_path, text))


def test_batch_too_small_for_the_data_names_the_cell_and_the_size(tmp_path):
    text = GOOD.replace("pretrain = { max_epochs = 3, patience = 2 }",
                        "pretrain = { max_epochs = 3, patience = 2, batch_size = 8 }") + REG
    path = spec_of(tmp_path, text)
    (spec,) = load_spec(path)
    prep = prepare(spec, path)
    with pytest.raises(SpecError) as e:
        check_regulariser(spec, prep, path)
    msg = str(e.value)
    assert "backbone.pretrain.batch_size: 8 gives class" in msg and "'digit_group'" in msg, msg
    need = int(msg.rsplit(">= ", 1)[1])
    split = prep.splits["pretrain_train"]
    assert not batch_shortfalls(split.y, split.groups["digit_group"], need)
    assert batch_shortfalls(split.y, split.groups["digit_group"], need - 1)


def test_a_backbone_that_trains_nothing_cannot_be_regularised(tmp_path):
    (spec,) = load_spec(spec_of(tmp_path, GOOD + REG))
    spec = spec.model_copy(update={"backbone": spec.backbone.model_copy(update={"kind": "precomputed"})})
    with pytest.raises(SpecError, match="backbone 'precomputed' trains no encoder"):
        check_regulariser(spec, None, "spec.toml")  # type: ignore[arg-type]  (refused before the data is read)


def test_ids_change_only_where_a_penalty_applies(tmp_path):
    plain = make_plan(load_spec(spec_of(tmp_path, GOOD))[0])
    zero = make_plan(load_spec(spec_of(tmp_path, GOOD + REG.replace("0.01", "0.0")))[0])
    reg = make_plan(load_spec(spec_of(tmp_path, GOOD + REG))[0])
    unused_option = make_plan(load_spec(spec_of(tmp_path, GOOD + REG + "hidden = 7\n"))[0])
    assert [s.stage_id for s in zero.stages()] == [s.stage_id for s in plain.stages()][:-1] + [zero.analysis.stage_id]
    assert [t.trial_id for t in zero.trials] == [t.trial_id for t in plain.trials]
    assert reg.dataset.stage_id == plain.dataset.stage_id
    assert set(s.stage_id for s in reg.pretrain.values()).isdisjoint(s.stage_id for s in plain.pretrain.values())
    assert {t.trial_id for t in reg.trials}.isdisjoint(t.trial_id for t in plain.trials)  # new encoder, new trials
    assert [s.stage_id for s in unused_option.stages()] == [s.stage_id for s in reg.stages()]  # tv ignores hidden
    adv = make_plan(load_spec(spec_of(tmp_path, GOOD + REG.replace("tv_surrogate", "adversarial")))[0])
    adv7 = make_plan(load_spec(spec_of(tmp_path, GOOD + REG.replace("tv_surrogate", "adversarial")
                                       + "hidden = 7\n"))[0])
    assert adv.pretrain[0].stage_id != adv7.pretrain[0].stage_id


def test_finetune_stage_changes_trials_not_encoders(tmp_path):
    full = GOOD.replace('mode = "last_layer"', 'mode = "full"')
    plain = make_plan(load_spec(spec_of(tmp_path, full))[0])
    tuned = make_plan(load_spec(spec_of(tmp_path, full + REG + 'stage = "finetune"\n'))[0])
    assert [s.stage_id for s in tuned.pretrain.values()] == [s.stage_id for s in plain.pretrain.values()]
    assert {t.trial_id for t in tuned.trials}.isdisjoint(t.trial_id for t in plain.trials)


def test_grid_over_kinds_and_weights_with_tables(tmp_path):
    text = GOOD + REG + ('\n[grid]\n"regulariser" = [{ kind = "tv_surrogate", weight = 0.0 }, '
                         '{ kind = "tv_surrogate", weight = 0.01 }, { kind = "mmd", weight = 1.0 }]\n')
    specs = load_spec(spec_of(tmp_path, text))
    assert [s.experiment.name for s in specs] == [
        "tiny_mnist__regulariser-kind-tv_surrogate-weight-0.0",
        "tiny_mnist__regulariser-kind-tv_surrogate-weight-0.01",
        "tiny_mnist__regulariser-kind-mmd-weight-1.0"]
    assert all(s.regulariser.attribute == "digit_group" for s in specs)  # the table's other keys are kept
    assert [s.regulariser.active for s in specs] == [False, True, True]
    dotted = load_spec(spec_of(tmp_path, GOOD + REG + '\n[grid]\n"regulariser.weight" = [0, 0.1]\n'))
    assert [s.regulariser.weight for s in dotted] == [0, 0.1]
