"""torchrun's restarts: which run directory a restarted worker group continues.

`torchrun --max-restarts=K` stops and restarts every worker of the group when one of them dies
(killed, out of memory). The restarted workers run the same command line again, with
TORCHELASTIC_RESTART_COUNT counting the attempts (0 for the first) and TORCHELASTIC_RUN_ID set to
the job's rendezvous id (`--rdzv-id`; `--standalone` draws a fresh one per torchrun invocation).
A restarted group must not start a new run: it continues the one the first attempt created.

- With `--run-dir DIR`, that folder is the run: a restart continues it.
- Without it, the first attempt records the run id in run.json (`torchelastic_run_id`) and a
  restart continues the newest run directory under `--runs-root` with that id and the config's name.

The run continues from its last checkpoint, exactly as `bnctl train --resume` would; a run that
died before its first checkpoint begins again in the same folder. Torch-free, like rundir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from bnctl import rundir
from bnctl.errors import ConfigError

if TYPE_CHECKING:
    from datetime import timedelta

RUN_ID_KEY = "torchelastic_run_id"  # in run.json


@dataclass(frozen=True)
class Attempt:
    """One start of a torchrun worker group: the job's run id and how many restarts came before."""

    run_id: str
    restart: int


def attempt(environ: Mapping[str, str] = os.environ) -> Attempt | None:
    """The torchrun attempt this process belongs to, or None when torchrun did not start it."""
    run_id = environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    try:
        restart = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        restart = 0
    return Attempt(run_id, restart)


def run_info() -> dict[str, object]:
    """For run.json: the torchrun job and attempt this process belongs to (how a restart finds its run)."""
    now = attempt()
    return {} if now is None else {RUN_ID_KEY: now.run_id, "torchelastic_restart": now.restart}


def recorded_run_id(run_dir: Path) -> str | None:
    """The torchrun run id a run directory's run.json records (None when absent or unreadable)."""
    try:
        value = rundir.read_json(Path(run_dir) / rundir.RUN_INFO_FILE).get(RUN_ID_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _config_text(run_dir: Path) -> str | None:
    try:
        return (Path(run_dir) / rundir.CONFIG_FILE).read_text()
    except OSError:
        return None


def _barely_started(run_dir: Path) -> bool:
    """True for a folder that rundir.create made but whose run died before writing anything else."""
    names = {p.name for p in run_dir.iterdir()} - {rundir.LOCK_FILE}
    checkpoints = run_dir / rundir.CHECKPOINT_DIR
    return names <= {rundir.CHECKPOINT_DIR} and (not checkpoints.is_dir() or not any(checkpoints.iterdir()))


def restart_target(current: Attempt | None, runs_root: Path, name: str, run_dir: Path | None,
                   config_yaml: str | None = None) -> Path | None:
    """On a torchrun restart, the run directory to continue; None on a first attempt or when there is none yet.

    A folder recorded under another run id is never taken over: that is someone else's run. Under
    --runs-root neither is one with another resolved config (config_yaml): one job (one --rdzv-id) may run
    several torchruns in turn, and a restart whose first attempt died before recording its own run would
    otherwise continue the previous run.
    """
    if current is None or current.restart == 0:
        return None
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            return None  # the first attempt died before creating it: start the run now
        recorded = recorded_run_id(run_dir)
        if recorded == current.run_id or (recorded is None and _barely_started(run_dir)):
            return run_dir
        raise ConfigError(f"--run-dir {run_dir} was not started by this torchrun job (run id {current.run_id}, "
                          f"the folder records {recorded or 'none'}); choose a new folder")
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        return None
    # Run directories are <YYYYmmdd-HHMMSS>-<name>[-k]: the newest name sorts last.
    ours = sorted(d for d in runs_root.glob(f"*-{name}*") if d.is_dir() and recorded_run_id(d) == current.run_id
                  and (config_yaml is None or _config_text(d) == config_yaml))
    return ours[-1] if ours else None


def claim_run_dir(runs_root: Path, name: str, run_dir: Path | None, resume: Path | None,
                  current: Attempt | None = None, config_yaml: str | None = None) -> tuple[Path, bool]:
    """The run directory to train in and whether to resume it: --resume's, a torchrun restart's, or a new one."""
    if resume is not None:
        return Path(resume), True
    restarted = restart_target(current or attempt(), runs_root, name, run_dir, config_yaml)
    if restarted is None:
        return rundir.create(runs_root, name, exact=run_dir), False
    rundir.remove_temp_files(restarted)  # left by the worker that died mid-write
    # Without a checkpoint the first attempt died in epoch 1: the run begins again in the same folder.
    from bnctl import checkpoint  # torch: only when a restarted group continues a run

    return restarted, checkpoint.last_path(restarted).is_file()


def attempt_store(timeout: "timedelta"):
    """torchrun's key-value store with keys private to this attempt (None outside torchrun), for init_process_group.

    The workers of every attempt share the agent's store, and a restarted worker can read the addresses
    the dead attempt's workers published there: gloo then fails with "connection refused", NCCL with a
    stale unique id (pytorch/pytorch#135712, #167288). A prefix per restart keeps the attempts apart.
    """
    now = attempt()
    if now is None:
        return None
    import torch.distributed as td

    store, _, _ = next(td.rendezvous("env://", timeout=timeout))
    return td.PrefixStore(f"bnctl/attempt_{now.restart}", store)
