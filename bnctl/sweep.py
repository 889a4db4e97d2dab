"""Sweeps: a plan of grid cells x seeds, its directory, its results table, and running it.

A sweep directory holds sweep.yaml (the resolved plan, enough to run it from any
process), runs/<cell>-seed<k>/ (ordinary run directories made by engine.fit) and
results.csv (one row per planned run, rebuilt from the run directories).
Running the runs themselves (claims, worker processes) lives in bnctl/workers.py.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import yaml

from bnctl import config as config_mod, rundir
from bnctl.config import Config
from bnctl.errors import ConfigError

PLAN_FILE = "sweep.yaml"
RESULTS_FILE = "results.csv"
RUNS_DIR = "runs"
CLAIMS_DIR = "claims"  # one flock file per run, held by the process running it
ERRORS_DIR = "errors"  # <run>.json: the error and traceback of a run that failed outside fit's own record
FORMAT = 1

RESULT_METRICS = ["status", "epochs", "final_test_acc", "final_test_loss", "final_train_acc",
                  "final_clean_train_acc", "best_test_acc", "best_epoch", "wall_time_s", "error"]
# Statuses a resumed sweep leaves alone: a diverged run is a result, not a failure.
FINISHED = frozenset({"completed", "diverged"})


# ------------------------------------------------------------------ values on the command line

# PyYAML reads 1e-3 (no dot) as a string; a swept learning rate must stay a number in sweep.yaml.
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)")


def _numbers(value: Any) -> Any:
    """Turn exponent-notation strings ('1e-3') into floats, inside lists and mappings too."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def split_values(text: str) -> list[str]:
    """Split 'a,b,[1,2],"x,y"' at the commas outside brackets and quotes: ['a', 'b', '[1,2]', '"x,y"']."""
    items, depth, quote, start = [], 0, None, 0
    closing = {"]": "[", "}": "{", ")": "("}
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in closing:
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if quote or depth != 0:
        raise ConfigError(f"unbalanced {'quote' if quote else 'brackets'} in '{text}'")
    items.append(text[start:])
    return items


