"""`bnctl report SWEEP_DIR`: statistics over seeds, summary.csv, report.md and figures for a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import console, existing, print_table, reports_errors


@reports_errors
def report(
    sweep_dir: Path = typer.Argument(..., help="A sweep directory (holding sweep.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report here instead of the sweep dir."),
    reference: Optional[List[str]] = typer.Option(
        None, "--reference", metavar="KEY=VALUE",
        help="The level of a swept key that the others are compared against (default: model.norm=none when "
             "swept, else the key's first value); repeatable."),
) -> None:
    """Aggregate a sweep over seeds: mean, std, n and 95% intervals per cell, and the differences between the
    levels of each swept key (Welch); write report.md, summary.csv, differences.csv, figures."""
    from bnctl import config as config_mod, report as report_mod
    from bnctl.report import missing_lines

    existing(sweep_dir, "sweep directory", holding=report_mod.SWEEP_FILE)
    rep = report_mod.build(sweep_dir, out, config_mod.parse_overrides(reference or []))
    print_table(rep.header, rep.body, len(rep.data.grid), caption="mean ± sample std [95% t-interval] over completed seeds")
    if rep.differences:
        header, body = report_mod.difference_rows(rep.differences)
        print_table(header, body, 3, caption="level minus reference, over completed seeds: mean difference "
                                             "[Welch 95% interval] (n = completed runs level/reference)")
    if rep.missing:
        console.print(f"[yellow]incomplete:[/] {len(rep.missing)} of {len(rep.data.rows)} runs are not results yet "
                      f"(finish them with: bnctl sweep --resume {escape(str(sweep_dir))})", soft_wrap=True)
        for line in missing_lines(rep.missing)[:20]:
            console.print(f"  {escape(line)}", soft_wrap=True)
        if len(rep.missing) > 20:
            console.print(f"  ... and {len(rep.missing) - 20} more (all listed in report.md)")
    for path in rep.files:
        console.print(escape(str(path)), soft_wrap=True)
