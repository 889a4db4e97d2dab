"""The BN laboratory: every norm in every model, init and regularization, diagnostics, eval modes, compare."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bnctl import checkpoint, comparison, evaluation, optim, rundir
from bnctl.config import ModelConfig, OptimizerConfig
from bnctl.diagnostics import COLUMNS
from bnctl.errors import ConfigError
from bnctl.models import build_model
from bnctl.norms import GhostBatchNorm, ManualBatchNorm, is_norm, uses_batch_stats
from conftest import tiny_raw, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODELS = ["seed_cnn", "vgg", "resnet20"]
NORMS = ["batch", "batch_manual", "ghost", "group", "layer", "instance", "none"]
# Norm layers each model has at width 0.25: seed_cnn 3 conv + 1 fc, vgg11 8 conv, resnet20 19 conv
# (its default zero-pad shortcuts have no layers; projection shortcuts would add 2).
NORM_COUNT = {"seed_cnn": 4, "vgg": 8, "resnet20": 19}


def _small(name: str, norm: str, **extra) -> ModelConfig:
    # groups=2 divides every layer's channels at width 0.25; a virtual batch of 2 makes ghost BN split a batch of 4.
    depth = {"vgg": 11}.get(name)
    return ModelConfig(name=name, norm=norm, width=0.25, depth=depth, groups=2, virtual_batch_size=2, **extra)


def _conv_linear(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- every norm in every model

def _expected_norm_type(norm: str, module: nn.Module, cfg: ModelConfig) -> bool:
    return {
        "batch": isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, GhostBatchNorm),
        "batch_manual": isinstance(module, ManualBatchNorm),
        "ghost": isinstance(module, GhostBatchNorm) and module.virtual_batch_size == cfg.virtual_batch_size,
        "group": isinstance(module, nn.GroupNorm) and module.num_groups == cfg.groups,
        "layer": isinstance(module, nn.GroupNorm) and module.num_groups == 1,
        "instance": isinstance(module, nn.InstanceNorm2d),
    }[norm]


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_every_norm_in_every_model_trains_forward_and_backward(name, norm):
    # Instance norm cannot normalize seed_cnn's fully connected layer; the documented way out is fc_norm=false.
    cfg = _small(name, norm, fc_norm=not (name == "seed_cnn" and norm == "instance"))
    torch.manual_seed(0)
    model = build_model(cfg)
    norms = [m for m in model.modules() if is_norm(m)]
    expected = 0 if norm == "none" else NORM_COUNT[name] - (not cfg.fc_norm)
    assert len(norms) == expected
    assert all(_expected_norm_type(norm, m, cfg) for m in norms)

    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert _conv_linear(model)[0].weight.grad.abs().sum() > 0
    for m in norms:
        if uses_batch_stats(m):  # one training batch: one update (ghost: one per virtual batch of 2)
            assert m.num_batches_tracked.item() == (2 if norm == "ghost" else 1)


def test_impossible_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="fc_norm=false"):
        build_model(_small("seed_cnn", "instance"))  # fc_norm=true by default
    with pytest.raises(ConfigError, match=r"model.groups=3 .*e\.g\. model.groups="):
        build_model(_small("resnet20", "group").model_copy(update={"groups": 3}))
    with pytest.raises(ConfigError, match="not a VGG"):
        build_model(ModelConfig(name="vgg", depth=12, width=0.25))
    with pytest.raises(ConfigError, match="6n\\+2"):
        build_model(ModelConfig(name="resnet20", depth=21, width=0.25))
    with pytest.raises(ConfigError, match="at least 32x32"):
        build_model(ModelConfig(name="vgg", width=0.25), image_size=(24, 24))
    with pytest.raises(ConfigError, match="at least 22x22"):
        build_model(ModelConfig(name="seed_cnn", width=0.25), image_size=(16, 16))


# ---------------------------------------------------------------- init and regularization

@pytest.mark.parametrize("name, init", [("seed_cnn", "default"), ("resnet20", "kaiming")])
def test_init_scale_multiplies_every_conv_linear_weight(name, init):
    torch.manual_seed(0)
    ref = build_model(_small(name, "batch", init=init))
    torch.manual_seed(0)
    scaled = build_model(_small(name, "batch", init=init, init_scale=2.5))
    ref_state, scaled_state = ref.state_dict(), scaled.state_dict()
    layer_weights = {n + ".weight" for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(layer_weights) == len(_conv_linear(ref))
    for key, value in ref_state.items():
        # Conv/linear weights scale; biases, BN scales/shifts and buffers stay as initialized.
        factor = 2.5 if key in layer_weights else 1.0
        torch.testing.assert_close(scaled_state[key], value * factor if value.is_floating_point() else value)


@pytest.mark.parametrize("init, expected_std", [
    ("default", lambda fan_in, fan_out: 1 / math.sqrt(3 * fan_in)),  # PyTorch's kaiming_uniform(a=sqrt(5))
    ("kaiming", lambda fan_in, fan_out: math.sqrt(2 / fan_in)),
    ("xavier", lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))),
    ("normal", lambda fan_in, fan_out: 0.05),
])
def test_init_gives_the_documented_weight_std(init, expected_std):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="seed_cnn", init=init, init_std=0.05))
    for m in _conv_linear(model):
        w = m.weight.detach()
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        # 864 or more weights per layer: the sample std is within a few percent of the true one.
        assert w.std().item() == pytest.approx(expected_std(fan_in, fan_out), rel=0.1), (init, m)
        assert abs(w.mean().item()) < 0.2 * w.std().item()
        if init != "default":
            assert m.bias.abs().max().item() == 0.0  # an explicit init starts biases at zero


@pytest.mark.parametrize("name", MODELS)
def test_dropout_sits_before_the_last_layer(name):
    model = build_model(_small(name, "batch", dropout=0.3))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3
    assert list(model.classifier)[-2] is drops[0] and isinstance(list(model.classifier)[-1], nn.Linear)
    plain = build_model(_small(name, "batch"))
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())


def test_norm_weight_decay_gets_its_own_param_group():
    model = build_model(_small("resnet20", "batch"))
    opt = optim.make_optimizer(model, OptimizerConfig(weight_decay=5e-4, norm_weight_decay=1e-5), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 1e-5]
    norm_ids = {id(p) for m in model.modules() if is_norm(m) for p in (m.weight, m.bias)}
    assert {id(p) for p in opt.param_groups[1]["params"]} == norm_ids
    rest = {id(p) for p in opt.param_groups[0]["params"]}
    assert rest == {id(p) for m in _conv_linear(model) for p in m.parameters()}
    assert len(rest) + len(norm_ids) == len(list(model.parameters()))
    # No norm layers: no second group.
    bare = optim.make_optimizer(build_model(_small("seed_cnn", "none")), OptimizerConfig(weight_decay=1e-4),
                                 torch.device("cpu"))
    assert [g["weight_decay"] for g in bare.param_groups] == [1e-4]


# ---------------------------------------------------------------- runs shared by the tests below

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A BN run trained to well above chance, and a short run without norms, both with diagnostics."""
    from typer.testing import CliRunner

    from bnctl.cli import app

    root = tmp_path_factory.mktemp("lab")
    raws = {
        "bn": tiny_raw(name="lab_bn", data={"train_size": 2048}, model={"width": 0.5},
                       optimizer={"lr": 0.002}, train={"diagnostics": True, "diagnostics_every": 16}),
        "none": tiny_raw(name="lab_none", data={"train_size": 256}, model={"norm": "none"},
                         train={"epochs": 1, "diagnostics": True, "diagnostics_every": 4}),
    }
    dirs = {}
    for key, raw in raws.items():
        dirs[key] = root / key
        result = CliRunner().invoke(app, ["train", "--config", str(write_config(root / f"{key}.yaml", raw)),
                                          "--run-dir", str(dirs[key])], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return dirs


def _diagnostics(run_dir: Path) -> list[dict]:
    return rundir.read_csv(run_dir / rundir.DIAGNOSTICS_FILE)


def test_diagnostics_csv_records_bn_statistics(runs):
    path = runs["bn"] / rundir.DIAGNOSTICS_FILE
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS) == "step,epoch,layer,stat,value"
    rows = _diagnostics(runs["bn"])
    steps = sorted({r["step"] for r in rows})
    assert steps == list(range(0, 2 * 64, 16))  # 64 steps per epoch, a sample every 16, two epochs
    assert {r["epoch"] for r in rows} == {1, 2}
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    assert layers == ["conv1", "conv2", "conv3", "fc1"]
    v = {(r["step"], r["layer"], r["stat"]): r["value"] for r in rows}
    for layer in layers:
        # Step 0, before any update: gamma=1 and beta=0, so the train-mode output is the normalized input.
        assert (v[0, layer, "gamma_mean"], v[0, layer, "gamma_std"], v[0, layer, "beta_mean"]) == (1.0, 0.0, 0.0)
        assert abs(v[0, layer, "output_mean"]) < 1e-4
        assert v[0, layer, "output_std"] == pytest.approx(1.0, abs=0.01)
        assert v[0, layer, "input_std"] > 0 and v[0, layer, "input_std"] != pytest.approx(1.0, abs=0.01)
        # Read after BN's first update from (0, 1) with momentum 0.1: running mean = 0.1 x the batch mean.
        assert v[0, layer, "running_mean_avg"] == pytest.approx(0.1 * v[0, layer, "input_mean"], abs=1e-6)
        last = steps[-1]
        assert abs(v[last, layer, "running_var_avg"] - v[0, layer, "running_var_avg"]) > 1e-3
        assert v[last, layer, "gamma_mean"] != 1.0  # the scale is learned
        for step in steps:
            assert v[step, layer, "weight_norm"] > 0 and v[step, layer, "grad_norm"] > 0
    png = runs["bn"] / "diagnostics.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 20_000


