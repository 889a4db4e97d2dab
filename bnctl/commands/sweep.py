"""`bnctl sweep`: run a grid of configs x seeds, resumably, on several worker processes."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bnctl import configfiles
from bnctl.clikit import SweepProgress, console, new_table, reports_errors, sigterm_stops_like_ctrl_c
from bnctl.errors import ConfigError

# (rich markup: a backslash keeps [brackets] from being read as a style tag)
EPILOG = ("Values: KEY=a,b,c sweeps, KEY=v fixes; commas inside \\[brackets] or quotes do not split, "
          "so data.mean=[0.4,0.4,0.4],[0.5,0.5,0.5] sweeps two lists.")


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {text}: give I/N with 0 <= I < N (0-based, e.g. 0/4 ... 3/4)")
    return int(m.group(1)), int(m.group(2))


def _print_plan(plan, selected, statuses: dict[str, str] | None) -> None:
    table = new_table()
    table.add_column("run", overflow="fold")
    for key in plan.grid:
        table.add_column(key)
    table.add_column("seed", justify="right")
    if statuses is not None:
        table.add_column("status")
    for spec in selected:
        cells = [spec.name, *(str(spec.overrides[k]) for k in plan.grid), str(spec.seed)]
        table.add_row(*cells, *([statuses[spec.name]] if statuses is not None else []))
    console.print(table)
    fixed = ", ".join(f"{k}={v}" for k, v in plan.fixed.items()) or "none"
    console.print(f"base config: {plan.base_config or '(inline)'}; fixed: {fixed}; seeds: {plan.seeds}")
    whole = f" of {len(plan.runs)}" if len(selected) != len(plan.runs) else ""
    console.print(f"[bold]{len(selected)} run(s){whole}[/] ({len(plan.cells)} cell(s) x {len(plan.seeds)} seed(s))")


@reports_errors
@sigterm_stops_like_ctrl_c()  # a scheduler's SIGTERM: runs left interrupted, resumable
def sweep(
    overrides: Optional[List[str]] = typer.Argument(None, metavar="KEY=a,b,c | KEY=v",
                                                    help="Swept (KEY=a,b,c) and fixed (KEY=v) config keys."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="Base YAML config (inline form): a file or a built-in name."),
    sweep_file: Optional[Path] = typer.Option(None, "--sweep", help="A sweep file (name, base, fixed, grid, seeds) "
                                                                    "or a built-in one, e.g. sweeps/lr_tolerance."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Finish an existing sweep directory."),
    seeds: Optional[str] = typer.Option(None, "--seeds",
                                        help="Seeds per cell: a count (3 = seeds 0,1,2) or a list (0,4,7)."),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: the config's name)."),
    root: Path = typer.Option(Path("runs/sweeps"), "--root", help="Where new sweep directories are created."),
    sweep_dir: Optional[Path] = typer.Option(None, "--sweep-dir",
                                             help="Exact sweep directory: new, or one holding this same plan "
                                                  "(every task of a job array can run the same command)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Runs at once, in worker processes sharing the CPU threads."),
    pack: Optional[int] = typer.Option(None, "--pack", min=1,
                                       help="Train up to K seeds of a cell in one process as one vectorized pack "
                                            "(default: the sweep file's pack, else 1). Meant for a GPU (not yet measured there); "
                                            "slower than --jobs on a CPU: docs/studies.md#packed-seeds."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Run only slice I of N (0-based: 0/4 ... 3/4)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the plan and the run count, and exit."),
    launcher: str = typer.Option("local", "--launcher",
                                 help="local: run here; slurm: submit a Slurm job array (needs submitit)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition.", rich_help_panel="Slurm"),
    time_min: Optional[int] = typer.Option(None, "--time", help="slurm: minutes per task (60).",
                                           rich_help_panel="Slurm"),
    cpus_per_run: Optional[int] = typer.Option(None, "--cpus-per-run", help="slurm: CPU cores per task (2).",
                                               rich_help_panel="Slurm"),
    gpus_per_run: Optional[int] = typer.Option(None, "--gpus-per-run", help="slurm: GPUs per task (0).",
                                               rich_help_panel="Slurm"),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb", help="slurm: memory per task.", rich_help_panel="Slurm"),
    parallelism: Optional[int] = typer.Option(None, "--parallelism", help="slurm: tasks running at once (16).",
                                              rich_help_panel="Slurm"),
    tasks: Optional[int] = typer.Option(None, "--tasks", help="slurm: array tasks (default: one per run).",
                                        rich_help_panel="Slurm"),
    wait: bool = typer.Option(False, "--wait", help="slurm: wait for the array to end, then summarize.",
                              rich_help_panel="Slurm"),
) -> None:
    """Run a grid of configs x seeds: each run an ordinary run directory, results.csv kept up to date."""
    from bnctl import sweep as sweep_mod

    overrides = overrides or []
    forms = [f for f, v in (("--config", config), ("--sweep", sweep_file), ("--resume", resume)) if v is not None]
    if len(forms) != 1:
        raise ConfigError("give one of --config FILE KEY=a,b,c ..., --sweep FILE or --resume SWEEP_DIR"
                          + (f" (got {' and '.join(forms)})" if forms else ""))
    part = _parse_shard(shard)
    # A built-in name (bnctl config list) where no such file exists.
    config = configfiles.resolve(config) if config is not None else None
    sweep_file = configfiles.resolve(sweep_file) if sweep_file is not None else None
    if resume is not None:
        if overrides or seeds or name or sweep_dir:
            raise ConfigError("--resume runs the sweep as planned in its sweep.yaml; drop the overrides, "
                              "--seeds, --name and --sweep-dir")
        plan = sweep_mod.read_plan(resume)
        plan.validate()
    elif sweep_file is not None:
        if seeds or name:
            raise ConfigError("a sweep file names its seeds and name; edit the file (or use --config KEY=... form)")
        plan = sweep_mod.plan_from_file(sweep_file, overrides)
    else:
        plan = sweep_mod.plan_inline(config, overrides, seeds, name=name)
    if pack is not None and resume is None:
        plan.pack = pack  # recorded in sweep.yaml: a resume packs the same way unless told otherwise
    if part is not None or launcher == "slurm":  # shards deal out whole packs: every one must pack alike
        joined = resume if resume is not None else (
            sweep_dir if sweep_dir is not None and (Path(sweep_dir) / sweep_mod.PLAN_FILE).is_file() else None)
        if joined is not None:
            sweep_mod.check_same_pack(sweep_mod.read_plan(joined), plan.pack if resume is None else pack, joined)
    if (pack or plan.pack) > 1:  # refused before a sweep directory exists
        sweep_mod.check_pack(sweep_mod.cell_groups(plan))

    selected = plan.shard(part, pack)
    if part is not None and resume is None and sweep_dir is None and not dry_run:
        raise ConfigError("every shard must write to the same sweep directory: add --sweep-dir DIR (the same "
                          "for all shards), or create the sweep first and run bnctl sweep --resume DIR --shard I/N")
    if dry_run:
        statuses = ({s.name: sweep_mod.run_status(resume, s)[0] for s in selected} if resume is not None else None)
        _print_plan(plan, selected, statuses)
        return
    from bnctl import launchers

    launchers.check_launcher(launcher)
    if launcher == "slurm":  # settings first: a bad one must not leave a sweep directory behind
        if jobs != 1:
            raise ConfigError("--jobs is for --launcher local; a Slurm task trains one run at a time "
                              "(more runs at once: --parallelism)")
        settings = launchers.slurm_settings(plan.slurm, {
            "partition": partition, "time_min": time_min, "cpus_per_run": cpus_per_run, "gpus_per_run": gpus_per_run,
            "mem_gb": mem_gb, "parallelism": parallelism, "tasks": tasks})
    target = resume if resume is not None else sweep_mod.create(plan, root, exact=sweep_dir)
    console.print(f"[dim]sweep directory:[/] {escape(str(target))}", soft_wrap=True)
    if launcher == "slurm":
        _submit(launchers.LAUNCHERS[launcher](target, settings, shard=part), wait)
        return
    progress = SweepProgress()
    started = time.monotonic()
    try:
        outcome = sweep_mod.execute(target, jobs=jobs, shard=part, reporter=progress, pack=pack)
    finally:
        progress.close()
    _finish(outcome, time.monotonic() - started)


def _finish(outcome, seconds: float) -> None:
    from bnctl import sweep as sweep_mod

    ran = len(outcome.completed) + len(outcome.diverged) + len(outcome.failed)
    parts = [f"{len(outcome.completed)} completed", f"{len(outcome.diverged)} diverged",
             f"{len(outcome.failed)} failed"]
    if outcome.already_done:
        parts.append(f"{outcome.already_done} already finished before")
    if outcome.busy:
        parts.append(f"{len(outcome.busy)} left to another process running them")
    console.print(f"[bold]{ran} run(s) in {seconds:.0f}s:[/] " + ", ".join(parts))
    results = outcome.sweep_dir / sweep_mod.RESULTS_FILE
    console.print(f"[dim]results: {escape(str(results))}   next: bnctl report {escape(str(outcome.sweep_dir))}[/]",
                  soft_wrap=True)
    if outcome.failed:
        from bnctl.clikit import err_console

        err_console.print(f"[bold red]error:[/] {len(outcome.failed)} run(s) failed:", soft_wrap=True)
        for run, error in outcome.failed.items():
            err_console.print(f"  {escape(run)}: {escape(error.splitlines()[0][:300])}", soft_wrap=True)
        err_console.print(f"run them again with: bnctl sweep --resume {escape(str(outcome.sweep_dir))} "
                          f"(details in {escape(str(outcome.sweep_dir / sweep_mod.ERRORS_DIR))} and the run folders)",
                          soft_wrap=True)
        console.print(escape(str(outcome.sweep_dir)), soft_wrap=True)
        raise typer.Exit(1)
    console.print(escape(str(outcome.sweep_dir)), soft_wrap=True)  # last line: the sweep directory, for scripts


def _submit(submission, wait: bool) -> None:
    """Report a submitted job array; with --wait, its end too."""
    from bnctl import sweep as sweep_mod

    console.print(f"submitted Slurm job array {submission.job_id} ({submission.tasks} task(s)); "
                  f"logs in {escape(str(submission.logs))}", soft_wrap=True)
    if not wait:
        where = escape(str(submission.sweep_dir))
        console.print(f"[dim]follow: squeue -j {submission.job_id}   then: bnctl report {where}"
                      f"   anything left undone: bnctl sweep --resume {escape(str(submission.sweep_dir))}[/]",
                      soft_wrap=True)
        console.print(escape(str(submission.sweep_dir)), soft_wrap=True)
        return
    summaries = submission.wait()
    _, rows = sweep_mod.load(submission.sweep_dir)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    console.print(f"[bold]{len(summaries)} task(s) ended:[/] "
                  + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    console.print(escape(str(submission.sweep_dir)), soft_wrap=True)
    if any(row["status"] == "failed" for row in rows):
        raise typer.Exit(1)
