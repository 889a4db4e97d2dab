"""normspec's tables are true of the code, and keys that a run would not read are refused (or, in a
sweep, dropped from the cells that do not read them)."""

from __future__ import annotations

import copy
import typing

import pytest
import torch
import yaml
from torch import nn

from bnctl import config as config_mod, distributed, models, normspec, norms, optim, plan, plotting, sweep
from bnctl.config import Config, ModelConfig
from bnctl.errors import ConfigError
from conftest import tiny_raw, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

# A value other than the default for every key some choices only read.
OTHER = {"model.bn_eps": 1e-3, "model.bn_affine": False, "model.bn_momentum": 0.3,
         "model.bn_track_running_stats": False, "model.virtual_batch_size": 4, "model.groups": 4,
         "model.bn_noise_mean": 0.25, "model.bn_noise_std": 2.0,
         "model.init_std": 0.5, "optimizer.betas": (0.5, 0.9), "optimizer.momentum": 0.5,
         "optimizer.nesterov": True, "scheduler.min_lr": 1e-5, "scheduler.step_size": 1, "scheduler.gamma": 0.5,
         "scheduler.warmup_pct": 0.5, "model.depth": 13, "model.fc_norm": False, "model.shortcut": "projection"}


def test_every_table_names_what_its_registry_builds():
    assert set(normspec.NORMS) == set(norms.NORMS) == set(norms.LAYER_TYPES) == set(typing.get_args(config_mod.NormName))
    assert set(normspec.OPTIMIZER_KEYS) == set(optim.OPTIMIZERS) == set(typing.get_args(config_mod.OptimizerName))
    assert set(normspec.SCHEDULER_KEYS) == set(optim.SCHEDULERS)
    assert set(normspec.INIT_KEYS) == set(models.INITS)
    assert set(OTHER) == set(config_mod.KEY_APPLIES)


@pytest.mark.parametrize("name", sorted(normspec.NORMS))
def test_each_norms_facts_hold_for_its_layers(name):
    spec = normspec.NORMS[name]
    model = models.build_model(ModelConfig(norm=name, fc_norm=name != "instance"), num_classes=10)
    built = [m for m in model.modules() if type(m) in norms.LAYER_TYPES[name]]
    assert built, f"{name} builds none of its LAYER_TYPES"
    assert all(norms.uses_batch_stats(m) == spec.batch_stats for m in built)
    assert (name in normspec.BATCH_STAT_NORMS) == spec.batch_stats == (name in config_mod.BATCH_STAT_NORMS)
    distributed.convert_sync_bn(model, cuda=False)
    assert distributed.count_sync_layers(model) == (len(built) if spec.synchronizable else 0)


def _model_text(name: str, norm: str, key: str | None, value=None) -> str:
    fields = {"norm": norm, "fc_norm": norm != "instance"}
    if key is not None:
        fields[key] = value
    torch.manual_seed(0)
    model = models.build_model(ModelConfig.model_construct(**{**ModelConfig().model_dump(), **fields}), 10)
    return str(model) + str(sorted((k, v.sum().item()) for k, v in model.state_dict().items()))


@pytest.mark.parametrize("norm", sorted(normspec.NORMS))
def test_a_norm_reads_exactly_the_keys_its_row_lists(norm):
    """Changing a listed key changes the built model; changing a key not listed for this norm does not."""
    base = _model_text("seed_cnn", norm, None)
    for key in ("bn_eps", "bn_affine", "bn_momentum", "bn_track_running_stats", "virtual_batch_size", "groups",
                "bn_noise_mean", "bn_noise_std"):
        changed = _model_text("seed_cnn", norm, key, OTHER[f"model.{key}"]) != base
        assert changed == (key in normspec.NORMS[norm].keys), (norm, key)


def test_init_std_is_read_by_the_normal_init_only():
    for init in normspec.INIT_KEYS:
        texts = set()
        for std in (0.02, 0.5):
            torch.manual_seed(0)
            cfg = ModelConfig(norm="none", init=init, **({"init_std": std} if init == "normal" else {}))
            if init != "normal":
                cfg = cfg.model_copy(update={"init_std": std})
            texts.add(str(sorted((k, v.sum().item()) for k, v in models.build_model(cfg, 10).state_dict().items())))
        assert (len(texts) == 2) == ("init_std" in normspec.INIT_KEYS[init]), init


@pytest.mark.parametrize("name", sorted(normspec.OPTIMIZER_KEYS))
def test_an_optimizer_reads_exactly_the_keys_its_row_lists(name):
    def defaults(**changed):
        cfg = config_mod.OptimizerConfig(name=name).model_copy(update=changed)
        opt = optim.make_optimizer(nn.Linear(2, 2), cfg, torch.device("cpu"))
        return {k: v for k, v in opt.defaults.items() if k != "params"}

    base = defaults()
    for key in ("betas", "momentum", "nesterov"):
        extra = {"momentum": 0.5} if key == "nesterov" else {}
        changed = defaults(**{key: OTHER[f"optimizer.{key}"]}, **extra) != defaults(**extra)
        assert changed == (key in normspec.OPTIMIZER_KEYS[name]), (name, key)
    assert base


