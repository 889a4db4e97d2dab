"""bnctl sweep: plans, validation, shards, execution, failures, resume, claims, worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bnctl import rundir, sweep, workers
from bnctl.errors import ConfigError, InterruptedRun
from conftest import write_config

# Each run trains a few steps: 64 images in batches of 8 (one CPU thread below batch 16), a quarter-width CNN.
SMALL = {
    "name": "small", "device": "cpu",
    "data": {"name": "synthetic", "train_size": 64, "test_size": 32},
    "model": {"name": "seed_cnn", "norm": "batch", "width": 0.25},
    "optimizer": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 32},
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small(tmp_path: Path) -> Path:
    return write_config(tmp_path / "small.yaml", SMALL)


def _mtimes(sweep_dir: Path, names) -> dict[str, int]:
    return {n: (sweep_dir / "runs" / n / "summary.json").stat().st_mtime_ns for n in names}


def _statuses(sweep_dir: Path) -> dict[str, str]:
    return {r["run"]: r["status"] for r in sweep.load(sweep_dir)[1]}


# ------------------------------------------------------------------ plans

def test_split_values_keeps_brackets_and_quotes_together():
    assert sweep.split_values("a,b") == ["a", "b"]
    assert sweep.split_values("[0.4,0.4,0.4],[0.5,0.5,0.5]") == ["[0.4,0.4,0.4]", "[0.5,0.5,0.5]"]
    assert sweep.split_values("'x,y',z") == ["'x,y'", "z"]
    assert sweep.split_values("[0.5,0.5,0.5]") == ["[0.5,0.5,0.5]"]
    with pytest.raises(ConfigError, match="unbalanced"):
        sweep.split_values("[1,2")


def test_inline_plan_expands_grid_in_order_with_seeds_innermost(small: Path):
    plan = sweep.plan_inline(small, ["model.norm=batch,none", "optimizer.lr=1e-3,0.01,0.1", "train.epochs=3"],
                             seeds=2)
    assert plan.grid == {"model.norm": ["batch", "none"], "optimizer.lr": [0.001, 0.01, 0.1]}
    assert plan.fixed == {"train.epochs": 3}
    assert plan.config["train"]["epochs"] == 3 and "seed" not in plan.config
    assert len(plan.runs) == 12 and len(plan.cells) == 6
    assert [r.name for r in plan.runs[:4]] == ["norm-batch_lr-0.001-seed0", "norm-batch_lr-0.001-seed1",
                                              "norm-batch_lr-0.01-seed0", "norm-batch_lr-0.01-seed1"]
    assert plan.runs[-1].overrides == {"model.norm": "none", "optimizer.lr": 0.1} and plan.runs[-1].seed == 1
    cfg = dict(plan.configs())[plan.runs[7]]
    assert (cfg.model.norm, cfg.optimizer.lr, cfg.seed, cfg.train.epochs) == ("none", 0.001, 1, 3)
    assert cfg.name == "norm-none_lr-0.001-seed1"


def test_inline_plan_sweeps_lists_and_takes_explicit_seeds(small: Path):
    plan = sweep.plan_inline(small, ["data.mean=[0.4,0.4,0.4],[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"],
                             seeds="3,7")
    assert plan.grid == {"data.mean": [[0.4, 0.4, 0.4], [0.5, 0.5, 0.5]]}
    assert plan.fixed == {"data.std": [0.25, 0.25, 0.25]}
    assert [r.name for r in plan.runs] == ["mean-0.4-0.4-0.4-seed3", "mean-0.4-0.4-0.4-seed7",
                                          "mean-0.5-0.5-0.5-seed3", "mean-0.5-0.5-0.5-seed7"]
    assert dict(plan.configs())[plan.runs[1]].data.mean == (0.4, 0.4, 0.4)


def test_a_bad_value_in_one_cell_fails_naming_the_cell_before_anything_is_created(small, tmp_path, cli):
    with pytest.raises(ConfigError) as err:
        sweep.plan_inline(small, ["model.norm=batch,none", "optimizer.lr=0.01,-1"], seeds=2)
    assert "norm-batch_lr--1" in str(err.value) and "optimizer.lr" in str(err.value)
    assert "norm-batch_lr-0.01" not in str(err.value)
    root = tmp_path / "sweeps"
    result = cli("sweep", "--config", small, "model.norm=batch,nonsense", "--root", root)
    assert result.exit_code == 2
    assert "norm-nonsense" in result.output and "model.norm" in result.output
    assert not root.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("overrides, message", [
    (["seed=1,2"], "cannot be swept"),
    (["model.norm=batch,batch"], "repeats a value"),
    (["optimizer.lr=0.1,"], "empty value"),
    (["optimizer.lr=0.1", "optimizer.lr=0.2"], "given twice"),
    (["model.nrom=batch,none"], "did you mean 'norm'"),
])
def test_inline_plan_rejects_bad_overrides(small, overrides, message):
    with pytest.raises(ConfigError, match=message):
        sweep.plan_inline(small, overrides, seeds=1)


def test_sweep_file_form_reads_base_next_to_it_and_takes_extra_overrides(tmp_path, small):
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "lr.yaml"
    path.write_text(yaml.safe_dump({"name": "lr_study", "base": "../small.yaml", "fixed": {"train.epochs": 2},
                                    "grid": {"optimizer.lr": [1e-3, 1e-2]}, "seeds": 2}))
    plan = sweep.plan_from_file(path, ["data.train_size=80", "model.norm=batch,none"])
    assert plan.name == "lr_study" and plan.base_config == str(tmp_path / "sweeps" / "../small.yaml")
    assert plan.fixed == {"train.epochs": 2, "data.train_size": 80}
    assert plan.grid == {"optimizer.lr": [0.001, 0.01], "model.norm": ["batch", "none"]}
    assert len(plan.runs) == 8 and plan.config["data"]["train_size"] == 80
    with pytest.raises(ConfigError, match="is swept by"):
        sweep.plan_from_file(path, ["optimizer.lr=0.5"])
    path.write_text(yaml.safe_dump({"base": "../small.yaml", "grid": {"optimizer.lr": 0.1}}))
    with pytest.raises(ConfigError, match="non-empty list"):
        sweep.plan_from_file(path)


def test_a_whole_section_in_fixed_merges_into_the_base_section(tmp_path, small):
    # base: width 0.25, norm batch. A fixed `model: {norm: none}` must change norm only: replacing the
    # section would silently reset width to 1.0 in every run (and its stored config would say so).
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": "small.yaml", "fixed": {"model": {"norm": "none"}},
                                          "grid": {"optimizer.lr": [0.001, 0.01]}}))
    plan = sweep.plan_from_file(sweep_file)
    assert plan.config["model"]["norm"] == "none" and plan.config["model"]["width"] == 0.25
    for _, cfg in plan.configs():
        assert (cfg.model.norm, cfg.model.width, cfg.model.name) == ("none", 0.25, "seed_cnn")
    # The same on the command line, and for a swept section value.
    inline = sweep.plan_inline(small, ["model={norm: none}", "train={epochs: 2},{epochs: 3}"])
    configs = [cfg for _, cfg in inline.configs()]
    assert [(c.model.norm, c.model.width, c.train.epochs, c.train.batch_size) for c in configs] == [
        ("none", 0.25, 2, 8), ("none", 0.25, 3, 8)]


def test_shipped_example_sweep_file_is_valid():
    plan = sweep.plan_from_file(ROOT / "bnctl" / "configs" / "sweeps" / "lr_tolerance.yaml")
    assert len(plan.runs) == len(plan.cells) * len(plan.seeds) > 1


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_packed_sweeps_shards_hold_whole_packs(small, n):
    """A shard (a Slurm array task, --shard I/N) deals out packs, so packing still happens in each."""
    plan = sweep.plan_inline(small, ["model.norm=batch,none,group"], seeds=5)
    plan.pack = 2
    units = plan.units()
    assert [[r.seed for r in u] for u in units] == [[0, 1], [2, 3], [4]] * 3  # each cell's seeds, in twos
    assert all(len({r.cell for r in u}) == 1 for u in units)
    shards = [plan.shard((i, n)) for i in range(n)]
    names = [r.name for s in shards for r in s]
    assert sorted(names) == sorted(r.name for r in plan.runs) and len(names) == len(set(names))
    home = {r.name: i for i, s in enumerate(shards) for r in s}
    assert all(len({home[r.name] for r in u}) == 1 for u in units)  # no pack is split between shards
    assert plan.shard((0, 9)) == units[0] and plan.shard((0, 15), pack=1) == [plan.runs[0]]


def test_shards_of_one_sweep_must_pack_alike(small, tmp_path, cli):
    """Shards cut with other pack sizes would deal out other units and leave runs unrun between them."""
    d = tmp_path / "sw"
    first = cli("sweep", "-c", small, "model.norm=batch,none", "--seeds", "3", "--pack", "2", "--shard", "0/2",
                "--sweep-dir", d, "--dry-run")
    assert first.exit_code == 0, first.output
    plan = sweep.plan_inline(small, ["model.norm=batch,none"], seeds=3)
    plan.pack = 2
    sweep.create(plan, exact=d)
    for args in (["-c", small, "model.norm=batch,none", "--seeds", "3", "--pack", "3", "--sweep-dir", d],
                 ["-c", small, "model.norm=batch,none", "--seeds", "3", "--sweep-dir", d],  # pack 1 by default
                 ["--resume", d, "--pack", "3"]):
        result = cli("sweep", *args, "--shard", "1/2", "--dry-run")
        assert result.exit_code == 2 and f"{d} packs by 2 (its sweep.yaml)" in " ".join(result.output.split()), args
    plan.pack = 3
    with pytest.raises(ConfigError, match="packs by 2"):
        sweep.create(plan, exact=d)  # the API's join, as an array task's
    assert cli("sweep", "--resume", d, "--shard", "1/2", "--dry-run").exit_code == 0
    assert cli("sweep", "--resume", d, "--pack", "3", "--dry-run").exit_code == 0  # one process: any pack


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_the_plan(small, n):
    plan = sweep.plan_inline(small, ["model.norm=batch,none,group", "optimizer.lr=0.1,0.01"], seeds=2)
    shards = [plan.shard((i, n)) for i in range(n)]
    names = [r.name for s in shards for r in s]
    assert sorted(names) == sorted(r.name for r in plan.runs) and len(names) == len(set(names))
    with pytest.raises(ConfigError, match="0-based"):
        plan.shard((n, n))


def test_create_writes_plan_and_pending_results_and_round_trips(small, tmp_path):
    plan = sweep.plan_inline(small, ["model.norm=batch,none"], seeds=2, name="roundtrip")
    d = sweep.create(plan, tmp_path / "sweeps")
    assert d.parent == tmp_path / "sweeps" and d.name.endswith("-roundtrip")
    again = sweep.read_plan(d)
    assert [r.to_dict() for r in again.runs] == [r.to_dict() for r in plan.runs] and again.config == plan.config
    header, *rows = (d / "results.csv").read_text().splitlines()
    assert header.split(",")[:5] == ["run", "cell", "seed", "model.norm", "status"]
    assert [r.split(",")[4] for r in rows] == ["pending"] * 4
    # --sweep-dir: the same plan joins the existing folder; a different one is refused
    assert sweep.create(sweep.plan_inline(small, ["model.norm=batch,none"], seeds=2, name="roundtrip"),
                        exact=d) == d
    with pytest.raises(ConfigError, match="different sweep"):
        sweep.create(sweep.plan_inline(small, ["model.norm=batch,group"], seeds=2), exact=d)


def test_dry_run_prints_the_plan_and_count_and_creates_nothing(small, tmp_path, cli):
    result = cli("sweep", "-c", small, "model.norm=batch,none", "--seeds", "3", "--dry-run",
                 "--root", tmp_path / "sweeps", "--shard", "1/2")
    assert result.exit_code == 0, result.output
    assert "3 run(s) of 6" in result.output and "2 cell(s) x 3 seed(s)" in result.output
    assert not (tmp_path / "sweeps").exists()
    # a shard of a new sweep must name the folder that all shards share
    result = cli("sweep", "-c", small, "model.norm=batch,none", "--root", tmp_path / "sweeps", "--shard", "0/2")
    assert result.exit_code == 2 and "--sweep-dir" in result.output and not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------ running

@pytest.mark.slow
def test_sweep_runs_every_run_and_records_results(small, tmp_path, cli):
    result = cli("sweep", "-c", small, "model.norm=batch,none", "--seeds", "2", "--root", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    d = Path(result.output.strip().splitlines()[-1])
    plan, rows = sweep.load(d)
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert all(r["epochs"] == 1 and 0 <= r["final_test_acc"] <= 100 and r["best_epoch"] == 1 for r in rows)
    csv_rows = rundir.read_csv(d / "results.csv")
    assert [r["run"] for r in csv_rows] == [r.name for r in plan.runs]
    assert csv_rows[2]["model.norm"] == "none" and csv_rows[2]["final_test_acc"] == rows[2]["final_test_acc"]
    run = d / "runs" / "norm-none-seed1"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["model"]["norm"] == "none" and stored["seed"] == 1 and stored["name"] == "norm-none-seed1"
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "metrics.csv").is_file()


@pytest.mark.slow
def test_a_failing_run_does_not_stop_the_others_and_the_sweep_exits_nonzero(small, tmp_path, cli):
    # imagefolder data at a missing root fails when its run loads the data; the synthetic runs go on.
    result = cli("sweep", "-c", small, "data.name=imagefolder,synthetic", f"data.root={tmp_path / 'nowhere'}",
                 "--seeds", "2", "--root", tmp_path / "sw")
    assert result.exit_code == 1 and "internal error" not in result.output
    assert "2 run(s) failed" in result.output and "name-imagefolder-seed0" in result.output
    d = next((tmp_path / "sw").iterdir())
    rows = {r["run"]: r for r in sweep.load(d)[1]}
    assert [rows[f"name-synthetic-seed{k}"]["status"] for k in (0, 1)] == ["completed", "completed"]
    failed = rows["name-imagefolder-seed1"]
    assert failed["status"] == "failed" and "DataError" in failed["error"]
    assert "DataError" in json.loads((d / "errors" / "name-imagefolder-seed1.json").read_text())["traceback"]


@pytest.mark.slow
def test_a_diverged_run_counts_as_diverged_not_failed(tmp_path):
    cfg = write_config(tmp_path / "sgd.yaml", {**SMALL, "model": {**SMALL["model"], "norm": "none"},
                                               "optimizer": {"name": "sgd", "lr": 0.01}})
    d = sweep.create(sweep.plan_inline(cfg, ["optimizer.lr=0.01,1e12"], seeds=1), tmp_path / "sw")
    outcome = sweep.execute(d)
    assert outcome.diverged == ["lr-1000000000000.0-seed0"] and outcome.completed == ["lr-0.01-seed0"]
    assert outcome.failed == {} and outcome.ok
    row = sweep.load(d)[1][1]
    assert row["status"] == "diverged" and "loss became" in row["error"]
    # a diverged run is a result: resuming leaves it alone
    again = sweep.execute(d)
    assert again.already_done == 2 and not again.completed and not again.diverged


class _StopAfterFirstEpochOf(sweep.SilentSweepReporter):
    """Acts like Ctrl-C at the end of one run's first epoch."""

    def __init__(self, name: str):
        self.name = name

    def run_progress(self, spec, epoch, epochs):
        if spec.name == self.name and epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_then_resume_continues_from_checkpoints_and_skips_finished_runs(tmp_path, small):
    plan = sweep.plan_inline(small, ["model.norm=batch,none", "train.epochs=2"], seeds=2)
    d = sweep.create(plan, tmp_path / "sw")
    with pytest.raises(InterruptedRun, match="--resume"):
        sweep.execute(d, reporter=_StopAfterFirstEpochOf("norm-none-seed0"))
    assert _statuses(d) == {"norm-batch-seed0": "completed", "norm-batch-seed1": "completed",
                            "norm-none-seed0": "interrupted", "norm-none-seed1": "pending"}
    assert rundir.read_csv(d / "results.csv")[2]["status"] == "interrupted"
    before = _mtimes(d, ["norm-batch-seed0", "norm-batch-seed1"])
    # one more failure mode: a failed run is run again from scratch
    failed = d / "runs" / "norm-batch-seed1" / "summary.json"
    failed.write_text(json.dumps({**json.loads(failed.read_text()), "status": "failed", "error": "boom"}))
    outcome = sweep.execute(d)
    assert sorted(outcome.completed) == ["norm-batch-seed1", "norm-none-seed0", "norm-none-seed1"]
    assert outcome.already_done == 1 and outcome.ok
    assert _mtimes(d, ["norm-batch-seed0"]) == {"norm-batch-seed0": before["norm-batch-seed0"]}  # not re-run
    resumed = rundir.read_json(d / "runs" / "norm-none-seed0" / "run.json")
    assert [r["from_epoch"] for r in resumed["resumes"]] == [1]  # continued from its epoch-1 checkpoint
    assert "resumes" not in rundir.read_json(d / "runs" / "norm-batch-seed1" / "run.json")  # started afresh
    assert set(_statuses(d).values()) == {"completed"}
    assert len(rundir.read_csv(d / "runs" / "norm-none-seed0" / "metrics.csv")) == 2


