"""bnctl's command line: each command parses, calls one library function, and reports.

Heavy imports (torch, matplotlib) happen inside the commands that need them so
that `bnctl --help` and `bnctl plot` start quickly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import BnctlGroup, console, existing as _existing, loading_progress, plain_help
from bnctl.clikit import reports_errors as _reports_errors
from bnctl.clikit import state as _state
from bnctl.commands import runs as runs_cmd
from bnctl.clikit import sigterm_stops_like_ctrl_c, sigkill_test_hook
from bnctl.errors import BnctlError, ConfigError

plain_help()
app = typer.Typer(
    name="bnctl",
    cls=BnctlGroup,
    help="Run, compare and understand Batch Normalization experiments on CNNs.\n\n"
         "Quick start:  bnctl train --config quickstart",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("bnctl")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown (not installed)"
        console.print(f"bnctl {version}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also after the command)."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print bnctl's version and exit.")) -> None:
    _state["debug"] = debug


# ------------------------------------------------------------------ train

class _RichReporter:
    """A progress bar during each epoch and one table row when it ends."""

    COLUMNS = [("epoch", 5), ("train loss", 10), ("train acc", 9), ("test loss", 9), ("test acc", 8),
               ("lr", 9), ("time", 7), ("img/s", 7)]

    CLEAN_COLUMNS = [("clean train acc", 15)]

    def __init__(self, total_epochs: int, clean_train: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total_epochs = total_epochs
        self.columns = self.COLUMNS + (self.CLEAN_COLUMNS if clean_train else [])  # train.eval_train's column
        # A live bar only on a terminal; in logs and CI the per-epoch rows say enough.
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(total_epochs)), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 console=console, transient=True, disable=not console.is_terminal)
        self.task = None
        self.header_shown = False

    def epoch_start(self, epoch: int, steps: int) -> None:
        if not self.header_shown:
            # soft_wrap: a row wider than the console stays one line in logs (the terminal wraps it, if anything)
            console.print("[bold]" + "  ".join(f"{name:>{w}}" for name, w in self.columns), soft_wrap=True)
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
        if len(self.columns) > len(self.COLUMNS):
            cells.append(f"{row['clean_train_acc']:.2f}%" if row.get("clean_train_acc") is not None else "-")
        console.print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self.columns)), soft_wrap=True)
        sigkill_test_hook(row["epoch"])

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

    from bnctl import elastic, engine, plotting  # heavy imports only once the config is known to be valid
    from bnctl.diagnostics import BNProbe

    reporter = _RichReporter(cfg.train.epochs, clean_train=cfg.train.eval_train)
    started: dict[str, Path] = {}

    def announce(path: Path) -> None:
        started["dir"] = path
        verb = "resuming" if resume is not None else "run directory"
        restart = elastic.attempt()
        if restart is not None and restart.restart > 0:
            verb += f" (torchrun restart {restart.restart})"
        console.print(f"[dim]{verb}:[/] {escape(str(path))}", soft_wrap=True)

    trained = False
    t0 = time.perf_counter()
    try:
        with loading_progress(), distributed.process_group(cfg.device) as dist:
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
    took = f"in {time.perf_counter() - t0:.1f}s"
    if resume is not None:  # summary.json's wall time adds up every session of the run
        took += f" ({result.summary['wall_time_s']:.1f}s over all sessions of this run)"
    console.print(f"[bold green]done[/] best test accuracy {best['test_acc']:.2f}% at epoch {best['epoch']} {took}",
                  soft_wrap=True)
    console.print(f"[dim]curves: {escape(str(result.run_dir / 'curves.png'))}   "
                  f"next: bnctl eval {escape(str(result.run_dir / 'checkpoints' / 'best.pt'))}[/]", soft_wrap=True)
    console.print(escape(str(result.run_dir)), soft_wrap=True)  # last line: the run directory, for scripts


# ------------------------------------------------------------------ eval

@app.command("eval")
@_reports_errors
def eval_(
    targets: List[Path] = typer.Argument(..., metavar="RUN_DIR_OR_CHECKPOINT...",
                                         help="Run directories (their checkpoints/best.pt) or checkpoint files; "
                                              "several give one table."),
    data_root: Optional[str] = typer.Option(None, "--data-root",
                                            help="Where the data is now (overrides data.root stored in the "
                                                 "checkpoint; a relative one is first tried from the run's own "
                                                 "working directory)."),
    device: Optional[str] = typer.Option(None, "--device", help="Evaluate on this device instead of the run's."),
    bn_mode: str = typer.Option("running", "--bn-mode",
                                help="running: BN uses population statistics (correct). "
                                     "batch: each test batch's own statistics (what a model left in train mode does)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Test batch size (matters for --bn-mode batch)."),
    recalibrate: int = typer.Option(0, "--recalibrate", min=0,
                                    help="Recompute BN statistics from N training images first (precise BN)."),
    recalibrate_batch_size: Optional[int] = typer.Option(
        None, "--recalibrate-batch-size", min=2, help="Batch size for --recalibrate (default: the training batch size)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object; a list for several) instead of tables."),
) -> None:
    """Evaluate checkpoints on the test split; keep each result as RUN/eval/<what was measured>.json and .png."""
    from bnctl import evaluation, rundir

    checkpoints = [rundir.checkpoint_for(t) for t in targets]  # every path is checked before any work
    results = []
    for ckpt in checkpoints:
        with loading_progress():
            results.append(evaluation.evaluate_checkpoint(ckpt, data_root=data_root, device=device,
                                                          bn_mode=bn_mode,
                                                          batch_size=batch_size, recalibrate=recalibrate,
                                                          recalibrate_batch_size=recalibrate_batch_size))
    # Print first, then write: a read-only run directory must not cost the result.
    if as_json:
        sys.stdout.write(json.dumps(results[0] if len(results) == 1 else results) + "\n")
        sys.stdout.flush()
    elif len(results) == 1:
        _print_eval(checkpoints[0], results[0])
    else:
        _print_eval_table(checkpoints, results)
    written = [_write_eval(ckpt, res, recalibrate, recalibrate_batch_size) for ckpt, res in zip(checkpoints, results)]
    if not as_json:
        for paths in filter(None, written):
            console.print(f"[dim]wrote {escape(str(paths[0]))} and {escape(paths[1].name)}[/]", soft_wrap=True)


def _write_eval(ckpt: Path, result: dict, recalibrate: int, recalibrate_batch_size: Optional[int]):
    """Write RUN/eval/<name>.json and its confusion figure; a failure is a warning naming the path."""
    from bnctl import plotting, rundir

    from bnctl.clikit import err_console

    out_dir = rundir.run_dir_of(ckpt) / rundir.EVAL_DIR
    path = out_dir / (rundir.eval_output_name(result, recalibrate, recalibrate_batch_size) + ".json")
    try:
        out_dir.mkdir(exist_ok=True)
        rundir.write_json(path, result)
        png = plotting.plot_confusion(path)
    except OSError as err:
        err_console.print(f"[yellow]warning:[/] could not write {escape(str(path))} and its figure "
                          f"({escape(err.strerror or str(err))}); the result above is not saved", soft_wrap=True)
        return None
    return path, png


def _print_eval(checkpoint: Path, result: dict) -> None:
    from rich.table import Table

    # The header is printed, not a table title: a title wraps to the table's narrow width.
    mode = ("BN running statistics" if result["bn_mode"] == "running"
            else f"BN statistics of each test batch of {result['batch_size']}")
    console.print(f"[bold]{escape(str(checkpoint))}[/] (epoch {result['epoch']}; {mode})", soft_wrap=True)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if result["bn_mode"] == "batch" and not result["bn_layers"]:
        console.print("[yellow]note:[/] this model has no BN layers, so --bn-mode batch changes nothing")
    table = Table()
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for cls, acc in result["per_class_acc"].items():
        table.add_row(escape(cls), f"{acc:.2f}%")
    console.print(table)
    if "recalibration" in result:
        rec = result["recalibration"]
        console.print(f"before recalibration: accuracy {rec['before_acc']:.2f}%  loss {rec['before_loss']:.4f}\n"
                      f"after recalibration on {rec['images']} training images (batches of {rec['batch_size']}):")
    console.print(f"[bold]test loss {result['loss']:.4f}  accuracy {result['acc']:.2f}%[/]  "
                  f"({result['images']} images)")


def _print_eval_table(checkpoints: List[Path], results: List[dict]) -> None:
    """Several evaluations: one row each."""
    from rich import box
    from rich.table import Table

    from bnctl import rundir
    from bnctl.clikit import wide_console

    first = results[0]
    mode = ("BN running statistics" if first["bn_mode"] == "running"
            else f"BN statistics of each test batch of {first['batch_size']}")
    if "recalibration" in first:
        mode += f", recalibrated on {first['recalibration']['images']} training images"
    console.print(f"[bold]{len(results)} checkpoints[/] ({mode})", soft_wrap=True)
    for note in dict.fromkeys(n for res in results for n in res.get("notes", [])):  # each note once
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    recal = "recalibration" in first
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("run", no_wrap=True)
    for col in ("epoch", "images") + (("acc before %",) if recal else ()) + ("test loss", "test acc %"):
        table.add_column(col, justify="right", no_wrap=True)
    for ckpt, res in zip(checkpoints, results):
        label = rundir.run_dir_of(ckpt).name + ("" if ckpt.name == "best.pt" else f" ({ckpt.name})")
        cells = [escape(label), str(res["epoch"]), str(res["images"])]
        if recal:
            cells.append(f"{res['recalibration']['before_acc']:.2f}")
        table.add_row(*cells, f"{res['loss']:.4f}", f"{res['acc']:.2f}")
    wide_console().print(table)


# ------------------------------------------------------------------ plot and compare

@app.command()
@_reports_errors
def plot(run_dir: Path = typer.Argument(..., help="A run directory holding metrics.csv.")) -> None:
    """Redraw a run's figures from its files (metrics.csv, diagnostics.csv, eval/*.json)."""
    from bnctl import plotting

    for path in plotting.plot_run(_existing(run_dir, "run directory", holding="metrics.csv")):
        console.print(str(path))


