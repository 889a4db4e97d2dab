"""bnctl's public Python API: what the commands do, for notebooks and scripts (see docs/api.md).

Each function calls the same library functions as its command (config loading and validation,
engine.fit, evaluation.evaluate_checkpoint, the sweep and report modules, the study runner) and
raises the same errors (bnctl.errors). Nothing here prints except the progress reporter the caller
chooses. Heavy imports (torch, matplotlib) happen inside the functions that need them, so that
``import bnctl`` stays quick.

Over 350 lines: one function per command (train, evaluate, compare, runs, sweep, report, study) and
the result objects they return, kept together so the public surface reads in one place.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

from bnctl.errors import BnctlError, ConfigError

if TYPE_CHECKING:  # for type checkers only: importing these costs matplotlib, pandas, pydantic
    import pandas
    from matplotlib.figure import Figure

    from bnctl.config import Config

# A config: a YAML path, a built-in config's name ("quickstart"), a mapping of sections, or a validated Config.
ConfigLike = Union[str, "os.PathLike[str]", Mapping[str, Any], "Config"]
# Overrides in the command line's dotted form: {"optimizer.lr": 0.01} or ["optimizer.lr=0.01", ...].
Overrides = Union[Mapping[str, Any], Sequence[str], None]
# Progress: True (a line per epoch, or per finished sweep run; rich renders it in a notebook), False (silent),
# or a function that receives each of those rows as a dict.
Progress = Union[bool, Callable[[dict], None]]
PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------ configs and overrides

def _config_path(config: PathLike) -> Path:
    """A YAML path, or the file of a built-in config name (the same names `bnctl train --config` takes)."""
    from bnctl import configfiles

    return configfiles.resolve(config)


def _dotted(overrides: Overrides, keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as {dotted key: value}: a mapping, KEY=VALUE strings (parsed as the command line does),
    and keywords where a double underscore stands for the dot (optimizer__lr=0.01)."""
    from bnctl import config as config_mod

    out: dict[str, Any] = {}
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        out.update({str(k): v for k, v in overrides.items()})
    elif overrides is not None:
        out.update(config_mod.parse_overrides([str(item) for item in overrides]))
    out.update({k.replace("__", "."): v for k, v in keywords.items()})
    for key in out:  # the command line's check of a key's shape, with its message
        config_mod.parse_overrides([f"{key}=0"])
    return out


def _origins(dotted: Mapping[str, Any]) -> dict[str, str]:
    """Where each override came from, for a validation error (the command line's say 'the command line: ...')."""
    return {key: f"the overrides: {key}={value!r}" for key, value in dotted.items()}


def _raw_config(config: ConfigLike) -> tuple[dict[str, Any], str, str | None]:
    """The config as a raw mapping, the source named in error messages, and its file (if any)."""
    from bnctl import config as config_mod

    if isinstance(config, config_mod.Config):
        return config_mod.to_dict(config), "the given Config", None
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config)), "the given config mapping", None
    if not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config must be a YAML path, a built-in config name or a mapping, "
                          f"not {type(config).__name__}")
    path = _config_path(config)
    raw = config_mod.read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw, str(path), str(path)


def load_config(config: ConfigLike, overrides: Overrides = None, /, **keywords: Any) -> "Config":
    """Resolve a config as `bnctl train --config CONFIG KEY=VALUE ...` does: the file, then the overrides, validated.

    >>> cfg = load_config("quickstart", {"optimizer.lr": 0.01}, train__epochs=2)
    """
    from bnctl import config as config_mod

    raw, source, _ = _raw_config(config)
    dotted = _dotted(overrides, keywords)
    raw = config_mod.apply_overrides(raw, dotted)
    return config_mod.validate(raw, source, origins=_origins(dotted))


# ------------------------------------------------------------------ progress

def _console():
    from rich.console import Console

    # Made when needed: a console made inside Jupyter renders there (HTML), elsewhere on the terminal.
    return Console(highlight=False, soft_wrap=True)