def test_diagnostics_without_norms_record_only_inputs_and_weights(runs):
    rows = _diagnostics(runs["none"])
    assert sorted({r["step"] for r in rows}) == [0, 4]  # 8 steps, a sample every 4
    stats: dict[str, set] = {}
    for r in rows:
        stats.setdefault(r["layer"], set()).add(r["stat"])
    assert list(stats) == ["conv1", "conv2", "conv3", "fc1"]
    # dead_frac too: with no norm, the ReLU follows the conv/fc output directly
    assert all(s == {"input_mean", "input_std", "weight_norm", "grad_norm", "dead_frac"} for s in stats.values())
    assert (runs["none"] / "diagnostics.png").read_bytes()[:8] == PNG_SIGNATURE


# ---------------------------------------------------------------- eval modes

def test_eval_batch_mode_differs_and_leaves_the_checkpoint_alone(runs, cli):
    ckpt = runs["bn"] / "checkpoints" / "best.pt"
    digest = _sha256(ckpt)
    running = json.loads(cli("eval", ckpt, "--json").stdout)
    batch = json.loads(cli("eval", ckpt, "--bn-mode", "batch", "--batch-size", "8", "--json").stdout)
    assert (running["bn_mode"], batch["bn_mode"], batch["batch_size"]) == ("running", "batch", 8)
    assert abs(batch["loss"] - running["loss"]) > 1e-3
    assert _sha256(ckpt) == digest
    again = json.loads(cli("eval", ckpt, "--json").stdout)  # nothing leaked into the model either
    assert (again["loss"], again["acc"]) == (running["loss"], running["acc"])
    assert json.loads((runs["bn"] / "eval" / "running.json").read_text())["bn_mode"] == "running"
    assert json.loads((runs["bn"] / "eval" / "batch-bs8.json").read_text())["bn_mode"] == "batch"  # both kept
    assert (runs["bn"] / "eval" / "running.png").read_bytes()[:8] == PNG_SIGNATURE


