"""bnctl's command line: each command parses, calls one library function, and reports.

Heavy imports (torch, matplotlib) happen inside the commands that need them so
that `bnctl --help` and `bnctl plot` start quickly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from bnctl.clikit import console, existing as _existing, reports_errors as _reports_errors, state as _state
from bnctl.errors import BnctlError, ConfigError

app = typer.Typer(
    name="bnctl",
    help="Run, compare and understand Batch Normalization experiments on CNNs.\n\n"
         "Quick start:  bnctl train --config configs/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")) -> None:
    _state["debug"] = debug


# ------------------------------------------------------------------ train

class _RichReporter:
    """A progress bar during each epoch and one table row when it ends."""

    COLUMNS = [("epoch", 5), ("train loss", 10), ("train acc", 9), ("test loss", 9), ("test acc", 8),
               ("lr", 9), ("time", 7), ("img/s", 7)]

    def __init__(self, total_epochs: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total_epochs = total_epochs
        # A live bar only on a terminal; in logs and CI the per-epoch rows say enough.
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(total_epochs)), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 console=console, transient=True, disable=not console.is_terminal)
        self.task = None
        self.header_shown = False

    def epoch_start(self, epoch: int, steps: int) -> None:
        if not self.header_shown:
            console.print("[bold]" + "  ".join(f"{name:>{w}}" for name, w in self.COLUMNS))
            self.header_shown = True
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, epoch=epoch, loss="-")

    def step(self, done: int, loss: float) -> None:
        self.progress.update(self.task, completed=done, loss=f"{loss:.3f}")

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.progress.remove_task(self.task)
        self.progress.stop()
        cells = [f"{row['epoch']}", f"{row['train_loss']:.4f}", f"{row['train_acc']:.2f}%", f"{row['test_loss']:.4f}",
                 f"{row['test_acc']:.2f}%", f"{row['lr']:.2e}", f"{row['epoch_time_s']:.1f}s",
                 f"{row['images_per_s']:.0f}"]
        console.print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self.COLUMNS)))

    def close(self) -> None:
        self.progress.stop()


def _resume_config(run_dir: Path, overrides: list[str]):
    from bnctl import config as config_mod

    parsed = config_mod.parse_overrides(overrides)
    changed = sorted(set(parsed) - config_mod.RESUMABLE_KEYS)
    if changed:
        allowed = ", ".join(sorted(config_mod.RESUMABLE_KEYS))
        raise ConfigError(f"--resume continues a run as configured; only {allowed} may change "
                          f"(got {', '.join(changed)}). Start a new run to change anything else.")
    # moved=True: a run continued on another device adapts its precision there (fp16 -> fp32 off CUDA).
    return config_mod.load(_existing(run_dir, "run directory", holding="config.yaml") / "config.yaml", overrides,
                           moved=True)


@app.command()
@_reports_errors
def train(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=VALUE",
                                                    help="Override config keys, e.g. optimizer.lr=0.01 train.epochs=5"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML experiment config."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Exact run directory (must be new or empty)."),
    runs_root: Path = typer.Option(Path("runs"), "--runs-root", help="Where new run directories are created."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory."),
) -> None:
    """Train a model as a YAML config describes; write metrics, checkpoints and curves to a run directory.

    Under torchrun (torchrun --nproc_per_node=N -m bnctl train ...) the N processes train one run together.
    """
    from bnctl import distributed

    if distributed.env_rank() == 0:
        return _train(overrides, config, run_dir, runs_root, resume)
    # Data-parallel ranks other than 0 stay quiet: rank 0 reports progress and every error they share
    # (config errors, agreed setup failures, divergence); crashes of this rank alone are still shown.
    console.quiet = True
    try:
        _train(overrides, config, run_dir, runs_root, resume)
    except BnctlError as err:
        if isinstance(err, distributed.LostPeer):
            raise  # this rank's own view of a broken group, which rank 0 may never report
        raise SystemExit(err.exit_code) from None  # not typer.Exit: reports_errors would report that


def _train(overrides: Optional[List[str]], config: Optional[Path], run_dir: Optional[Path], runs_root: Path,
           resume: Optional[Path]) -> None:
    from bnctl import config as config_mod, distributed

    overrides = overrides or []
    if resume is None and config is None:
        raise ConfigError("give --config FILE (e.g. configs/quickstart.yaml) or --resume RUN_DIR")
    if resume is not None and (config is not None or run_dir is not None):
        raise ConfigError("--resume takes its config from the run directory; drop --config/--run-dir")
    if resume is not None:
        cfg = _resume_config(resume, overrides)
        from bnctl import rundir

        done = rundir.epochs_completed(resume)
        if done >= cfg.train.epochs:
            console.print(f"{resume} already completed {done} epoch(s); nothing to do "
                          f"(extend it with: bnctl train --resume {resume} train.epochs=N)", soft_wrap=True)
            return
    else:
        cfg = config_mod.load(config, overrides)

    from bnctl import engine, plotting  # heavy imports only once the config is known to be valid
    from bnctl.diagnostics import BNProbe

    reporter = _RichReporter(cfg.train.epochs)
    started: dict[str, Path] = {}

    def announce(path: Path) -> None:
        started["dir"] = path
        verb = "resuming" if resume is not None else "run directory"
        console.print(f"[dim]{verb}:[/] {path}")

    trained = False
    try:
        with distributed.process_group(cfg.device) as dist:
            result = engine.fit(cfg, runs_root=runs_root, run_dir=run_dir, resume=resume, reporter=reporter,
                                on_run_dir=announce, probe_factory=BNProbe.for_experiment, dist=dist)
        trained = True
    finally:
        reporter.close()
        if "dir" in started and (started["dir"] / "metrics.csv").is_file():
            try:
                plotting.plot_run(started["dir"])
            except BnctlError:
                pass  # no complete epoch yet: nothing to draw
            except Exception:
                if trained:
                    raise
                # Training failed already: its error is the one to report, not the figure's.
    best = result.summary["best"]
    console.print(f"[bold green]done[/] best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']} "
                  f"in {result.summary['wall_time_s']:.1f}s")
    console.print(f"[dim]curves: {escape(str(result.run_dir / 'curves.png'))}   "
                  f"next: bnctl eval {escape(str(result.run_dir / 'checkpoints' / 'best.pt'))}[/]", soft_wrap=True)
    console.print(escape(str(result.run_dir)), soft_wrap=True)  # last line: the run directory, for scripts


# ------------------------------------------------------------------ eval

@app.command("eval")
@_reports_errors
def eval_(
    checkpoint: Path = typer.Argument(..., help="A checkpoint, e.g. RUN_DIR/checkpoints/best.pt"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Override data.root stored in the checkpoint."),
    device: Optional[str] = typer.Option(None, "--device", help="Evaluate on this device instead of the run's."),
    bn_mode: str = typer.Option("running", "--bn-mode",
                                help="running: BN uses population statistics (correct). "
                                     "batch: each test batch's own statistics (what a model left in train mode does)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Test batch size (matters for --bn-mode batch)."),
    recalibrate: int = typer.Option(0, "--recalibrate", min=0,
                                    help="Recompute BN statistics from N training images first (precise BN)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Evaluate a checkpoint on the test split in eval mode; write eval.json and confusion.png."""
    from bnctl import evaluation, plotting, rundir

    _existing(checkpoint, "checkpoint")
    result = evaluation.evaluate_checkpoint(checkpoint, data_root=data_root, device=device, bn_mode=bn_mode,
                                        batch_size=batch_size, recalibrate=recalibrate)
    out_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    eval_path = out_dir / "eval.json"
    rundir.write_json(eval_path, result)
    plotting.plot_confusion(eval_path)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    # The header is printed, not a table title: a title wraps to the table's narrow width.
    mode = ("BN running statistics" if bn_mode == "running"
            else f"BN statistics of each test batch of {result['batch_size']}")
    console.print(f"[bold]{checkpoint}[/] (epoch {result['epoch']}; {mode})", soft_wrap=True)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if bn_mode == "batch" and not result["bn_layers"]:
        console.print("[yellow]note:[/] this model has no BN layers, so --bn-mode batch changes nothing")
    table = Table()
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for cls, acc in result["per_class_acc"].items():
        table.add_row(cls, f"{acc:.2f}%")
    console.print(table)
    if "recalibration" in result:
        rec = result["recalibration"]
        console.print(f"before recalibration: accuracy {rec['before_acc']:.2f}%  loss {rec['before_loss']:.4f}\n"
                      f"after recalibration on {rec['images']} training images (batches of {rec['batch_size']}):")
    console.print(f"[bold]test loss {result['loss']:.4f}  accuracy {result['acc']:.2f}%[/]  "
                  f"({result['images']} images)")
    console.print(f"[dim]wrote {eval_path} and {eval_path.with_name('confusion.png')}[/]", soft_wrap=True)


