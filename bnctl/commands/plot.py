"""`bnctl plot`: redraw a run's figures from its files."""

from __future__ import annotations

from pathlib import Path

import typer

from bnctl.clikit import console, existing, reports_errors


@reports_errors
def plot(run_dir: Path = typer.Argument(..., help="A run directory holding metrics.csv.")) -> None:
    """Redraw a run's figures from its files (metrics.csv, diagnostics.csv, eval/*.json)."""
    from bnctl import plotting

    for path in plotting.plot_run(existing(run_dir, "run directory", holding="metrics.csv")):
        console.print(str(path))