class _EpochProgress:
    """engine.Reporter: one line per epoch (a notebook cell shows them as they come), or a caller's function."""

    def __init__(self, progress: Progress, epochs: int):
        self.show = progress if callable(progress) else None
        self.console = _console() if progress is True else None
        self.epochs = epochs

    def run_dir(self, path: Path) -> None:
        if self.console is not None:
            self.console.print(f"[dim]run directory:[/] {path}")

    def epoch_start(self, epoch: int, steps: int) -> None: ...

    def step(self, done: int, loss: float) -> None: ...

    def epoch_end(self, row: dict[str, Any]) -> None:
        if self.show is not None:
            self.show(dict(row))
        if self.console is not None:
            self.console.print(
                f"epoch {row['epoch']}/{self.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}%  "
                f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  {row['epoch_time_s']:.1f}s")


class _SweepProgress:
    """sweep.SweepReporter: one line per finished run, or a caller's function that receives its results row."""

    def __init__(self, progress: Progress):
        self.show = progress if callable(progress) else None
        self.console = _console() if progress is True else None
        self.done = self.total = 0

    def start(self, plan, selected, todo, jobs, partly_done=0) -> None:
        self.total, self.done = len(selected), len(selected) - len(todo)
        if self.console is not None:
            partly = f" ({partly_done} partly done, continued from their checkpoints)" if partly_done else ""
            self.console.print(f"[bold]{plan.name}[/]: {len(selected)} run(s), {len(todo)} to run{partly} "
                               f"with {jobs} job(s)")

    def run_started(self, spec) -> None: ...

    def run_progress(self, spec, epoch: int, epochs: int) -> None: ...

    def run_finished(self, spec, outcome: str, row: dict[str, Any]) -> None:
        self.done += 1
        if self.show is not None:
            self.show(dict(row, outcome=outcome))
        if self.console is not None:
            acc = row.get("final_test_acc")
            detail = f"test acc {acc:.2f}%" if isinstance(acc, (int, float)) else (row.get("error") or "")
            self.console.print(f"[{self.done}/{self.total}] {outcome:>9} {spec.name}  {str(detail).splitlines()[0][:160]}"
                               if detail else f"[{self.done}/{self.total}] {outcome:>9} {spec.name}")

    def close(self) -> None: ...


def _check_progress(progress: Progress) -> None:
    if not (isinstance(progress, bool) or callable(progress)):
        raise ConfigError(f"progress must be True, False or a function of one row, not {type(progress).__name__}")


# ------------------------------------------------------------------ runs

def _read_json(path: Path) -> dict[str, Any]:
    from bnctl import rundir

    try:
        return rundir.read_json(path) if path.is_file() else {}
    except (OSError, ValueError):  # cut short or edited by hand: shown as missing, as `bnctl runs` does
        return {}


def _to_pandas(rows: list[dict[str, Any]], what: str) -> "pandas.DataFrame":
    try:
        import pandas
    except ImportError:
        raise BnctlError(f"{what}.to_pandas() needs pandas, which bnctl does not install: pip install pandas "
                         "(or pip install 'bnctl[pandas]'); the rows themselves are a list of dicts") from None
    return pandas.DataFrame(rows)


class Run:
    """A run directory as `bnctl train` writes it: config, summary, metrics, checkpoints, figures.

    The properties read the run's files each time, so a Run of a run still training shows its latest epoch.
    """

    def __init__(self, path: PathLike):
        from bnctl import rundir

        self.dir = Path(path)
        if not self.dir.is_dir():
            raise BnctlError(f"run directory not found: {self.dir}")
        if not (self.dir / rundir.CONFIG_FILE).is_file():
            raise BnctlError(f"{self.dir} is not a bnctl run directory (no {rundir.CONFIG_FILE})")

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run recorded (config.yaml), as nested dicts."""
        from bnctl import config as config_mod, rundir

        return config_mod.read_yaml(self.dir / rundir.CONFIG_FILE) or {}

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: status, best and final epochs, wall time ({} before the first epoch ends)."""
        from bnctl import rundir

        return _read_json(self.dir / rundir.SUMMARY_FILE)

    @property
    def status(self) -> str:
        """completed, diverged, interrupted, running, ... as `bnctl runs` shows it."""
        from bnctl import rundir

        return rundir.effective_status(self.dir, self.summary or None)

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.csv: one dict per epoch (epoch, train_loss, train_acc, test_loss, test_acc, lr, times)."""
        from bnctl import rundir

        path = self.dir / rundir.METRICS_FILE
        return rundir.read_csv(path) if path.is_file() else []

    @property
    def diagnostics_rows(self) -> list[dict[str, Any]]:
        """diagnostics.csv (train.diagnostics=true): one dict per (step, layer, statistic)."""
        from bnctl import rundir

        path = self.dir / rundir.DIAGNOSTICS_FILE
        return rundir.read_csv(path) if path.is_file() else []

    @property
    def checkpoint(self) -> Path:
        """The best epoch's checkpoint, which evaluate() uses (as `bnctl eval RUN_DIR` does)."""
        from bnctl import checkpoint

        return checkpoint.checkpoint_for(self.dir)

    @property
    def evaluations(self) -> list["Evaluation"]:
        """Every result kept under RUN/eval/ (by evaluate() or `bnctl eval`), oldest first."""
        from bnctl import rundir

        files = sorted((self.dir / rundir.EVAL_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime)
        return [Evaluation(_read_json(p), p) for p in files if _read_json(p).get("confusion") is not None]

    def to_pandas(self) -> "pandas.DataFrame":
        """The metrics as a pandas DataFrame (needs pandas, which bnctl does not depend on)."""
        return _to_pandas(self.metrics, "Run")

    def curves(self) -> "Figure":
        """Loss and accuracy per epoch, train and test (the figure `bnctl plot` saves as curves.png)."""
        from bnctl import plotting

        return plotting.curves_figure(self.dir)

    def diagnostics(self) -> "Figure":
        """Per-layer BN statistics over training (diagnostics.png); needs a run with train.diagnostics=true."""
        from bnctl import plotting

        fig = plotting.diagnostics_figure(self.dir)
        if fig is None:
            raise BnctlError(f"{self.dir} has no diagnostics samples; train with train.diagnostics=true")
        return fig

    def confusion(self) -> "Figure":
        """The confusion matrix of this run's latest evaluation (evaluate() first)."""
        found = self.evaluations
        if not found:
            raise BnctlError(f"{self.dir} has no evaluation yet; run bnctl.evaluate(run) first")
        return found[-1].confusion()

    def evaluate(self, **options: Any) -> "Evaluation":
        """evaluate(self, ...): see bnctl.evaluate."""
        return evaluate(self, **options)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and self.dir.resolve() == other.dir.resolve()

    def __hash__(self) -> int:
        return hash(self.dir.resolve())

    def __fspath__(self) -> str:
        return str(self.dir)

    def __repr__(self) -> str:
        best = self.summary.get("best") or {}
        acc = f", best test acc {best['test_acc']:.2f}% at epoch {best['epoch']}" if "test_acc" in best else ""
        return f"Run('{self.dir}', {self.status}{acc})"


def load_run(path: PathLike) -> Run:
    """The run directory at path (one `bnctl train` or train() wrote)."""
    return Run(path)


def train(config: ConfigLike, overrides: Overrides = None, /, *, runs_root: PathLike = "runs",
          run_dir: PathLike | None = None, progress: Progress = True, **keywords: Any) -> Run:
    """Train as `bnctl train --config CONFIG KEY=VALUE ...` does and return the new run.

    config: a YAML path, a built-in config name or a mapping. Overrides: a mapping or KEY=VALUE strings,
    and/or keywords where ``__`` stands for the dot: ``train("quickstart", train__epochs=2, seed=1)``.
    Writes the run directory (metrics.csv, checkpoints, summary.json, curves.png) under runs_root.
    Raises ConfigError for a bad config or key (before anything is written), DivergedError,
    InterruptedRun (the kernel was interrupted: the last complete epoch is kept, resumable with the CLI).
    """
    _check_progress(progress)
    cfg = load_config(config, overrides, **keywords)
    from bnctl import workflow

    reporter = _EpochProgress(progress, cfg.train.epochs)
    result = workflow.train_run(cfg, runs_root=Path(runs_root), run_dir=None if run_dir is None else Path(run_dir),
                                reporter=reporter, on_run_dir=reporter.run_dir)
    return Run(result.run_dir)


# ------------------------------------------------------------------ evaluation

@dataclass
class Evaluation:
    """A checkpoint's evaluation on the test split (the JSON `bnctl eval` keeps under RUN/eval/)."""

    result: dict[str, Any]
    path: Path | None = None  # where it is kept; None when evaluate(save=False)

    @property
    def acc(self) -> float:
        """Test accuracy in %."""
        return self.result["acc"]

    @property
    def loss(self) -> float:
        return self.result["loss"]

    @property
    def bn_mode(self) -> str:
        return self.result["bn_mode"]

    @property
    def batch_size(self) -> int:
        return self.result["batch_size"]

    @property
    def per_class_acc(self) -> dict[str, float]:
        return self.result["per_class_acc"]

    @property
    def notes(self) -> list[str]:
        """What the reader must know (e.g. evaluated in fp32 on a CPU; no BN layers, so bn_mode changes nothing)."""
        notes = list(self.result.get("notes", []))
        if self.result.get("bn_mode") == "batch" and not self.result.get("bn_layers"):
            notes.append("this model has no BN layers, so bn_mode='batch' changes nothing")
        return notes

    def confusion(self) -> "Figure":
        """The row-normalized confusion matrix (the figure `bnctl eval` saves beside its JSON)."""
        from bnctl import plotting

        return plotting.confusion_figure(self.result)

    def __repr__(self) -> str:
        r = self.result
        mode = "running statistics" if r["bn_mode"] == "running" else f"each test batch's statistics (batch {r['batch_size']})"
        recal = f", recalibrated on {r['recalibration']['images']} images" if "recalibration" in r else ""
        return (f"Evaluation(acc={r['acc']:.2f}%, loss={r['loss']:.4f}, epoch {r['epoch']}, {r['images']} images, "
                f"BN: {mode}{recal})")


def evaluate(target: Run | PathLike, *, bn_mode: str = "running", batch_size: int | None = None,
             recalibrate: int = 0, recalibrate_batch_size: int | None = None, data_root: str | None = None,
             device: str | None = None, save: bool = True) -> Evaluation:
    """Evaluate a run's best checkpoint (or a checkpoint file) on the test split, as `bnctl eval` does.

    bn_mode="running": BN uses its population statistics (eval mode, correct); "batch": each test batch's
    own statistics (what a model left in train mode does; batch_size matters then). recalibrate=N first
    recomputes BN's statistics from N training images. save=True keeps the result as RUN/eval/<what>.json
    and its confusion figure, like the command.
    """
    from bnctl import checkpoint as checkpoint_mod, evaluation, workflow

    if isinstance(target, Run):
        target = target.dir
    checkpoint = checkpoint_mod.checkpoint_for(Path(target))
    result = evaluation.evaluate_checkpoint(checkpoint, data_root=data_root, device=device, bn_mode=bn_mode,
                                            batch_size=batch_size, recalibrate=recalibrate,
                                            recalibrate_batch_size=recalibrate_batch_size)
    path = workflow.save_evaluation(checkpoint, result, recalibrate_batch_size)[0] if save else None
    return Evaluation(result, path)


# ------------------------------------------------------------------ comparing runs

@dataclass
class Comparison:
    """Several runs side by side: the table `bnctl compare` prints and its overlay figure."""

    runs: list[Run]
    rows: list[dict[str, Any]]  # per run: name, dir, status, epochs, differing config values, final/best metrics
    keys: list[str]  # the config keys in which the runs differ

    def figure(self) -> "Figure":
        """Every run's loss and accuracy curves in one figure (solid: test, dashed: train)."""
        from bnctl import comparison, plotting

        return plotting.compare_figure([comparison.load_run(r.dir) for r in self.runs])

    def to_pandas(self) -> "pandas.DataFrame":
        return _to_pandas([_flat_row(r) for r in self.rows], "Comparison")

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        """The table a notebook shows: each run, the keys it differs in, and its final and best test accuracy."""
        def num(value: Any, fmt: str) -> str:
            return format(value, fmt) if isinstance(value, (int, float)) else "-"

        header = ["run", *self.keys, "status", "epochs", "final test acc %", "best test acc % (epoch)"]
        body = [[str(r["name"]), *(str(r["differs"].get(k, "-")) for k in self.keys), str(r["status"]),
                 str(r["epochs"]), num(r.get("final_test_acc"), ".2f"),
                 f"{num(r.get('best_test_acc'), '.2f')} ({r.get('best_epoch') or '-'})"] for r in self.rows]
        return header, body

    def _repr_markdown_(self) -> str:
        from bnctl.report import md_table

        return md_table(*self._cells())

    def __repr__(self) -> str:
        header, body = self._cells()
        lines = [header] + body
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("differs", "run")}
    return {"name": out.pop("name"), **row["differs"], **out}


def compare(runs: Sequence[Run | PathLike]) -> Comparison:
    """Compare runs as `bnctl compare RUN_DIR...` does: final and best metrics and how their configs differ."""
    from bnctl import comparison

    if isinstance(runs, (str, os.PathLike, Run)):
        runs = [runs]
    loaded = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not loaded:
        raise ConfigError("compare needs at least one run")
    data = [comparison.load_run(r.dir) for r in loaded]
    return Comparison(loaded, comparison.compare_table(data), comparison.differing_keys(data))


# ------------------------------------------------------------------ sweeps and reports

@dataclass
class Sweep:
    """A sweep directory as `bnctl sweep` writes it: sweep.yaml, results.csv, runs/<name>/."""

    dir: Path
    completed: list[str] = field(default_factory=list)  # of this call (empty for load_sweep)
    diverged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run -> error

    @property
    def results(self) -> list[dict[str, Any]]:
        """results.csv as the files stand now: one dict per planned run (its swept values, seed, status, metrics)."""
        from bnctl import sweep as sweep_mod

        return sweep_mod.load(self.dir)[1]

    def runs(self) -> list[Run]:
        """The runs that have started, in plan order."""
        from bnctl import sweep as sweep_mod

        return [Run(self.dir / sweep_mod.RUNS_DIR / r["run"]) for r in self.results
                if (self.dir / sweep_mod.RUNS_DIR / r["run"] / "config.yaml").is_file()]

    def report(self, out: PathLike | None = None) -> "Report":
        """sweep_report(self.dir, out): statistics over seeds, report.md, summary.csv, figures."""
        return sweep_report(self.dir, out)

    def to_pandas(self) -> "pandas.DataFrame":
        return _to_pandas(self.results, "Sweep")


def _cli_value(value: Any) -> str:
    return json.dumps(value)  # JSON is YAML: the command line's parser reads it back as the same value


def run_sweep(config: ConfigLike, grid: Mapping[str, Sequence[Any]] | None = None, /, *, seeds: int | Sequence[int] = 1,
          overrides: Overrides = None, name: str | None = None, root: PathLike = "runs/sweeps",
          sweep_dir: PathLike | None = None, jobs: int = 1, pack: int | None = None, progress: Progress = True,
          **keywords: Any) -> Sweep:
    """Run a grid of configs x seeds as `bnctl sweep` does and return the sweep directory's results.

    ``run_sweep("quickstart", {"model.norm": ["batch", "none"]}, seeds=2, train__epochs=2)``: the base config,
    the swept keys with their values, the seeds (a count or a list) and fixed overrides (as train takes them).
    A sweep file (name, base, fixed, grid, seeds) is run as given when grid is None. ``pack`` trains up to
    that many seeds of a cell in one process as one pack (`bnctl sweep --pack`; default: the sweep file's, else 1).
    Every cell is validated before anything is created; a failed run is recorded and the others go on.
    """
    from bnctl import plan as plan_mod, sweep as sweep_mod

    _check_progress(progress)
    fixed = _dotted(overrides, keywords)
    if grid is None:
        if not isinstance(config, (str, os.PathLike)):
            raise ConfigError("give the swept keys, e.g. run_sweep(config, {'model.norm': ['batch', 'none']}), "
                              "or a sweep file's path")
        path = _config_path(config)
        plan = sweep_mod.plan_from_file(path, [f"{k}={_cli_value(v)}" for k, v in fixed.items()])
    else:
        if not isinstance(grid, Mapping):
            raise ConfigError("grid must map dotted keys to lists of values, e.g. {'optimizer.lr': [0.01, 0.1]}")
        grid = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in grid.items()}
        _dotted(grid, {})  # each swept key's shape, checked as for an override
        raw, _, base = _raw_config(config)
        plan = plan_mod.plan_from_parts(raw, fixed, grid, seeds, name, base, _origins(fixed))
    if pack is not None:
        plan.pack = plan_mod.check_pack_size(pack, "pack")
    if plan.pack > 1:  # refused before a sweep directory exists
        sweep_mod.check_pack(sweep_mod.cell_groups(plan))
    target = sweep_mod.create(plan, Path(root), exact=None if sweep_dir is None else Path(sweep_dir))
    reporter = _SweepProgress(progress)
    if reporter.console is not None:
        reporter.console.print(f"[dim]sweep directory:[/] {target}")
    outcome = sweep_mod.execute(target, jobs=jobs, reporter=reporter)
    return Sweep(target, list(outcome.completed), list(outcome.diverged), dict(outcome.failed))


