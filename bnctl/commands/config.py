"""`bnctl config`: list, show and copy the built-in configs, sweep files and study profiles."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from bnctl import configfiles
from bnctl.clikit import console, reports_errors

app = typer.Typer(help="The built-in configs: list them, print one, copy one to edit "
                       "(train --config and sweep --sweep also take their names).", no_args_is_help=True)

USE = {"config": "bnctl train --config {}", "sweep": "bnctl sweep --sweep {} --dry-run",
       "study": "bnctl sweep --sweep {} --dry-run"}  # how a file of each kind is run


@app.command("list")
@reports_errors
def list_() -> None:
    """Every built-in config, sweep file and study section, with the first line of its comment."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "kind", "what it is"):
        table.add_column(column, overflow="fold")
    for name in configfiles.names():
        table.add_row(name, configfiles.kind(name), escape(configfiles.summary(configfiles.get(name))))
    console.print(table)
    console.print(f"[dim]files in {escape(str(configfiles.CONFIG_DIR))}; "
                  "bnctl config show NAME prints one, bnctl config copy NAME DEST copies one to edit[/]", soft_wrap=True)


@app.command()
@reports_errors
def show(
    name: str = typer.Argument(..., metavar="NAME", help="A built-in name (bnctl config list) or a config file."),
    resolved: bool = typer.Option(False, "--resolved",
                                  help="A config: print it validated, with every default filled in."),
) -> None:
    """Print a built-in config as shipped (comments included), or with --resolved every key it sets or defaults."""
    path = configfiles.resolve(name)
    if resolved:
        from bnctl import config as config_mod
        from bnctl.errors import ConfigError

        raw = config_mod.read_yaml(path)
        if isinstance(raw, dict) and ("grid" in raw or "base" in raw):
            raise ConfigError(f"{name} is a sweep file; to see its runs: bnctl sweep --sweep {name} --dry-run")
        sys.stdout.write(config_mod.to_yaml(config_mod.load(path)))
    else:
        sys.stdout.write(path.read_text(encoding="utf-8"))


@app.command()
@reports_errors
def copy(
    name: str = typer.Argument(..., metavar="NAME", help="A built-in name (bnctl config list)."),
    dest: Optional[Path] = typer.Argument(None, metavar="[DEST]",
                                          help="File or existing folder (default: NAME's last part, e.g. "
                                               "quickstart.yaml, in the working directory)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite DEST if it exists."),
) -> None:
    """Copy a built-in config or sweep file to edit, then run the copy by its path."""
    target = configfiles.copy(name, dest, force)
    use = USE[configfiles.kind(str(name).removesuffix(configfiles.SUFFIX))].format(target)
    console.print(f"wrote {escape(str(target))}; edit it, then: {escape(use)}", soft_wrap=True)
