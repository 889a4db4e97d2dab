"""Data-parallel training: torchrun with 2 CPU processes on gloo, against one process.

The multi-process tests start torchrun as a subprocess (OMP_NUM_THREADS=1), each with a
timeout so that a rank stuck in a collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnctl import config as config_mod, distributed, rundir
from bnctl.config import ModelConfig
from bnctl.data import Batches
from bnctl.distributed import Dist
from bnctl.errors import ConfigError
from bnctl.experiment import setup
from bnctl.norms import GhostBatchNorm, ManualBatchNorm, SyncBatchNorm
from conftest import tiny_raw, write_config

pytestmark = pytest.mark.slow  # several processes (ranks) per test

REPO = Path(__file__).resolve().parent.parent
TIMING = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"}
# 4 steps per epoch at a global batch of 8. SGD, not Adam: conv biases ahead of BN have a gradient
# that is zero in exact arithmetic, and Adam divides that rounding noise by its own size, which
# turns float32 differences of 1e-7 into ~1e-4 in BN's running means (see bench/RESULTS.md).
# Augmented, so that each rank must crop and flip its samples as one process would; eval_train
# adds a sharded pass over the training set.
DDP = tiny_raw(data={"name": "synthetic", "train_size": 32, "test_size": 64, "augment": "crop_flip"},
               optimizer={"name": "sgd", "lr": 0.01},
               train={"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "eval_train": True})


def torchrun(*args: str, cwd: Path, group_timeout: int = 120, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `torchrun --standalone --nproc_per_node=2 ARGS` and wait at most `timeout` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           distributed.TIMEOUT_ENV: str(group_timeout)}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_ddp(cwd: Path, run_dir: Path, raw: dict, *overrides: str, script: str | None = None):
    """`torchrun ... -m bnctl train` (or `torchrun ... SCRIPT train`, e.g. the bnctl console script)."""
    config = write_config(cwd / f"{run_dir.name}.yaml", raw)
    program = [script] if script else ["-m", "bnctl"]
    done = torchrun(*program, "train", "--config", str(config), "--run-dir", str(run_dir), *overrides, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def rows(run_dir: Path) -> list[dict]:
    return rundir.read_csv(run_dir / rundir.METRICS_FILE)


def assert_same_metrics(got: list[dict], want: list[dict], tol: float, columns=None) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in columns or [k for k in w if k not in TIMING]:
            assert g[key] == pytest.approx(w[key], rel=tol, abs=tol), (key, g["epoch"], g[key], w[key])


# ------------------------------------------------------------------ runs shared by several tests

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A synchronized 2-rank run (2 epochs) and one process on the same config (3 epochs)."""
    root = tmp_path_factory.mktemp("ddp")
    ddp = train_ddp(root, root / "ddp", DDP)
    from typer.testing import CliRunner

    from bnctl.cli import app

    single_cfg = write_config(root / "single.yaml", tiny_raw(**{**DDP, "train": {**DDP["train"], "epochs": 3}}))
    result = CliRunner().invoke(app, ["train", "--config", str(single_cfg), "--run-dir", str(root / "single")])
    assert result.exit_code == 0, result.output
    return {"root": root, "ddp": root / "ddp", "single": root / "single", "output": ddp.stdout + ddp.stderr}


def test_two_synchronized_ranks_equal_one_process(runs):
    single = rows(runs["single"])[:2]
    assert_same_metrics(rows(runs["ddp"]), single, tol=1e-5)
    info = rundir.read_json(runs["ddp"] / rundir.RUN_INFO_FILE)
    assert (info["world_size"], info["backend"], info["sync_bn"]) == (2, "gloo", True)
    assert info["steps_per_epoch"] == 4  # the global batch of 8: 32 images, 4 steps, as in one process
    one = rundir.read_json(runs["single"] / rundir.RUN_INFO_FILE)
    assert (one["world_size"], one["backend"], one["sync_bn"]) == (1, None, False)


