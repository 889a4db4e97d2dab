"""The defects of the independent review (issue 10), one or more tests each, numbered as in the issue.

Each test asserts what the defect got wrong; all run on the tiny synthetic config on CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from bnctl import checkpoint, config as config_mod, data as data_mod, engine, evaluation, experiment, recorder, rundir
from bnctl.cli import app
from bnctl.config import ModelConfig
from bnctl.data import ImageData
from bnctl.diagnostics import BNProbe
from bnctl.errors import ConfigError, DataError, InterruptedRun
from bnctl.models import build_model, count_parameters
from bnctl.norms import set_bn_batch_mode, uses_batch_stats
from conftest import tiny_raw, write_config

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def class_sorted(data: ImageData) -> ImageData:
    """The same images with the test split sorted by label, as an image folder lists them."""
    order = torch.argsort(data.test_y, stable=True)
    return ImageData(data.train_x, data.train_y, data.test_x[order], data.test_y[order], data.classes)


def sort_test_split(monkeypatch) -> None:
    """Make every dataset load with a class-sorted test split."""
    real = experiment.load_dataset
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: class_sorted(real(cfg)))


def image_folder(root: Path, classes: list[str], n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def rewrite_checkpoint(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> Path:
    """A trained two-epoch BN run (well above chance), shared by the evaluation tests."""
    tmp = tmp_path_factory.mktemp("bn")
    cfg = config_mod.validate(tiny_raw(data={"train_size": 2048}, model={"width": 0.5}, optimizer={"lr": 0.002}))
    return engine.fit(cfg, run_dir=tmp / "run").run_dir


@pytest.fixture(scope="module")
def no_running_stats_run(tmp_path_factory) -> Path:
    """A one-epoch run whose BN keeps no running statistics (eval mode uses batch statistics)."""
    tmp = tmp_path_factory.mktemp("norunning")
    cfg = config_mod.validate(tiny_raw(model={"bn_track_running_stats": False},
                                       train={"epochs": 1, "eval_batch_size": 16}))
    return engine.fit(cfg, run_dir=tmp / "run").run_dir


# ------------------------------------------------------------------ 1. test order under batch statistics

@pytest.mark.slow
def test_1_batch_mode_eval_is_the_same_on_class_sorted_files(bn_run, monkeypatch):
    best = bn_run / "checkpoints" / "best.pt"
    running = evaluation.evaluate_checkpoint(best)["acc"]
    mixed = evaluation.evaluate_checkpoint(best, bn_mode="batch", batch_size=16)
    sort_test_split(monkeypatch)
    assert experiment.load_dataset(config_mod.validate(tiny_raw()).data).test_y[:16].unique().numel() == 1
    ordered = evaluation.evaluate_checkpoint(best, bn_mode="batch", batch_size=16)
    assert running > 35  # well above the 10% of chance, or nothing below would mean anything
    # One-class batches give about chance (the review measured 16% against 67%); drawn in a seeded
    # random order the class-sorted files score like mixed ones (different batches, so not identical).
    assert abs(ordered["acc"] - mixed["acc"]) < 6, (ordered["acc"], mixed["acc"])
    assert ordered["acc"] > running - 15
    assert (ordered["order_seed"], mixed["order_seed"]) == (0, 0)  # the run's seed, recorded
    assert evaluation.evaluate_checkpoint(best)["order_seed"] is None  # running statistics: order cannot matter
    other = evaluation.evaluate_checkpoint(best, bn_mode="batch", batch_size=16, order_seed=5)
    assert other["order_seed"] == 5 and other["loss"] != ordered["loss"]  # the seed does choose the batches


@pytest.mark.slow
def test_1_without_running_stats_training_evaluates_class_mixed_batches(monkeypatch, tmp_path):
    sort_test_split(monkeypatch)
    cfg = config_mod.validate(tiny_raw(seed=3, model={"bn_track_running_stats": False}, train={"eval_batch_size": 16}))
    exp = experiment.setup(cfg)
    batches = list(exp.test_batches)
    assert min(y.unique().numel() for _, y in batches) >= 3  # sorted files would give one class per batch
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(exp.data.test_y.tolist())  # every image once
    assert exp.eval_order_seed == 3
    # With running statistics the order cannot matter, and the files' order is kept.
    plain = experiment.setup(config_mod.validate(tiny_raw(train={"eval_batch_size": 16})))
    assert plain.eval_order_seed is None and next(iter(plain.test_batches))[1].unique().numel() == 1
    result = engine.fit(config_mod.validate(tiny_raw(seed=3, model={"bn_track_running_stats": False},
                                                     train={"epochs": 1, "eval_batch_size": 16})),
                        run_dir=tmp_path / "run")
    assert json.loads((result.run_dir / "run.json").read_text())["eval_order_seed"] == 3


# ------------------------------------------------------------------ 2. fp16 runs on CPU

def _as_fp16_cuda(raw: dict) -> None:
    raw["device"] = "cuda"
    raw["train"]["precision"] = "fp16"


def _fp16_copy(bn_run: Path, dest: Path) -> Path:
    """The BN run as if trained on a GPU in fp16: its stored configs say so, its scaler has state."""
    run = shutil.copytree(bn_run, dest)
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 7}

    def change(state):
        _as_fp16_cuda(state["config"])
        state["scaler"] = scaler
    for name in ("last.pt", "best.pt"):
        rewrite_checkpoint(run / "checkpoints" / name, change)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    _as_fp16_cuda(raw)
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return run


@pytest.mark.slow
def test_2_fp16_checkpoint_evaluates_on_cpu_in_fp32_and_says_so(bn_run, tmp_path):
    run = _fp16_copy(bn_run, tmp_path / "run")
    result = invoke("eval", run / "checkpoints" / "best.pt", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["device"], out["precision"]) == ("cpu", "fp32")
    assert len(out["notes"]) == 1 and "fp16 -> fp32" in out["notes"][0]
    reference = evaluation.evaluate_checkpoint(bn_run / "checkpoints" / "best.pt")
    assert (out["acc"], out["loss"]) == (reference["acc"], reference["loss"])  # the same weights, in fp32
    table = invoke("eval", run / "checkpoints" / "best.pt", "--device", "cpu")
    assert "note:" in table.output and "fp16 -> fp32" in table.output


@pytest.mark.slow
def test_2_fp16_run_resumes_on_cpu_and_records_the_change(bn_run, tmp_path):
    run = _fp16_copy(bn_run, tmp_path / "run")
    result = invoke("train", "--resume", run, "device=cpu", "train.epochs=3")
    assert result.exit_code == 0, result.output
    resume = json.loads((run / "run.json").read_text())["resumes"][-1]
    assert (resume["device"], resume["precision"], resume["from_epoch"]) == ("cpu", "fp32", 2)
    assert "fp16 -> fp32" in resume["notes"][0]
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert (stored["device"], stored["train"]["precision"]) == ("cpu", "fp32")
    assert checkpoint.load(run / "checkpoints" / "last.pt")["config"]["train"]["precision"] == "fp32"
    # A new run asking for fp16 on the CPU is still refused.
    refused = invoke("train", "-c", write_config(tmp_path / "c.yaml", tiny_raw()), "train.precision=fp16",
                     "--runs-root", tmp_path / "runs")
    assert refused.exit_code == 2 and "fp16 needs a CUDA device" in refused.output


# ------------------------------------------------------------------ 3. every kill point consistent

KILL_RAW = tiny_raw(data={"train_size": 128, "test_size": 64}, train={"epochs": 2})


def _saves_of_a_clean_run(tmp: Path) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    real = checkpoint.save

    def record(path, state):
        calls.append((Path(path).name, state["epoch"]))
        real(path, state)
    engine.checkpoint.save, saved = record, engine.checkpoint.save
    try:
        engine.fit(config_mod.validate(KILL_RAW), run_dir=tmp / "clean")
    finally:
        engine.checkpoint.save = saved
    return calls


def _assert_consistent(run: Path) -> None:
    """summary.json, metrics.csv, last.pt and best.pt all tell the same story."""
    summary = json.loads((run / "summary.json").read_text())
    kept = checkpoint.load(run / "checkpoints" / "last.pt")["epoch"]
    assert summary["epochs_completed"] == kept
    assert len(rundir.read_csv(run / "metrics.csv")) == kept
    assert checkpoint.load(run / "checkpoints" / "best.pt")["epoch"] == summary["best"]["epoch"]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_3_a_stop_at_any_checkpoint_write_leaves_consistent_files(tmp_path, monkeypatch, stop):
    calls = _saves_of_a_clean_run(tmp_path)
    assert calls == [("last.pt", 1), ("best.pt", 1), ("last.pt", 2), ("best.pt", 2)]  # epoch 2 is the best
    real = checkpoint.save
    for k in range(2, len(calls) + 1):  # stop as the k-th write begins (k=1 is test_11's case)
        count = {"n": 0}

        def save(path, state):
            count["n"] += 1
            if count["n"] == k:
                raise stop()
            real(path, state)
        monkeypatch.setattr(engine.checkpoint, "save", save)
        run = tmp_path / f"run{k}"
        with pytest.raises(InterruptedRun if stop is KeyboardInterrupt else SystemExit) as err:
            engine.fit(config_mod.validate(KILL_RAW), run_dir=run)
        monkeypatch.setattr(engine.checkpoint, "save", real)
        kept = calls[k - 2][1]  # the epoch of the last write that completed
        _assert_consistent(run)
        assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == kept
        if stop is KeyboardInterrupt and kept < calls[-1][1]:
            assert f"{kept} complete epoch(s) kept" in str(err.value)
        elif stop is KeyboardInterrupt:  # the last epoch's last.pt is written: the run is complete (best.pt repaired)
            assert f"stopped as the run finished: all {kept} epochs are kept" in str(err.value)
            assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        resumed = invoke("train", "--resume", run)
        assert resumed.exit_code == 0, resumed.output
        _assert_consistent(run)
        assert checkpoint.load(run / "checkpoints" / "best.pt")["epoch"] == 2


@pytest.mark.parametrize("where", ["final summary write", "last epoch's end"])
def test_3_a_stop_as_the_run_finishes_ends_in_a_final_status_by_itself(tmp_path, monkeypatch, where):
    """A Ctrl-C or SIGTERM that lands after the last epoch is kept must not leave summary.json at 'running'."""
    raw = tiny_raw(data={"train_size": 64, "test_size": 32}, train={"epochs": 1})
    real, stops = recorder._Summary.update, []

    def update(self, best, status, **extra):
        if not stops and ((where == "final summary write" and status == "completed") or (
                where == "last epoch's end" and status == "running")):
            stops.append(status)
            raise KeyboardInterrupt  # the stop lands just as this write begins (one signal)
        return real(self, best, status, **extra)

    monkeypatch.setattr(recorder._Summary, "update", update)
    run = tmp_path / "run"
    with pytest.raises(InterruptedRun, match="stopped as the run finished: all 1 epochs are kept"):
        engine.fit(config_mod.validate(raw), run_dir=run)
    monkeypatch.setattr(recorder._Summary, "update", real)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1
    assert rundir.effective_status(run, summary) == "completed"
    again = invoke("train", "--resume", run)  # nothing left to do: it is finished
    assert again.exit_code == 0 and "already completed 1 epoch(s)" in again.output, again.output


@pytest.mark.slow
def test_3_a_kill_between_last_and_best_is_repaired_on_resume(tmp_path):
    """SIGKILL-like: the process dies between writing last.pt and best.pt, and no handler runs."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os
        from bnctl import checkpoint, config, engine
        real = checkpoint.save
        def save(path, state):
            if path.name == "best.pt":
                os._exit(9)
            real(path, state)
        engine.checkpoint.save = save
        engine.fit(config.validate({KILL_RAW!r}), run_dir=__import__("pathlib").Path({str(run)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (run / "checkpoints" / "best.pt").exists()
    # The run planned 2 epochs; continue it to 1 so that no later epoch writes best.pt for us.
    resumed = invoke("train", "--resume", run, "train.epochs=1")
    assert resumed.exit_code == 0, resumed.output
    _assert_consistent(run)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ 4. eval batches of one without running stats

@pytest.mark.slow
def test_4_no_running_stats_with_eval_batches_of_one_is_refused_before_training(tmp_path, no_running_stats_run):
    with pytest.raises(ConfigError, match="eval_batch_size=1 cannot evaluate"):
        config_mod.validate(tiny_raw(model={"bn_track_running_stats": False}, train={"eval_batch_size": 1}))
    config_mod.validate(tiny_raw(model={"norm": "group"}, train={"eval_batch_size": 1}))  # no batch statistics at all
    result = invoke("train", "-c", write_config(tmp_path / "c.yaml", tiny_raw()), "model.bn_track_running_stats=false",
                    "train.eval_batch_size=1", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2 and "eval_batch_size=1" in result.output
    assert not (tmp_path / "runs").exists()
    ckpt = no_running_stats_run / "checkpoints" / "last.pt"
    result = invoke("eval", ckpt, "--batch-size", "1")
    assert result.exit_code == 2 and "keeps no running statistics" in result.output, result.output
    assert invoke("eval", ckpt, "--batch-size", "2").exit_code == 0


# ------------------------------------------------------------------ 5. recalibration without a training batch

@pytest.mark.slow
def test_5_recalibrate_without_a_whole_training_batch_is_an_error(bn_run, tmp_path):
    ckpt = tmp_path / "few.pt"
    shutil.copy(bn_run / "checkpoints" / "best.pt", ckpt)
    rewrite_checkpoint(ckpt, lambda s: s["config"]["data"].update(train_limit=3))  # 3 images, batches of 32
    with pytest.raises(DataError, match="at least one whole training batch of 32 images, but the training split has 3"):
        evaluation.evaluate_checkpoint(ckpt, recalibrate=64)
    result = invoke("eval", ckpt, "--recalibrate", "64")
    assert result.exit_code == 2 and "0 training images" not in result.output


# ------------------------------------------------------------------ 6. class names

def test_6_renamed_class_folders_are_refused_by_eval_and_resume(tmp_path):
    root = image_folder(tmp_path / "fruit", ["Mango", "apple", "zebra"])
    cfg = config_mod.validate(tiny_raw(data={"name": "imagefolder", "root": str(root)},
                                       train={"epochs": 1, "batch_size": 4, "eval_batch_size": 4}))
    run = engine.fit(cfg, run_dir=tmp_path / "run").run_dir
    ckpt = run / "checkpoints" / "last.pt"
    assert checkpoint.load(ckpt)["classes"] == ["Mango", "apple", "zebra"]
    assert json.loads((run / "run.json").read_text())["classes"] == ["Mango", "apple", "zebra"]
    assert invoke("eval", ckpt).exit_code == 0
    other = image_folder(tmp_path / "other", ["apple", "mango", "zebra"])  # same count, other names and order
    result = invoke("eval", ckpt, "--data-root", other)
    assert result.exit_code == 2
    assert "['Mango', 'apple', 'zebra']" in result.output and "['apple', 'mango', 'zebra']" in result.output
    fewer = image_folder(tmp_path / "fewer", ["mango", "Zebra"])  # the example: another class count too
    result = invoke("eval", ckpt, "--data-root", fewer)
    assert result.exit_code == 2, result.output
    assert "['Mango', 'apple', 'zebra']" in result.output and "['Zebra', 'mango']" in result.output
    (root / "train" / "Mango").rename(root / "train" / "mango")  # renamed on disk under the run's data.root
    (root / "test" / "Mango").rename(root / "test" / "mango")
    before = (run / "config.yaml").read_text(), (run / "run.json").read_text()
    result = invoke("train", "--resume", run, "train.epochs=2")
    assert result.exit_code == 2 and "was trained on classes" in result.output
    assert ((run / "config.yaml").read_text(), (run / "run.json").read_text()) == before


# ------------------------------------------------------------------ 7. half-written CSV lines

def test_7_readers_skip_a_partial_last_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("step,epoch,layer,stat,value\n0,1,conv1,input_mean,0.5\n50,1,conv1,inp")
    assert rundir.read_csv(path) == [{"step": 0, "epoch": 1, "layer": "conv1", "stat": "input_mean", "value": 0.5}]
    path.write_text("step,epoch\n0,1\n")
    assert len(rundir.read_csv(path)) == 1


@pytest.fixture
def diagnostics_run(tmp_path) -> Path:
    raw = tiny_raw(data={"train_size": 128, "test_size": 64},
                   train={"epochs": 1, "diagnostics": True, "diagnostics_every": 2})
    return engine.fit(config_mod.validate(raw), run_dir=tmp_path / "run", probe_factory=BNProbe.for_experiment).run_dir


def test_7_plot_and_resume_survive_a_half_written_line(diagnostics_run):
    run = diagnostics_run
    whole = rundir.read_csv(run / "diagnostics.csv")
    with open(run / "diagnostics.csv", "a") as f:
        f.write("8,2,conv1,input_me")  # a kill mid-append
    with open(run / "metrics.csv", "a") as f:
        f.write("2,0.9")
    assert invoke("plot", run).exit_code == 0
    result = invoke("train", "--resume", run, "train.epochs=2")
    assert result.exit_code == 0, result.output
    after = rundir.read_csv(run / "diagnostics.csv")
    assert [r for r in after if r["epoch"] == 1] == whole  # the finished epoch's samples are kept as they were
    assert {r["epoch"] for r in after} == {1, 2}
    assert [r["epoch"] for r in rundir.read_csv(run / "metrics.csv")] == [1, 2]


def test_7_a_resume_that_fails_rewrites_nothing(diagnostics_run):
    run = diagnostics_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def broken_probe(exp, run_dir, start):
        raise DataError("diagnostics.csv is damaged")
    cfg = config_mod.load(run / "config.yaml", ["train.epochs=2"], moved=True)
    with pytest.raises(DataError):
        engine.fit(cfg, resume=run, probe_factory=broken_probe)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_7_a_plotting_failure_does_not_hide_the_training_error(tmp_path, monkeypatch):
    from bnctl import plotting
    from bnctl.errors import DivergedError

    def fit(cfg, *, on_run_dir, **kwargs):
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.csv").write_text("epoch\n1\n")
        on_run_dir(run)
        raise DivergedError("training diverged: loss became nan", 1, 3)

    def plot_run(run_dir):
        raise TypeError("'<' not supported between instances of 'NoneType' and 'int'")
    monkeypatch.setattr(engine, "fit", fit)
    monkeypatch.setattr(plotting, "plot_run", plot_run)
    result = invoke("train", "-c", write_config(tmp_path / "c.yaml", tiny_raw()))
    assert result.exit_code == 3, result.output
    assert "training diverged" in result.output and "internal error" not in result.output


# ------------------------------------------------------------------ 8. CIFAR files

def _cifar_root(tmp: Path, bad_test_batch: dict) -> Path:
    folder = tmp / data_mod.CIFAR_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
    for name in data_mod.CIFAR_TRAIN_FILES:
        (folder / name).write_bytes(pickle.dumps(good))
    bad = {k: v for k, v in {**good, **bad_test_batch}.items() if v is not None}  # None: the entry is missing
    (folder / "test_batch").write_bytes(pickle.dumps(bad))
    return tmp


@pytest.mark.parametrize("bad, message", [
    ({"labels": [10] + list(range(9))}, "label 10 is outside CIFAR-10's classes 0..9"),
    ({"labels": [-1] * 10}, "label -1 is outside"),
    ({"labels": None}, "no 'labels' entry"),
    ({"labels": [0.5] * 10}, "flat list of integers"),
    ({"labels": list(range(9))}, "10 images but 9 labels"),
    ({"data": np.zeros((10, 3072), dtype=np.float32)}, "uint8 array"),
    ({"data": np.zeros((10, 1024), dtype=np.uint8)}, "got shape (10, 1024)"),
])
def test_8_malformed_cifar_batches_are_data_errors_naming_the_file(tmp_path, bad, message):
    root = _cifar_root(tmp_path, bad)
    with pytest.raises(DataError) as err:
        data_mod.load_cifar10(config_mod.DataConfig(name="cifar10", root=str(root)))
    assert message in str(err.value) and "test_batch" in str(err.value)


# ------------------------------------------------------------------ 10. nonsense values

@pytest.mark.parametrize("override, key", [
    ("optimizer.betas=[1.5,0.999]", "optimizer.betas.0"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas.1"),
    ("seed=100000000000000000000000", "seed"),
    ("seed=-1", "seed"),
    ("data.synthetic_seed=-1", "data.synthetic_seed"),
    ("data.mean=[.nan,0.5,0.5]", "data.mean.0"),
    ("data.std=[0.5,.inf,0.5]", "data.std.1"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("model.init_scale=.inf", "model.init_scale"),
    ("optimizer.weight_decay=.inf", "optimizer.weight_decay"),
])
def test_10_nonsense_values_are_config_errors(tmp_path, override, key):
    result = invoke("train", "-c", write_config(tmp_path / "c.yaml", tiny_raw()), override,
                    "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2, result.output
    assert f"{key}:" in result.output and "internal error" not in result.output
    assert not (tmp_path / "runs").exists()


def test_10_extreme_valid_seeds_run():
    for seed in (0, 2**63 - 1):
        cfg = config_mod.validate(tiny_raw(seed=seed, data={"synthetic_seed": seed, "train_size": 64, "test_size": 32}))
        experiment.setup(cfg)  # seeds torch, numpy and the data generator without complaint


def test_10_model_specific_keys_are_refused_for_other_models():
    all_models = set(config_mod.ModelName.__args__)
    non_default = {"depth": 20, "fc_norm": False, "shortcut": "projection"}
    assert {k for _, k in config_mod.MODEL_SPECIFIC_KEYS} == set(non_default)
    for (section, key), models in config_mod.MODEL_SPECIFIC_KEYS.items():
        for model in sorted(all_models - models):
            with pytest.raises(ConfigError, match=f"{section}.{key}=.* does not apply to model.name={model}"):
                config_mod.validate({"model": {"name": model, key: non_default[key]}})
        for model in sorted(models):
            value = 11 if (key, model) == ("depth", "vgg") else non_default[key]
            config_mod.validate({"model": {"name": model, key: value}})
    # Defaults are not "set": a stored config (every key written out) validates for every model.
    for model in sorted(all_models):
        cfg = config_mod.validate({"model": {"name": model}})
        config_mod.validate(config_mod.to_dict(cfg))


# ------------------------------------------------------------------ 11. Ctrl-C in epoch 1

@pytest.mark.parametrize("exact", [False, True])
def test_11_ctrl_c_in_epoch_one_keeps_nothing_and_says_so(tmp_path, monkeypatch, exact):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "train_one_epoch", stopped)
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(train={"diagnostics": True}))
    where = ["--run-dir", tmp_path / "mine"] if exact else ["--runs-root", tmp_path / "runs"]
    result = invoke("train", "-c", cfg, *where)
    assert result.exit_code == 130, result.output
    assert "nothing was kept" in result.output and "--resume" not in result.output
    assert "was removed" in result.output
    assert not (tmp_path / "mine").exists()
    assert not exact or not (tmp_path / "runs").exists()
    if not exact:
        assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.parametrize("resumed", [False, True])
def test_11_a_stop_while_the_run_prepares_leaves_no_run_looking_busy(tmp_path, monkeypatch, resumed):
    """Ctrl-C after the run directory exists but before training's own handler is in place.

    A sweep worker stopped there used to leave the folder without a summary: "running" to every reader.
    """
    raw = tiny_raw(data={"train_size": 64, "test_size": 32}, train={"epochs": 2})
    run = tmp_path / "run"
    if resumed:
        cfg = config_mod.validate({**raw, "train": {**raw["train"], "epochs": 1}})
        engine.fit(cfg, run_dir=run)
        before = json.loads((run / "summary.json").read_text())

    def stopped(self):
        raise KeyboardInterrupt("SIGTERM")
    monkeypatch.setattr(recorder.RunRecorder, "open", stopped)
    with pytest.raises(InterruptedRun) as err:
        engine.fit(config_mod.validate(raw), run_dir=None if resumed else run, resume=run if resumed else None)
    assert err.value.signal == "SIGTERM" and err.value.exit_code == 143
    if resumed:  # the run is as it was: still resumable from its checkpoint
        assert json.loads((run / "summary.json").read_text()) == before
        assert f"bnctl train --resume {run}" in str(err.value)
    else:
        assert not run.exists() and "nothing was kept" in str(err.value)


# ------------------------------------------------------------------ 12. two more internal errors

def test_12_yaml_key_that_is_a_list_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("? [a, b]\n: 1\n")
    result = invoke("train", "-c", path)
    assert result.exit_code == 2 and "at line 1" in result.output and "a key must be a plain name" in result.output


def test_12_oversized_image_is_a_data_error_naming_it(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "imgs", ["a", "b"], n=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 pixels > 2 x 100: PIL refuses to decode
    with pytest.raises(DataError, match=r"image .*0\.png is too large to decode safely"):
        data_mod.load_imagefolder(config_mod.DataConfig(name="imagefolder", root=str(root)))


# ------------------------------------------------------------------ also from the review

def test_bn_mode_batch_switches_bn_to_batch_statistics_and_leaves_dropout_off():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.9))
    set_bn_batch_mode(model)
    assert all(m.training == uses_batch_stats(m) for m in model.modules() if m is not model)
    x = torch.randn(16, 3, 32, 32)
    with torch.inference_mode():
        first, second = model(x), model(x)
    assert torch.equal(first, second)  # dropout at p=0.9 would make two passes differ


def test_resnet20_has_the_papers_parameter_free_shortcuts():
    counts = {d: count_parameters(build_model(ModelConfig(name="resnet20", depth=d))) for d in (20, 32, 44, 56)}
    assert counts == {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018}  # He et al.: 0.27M, 0.46M, 0.66M, 0.85M
    projection = build_model(ModelConfig(name="resnet20", shortcut="projection"))
    # Two 1x1 convolutions (16->32, 32->64, no bias under BN) and their BN layers.
    assert count_parameters(projection) - counts[20] == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    model = build_model(ModelConfig(name="resnet20"))
    x = torch.randn(2, 16, 32, 32)
    shortcut = model.features[3 + 3].shortcut  # the first block of stage 2: 16 -> 32 channels, stride 2
    out = shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.slow
def test_resnet20_checkpoints_from_before_the_shortcut_key_load_as_projection(tmp_path):
    cfg = config_mod.validate(tiny_raw(model={"name": "resnet20", "width": 0.25, "shortcut": "projection"},
                                       data={"train_size": 64, "test_size": 32}, train={"epochs": 1}))
    run = engine.fit(cfg, run_dir=tmp_path / "run").run_dir
    ckpt = run / "checkpoints" / "last.pt"
    rewrite_checkpoint(ckpt, lambda s: s["config"]["model"].pop("shortcut"))
    assert evaluation.evaluate_checkpoint(ckpt)["images"] == 32
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"].pop("shortcut")
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = invoke("train", "--resume", run, "train.epochs=2")  # config.yaml is upgraded like the checkpoint
    assert result.exit_code == 0, result.output
    assert checkpoint.load(ckpt)["config"]["model"]["shortcut"] == "projection"


def _as_written_before_this_version(raw: dict) -> None:
    raw["model"].pop("shortcut")  # no such key yet
    raw["model"]["depth"] = 13  # accepted then, and ignored by seed_cnn


@pytest.mark.slow
def test_runs_written_before_model_specific_keys_evaluate_and_resume(tmp_path):
    cfg = config_mod.validate(tiny_raw(data={"train_size": 64, "test_size": 32}, train={"epochs": 1}))
    run = engine.fit(cfg, run_dir=tmp_path / "run").run_dir
    for name in ("last.pt", "best.pt"):
        rewrite_checkpoint(run / "checkpoints" / name, lambda s: _as_written_before_this_version(s["config"]))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    _as_written_before_this_version(raw)
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert evaluation.evaluate_checkpoint(run / "checkpoints" / "best.pt")["images"] == 32
    result = invoke("train", "--resume", run, "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 2
