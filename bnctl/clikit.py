"""What every command module shares: the consoles, the --debug state, error reporting, path checks,
and the screen's pieces (tables, "-" for a missing number, the training and sweep progress reporters).

Command modules (bnctl/cli.py and bnctl/commands/*.py) import from here; library code never does.

Over 350 lines: the two live progress displays (a training run's and a sweep's) are most of it, and
they belong with the tables and consoles they draw with; splitting them would spread one screen's look
over several files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from bnctl.errors import BnctlError, ConfigError, InterruptedRun

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
state: dict[str, Any] = {"debug": False, "signal": None}

# Exit codes of a run stopped by a signal: 128 + the signal's number, the shell's convention.
CTRL_C_EXIT = 130
SIGTERM_EXIT = 143
SIGPIPE_EXIT = 141


def reports_errors(command: Callable) -> Callable:
    """Turn bnctl's known errors into a short message and exit code; no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BnctlError as err:
            if state["debug"]:
                raise
            code, label = err.exit_code, "[bold red]error:[/]"
            if isinstance(err, InterruptedRun):
                by = err.signal or state["signal"]
                code = SIGTERM_EXIT if by == "SIGTERM" else err.exit_code
                label = f"[bold yellow]stopped{f' ({by})' if by else ''}:[/]"
            err_console.print(f"{label} {escape(str(err))}", soft_wrap=True)  # paths may hold [brackets]
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            by = state["signal"]
            err_console.print(f"[yellow]interrupted{f' ({by})' if by else ''}[/]")
            raise typer.Exit(SIGTERM_EXIT if by == "SIGTERM" else CTRL_C_EXIT) from None
        except typer.Exit:  # a command's own exit code (a sweep with failed runs), not an error of bnctl's
            raise
        except BrokenPipeError:  # `bnctl ... | head`: the reader has all it wanted; exit as `cat` would
            with contextlib.suppress(OSError, ValueError):  # and keep Python's flush at exit from failing again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(SIGPIPE_EXIT) from None
        except Exception as err:  # a bug in bnctl or an environment problem: still no wall of text by default
            if state["debug"]:
                raise
            first = (str(err).strip().splitlines() or [""])[0][:300]
            err_console.print(f"[bold red]internal error:[/] {type(err).__name__}: {escape(first)}\n"
                              "run again with `bnctl --debug ...` for the traceback", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def existing(path: Path, kind: str, holding: str | None = None) -> Path:
    """A path argument that must exist (a folder holding `holding`, if given); a usage error (exit 2) otherwise."""
    if not path.exists():
        raise ConfigError(f"{kind} not found: {path}")
    if holding is not None:
        if not path.is_dir():
            raise ConfigError(f"{path} is a file; give a {kind} (the folder holding {holding})")
        if not (path / holding).is_file():
            raise ConfigError(f"{path} is not a bnctl {kind} (no {holding})")
    return path


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """While a command trains, SIGTERM stops it exactly as Ctrl-C does (exit code 143 instead of 130).

    Slurm, Kubernetes and torchrun send SIGTERM and wait some seconds before SIGKILL. Python's default
    is to die at once, leaving a run marked "running"; raising KeyboardInterrupt instead sends the run
    down the engine's Ctrl-C path (status "interrupted", last checkpoint kept, resume hint). Under
    torchrun (WORLD_SIZE > 1) SIGTERM and SIGINT only request the stop, which every rank then honours
    at the same step (see bnctl/stopping.py). The handler belongs to the command, not the library: a
    program that embeds bnctl.engine owns its process's signals. Only the first signal counts; later
    ones (torchrun forwards the one the shell already delivered) are ignored so the stop can finish.
    """
    from bnctl import stopping

    state["signal"] = None
    stopping.clear()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    together = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1

    def on_signal(signum: int, frame: Any) -> None:
        if state["signal"] is not None:
            return
        state["signal"] = signal.Signals(signum).name
        if together:
            stopping.request(state["signal"])
        else:
            raise KeyboardInterrupt(state["signal"])

    caught = [signal.SIGTERM, signal.SIGINT] if together else [signal.SIGTERM]
    previous = {signum: signal.signal(signum, on_signal) for signum in caught}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


TEST_KILL_ENV = "BNCTL_TEST_SIGKILL_AFTER_EPOCH"


def sigkill_test_hook(epoch: int) -> None:
    """A test hook, not a feature: BNCTL_TEST_SIGKILL_AFTER_EPOCH=N[:RANK] makes the process of rank RANK
    (default 0) SIGKILL itself once epoch N is saved, on torchrun's first attempt only, so that tests can
    check that `torchrun --max-restarts` continues the run. Unset, it does nothing."""
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_epoch, _, kill_rank = spec.partition(":")
    if epoch == int(kill_epoch) and os.environ.get("RANK", "0") == (kill_rank or "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def wide_console() -> Console:
    """The console for wide tables: the terminal's width, else $COLUMNS, else 140 (logs and CI are not 80 wide)."""
    if console.is_terminal:
        return console
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() and int(columns) > 0 else 140, highlight=False)


class BnctlGroup(typer.core.TyperGroup):
    """The command group: `--debug` counts wherever it appears (`bnctl train --debug ...` too)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if "--" in args:
            head, tail = args[: args.index("--")], args[args.index("--"):]
        else:
            head, tail = args, []
        if "--debug" in head[1:]:
            head = ["--debug"] + [a for a in head if a != "--debug"]
        return super().parse_args(ctx, head + tail)


def plain_help() -> None:
    """Help in the usual Unix style: no '<bool>' after flags, no '{name}' braces around required arguments.

    Typer 0.2x decorates both; its private hooks are replaced only when they exist, so another
    version falls back to its own style (tests/test_usability.py checks the result).
    """
    option, argument = typer.core.TyperOption, typer.core.TyperArgument
    if hasattr(option, "display_type_rich") and not getattr(option, "_bnctl_plain", False):
        shown = option.display_type_rich

        def display_type_rich(self, ctx):
            return None if getattr(self, "is_flag", False) else shown(self, ctx)

        option.display_type_rich = display_type_rich
        option._bnctl_plain = True
    if hasattr(argument, "_usage_display_name") and not getattr(argument, "_bnctl_plain", False):
        def _usage_display_name(self) -> str:
            name = self.metavar or self.name.upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 and not name.endswith("...") else "")  # metavar "X..." once

        argument._usage_display_name = _usage_display_name
        argument._bnctl_plain = True


@contextlib.contextmanager
def loading_progress() -> Iterator[None]:
    """Show dataset loading progress (decoding image folders): a bar on a terminal, one line per split elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bnctl import data

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=err_console, transient=True, disable=not err_console.is_terminal)
    tasks: dict[str, Any] = {}

    def report(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(escape(what), total=total)
            if not err_console.is_terminal:
                err_console.print(f"[dim]{escape(what)}: {total} images[/]", soft_wrap=True)
        progress.update(tasks[what], completed=done)

    with progress, data.reporting_progress(report):
        yield


# ------------------------------------------------------------------ what the screen shows

MISSING = "-"  # a number a run does not have (yet): no epoch finished, a summary without it


def cell(value: Any, fmt: str = "") -> str:
    """A table cell: the value formatted, or "-" when it is missing."""
    return MISSING if value is None else format(value, fmt)


def new_table(**options: Any):
    """bnctl's table style: a rule under the header, no outer border or edge padding (copies and greps well)."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, **options)


def print_table(header: list[str], body: list[list[str]], n_left: int, caption: str | None = None) -> None:
    """A rich table; off a terminal (logs, CI) it gets room instead of rich's assumed 80 columns."""
    table = new_table(caption=caption)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < n_left else "right", overflow="fold")
    for row in body:
        table.add_row(*(escape(c) for c in row))
    (console if console.is_terminal else Console(width=180, highlight=False)).print(table)