@pytest.mark.slow
def test_a_run_claimed_by_another_process_is_left_to_it(tmp_path, small):
    d = sweep.create(sweep.plan_inline(small, ["model.norm=batch,none"], seeds=1), tmp_path / "sw")
    with workers.claim(d, "norm-none-seed0") as held:
        assert held
        with workers.claim(d, "norm-none-seed0") as again:
            assert not again  # flock is per open file: a second claim fails even in this process
        outcome = sweep.execute(d)
    assert outcome.busy == ["norm-none-seed0"] and outcome.completed == ["norm-batch-seed0"]
    assert not (d / "runs" / "norm-none-seed0").exists()


_EXECUTE = ("import json, sys; from pathlib import Path; from bnctl import sweep; "
            "o = sweep.execute(Path(sys.argv[1])); "
            "print(json.dumps({'completed': o.completed, 'busy': o.busy, 'done': o.already_done}))")


@pytest.mark.slow
def test_two_processes_resuming_one_sweep_never_run_the_same_run(tmp_path, small):
    d = sweep.create(sweep.plan_inline(small, ["model.norm=batch,none,group,layer"], seeds=2), tmp_path / "sw")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _EXECUTE, str(d)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    runs = [set(o["completed"]) for o in outs]
    assert not runs[0] & runs[1]  # no run trained twice
    assert runs[0] | runs[1] == {r.name for r in sweep.read_plan(d).runs}
    for name in runs[0] | runs[1]:
        assert "resumes" not in rundir.read_json(d / "runs" / name / "run.json")


