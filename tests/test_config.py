"""The config schema: defaults, overrides, errors that name the dotted key, registries."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from bnctl import config as C
from bnctl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bnctl" / "configs"


def test_defaults_validate_and_round_trip():
    cfg = C.load(None)
    again = C.validate(C.to_dict(cfg))
    assert again == cfg
    assert cfg.model.name == "seed_cnn" and cfg.model.norm == "batch" and cfg.data.name == "synthetic"


def test_overrides_are_yaml_scalars_on_dotted_keys():
    cfg = C.load(None, ["optimizer.lr=1e-2", "train.epochs=5", "model.bn_momentum=null",
                        "data.mean=[0.4, 0.5, 0.6]", "train.channels_last=true", "name=abc"])
    assert cfg.optimizer.lr == 0.01 and cfg.train.epochs == 5
    assert cfg.model.bn_momentum is None
    assert cfg.data.mean == (0.4, 0.5, 0.6)
    assert cfg.train.channels_last is True and cfg.name == "abc"


def test_unknown_key_names_the_dotted_path_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lerning_rate: 0.1\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        C.load(path)
    msg = str(err.value)
    assert "optimizer.lrr: unknown key; did you mean 'lr'?" in msg
    assert "optimizer.lerning_rate: unknown key" in msg


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        C.load(None, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"optimizer\.lr: Input should be greater than 0"):
        C.load(None, ["optimizer.lr=0"])
    with pytest.raises(ConfigError, match=r"data\.std"):
        C.load(None, ["data.std=[0.5, 0, 0.5]"])


def test_unknown_registry_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        C.load(None, ["model.norm=batchnorm"])
    assert "model.norm" in str(err.value) and "'ghost'" in str(err.value) and "'none'" in str(err.value)


def test_registries_match_the_schema():
    from bnctl import data, models, norms, optim

    assert set(data.DATASETS) == set(get_args(C.DatasetName))
    assert set(models.MODELS) == set(get_args(C.ModelName))
    assert set(norms.NORMS) == set(get_args(C.NormName))
    assert set(models.INITS) == set(get_args(C.InitName))
    assert set(optim.OPTIMIZERS) == set(get_args(C.OptimizerName))
    assert set(optim.SCHEDULERS) == set(get_args(C.SchedulerName))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    C.load(path)


def test_seed_configs_are_the_notebooks_experiment_and_its_control():
    seed, nobn = C.load(CONFIGS / "seed.yaml"), C.load(CONFIGS / "seed_nobn.yaml")
    assert seed.data.name == "cifar10" and seed.data.mean == (0.5,) * 3 and seed.data.std == (0.5,) * 3
    assert (seed.model.name, seed.model.norm) == ("seed_cnn", "batch")
    assert (seed.optimizer.name, seed.optimizer.lr) == ("adam", 0.001)
    assert (seed.train.batch_size, seed.train.epochs) == (4, 2)
    assert nobn.model.norm == "none"
    # The control differs from the experiment in the normalization and the name only.
    diff = {k for k, v in C.flatten(C.to_dict(seed)).items() if C.flatten(C.to_dict(nobn))[k] != v}
    assert diff == {"name", "model.norm"}


def test_to_yaml_reloads_to_the_same_config(tmp_path):
    cfg = C.load(None, ["model.norm=ghost", "model.virtual_batch_size=16"])
    path = tmp_path / "resolved.yaml"
    path.write_text(C.to_yaml(cfg))
    assert C.load(path) == cfg


def test_override_error_says_it_came_from_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as err:
        C.load(path, ["optimiser.lr=0.01"])
    msg = str(err.value)
    # The file is fine: the header must not blame it, and the line names the override as typed.
    assert not msg.startswith("invalid config")
    assert msg.splitlines()[0] == f"invalid override for config {path}:"
    assert "optimiser: unknown key; did you mean 'optimizer'? (from the command line: optimiser.lr=0.01)" in msg
    # A bad value given on the command line is attributed the same way.
    with pytest.raises(ConfigError, match=r"optimizer\.lr: .*greater than 0.*from the command line: optimizer\.lr=-1"):
        C.load(path, ["optimizer.lr=-1"])


def test_file_error_is_not_blamed_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        C.load(path, ["train.epochs=3", "train.batch_sise=8"])
    lines = str(err.value).splitlines()
    assert lines[0] == f"invalid config {path}:"  # the file has an error of its own
    assert "  optimizer.lrr: unknown key; did you mean 'lr'?" in lines  # no "(from ...)" on the file's line
    assert ("  train.batch_sise: unknown key; did you mean 'batch_size'? (from the command line: "
            "train.batch_sise=8)") in lines


@pytest.mark.parametrize("override, suggestion", [
    ("optimizer.learning_rate=0.01", "optimizer.learning_rate: unknown key; did you mean 'lr'?"),
    ("train.num_epochs=3", "train.num_epochs: unknown key; did you mean 'epochs'?"),
    ("train.bs=8", "train.bs: unknown key; did you mean 'batch_size'?"),
    ("optimizer.wd=0.1", "optimizer.wd: unknown key; did you mean 'weight_decay'?"),
    ("model.normalization=group", "model.normalization: unknown key; did you mean 'norm'?"),
    ("model.num_groups=4", "model.num_groups: unknown key; did you mean 'groups'?"),
    ("model.momentum=0.01", "model.momentum: unknown key; did you mean 'bn_momentum'?"),
    ("data.data_dir=/x", "data.data_dir: unknown key; did you mean 'root'?"),
    # The right key in the wrong section: the dotted path where it lives.
    ("train.lr=0.1", "train.lr: unknown key; did you mean 'optimizer.lr'?"),
    ("lr=0.1", "lr: unknown key; did you mean 'optimizer.lr'?"),
    ("optimizer.learningrate=0.1", "did you mean 'lr'?"),
])
def test_unknown_key_suggests_the_bnctl_name_of_a_common_synonym(override, suggestion):
    with pytest.raises(ConfigError) as err:
        C.load(None, [override])
    assert suggestion in str(err.value)


def test_no_suggestion_for_a_key_nothing_resembles():
    with pytest.raises(ConfigError) as err:
        C.load(None, ["optimizer.zzzqqq=1"])
    assert "optimizer.zzzqqq: unknown key (from the command line" in str(err.value)


def test_synonyms_point_at_keys_that_exist():
    sections = {name: f.annotation for name, f in C.Config.model_fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, C.BaseModel)}
    every_key = set(C.Config.model_fields) | {k for m in sections.values() for k in m.model_fields}
    assert set(C.SYNONYMS) <= every_key
    # A synonym is never itself a key of the section it is suggested in (it would shadow a real key).
    for target, aliases in C.SYNONYMS.items():
        for model in [C.Config, *sections.values()]:
            if target in model.model_fields:
                assert not set(aliases) & set(model.model_fields), (target, aliases)


def test_sweep_override_errors_name_their_source(tmp_path):
    from bnctl import plan

    with pytest.raises(ConfigError) as err:
        plan.plan_inline(None, ["optimiser.lr=0.01", "model.norm=batch,none"])
    assert "(from the command line: optimiser.lr=0.01)" in str(err.value)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("fixed: {optimizer.learning_rate: 0.01}\ngrid: {model.norm: [batch, none]}\n")
    with pytest.raises(ConfigError) as err:
        plan.plan_from_file(sweep)
    assert (f"optimizer.learning_rate: unknown key; did you mean 'lr'? (from {sweep}'s fixed: "
            "optimizer.learning_rate)") in str(err.value)
    sweep.write_text("grid: {model.norm: [batch, none]}\n")
    with pytest.raises(ConfigError, match=r"\(from the command line: train\.epoch=2\)"):
        plan.plan_from_file(sweep, ["train.epoch=2"])


def test_a_section_given_as_a_mapping_merges_into_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  width: 0.5\n  dropout: 0.3\ntrain:\n  epochs: 7\n")
    cfg = C.load(path, ["model={norm: none}"])
    assert (cfg.model.norm, cfg.model.width, cfg.model.dropout, cfg.train.epochs) == ("none", 0.5, 0.3, 7)
    raw = {"model": {"width": 0.5}}
    C.apply_overrides(raw, {"model": {"norm": "none"}, "data.mean": [0.4, 0.4, 0.4]})
    assert raw == {"model": {"width": 0.5, "norm": "none"}, "data": {"mean": [0.4, 0.4, 0.4]}}
    # A list is a value, not a section: it is replaced whole.
    C.apply_overrides(raw, {"data": {"mean": [0.1, 0.2, 0.3]}})
    assert raw["data"]["mean"] == [0.1, 0.2, 0.3]