# Two-line headers, so that the metrics fit in 80 columns beside the run, status and epochs.
_COMPARE_METRICS = [("final_train_acc", "train\nacc", ".2f"), ("final_test_acc", "test\nacc", ".2f"),
                    ("final_test_loss", "test\nloss", ".4f"), ("best_test_acc", "best\nacc", ".2f"),
                    ("best_epoch", "best\nepoch", "d"), ("wall_time_s", "time\ns", ".1f")]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _compare_tables(rows: list[dict[str, Any]], keys: list[str], short: dict[str, str], width: int) -> list:
    """The compare table, with the differing keys as columns; when that is wider than the screen, the
    metrics table and a second one holding the keys (a row per key, a column per run)."""
    from rich import box
    from rich.measure import Measurement
    from rich.table import Table

    from bnctl.clikit import console as measure_console

    caption = ("accuracy in %; train/test: the final epoch; best: the epoch with the highest test accuracy; "
               "time: wall-clock seconds")
    show_status = any(r["status"] != "completed" for r in rows)
    planned_differs = len({r["epochs_planned"] for r in rows}) > 1 or any(r["epochs"] != r["epochs_planned"]
                                                                         for r in rows)

    def metrics_table(with_keys: bool) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption=caption)
        table.add_column("run", overflow="fold")  # folded whole rather than cut to "…"
        for k in keys if with_keys else []:
            table.add_column(short[k], no_wrap=True)
        if show_status:
            table.add_column("status", no_wrap=True)
        table.add_column("epochs", justify="right", no_wrap=True)
        for _, header, _ in _COMPARE_METRICS:
            table.add_column(header, justify="right", no_wrap=True)
        for r in rows:
            epochs = f"{r['epochs']}/{r['epochs_planned']}" if planned_differs and r["epochs_planned"] else str(r["epochs"])
            table.add_row(escape(r["name"]), *([escape(_fmt_key_value(r["differs"][k])) for k in keys] if with_keys
                                               else []),
                          *([r["status"]] if show_status else []), epochs,
                          *(_cell(r[field], fmt) for field, _, fmt in _COMPARE_METRICS))
        return table

    combined = metrics_table(with_keys=True)
    if not keys or Measurement.get(measure_console, measure_console.options.update(width=10**6),
                                   combined).maximum <= width:
        return [combined]
    def keys_table(group: list[dict[str, Any]], title: str | None) -> Table:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=title, title_justify="left")
        table.add_column("key", no_wrap=True)
        for r in group:
            table.add_column(escape(r["name"]), no_wrap=True)
        for k in keys:
            table.add_row(k, *(escape(_fmt_key_value(r["differs"][k])) for r in group))
        return table

    def fits(table: Table) -> bool:
        return Measurement.get(measure_console, measure_console.options.update(width=10**6), table).maximum <= width

    # As many runs per keys table as fit: a value folded across lines reads as another value ("0.00" over "5").
    groups: list[list[dict[str, Any]]] = [[]]
    for r in rows:
        if groups[-1] and not fits(keys_table(groups[-1] + [r], None)):
            groups.append([])
        groups[-1].append(r)
    return [metrics_table(with_keys=False)] + [keys_table(g, "how the runs differ" if i == 0 else None)
                                               for i, g in enumerate(groups)]


