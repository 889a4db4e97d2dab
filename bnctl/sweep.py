"""Sweeps: the sweep directory, its results table, and running a plan's runs.

A sweep directory holds sweep.yaml (the resolved plan, enough to run it from any
process), runs/<cell>-seed<k>/ (ordinary run directories made by engine.fit) and
results.csv (one row per planned run, rebuilt from the run directories); its file
names and each run's status are bnctl/sweepdir.py's (re-exported here). Plans are
built in bnctl/plan.py (re-exported here); running the runs themselves (claims,
worker processes) lives in bnctl/workers.py.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from bnctl import config as config_mod, rundir
from bnctl.config import Config
from bnctl.errors import ConfigError, InterruptedRun
from bnctl.plan import Plan, RunSpec, parse_seeds, parse_sweep_overrides, plan_from_file, plan_inline, split_values
from bnctl.sweepdir import (CLAIMS_DIR, ERRORS_DIR, FINISHED, PLAN_FILE, RESULTS_FILE, RUNS_DIR, error_record,
                            run_dir, run_status)

__all__ = ["Plan", "RunSpec", "plan_inline", "plan_from_file", "parse_sweep_overrides", "parse_seeds", "split_values",
           "create", "execute", "load", "read_plan", "write_results", "run_status", "result_row", "Outcome",
           # the sweep folder's names, bnctl/sweepdir.py's
           "PLAN_FILE", "RESULTS_FILE", "RUNS_DIR", "CLAIMS_DIR", "ERRORS_DIR", "FINISHED", "run_dir"]


RESULT_METRICS = ["status", "epochs", "final_test_acc", "final_test_loss", "final_train_acc",
                  "final_clean_train_acc", "best_test_acc", "best_epoch", "wall_time_s", "error"]

# ------------------------------------------------------------------ the sweep directory

def _plan_text(plan: Plan) -> str:
    return yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def create(plan: Plan, root: Path = Path("runs/sweeps"), exact: Path | None = None) -> Path:
    """Create runs/sweeps/<YYYYmmdd-HHMMSS>-<name>/ with sweep.yaml and an all-pending results.csv.

    With ``exact``, use that folder: new, or one holding the same plan already (so every
    task of a job array can run the same command; the first creates it, the others join).
    """
    plan.created = plan.created or datetime.now().isoformat(timespec="seconds")
    if exact is not None:
        return _create_exact(plan, Path(exact))
    path = rundir.new_stamped_folder(root, plan.name, "sweep root", "sweep directory")
    _populate(path, plan)
    return path


def _populate(path: Path, plan: Plan) -> None:
    for sub in (RUNS_DIR, CLAIMS_DIR):
        (path / sub).mkdir(exist_ok=True)
    write_results(path, plan)
    rundir.atomic_write_text(path / PLAN_FILE, _plan_text(plan))  # last: its presence marks a usable sweep


def _create_exact(plan: Plan, path: Path) -> Path:
    import time

    rundir.make_folder(path.parent, "sweep root")
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise ConfigError(f"--sweep-dir {path} is a file; choose a folder") from None
        deadline = time.monotonic() + 10  # another task of the same array may be writing sweep.yaml now
        while not (path / PLAN_FILE).is_file() and any(path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not (path / PLAN_FILE).is_file():
            if any(path.iterdir()):
                raise ConfigError(f"{path} exists and is not a sweep directory; choose a new folder") from None
            _populate(path, plan)  # an empty folder made for the sweep
            return path
        existing = read_plan(path)
        if [r.to_dict() for r in existing.runs] != [r.to_dict() for r in plan.runs] or existing.config != plan.config:
            raise ConfigError(f"{path} holds a different sweep; choose a new folder or run its own plan "
                              f"with: bnctl sweep --resume {path}") from None
        check_same_pack(existing, plan.pack, path)
        return path
    _populate(path, plan)
    return path


def check_same_pack(recorded: Plan, pack: int | None, sweep_dir: Path) -> None:
    """Refuse a shard (or array task) that would pack differently from the sweep it joins.

    Shards deal out units, runs or whole packs (Plan.units), so shards of one sweep cut with other
    pack sizes would miss runs between them.
    """
    if pack is not None and pack != recorded.pack:
        raise ConfigError(f"{sweep_dir} packs by {recorded.pack} (its sweep.yaml); its shards must too: "
                          f"give --pack {recorded.pack} (or leave --pack out)")


def read_plan(sweep_dir: Path) -> Plan:
    """The plan recorded in a sweep directory's sweep.yaml."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} is not a bnctl sweep directory (no {PLAN_FILE})")
    raw = config_mod.read_yaml(path)
    try:
        return Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is damaged or not a bnctl sweep plan ({type(err).__name__}: {err})") from None


