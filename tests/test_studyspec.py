"""The study sections' declarations (study: in a sweep file) and the lr scaling that removes section 4's step confound."""

import pytest
import yaml

from bnctl import plan, studyspec
from bnctl.errors import ConfigError


def _sweep(tmp_path, **extra):
    spec = {"name": "s", "base": {"data": {"name": "synthetic"}}, "grid": {"model.norm": ["batch", "group"],
            "train.batch_size": [2, 8]}, "fixed": {"model.groups": 4, "optimizer.lr": 0.001}} | extra
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


BATCH = {"estimand": "batch_interaction", "claim": "BN loses more than GN at small batches", "control": "group",
         "reference_batch": 8, "control_tolerance": 5, "smallest_effect": 3}


def test_a_declared_estimand_is_validated_with_extra_keys_refused(tmp_path):
    (spec,) = studyspec.parse(BATCH)
    assert isinstance(spec, studyspec.BatchInteraction) and spec.arm == "batch" and spec.smallest_effect == 3
    with pytest.raises(ConfigError, match="study.smallest_efect: Extra inputs are not permitted"):
        studyspec.parse(BATCH | {"smallest_efect": 2})
    with pytest.raises(ConfigError, match="smallest_effect: Input should be greater than 0"):
        studyspec.parse(BATCH | {"smallest_effect": 0})
    with pytest.raises(ConfigError, match="estimand must be one of lr_tolerance, init_reference"):
        studyspec.parse(BATCH | {"estimand": "best_scale"})
    # The sweep file's plan refuses a declaration whose levels are not in its grid, before anything runs.
    with pytest.raises(ConfigError, match=r"declares train.batch_size=64, which is not a level of the grid \(\[2, 8\]\)"):
        plan.plan_from_file(_sweep(tmp_path, study=BATCH | {"reference_batch": 64}))
    assert len(plan.plan_from_file(_sweep(tmp_path, study=[BATCH])).runs) == 4


def test_lr_scaling_gives_each_batch_size_its_own_lr_and_survives_a_round_trip(tmp_path):
    p = plan.plan_from_file(_sweep(tmp_path, lr_scaling={"rule": "sqrt", "reference_batch": 2}))
    lrs = {r.overrides["train.batch_size"]: r.overrides["optimizer.lr"] for r in p.runs}
    assert lrs == {2: 0.001, 8: 0.002}  # sqrt(8 / 2) = 2
    assert {r.name: c.optimizer.lr for r, c in p.configs()}["norm-group_batch_size-8-seed0"] == 0.002
    again = plan.Plan.from_dict(p.to_dict())
    assert again.lr_scaling == {"rule": "sqrt", "reference_batch": 2} and again.runs == p.runs
    linear = plan.plan_from_file(_sweep(tmp_path, lr_scaling={"rule": "linear", "reference_batch": 8}))
    assert {r.overrides["optimizer.lr"] for r in linear.runs} == {0.00025, 0.001}
    with pytest.raises(ConfigError, match="do not sweep optimizer.lr too"):
        plan.plan_from_file(_sweep(tmp_path, lr_scaling={"rule": "sqrt", "reference_batch": 2}),
                            ["optimizer.lr=0.1,0.01"])
    with pytest.raises(ConfigError, match="lr_scaling.rule must be one of linear, sqrt"):
        plan.plan_from_file(_sweep(tmp_path, lr_scaling={"rule": "cubic", "reference_batch": 2}))