def load_sweep(path: PathLike) -> Sweep:
    """The sweep directory at path (one `bnctl sweep` or run_sweep() wrote)."""
    from bnctl import sweep as sweep_mod

    path = Path(path)
    if not (path / sweep_mod.PLAN_FILE).is_file():
        raise BnctlError(f"{path} is not a sweep directory (no {sweep_mod.PLAN_FILE})")
    return Sweep(path)


@dataclass
class Report:
    """What `bnctl report` writes for a sweep: per-cell statistics over seeds, report.md, summary.csv, figures."""

    dir: Path  # where report.md and the figures are
    header: list[str]
    body: list[list[str]]  # one row of formatted cells per grid cell
    files: list[Path]
    missing: list[str]  # runs that are not results yet: "name: status (error)"

    @property
    def markdown(self) -> Path:
        from bnctl import report as report_mod

        return self.dir / report_mod.REPORT_FILE

    @property
    def figures(self) -> list[Path]:
        return [f for f in self.files if Path(f).suffix == ".png"]

    @property
    def summary(self) -> list[dict[str, Any]]:
        """summary.csv: one dict per cell, the statistics as numbers."""
        from bnctl import report as report_mod, rundir

        return rundir.read_csv(self.dir / report_mod.SUMMARY_CSV)

    def to_pandas(self) -> "pandas.DataFrame":
        return _to_pandas(self.summary, "Report")

    def _repr_markdown_(self) -> str:
        from bnctl import report as report_mod

        text = report_mod.md_table(self.header, self.body)
        text += "\n\nmean ± sample std [95% t-interval] over completed seeds"
        if self.missing:
            text += f"\n\n**Incomplete:** {len(self.missing)} run(s) are not results yet"
        return text

    def __repr__(self) -> str:
        return f"Report('{self.markdown}', {len(self.body)} cell(s), {len(self.missing)} missing)"


