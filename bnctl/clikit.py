"""What every command module shares: the consoles, the --debug state, error reporting, path checks.

Command modules (bnctl/cli.py and bnctl/commands/*.py) import from here; library code never does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape

from bnctl.errors import BnctlError, ConfigError, InterruptedRun

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
state = {"debug": False}


def reports_errors(command: Callable) -> Callable:
    """Turn bnctl's known errors into a short message and exit code; no traceback unless --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BnctlError as err:
            if state["debug"]:
                raise
            label = "[bold yellow]stopped:[/]" if isinstance(err, InterruptedRun) else "[bold red]error:[/]"
            err_console.print(f"{label} {escape(str(err))}", soft_wrap=True)  # paths may hold [brackets]
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except typer.Exit:  # a command's own exit code (a sweep with failed runs), not an error of bnctl's
            raise
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