def result_columns(plan: Plan) -> list[str]:
    return ["run", "cell", "seed", *plan.grid, *RESULT_METRICS]


def result_row(sweep_dir: Path, plan: Plan, spec: RunSpec) -> dict[str, Any]:
    """One results.csv row: the run's swept values, seed, status, final and best metrics, wall time, error."""
    status, summary = run_status(sweep_dir, spec)
    row: dict[str, Any] = {"run": spec.name, "cell": spec.cell, "seed": spec.seed,
                           **{k: spec.overrides.get(k) for k in plan.grid}}
    row |= {k: None for k in RESULT_METRICS}
    row["status"] = status
    if summary:
        shown = rundir.summary_row(summary)
        row |= {"epochs": shown["epochs_completed"],
                **{k: shown[k] for k in ("final_test_acc", "final_test_loss", "final_train_acc",
                                         "final_clean_train_acc", "best_test_acc", "best_epoch", "wall_time_s")}}
        if summary.get("error"):
            row["error"] = summary["error"]
        elif summary.get("diverged"):
            row["error"] = summary["diverged"].get("message")
    if status == "failed" and not row["error"]:
        row["error"] = (error_record(sweep_dir, spec.name) or {}).get("error")
    return row


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    return value


def write_results(sweep_dir: Path, plan: Plan) -> list[dict[str, Any]]:
    """Rebuild results.csv from the run directories, atomically; returns its rows."""
    import csv

    rows = [result_row(sweep_dir, plan, spec) for spec in plan.runs]
    columns = result_columns(plan)
    with rundir.atomic_write(Path(sweep_dir) / RESULTS_FILE) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in columns])
    return rows


def load(sweep_dir: Path) -> tuple[Plan, list[dict[str, Any]]]:
    """For readers: the plan and one row per planned run, read fresh from the run directories."""
    plan = read_plan(sweep_dir)
    return plan, [result_row(sweep_dir, plan, spec) for spec in plan.runs]


# ------------------------------------------------------------------ running

class SweepReporter(Protocol):
    """What execute tells its caller (the CLI draws the progress display from it)."""

    def start(self, plan: Plan, selected: list[RunSpec], todo: list[RunSpec], jobs: int,
              partly_done: int = 0) -> None: ...
    def run_started(self, spec: RunSpec) -> None: ...
    def run_progress(self, spec: RunSpec, epoch: int, epochs: int) -> None: ...
    def run_finished(self, spec: RunSpec, outcome: str, row: dict[str, Any]) -> None: ...


class SilentSweepReporter:
    def start(self, plan, selected, todo, jobs, partly_done=0) -> None: ...
    def run_started(self, spec) -> None: ...
    def run_progress(self, spec, epoch, epochs) -> None: ...
    def run_finished(self, spec, outcome, row) -> None: ...


