"""`bnctl report SWEEP_DIR`: statistics over seeds, summary.csv, report.md and figures for a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from bnctl.clikit import console, existing, print_table, reports_errors


@reports_errors
def report(
    sweep_dir: Path = typer.Argument(..., help="A sweep directory (holding sweep.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report here instead of the sweep dir."),
) -> None:
    """Aggregate a sweep over seeds: mean, std, n and 95% intervals per cell; write report.md, summary.csv, figures."""
    from bnctl import report as report_mod
    from bnctl.report import missing_lines

    existing(sweep_dir, "sweep directory", holding=report_mod.SWEEP_FILE)
    rep = report_mod.build(sweep_dir, out)
    print_table(rep.header, rep.body, len(rep.data.grid), caption="mean ± sample std [95% t-interval] over completed seeds")
    if rep.missing:
        console.print(f"[yellow]incomplete:[/] {len(rep.missing)} of {len(rep.data.rows)} runs are not results yet "
                      f"(finish them with: bnctl sweep --resume {escape(str(sweep_dir))})", soft_wrap=True)
        for line in missing_lines(rep.missing)[:20]:
            console.print(f"  {escape(line)}", soft_wrap=True)
        if len(rep.missing) > 20:
            console.print(f"  ... and {len(rep.missing) - 20} more (all listed in report.md)")
    for path in rep.files:
        console.print(escape(str(path)), soft_wrap=True)