def test_eval_rejects_what_cannot_work(runs, cli):
    ckpt = runs["bn"] / "checkpoints" / "best.pt"
    result = cli("eval", ckpt, "--bn-mode", "batch", "--batch-size", "1")  # every test batch is a single image
    assert result.exit_code == 2 and "batch of one image" in result.output
    result = cli("eval", ckpt, "--bn-mode", "batch", "--recalibrate", "64")
    assert result.exit_code == 2 and "does not use" in result.output
    result = cli("eval", ckpt, "--bn-mode", "train")
    assert result.exit_code == 2 and "running" in result.output
    with pytest.raises(ConfigError, match="running statistics; this model has model.norm=none"):
        evaluation.evaluate_checkpoint(runs["none"] / "checkpoints" / "best.pt", recalibrate=64)


def test_one_image_batch_detection_covers_ghost_virtual_batches():
    ghost = nn.Sequential(GhostBatchNorm(3, virtual_batch_size=21))
    assert evaluation._one_image_batch(256, 64, ghost)  # 64 = 3 x 21 + 1
    assert not evaluation._one_image_batch(256, 64, nn.Sequential(GhostBatchNorm(3, virtual_batch_size=16)))
    assert not evaluation._one_image_batch(257, 64, nn.Sequential(nn.BatchNorm2d(3)))  # the lone image joins a batch
    assert evaluation._one_image_batch(10, 1, nn.Sequential(nn.BatchNorm2d(3)))  # batches of one
    assert not evaluation._one_image_batch(10, 1, nn.Sequential(nn.GroupNorm(1, 3)))  # no batch statistics