def _fmt_key_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


@app.command()
@_reports_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...",
                                          help="Run directories to compare (one or more)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Where to write the overlay figure (default: compare.png; "
                                            "with --csv/--json only when given)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV (full key names) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as a JSON list instead."),
) -> None:
    """Tabulate runs' final and best metrics and the config keys in which they differ; overlay their curves."""
    from bnctl import plotting

    if as_csv and as_json:
        raise ConfigError("choose one of --csv and --json")
    runs = [plotting.load_run(_existing(d, "run directory", holding="metrics.csv")) for d in run_dirs]
    rows = plotting.compare_table(runs)
    # train.epochs has the epochs column (done/planned) already; the other differing keys get their own.
    keys = [k for k in plotting.differing_keys(runs) if k != "train.epochs"]
    if as_json or as_csv:
        records = [{"name": r["name"], "dir": r["dir"], "status": r["status"], "epochs": r["epochs"],
                    "epochs_planned": r["epochs_planned"], **{k: r["differs"].get(k) for k in keys},
                    **{field: r[field] for field, _, _ in _COMPARE_METRICS}} for r in rows]
        if as_json:
            sys.stdout.write(json.dumps(records, indent=1) + "\n")
        else:
            import csv

            writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in records)
        if out is not None:
            plotting.plot_compare(runs, out)
        return
    from bnctl.clikit import wide_console

    short = plotting.short_keys(keys)
    target = wide_console()
    tables = _compare_tables(rows, keys, short, target.width)
    for table in tables:
        target.print(table)
    legend = [f"{short[k]} = {k}" for k in keys if short[k] != k]
    if legend and len(tables) == 1:  # a separate keys table spells the keys out already
        console.print("[dim]keys: " + escape(", ".join(legend)) + "[/]", soft_wrap=True)
    console.print(str(plotting.plot_compare(runs, out or Path("compare.png"))))


app.command("runs")(runs_cmd.runs)


from bnctl.commands import sweep as sweep_cmd  # noqa: E402 - command groups register after the core commands

app.command(epilog=sweep_cmd.EPILOG)(sweep_cmd.sweep)

from bnctl.commands import report as _report_cmd  # noqa: E402  (command groups register after the core commands)

app.command()(_report_cmd.report)

from bnctl.commands import study as _study_cmd  # noqa: E402

app.add_typer(_study_cmd.app, name="study")
app.add_typer(__import__("bnctl.commands.config", fromlist=["app"]).app, name="config")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
