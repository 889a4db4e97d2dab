"""Daily-driver usability: eval results that keep, runs listing and stale status, compare output,
figures that say what they show, TensorBoard, CLI conventions, data-path hints, file permissions."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnctl import data as data_mod, plotting, rundir
from bnctl.config import DataConfig
from bnctl.errors import ConfigError, DataError
from conftest import tiny_raw, write_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished one-epoch run (with TensorBoard and diagnostics on), trained once for this module."""
    from typer.testing import CliRunner

    from bnctl.cli import app

    root = tmp_path_factory.mktemp("usability")
    cfg = write_config(root / "tiny.yaml", tiny_raw(
        data={"train_size": 256, "test_size": 128}, train={"epochs": 1, "tensorboard": True, "diagnostics": True,
                                                          "diagnostics_every": 2}))
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--runs-root", str(root / "runs")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Path(result.output.strip().splitlines()[-1])


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, to change freely."""
    dst = tmp_path / "runs" / trained.name
    shutil.copytree(trained, dst)
    return dst


# ---------------------------------------------------------------- files a team can share

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_get_what_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        rundir.write_json(tmp_path / "a.json", {"x": 1})
        with rundir.atomic_write(tmp_path / "b.bin", "wb") as f:
            f.write(b"x")
        run = rundir.create(tmp_path / "runs", "perm")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    for folder in (run, run / rundir.CHECKPOINT_DIR):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask


def test_a_whole_run_is_readable_by_the_group_and_others(trained):
    # The module's run was trained under the test process's umask; every file gets 0666 & ~umask.
    mask = rundir.current_umask()
    files = [p for p in trained.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".png" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~mask}


# ---------------------------------------------------------------- lock and stale status

def test_lock_file_is_removed_when_the_run_ends(trained):
    assert not (trained / rundir.LOCK_FILE).exists()
    assert json.loads((trained / "summary.json").read_text())["status"] == "completed"


def test_running_status_without_a_lock_holder_reads_as_stale(run_copy):
    summary = json.loads((run_copy / "summary.json").read_text()) | {"status": "running"}
    rundir.write_json(run_copy / "summary.json", summary)  # what a SIGKILL leaves behind
    assert rundir.effective_status(run_copy) == "stale"
    with rundir.RunLock(run_copy):  # a live trainer holds the lock: the run really is running
        assert rundir.lock_held(run_copy) is True
        assert rundir.effective_status(run_copy) == "running"
    (run_copy / rundir.LOCK_FILE).write_text("12345\n")  # a lock file nobody holds
    assert rundir.effective_status(run_copy) == "stale"
    rundir.write_json(run_copy / "summary.json", summary | {"status": "interrupted"})
    assert rundir.effective_status(run_copy) == "interrupted"


def test_runs_lists_status_epochs_and_accuracy(run_copy, cli):
    root = run_copy.parent
    other = root / "killed"
    shutil.copytree(run_copy, other)
    rundir.write_json(other / "summary.json", json.loads((other / "summary.json").read_text()) | {"status": "running"})
    summary = json.loads((run_copy / "summary.json").read_text())

    listed = json.loads(cli("runs", root, "--json").stdout)
    by_name = {r["name"]: r for r in listed}
    assert set(by_name) == {run_copy.name, "killed"}
    assert by_name["killed"]["status"] == "stale" and by_name[run_copy.name]["status"] == "completed"
    assert by_name[run_copy.name]["best_test_acc"] == summary["best"]["test_acc"]
    assert (by_name[run_copy.name]["epochs_completed"], by_name[run_copy.name]["epochs_planned"]) == (1, 1)

    table = cli("runs", root)
    assert table.exit_code == 0
    killed = next(line for line in table.stdout.splitlines() if line.split()[:1] == ["killed"])
    assert killed.split()[1:3] == ["stale", "1/1"]
    assert f"{summary['best']['test_acc']:.2f}" in killed
    assert cli("runs", root / "nope").exit_code == 2


def test_compare_shows_a_stale_run_and_dashes_for_missing_numbers(run_copy, cli, tmp_path):
    rundir.write_json(run_copy / "summary.json", {"status": "running", "best": {"test_acc": None, "epoch": None}})
    (run_copy / "metrics.csv").write_text((run_copy / "metrics.csv").read_text().splitlines()[0] + "\n")
    out = cli("compare", run_copy, "--out", tmp_path / "c.png")  # one run is accepted, as --help says
    assert out.exit_code == 0, out.output
    line = next(line for line in out.stdout.splitlines() if line.split()[:1] == ["tiny"])
    assert "stale" in line and "None" not in line and line.split()[-6:-1] == ["-"] * 5  # all but wall time


def test_compare_takes_a_run_whose_summary_is_not_json(run_copy, cli, tmp_path):
    (run_copy / "summary.json").write_text("{cut sho")
    out = cli("compare", run_copy, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["final_test_acc"] == rundir.read_csv(run_copy / "metrics.csv")[-1]["test_acc"]


def test_plot_names_an_eval_file_it_cannot_read(run_copy, cli):
    (run_copy / "eval").mkdir(exist_ok=True)
    (run_copy / "eval" / "notes.json").write_text('{"a":')
    out = cli("plot", run_copy)
    assert out.exit_code == 1 and "internal error" not in out.output and "notes.json" in out.output, out.output
    assert (run_copy / "curves.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------- eval results that keep

def test_eval_of_a_run_dir_keeps_each_measurement_under_its_own_name(run_copy, cli):
    best = json.loads((run_copy / "summary.json").read_text())["best"]
    running = json.loads(cli("eval", run_copy, "--json").stdout)
    assert running["checkpoint"].endswith("best.pt") and running["acc"] == best["test_acc"]
    assert cli("eval", run_copy, "--bn-mode", "batch", "--batch-size", "4").exit_code == 0
    # 60 images asked for, in batches of 16: whole batches use 64, and the file is named by those.
    recal = cli("eval", run_copy, "--recalibrate", "60", "--recalibrate-batch-size", "16", "--json")
    assert json.loads(recal.stdout)["recalibration"] == {**json.loads(recal.stdout)["recalibration"],
                                                         "images": 64, "batch_size": 16}
    assert cli("eval", run_copy / "checkpoints" / "last.pt", "--json").exit_code == 0
    names = sorted(p.name for p in (run_copy / "eval").iterdir())
    assert names == ["batch-bs4.json", "batch-bs4.png", "last-running.json", "last-running.png",
                     "recal-64-bs16.json", "recal-64-bs16.png", "running.json", "running.png"]
    assert json.loads((run_copy / "eval" / "batch-bs4.json").read_text())["batch_size"] == 4
    drawn = [p.name for p in plotting.plot_run(run_copy)]  # plot redraws every kept result
    assert {"running.png", "batch-bs4.png", "recal-64-bs16.png", "last-running.png"} <= set(drawn)


def test_eval_of_several_goes_on_past_a_broken_checkpoint_and_names_each_failure(run_copy, cli, tmp_path):
    broken, missing = tmp_path / "broken.pt", tmp_path / "nowhere"
    broken.write_bytes(b"not a checkpoint at all")
    last = run_copy / "checkpoints" / "last.pt"
    out = cli("eval", run_copy, broken, last, missing)
    assert out.exit_code == 1, out.output  # the first failure's code: a damaged checkpoint
    rows = [line for line in out.stdout.splitlines() if line.split()[:1] == [run_copy.name]]
    assert len(rows) == 2  # best.pt and last.pt, both evaluated although broken.pt came between them
    assert f"failed: {broken}: " in out.output and f"failed: {missing}: checkpoint not found" in out.output
    assert "2 of 4 could not be evaluated" in out.output
    assert {"running.json", "last-running.json"} <= {p.name for p in (run_copy / "eval").iterdir()}
    listed = cli("eval", missing, last, "--json")
    assert listed.exit_code == 2  # a missing path first: a usage error
    results = json.loads(listed.stdout)
    assert results[0]["checkpoint"] == str(last) and "acc" in results[0]
    assert results[1] == {"checkpoint": str(missing), "error": f"checkpoint not found: {missing}", "exit_code": 2}
    # The same problem for every target is said once, as one error.
    same = cli("eval", run_copy, last, "--bn-mode", "batch", "--recalibrate", "8")
    assert same.exit_code == 2 and same.output.count("recalibrate (--recalibrate) recomputes") == 1
    assert "failed:" not in same.output


def test_eval_of_several_runs_gives_one_table_and_a_json_list(run_copy, cli):
    second = run_copy.parent / "second"
    shutil.copytree(run_copy, second)
    results = json.loads(cli("eval", run_copy, second, "--json").stdout)
    assert isinstance(results, list) and len(results) == 2
    assert results[0]["acc"] == results[1]["acc"] and results[1]["checkpoint"].startswith(str(second))
    table = cli("eval", run_copy, second)
    rows = [line for line in table.stdout.splitlines() if line.split()[:1] in ([run_copy.name], ["second"])]
    assert len(rows) == 2 and all(f"{results[0]['acc']:.2f}" in r for r in rows)
    assert cli("eval", run_copy, run_copy.parent / "nothing").exit_code == 2  # checked before any work


def test_eval_prints_first_and_warns_when_it_cannot_write(run_copy, cli, monkeypatch):
    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "write_json", refuse)
    out = cli("eval", run_copy, "--json")
    assert out.exit_code == 0
    assert json.loads(out.stdout)["images"] == 128  # stdout still holds exactly the JSON result
    assert "warning" in out.stderr and str(run_copy / "eval" / "running.json") in out.stderr
    plain = cli("eval", run_copy)
    assert "test loss" in plain.stdout and "Permission denied" in plain.stderr


def _image_folders(root: Path, per_class: int = 6, classes=("ant", "bee", "cat")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_eval_resolves_a_relative_data_root_from_the_runs_folder(tmp_path, cli, monkeypatch):
    project = tmp_path / "project"
    _image_folders(project / "data")
    cfg = write_config(tmp_path / "img.yaml", tiny_raw(
        data={"name": "imagefolder", "root": "./data", "image_size": 32},
        model={"name": "seed_cnn", "norm": "batch", "width": 0.25},
        train={"epochs": 1, "batch_size": 6, "eval_batch_size": 9}))
    monkeypatch.chdir(project)
    trained = cli("train", "--config", cfg, "--runs-root", project / "runs")
    assert trained.exit_code == 0, trained.output
    run_dir = Path(trained.output.strip().splitlines()[-1]).resolve()

    monkeypatch.chdir(tmp_path)  # elsewhere: ./data does not exist here, but does where the run started
    ok = cli("eval", run_dir, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["data_root"] == str(project / "data")

    shutil.move(project / "data", tmp_path / "moved")
    lost = cli("eval", run_dir)
    assert lost.exit_code == 2 and "--data-root" in lost.stderr and "data.download" not in lost.stderr
    # The root it tried is the checkpoint's own, so the message names it once.
    assert f"data.root=./data does not exist (from {tmp_path}). Point evaluation at the data with data_root (--data-root)" \
        in lost.stderr
    wrong = cli("eval", run_dir, "--data-root", tmp_path / "nowhere")
    assert wrong.exit_code == 2 and f"(data.root=./data in the checkpoint, {tmp_path / 'nowhere'} tried)" in wrong.stderr
    assert cli("eval", run_dir, "--data-root", tmp_path / "moved", "--json").exit_code == 0


def test_a_relative_data_root_is_looked_up_where_the_run_started_only_when_needed(tmp_path, monkeypatch):
    from bnctl import rundir
    from bnctl.evaluation import _recorded_data_root

    started, here = tmp_path / "started", tmp_path / "here"
    (started / "data").mkdir(parents=True)
    here.mkdir()
    run = tmp_path / "run"
    (run / rundir.CHECKPOINT_DIR).mkdir(parents=True)
    ckpt = run / rundir.CHECKPOINT_DIR / "best.pt"
    (run / rundir.RUN_INFO_FILE).write_text(json.dumps({"cwd": str(started)}))
    images = {"data": {"name": "imagefolder", "root": "./data"}}
    monkeypatch.chdir(here)
    assert _recorded_data_root(images, ckpt) == str(started / "data")  # missing here, found there
    (here / "data").mkdir()
    assert _recorded_data_root(images, ckpt) is None  # found from here: the root as written
    assert _recorded_data_root({"data": {"name": "imagefolder", "root": str(tmp_path / "gone")}}, ckpt) is None
    assert _recorded_data_root({"data": {"name": "imagefolder", "root": "./nowhere"}}, ckpt) is None  # nor there
    (here / "data").rmdir()
    assert _recorded_data_root({"data": {"root": "./data"}}, ckpt) is None  # synthetic data reads no folder
    (run / rundir.RUN_INFO_FILE).write_text(json.dumps({"name": "an older run.json without cwd"}))
    assert _recorded_data_root(images, ckpt) is None


# ---------------------------------------------------------------- data paths that explain themselves

def test_cifar_root_given_as_the_batches_folder_says_use_the_parent(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with pytest.raises(DataError, match=f"use the parent folder: data.root={tmp_path}$"):
        data_mod.load_dataset(DataConfig(name="cifar10", root=str(folder)))


def test_cifar_pointed_at_image_folders_suggests_imagefolder(tmp_path):
    _image_folders(tmp_path, per_class=1)
    with pytest.raises(DataError, match="data.name=imagefolder"):
        data_mod.load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))


def test_missing_data_root_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data.root=./data does not exist.*Set data.root=PATH"):
        data_mod.load_dataset(DataConfig(name="cifar10", root="./data"))
    with pytest.raises(DataError, match="Set data.root=PATH"):
        data_mod.load_dataset(DataConfig(name="imagefolder", root="./data"))


def test_train_limit_is_applied_before_decoding_with_progress(tmp_path, monkeypatch):
    root = _image_folders(tmp_path, per_class=10)
    full = data_mod.load_dataset(DataConfig(name="imagefolder", root=str(root)))  # decode all, then limit below
    keep = data_mod.limit_indices(len(full.train_y), 7)

    from PIL import Image

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    reports = []
    with data_mod.reporting_progress(lambda what, done, total: reports.append((what, done, total))):
        limited = data_mod.load_dataset(DataConfig(name="imagefolder", root=str(root), train_limit=7))
    assert torch.equal(limited.train_x, full.train_x[keep]) and torch.equal(limited.train_y, full.train_y[keep])
    assert len(opened) == 7 + 30  # the 7 kept training images and the test split, nothing else
    assert reports[-1][1:] == (30, 30) and any(r[1:] == (7, 7) and "train" in r[0] for r in reports)


# ---------------------------------------------------------------- figures and tables

def test_title_names_every_non_default_key_that_changes_the_experiment():
    raw = {"name": "cifar", "device": "cuda", "data": {"name": "cifar10", "root": "/d", "train_limit": 2000},
           "model": {"init_scale": 5.0, "dropout": 0.3, "virtual_batch_size": 4},
           "train": {"diagnostics": True, "epochs": 30}}
    title = plotting.run_title(raw, "x", width=60)
    flat = title.replace("\n", " ")
    for part in ("init_scale=5", "dropout=0.3", "train_limit=2000", "epochs=30", "root=/d"):
        assert part in flat
    # Not experiment-changing or not applicable (ghost's virtual batch size with norm=batch): left out.
    assert "device" not in flat and "diagnostics" not in flat and "virtual_batch_size" not in flat
    assert len(title.splitlines()) >= 2 and max(map(len, title.splitlines())) <= 60


def _capture_figures(monkeypatch) -> list:
    figures = []

    def keep(fig, path):
        figures.append(fig)
        Path(path).write_bytes(PNG)
        return Path(path)

    monkeypatch.setattr(plotting, "_save", keep)
    return figures


def test_curves_draw_the_chance_line_and_keep_noise_flat(run_copy, monkeypatch):
    figures = _capture_figures(monkeypatch)
    plotting.plot_curves(run_copy)
    ax_acc = figures[0].axes[1]
    chance = [line for line in ax_acc.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [10.0, 10.0]  # 100 / 10 classes
    low, high = ax_acc.get_ylim()
    assert high - low >= 20 and low <= 10 <= high


def test_compare_puts_a_diverging_loss_on_a_log_axis(run_copy, monkeypatch, tmp_path):
    other = run_copy.parent / "blown"
    shutil.copytree(run_copy, other)
    text = (other / "metrics.csv").read_text().splitlines()
    header, row = text[0].split(","), dict(zip(text[0].split(","), text[1].split(",")))
    row["train_loss"] = "95.0"
    (other / "metrics.csv").write_text(",".join(header) + "\n" + ",".join(row[c] for c in header) + "\n")
    figures = _capture_figures(monkeypatch)
    plotting.plot_compare([plotting.load_run(run_copy), plotting.load_run(other)], tmp_path / "c.png")
    assert figures[0].axes[0].get_yscale() == "log"


def test_diagnostics_panels_without_norm_layers_do_not_say_pre_norm(tmp_path, monkeypatch):
    rows = [(s, 1, "conv1", stat, v) for s in (0, 2) for stat, v in
            (("input_mean", 0.1), ("input_std", 1.0), ("dead_frac", 0.25), ("weight_norm", 3.0))]
    writer = rundir.CsvAppender(tmp_path / rundir.DIAGNOSTICS_FILE, ["step", "epoch", "layer", "stat", "value"])
    writer.extend(rows)
    figures = _capture_figures(monkeypatch)
    plotting.plot_diagnostics(tmp_path)
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert not any("pre-norm" in t for t in titles)
    assert "conv/fc output (no norm layers): mean" in titles and "dead ReLU units (share of channels)" in titles


def test_diagnostics_record_dead_units_after_each_relu(trained):
    rows = rundir.read_csv(trained / rundir.DIAGNOSTICS_FILE)
    dead = [r for r in rows if r["stat"] == "dead_frac"]
    assert {r["layer"] for r in dead} == {"conv1", "conv2", "conv3", "fc1"}
    assert all(0.0 <= r["value"] <= 1.0 for r in dead)


def test_compare_table_fits_and_exports(tmp_path, run_copy, cli, monkeypatch):
    runs = []
    for i, (lr, root) in enumerate(((0.003, "./data"), (0.01, "/elsewhere"))):
        d = run_copy.parent / f"r{i}"
        shutil.copytree(run_copy, d)
        raw = tiny_raw(optimizer={"lr": lr}, data={"root": root, "train_size": 256, "test_size": 128},
                       train={"epochs": 1, "eval_batch_size": 64 * (i + 1), "tensorboard": True,
                              "diagnostics": True, "diagnostics_every": 2},
                       model={"name": "seed_cnn", "norm": "batch", "init_scale": 1.0 + 4 * i, "dropout": 0.1 * i})
        write_config(d / "config.yaml", raw)
        runs.append(d)
    as_json = json.loads(cli("compare", *runs, "--json").stdout)
    keys = set(as_json[0]) - {"name", "dir", "status", "epochs", "epochs_planned", "final_train_acc",
                              "final_test_acc", "final_test_loss", "best_test_acc", "best_epoch", "wall_time_s",
                              "final_clean_train_acc", "final_gap"}
    # data.root (synthetic data) and train.eval_batch_size (running statistics in eval) do not matter here.
    assert keys == {"optimizer.lr", "model.init_scale", "model.dropout"}
    assert [r["optimizer.lr"] for r in as_json] == [0.003, 0.01]
    assert not (tmp_path / "compare.png").exists()
    rows = list(csv.DictReader(io.StringIO(cli("compare", *runs, "--csv").stdout)))
    assert [r["model.dropout"] for r in rows] == ["0.0", "0.1"] and rows[0]["best_epoch"] == "1"

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "90")  # off a terminal, COLUMNS still decides the width
    narrow = cli("compare", *runs)
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines if not line.startswith("keys:") and not line.endswith(".png")) <= 90
    assert "how the runs differ" in narrow.stdout  # the keys moved to their own table
    header = next(line for line in lines if "test acc" in line or "best" in line)
    assert header.split().count("epochs") <= 1
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_events_read_back_with_tensorboards_own_reader(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    metrics = rundir.read_csv(trained / rundir.METRICS_FILE)
    steps = json.loads((trained / "run.json").read_text())["steps_per_epoch"]
    losses = acc.Scalars("train/loss_step")
    assert [e.step for e in losses] == list(range(steps))  # every step
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([0.003] * steps)
    test_acc = acc.Scalars("epoch/test_acc")
    assert [(e.step, e.value) for e in test_acc] == [(steps - 1, pytest.approx(metrics[0]["test_acc"]))]
    tags = acc.Tags()
    assert {"gamma/conv1", "beta/conv1", "running_mean/fc1", "running_var/fc1"} <= set(tags["histograms"])
    assert "bn_diagnostics/output_std/conv2" in tags["scalars"] and "bn/gamma_mean/conv3" in tags["scalars"]


@pytest.mark.slow
def test_tensorboard_missing_is_a_clear_config_error(tmp_path, cli, monkeypatch):
    import importlib.util

    from bnctl import tblog

    real = importlib.util.find_spec
    monkeypatch.setattr(tblog.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real(name, *a))
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(train={"tensorboard": True}))
    out = cli("train", "--config", cfg, "--runs-root", tmp_path / "runs")
    assert out.exit_code == 2 and "pip install -e '.[tensorboard]'" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------- CLI conventions

@pytest.mark.slow
def test_version_and_debug_after_the_subcommand(cli, tmp_path):
    from importlib import metadata

    out = cli("--version")
    assert out.exit_code == 0 and out.stdout.strip() == f"bnctl {metadata.version('bnctl')}"
    with pytest.raises(ConfigError):  # --debug after the command still means: show the traceback
        cli("train", "--config", tmp_path / "missing.yaml", "--debug")
    assert cli("train", "--config", tmp_path / "missing.yaml").exit_code == 2


def test_help_is_plain_and_offers_completion(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    top = cli("--help").stdout
    assert "--install-completion" in top and "--version" in top
    for command in ("eval", "compare", "train", "runs"):
        text = cli(command, "--help").stdout
        assert "<bool>" not in text and "{" not in text, text
    assert "Usage: bnctl eval [OPTIONS] RUN_DIR_OR_CHECKPOINT..." in cli("eval", "--help").stdout
    for command in ("eval", "compare", "train"):
        assert "...." not in cli(command, "--help").stdout  # a metavar's own "..." is not doubled
    assert "one or more" in cli("compare", "--help").stdout


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, cli, tiny_config):
    import yaml

    out = cli("train", "--config", tiny_config, "optimizer.lr=0.05", "--print-config", "--runs-root", tmp_path / "r")
    assert out.exit_code == 0
    printed = yaml.safe_load(out.stdout)
    assert printed["optimizer"]["lr"] == 0.05 and printed["model"]["bn_momentum"] == 0.1  # defaults filled in
    assert not (tmp_path / "r").exists()


def test_resumed_run_says_its_time_is_this_invocations(run_copy, cli):
    before = json.loads((run_copy / "summary.json").read_text())["wall_time_s"]
    out = cli("train", "--resume", run_copy, "train.epochs=2")
    assert out.exit_code == 0, out.output
    total = json.loads((run_copy / "summary.json").read_text())["wall_time_s"]
    done = next(line for line in out.stdout.splitlines() if line.startswith("done"))
    session = float(re.search(r"wall time ([0-9.]+)s this session", done).group(1))
    assert f"{total:.1f}s over all sessions of this run" in done
    assert session == pytest.approx(total - before, abs=0.06)  # the session's share of the run's one time
    assert "clean train acc" not in out.stdout  # train.eval_train is off


@pytest.mark.slow
def test_a_runs_time_is_one_number_everywhere(tmp_path, cli, monkeypatch):
    from bnctl import engine

    # Loading data and building the model are part of the run's time: a slow setup must show in it.
    real_setup = engine.setup

    def slow_setup(*args, **kwargs):
        time.sleep(0.5)
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(engine, "setup", slow_setup)
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 64, "test_size": 32}, train={"epochs": 1}))
    out = cli("train", "--config", cfg, "--runs-root", tmp_path / "runs")
    assert out.exit_code == 0, out.output
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = summary["wall_time_s"]
    assert wall >= 0.5 + rundir.read_csv(run_dir / "metrics.csv")[0]["epoch_time_s"]
    done = next(line for line in out.stdout.splitlines() if line.startswith("done"))
    assert done.endswith(f"wall time {wall:.1f}s")
    assert json.loads(cli("compare", run_dir, "--json", "--out", tmp_path / "c.png").stdout)[0]["wall_time_s"] == wall
    assert json.loads(cli("runs", run_dir.parent, "--json").stdout)[0]["wall_time_s"] == wall
    monkeypatch.setenv("COLUMNS", "200")
    table = cli("compare", run_dir, "--out", tmp_path / "c.png").stdout
    assert "wall" in table and f"{wall:.1f}" in table
    # Without summary.json there is no recorded time: shown as missing, not replaced by another measure.
    (run_dir / "summary.json").unlink()
    assert json.loads(cli("compare", run_dir, "--json", "--out", tmp_path / "c.png").stdout)[0]["wall_time_s"] is None


@pytest.mark.slow
def test_epoch_table_shows_clean_train_accuracy_when_eval_train_is_on(tmp_path, cli):
    cfg = write_config(tmp_path / "c.yaml", tiny_raw(data={"train_size": 128, "test_size": 64},
                                                      train={"epochs": 1, "eval_train": True}))
    out = cli("train", "--config", cfg, "--runs-root", tmp_path / "runs")
    assert out.exit_code == 0, out.output
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    clean = rundir.read_csv(run_dir / rundir.METRICS_FILE)[0]["clean_train_acc"]
    assert "clean train acc" in out.stdout and f"{clean:.2f}%" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.split()[:1] == ["1"])
    assert row.split()[-1] == f"{clean:.2f}%"  # one line per epoch, even wider than an 80-column log


def test_output_piped_into_a_reader_that_stops_early_is_not_an_internal_error(run_copy):
    import subprocess
    import sys

    # `bnctl runs --json | head -c 10`: the reader is gone before bnctl writes.
    proc = subprocess.Popen([sys.executable, "-m", "bnctl", "runs", str(run_copy.parent), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "internal error" not in err and "Traceback" not in err, err


def test_tables_read_whole_in_80_columns(tmp_path, run_copy, cli, monkeypatch):
    runs = []
    for i in range(8):
        d = run_copy.parent / f"20261130-0959{i:02d}-lr-sweep"
        shutil.copytree(run_copy, d)
        write_config(d / "config.yaml", tiny_raw(optimizer={"lr": 0.001 * (i + 1) + 0.0005},
                                                 model={"name": "seed_cnn", "norm": "batch", "dropout": 0.1 * i},
                                                 data={"train_size": 256, "test_size": 128}, seed=i))
        runs.append(d)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    listed = cli("runs", run_copy.parent).stdout
    assert max(map(len, listed.splitlines())) <= 80
    assert "…" not in listed and all(d.name in listed for d in runs)  # headers and names whole
    compared = cli("compare", *runs).stdout
    assert max(len(line) for line in compared.splitlines() if not line.endswith(".png")) <= 80
    assert "…" not in compared
    for i in range(8):  # each value on one line, never folded into a different-looking number
        assert f"{0.001 * (i + 1) + 0.0005:g}" in compared.split()


def _visible_xticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


@pytest.mark.parametrize("epochs", [1, 2])
def test_short_runs_get_whole_epoch_ticks(tmp_path, monkeypatch, epochs):
    lines = ["epoch,train_loss,train_acc,test_loss,test_acc"] + [f"{e},2.0,30.0,1.9,35.0" for e in range(1, epochs + 1)]
    (tmp_path / "metrics.csv").write_text("\n".join(lines) + "\n")
    figures = _capture_figures(monkeypatch)
    plotting.plot_curves(tmp_path)
    plotting.plot_compare([plotting.load_run(tmp_path)], tmp_path / "c.png")
    assert len(figures) == 2
    for fig in figures:
        for ax in fig.axes:
            assert _visible_xticks(ax) == [float(e) for e in range(1, epochs + 1)], ax.get_title()


def test_runs_on_a_file_says_it_is_not_a_folder(tmp_path, cli):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    out = cli("runs", path)
    assert out.exit_code == 2 and "is a file, not a folder" in out.output and "not found" not in out.output
    assert "runs folder not found" in cli("runs", tmp_path / "nowhere").output


def _run_files(d: Path, rows: list[tuple], clean: bool, **sections) -> Path:
    """A run directory from files alone: metrics.csv (epoch, train/test accuracy, clean train accuracy) and config."""
    d.mkdir()
    cols = "epoch,train_loss,train_acc,test_loss,test_acc" + (",clean_train_loss,clean_train_acc" if clean else "")
    lines = [cols] + [f"{e},1.0,{tr},1.2,{te}" + (f",0.8,{cl}" if clean else "") for e, tr, te, cl in rows]
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    write_config(d / "config.yaml", tiny_raw(**sections))
    return d


def test_compare_shows_the_clean_train_accuracy_and_the_gap(tmp_path, cli, monkeypatch):
    bn = _run_files(tmp_path / "bn_only", [(1, 60.0, 55.0, 58.0), (2, 80.0, 62.0, 79.5)], True,
                    name="bn_only", train={"eval_train": True})
    nobn = _run_files(tmp_path / "neither", [(1, 40.0, 38.0, 41.0), (2, 70.0, 50.0, 72.0)], True,
                      name="neither", model={"norm": "none"}, train={"eval_train": True})
    records = {r["name"]: r for r in json.loads(cli("compare", bn, nobn, "--json").stdout)}
    assert records["bn_only"]["final_clean_train_acc"] == 79.5 and records["bn_only"]["final_gap"] == 17.5
    assert records["neither"]["final_clean_train_acc"] == 72.0 and records["neither"]["final_gap"] == 22.0
    rows = list(csv.DictReader(io.StringIO(cli("compare", bn, nobn, "--csv").stdout)))
    assert [r["final_gap"] for r in rows] == ["17.5", "22.0"]
    monkeypatch.chdir(tmp_path)
    figures = _capture_figures(monkeypatch)
    table = cli("compare", bn, nobn).stdout
    assert "clean" in table and "gap" in table and "minus test" in table
    bn_line = next(line for line in table.splitlines() if line.split()[:1] == ["bn_only"])
    assert "79.50" in bn_line and "17.50" in bn_line
    # The figure draws the eval-mode train curves too, and says which line style they have.
    ax_acc = figures[0].axes[1]
    assert [79.5, 72.0] == sorted([line.get_ydata()[-1] for line in ax_acc.get_lines()
                                   if line.get_linestyle() == "-."], reverse=True)
    assert "dash-dot: train in eval mode" in ax_acc.get_title()
    # Runs without train.eval_train keep the narrower table, and their JSON says null.
    plain = _run_files(tmp_path / "plain", [(1, 60.0, 55.0, None)], False, name="plain")
    out = cli("compare", plain, bn)
    assert json.loads(cli("compare", plain, "--json").stdout)[0]["final_clean_train_acc"] is None
    assert "clean" not in cli("compare", plain).stdout and "clean" in out.stdout