def test_recalibration_restores_accuracy_of_reset_running_stats(runs, tmp_path):
    best = runs["bn"] / "checkpoints" / "best.pt"
    trained = evaluation.evaluate_checkpoint(best)["acc"]
    assert trained > 30  # well above the 10% of chance, or the comparison below says nothing
    state = checkpoint.load(best)
    for key, value in state["model"].items():  # fresh running statistics, as a newly built model has
        if key.endswith("running_mean"):
            value.zero_()
        elif key.endswith("running_var"):
            value.fill_(1.0)
    reset = tmp_path / "reset.pt"
    checkpoint.save(reset, state)
    digest = _sha256(reset)
    result = evaluation.evaluate_checkpoint(reset, recalibrate=512)
    rec = result["recalibration"]
    assert (rec["images"], rec["batch_size"]) == (512, 32)
    assert rec["before_acc"] < trained - 10  # wrong statistics cost a lot
    assert result["acc"] > trained - 5  # recomputed ones bring it back
    assert _sha256(reset) == digest


def test_recalibrate_bn_changes_only_bn_buffers():
    torch.manual_seed(0)
    model = build_model(_small("seed_cnn", "batch"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(40, 3, 32, 32, dtype=torch.float32).mul(255).to(torch.uint8)
    batches = evaluation.Batches(x, torch.zeros(40, dtype=torch.long), 16, device=torch.device("cpu"),
                             mean=(0.5,) * 3, std=(0.5,) * 3)
    assert evaluation.recalibrate_bn(model, batches, 33) == 40  # whole batches until at least 33 images: 16 + 16 + 8
    assert not model.training
    after = model.state_dict()
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        assert changed == key.endswith(("running_mean", "running_var", "num_batches_tracked")), key
    bns = [m for m in model.modules() if uses_batch_stats(m)]
    assert all(m.momentum == 0.1 and m.num_batches_tracked.item() == 3 for m in bns)


# ---------------------------------------------------------------- compare

def test_compare_writes_a_png_and_tabulates_the_runs(runs, cli, tmp_path):
    out = tmp_path / "figs" / "compare.png"
    result = cli("compare", runs["bn"], runs["none"], "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 20_000
    lines = result.output.splitlines()
    bn_line = next(line for line in lines if line.split()[:1] == ["lab_bn"])
    none_line = next(line for line in lines if line.split()[:1] == ["lab_none"])
    assert " batch " in bn_line and " none " in none_line  # the differing norm, in its own column

    table = comparison.compare_table([comparison.load_run(runs["bn"]), comparison.load_run(runs["none"])])
    for row, run_dir, epochs in zip(table, (runs["bn"], runs["none"]), (2, 1)):
        metrics = rundir.read_csv(run_dir / rundir.METRICS_FILE)
        assert row["epochs"] == epochs and row["status"] == "completed"
        assert row["final_test_acc"] == metrics[-1]["test_acc"]
        assert row["best_test_acc"] == max(r["test_acc"] for r in metrics)
        assert row["wall_time_s"] > 0
        assert f"{row['final_test_acc']:.2f}" in (bn_line if epochs == 2 else none_line)
    assert table[0]["run"].startswith("lab_bn (") and "norm=batch" in table[0]["run"]
    assert "norm=none" in table[1]["run"] and "diagnostics" not in table[1]["run"]


def test_runs_sharing_a_name_are_told_apart_by_directory():
    runs = [{"dir": Path("/r/20260101-a"), "config": {"name": "x", "model.norm": "batch"}},
            {"dir": Path("/r/20260101-b"), "config": {"name": "x", "model.norm": "batch"}},
            {"dir": Path("/r/c"), "config": {"name": "y", "model.norm": "none"}}]
    assert comparison.run_names(runs) == ["x@a", "x@b", "y"]  # the part of the folder names that differs
    assert comparison.short_keys(["model.name", "optimizer.name", "optimizer.lr"]) == {
        "model.name": "model", "optimizer.name": "optimizer", "optimizer.lr": "lr"}
    assert comparison.short_keys(["model.depth", "train.depth"]) == {"model.depth": "model.depth",
                                                                  "train.depth": "train.depth"}
