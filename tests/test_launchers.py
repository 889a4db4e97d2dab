"""`bnctl sweep --launcher slurm`: the job array submitit builds, run here by submitit's local executor,
and the sbatch script it writes, submitted to a stand-in sbatch (no cluster needed)."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnctl import launchers, sweep
from bnctl.cli import app
from bnctl.errors import InterruptedRun
from conftest import tiny_raw, write_config

pytestmark = pytest.mark.slow  # job arrays of worker processes

TIMING = {"wall_time_s"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def results(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / sweep.RESULTS_FILE, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sweep_file(tmp_path: Path) -> Path:
    base = write_config(tmp_path / "base.yaml", tiny_raw(data={"train_size": 64, "test_size": 32},
                                                         train={"epochs": 1, "batch_size": 32}))
    return write_config(tmp_path / "s.yaml", {
        "name": "arr", "base": str(base), "grid": {"optimizer.lr": [0.001, 0.003]}, "seeds": 2,
        "slurm": {"partition": "gpu", "time_min": 30, "setup": ["module load cuda", "echo ready"]}})


def test_job_array_runs_every_shard_and_equals_a_local_sweep(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setattr(launchers, "CLUSTER", "local")  # submitit's local executor: the same array, run here
    # The tasks (OMP_NUM_THREADS) and the local sweep (in this process) train on one thread each.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = invoke("sweep", "--sweep", sweep_file, "--sweep-dir", tmp_path / "local")
    finally:
        torch.set_num_threads(before)
    assert local.exit_code == 0, local.output
    arr = invoke("sweep", "--sweep", sweep_file, "--sweep-dir", tmp_path / "arr", "--launcher", "slurm",
                 "--tasks", "2", "--parallelism", "2", "--wait")
    assert arr.exit_code == 0, arr.output
    assert "2 task(s) ended: 4 completed" in arr.output
    rows, ref = results(tmp_path / "arr"), results(tmp_path / "local")
    assert [r["status"] for r in rows] == ["completed"] * 4
    drop = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert drop(rows) == drop(ref)
    # Task i ran shard i/2: runs 0 and 2 in one task's log, 1 and 3 in the other's.
    logs = sorted((tmp_path / "arr" / launchers.LOGS_DIR).rglob("*_log.out"))
    assert len(logs) == 2


def test_a_packed_job_array_gives_each_task_one_pack(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setattr(launchers, "CLUSTER", "local")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    arr = invoke("sweep", "--sweep", sweep_file, "--sweep-dir", tmp_path / "arr", "--launcher", "slurm",
                 "--pack", "2", "--parallelism", "2", "--wait")
    assert arr.exit_code == 0, arr.output
    assert "2 task(s) ended: 4 completed" in arr.output  # 2 cells x 2 seeds: one task per pack, not per run
    for run in sorted((tmp_path / "arr" / sweep.RUNS_DIR).iterdir()):
        packed = json.loads((run / "run.json").read_text())["packed"]
        assert packed["members"] == 2 and run.name in packed["runs"], packed
    again = invoke("sweep", "--resume", tmp_path / "arr", "--launcher", "slurm", "--pack", "3")
    assert again.exit_code == 2 and "packs by 2 (its sweep.yaml)" in " ".join(again.output.split())


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _stand_in_slurm(tmp_path: Path, monkeypatch, job_id: int) -> Path:
    """srun and sbatch stand-ins on PATH; sbatch keeps a copy of the script it is given (returned) and
    answers with job_id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    copy = tmp_path / "submitted.sh"
    _stand_in(bin_dir, "srun", "exit 0\n")
    _stand_in(bin_dir, "sbatch", f'cp "$1" {copy}\necho "Submitted batch job {job_id}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return copy


def test_the_sbatch_script_carries_the_settings_of_the_sweep_file_and_the_options(sweep_file, tmp_path, monkeypatch):
    copy = _stand_in_slurm(tmp_path, monkeypatch, 4242)
    result = invoke("sweep", "--sweep", sweep_file, "--sweep-dir", tmp_path / "arr", "--launcher", "slurm",
                    "--time", "45", "--gpus-per-run", "1", "--cpus-per-run", "4", "--parallelism", "3",
                    "--mem-gb", "8")
    assert result.exit_code == 0, result.output
    assert "submitted Slurm job array 4242 (4 task(s))" in result.output
    assert "bnctl sweep --resume" in result.output
    script = copy.read_text()
    for line in ["#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --time=45", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --mem=8GB", "#SBATCH --job-name=bnctl-arr",
                 "#SBATCH --signal=USR2@90", "module load cuda", "echo ready"]:
        assert line in script, line
    # Each of the 4 tasks gets one run: shard i/4.
    assert not list((tmp_path / "arr" / "runs").iterdir())  # nothing ran here


def test_a_resumed_sweep_is_submitted_with_its_sweep_files_slurm_section(sweep_file, tmp_path, monkeypatch):
    copy = _stand_in_slurm(tmp_path, monkeypatch, 4243)
    first = invoke("sweep", "--sweep", sweep_file, "--sweep-dir", tmp_path / "arr", "--launcher", "slurm")
    assert first.exit_code == 0, first.output
    copy.unlink()
    again = invoke("sweep", "--resume", tmp_path / "arr", "--launcher", "slurm", "--time", "20")
    assert again.exit_code == 0, again.output
    script = copy.read_text()
    # The sweep file's section (partition, setup lines), with the option given now on top of it.
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=20", "module load cuda", "echo ready"]:
        assert line in script, line
    assert "#SBATCH --time=30" not in script


def test_slurm_settings_are_validated_before_anything_is_created(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setattr(launchers, "CLUSTER", "local")
    result = CliRunner().invoke(app, ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "x"),
                                      "--launcher", "slurm", "--time", "0"])
    assert result.exit_code == 2 and "slurm.time_min" in result.output
    result = CliRunner().invoke(app, ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "x"),
                                      "--launcher", "slurm", "--jobs", "2"])
    assert result.exit_code == 2 and "--jobs is for --launcher local" in result.output
    result = CliRunner().invoke(app, ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "x"),
                                      "--launcher", "pbs"])
    assert result.exit_code == 2 and "unknown launcher 'pbs'; choose one of: local, slurm" in result.output
    assert not (tmp_path / "x").exists()


