"""`bnctl runs [ROOT]`: every run under a folder, with its status, progress and results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.markup import escape

from bnctl.clikit import cell, console, new_table, reports_errors, wide_console


@reports_errors
def runs(
    root: Path = typer.Argument(Path("runs"), metavar="ROOT", help="A folder of run directories (or one run)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of the table."),
) -> None:
    """List runs: name, status (stale: says running, but no process holds it), epochs, test accuracy, wall time."""
    from bnctl import rundir

    found = rundir.list_runs(root)
    if as_json:
        sys.stdout.write(json.dumps(found, indent=1) + "\n")
        return
    if not found:
        console.print(f"no runs under {escape(str(root))}")
        return
    table = new_table(caption="best: the epoch with the highest test accuracy; final: the last completed epoch")
    table.add_column("run", overflow="fold")  # a long name folds whole onto a second line, never cut to "…"
    table.add_column("status", no_wrap=True)
    for col in ("epochs", "best\nacc %", "best\nepoch", "final\nacc %", "wall\ntime s"):  # 80 columns fit
        table.add_column(col, justify="right", no_wrap=True)
    for r in found:
        planned = r["epochs_planned"]
        table.add_row(escape(r["name"]), r["status"], f"{r['epochs_completed']}/{planned if planned else '?'}",
                      cell(r["best_test_acc"], ".2f"), cell(r["best_epoch"], "d"), cell(r["final_test_acc"], ".2f"),
                      cell(r["wall_time_s"], ".1f"))
    wide_console().print(table)
