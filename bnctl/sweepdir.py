"""A sweep directory's files and the status of each of its runs, read from the files alone (no torch).

    SWEEP/sweep.yaml             the resolved plan (bnctl/plan.py), enough to run it from any process
    SWEEP/results.csv            one row per planned run, rebuilt from the run directories
    SWEEP/runs/<cell>-seed<k>/   ordinary run directories (bnctl/rundir.py)
    SWEEP/claims/<run>           one flock file per run, held by the process running it
    SWEEP/errors/<run>.json      the error of a run that failed outside fit's own record

sweep (creating and executing), workers (claiming and running), report and study read these
names and statuses from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnctl import rundir

PLAN_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
CLAIMS_DIR = "claims"  # one flock file per run, held by the process running it
ERRORS_DIR = "errors"  # <run>.json: the error and traceback of a run that failed outside fit's own record

# Statuses a resumed sweep leaves alone: a diverged run is a result, not a failure.
FINISHED = frozenset({"completed", "diverged"})


def run_dir(sweep_dir: Path, spec_or_name: Any) -> Path:
    """SWEEP/runs/<run>: the run directory of a RunSpec (or a run's name)."""
    return Path(sweep_dir) / RUNS_DIR / getattr(spec_or_name, "name", spec_or_name)


def error_record(sweep_dir: Path, name: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / ERRORS_DIR / f"{name}.json"
    try:
        return rundir.read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return {"error": f"(unreadable {path})"}


def run_status(sweep_dir: Path, spec) -> tuple[str, dict[str, Any] | None]:
    """A run's status from its files alone, and its summary (None when it has none)."""
    folder = run_dir(sweep_dir, spec)
    summary = None
    if (folder / rundir.SUMMARY_FILE).is_file():
        try:
            summary = rundir.read_json(folder / rundir.SUMMARY_FILE)
        except (OSError, ValueError):
            summary = None
    error = error_record(sweep_dir, spec.name)
    if error is not None and (summary is None or summary.get("status") in ("running", None)):
        return "failed", summary  # it failed where fit could not record it (setup, a dead worker)
    if summary is not None:
        return str(summary.get("status", "running")), summary
    return ("running" if folder.exists() else "pending"), None