def test_missing_submitit_is_a_clear_message(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    result = CliRunner().invoke(app, ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "x"),
                                      "--launcher", "slurm"])
    assert result.exit_code == 2
    assert "pip install -e '.[slurm]'" in result.output
    assert not (tmp_path / "x").exists()


def test_no_slurm_here_is_a_clear_message_before_anything_is_created(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun, no sbatch
    result = CliRunner().invoke(app, ["sweep", "--sweep", str(sweep_file), "--sweep-dir", str(tmp_path / "x"),
                                      "--launcher", "slurm"])
    assert result.exit_code == 2 and "no Slurm here (srun is not on PATH)" in result.output
    assert not (tmp_path / "x").exists()


def test_a_shard_is_submitted_as_one_task_per_run_of_that_shard():
    runs = list(range(11))
    tasks = launchers.task_shards(len(runs), (1, 3), None)
    assert [runs[a::b] for a, b in tasks] == [[1], [4], [7], [10]]  # shard 1/3 = runs 1, 4, 7, 10
    assert [runs[a::b] for a, b in launchers.task_shards(11, None, 3)] == [runs[0::3], runs[1::3], runs[2::3]]
    assert len(launchers.task_shards(11, None, None)) == 11 and len(launchers.task_shards(2, None, 5)) == 2
    params = launchers.executor_parameters(launchers.SlurmConfig(gpus_per_run=2, mem_gb=4), "s")
    assert params["gpus_per_node"] == 2 and params["mem_gb"] == 4 and "slurm_partition" not in params


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_task_stopped_by_slurm_leaves_its_run_resumable_and_requeues_only_on_sigusr2(sweep_file, tmp_path,
                                                                                        monkeypatch, signum):
    from bnctl import engine, plan as plan_mod

    plan = plan_mod.plan_from_file(sweep_file, ["train.epochs=3"])
    sweep_dir = sweep.create(plan, tmp_path / "sweeps")
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: requeued.append(s))  # stands in for submitit's handler
    real = engine.train_one_epoch

    def signalled_in_epoch_2(*args, **kwargs):
        if args[5] == 2:
            os.kill(os.getpid(), signum)  # what Slurm sends near the time limit (USR2) or on scancel (TERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_one_epoch", signalled_in_epoch_2)
    try:
        with pytest.raises(InterruptedRun):
            launchers.ShardTask(str(sweep_dir))(0, 4)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert requeued == ([signal.SIGUSR2] if signum == signal.SIGUSR2 else [])
    first = plan.runs[0].name
    summary = json.loads((sweep_dir / "runs" / first / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1
    monkeypatch.setattr(engine, "train_one_epoch", real)
    # What the requeued task does: the same shard, which resumes the run from its checkpoint.
    assert launchers.ShardTask(str(sweep_dir))(0, 4)["completed"] == [first]
    assert json.loads((sweep_dir / "runs" / first / "summary.json").read_text())["epochs_completed"] == 3