# ------------------------------------------------------------------ plot and compare

@app.command()
@_reports_errors
def plot(run_dir: Path = typer.Argument(..., help="A run directory holding metrics.csv.")) -> None:
    """Redraw a run's figures from its files (metrics.csv, diagnostics.csv, eval.json)."""
    from bnctl import plotting

    for path in plotting.plot_run(_existing(run_dir, "run directory", holding="metrics.csv")):
        console.print(str(path))


def _compare_table(rows: list[dict[str, Any]], short: dict[str, str]):
    """The compare table: run name, the config values that differ, final and best metrics, epochs, wall time."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="train/test: the final epoch; best: the epoch with the highest test accuracy")
    table.add_column("run", overflow="fold")
    for name in short.values():
        table.add_column(name, overflow="fold")
    show_status = any(r["status"] != "completed" for r in rows)
    if show_status:
        table.add_column("status")
    for col in ("epochs", "train acc %", "test acc %", "test loss", "best acc %", "best epoch", "wall time s"):
        table.add_column(col, justify="right")
    num = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        cells = [r["name"], *(str(r["differs"][k]) for k in short)] + ([r["status"]] if show_status else [])
        cells += [str(r["epochs"]), num(r["final_train_acc"], ".2f"), num(r["final_test_acc"], ".2f"),
                  num(r["final_test_loss"], ".4f"), num(r["best_test_acc"], ".2f"), str(r["best_epoch"]),
                  num(r["wall_time_s"], ".1f")]
        table.add_row(*cells)
    return table


@app.command()
@_reports_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Two or more run directories."),
    out: Path = typer.Option(Path("compare.png"), "--out", "-o", help="Where to write the overlay figure."),
) -> None:
    """Overlay several runs' curves in one figure and tabulate their final and best metrics."""
    from bnctl import plotting

    runs = [plotting.load_run(_existing(d, "run directory", holding="metrics.csv")) for d in run_dirs]
    rows = plotting.compare_table(runs)
    table = _compare_table(rows, plotting.short_keys(list(rows[0]["differs"])))
    # Off a terminal (logs, CI) rich assumes 80 columns and would squeeze the table; give it room there.
    (console if console.is_terminal else Console(width=140, highlight=False)).print(table)
    console.print(str(plotting.plot_compare(runs, out)))


from bnctl.commands import sweep as sweep_cmd  # noqa: E402 - command groups register after the core commands

app.command(epilog=sweep_cmd.EPILOG)(sweep_cmd.sweep)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
