"""`bnctl study claims`: run the sweeps that test the notebook's claims and write one REPORT.md."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import (SweepProgress, console, err_console, existing, print_table, reports_errors,
                          sigterm_stops_like_ctrl_c)

app = typer.Typer(help="Packaged studies: sweeps plus a report with verdicts.", no_args_is_help=True)


@app.command()
@reports_errors
@sigterm_stops_like_ctrl_c()  # a scheduler's SIGTERM: the same stop, line and resumable runs as Ctrl-C
def claims(
    overrides: Optional[List[str]] = typer.Argument(
        None, metavar="KEY=VALUE", help="Fixed overrides for every sweep, e.g. data.name=cifar10 data.root=./data"),
    profile: Optional[str] = typer.Option(None, "--profile", "-p",
                                          help="quick (default: synthetic data, 134 runs, about 6 min on an idle 2-core CPU "
                                               "with --jobs 2), laptop (CIFAR-10 or an image folder, 206 runs, "
                                               "about 14 min there) or full (CIFAR-10-sized budget, for a GPU)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1,
                                       help="Runs at once (CPU threads are divided between them); default 1, "
                                            "or with --resume the study's own."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish a study directory that was stopped."),
    root: Path = typer.Option(Path("runs/studies"), "--root", help="Where new study directories are created."),
    studies: Optional[Path] = typer.Option(None, "--studies",
                                           help="Folder of the profiles' sweep files (default: the built-in bnctl/configs/studies)."),
    report_only: bool = typer.Option(False, "--report-only", help="With --resume: rewrite REPORT.md, run nothing."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Validate every sweep of the profile, print its runs per section, create nothing."),
) -> None:
    """Test the notebook's claims (lr, init, regularization, small batches, its evaluation) with seeds and verdicts."""
    from bnctl import study

    overrides = overrides or []
    if dry_run:
        _print_plan(study.plan(profile or "quick", overrides, studies), resume)
        return
    if resume is None:
        if report_only:
            from bnctl.errors import ConfigError

            raise ConfigError("--report-only rewrites the report of an existing study; give --resume STUDY_DIR")
        study_dir = study.create(profile or "quick", overrides, root, studies)
        console.print(f"[dim]study directory:[/] {escape(str(study_dir))}  "
                      f"(if stopped, continue with: bnctl study claims --resume {escape(str(study_dir))})",
                      soft_wrap=True)
    else:
        study_dir = existing(resume, "study directory", holding=study.STUDY_FILE)
        study.resume_check(study_dir, profile, overrides)
        if jobs is None and not report_only:
            recorded = study.read(study_dir).get("jobs")
            jobs = int(recorded or 1)
            console.print(f"[dim]--jobs {jobs}: {'as recorded in the study' if recorded else 'the default'}[/]")
    jobs = jobs or 1
    if report_only:
        result = study.write_report(study_dir)
    else:
        est, warning = study.preflight(study_dir, jobs)
        console.print(f"[bold]study:[/] {escape(est.line())}", soft_wrap=True)
        if warning:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
        result = study.run(study_dir, jobs=jobs, reporter_factory=SweepProgress,
                           on_event=lambda msg: console.print(f"[bold]{escape(msg)}[/]", soft_wrap=True))
    print_table(["section", "verdict", "effect [95% interval]"],
                [[k, v.verdict, study.effect_cell(v)] for k, v in result.verdicts.items()], 2)
    if result.wall_time_s:
        console.print(f"wall time {result.wall_time_s / 60:.1f} min")
    if result.failed:
        err_console.print(f"[bold red]error:[/] {len(result.failed)} run(s) failed: "
                          f"{escape(', '.join(sorted(result.failed)))}; run them again with "
                          f"bnctl study claims --resume {escape(str(study_dir))}", soft_wrap=True)
        console.print(escape(str(result.report)), soft_wrap=True)
        raise typer.Exit(1)
    console.print(escape(str(result.report)), soft_wrap=True)


def _print_plan(plans: dict, resume: Optional[Path]) -> None:
    from bnctl.errors import ConfigError

    if resume is not None:
        raise ConfigError("--dry-run shows a new study's plan; for a stopped one: bnctl study claims --resume DIR")
    print_table(["section", "sweep", "cells", "seeds", "runs"],
                [[key, p.name, str(len(p.cells)), str(len(p.seeds)), str(len(p.runs))] for key, p in plans.items()], 2)
    console.print(f"[bold]{sum(len(p.runs) for p in plans.values())} run(s)[/] in {len(plans)} sweeps "
                  "(section 5 evaluates the small-batch sweep's checkpoints, section 7 reads the landscape "
                  "sweep's probes); nothing was created")
