"""What every command module shares: the consoles, the --debug state, error reporting, path checks.

Command modules (bnctl/cli.py and bnctl/commands/*.py) import from here; library code never does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
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