def test_only_rank_zero_writes_and_reports(runs):
    out = runs["output"]
    assert out.count("run directory:") == 1 and out.count("done best test accuracy") == 1
    assert out.count("train loss") == 1  # one table header, rank 0's
    lines = (runs["ddp"] / rundir.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3  # header + 2 epochs: a second writer would have appended its rows too
    files = sorted(p.name for p in runs["ddp"].iterdir())
    assert files == ["checkpoints", "config.yaml", "curves.png", "metrics.csv", "run.json", "summary.json"]
    assert sorted(p.name for p in (runs["ddp"] / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert not [p for p in runs["root"].iterdir() if p.name.startswith("2")]  # no run folder made by a second rank


def test_eval_of_a_ddp_checkpoint_in_one_process(runs, cli):
    state = torch.load(runs["ddp"] / "checkpoints" / "last.pt", weights_only=True)
    assert not [k for k in state["model"] if k.startswith("module.")]
    result = cli("eval", runs["ddp"] / "checkpoints" / "last.pt", "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.output.strip().splitlines()[-1])
    last = rows(runs["ddp"])[-1]
    assert evaluated["acc"] == pytest.approx(last["test_acc"], abs=1e-9)
    assert evaluated["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    assert evaluated["images"] == 64


def test_ddp_run_resumes_in_one_process(runs, cli, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["ddp"], resumed)
    (resumed / rundir.LOCK_FILE).unlink(missing_ok=True)  # a completed run removes its lock; a copy must not carry one
    result = cli("train", "--resume", resumed, "train.epochs=3")
    assert result.exit_code == 0, result.output
    # Epochs 1-2 ran on 2 ranks, epoch 3 in one process: the same as 3 epochs in one process.
    assert_same_metrics(rows(resumed), rows(runs["single"]), tol=1e-5)
    info = rundir.read_json(resumed / rundir.RUN_INFO_FILE)
    assert info["world_size"] == 2 and info["resumes"][-1]["world_size"] == 1


# ------------------------------------------------------------------ unsynchronized BN

def test_unsynchronized_ranks_are_ghost_bn(tmp_path, cli, runs):
    # Started as `torchrun ... $(which bnctl) train` where the console script is installed.
    script = shutil.which("bnctl", path=str(Path(sys.executable).parent))
    train_ddp(tmp_path, tmp_path / "unsync", DDP, "train.sync_bn=false", script=script)
    info = rundir.read_json(tmp_path / "unsync" / rundir.RUN_INFO_FILE)
    assert info["sync_bn"] is False
    ghost = write_config(tmp_path / "ghost.yaml", tiny_raw(**{**DDP, "model": {"norm": "ghost",
                                                                                "virtual_batch_size": 4}}))
    assert cli("train", "--config", ghost, "--run-dir", tmp_path / "ghost").exit_code == 0
    # Each rank normalizes its 4 samples alone: ghost BN with virtual batches of batch_size / world_size.
    assert_same_metrics(rows(tmp_path / "unsync"), rows(tmp_path / "ghost"), tol=1e-5,
                        columns=["train_loss", "train_acc"])
    # ... and not the synchronized run, which normalizes over all 8.
    unsync = [r["train_loss"] for r in rows(tmp_path / "unsync")]
    assert unsync != pytest.approx([r["train_loss"] for r in rows(runs["ddp"])], rel=1e-3)


# ------------------------------------------------------------------ the synchronized BN layer

@pytest.fixture(scope="module")
def layer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    done = torchrun(str(REPO / "tests" / "dist_syncbn_worker.py"), str(out), cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("kind", ["conv", "fc"])
def test_sync_bn_on_two_ranks_equals_one_process_on_the_whole_batch(layer_runs, kind):
    sys.path.insert(0, str(REPO / "tests"))
    import dist_syncbn_worker as worker

    shape = worker.SHAPES[kind]
    reference = (nn.BatchNorm2d if kind == "conv" else nn.BatchNorm1d)(shape[1], momentum=0.3).double()
    for step in range(worker.STEPS):
        x, proj = worker.batch(shape, step)
        x = x.double().requires_grad_()
        y = reference(x)
        (y * proj.double()).sum().backward()
        grads = torch.cat([reference.weight.grad, reference.bias.grad])
        with torch.no_grad():
            reference.weight -= 0.1 * grads[: shape[1]]
            reference.bias -= 0.1 * grads[shape[1]:]
        reference.weight.grad = reference.bias.grad = None
        got = [run["steps"][kind][step] for run in layer_runs]
        assert torch.allclose(torch.cat([g["y"] for g in got]), y.detach(), rtol=0, atol=1e-10)
        assert torch.allclose(torch.cat([g["dx"] for g in got]), x.grad, rtol=0, atol=1e-10)
        for g in got:
            assert torch.allclose(g["grads"], grads, rtol=0, atol=1e-10)
            assert torch.allclose(g["running_mean"], reference.running_mean, rtol=0, atol=1e-10)
            assert torch.allclose(g["running_var"], reference.running_var, rtol=0, atol=1e-10)  # unbiased, as torch
            assert int(g["num_batches_tracked"]) == step + 1


def test_dist_bn_reconciles_unsynchronized_running_statistics(layer_runs):
    for run in layer_runs:
        broadcast, reduce, none = (run["dist_bn"][m] for m in ("broadcast", "reduce", "none"))
        assert broadcast["touched"] == reduce["touched"] == 1 and none["touched"] == 0  # synced layers agree anyway
        assert torch.equal(broadcast["state"]["0.running_mean"], torch.full((2,), 1.0))  # rank 0's
        assert torch.equal(broadcast["state"]["0.running_var"], torch.full((2,), 2.0))
        assert torch.equal(reduce["state"]["0.running_mean"], torch.full((2,), 1.5))  # the average of 1 and 2
        assert torch.equal(reduce["state"]["0.running_var"], torch.full((2,), 3.0))
        assert int(reduce["state"]["0.num_batches_tracked"]) == 5
        assert torch.equal(none["state"]["0.running_mean"], torch.full((2,), float(run["rank"] + 1)))
        assert torch.equal(reduce["state"]["1.running_mean"], torch.full((2,), float(run["rank"] + 1)))


# ------------------------------------------------------------------ errors end every rank

def test_a_failure_on_one_rank_is_raised_on_every_rank(layer_runs):
    for run in layer_runs:
        assert run["agree"]["failed"] == ("rank 1: no data on this node", 2)  # DataError's exit code
        assert run["agree"]["shared"] == "rank 0"  # share=True: every rank gets rank 0's value


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=9"], "train.batch_size=9 is the global batch and must split evenly over the 2 processes"),
    (["data.name=cifar10", "data.root=nowhere"], "CIFAR-10 not found"),
])
def test_an_error_ends_both_ranks_with_one_message(tmp_path, overrides, message):
    config = write_config(tmp_path / "c.yaml", DDP)
    # A generous group timeout: a rank left waiting in a collective would run into the subprocess timeout.
    done = torchrun("-m", "bnctl", "train", "--config", str(config), "--runs-root", str(tmp_path / "runs"),
                    *overrides, cwd=tmp_path, group_timeout=600, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert out.count(message) == 1, out  # rank 0 reports it; rank 1 exits quietly with the same code
    assert "internal error" not in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ------------------------------------------------------------------ pieces, in one process

def test_each_rank_gets_its_contiguous_share_of_the_same_batches():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(40)
    common = dict(device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True, drop_last=True,
                  augment="crop_flip")
    whole = list(Batches(x, y, 8, generator=torch.Generator().manual_seed(3), **common))
    parts = [list(Batches(x, y, 8, generator=torch.Generator().manual_seed(3), part=(r, 2), **common))
             for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 5
    for w, a, b in zip(whole, *parts):
        assert torch.equal(torch.cat([a[1], b[1]]), w[1])  # labels: rank 0 the first half, rank 1 the second
        assert torch.equal(torch.cat([a[0], b[0]]), w[0])  # and each image cropped and flipped identically


def test_conversion_covers_batch_and_manual_bn_but_not_ghost():
    for norm, converted in (("batch", 4), ("batch_manual", 4), ("ghost", 0)):
        from bnctl.models import build_model

        model = build_model(ModelConfig(name="seed_cnn", norm=norm), num_classes=10)
        keys = list(model.state_dict())
        distributed.convert_sync_bn(model, cuda=False)
        assert distributed.count_sync_layers(model) == converted
        assert list(model.state_dict()) == keys  # checkpoints load into the single-process model
        if norm == "ghost":
            assert sum(isinstance(m, GhostBatchNorm) for m in model.modules()) == 4
    manual = nn.Sequential(ManualBatchNorm(3))
    manual[0].running_mean.fill_(0.5)
    distributed.convert_sync_bn(manual, cuda=False)
    assert isinstance(manual[0], SyncBatchNorm) and float(manual[0].running_mean[0]) == 0.5
    x = torch.randn(4, 3, 2, 2)
    expected = (x - 0.5) / torch.sqrt(torch.tensor(1 + 1e-5))
    assert torch.allclose(manual.eval()(x), expected, atol=1e-6)  # eval mode: running statistics, no group needed


def test_setup_refuses_a_batch_that_does_not_split_over_the_ranks():
    cfg = config_mod.validate(tiny_raw(train={"batch_size": 9}))
    with pytest.raises(ConfigError, match="must split evenly over the 2 processes; use a multiple of 2"):
        setup(cfg, dist=Dist(rank=1, world_size=2, backend="gloo", device=torch.device("cpu")))


@pytest.mark.parametrize("model, train, message", [
    ({"norm": "ghost", "virtual_batch_size": 6}, {"batch_size": 14}, "gets 7 samples .* ghost batch of one sample"),
    ({"norm": "batch"}, {"batch_size": 2, "sync_bn": False}, "sync_bn=false normalizes each process's 1 sample"),
])
def test_setup_refuses_a_share_that_leaves_bn_one_sample(model, train, message):
    """Valid for one process, but each rank normalizes a single sample: a clear error, not a crash in training."""
    cfg = config_mod.validate(tiny_raw(model=model, train=train))
    with pytest.raises(ConfigError, match=message):
        setup(cfg, dist=Dist(rank=0, world_size=2, backend="gloo", device=torch.device("cpu")))


@pytest.mark.parametrize("n, world", [(40, 2), (41, 2), (41, 3), (61, 2), (10, 3)])
def test_batch_statistics_at_eval_see_one_process_test_batches(n, world):
    """bn_track_running_stats=false: the ranks' evaluation batches are exactly one process's, whatever the split."""
    cfg = config_mod.validate(tiny_raw(model={"bn_track_running_stats": False},
                                       data={"train_size": 64, "test_size": n},
                                       train={"batch_size": 24, "eval_batch_size": 20}))
    one = [y.tolist() for _, y in setup(cfg).test_batches]
    ranks = [[y.tolist() for _, y in setup(cfg, dist=Dist(r, world, 0, "gloo", torch.device("cpu"))).test_batches]
             for r in range(world)]
    assert [b for batches in ranks for b in batches] == one


def test_one_process_is_untouched():
    assert distributed.SINGLE.enabled is False and distributed.SINGLE.part(7) == slice(0, 7)
    module = nn.Linear(2, 2)
    assert distributed.SINGLE.wrap(module) is module
    assert distributed.reconcile_running_stats(nn.BatchNorm2d(2), distributed.SINGLE, "reduce") == 0
    with pytest.raises(ValueError, match="boom"):  # the original error, not a wrapped one
        distributed.SINGLE.agree(lambda: (_ for _ in ()).throw(ValueError("boom")))
    cfg = config_mod.validate({})
    assert (cfg.train.sync_bn, cfg.train.dist_bn) == (True, "reduce")
    with pytest.raises(ConfigError, match="dist_bn"):
        config_mod.validate({"train": {"dist_bn": "average"}})


def test_a_rank_that_stops_answering_ends_the_wait_with_a_clear_error(tmp_path):
    """A collective that outlives BNCTL_DIST_TIMEOUT is bnctl's error naming the limit, not an internal error."""
    done = torchrun(str(REPO / "tests" / "dist_timeout_worker.py"), str(tmp_path), "15", cwd=tmp_path,
                    group_timeout=3)
    assert done.returncode == 0, done.stdout + done.stderr
    got = (tmp_path / "rank0.txt").read_text()
    assert got.startswith("LostPeer: rank 0: another process stopped answering"), got
    assert distributed.TIMEOUT_ENV in got and "3s" in got
    assert (tmp_path / "rank1.txt").read_text() == "finished"