def parse_sweep_overrides(items: Iterable[str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Split KEY=VALUE items into fixed overrides and swept keys: KEY=a,b,c sweeps, KEY=v fixes.

    Values are YAML; a comma inside brackets or quotes does not split, so
    data.mean=[0.4,0.4,0.4],[0.5,0.5,0.5] sweeps two lists and name='"a,b"' fixes one string.
    """
    fixed: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if key in fixed or key in grid:
            raise ConfigError(f"{key} is given twice; list all its values in one {key}=a,b,c")
        parts = split_values(text) if sep else [text]
        if len(parts) > 1 and any(not p.strip() for p in parts):
            raise ConfigError(f"override '{item}' has an empty value in its list; write KEY=a,b,c")
        # config.parse_overrides checks the key and parses each value as YAML, with its messages.
        values = [_numbers(config_mod.parse_overrides([f"{key}={p}"])[key] if sep else
                           config_mod.parse_overrides([item])[key]) for p in parts]
        if len(values) > 1:
            grid[key] = values
        else:
            fixed[key] = values[0]
    return fixed, grid


def parse_seeds(value: int | str | Sequence[int]) -> list[int]:
    """3 -> [0, 1, 2]; '0,4,7' or [0, 4, 7] -> those seeds."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and "," not in text:
            value = int(text)
        else:
            try:
                value = [int(s) for s in text.split(",")]
            except ValueError:
                raise ConfigError(f"seeds '{text}' must be a count (3) or a list of integers (0,4,7)") from None
    if isinstance(value, bool):
        raise ConfigError("seeds must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"seeds must be at least 1 (got {value})")
        return list(range(value))
    seeds = list(value)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a count or a non-empty list of integers (got {value!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed")
    return seeds


# ------------------------------------------------------------------ the plan

@dataclass(frozen=True)
class RunSpec:
    """One planned run: its folder name, its cell, the cell's overrides and its seed."""

    name: str
    cell: str
    overrides: dict[str, Any]
    seed: int

    def __hash__(self) -> int:  # names are unique within a plan
        return hash(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cell": self.cell, "overrides": dict(self.overrides), "seed": self.seed}


def _value_label(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # 0.0001, 1e-05: exact and short
    if isinstance(value, (list, tuple)):
        return "-".join(_value_label(v) for v in value)
    return str(value)


def _cell_names(grid: dict[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Readable, unique folder-safe names for every cell, in grid order (last key fastest)."""
    keys = list(grid)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    # The short key (norm, lr) unless two swept keys share it; then the full dotted key.
    labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves)]
    cells, seen = [], set()
    for values in itertools.product(*grid.values()) if keys else [()]:
        name = "_".join(f"{label}-{_value_label(v)}" for label, v in zip(labels, values)) or "base"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]
        unique, n = name, 2
        while unique in seen:
            unique, n = f"{name}-{n}", n + 1
        seen.add(unique)
        cells.append((unique, dict(zip(keys, values))))
    return cells


@dataclass
class Plan:
    """A sweep's resolved plan: base config, fixed overrides, grid, seeds and every run."""

    name: str
    config: dict[str, Any]  # the resolved base config (after fixed overrides), without seed
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    base_config: str | None = None
    runs: list[RunSpec] = field(default_factory=list)
    created: str = ""

    def __post_init__(self) -> None:
        if not self.runs:
            self.runs = [RunSpec(f"{cell}-seed{seed}", cell, overrides, seed)
                         for cell, overrides in _cell_names(self.grid) for seed in self.seeds]

    @property
    def cells(self) -> list[str]:
        return list(dict.fromkeys(r.cell for r in self.runs))

    def config_for(self, spec: RunSpec) -> Config:
        """The validated config of one run (base, then its cell's overrides, its seed and name)."""
        raw = config_mod.apply_overrides(copy.deepcopy(self.config), dict(spec.overrides))
        raw["seed"], raw["name"] = spec.seed, spec.name
        try:
            return config_mod.validate(raw, f"of cell {spec.cell}")
        except ConfigError as err:
            swept = ", ".join(f"{k}={_value_label(v)}" for k, v in spec.overrides.items())
            raise ConfigError(f"{err}\n  (cell {spec.cell}: {swept})" if swept else str(err)) from None

    def configs(self) -> list[tuple[RunSpec, Config]]:
        """Every run's validated config; the first bad cell raises ConfigError naming the cell and key."""
        by_cell: dict[str, Config] = {}
        out = []
        for spec in self.runs:
            if spec.cell not in by_cell:  # cells differ; seeds cannot make a config invalid
                by_cell[spec.cell] = self.config_for(spec)
            out.append((spec, by_cell[spec.cell].model_copy(update={"seed": spec.seed, "name": spec.name})))
        return out

    def validate(self) -> "Plan":
        self.configs()
        return self

    def shard(self, shard: tuple[int, int] | None) -> list[RunSpec]:
        """The runs of shard (i, n): every n-th run starting at i (0-based), so each shard mixes the cells."""
        if shard is None:
            return list(self.runs)
        i, n = shard
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard {i}/{n}: I must be 0..N-1 (0-based) and N at least 1")
        return self.runs[i::n]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "created": self.created, "base_config": self.base_config,
                "config": self.config, "fixed": self.fixed, "grid": self.grid, "seeds": self.seeds,
                "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        runs = [RunSpec(r["name"], r["cell"], dict(r.get("overrides") or {}), int(r["seed"])) for r in d["runs"]]
        return cls(name=d["name"], config=d["config"], fixed=dict(d.get("fixed") or {}),
                   grid={k: list(v) for k, v in (d.get("grid") or {}).items()}, seeds=list(d["seeds"]),
                   base_config=d.get("base_config"), runs=runs, created=d.get("created", ""))


def _resolve_base(raw: dict[str, Any], fixed: dict[str, Any], grid: dict[str, list[Any]],
                  source: str) -> dict[str, Any]:
    """The base config with fixed overrides, defaults filled in, as a plain dict without seed."""
    for key in ("seed", "name"):
        if key in grid:
            raise ConfigError(f"'{key}' cannot be swept; " +
                              ("give seeds with --seeds (or seeds: in a sweep file)" if key == "seed"
                               else "each run is named after its cell and seed"))
    if "seed" in fixed:
        raise ConfigError("the sweep sets each run's seed; give seeds with --seeds (or seeds: in a sweep file)")
    merged = config_mod.apply_overrides(copy.deepcopy(raw), dict(fixed))
    try:
        resolved = config_mod.validate(merged, source)
    except ConfigError:
        # Some settings are only valid with the swept values (ghost norm and a swept batch size):
        # resolve with the first cell's values; every cell overrides them again.
        first = {k: v[0] for k, v in grid.items()}
        resolved = config_mod.validate(config_mod.apply_overrides(merged, first), source)
    out = config_mod.to_dict(resolved)
    out.pop("seed", None)
    return out


def _sweep_name(name: str | None, config: dict[str, Any]) -> str:
    name = name or config.get("name") or "sweep"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"sweep name '{name}' may contain only letters, digits, '_', '.' and '-'")
    return name


def _check_grid(grid: dict[str, Any], where: str) -> dict[str, list[Any]]:
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid key {key} needs a non-empty list of values "
                              "(a single value belongs under fixed)")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise ConfigError(f"{where}: grid key {key} repeats a value: {values}")
        config_mod.parse_overrides([f"{key}=0"])  # the key must look like a config key
        out[str(key)] = _numbers(values)
    return out


def plan_inline(config_path: Path | None, overrides: Sequence[str], seeds: int | str | Sequence[int] | None = None,
                name: str | None = None) -> Plan:
    """A plan from a base config and KEY=a,b,c (swept) / KEY=v (fixed) overrides; every cell validated."""
    raw = config_mod.read_yaml(config_path) if config_path is not None else {}
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {config_path} must be a mapping of sections")
    fixed, grid = parse_sweep_overrides(overrides)
    grid = _check_grid(grid, "overrides")
    if seeds is None:
        seeds = [int(raw.get("seed", 0))]
    config = _resolve_base(raw, fixed, grid, str(config_path or ""))
    plan = Plan(name=_sweep_name(name, config), config=config, fixed=fixed, grid=grid, seeds=parse_seeds(seeds),
                base_config=str(config_path) if config_path is not None else None)
    return plan.validate()


SWEEP_FILE_KEYS = {"name", "base", "fixed", "grid", "seeds"}


def plan_from_file(path: Path, extra_overrides: Sequence[str] = ()) -> Plan:
    """A plan from a sweep file (name, base, fixed, grid, seeds); extra KEY=v overrides add to fixed.

    ``base`` is a config path (relative to the sweep file, else to the working directory)
    or an inline mapping. An extra KEY=a,b override sweeps that key too.
    """
    path = Path(path)
    spec = config_mod.read_yaml(path)
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with keys {', '.join(sorted(SWEEP_FILE_KEYS))}")
    unknown = set(spec) - SWEEP_FILE_KEYS
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"a sweep file has {', '.join(sorted(SWEEP_FILE_KEYS))}")
    base, base_path = spec.get("base"), None
    if isinstance(base, str):
        candidates = [path.parent / base, Path(base)]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(f"sweep file {path}: base config {base} not found (looked next to the sweep file "
                              "and in the working directory)")
        raw, base_path = config_mod.read_yaml(found) or {}, str(found)
    elif isinstance(base, dict) or base is None:
        raw = copy.deepcopy(base) or {}
    else:
        raise ConfigError(f"sweep file {path}: base must be a config path or a mapping")
    fixed = spec.get("fixed") or {}
    grid = spec.get("grid") or {}
    if not isinstance(fixed, dict) or not isinstance(grid, dict):
        raise ConfigError(f"sweep file {path}: fixed and grid must be mappings of dotted keys")
    fixed = {str(k): _numbers(v) for k, v in fixed.items()}
    grid = _check_grid(grid, f"sweep file {path}")
    extra_fixed, extra_grid = parse_sweep_overrides(extra_overrides)
    for key in extra_fixed:
        if key in grid:
            raise ConfigError(f"{key} is swept by {path}; override its values with {key}=a,b (two or more) "
                              "or edit the sweep file")
    fixed |= extra_fixed
    for key in extra_grid:
        fixed.pop(key, None)
    grid |= _check_grid(extra_grid, "overrides")
    config = _resolve_base(raw, fixed, grid, str(base_path or path))
    plan = Plan(name=_sweep_name(spec.get("name"), config), config=config, fixed=fixed, grid=grid,
                seeds=parse_seeds(spec.get("seeds", 1)), base_config=base_path)
    return plan.validate()


# ------------------------------------------------------------------ the sweep directory

def _plan_text(plan: Plan) -> str:
    return yaml.safe_dump(plan.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def create(plan: Plan, root: Path = Path("runs/sweeps"), exact: Path | None = None) -> Path:
    """Create runs/sweeps/<YYYYmmdd-HHMMSS>-<name>/ with sweep.yaml and an all-pending results.csv.

    With ``exact``, use that folder: new, or one holding the same plan already (so every
    task of a job array can run the same command; the first creates it, the others join).
    """
    plan.created = plan.created or datetime.now().isoformat(timespec="seconds")
    if exact is not None:
        return _create_exact(plan, Path(exact))
    root = Path(root)
    rundir._make_folder(root, "sweep root")
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{plan.name}"
    for attempt in range(1, 10_000):
        path = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        _populate(path, plan)
        return path
    raise ConfigError(f"could not create a new sweep directory under {root}")


def _populate(path: Path, plan: Plan) -> None:
    for sub in (RUNS_DIR, CLAIMS_DIR):
        (path / sub).mkdir(exist_ok=True)
    write_results(path, plan)
    rundir.atomic_write_text(path / PLAN_FILE, _plan_text(plan))  # last: its presence marks a usable sweep


def _create_exact(plan: Plan, path: Path) -> Path:
    import time

    rundir._make_folder(path.parent, "sweep root")
    try:
        path.mkdir()
    except FileExistsError:
        for _ in range(100):  # another task may be writing sweep.yaml right now
            if (path / PLAN_FILE).is_file() or not path.is_dir() or any(p.name != RUNS_DIR for p in path.iterdir()):
                break
            time.sleep(0.1)
        if not (path / PLAN_FILE).is_file():
            if path.is_dir() and not any(path.iterdir()):
                _populate(path, plan)
                return path
            raise ConfigError(f"{path} exists and is not a sweep directory; choose a new folder") from None
        existing = read_plan(path)
        if [r.to_dict() for r in existing.runs] != [r.to_dict() for r in plan.runs] or existing.config != plan.config:
            raise ConfigError(f"{path} holds a different sweep; choose a new folder or run its own plan "
                              f"with: bnctl sweep --resume {path}")
        return path
    _populate(path, plan)
    return path


def read_plan(sweep_dir: Path) -> Plan:
    """The plan recorded in a sweep directory's sweep.yaml."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} is not a bnctl sweep directory (no {PLAN_FILE})")
    raw = config_mod.read_yaml(path)
    try:
        return Plan.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} is damaged or not a bnctl sweep plan ({type(err).__name__}: {err})") from None


def run_dir(sweep_dir: Path, spec: RunSpec) -> Path:
    return Path(sweep_dir) / RUNS_DIR / spec.name


def result_columns(plan: Plan) -> list[str]:
    return ["run", "cell", "seed", *plan.grid, *RESULT_METRICS]


def _error_record(sweep_dir: Path, name: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / ERRORS_DIR / f"{name}.json"
    try:
        return rundir.read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return {"error": f"(unreadable {path})"}


def run_status(sweep_dir: Path, spec: RunSpec) -> tuple[str, dict[str, Any] | None]:
    """A run's status from its files alone, and its summary (None when it has none)."""
    folder = run_dir(sweep_dir, spec)
    summary = None
    if (folder / rundir.SUMMARY_FILE).is_file():
        try:
            summary = rundir.read_json(folder / rundir.SUMMARY_FILE)
        except (OSError, ValueError):
            summary = None
    error = _error_record(sweep_dir, spec.name)
    if error is not None and (summary is None or summary.get("status") in ("running", None)):
        return "failed", summary  # it failed where fit could not record it (setup, a dead worker)
    if summary is not None:
        return str(summary.get("status", "running")), summary
    return ("running" if folder.exists() else "pending"), None


def result_row(sweep_dir: Path, plan: Plan, spec: RunSpec) -> dict[str, Any]:
    """One results.csv row: the run's swept values, seed, status, final and best metrics, wall time, error."""
    status, summary = run_status(sweep_dir, spec)
    row: dict[str, Any] = {"run": spec.name, "cell": spec.cell, "seed": spec.seed,
                           **{k: spec.overrides.get(k) for k in plan.grid}}
    row |= {k: None for k in RESULT_METRICS}
    row["status"] = status
    if summary:
        final, best = summary.get("final") or {}, summary.get("best") or {}
        row |= {"epochs": summary.get("epochs_completed"), "final_test_acc": final.get("test_acc"),
                "final_test_loss": final.get("test_loss"), "final_train_acc": final.get("train_acc"),
                "final_clean_train_acc": final.get("clean_train_acc"), "best_test_acc": best.get("test_acc"),
                "best_epoch": best.get("epoch"), "wall_time_s": summary.get("wall_time_s")}
        if summary.get("error"):
            row["error"] = summary["error"]
        elif summary.get("diverged"):
            row["error"] = summary["diverged"].get("message")
    if status == "failed" and not row["error"]:
        row["error"] = (_error_record(sweep_dir, spec.name) or {}).get("error")
    return row


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    return value


def write_results(sweep_dir: Path, plan: Plan) -> list[dict[str, Any]]:
    """Rebuild results.csv from the run directories, atomically; returns its rows."""
    import csv

    rows = [result_row(sweep_dir, plan, spec) for spec in plan.runs]
    columns = result_columns(plan)
    with rundir.atomic_write(Path(sweep_dir) / RESULTS_FILE) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in columns])
    return rows


def load(sweep_dir: Path) -> tuple[Plan, list[dict[str, Any]]]:
    """For readers: the plan and one row per planned run, read fresh from the run directories."""
    plan = read_plan(sweep_dir)
    return plan, [result_row(sweep_dir, plan, spec) for spec in plan.runs]


# ------------------------------------------------------------------ running

class SweepReporter(Protocol):
    """What execute tells its caller (the CLI draws the progress display from it)."""

    def start(self, plan: Plan, selected: list[RunSpec], todo: list[RunSpec], jobs: int) -> None: ...
    def run_started(self, spec: RunSpec) -> None: ...
    def run_progress(self, spec: RunSpec, epoch: int, epochs: int) -> None: ...
    def run_finished(self, spec: RunSpec, outcome: str, row: dict[str, Any]) -> None: ...


class SilentSweepReporter:
    def start(self, plan, selected, todo, jobs) -> None: ...
    def run_started(self, spec) -> None: ...
    def run_progress(self, spec, epoch, epochs) -> None: ...
    def run_finished(self, spec, outcome, row) -> None: ...


@dataclass
class Outcome:
    """What one execute call did, over the runs of its shard."""

    sweep_dir: Path
    selected: int = 0  # runs in this shard
    already_done: int = 0  # completed or diverged before this call
    completed: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run name -> error
    busy: list[str] = field(default_factory=list)  # being run by another process
    interrupted: list[str] = field(default_factory=list)
    # run name -> seconds from the task reaching its process to its end, and whether it was that process's
    # first run (which pays for the imports and the dataset); bench/sweep_jobs.py derives overheads from them
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def execute(sweep_dir: Path, *, jobs: int = 1, shard: tuple[int, int] | None = None,
            reporter: SweepReporter | None = None) -> Outcome:
    """Run what is not finished: skip completed and diverged runs, resume interrupted ones, rerun failed ones.

    Needs only the sweep directory, so any process (a Slurm array task) can call it. A failed
    run is recorded and the others go on. Ctrl-C stops every worker, leaves the runs
    interrupted (resumable) and raises InterruptedRun.
    """
    from bnctl import workers

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    selected = plan.shard(shard)
    wanted = {spec.name for spec in selected}
    configs = {spec.name: cfg for spec, cfg in plan.configs() if spec.name in wanted}
    for sub in (RUNS_DIR, CLAIMS_DIR):
        (sweep_dir / sub).mkdir(exist_ok=True)
    write_results(sweep_dir, plan)  # the table as the files stand now (a killed sweep left it behind)
    todo = [s for s in selected if run_status(sweep_dir, s)[0] not in FINISHED]
    outcome = Outcome(sweep_dir, selected=len(selected), already_done=len(selected) - len(todo))
    reporter = reporter or SilentSweepReporter()
    reporter.start(plan, selected, todo, jobs)
    tasks = [workers.Task(sweep_dir, spec, config_mod.to_dict(configs[spec.name])) for spec in todo]
    try:
        for result in workers.run_tasks(tasks, jobs, reporter):
            spec = result.spec
            outcome.timings[spec.name] = {"seconds": result.seconds, "first_in_process": result.first_in_process}
            if result.outcome == "completed":
                outcome.completed.append(spec.name)
            elif result.outcome == "skipped":  # another process finished it after this one looked
                outcome.already_done += 1
            elif result.outcome == "diverged":
                outcome.diverged.append(spec.name)
            elif result.outcome == "busy":
                outcome.busy.append(spec.name)
            elif result.outcome == "interrupted":
                outcome.interrupted.append(spec.name)
            else:
                outcome.failed[spec.name] = result.error or "failed"
            rows = write_results(sweep_dir, plan)
            reporter.run_finished(spec, result.outcome, next(r for r in rows if r["run"] == spec.name))
    except KeyboardInterrupt:
        write_results(sweep_dir, plan)
        from bnctl.errors import InterruptedRun

        raise InterruptedRun(f"sweep interrupted; finished runs are kept and the others are resumable. "
                             f"Continue with: bnctl sweep --resume {sweep_dir}") from None
    write_results(sweep_dir, plan)
    return outcome
