"""The GPU-ready step on the CPU: lagged loss reads, an epoch's randomness drawn up front, backend settings,
and bench/gpu_check.py's CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnctl import config as config_mod, engine, rundir
from bnctl.data import Batches, crop_flip
from bnctl.errors import DivergedError
from bnctl.experiment import setup

from conftest import tiny_raw

REPO = Path(__file__).resolve().parents[1]


def _exp(**sections):
    return setup(config_mod.validate(tiny_raw(**sections), "test"))


class _Progress:
    def __init__(self):
        self.updates = []

    def epoch_start(self, epoch, steps): ...
    def step(self, done, loss): self.updates.append((done, loss))
    def epoch_end(self, row): ...


def test_lagged_reads_give_the_same_epoch_and_report_one_update_late():
    """The GPU's way of reading the loss (LaggedRead), forced on the CPU: identical weights and metrics."""
    results, states, progress = [], [], []
    for lagged in (False, True):
        # 22 steps: reads at 10 and 20. A quarter-width net in batches of 8: the reads, not the arithmetic, are tested.
        exp = _exp(data={"train_size": 176}, model={"width": 0.25}, train={"batch_size": 8})
        reporter = _Progress()
        results.append(engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler,
                                              exp.precision, 1, reporter, lagged=lagged))
        states.append(exp.model.state_dict())
        progress.append(reporter.updates)
    assert results[0] == results[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    plain, lagged = dict(progress[0]), progress[1]
    assert len(plain) == 22  # every step on the CPU (22 // 50 -> every step)
    # Lagged: pushed at steps 10 and 20, each value read at the next push, so only step 10's arrives.
    assert [step for step, _ in lagged] == [10]
    assert lagged[0][1] == pytest.approx(plain[10], rel=1e-12)


def test_a_lagged_read_stops_a_diverged_epoch_at_the_step_it_saw():
    exp = _exp(data={"train_size": 256}, model={"width": 0.25}, train={"batch_size": 8},  # 32 steps
               optimizer={"name": "sgd", "lr": 1e6})
    with pytest.raises(DivergedError) as err:
        engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 1,
                               lagged=True)
    assert err.value.step in (10, 20)  # a read point, one push after the loss stopped being finite
    assert "running loss became" in str(err.value)


def test_an_epoch_plan_draws_what_the_batches_drew_one_by_one():
    """The permutation and every batch's crop/flip, drawn up front, equal the old per-batch draws."""
    x = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(70)
    got = list(Batches(x, y, 16, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3, shuffle=True,
                       augment="crop_flip", generator=torch.Generator().manual_seed(4), channels_last=False))
    g = torch.Generator().manual_seed(4)  # the draws as the loader made them before: per batch, in order
    order = torch.randperm(70, generator=g)
    for i, (xb, yb) in enumerate(got):
        idx = order[i * 16:(i + 1) * 16 if i < 4 else 70]
        want = crop_flip(x[idx], g).float() / 127.5 - 1.0
        assert torch.equal(yb, y[idx]) and torch.allclose(xb, want, atol=1e-6)


@pytest.mark.slow  # trains a whole run
def test_cuda_settings_are_recorded_and_the_cpu_records_that_they_do_not_apply(tmp_path):
    cfg = config_mod.validate(tiny_raw(data={"train_size": 64, "test_size": 32},
                                       train={"epochs": 1, "cudnn_benchmark": True, "tf32": True}), "test")
    result = engine.fit(cfg, runs_root=tmp_path)
    info = rundir.read_json(result.run_dir / "run.json")
    assert info["cudnn_benchmark"] is None and info["tf32"] is None  # CPU: neither applies
    assert isinstance(info["threads"], int) and info["threads_reason"] == "torch's default"  # batch 32


@pytest.mark.slow  # subprocesses training whole runs (about a minute of CPU time)
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu_check.sh's CPU mode: every part but the compiled run (minutes of C++ compiling on 2 cores)."""
    out = tmp_path / "gc.json"
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--allow-cpu", "--tiny", "--skip", "compile",
                           "--skip", "precisions", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHON": sys.executable},
                          timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    rows = {r["check"]: r for r in report["rows"]}
    assert rows["train"]["ok"] and rows["train"]["details"]["rows"][-1]["test_acc"] >= 13.0  # chance: 10%
    assert rows["devices"]["details"]["max_abs_weight_diff"] == 0.0  # cpu against cpu: the same numbers
    per_step = rows["syncs"]["details"]["per_step"]
    assert sum(per_step) > 0 and per_step.count(0) >= len(per_step) - 4  # reads only at the read points
    assert rows["compile"]["ok"] is None and "| c | syncs |" in done.stdout
    arms = rows["pack"]["details"]["arms"]  # packed seeds against the same runs one by one, at two batch sizes
    assert rows["pack"]["ok"] and {(a["batch"], a["pack"]) for a in arms} == {(4, 1), (4, 4), (32, 1), (32, 4)}
    assert all(a["completed"] == 4 for a in arms)


def test_the_thread_choice_follows_free_cores_and_the_users_setting(monkeypatch):
    from bnctl.experiment import choose_threads

    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for load, want in [(0.0, 4), (1.2, 3), (1.3, 2), (3.5, 1), (9.0, 1)]:
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            threads, why = choose_threads(cpu, 4)
            assert threads == want and f"load {load:.2f}" in why
        assert choose_threads(cpu, 16) == (4, "torch's default")  # large batches: torch's count, as before
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert choose_threads(cpu, 4) == (4, "OMP_NUM_THREADS")  # the user's choice wins
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # trains and resumes a run
def test_a_resumed_run_keeps_the_thread_count_it_started_with(tmp_path, monkeypatch):
    """The count changes float sums' order, so a resume on a now idle machine must not take more threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # busy at the start: one thread
        raw = tiny_raw(data={"train_size": 64, "test_size": 64}, train={"batch_size": 4, "epochs": 1})
        first = engine.fit(config_mod.validate(raw, "test"), runs_root=tmp_path)
        info = rundir.read_json(first.run_dir / "run.json")
        assert info["threads"] == 1 and "0 of 2 cores free" in info["threads_reason"]
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle at the resume: would choose 2
        raw["train"]["epochs"] = 2
        engine.fit(config_mod.validate(raw, "test"), runs_root=tmp_path, resume=first.run_dir)
        resumed = rundir.read_json(first.run_dir / "run.json")["resumes"][-1]
        assert resumed["threads"] == 1 and resumed["threads_reason"].startswith("kept")
    finally:
        torch.set_num_threads(before)
