"""`bnctl compare`: runs side by side (final and best metrics, the config keys that differ) and their curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import cell, console, existing, new_table, reports_errors
from bnctl.errors import ConfigError



# Two-line headers, so that the metrics fit in 80 columns beside the run, status and epochs.
_COMPARE_METRICS = [("final_train_acc", "train\nacc", ".2f"), ("final_test_acc", "test\nacc", ".2f"),
                    ("final_test_loss", "test\nloss", ".4f"), ("best_test_acc", "best\nacc", ".2f"),
                    ("best_epoch", "best\nepoch", "d"), ("wall_time_s", "wall\ntime s", ".1f")]
# train.eval_train's columns: in the table only when some run has them, always in --csv and --json.
_CLEAN_METRICS = [("final_clean_train_acc", "clean\ntrain", ".2f"), ("final_gap", "gap\npts", ".2f")]
_ALL_METRICS = _COMPARE_METRICS[:2] + _CLEAN_METRICS + _COMPARE_METRICS[2:]


def _metrics(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return _ALL_METRICS if any(r.get("final_clean_train_acc") is not None for r in rows) else _COMPARE_METRICS


def _compare_tables(rows: list[dict[str, Any]], keys: list[str], short: dict[str, str], width: int) -> list:
    """The compare table, with the differing keys as columns; when that is wider than the screen, the
    metrics table and a second one holding the keys (a row per key, a column per run)."""
    from rich.measure import Measurement
    from rich.table import Table

    from bnctl.clikit import console as measure_console

    metrics = _metrics(rows)
    caption = ("accuracy in %; train/test: the final epoch; best: the epoch with the highest test accuracy; "
               "wall time: the run's, as summary.json records it (seconds from each session's start to its end, "
               "data loading included, summed over sessions)")
    if metrics is not _COMPARE_METRICS:
        caption += "; clean train: train accuracy in eval mode (train.eval_train); gap: clean train minus test"
    show_status = any(r["status"] != "completed" for r in rows)
    planned_differs = len({r["epochs_planned"] for r in rows}) > 1 or any(r["epochs"] != r["epochs_planned"]
                                                                         for r in rows)

    def metrics_table(with_keys: bool) -> Table:
        table = new_table(caption=caption)
        table.add_column("run", overflow="fold")  # folded whole rather than cut to "…"
        for k in keys if with_keys else []:
            table.add_column(short[k], no_wrap=True)
        if show_status:
            table.add_column("status", no_wrap=True)
        table.add_column("epochs", justify="right", no_wrap=True)
        for _, header, _ in metrics:
            table.add_column(header, justify="right", no_wrap=True)
        for r in rows:
            epochs = f"{r['epochs']}/{r['epochs_planned']}" if planned_differs and r["epochs_planned"] else str(r["epochs"])
            table.add_row(escape(r["name"]), *([escape(_fmt_key_value(r["differs"][k])) for k in keys] if with_keys
                                               else []),
                          *([r["status"]] if show_status else []), epochs,
                          *(cell(r[field], fmt) for field, _, fmt in metrics))
        return table

    combined = metrics_table(with_keys=True)
    if not keys or Measurement.get(measure_console, measure_console.options.update(width=10**6),
                                   combined).maximum <= width:
        return [combined]
    def keys_table(group: list[dict[str, Any]], title: str | None) -> Table:
        table = new_table(title=title, title_justify="left")
        table.add_column("key", no_wrap=True)
        for r in group:
            table.add_column(escape(r["name"]), no_wrap=True)
        for k in keys:
            table.add_row(k, *(escape(_fmt_key_value(r["differs"][k])) for r in group))
        return table

    def fits(table: Table) -> bool:
        return Measurement.get(measure_console, measure_console.options.update(width=10**6), table).maximum <= width

    # As many runs per keys table as fit: a value folded across lines reads as another value ("0.00" over "5").
    groups: list[list[dict[str, Any]]] = [[]]
    for r in rows:
        if groups[-1] and not fits(keys_table(groups[-1] + [r], None)):
            groups.append([])
        groups[-1].append(r)
    return [metrics_table(with_keys=False)] + [keys_table(g, "how the runs differ" if i == 0 else None)
                                               for i, g in enumerate(groups)]


def _fmt_key_value(value: Any) -> str:
    return cell(value, "g" if isinstance(value, float) else "")


@reports_errors
def compare(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...",
                                          help="Run directories to compare (one or more)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Where to write the overlay figure (default: compare.png; "
                                            "with --csv/--json only when given)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV (full key names) instead."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as a JSON list instead."),
) -> None:
    """Tabulate runs' final and best metrics and the config keys in which they differ; overlay their curves."""
    from bnctl import comparison, landscape_plot, plotting

    if as_csv and as_json:
        raise ConfigError("choose one of --csv and --json")
    runs = [comparison.load_run(existing(d, "run directory", holding="metrics.csv")) for d in run_dirs]
    rows = comparison.compare_table(runs)
    # train.epochs has the epochs column (done/planned) already; the other differing keys get their own.
    keys = [k for k in comparison.differing_keys(runs) if k != "train.epochs"]
    if as_json or as_csv:
        records = [{"name": r["name"], "dir": r["dir"], "status": r["status"], "epochs": r["epochs"],
                    "epochs_planned": r["epochs_planned"], **{k: r["differs"].get(k) for k in keys},
                    **{field: r[field] for field, _, _ in _ALL_METRICS}} for r in rows]
        if as_json:
            sys.stdout.write(json.dumps(records, indent=1) + "\n")
        else:
            import csv

            writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in rec.items()} for rec in records)
        if out is not None:
            plotting.plot_compare(runs, out)
            landscape_plot.plot_compare_runs(runs, out)
        return
    from bnctl.clikit import wide_console

    short = comparison.short_keys(keys)
    target = wide_console()
    tables = _compare_tables(rows, keys, short, target.width)
    for table in tables:
        target.print(table)
    legend = [f"{short[k]} = {k}" for k in keys if short[k] != k]
    if legend and len(tables) == 1:  # a separate keys table spells the keys out already
        console.print("[dim]keys: " + escape(", ".join(legend)) + "[/]", soft_wrap=True)
    console.print(str(plotting.plot_compare(runs, out or Path("compare.png"))))
    landscape = landscape_plot.plot_compare_runs(runs, out or Path("compare.png"))  # runs with train.landscape
    if landscape is not None:
        console.print(str(landscape))
        for line in landscape_plot.matched_summary(runs):
            console.print(escape(line), soft_wrap=True)
