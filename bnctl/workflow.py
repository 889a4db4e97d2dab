"""What `bnctl train` and `bnctl eval` do around their one library call, shared with the Python API.

A command and its bnctl.<function> differ only in how they show progress and results; what they
leave on disk (a run directory with its figures, RUN/eval/<what>.json with its confusion figure)
is made here, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bnctl import rundir
from bnctl.errors import BnctlError

if TYPE_CHECKING:
    from bnctl.config import Config
    from bnctl.engine import Reporter, RunResult


def train_run(cfg: "Config", *, runs_root: Path = Path("runs"), run_dir: Path | None = None,
              resume: Path | None = None, reporter: "Reporter | None" = None,
              on_run_dir: Callable[[Path], None] = lambda path: None) -> "RunResult":
    """Train one run in a process group (this process alone, or torchrun's) and draw its figures."""
    from bnctl import distributed, engine, plotting
    from bnctl.diagnostics import BNProbe

    started: dict[str, Path] = {}

    def announce(path: Path) -> None:
        started["dir"] = path
        on_run_dir(path)

    trained = False
    try:
        with distributed.process_group(cfg.device) as dist:
            result = engine.fit(cfg, runs_root=runs_root, run_dir=run_dir, resume=resume,
                                reporter=reporter or engine.SilentReporter(), on_run_dir=announce,
                                probe_factory=BNProbe.for_experiment, dist=dist)
        trained = True
    finally:
        # The figures of every run that finished an epoch, also one that diverged or was stopped.
        if "dir" in started and (started["dir"] / rundir.METRICS_FILE).is_file():
            try:
                plotting.plot_run(started["dir"])
            except BnctlError:
                pass  # no complete epoch yet: nothing to draw
            except Exception:
                if trained:
                    raise
                # Training failed already: its error is the one to report, not the figure's.
    return result


def save_evaluation(checkpoint: Path, result: dict[str, Any],
                    recalibrate_batch_size: int | None = None) -> tuple[Path, Path]:
    """Keep an evaluation as RUN/eval/<what was measured>.json and its confusion figure; OSError if it cannot."""
    from bnctl import plotting

    out_dir = rundir.run_dir_of(checkpoint) / rundir.EVAL_DIR
    path = out_dir / (rundir.eval_output_name(result, recalibrate_batch_size) + ".json")
    out_dir.mkdir(exist_ok=True)
    rundir.write_json(path, result)
    return path, plotting.plot_confusion(path)
