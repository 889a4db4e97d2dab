"""bnctl's command line: assembles the Typer app from the command modules in bnctl/commands/.

Each command parses, calls one library function, and reports. Heavy imports (torch, matplotlib)
happen inside the commands that need them so that `bnctl --help` and `bnctl plot` start quickly.
"""

from __future__ import annotations

import typer

from bnctl.clikit import BnctlGroup, console, plain_help
from bnctl.clikit import state as _state
from bnctl.commands import compare as compare_cmd, config as config_cmd, eval as eval_cmd, plot as plot_cmd
from bnctl.commands import report as report_cmd
from bnctl.commands import runs as runs_cmd, study as study_cmd, sweep as sweep_cmd, train as train_cmd

plain_help()
app = typer.Typer(
    name="bnctl",
    cls=BnctlGroup,
    help="Run, compare and understand Batch Normalization experiments on CNNs.\n\n"
         "Quick start:  bnctl train --config quickstart",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib import metadata

        try:
            version = metadata.version("bnctl")
        except metadata.PackageNotFoundError:  # run from a source tree that was never installed
            version = "unknown (not installed)"
        console.print(f"bnctl {version}")
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (also after the command)."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print bnctl's version and exit.")) -> None:
    _state["debug"] = debug


app.command()(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command()(plot_cmd.plot)
app.command()(compare_cmd.compare)
app.command("runs")(runs_cmd.runs)
app.command(epilog=sweep_cmd.EPILOG)(sweep_cmd.sweep)
app.command()(report_cmd.report)
app.add_typer(study_cmd.app, name="study")
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