@pytest.mark.parametrize("name", sorted(normspec.SCHEDULER_KEYS))
def test_a_schedule_reads_exactly_the_keys_its_row_lists(name):
    def curve(**changed):
        cfg = Config(scheduler={"name": name})
        cfg = cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update=changed)})  # not validated
        return [optim.SCHEDULERS[name](t, 400, 4, cfg) for t in range(400)]  # 100 epochs of 4 steps

    for key in ("min_lr", "step_size", "gamma", "warmup_pct"):
        changed = curve(**{key: OTHER[f"scheduler.{key}"]}) != curve()
        assert changed == (key in normspec.SCHEDULER_KEYS[name]), (name, key)


# ------------------------------------------------------------------ train refuses, as for model-specific keys

@pytest.mark.parametrize("override, message", [
    ("model.groups=4", "model.groups=4 does not apply to model.norm=batch (only to group)"),
    ("optimizer.momentum=0.5", "optimizer.momentum=0.5 does not apply to optimizer.name=adam (only to sgd)"),
    ("model.bn_momentum=0.3", None), ("scheduler.gamma=0.5", "scheduler.gamma=0.5 does not apply to scheduler.name"),
])
def test_train_refuses_a_key_its_run_would_not_read(cli, tmp_path, override, message):
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(model={"norm": "group" if "bn_" in override else "batch"}))
    result = cli("train", "--config", cfg, override, "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert "would be ignored" in result.output
    if message:
        assert message in result.output.replace("\n", " ")
    assert not (tmp_path / "runs").exists()


def test_the_same_keys_are_accepted_where_they_are_read():
    config_mod.validate(tiny_raw(model={"norm": "group", "groups": 4}))
    config_mod.validate(tiny_raw(optimizer={"name": "sgd", "momentum": 0.5, "nesterov": True}))
    config_mod.validate(tiny_raw(optimizer={"name": "adamw", "betas": [0.5, 0.9]}))
    # A stored config lists every key at its default: it validates whatever was chosen.
    for norm in normspec.NORMS:
        cfg = config_mod.validate(tiny_raw(model={"norm": norm, "fc_norm": norm != "instance"}))
        config_mod.validate(yaml.safe_load(config_mod.to_yaml(cfg)))


def test_a_run_stored_before_the_refusal_still_loads():
    raw = tiny_raw(model={"norm": "batch", "groups": 4}, optimizer={"name": "adam", "momentum": 0.5})
    cfg = config_mod.validate(config_mod.upgrade_stored(copy.deepcopy(raw)))
    assert cfg.model.groups == 8 and cfg.optimizer.momentum == 0.9  # the defaults, which built the same run


# ------------------------------------------------------------------ sweeps

def test_a_fixed_key_read_by_some_cells_only_is_dropped_from_the_others(tmp_path):
    base = write_config(tmp_path / "c.yaml", tiny_raw())
    p = plan.plan_inline(base, ["optimizer.name=sgd,adam", "optimizer.momentum=0.5", "model.norm=batch,group",
                                "model.groups=4"], seeds=1)
    got = {spec.cell: (cfg.optimizer.momentum, cfg.model.groups) for spec, cfg in p.configs()}
    assert got == {"name-sgd_norm-batch": (0.5, 8), "name-sgd_norm-group": (0.5, 4),
                   "name-adam_norm-batch": (0.9, 8), "name-adam_norm-group": (0.9, 4)}


def test_a_fixed_key_read_by_no_cell_is_refused(tmp_path):
    base = write_config(tmp_path / "c.yaml", tiny_raw())
    with pytest.raises(ConfigError, match=r"optimizer.momentum=0.5 applies to no cell of this sweep"):
        plan.plan_inline(base, ["optimizer.name=adam,adamw", "optimizer.momentum=0.5"], seeds=1)
    with pytest.raises(ConfigError, match=r"(?s)cell groups-4.*model.groups=4 does not apply to model.norm=batch"):
        plan.plan_inline(base, ["model.groups=4,8"], seeds=1)  # a swept key is each cell's own: refused
    # A study's overrides are shared by sweeps of different grids: there it is dropped from every cell.
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "s", "base": str(base), "fixed": {"model.groups": 4},
                                          "grid": {"model.norm": ["batch", "none"]}, "seeds": 1}))
    with pytest.raises(ConfigError, match="applies to no cell"):
        plan.plan_from_file(sweep_file)
    shared = plan.plan_from_file(sweep_file, shared=True)
    assert shared.unread == ["model.groups"] and {cfg.model.groups for _, cfg in shared.configs()} == {8}


def test_each_runs_stored_config_claims_only_what_it_read(tmp_path):
    base = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 64, "test_size": 32},
                                                      train={"epochs": 1, "batch_size": 32}))
    p = plan.plan_inline(base, ["optimizer.name=sgd,adam", "optimizer.momentum=0.5"], seeds=1)
    target = sweep.create(p, tmp_path / "sweeps")
    outcome = sweep.execute(target, jobs=1)
    assert len(outcome.completed) == 2 and not outcome.failed
    stored = {d.name: yaml.safe_load((d / "config.yaml").read_text())["optimizer"]
              for d in (target / "runs").iterdir() if (d / "config.yaml").is_file()}
    assert {n.split("-seed")[0]: o["momentum"] for n, o in stored.items()} == {"name-sgd": 0.5, "name-adam": 0.9}


def test_compare_and_plots_read_the_same_table():
    flat = config_mod.flatten(config_mod.to_dict(Config()))
    for key, (choice, applies) in config_mod.KEY_APPLIES.items():
        assert plotting.experiment_key(key, flat) == (config_mod.default_of(choice) in applies), key