def sweep_report(sweep_dir: PathLike | Sweep, out: PathLike | None = None) -> Report:
    """Aggregate a sweep over seeds as `bnctl report` does; write report.md, summary.csv and figures."""
    from bnctl import report as report_mod

    path = sweep_dir.dir if isinstance(sweep_dir, Sweep) else Path(sweep_dir)
    if not (path / report_mod.SWEEP_FILE).is_file():
        raise BnctlError(f"{path} is not a sweep directory (no {report_mod.SWEEP_FILE})")
    rep = report_mod.build(path, None if out is None else Path(out))
    return Report(Path(out) if out is not None else path, rep.header, rep.body, list(rep.files),
                  report_mod.missing_lines(rep.missing))


# ------------------------------------------------------------------ studies

@dataclass
class StudyResult:
    """A finished `bnctl study claims`: its directory, REPORT.md and one verdict per section."""

    dir: Path
    report: Path
    verdicts: dict[str, str]  # section -> verdict
    sentences: dict[str, str]  # section -> the verdict with its effect and 95% interval, in one sentence
    failed: dict[str, str]  # run -> error

    def _repr_markdown_(self) -> str:
        from bnctl.report import md_table

        return md_table(["section", "verdict"], [[k, self.sentences[k]] for k in self.verdicts])


