"""Reliability and security: bad input, unsafe files, atomic writes, resume, divergence, run-dir races.

Most tests call the CLI in-process; the kill and Ctrl-C tests run it in a subprocess
because they need a real signal. Everything uses the tiny synthetic config on CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from bnctl import checkpoint, config as config_mod, data as data_mod, engine, experiment, rundir
from bnctl.cli import app
from bnctl.errors import ConfigError, DataError
from conftest import tiny_raw, write_config

TIMING = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for subprocesses; see one_thread()
SMALL = {"train_size": 64, "test_size": 32}  # enough to build everything; these runs never train


# ------------------------------------------------------------------ helpers

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread here and in subprocesses: equal thread counts keep in-process and subprocess
    runs bit-identical, and on a busy 2-core machine a second thread makes tiny steps much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Payload:
    """Unpickling this calls open(marker, 'w'), creating a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def invoke(*args) -> object:
    """Run bnctl in-process, catching exceptions so that a crash shows up as a failed assertion."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root, with size and mtime for files: any write shows up as a difference."""
    return {str(p.relative_to(root)): ((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None)
            for p in root.rglob("*")}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values(path: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the timing columns, as written (text, so exact)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(path)]


def hidden_files(run_dir: Path) -> list[Path]:
    """Temp files of atomic writes are hidden (.name.xxx.tmp); a finished run has none, only its lock file."""
    return [p for p in run_dir.rglob(".*") if p.name != rundir.LOCK_FILE]


def image_folder(root: Path, classes: list[str], splits=("train", "test"), n: int = 2, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def small_config(tmp: Path, **sections) -> Path:
    data = {**SMALL, **sections.pop("data", {})}
    return write_config(tmp / "config.yaml", tiny_raw(data=data, **sections))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A real one-epoch checkpoint, the base of the damaged and foreign variants."""
    tmp = tmp_path_factory.mktemp("good")
    cfg = config_mod.validate(tiny_raw(data={"train_size": 128, "test_size": 64}, train={"epochs": 1}))
    result = engine.fit(cfg, run_dir=tmp / "run")
    return result.run_dir / "checkpoints" / "last.pt"


def copy_checkpoint(tmp: Path, good: Path, name: str = "last.pt") -> Path:
    dest = tmp / "run" / "checkpoints" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(good, dest)
    return dest


def altered_checkpoint(tmp: Path, good: Path, change) -> Path:
    """A copy of the good checkpoint with its dict changed by `change` (saved as torch.save would)."""
    state = torch.load(good, weights_only=True)
    change(state)
    path = tmp / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


# ------------------------------------------------------------------ the bad-input corpus
# Each case builds its files under tmp and returns the CLI arguments. Train commands get
# --runs-root tmp/runs added, and that folder must stay empty.

def _text(tmp: Path, text: str | bytes, name: str = "config.yaml") -> Path:
    path = tmp / name
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def _with_key(tmp: Path, **sections) -> list:
    return ["train", "-c", small_config(tmp, **sections)]


def _override(*items: str):
    return lambda tmp, good: ["train", "-c", small_config(tmp), *items]


def _resume_dir(tmp: Path, with_config: bool = True) -> Path:
    run = tmp / "old"
    (run / "checkpoints").mkdir(parents=True)
    if with_config:
        small_config(run)
    return run


def _cifar(tmp: Path) -> Path:
    folder = tmp / "cifar" / data_mod.CIFAR_DIR
    folder.mkdir(parents=True)
    for name in data_mod.CIFAR_TRAIN_FILES + data_mod.CIFAR_TEST_FILES:
        (folder / name).write_bytes(pickle.dumps(Payload(tmp / "cifar-marker"), protocol=2))
    return tmp / "cifar"


def _imagefolder(tmp: Path, make) -> list:
    root = tmp / "images"
    make(root)
    return ["train", "-c", small_config(tmp, data={"name": "imagefolder", "root": str(root)},
                                        train={"batch_size": 2, "eval_batch_size": 4})]


def _mismatched_classes(tmp: Path, good: Path) -> list:
    root = image_folder(tmp / "two", ["a", "b"])

    def to_imagefolder(state):
        state["config"]["data"] |= {"name": "imagefolder", "root": str(root)}
        state.pop("classes")  # stored before class names were: only the count can be checked
    return ["eval", altered_checkpoint(tmp, good, to_imagefolder)]


CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

CASES = [
    # --- config files
    ("missing-config", lambda t, g: ["train", "-c", t / "nope.yaml"], 2, "config file not found"),
    ("config-is-folder", lambda t, g: ["train", "-c", t], 2, "is a directory"),
    ("yaml-syntax", lambda t, g: ["train", "-c", _text(t, "name: a\ntrain:\n  epochs: 2\n   batch_size: 4\n")],
     2, "line 4, column 14"),
    ("yaml-tab", lambda t, g: ["train", "-c", _text(t, "name: a\nmodel:\n\tnorm: batch\n")], 2, "line 3, column 1"),
    ("yaml-duplicate-key", lambda t, g: ["train", "-c", _text(t, "train:\n  epochs: 2\ntrain:\n  epochs: 3\n")],
     2, "duplicate key 'train'"),
    ("yaml-python-tag", lambda t, g: ["train", "-c", _text(t, "name: !!python/object/apply:os.getcwd []\n")],
     2, "!!python/object/apply:os.getcwd is not allowed"),
    ("yaml-not-utf8", lambda t, g: ["train", "-c", _text(t, b"name: \xff\xfe\n")], 2, "not UTF-8"),
    ("yaml-not-mapping", lambda t, g: ["train", "-c", _text(t, "- a\n- b\n")], 2, "must be a mapping"),
    ("unknown-key", lambda t, g: _with_key(t, optimizer={"lrr": 0.1}), 2, "optimizer.lrr: unknown key; did you mean 'lr'"),
    ("unknown-section", lambda t, g: _with_key(t, trian={"epochs": 1}), 2, "did you mean 'train'"),
    ("wrong-type", lambda t, g: _with_key(t, train={"epochs": "many"}), 2, "train.epochs: Input should be a valid integer"),
    ("scalar-section", lambda t, g: _with_key(t, model="seed_cnn"), 2, "model: must be a section"),
    # --- values out of range or unknown names
    ("lr-zero", _override("optimizer.lr=0"), 2, "optimizer.lr: Input should be greater than 0"),
    ("lr-negative", _override("optimizer.lr=-0.1"), 2, "optimizer.lr: Input should be greater than 0"),
    ("epochs-zero", _override("train.epochs=0"), 2, "train.epochs: Input should be greater than or equal to 1"),
    ("batch-zero", _override("train.batch_size=0"), 2, "train.batch_size: Input should be greater than or equal to 1"),
    ("eval-batch-zero", _override("train.eval_batch_size=0"), 2, "train.eval_batch_size"),
    ("std-zero", _override("data.std=[0.5,0,0.5]"), 2, "data.std must be > 0"),
    ("unknown-dataset", _override("data.name=cifar"), 2, "did you mean 'cifar10'"),
    ("unknown-model", _override("model.name=vit"), 2, "'seed_cnn', 'vgg' or 'resnet20'"),
    ("unknown-norm", _override("model.norm=batchnorm"), 2, "did you mean 'batch'"),
    ("unknown-optimizer", _override("optimizer.name=sdg"), 2, "did you mean 'sgd'"),
    ("unknown-scheduler", _override("scheduler.name=cos"), 2, "did you mean 'cosine'"),
    ("unknown-device", _override("device=gpu"), 2, "device must be one of auto, cpu, cuda"),
    ("bad-run-name", _override("name=a/b"), 2, "name may contain only"),
    pytest.param("cuda-missing", _override("device=cuda"), 2, "no usable CUDA GPU", marks=CUDA, id="cuda-missing"),
    pytest.param("fp16-on-cpu", _override("device=auto", "train.precision=fp16"), 2, "fp16 needs a CUDA device",
                 marks=CUDA, id="fp16-on-cpu"),
    ("batch-one-with-bn", _override("train.batch_size=1"), 2, "one sample has no variance"),
    ("batch-one-with-ghost", _override("train.batch_size=1", "model.norm=ghost"), 2, "one sample has no variance"),
    ("batch-larger-than-data", _override("train.batch_size=1000"), 2, "fewer than train.batch_size=1000"),
    # --- overrides
    ("override-no-equals", _override("optimizer.lr"), 2, "must look like KEY=VALUE"),
    ("override-no-key", _override("=0.1"), 2, "must look like KEY=VALUE"),
    ("override-empty-part", _override("optimizer..lr=0.1"), 2, "is not a config key"),
    ("override-unknown", _override("optimizer.lrr=0.1"), 2, "did you mean 'lr'"),
    ("override-into-value", _override("optimizer.lr.x=1"), 2, "'lr' is not a section"),
    ("override-bad-value", _override("train.epochs=[1"), 2, "cannot parse the value"),
    # --- run directories and resume
    ("no-config", lambda t, g: ["train"], 2, "give --config FILE"),
    ("run-dir-holds-run", lambda t, g: ["train", "-c", small_config(t), "--run-dir", _resume_dir(t)],
     2, "already exists and is not empty"),
    ("run-dir-is-file", lambda t, g: ["train", "-c", small_config(t), "--run-dir", _text(t, "x", "file")],
     2, "is a file"),
    ("runs-root-is-file", lambda t, g: ["train", "-c", small_config(t), "--runs-root", _text(t, "x", "file")],
     2, "is a file, not a folder"),
    ("resume-with-config", lambda t, g: ["train", "--resume", _resume_dir(t), "-c", small_config(t)],
     2, "drop --config"),
    ("resume-missing", lambda t, g: ["train", "--resume", t / "nope"], 2, "run directory not found"),
    ("resume-not-a-run", lambda t, g: ["train", "--resume", _resume_dir(t, with_config=False)],
     2, "not a bnctl run directory"),
    ("resume-changes-lr", lambda t, g: ["train", "--resume", _resume_dir(t), "optimizer.lr=1"],
     2, "only device, train.epochs, train.tensorboard may change"),
    ("resume-no-checkpoint", lambda t, g: ["train", "--resume", _resume_dir(t)], 2, "no checkpoint to resume from"),
    # --- data
    ("cifar-missing", _override("data.name=cifar10", "data.root=/nonexistent/bnctl"), 2, "CIFAR-10 not found"),
    ("cifar-malicious", lambda t, g: ["train", "-c", small_config(t), "data.name=cifar10", f"data.root={_cifar(t)}"],
     2, "not a valid CIFAR-10 batch file"),
    ("imagefolder-no-test-split", lambda t, g: _imagefolder(t, lambda r: image_folder(r, ["a", "b"], splits=("train",))),
     2, "missing split folder(s) test"),
    ("imagefolder-empty-class", lambda t, g: _imagefolder(
        t, lambda r: (image_folder(r, ["a", "b"]), (r / "train" / "zzz").mkdir())), 2, "zzz"),
    ("imagefolder-no-classes", lambda t, g: _imagefolder(
        t, lambda r: ((r / "train").mkdir(parents=True), (r / "test").mkdir())), 2, "class folder"),
    ("imagefolder-class-mismatch", lambda t, g: _imagefolder(
        t, lambda r: (image_folder(r, ["a", "b"]), image_folder(r, ["c"], splits=("test",)))),
     2, "different class folders"),
    ("imagefolder-bad-image", lambda t, g: _imagefolder(
        t, lambda r: (image_folder(r, ["a", "b"]), (r / "train" / "a" / "x.png").write_bytes(b"no png"))),
     2, "cannot decode image"),
    ("images-too-small-for-model", lambda t, g: _imagefolder(t, lambda r: image_folder(r, ["a", "b"]))
     + ["data.image_size=16"], 2, "16x16"),
    ("images-too-small-for-vgg", lambda t, g: _imagefolder(t, lambda r: image_folder(r, ["a", "b"]))
     + ["data.image_size=8", "model.name=vgg"], 2, "8x8"),
    # --- checkpoints given to eval
    ("ckpt-missing", lambda t, g: ["eval", t / "nope.pt"], 2, "checkpoint not found"),
    ("ckpt-is-folder", lambda t, g: ["eval", t], 2, "give a checkpoint file"),
    ("ckpt-empty", lambda t, g: ["eval", _text(t, b"", "e.pt")], 1, "is empty (0 bytes)"),
    ("ckpt-truncated", lambda t, g: ["eval", _text(t, copy_checkpoint(t, g).read_bytes()[:3000], "t.pt")],
     1, "truncated, corrupt or not a torch file"),
    ("ckpt-random-bytes", lambda t, g: ["eval", _text(t, np.random.default_rng(1).bytes(4096), "r.pt")],
     1, "is not a readable checkpoint"),
    ("ckpt-text", lambda t, g: ["eval", _text(t, "hello\n", "h.pt")], 1, "is not a readable checkpoint"),
    ("ckpt-plain-state-dict", lambda t, g: ["eval", _saved(t, {"conv.weight": torch.zeros(2, 2)})],
     1, "looks like a bare state_dict"),
    ("ckpt-plain-tensor", lambda t, g: ["eval", _saved(t, torch.zeros(3))], 1, "is not a bnctl checkpoint"),
    ("ckpt-future-format", lambda t, g: ["eval", altered_checkpoint(t, g, lambda s: s.update(format_version=99))],
     1, "newer than this bnctl understands"),
    ("ckpt-without-model", lambda t, g: ["eval", altered_checkpoint(t, g, lambda s: s.pop("model"))],
     1, "incomplete bnctl checkpoint (missing model)"),
    ("ckpt-foreign-weights", lambda t, g: ["eval", altered_checkpoint(t, g, lambda s: s.update(model={"w": torch.zeros(1)}))],
     1, "does not fit the model its config describes"),
    ("ckpt-bad-config", lambda t, g: ["eval", altered_checkpoint(t, g, lambda s: s["config"]["model"].update(norm="x"))],
     2, "invalid config stored in"),
    ("ckpt-class-count-mismatch", _mismatched_classes, 1, "predicts 10 classes but the data has 2"),
    ("ckpt-malicious", lambda t, g: ["eval", _saved(t, {"format": "bnctl-checkpoint", "format_version": 1,
                                                         "epoch": 1, "config": {}, "model": Payload(t / "m")})],
     1, "refused to load"),
    pytest.param("eval-cuda-missing", lambda t, g: ["eval", copy_checkpoint(t, g), "--device", "cuda"], 2,
                 "no usable CUDA GPU", marks=CUDA, id="eval-cuda-missing"),
    ("eval-bad-bn-mode", lambda t, g: ["eval", copy_checkpoint(t, g), "--bn-mode", "train"], 2, "choose one of: running, batch"),
    # --- plot and compare
    ("plot-missing", lambda t, g: ["plot", t / "nope"], 2, "run directory not found"),
    ("plot-not-a-run", lambda t, g: ["plot", t], 2, "not a bnctl run directory"),
    ("plot-a-file", lambda t, g: ["plot", _text(t, "x", "file")], 2, "is a file"),
    ("compare-missing", lambda t, g: ["compare", t / "nope", t], 2, "run directory not found"),
]


def _saved(tmp: Path, obj) -> Path:
    path = tmp / "foreign.pt"
    torch.save(obj, path)
    return path


def _case_id(case) -> str:
    return case.id if hasattr(case, "id") else case[0]


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({_case_id(c) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, code, message", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, good_checkpoint, name, build, code, message):
    work = tmp_path / "work"
    work.mkdir()
    args = [str(a) for a in build(work, good_checkpoint)]
    runs = tmp_path / "runs"
    if args[0] == "train" and "--runs-root" not in args:
        args += ["--runs-root", str(runs)]
    before = snapshot(tmp_path)
    result = invoke(*args)
    out = result.output
    assert result.exit_code == code, out
    assert message in out, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert len(out.strip().splitlines()) <= 4, out  # one or a few lines, not a wall of text
    assert snapshot(tmp_path) == before  # no run directory, no eval.json, nothing overwritten
    assert not runs.exists()


def test_unreadable_config_is_a_clear_error(tmp_path, monkeypatch):
    config = small_config(tmp_path)
    real_read = Path.read_text

    def denied(self, *args, **kwargs):  # chmod 000 would not stop root, so refuse the read here
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", denied)
    result = invoke("train", "-c", config, "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2 and "cannot read config" in result.output and "Permission denied" in result.output
    assert not (tmp_path / "runs").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    plain = invoke("train", "-c", tmp_path / "nope.yaml")
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    debug = invoke("--debug", "train", "-c", tmp_path / "nope.yaml")
    assert isinstance(debug.exception, ConfigError)  # re-raised for the traceback, not turned into a message


# ------------------------------------------------------------------ unsafe files never run code

def test_payload_is_live_so_the_refusals_below_mean_something(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
def test_malicious_checkpoint_is_refused_and_does_not_run(tmp_path, fmt):
    marker = tmp_path / "ran"
    evil = {"format": "bnctl-checkpoint", "format_version": 1, "epoch": 1, "config": {}, "model": Payload(marker)}
    path = tmp_path / "evil.pt"
    if fmt == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    result = invoke("eval", path)
    assert result.exit_code == 1
    assert "refused to load" in result.output and "nothing in it was executed" in result.output, result.output
    assert not marker.exists()
    with pytest.raises(Exception, match="refused"):
        checkpoint.load(path)
    assert not marker.exists()


def test_yaml_python_tags_are_refused_and_do_not_run(tmp_path):
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
    yaml.unsafe_load(text)["name"].close()  # the tag is live under an unsafe loader...
    assert marker.exists()
    marker.unlink()
    config = _text(tmp_path, text)
    result = invoke("train", "-c", config, "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2 and "is not allowed" in result.output, result.output
    assert not marker.exists()  # ...and never runs under bnctl's
    assert not (tmp_path / "runs").exists()


def test_malicious_cifar_batch_is_refused_and_does_not_run(tmp_path):
    root = _cifar(tmp_path)
    with pytest.raises(DataError, match="not a valid CIFAR-10 batch file"):
        data_mod.load_cifar10(config_mod.DataConfig(name="cifar10", root=str(root)))
    assert not (tmp_path / "cifar-marker").exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_restricted_cifar_reader_still_reads_real_batches(tmp_path, protocol):
    pixels = np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": pixels, "labels": [3, 1, 4, 1]}, protocol=protocol))
    x, y = data_mod._read_cifar_batch(path)
    assert x.shape == (4, 3, 32, 32) and (x.reshape(4, -1) == pixels).all()
    assert y.tolist() == [3, 1, 4, 1]


# ------------------------------------------------------------------ BN's own trap

def test_last_training_batch_of_one_is_dropped(tmp_path):
    cfg = config_mod.validate(tiny_raw(data={"train_size": 65, "test_size": 32}, train={"batch_size": 32, "epochs": 1}))
    exp = experiment.setup(cfg)
    sizes = [len(y) for _, y in exp.train_batches]
    assert sizes == [32, 32]  # 65 = 2*32 + 1: the lone sample is left out
    x = next(iter(exp.train_batches))[0]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        exp.model.train()(x[:1])  # the trap that dropping avoids
    result = invoke("train", "-c", write_config(tmp_path / "c.yaml", config_mod.to_dict(cfg)),
                    "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_batch_size_one_is_fine_with_per_sample_norms():
    assert config_mod.validate(tiny_raw(model={"norm": "group"}, train={"batch_size": 1})).train.batch_size == 1
    with pytest.raises(ConfigError, match="one sample has no variance"):
        config_mod.validate(tiny_raw(model={"norm": "batch_manual"}, train={"batch_size": 1}))


# ------------------------------------------------------------------ atomic, durable writes

def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError):
        rundir.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_checkpoint_save_dying_mid_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {}, "config": {}, "epoch": 1})
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        f.truncate(100)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"model": {}, "config": {}, "epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def assert_complete_run(run_dir: Path, epochs: int) -> None:
    """Every file a finished run writes is whole, and no temp file is left behind."""
    assert hidden_files(run_dir) == []
    text = (run_dir / "metrics.csv").read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == epochs + 1
    assert {len(line.split(",")) for line in lines} == {len(lines[0].split(","))}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == epochs
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == epochs
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ kill, interrupt, resume

RESUME_EPOCHS = 6
# Augmentation, dropout and a cosine schedule: every RNG stream and the lr schedule matter.
RESUME_RAW = tiny_raw(data={"train_size": 256, "augment": "crop_flip"}, model={"dropout": 0.2},
                      scheduler={"name": "cosine"}, train={"epochs": RESUME_EPOCHS})
STEPS = 256 // 32


def bnctl_process(*args, **kwargs) -> subprocess.Popen:
    # Ctrl-C as a terminal delivers it, even when the suite itself runs where SIGINT is ignored (a background job).
    return subprocess.Popen([sys.executable, "-m", "bnctl", *map(str, args)], text=True, env=ONE_THREAD,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def wait_for_rows(metrics: Path, count: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll until metrics.csv holds `count` complete rows (lines end with a newline only when whole)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") - 1 >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"bnctl exited early with {proc.returncode}")
        time.sleep(0.003)
    proc.kill()
    raise AssertionError(f"no {count} rows in {metrics} after {timeout}s")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An uninterrupted run, and the same run SIGKILLed after epoch 2 and resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = write_config(tmp / "c.yaml", RESUME_RAW)
    ref = invoke("train", "-c", cfg, "--run-dir", tmp / "ref")
    assert ref.exit_code == 0, ref.output
    killed = tmp / "killed"
    proc = bnctl_process("train", "-c", cfg, "--run-dir", killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_rows(killed / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    kept = len(rows(killed / "metrics.csv"))
    assert 2 <= kept < RESUME_EPOCHS, "the kill came too late to test anything"
    assert json.loads((killed / "summary.json").read_text())["status"] == "running"
    resumed = invoke("train", "--resume", killed)
    assert resumed.exit_code == 0, resumed.output
    return tmp / "ref", killed


def test_sigkilled_run_resumes_to_the_identical_result(killed_and_resumed):
    ref, killed = killed_and_resumed
    assert values(killed / "metrics.csv") == values(ref / "metrics.csv")
    assert len(rows(ref / "metrics.csv")) == RESUME_EPOCHS
    lrs = [float(r["lr"]) for r in rows(ref / "metrics.csv")]
    assert lrs[0] == 0.003 and lrs == sorted(lrs, reverse=True)  # the cosine schedule did move
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best"] == b["best"]
    assert_complete_run(ref, RESUME_EPOCHS)
    assert_complete_run(killed, RESUME_EPOCHS)


def test_resuming_a_completed_run_does_nothing(killed_and_resumed):
    _, killed = killed_and_resumed
    before = snapshot(killed)
    result = invoke("train", "--resume", killed)
    assert result.exit_code == 0
    assert f"already completed {RESUME_EPOCHS} epoch(s); nothing to do" in result.output
    assert snapshot(killed) == before


@pytest.mark.slow
def test_resume_extends_a_run_with_more_epochs(killed_and_resumed, tmp_path):
    _, killed = killed_and_resumed
    run = shutil.copytree(killed, tmp_path / "run")
    before = (run / "metrics.csv").read_text().splitlines()
    longer = RESUME_EPOCHS + 1
    result = invoke("train", "--resume", run, f"train.epochs={longer}")
    assert result.exit_code == 0, result.output
    after = (run / "metrics.csv").read_text().splitlines()
    assert after[: len(before)] == before  # history is kept value for value
    assert len(after) == 1 + longer
    # The cosine schedule is recomputed for the longer run: the new epoch starts at step 6*8 of 7*8.
    expected = 0.003 * 0.5 * (1 + math.cos(math.pi * RESUME_EPOCHS * STEPS / (longer * STEPS)))
    assert float(rows(run / "metrics.csv")[-1]["lr"]) == pytest.approx(expected, rel=1e-12)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == longer
    resumes = json.loads((run / "run.json").read_text())["resumes"]  # provenance of every continuation
    assert [(r["from_epoch"], r["epochs"]) for r in resumes][-1] == (RESUME_EPOCHS, longer)
    assert_complete_run(run, longer)


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_the_run_resumes(tmp_path):
    # 200 epochs of 16 steps: the stop lands in the first few epochs, far from the run's end.
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 512, "test_size": 64}, train={"epochs": 200}))
    run = tmp_path / "run"
    proc = bnctl_process("train", "-c", cfg, "--run-dir", run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_rows(run / "metrics.csv", 1, proc)
    seen = len(rows(run / "metrics.csv"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)  # a hang guard; a loaded machine trains slowly
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out
    assert f"bnctl train --resume {run}" in err
    summary = json.loads((run / "summary.json").read_text())
    kept = summary["epochs_completed"]
    assert summary["status"] == "interrupted" and kept in (seen, seen + 1)  # stopped at once, not at the end
    assert len(rows(run / "metrics.csv")) == kept
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == kept
    assert hidden_files(run) == []
    resumed = invoke("train", "--resume", run, f"train.epochs={kept + 1}")
    assert resumed.exit_code == 0, resumed.output
    assert_complete_run(run, kept + 1)


def test_a_run_still_training_cannot_be_resumed_twice(good_checkpoint, tmp_path):
    run = shutil.copytree(good_checkpoint.parent.parent, tmp_path / "run")
    with rundir.RunLock(run):  # as the live training process holds it
        before = snapshot(run)
        result = invoke("train", "--resume", run, "train.epochs=2")
        assert result.exit_code == 2, result.output
        assert f"in use by another bnctl process (pid {os.getpid()})" in result.output
        assert snapshot(run) == before
    result = invoke("train", "--resume", run, "train.epochs=2")  # a lock dies with its holder
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ divergence

def test_huge_learning_rate_diverges_cleanly(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(model={"norm": "none"}, optimizer={"name": "sgd", "lr": 1000.0}))
    result = invoke("train", "-c", cfg, "--run-dir", tmp_path / "run")
    assert result.exit_code == 3, result.output
    assert "training diverged" in result.output and "lower optimizer.lr" in result.output
    assert "Traceback" not in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 1
    assert 1 <= summary["diverged"]["step"] <= 16
    assert rows(tmp_path / "run" / "metrics.csv") == []  # header only: no epoch completed
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def _one_epoch_then_break(good_checkpoint: Path, tmp_path: Path, breaks: str) -> Path:
    """A copy of a real one-epoch run (no curves.png yet) whose checkpoint gets a NaN where `breaks` says."""
    run = shutil.copytree(good_checkpoint.parent.parent, tmp_path / "run")
    assert not (run / "curves.png").exists()
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    key = [k for k in state["model"] if k.endswith(breaks)][-1 if breaks == ".weight" else 0]
    state["model"][key].view(-1)[0] = float("nan")
    torch.save(state, last)
    return run


def test_divergence_after_an_epoch_keeps_metrics_checkpoint_and_curves(good_checkpoint, tmp_path):
    run = _one_epoch_then_break(good_checkpoint, tmp_path, ".weight")  # the output layer: the next loss is NaN
    result = invoke("train", "--resume", run, "train.epochs=3")
    assert result.exit_code == 3, result.output
    assert "last good checkpoint (epoch 1)" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 2
    assert 1 <= summary["diverged"]["step"] <= 128 // 32
    assert summary["epochs_completed"] == 1 and len(rows(run / "metrics.csv")) == 1
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn although the run failed


def test_non_finite_test_loss_is_divergence_and_saves_no_broken_checkpoint(good_checkpoint, tmp_path):
    # NaN running statistics leave training (batch statistics) finite but break eval mode.
    run = _one_epoch_then_break(good_checkpoint, tmp_path, "running_var")
    result = invoke("train", "--resume", run, "train.epochs=2")
    assert result.exit_code == 3, result.output
    assert "test loss became nan after epoch 2" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["epoch"] == 2
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert len(rows(run / "metrics.csv")) == 1


# ------------------------------------------------------------------ run directories never collide

class _FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2030, 1, 2, 3, 4, 5)


def test_simultaneous_runs_get_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "datetime", _FrozenClock)  # every run starts in the same second
    n = 16
    barrier, made, errors = threading.Barrier(n), [], []

    def start():
        barrier.wait()
        try:
            made.append(rundir.create(tmp_path, "race"))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)
    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stem = "20300102-030405-race"
    assert sorted(p.name for p in made) == sorted([stem] + [f"{stem}-{i}" for i in range(2, n + 1)])
    assert all((p / "checkpoints").is_dir() for p in made)


def test_simultaneous_processes_get_distinct_directories(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from datetime import datetime
        from bnctl import rundir

        class Frozen(datetime):
            @classmethod
            def now(cls, tz=None):
                return datetime(2030, 1, 2, 3, 4, 5)

        rundir.datetime = Frozen
        start = float(sys.argv[2])
        while time.time() < start:
            time.sleep(0.0005)
        print(rundir.create(sys.argv[1], "race"))
    """)
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    made = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(made)) == 4 and all(Path(m).is_dir() for m in made)


def test_existing_runs_are_never_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "datetime", _FrozenClock)
    stem = "20300102-030405-race"
    for name in (stem, f"{stem}-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text(name)
    new = rundir.create(tmp_path, "race")
    assert new.name == f"{stem}-3"
    assert [(tmp_path / n / "metrics.csv").read_text() for n in (stem, f"{stem}-2")] == [stem, f"{stem}-2"]


def test_two_runs_claiming_one_exact_run_dir_cannot_both_win(tmp_path):
    target = tmp_path / "exact"
    barrier, won, lost = threading.Barrier(8), [], []

    def claim():
        barrier.wait()
        try:
            won.append(rundir.create(tmp_path, "x", exact=target))
        except ConfigError:
            lost.append(1)
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
