"""Faults a cluster brings: SIGTERM before a kill, and torchrun restarting a worker group that lost a worker.

The signal and torchrun tests run bnctl in subprocesses (each bounded by a timeout); the reference
runs they are compared with run in-process. One torch thread everywhere keeps them bit-identical.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnctl import checkpoint, elastic, engine, rundir, sweep, workers
from bnctl.cli import app
from bnctl.clikit import TEST_KILL_ENV, sigkill_test_hook
from bnctl.config import load
from bnctl.errors import ConfigError
from conftest import finish, tiny_raw, write_config

REPO = Path(__file__).resolve().parents[1]
TIMING = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"}
EPOCHS = 6
# Augmentation, dropout and a cosine schedule: every RNG stream and the lr schedule must survive a stop.
RAW = tiny_raw(data={"train_size": 128, "test_size": 64, "augment": "crop_flip"}, model={"dropout": 0.2},
               scheduler={"name": "cosine"}, train={"epochs": EPOCHS})
# The subprocesses import this checkout's bnctl, with one thread like the in-process reference.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
for _name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", TEST_KILL_ENV):
    ENV.pop(_name, None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # processes, signals, restarts


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def values(path: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the timing columns, as written (text, so the comparison is exact)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def status(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = (torch.load(p / "checkpoints" / "last.pt", weights_only=True)["model"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def start(cmd: list[str], **env: str) -> subprocess.Popen:
    # A session of its own, so that a timeout can end torchrun and its workers together.
    return subprocess.Popen(cmd, text=True, env={**ENV, **env}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def wait_for_rows(metrics: Path, count: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll until metrics.csv holds `count` complete rows; return how many it holds then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and (n := metrics.read_text().count("\n") - 1) >= count:
            return n
        if proc.poll() is not None:
            raise AssertionError(f"bnctl exited early with {proc.returncode}: {proc.communicate()}")
        time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {count} rows in {metrics} after {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The config, and the uninterrupted run every stopped-and-continued run must equal."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = write_config(tmp / "c.yaml", RAW)
    result = invoke("train", "-c", cfg, "--run-dir", tmp / "ref")
    assert result.exit_code == 0, result.output
    assert len(values(tmp / "ref" / "metrics.csv")) == EPOCHS
    return cfg, tmp / "ref"


# ------------------------------------------------------------------ SIGTERM

def test_sigterm_stops_like_ctrl_c_and_the_resume_equals_an_uninterrupted_run(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    proc = start([sys.executable, "-m", "bnctl", "train", "-c", str(cfg), "--run-dir", str(run)])
    seen = wait_for_rows(run / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 143, err
    assert "Traceback" not in out + err
    assert "stopped (SIGTERM): interrupted in epoch" in err and f"bnctl train --resume {run}" in err
    summary = status(run)
    kept = summary["epochs_completed"]
    assert summary["status"] == "interrupted" and kept in (seen, seen + 1) and kept < EPOCHS
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == kept
    assert values(run / "metrics.csv") == values(ref / "metrics.csv")[:kept]

    resumed = invoke("train", "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    assert values(run / "metrics.csv") == values(ref / "metrics.csv")
    assert same_weights(run, ref)
    assert status(run)["status"] == "completed"


def test_sigterm_under_torchrun_reaches_the_worker_which_records_the_stop(reference, tmp_path):
    cfg, _ = reference
    run = tmp_path / "run"
    # torchrun answers SIGTERM by sending SIGTERM to every worker, then SIGKILL after a grace period.
    proc = start([*TORCHRUN, "-m", "bnctl", "train", "-c", str(cfg), "--run-dir", str(run), "train.epochs=40"])
    wait_for_rows(run / "metrics.csv", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode != 0  # torchrun itself reports the signal as a failure
    assert "stopped (SIGTERM): interrupted in epoch" in err
    summary = status(run)
    kept = summary["epochs_completed"]
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM" and 2 <= kept < 40
    assert len(values(run / "metrics.csv")) == kept
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == kept


def test_sigterm_handler_is_only_installed_while_training(reference, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    cfg, _ = reference
    assert invoke("train", "-c", cfg, "--run-dir", tmp_path / "r", "train.epochs=1").exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("to", ["sweep", "group"])
def test_sigterm_stops_a_jobs_2_sweep_and_its_workers_leaving_runs_resumable(reference, tmp_path, to):
    # "sweep": `kill PID` of the sweep process alone; "group": Slurm's scancel or time limit, every process of the job.
    cfg, _ = reference
    d = tmp_path / "sw"
    proc = start([sys.executable, "-m", "bnctl", "sweep", "-c", str(cfg), "model.norm=batch,none", "train.epochs=40",
                  "data.train_size=512", "--seeds", "1", "--jobs", "2", "--sweep-dir", str(d)])
    # 2 runs long enough to outlast the sweep's 3 s grace before it interrupts workers that stay silent
    deadline = time.monotonic() + 120
    while not any(m.is_file() and m.read_text().count("\n") >= 2 for m in d.glob("runs/*/metrics.csv")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM) if to == "group" else proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert proc.returncode == 143 and "stopped (SIGTERM): sweep interrupted" in err, out + err
    rows = {r["run"]: r["status"] for r in sweep.load(d)[1]}
    # (a run that a stop catches while it finishes may still read "running": a resume completes it)
    assert "failed" not in rows.values() and "interrupted" in rows.values(), rows
    for name in rows:  # no worker is left training: every claim is free
        with workers.claim(d, name) as held:
            assert held
    resumed = invoke("sweep", "--resume", d)
    assert resumed.exit_code == 0, resumed.output
    assert {r["status"] for r in sweep.load(d)[1]} == {"completed"}


# ------------------------------------------------------------------ torchrun restarts

def test_torchrun_restart_after_a_sigkill_continues_the_run_to_the_uninterrupted_result(reference, tmp_path):
    cfg, ref = reference
    run = tmp_path / "run"
    proc = start([*TORCHRUN, "--max-restarts=1", "-m", "bnctl", "train", "-c", str(cfg), "--run-dir", str(run)],
                 **{TEST_KILL_ENV: "2"})
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert "exitcode: -9" in err  # the first worker did die
    assert "(torchrun restart 1)" in out
    assert values(run / "metrics.csv") == values(ref / "metrics.csv")
    assert same_weights(run, ref)
    assert status(run)["status"] == "completed"
    info = json.loads((run / "run.json").read_text())
    assert info["torchelastic_restart"] == 0
    assert [(r["from_epoch"], r["torchelastic_restart"]) for r in info["resumes"]] == [(2, 1)]
    assert info["resumes"][0][elastic.RUN_ID_KEY] == info[elastic.RUN_ID_KEY]


def test_a_group_restarted_before_its_first_checkpoint_begins_again_in_the_same_folder(reference, tmp_path,
                                                                                      monkeypatch):
    cfg_path, ref = reference
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").mkdir()
    # What the first attempt left when it died in epoch 1: provenance, a header, a half-written temp file.
    rundir.write_json(run / "run.json", {elastic.RUN_ID_KEY: "job-7", "torchelastic_restart": 0})
    (run / "metrics.csv").write_text("epoch,train_loss\n")
    (run / ".summary.json.abc.tmp").write_text("{")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = engine.fit(load(cfg_path), run_dir=run)
    assert result.run_dir == run and result.summary["status"] == "completed"
    assert values(run / "metrics.csv") == values(ref / "metrics.csv")
    assert not list(run.glob(".*.tmp"))
    info = json.loads((run / "run.json").read_text())
    assert info[elastic.RUN_ID_KEY] == "job-7" and info["torchelastic_restart"] == 1 and "resumes" not in info


# ------------------------------------------------------------------ finding the run to continue

def _run_with_id(path: Path, run_id: str | None) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    rundir.write_json(path / "run.json", {} if run_id is None else {elastic.RUN_ID_KEY: run_id})
    return path


def test_attempt_reads_torchruns_environment():
    assert elastic.attempt({}) is None
    assert elastic.attempt({"TORCHELASTIC_RUN_ID": "j", "TORCHELASTIC_RESTART_COUNT": "2"}) == elastic.Attempt("j", 2)
    assert elastic.attempt({"TORCHELASTIC_RUN_ID": "j"}) == elastic.Attempt("j", 0)


def test_restart_target_continues_only_this_jobs_run(tmp_path):
    root = tmp_path / "runs"
    _run_with_id(root / "20261130-080000-tiny", "job-1")
    newest = _run_with_id(root / "20261130-090000-tiny", "job-1")
    _run_with_id(root / "20261130-100000-tiny", "job-2")
    _run_with_id(root / "20261130-110000-other", "job-1")
    restart = elastic.Attempt("job-1", 1)
    assert elastic.restart_target(restart, root, "tiny", None) == newest
    assert elastic.restart_target(elastic.Attempt("job-1", 0), root, "tiny", None) is None  # first attempt: new run
    assert elastic.restart_target(None, root, "tiny", None) is None  # not under torchrun
    assert elastic.restart_target(elastic.Attempt("job-3", 1), root, "tiny", None) is None  # died before creating one
    assert elastic.restart_target(restart, tmp_path / "nowhere", "tiny", None) is None


def test_restart_target_skips_an_earlier_run_of_the_same_job_with_another_config(tmp_path):
    # One Slurm job (--rdzv-id=$SLURM_JOB_ID) trains seed 0, then seed 1; seed 1's first attempt dies
    # before it records its run: its restart must start seed 1, not continue seed 0's run.
    root = tmp_path / "runs"
    earlier = _run_with_id(root / "20261130-080000-tiny", "job-1")
    (earlier / "config.yaml").write_text("seed: 0\n")
    restart = elastic.Attempt("job-1", 1)
    assert elastic.restart_target(restart, root, "tiny", None, "seed: 1\n") is None
    assert elastic.restart_target(restart, root, "tiny", None, "seed: 0\n") == earlier


def test_a_restart_of_the_next_run_of_a_job_does_not_continue_the_previous_run(reference, tmp_path, monkeypatch):
    cfg, _ = reference
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert invoke("train", "-c", cfg, "--runs-root", tmp_path, "train.epochs=1", "seed=0").exit_code == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the next run's first attempt died before run.json
    result = invoke("train", "-c", cfg, "--runs-root", tmp_path, "train.epochs=1", "seed=1")
    assert result.exit_code == 0, result.output
    assert sorted(load(d / "config.yaml").seed for d in tmp_path.iterdir()) == [0, 1]


def test_restart_target_with_run_dir_refuses_someone_elses_run(tmp_path):
    restart = elastic.Attempt("job-1", 1)
    mine = _run_with_id(tmp_path / "mine", "job-1")
    assert elastic.restart_target(restart, tmp_path, "tiny", mine) == mine
    assert elastic.restart_target(restart, tmp_path, "tiny", tmp_path / "absent") is None
    barely = tmp_path / "barely"
    (barely / "checkpoints").mkdir(parents=True)  # created, then the worker died before writing run.json
    assert elastic.restart_target(restart, tmp_path, "tiny", barely) == barely
    for other in (_run_with_id(tmp_path / "theirs", "job-2"), _run_with_id(tmp_path / "plain", None)):
        with pytest.raises(ConfigError, match="was not started by this torchrun job"):
            elastic.restart_target(restart, tmp_path, "tiny", other)


def test_the_sigkill_test_hook_does_nothing_unless_asked(monkeypatch):
    monkeypatch.delenv(TEST_KILL_ENV, raising=False)
    sigkill_test_hook(1)  # unset: returns
    monkeypatch.setenv(TEST_KILL_ENV, "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    sigkill_test_hook(1)  # a restarted attempt: returns
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    sigkill_test_hook(2)  # another epoch: returns
    monkeypatch.setenv(TEST_KILL_ENV, "1:1")
    monkeypatch.setenv("RANK", "0")
    sigkill_test_hook(1)  # another rank: returns (we are still alive to assert)


# ------------------------------------------------------------------ two processes (gloo)

TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_sigterm_to_one_rank_stops_both_ranks_at_the_same_step(reference, tmp_path):
    cfg, _ = reference
    run = tmp_path / "run"
    proc = start([*TORCHRUN2, "-m", "bnctl", "train", "-c", str(cfg), "--run-dir", str(run), "train.epochs=40"])
    wait_for_rows(run / "metrics.csv", 2, proc)
    rank0 = int((run / ".lock").read_text())  # the lock holds the writing process's pid
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    (rank1,) = [p for p in workers if p != rank0]
    os.kill(rank1, signal.SIGTERM)  # rank 0 gets no signal: it learns of the stop in the step's all-reduce
    out, err = finish(proc)
    assert "stopped (SIGTERM): interrupted in epoch" in err
    assert "internal error" not in err and "Connection closed" not in err  # neither rank was left in a collective
    assert "exitcode: 143" in err  # torchrun's report of the workers' exit codes
    summary = status(run)
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM"
    kept = summary["epochs_completed"]
    assert 2 <= kept < 40 and len(values(run / "metrics.csv")) == kept
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == kept


def test_torchrun_restart_of_two_ranks_finds_its_run_and_equals_an_uninterrupted_two_rank_run(reference, tmp_path):
    cfg, _ = reference
    ref = start([*TORCHRUN2, "-m", "bnctl", "train", "-c", str(cfg), "--run-dir", str(tmp_path / "ref")])
    finish(ref)
    assert ref.returncode == 0
    # No --run-dir: the restarted group finds the run by the torchrun run id its run.json records.
    proc = start([*TORCHRUN2, "--max-restarts=1", "-m", "bnctl", "train", "-c", str(cfg), "--runs-root",
                  str(tmp_path / "runs")], **{TEST_KILL_ENV: "2"})
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert "exitcode: -9" in err and "(torchrun restart 1)" in out
    (run,) = (tmp_path / "runs").iterdir()  # continued, not started again in a second folder
    assert values(run / "metrics.csv") == values(tmp_path / "ref" / "metrics.csv")
    assert same_weights(run, tmp_path / "ref")
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and [r["from_epoch"] for r in info["resumes"]] == [2]


def test_stop_requests_are_agreed_with_sigterm_first():
    from bnctl import stopping

    stopping.clear()
    assert stopping.flags() == [0.0, 0.0] and stopping.reason(stopping.flags()) is None
    stopping.request("SIGINT")
    assert stopping.reason(stopping.flags()) == "SIGINT"
    assert stopping.reason([1.0, 1.0]) == "SIGTERM"  # one rank got Ctrl-C, another SIGTERM: the scheduler's wins
    with pytest.raises(ValueError):
        stopping.request("SIGHUP")
    stopping.clear()


def test_a_stop_request_ends_an_in_process_run_at_the_next_step(reference, tmp_path, monkeypatch):
    from bnctl import stopping

    cfg_path, ref = reference
    real = engine.train_one_epoch

    def asks_to_stop_in_epoch_3(*args, **kwargs):
        if args[5] == 3:  # epoch
            stopping.request("SIGTERM")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine, "train_one_epoch", asks_to_stop_in_epoch_3)
    try:
        with pytest.raises(engine.InterruptedRun) as stopped:
            engine.fit(load(cfg_path), run_dir=tmp_path / "run")
    finally:
        stopping.clear()
    assert stopped.value.signal == "SIGTERM" and stopped.value.exit_code == 143
    summary = status(tmp_path / "run")
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 2
    assert summary["stopped_by"] == "SIGTERM" and summary["interrupted_in_epoch"] == 3
    assert values(tmp_path / "run" / "metrics.csv") == values(ref / "metrics.csv")[:2]