def study_claims(profile: str | None = None, overrides: Overrides = None, /, *, root: PathLike = "runs/studies",
                 jobs: int = 1, resume: PathLike | None = None, report_only: bool = False,
                 studies: PathLike | None = None, progress: Progress = True, **keywords: Any) -> StudyResult:
    """Test the notebook's claims with seeds and verdicts, as `bnctl study claims` does.

    profile "quick" (the default: synthetic data, minutes on a CPU) or "full" (CIFAR-10-sized, for a GPU); overrides are
    fixed for every sweep. resume=STUDY_DIR finishes a stopped study (report_only=True: rewrite REPORT.md).
    """
    from bnctl import study

    _check_progress(progress)
    fixed = [f"{k}={_cli_value(v)}" for k, v in _dotted(overrides, keywords).items()]
    if resume is None:
        if report_only:
            raise ConfigError("report_only rewrites the report of an existing study; give resume=STUDY_DIR")
        study_dir = study.create(profile or "quick", fixed, Path(root), None if studies is None else Path(studies))
    else:
        study_dir = Path(resume)
        if not (study_dir / study.STUDY_FILE).is_file():
            raise BnctlError(f"{study_dir} is not a study directory (no {study.STUDY_FILE})")
        study.resume_check(study_dir, profile, fixed)
    if report_only:
        result = study.write_report(study_dir)
    else:
        console = _console() if progress is True else None

        def event(message: str) -> None:
            if console is not None:
                console.print(f"[bold]{message}[/]")
        result = study.run(study_dir, jobs=jobs, reporter_factory=lambda: _SweepProgress(progress), on_event=event)
    return StudyResult(Path(result.dir), Path(result.report), {k: v.verdict for k, v in result.verdicts.items()},
                       {k: v.sentence() for k, v in result.verdicts.items()}, dict(result.failed))