@pytest.mark.slow
def test_jobs_2_gives_the_same_results_as_jobs_1(tmp_path, small):
    plan = sweep.plan_inline(small, ["model.norm=batch,none"], seeds=2)
    one, two = sweep.create(plan, tmp_path / "one"), sweep.create(plan, tmp_path / "two")
    assert sweep.execute(one, jobs=1).ok
    outcome = sweep.execute(two, jobs=2)
    assert sorted(outcome.completed) == sorted(r.name for r in plan.runs)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]  # noqa: E731
    # batch 8 trains on one thread in both: the same numbers, bit for bit
    assert strip(sweep.load(two)[1]) == strip(sweep.load(one)[1])


@pytest.mark.slow
def test_interrupting_a_jobs_2_sweep_then_resuming_completes_it(tmp_path, small):
    """Ctrl-C (SIGINT to the process group) during a --jobs 2 sweep, then a resume from another process."""
    cfg = write_config(tmp_path / "slower.yaml", {**SMALL, "data": {**SMALL["data"], "train_size": 160},
                                                 "train": {**SMALL["train"], "epochs": 3}})
    plan = sweep.plan_inline(cfg, ["model.norm=batch,none,group"], seeds=2)
    d = sweep.create(plan, tmp_path / "sw")
    code = "import sys; from pathlib import Path; from bnctl import sweep; sweep.execute(Path(sys.argv[1]), jobs=2)"
    # A shell's background jobs ignore SIGINT, and children inherit that; a terminal's foreground job does not.
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # wait until some run is mid-way
        time.sleep(0.02)
        if any(len(rundir.read_csv(m)) >= 1 for m in d.glob("runs/*/metrics.csv")
               if not (m.parent / "summary.json").is_file() or _statuses(d)[m.parent.name] != "completed"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the sweep and its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "InterruptedRun" in err and "--resume" in err
    stopped = _statuses(d)
    assert "running" not in stopped.values() and "interrupted" in stopped.values()  # stopped cleanly
    assert not any(_held(d, f.stem) for f in (d / "claims").iterdir())  # the workers are gone
    done = {n for n, s in stopped.items() if s == "completed"}
    epochs = {n: rundir.epochs_completed(d / "runs" / n) for n, s in stopped.items() if s == "interrupted"}
    before = _mtimes(d, done)
    outcome = sweep.execute(d, jobs=1)
    assert outcome.ok and not set(outcome.completed) & done
    assert set(_statuses(d).values()) == {"completed"}
    assert _mtimes(d, done) == before  # finished runs were not run again
    for name, k in epochs.items():  # interrupted runs continued from their checkpoints
        resumes = rundir.read_json(d / "runs" / name / "run.json").get("resumes", [])
        assert [r["from_epoch"] for r in resumes] == ([k] if k else [])


def _held(d: Path, name: str) -> bool:
    with workers.claim(d, name) as held:
        return not held


# ------------------------------------------------------------------ stopping a --jobs 2 sweep: what the screen says

def _bnctl() -> list[str]:
    """The installed `bnctl` script (its workers import the CLI's modules as they start), else python -m bnctl."""
    script = Path(sys.executable).with_name("bnctl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bnctl"]


def _start_sweep(tmp_path: Path, cfg: Path, d: Path) -> subprocess.Popen:
    # A session of its own (a timeout ends the sweep and its workers together) and Ctrl-C's default handling,
    # as a terminal's foreground job has it (a shell's background jobs ignore SIGINT, and children inherit that).
    return subprocess.Popen([*_bnctl(), "sweep", "-c", str(cfg), "model.norm=batch,none", "--seeds", "1",
                             "--jobs", "2", "--sweep-dir", str(d)], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            with_timeout = proc.poll() is None
            os.killpg(proc.pid, signal.SIGKILL) if with_timeout else None
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"never saw {what}:\n{out}\n{err}")
        time.sleep(0.01)


def _children_importing(pid: int) -> bool:
    """True once two child processes of pid run and each has loaded a compiled module from site-packages."""
    found = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            found += "site-packages" in (entry / "maps").read_text()
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
    return found >= 2


def _interrupted_lines(out: str) -> dict[str, int]:
    import re

    return {name: len(re.findall(rf"^\s*interrupted {re.escape(name)}\b", out, re.M))
            for name in ("norm-batch-seed0", "norm-none-seed0")}


@pytest.mark.parametrize("signum, why", [(signal.SIGINT, ""), (signal.SIGTERM, "SIGTERM")])
def test_a_worker_stops_once_and_a_second_signal_cannot_break_the_stop(signum, why):
    """The sweep passes Ctrl-C on to a worker that was slow to report; that must not land mid-stop."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            workers._stop_once(signum, None)
        assert str(stop.value) == why  # what the run records as stopped_by (SIGINT: nothing, as Ctrl-C)
        for other in (signal.SIGINT, signal.SIGTERM):
            assert signal.getsignal(other) == signal.SIG_IGN
            os.kill(os.getpid(), other)  # ignored: no KeyboardInterrupt, no exit
        time.sleep(0.05)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="watches the workers start in /proc (Linux)")
def test_ctrl_c_while_jobs_2_workers_start_prints_no_tracebacks_and_names_each_run(tmp_path, small):
    d = tmp_path / "sw"
    proc = _start_sweep(tmp_path, small, d)
    # Both workers exist and are importing (they load compiled modules well before they could train).
    _wait_for(proc, lambda: _children_importing(proc.pid), "two workers importing")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the sweep and its workers
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, out + err
    assert "stopped: sweep interrupted" in err and f"bnctl sweep --resume {d}" in err.replace("\n", "")
    statuses = _statuses(d)
    assert "running" not in statuses.values() and "failed" not in statuses.values(), statuses
    lines = _interrupted_lines(out)
    for name, status in statuses.items():  # a run the stop caught, begun or not, says so once
        assert lines[name] == (status != "completed"), (name, status, out)


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_each_run_a_stop_catches_in_a_jobs_2_sweep_gets_its_own_line(tmp_path, signum, code):
    cfg = write_config(tmp_path / "long.yaml", {**SMALL, "data": {**SMALL["data"], "train_size": 160},
                                               "train": {**SMALL["train"], "epochs": 40}})
    d = tmp_path / "sw"
    proc = _start_sweep(tmp_path, cfg, d)
    metrics = [d / "runs" / n / "metrics.csv" for n in ("norm-batch-seed0", "norm-none-seed0")]
    # both runs are training: each has kept an epoch (40 of them take far longer than the stop's grace)
    _wait_for(proc, lambda: all(m.is_file() and m.read_text().count("\n") >= 2 for m in metrics), "both runs training")
    os.killpg(proc.pid, signum)  # Ctrl-C, or a scheduler's SIGTERM to every process of the job
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == code, out + err
    assert "Traceback" not in out + err, out + err
    assert _statuses(d) == {"norm-batch-seed0": "interrupted", "norm-none-seed0": "interrupted"}
    assert _interrupted_lines(out) == {"norm-batch-seed0": 1, "norm-none-seed0": 1}, out
    assert out.count("resumable") == 2, out


class _StopOnFirstLine(sweep.SilentSweepReporter):
    """Records the lines a sweep would print; Ctrl-C lands while the first one is printed."""

    def __init__(self):
        self.started, self.finished = [], []

    def run_started(self, spec) -> None:
        self.started.append(spec.name)

    def run_finished(self, spec, outcome, row) -> None:
        self.finished.append((spec.name, outcome, row["status"]))
        if len(self.finished) == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_stop_that_lands_while_a_line_is_printed_still_gives_every_started_run_its_line(tmp_path, small):
    cfg = write_config(tmp_path / "mixed.yaml", {**SMALL, "train": {**SMALL["train"], "epochs": 1}})
    # one short run and two long ones: the short one ends first, and the stop lands while it is reported
    plan = sweep.plan_inline(cfg, ["train.epochs=1,40"], seeds=1)
    d = sweep.create(plan, tmp_path / "sw")
    reporter = _StopOnFirstLine()
    with pytest.raises(InterruptedRun):
        sweep.execute(d, jobs=2, reporter=reporter)
    names = [name for name, _, _ in reporter.finished]
    assert sorted(names) == sorted(reporter.started) and len(names) == len(set(names)) == 2, reporter.finished
    statuses = _statuses(d)
    for name, outcome, status in reporter.finished:
        assert status == statuses[name] and status != "running"
        assert outcome == ("completed" if status == "completed" else "interrupted"), reporter.finished