@dataclass
class Outcome:
    """What one execute call did, over the runs of its shard."""

    sweep_dir: Path
    selected: int = 0  # runs in this shard
    already_done: int = 0  # completed or diverged before this call
    partly_done: int = 0  # stopped mid-way before this call, continued from their checkpoints
    completed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run name -> error
    busy: list[str] = field(default_factory=list)  # being run by another process
    interrupted: list[str] = field(default_factory=list)
    # run name -> seconds from the task reaching its process to its end, and whether it was that process's
    # first run (which pays for the imports and the dataset); bench/sweep_jobs.py derives overheads from them
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def execute(sweep_dir: Path, *, jobs: int = 1, shard: tuple[int, int] | None = None,
            reporter: SweepReporter | None = None, pack: int | None = None) -> Outcome:
    """Run what is not finished: skip completed and diverged runs, resume interrupted ones, rerun failed ones.

    Needs only the sweep directory, so any process (a Slurm array task) can call it. A failed
    run is recorded and the others go on. Ctrl-C stops every worker, leaves the runs
    interrupted (resumable) and raises InterruptedRun. ``pack`` (default: the plan's) trains up
    to that many seeds of a cell in one process as one pack (bnctl/packed.py); runs that stopped
    mid-way resume one by one.
    """
    from bnctl import workers

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    pack = plan.pack if pack is None else pack
    selected = plan.shard(shard, pack)  # with packing, a shard holds whole packs
    wanted = {spec.name for spec in selected}
    configs = {spec.name: cfg for spec, cfg in plan.configs() if spec.name in wanted}
    for sub in (RUNS_DIR, CLAIMS_DIR):
        (sweep_dir / sub).mkdir(exist_ok=True)
    write_results(sweep_dir, plan)  # the table as the files stand now (a killed sweep left it behind)
    statuses = {s.name: run_status(sweep_dir, s)[0] for s in selected}
    todo = [s for s in selected if statuses[s.name] not in FINISHED]
    partly = [s for s in todo if statuses[s.name] in ("interrupted", "running")
              and rundir.last_checkpoint(run_dir(sweep_dir, s)).is_file()]
    outcome = Outcome(sweep_dir, selected=len(selected), already_done=len(selected) - len(todo),
                      partly_done=len(partly))
    reporter = reporter or SilentSweepReporter()
    reporter.start(plan, selected, todo, jobs, partly_done=len(partly))
    tasks = [workers.Task(sweep_dir, spec, config_mod.to_dict(configs[spec.name])) for spec in todo]
    if pack > 1:
        tasks = _packs(tasks, pack, {s.name for s in partly})
        check_pack([[configs[spec.name] for spec in task.specs] for task in tasks if task.pack])
    results = workers.run_tasks(tasks, jobs, reporter)

    def record(result: workers.Result) -> None:
        spec = result.spec
        outcome.timings[spec.name] = {"seconds": result.seconds, "first_in_process": result.first_in_process}
        if result.outcome == "completed":
            outcome.completed.append(spec.name)
        elif result.outcome == "skipped":  # another process finished it after this one looked
            outcome.already_done += 1
        elif result.outcome == "diverged":
            outcome.diverged.append(spec.name)
        elif result.outcome == "busy":
            outcome.busy.append(spec.name)
        elif result.outcome == "interrupted":
            outcome.interrupted.append(spec.name)
        else:
            outcome.failed[spec.name] = result.error or "failed"
        rows = write_results(sweep_dir, plan)
        reporter.run_finished(spec, result.outcome, next(r for r in rows if r["run"] == spec.name))

    try:
        with contextlib.closing(results):  # stops the workers however the loop ends
            try:
                for result in results:
                    for each in result.all:  # a packed task: each of its runs
                        record(each)
            except KeyboardInterrupt as stop:
                # Each run the stop caught gets its line too (the workers report them as they stop).
                for result in workers.results_after_stop(results, stop):
                    for each in result.all:
                        record(each)
                raise
    except KeyboardInterrupt:
        write_results(sweep_dir, plan)
        raise InterruptedRun(f"sweep interrupted; finished runs are kept and the others are resumable. "
                             f"Continue with: bnctl sweep --resume {sweep_dir}") from None
    write_results(sweep_dir, plan)
    return outcome


def _packs(tasks: list, pack: int, stopped: set[str]) -> list:
    """Each cell's runs that start afresh, in packs of up to ``pack``; runs stopped mid-way stay on their own.

    A stopped run resumes from its checkpoint, at its own epoch, so it cannot join a pack.
    """
    alone, by_cell = [], {}
    for task in tasks:
        if task.spec.name in stopped:
            alone.append(task)
        else:
            by_cell.setdefault(task.spec.cell, []).append(task)
    packs = [replace(group[i], pack=group[i + 1:i + pack]) for group in by_cell.values()
             for i in range(0, len(group), pack)]
    return packs + alone


def cell_groups(plan: Plan) -> list[list[Config]]:
    """Each cell's run configs: the groups a packed sweep trains together."""
    groups: dict[str, list[Config]] = {}
    for spec, cfg in plan.configs():
        groups.setdefault(spec.cell, []).append(cfg)
    return list(groups.values())


def check_pack(groups: list[list[Config]]) -> None:
    """Raise ConfigError unless each group of run configs can train as one pack (bnctl/packed.py)."""
    if not groups:
        return
    from bnctl import packed

    for cfgs in groups:
        packed.check_packable(cfgs)
