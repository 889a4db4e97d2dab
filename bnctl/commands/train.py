"""`bnctl train`: one run from a config (or the continuation of one), with a table row per epoch."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import TrainProgress, console, existing, loading_progress, reports_errors, sigterm_stops_like_ctrl_c
from bnctl.errors import BnctlError, ConfigError


def _resume_config(run_dir: Path, overrides: list[str]):
    from bnctl import config as config_mod

    parsed = config_mod.parse_overrides(overrides)
    changed = sorted(set(parsed) - config_mod.RESUMABLE_KEYS)
    if changed:
        allowed = ", ".join(sorted(config_mod.RESUMABLE_KEYS))
        raise ConfigError(f"--resume continues a run as configured; only {allowed} may change "
                          f"(got {', '.join(changed)}). Start a new run to change anything else.")
    # moved=True: a run continued on another device adapts its precision there (fp16 -> fp32 off CUDA).
    return config_mod.load(existing(run_dir, "run directory", holding="config.yaml") / "config.yaml", overrides,
                           moved=True)


@reports_errors
@sigterm_stops_like_ctrl_c()
def train(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                                    help="Override config keys, e.g. optimizer.lr=0.01 train.epochs=5"),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="YAML experiment config: a file or a built-in name (bnctl config list)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run directory (must be new or empty)."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where new run directories are created."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory."),
    print_config: bool = typer.Option(False, "--print-config",
                                      help="Print the resolved config (file + overrides) as YAML and exit."),
) -> None:
    """Train a model as a YAML config describes; write metrics, checkpoints and curves to a run directory.

    Under torchrun (torchrun --nproc_per_node=N -m bnctl train ...) the N processes train one run together.
    """
    from bnctl import distributed

    if distributed.env_rank() == 0:
        return _train(overrides, config, run_dir, runs_root, resume, print_config)
    # Data-parallel ranks other than 0 stay quiet: rank 0 reports progress and every error they share
    # (config errors, agreed setup failures, divergence); crashes of this rank alone are still shown.
    console.quiet = True
    try:
        _train(overrides, config, run_dir, runs_root, resume, print_config)
    except BnctlError as err:
        if isinstance(err, distributed.LostPeer):
            raise  # this rank's own view of a broken group, which rank 0 may never report
        raise SystemExit(err.exit_code) from None  # not typer.Exit: reports_errors would report that


def _train(overrides: Optional[List[str]], config: Optional[Path], run_dir: Optional[Path], runs_root: Path,
           resume: Optional[Path], print_config: bool = False) -> None:
    from bnctl import config as config_mod, configfiles, distributed

    overrides = overrides or []
    if resume is None and config is None:
        raise ConfigError("give --config FILE or a built-in name (e.g. --config quickstart) or --resume RUN_DIR")
    if resume is not None and (config is not None or run_dir is not None):
        raise ConfigError("--resume takes its config from the run directory; drop --config/--run-dir")
    cfg = (_resume_config(resume, overrides) if resume is not None
           else config_mod.load(configfiles.resolve(config), overrides))
    if print_config:
        if distributed.env_rank() == 0:  # under torchrun, one copy
            sys.stdout.write(config_mod.to_yaml(cfg))
        return
    if resume is not None:
        from bnctl import rundir

        done = rundir.epochs_completed(resume)
        if done >= cfg.train.epochs:
            console.print(f"{resume} already completed {done} epoch(s); nothing to do "
                          f"(extend it with: bnctl train --resume {resume} train.epochs=N)", soft_wrap=True)
            return

    from bnctl import elastic, workflow  # heavy imports only once the config is known to be valid

    reporter = TrainProgress(cfg.train.epochs, clean_train=cfg.train.eval_train)

    def announce(path: Path) -> None:
        verb = "resuming" if resume is not None else "run directory"
        restart = elastic.attempt()
        if restart is not None and restart.restart > 0:
            verb += f" (torchrun restart {restart.restart})"
        console.print(f"[dim]{verb}:[/] {escape(str(path))}", soft_wrap=True)

    try:
        with loading_progress():
            result = workflow.train_run(cfg, runs_root=runs_root, run_dir=run_dir, resume=resume, reporter=reporter,
                                        on_run_dir=announce)
    finally:
        reporter.close()
    best = result.summary["best"]
    # The run's time as summary.json records it (and compare, runs and sweeps show it): one definition.
    took = f"wall time {result.summary['wall_time_s']:.1f}s"
    if resume is not None:  # summary.json's wall time adds up every session of the run
        took = (f"wall time {result.session_wall_time_s:.1f}s this session, "
                f"{result.summary['wall_time_s']:.1f}s over all sessions of this run")
    console.print(f"[bold green]done[/] best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']} {took}",
                  soft_wrap=True)
    console.print(f"[dim]curves: {escape(str(result.run_dir / 'curves.png'))}   "
                  f"next: bnctl eval {escape(str(result.run_dir / 'checkpoints' / 'best.pt'))}[/]", soft_wrap=True)
    console.print(escape(str(result.run_dir)), soft_wrap=True)  # last line: the run directory, for scripts
