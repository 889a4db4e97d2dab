"""Launchers: where the runs of a sweep execute.

- ``local``: here, by sweep.execute (with ``--jobs`` worker processes).
- ``slurm``: a Slurm job array submitted through submitit (``pip install -e '.[slurm]'``). Array task
  i of N calls ``sweep.execute(sweep_dir, shard=(i, N))``, which needs nothing but the sweep
  directory (on a file system every node sees): it skips finished runs and resumes interrupted ones,
  so a task that times out can be requeued, and ``bnctl sweep --resume`` finishes whatever the array
  left undone. ``--shard I/N`` stays the scheduler-neutral way to split a sweep by hand.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bnctl.config import SlurmConfig
from bnctl.errors import ConfigError, InterruptedRun

CLUSTER = "slurm"  # submitit's executor; tests set "local" (same submission, processes on this machine)
LOGS_DIR = "slurm"  # in the sweep directory: submitit's scripts, pickles and each task's stdout/stderr


def slurm_settings(section: dict[str, Any] | None, options: dict[str, Any]) -> SlurmConfig:
    """The job array's settings: the sweep file's ``slurm:`` section (kept in the plan, so a resumed sweep has
    it too), then the command-line options given."""
    submitit = _submitit()  # missing: say so before anything is created
    if CLUSTER == "slurm" and submitit.SlurmExecutor.affinity() < 0:  # submitit's own test: no srun here
        raise ConfigError("--launcher slurm: no Slurm here (srun is not on PATH); submit from a Slurm login node, "
                          "or split the sweep by hand with --shard I/N")
    raw = dict(section or {}) | {k: v for k, v in options.items() if v is not None}
    from pydantic import ValidationError

    try:
        return SlurmConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"slurm.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid Slurm settings ({problems}); keys: {', '.join(SlurmConfig.model_fields)}") from None


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install -e '.[slurm]' (or pip install submitit); "
                          "or split the sweep by hand with --shard I/N") from None
    return submitit


class ShardTask:
    """One array task: shard (index, count) of a sweep. submitit pickles it and calls it on a node."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def __call__(self, index: int, count: int) -> dict[str, Any]:
        from bnctl import sweep

        # This is the task process's entry point, so it owns the process's signals: submitit's SIGUSR2
        # (time limit near, or preemption) and SIGTERM (scancel) stop the run in progress as Ctrl-C does,
        # leaving it interrupted and resumable; then, for SIGUSR2, submitit requeues this same shard.
        requeue = signal.getsignal(signal.SIGUSR2)
        caught: list[int] = []

        def stop(signum: int, frame: Any) -> None:
            if not caught:
                caught.append(signum)
                raise KeyboardInterrupt("SIGTERM")

        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGUSR2, signal.SIGTERM)}
        try:
            outcome = sweep.execute(Path(self.sweep_dir), shard=(index, count))
        except InterruptedRun:
            if caught == [signal.SIGUSR2] and callable(requeue):
                requeue(signal.SIGUSR2, None)  # submitit: checkpoint() below, requeue, exit
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return {"shard": f"{index}/{count}", "completed": outcome.completed, "diverged": outcome.diverged,
                "failed": outcome.failed, "busy": outcome.busy, "already_done": outcome.already_done}

    def checkpoint(self, index: int, count: int):
        """What submitit requeues after a time-out or preemption: the same shard (it resumes its runs)."""
        return _submitit().helpers.DelayedSubmission(ShardTask(self.sweep_dir), index, count)


@dataclass
class Submission:
    """A submitted job array."""

    sweep_dir: Path
    job_id: str  # the array's id (task i is JOBID_i)
    tasks: int
    logs: Path
    jobs: list[Any] = field(default_factory=list)  # submitit Job handles, one per task

    def wait(self) -> list[dict[str, Any]]:
        """Block until every task has ended; each task's summary (raises the first task's error)."""
        return [job.result() for job in self.jobs]


def executor_parameters(settings: SlurmConfig, name: str) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one task per array element, one run at a time."""
    params: dict[str, Any] = {
        "name": f"bnctl-{name}", "timeout_min": settings.time_min, "nodes": 1, "tasks_per_node": 1,
        "cpus_per_task": settings.cpus_per_run, "slurm_array_parallelism": settings.parallelism,
    }
    if settings.gpus_per_run:
        params["gpus_per_node"] = settings.gpus_per_run
    if settings.mem_gb is not None:
        params["mem_gb"] = settings.mem_gb
    if settings.partition:
        params["slurm_partition"] = settings.partition
    if settings.setup:
        params["slurm_setup"] = list(settings.setup)
    return params


def task_shards(runs: int, shard: tuple[int, int] | None, tasks: int | None) -> list[tuple[int, int]]:
    """The shard (i, n) of the whole plan each array task runs: tasks of them, or one per unit.

    ``runs`` counts the plan's units (Plan.units: runs, or with packing whole packs). Shard (i, n) holds
    units i, i+n, i+2n ... (Plan.shard). With --shard I/N, task k gets the k-th unit of that shard alone,
    which is shard (I + k*N, N*count) of the plan.
    """
    if shard is None:
        count = min(tasks or runs, runs)
        return [(i, count) for i in range(count)]
    i, n = shard
    count = len(range(i, runs, n))
    if tasks is not None and tasks != count:
        raise ConfigError("--shard with --launcher slurm submits one task per run (or pack) of the shard; drop --tasks")
    return [(i + k * n, n * count) for k in range(count)]


def submit_slurm(sweep_dir: Path, settings: SlurmConfig, shard: tuple[int, int] | None = None) -> Submission:
    """Submit the sweep (or one shard of it) as a job array: one task per run, or settings.tasks tasks."""
    from bnctl import sweep

    submitit = _submitit()
    sweep_dir = Path(sweep_dir).resolve()  # the tasks may start in another working directory
    plan = sweep.read_plan(sweep_dir)
    shards = task_shards(len(plan.units()), shard, settings.tasks)  # a packed sweep: one task per pack
    if not shards:
        raise ConfigError("no runs to submit")
    logs = sweep_dir / LOGS_DIR
    try:
        executor = submitit.AutoExecutor(folder=logs / "%j", cluster=CLUSTER)
    except RuntimeError as err:  # no srun/sbatch here
        raise ConfigError(f"--launcher slurm: {err} (submit from a Slurm login node)") from None
    executor.update_parameters(**executor_parameters(settings, plan.name))
    task = ShardTask(str(sweep_dir))
    try:
        jobs = executor.map_array(task, [i for i, _ in shards], [n for _, n in shards])
    except (OSError, RuntimeError, submitit.core.utils.FailedJobError) as err:
        raise ConfigError(f"sbatch refused the job array: {str(err).strip().splitlines()[0][:300]}") from None
    job_id = str(jobs[0].job_id).split("_")[0] if jobs else "?"
    return Submission(sweep_dir, job_id, len(jobs), logs, jobs)


def run_local(sweep_dir: Path, **kwargs: Any):
    from bnctl import sweep

    return sweep.execute(sweep_dir, **kwargs)


LAUNCHERS: dict[str, Callable[..., Any]] = {"local": run_local, "slurm": submit_slurm}


def check_launcher(name: str) -> str:
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown launcher '{name}'; choose one of: {', '.join(LAUNCHERS)}")
    return name