class TrainProgress:
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
            cells.append(f"{row['clean_train_acc']:.2f}%" if row.get("clean_train_acc") is not None else MISSING)
        console.print("  ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, self.columns)), soft_wrap=True)
        sigkill_test_hook(row["epoch"])

    def close(self) -> None:
        self.progress.stop()


class SweepProgress:
    """One bar over the whole sweep (runs done / total, failures, ETA) and one line per finished run.

    Off a terminal (a log file, a batch job) there is no bar: one line per finished run, and while
    runs train, an "alive" line whenever nothing was printed for ALIVE_EVERY_S seconds.
    """

    ALIVE_EVERY_S = 60.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # The live bar only on a terminal; in logs the per-run lines say enough.
        self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), TextColumn("{task.fields[counts]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=True, disable=not console.is_terminal,
                                 speed_estimate_period=3600)
        self.task = None
        self.running: dict[str, float] = {}  # run -> fraction of its epochs done
        self.epochs: dict[str, tuple[int, int]] = {}  # run -> (epochs done, epochs)
        self.finished = self.failed = self.diverged = self.done_before = self.total = 0
        self.clock = clock
        self.started = self.last_line = clock()
        self._alive: threading.Event | None = None

    def start(self, plan, selected, todo, jobs, partly_done=0) -> None:
        self.total, self.done_before = len(selected), len(selected) - len(todo)
        partly = f" ({partly_done} partly done, continued from their checkpoints)" if partly_done else ""
        console.print(f"[bold]{plan.name}[/]: {len(selected)} run(s) in this {'shard' if len(selected) < len(plan.runs) else 'sweep'}"
                      f", {self.done_before} already finished, {len(todo)} to run{partly} with {jobs} job(s)")
        self.progress.start()
        self.task = self.progress.add_task("sweep", total=max(1, len(todo)), counts=self._counts())
        self.started = self.last_line = self.clock()
        if not console.is_terminal and self._alive is None:
            self._alive = threading.Event()
            threading.Thread(target=self._keep_alive, args=(self._alive,), daemon=True,
                             name="bnctl-sweep-alive").start()

    def _keep_alive(self, stop: threading.Event) -> None:
        while not stop.wait(min(self.ALIVE_EVERY_S, 5.0)):
            line = self.alive_line()
            if line:
                console.print(line, soft_wrap=True, markup=False, highlight=False)

    def alive_line(self) -> str | None:
        """The line a log gets when runs are training and nothing was printed for ALIVE_EVERY_S (else None)."""
        now = self.clock()
        if not self.running or now - self.last_line < self.ALIVE_EVERY_S:
            return None
        self.last_line = now
        runs = ", ".join(f"{name} (epoch {done}/{total})" if total else name
                         for name, (done, total) in ((n, self.epochs.get(n, (0, 0))) for n in list(self.running)))
        return (f"{'':>11} still training: {runs}; {self.done_before + self.finished}/{self.total} runs done, "
                f"{(now - self.started) / 60:.0f} min since the start")

    def _counts(self) -> str:
        done = self.done_before + self.finished
        extra = "".join([f", [red]{self.failed} failed[/]" if self.failed else "",
                         f", [yellow]{self.diverged} diverged[/]" if self.diverged else ""])
        return f"{done}/{self.total} runs{extra}, {len(self.running)} running"

    def _update(self) -> None:
        self.progress.update(self.task, completed=self.finished + sum(self.running.values()), counts=self._counts())

    def run_started(self, spec) -> None:
        self.running[spec.name] = 0.0
        self._update()

    def run_progress(self, spec, epoch: int, epochs: int) -> None:
        self.running[spec.name] = epoch / max(1, epochs)
        self.epochs[spec.name] = (epoch, epochs)
        self._update()

    def run_finished(self, spec, outcome: str, row: dict[str, Any]) -> None:
        self.running.pop(spec.name, None)
        self.finished += 1
        self.failed += outcome == "failed"
        self.diverged += outcome == "diverged"
        style = {"completed": "green", "diverged": "yellow", "failed": "red"}.get(outcome, "dim")
        detail = (f"test acc {cell(row['final_test_acc'], '.2f')}%  best {cell(row['best_test_acc'], '.2f')}%  "
                  f"wall time {cell(row['wall_time_s'], '.1f')}s")
        if outcome in ("failed", "diverged") and row.get("error"):
            detail += f"  {str(row['error']).splitlines()[0][:160]}"
        elif outcome == "busy":
            detail = "being run by another process; left to it"
        elif outcome == "skipped":
            detail = "finished by another process"
        elif outcome == "interrupted":
            detail = (f"stopped after {row['epochs'] or 0} epoch(s); resumable" if row.get("status") == "interrupted"
                      else f"stopped before it began; left {row.get('status')}")
        console.print(f"[{style}]{outcome:>11}[/] {escape(spec.name)}  {escape(detail)}", soft_wrap=True)
        self.last_line = self.clock()
        self.epochs.pop(spec.name, None)
        self._update()

    def close(self) -> None:
        if self._alive is not None:
            self._alive.set()
            self._alive = None
        self.progress.stop()
