"""End to end: train -> eval -> plot through the CLI on the synthetic data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_raw, write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run shared by the tests of this module (training is the slow part)."""
    from typer.testing import CliRunner

    from bnctl.cli import app

    tmp = tmp_path_factory.mktemp("core")
    config = write_config(tmp / "tiny.yaml", tiny_raw(data={"train_size": 1536}, train={"epochs": 3}))
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--runs-root", str(tmp / "runs"),
                                      "optimizer.lr=0.002"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dirs = list((tmp / "runs").iterdir())
    assert len(run_dirs) == 1
    return run_dirs[0], result


def test_train_writes_the_run_directory_contract(trained_run):
    run_dir, result = trained_run
    assert run_dir.name.endswith("-tiny") and run_dir.name[:8].isdigit()
    assert str(run_dir) in result.output  # the path is printed for scripts to pick up
    for name in ("config.yaml", "metrics.csv", "summary.json", "run.json", "curves.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    assert_png(run_dir / "curves.png")


def test_resolved_config_includes_overrides_and_defaults(trained_run):
    run_dir, _ = trained_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optimizer"]["lr"] == 0.002  # the override, not the file's 0.003
    assert saved["model"]["bn_momentum"] == 0.1  # defaults are written out, not implied
    info = json.loads((run_dir / "run.json").read_text())
    assert info["device"] == "cpu" and info["seed"] == 0 and "torch" in info["versions"]
    assert info["steps_per_epoch"] == 1536 // 32 and info["git_dirty"] in (True, False, None)


def test_metrics_csv_has_one_row_per_epoch(trained_run):
    run_dir, _ = trained_run
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for col in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s"):
        assert col in rows[0]
    accs = [float(r["test_acc"]) for r in rows]
    assert all(0 <= a <= 100 for a in accs)  # percentages, as in the notebook
    assert float(rows[0]["lr"]) == pytest.approx(0.002)
    # 1536 images at batch 32: 48 full batches, so images/s is positive and finite
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    # It learns: loss falls and the final model is well above chance (10%).
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert max(accs) > 40


def test_summary_reports_status_best_and_final(trained_run):
    run_dir, _ = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    best_row = max(rows, key=lambda r: float(r["test_acc"]))
    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 3
    assert summary["best"]["test_acc"] == float(best_row["test_acc"])
    assert summary["best"]["epoch"] == int(best_row["epoch"])
    assert summary["final"]["test_acc"] == float(rows[-1]["test_acc"])
    assert summary["num_parameters"] == 73_866
    assert summary["wall_time_s"] > 0 and "torch" in summary["versions"]


def test_eval_reproduces_best_accuracy_exactly(trained_run, cli):
    run_dir, _ = trained_run
    summary = json.loads((run_dir / "summary.json").read_text())
    result = cli("eval", run_dir / "checkpoints" / "best.pt", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["acc"] == summary["best"]["test_acc"]
    assert out["loss"] == pytest.approx(summary["best"]["test_loss"], rel=1e-9)
    assert out["bn_mode"] == "running" and out["images"] == 256
    assert sum(map(sum, out["confusion"])) == 256
    assert set(out["per_class_acc"]) == {"disk", "square", "triangle", "ring", "plus", "cross", "diamond",
                                         "hbar", "vbar", "pair"}
    assert json.loads((run_dir / "eval" / "running.json").read_text())["acc"] == out["acc"]
    assert_png(run_dir / "eval" / "running.png")


def test_eval_prints_a_per_class_table(trained_run, cli):
    run_dir, _ = trained_run
    result = cli("eval", run_dir / "checkpoints" / "last.pt")
    assert result.exit_code == 0, result.output
    assert "triangle" in result.output and "accuracy" in result.output


def test_plot_redraws_curves_from_metrics_alone(trained_run, cli, tmp_path):
    run_dir, _ = trained_run
    # A copy holding only metrics.csv: plotting must not need the checkpoint or config.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.csv").write_bytes((run_dir / "metrics.csv").read_bytes())
    result = cli("plot", bare)
    assert result.exit_code == 0, result.output
    assert_png(bare / "curves.png")


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "bnctl", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("train", "eval", "plot", "compare"):
        assert command in out.stdout


def test_seed_config_fails_offline_with_one_clear_line(cli, tmp_path):
    seed = Path(__file__).resolve().parents[1] / "bnctl" / "configs" / "seed.yaml"
    result = cli("train", "--config", seed, f"data.root={tmp_path / 'nodata'}", "--runs-root", tmp_path / "runs")
    assert result.exit_code != 0
    assert "CIFAR-10 not found" in result.output and "data.download=true" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_dir_option_names_the_directory(cli, tiny_config, tmp_path):
    target = tmp_path / "exact"
    result = cli("train", "--config", tiny_config, "--run-dir", target, "train.epochs=1", "data.train_size=64",
                 "data.test_size=32")
    assert result.exit_code == 0, result.output
    assert (target / "metrics.csv").is_file() and (target / "checkpoints" / "last.pt").is_file()
