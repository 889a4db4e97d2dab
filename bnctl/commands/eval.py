"""`bnctl eval`: evaluate checkpoints on the test split, one table (or JSON) and one file per measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from bnctl.clikit import console, loading_progress, new_table, reports_errors, wide_console


@reports_errors
def eval_(
    targets: List[Path] = typer.Argument(..., metavar="RUN_DIR_OR_CHECKPOINT...",
                                         help="Run directories (their checkpoints/best.pt) or checkpoint files; "
                                              "several give one table."),
    data_root: Optional[str] = typer.Option(None, "--data-root",
                                            help="Where the data is now (overrides data.root stored in the "
                                                 "checkpoint; a relative one is first tried from the run's own "
                                                 "working directory)."),
    device: Optional[str] = typer.Option(None, "--device", help="Evaluate on this device instead of the run's."),
    bn_mode: str = typer.Option("running", "--bn-mode",
                                help="running: BN uses population statistics (correct). "
                                     "batch: each test batch's own statistics (what a model left in train mode does)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Test batch size (matters for --bn-mode batch)."),
    recalibrate: int = typer.Option(0, "--recalibrate", min=0,
                                    help="Recompute BN statistics from N training images first (precise BN)."),
    recalibrate_batch_size: Optional[int] = typer.Option(
        None, "--recalibrate-batch-size", min=2, help="Batch size for --recalibrate (default: the training batch size)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object; a list for several) instead of tables."),
) -> None:
    """Evaluate checkpoints on the test split; keep each result as RUN/eval/<what was measured>.json and .png.

    With several, one that cannot be evaluated (missing, damaged, data that does not fit) does not stop
    the others: each failure is named after the results, and the exit code is the first failure's.
    """
    from bnctl import evaluation, rundir
    from bnctl.errors import BnctlError, InterruptedRun

    checkpoints, results, failures = [], [], []
    for target in targets:
        try:
            ckpt = rundir.checkpoint_for(target)
            with loading_progress():
                result = evaluation.evaluate_checkpoint(ckpt, data_root=data_root, device=device, bn_mode=bn_mode,
                                                        batch_size=batch_size, recalibrate=recalibrate,
                                                        recalibrate_batch_size=recalibrate_batch_size)
        except BnctlError as err:
            if len(targets) == 1 or isinstance(err, InterruptedRun):
                raise
            failures.append((target, err))
            continue
        checkpoints.append(ckpt)
        results.append(result)
    if not results and len({str(err) for _, err in failures}) == 1:
        raise failures[0][1]  # the same problem everywhere (options that cannot work together): say it once
    # Print first, then write: a read-only run directory must not cost the result.
    if as_json:
        listed = results + [{"checkpoint": str(t), "error": str(err), "exit_code": err.exit_code}
                            for t, err in failures]
        sys.stdout.write(json.dumps(listed[0] if len(targets) == 1 else listed) + "\n")
        sys.stdout.flush()
    elif len(targets) == 1:
        _print_eval(checkpoints[0], results[0])
    elif results:
        _print_eval_table(checkpoints, results)
    written = [_write_eval(ckpt, res, recalibrate_batch_size) for ckpt, res in zip(checkpoints, results)]
    if not as_json:
        for paths in filter(None, written):
            console.print(f"[dim]wrote {escape(str(paths[0]))} and {escape(paths[1].name)}[/]", soft_wrap=True)
    if failures:
        from bnctl.clikit import err_console

        for target, err in failures:
            err_console.print(f"[bold red]failed:[/] {escape(str(target))}: {escape(str(err))}", soft_wrap=True)
        err_console.print(f"{len(failures)} of {len(targets)} could not be evaluated; the other "
                          f"{len(results)} are above", soft_wrap=True)
        raise typer.Exit(failures[0][1].exit_code)


def _write_eval(ckpt: Path, result: dict, recalibrate_batch_size: Optional[int]):
    """Write RUN/eval/<name>.json and its confusion figure; a failure is a warning naming the path."""
    from bnctl import rundir, workflow
    from bnctl.clikit import err_console

    try:
        return workflow.save_evaluation(ckpt, result, recalibrate_batch_size)
    except OSError as err:
        path = rundir.run_dir_of(ckpt) / rundir.EVAL_DIR / (rundir.eval_output_name(result, recalibrate_batch_size)
                                                            + ".json")
        err_console.print(f"[yellow]warning:[/] could not write {escape(str(path))} and its figure "
                          f"({escape(err.strerror or str(err))}); the result above is not saved", soft_wrap=True)
        return None


def _print_eval(checkpoint: Path, result: dict) -> None:
    from rich.table import Table

    # The header is printed, not a table title: a title wraps to the table's narrow width.
    mode = ("BN running statistics" if result["bn_mode"] == "running"
            else f"BN statistics of each test batch of {result['batch_size']}")
    console.print(f"[bold]{escape(str(checkpoint))}[/] (epoch {result['epoch']}; {mode})", soft_wrap=True)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if result["bn_mode"] == "batch" and not result["bn_layers"]:
        console.print("[yellow]note:[/] this model has no BN layers, so --bn-mode batch changes nothing")
    table = Table()
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for cls, acc in result["per_class_acc"].items():
        table.add_row(escape(cls), f"{acc:.2f}%")
    console.print(table)
    if "recalibration" in result:
        rec = result["recalibration"]
        console.print(f"before recalibration: accuracy {rec['before_acc']:.2f}%  loss {rec['before_loss']:.4f}\n"
                      f"after recalibration on {rec['images']} training images (batches of {rec['batch_size']}):")
    console.print(f"[bold]test loss {result['loss']:.4f}  accuracy {result['acc']:.2f}%[/]  "
                  f"({result['images']} images)")


def _print_eval_table(checkpoints: List[Path], results: List[dict]) -> None:
    """Several evaluations: one row each."""
    from bnctl import rundir

    first = results[0]
    mode = ("BN running statistics" if first["bn_mode"] == "running"
            else f"BN statistics of each test batch of {first['batch_size']}")
    if "recalibration" in first:
        mode += f", recalibrated on {first['recalibration']['images']} training images"
    console.print(f"[bold]{len(results)} checkpoints[/] ({mode})", soft_wrap=True)
    for note in dict.fromkeys(n for res in results for n in res.get("notes", [])):  # each note once
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    recal = "recalibration" in first
    table = new_table()
    table.add_column("run", no_wrap=True)
    for col in ("epoch", "images") + (("acc before %",) if recal else ()) + ("test loss", "test acc %"):
        table.add_column(col, justify="right", no_wrap=True)
    for ckpt, res in zip(checkpoints, results):
        label = rundir.run_dir_of(ckpt).name + ("" if ckpt.name == "best.pt" else f" ({ckpt.name})")
        cells = [escape(label), str(res["epoch"]), str(res["images"])]
        if recal:
            cells.append(f"{res['recalibration']['before_acc']:.2f}")
        table.add_row(*cells, f"{res['loss']:.4f}", f"{res['acc']:.2f}")
    wide_console().print(table)
