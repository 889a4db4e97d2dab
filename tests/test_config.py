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


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in C.flatten(C.to_dict(C.load(None))) if f"`{k}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"
