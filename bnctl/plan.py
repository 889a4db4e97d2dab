"""Sweep plans: a base config, fixed overrides, a grid of swept keys and seeds, expanded into runs.

Parsing of the inline form (KEY=a,b,c sweeps, KEY=v fixes) and of sweep files, readable
cell names, and validation of every cell's config before anything runs. Cheap to
import (no torch): the CLI validates a whole plan in well under a second.

Over 350 lines: the inline form, sweep files and cell names are one format, parsed and
validated together.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from bnctl import config as config_mod, configfiles
from bnctl.config import Config
from bnctl.errors import ConfigError

FORMAT = 1  # of sweep.yaml

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
    unread: list[str] = field(default_factory=list)  # fixed keys no cell reads (dropped from all), set by configs()
    # {"rule": "linear"|"sqrt", "reference_batch": B0}: each cell's optimizer.lr is the base lr times
    # (batch/B0) or its square root, so that batch sizes compare at equal noise scale, not equal lr.
    lr_scaling: dict[str, Any] | None = None
    # The sweep file's slurm: section, kept so that `sweep --resume DIR --launcher slurm` submits as the first did.
    slurm: dict[str, Any] = field(default_factory=dict)
    pack: int = 1  # seeds of one cell trained packed in one process (bnctl/packed.py); 1 = each run on its own

    def __post_init__(self) -> None:
        if not self.runs:
            self.runs = [RunSpec(f"{cell}-seed{seed}", cell, self._scaled(overrides), seed)
                         for cell, overrides in _cell_names(self.grid) for seed in self.seeds]

    def _scaled(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The cell's overrides plus its scaled learning rate when the plan scales lr with the batch size."""
        if not self.lr_scaling:
            return overrides
        return overrides | {"optimizer.lr": scaled_lr(self.config["optimizer"]["lr"],
                                                      overrides["train.batch_size"], self.lr_scaling)}

    @property
    def cells(self) -> list[str]:
        return list(dict.fromkeys(r.cell for r in self.runs))

    def config_for(self, spec: RunSpec) -> Config:
        """The validated config of one run (base, then its cell's overrides, its seed and name)."""
        return self._cell_config(spec)[0]

    def _cell_config(self, spec: RunSpec) -> tuple[Config, list[str]]:
        """config_for, and the fixed keys dropped from this cell because it does not read them."""
        raw = config_mod.apply_overrides(copy.deepcopy(self.config), dict(spec.overrides))
        # A fixed key that applies to some cells only (optimizer.momentum while optimizer.name is swept)
        # goes back to its default in the others: they do not fail, and their config claims nothing.
        dropped = config_mod.reset_not_applying(raw, keep=spec.overrides)
        raw["seed"], raw["name"] = spec.seed, spec.name
        try:
            return config_mod.validate(raw, f"of cell {spec.cell}"), dropped
        except ConfigError as err:
            swept = ", ".join(f"{k}={_value_label(v)}" for k, v in spec.overrides.items())
            raise ConfigError(f"{err}\n  (cell {spec.cell}: {swept})" if swept else str(err)) from None

    def configs(self) -> list[tuple[RunSpec, Config]]:
        """Every run's validated config; the first bad cell raises ConfigError naming the cell and key."""
        by_cell: dict[str, Config] = {}
        dropped_in: dict[str, set[str]] = {}
        out = []
        for spec in self.runs:
            if spec.cell not in by_cell:  # cells differ; seeds cannot make a config invalid
                by_cell[spec.cell], dropped = self._cell_config(spec)
                dropped_in[spec.cell] = set(dropped)
            out.append((spec, by_cell[spec.cell].model_copy(update={"seed": spec.seed, "name": spec.name})))
        self.unread = sorted(set.intersection(*dropped_in.values()) if dropped_in else set())
        return out

    def refuse_unread(self) -> "Plan":
        """A fixed key that no cell reads is a mistake, as it is in a single run (a study's overrides,
        shared by sweeps of different grids, are the exception: study.py does not call this)."""
        if self.unread:
            key = self.unread[0]
            choice, applies = config_mod.KEY_APPLIES[key]
            section, leaf = key.split(".")
            raise ConfigError(f"{key}={_value_label(self.config[section][leaf])} applies to no cell of this sweep "
                              f"(only to {choice}={', '.join(sorted(applies))}) and would be ignored; remove it")
        return self

    def validate(self) -> "Plan":
        self.configs()
        return self

    def units(self, pack: int | None = None) -> list[list[RunSpec]]:
        """What a shard deals out: single runs, or with packing (``pack``, default the plan's) each cell's
        runs in groups of up to ``pack``, so that a shard (a Slurm array task) holds whole packs."""
        pack = self.pack if pack is None else pack
        if pack <= 1:
            return [[run] for run in self.runs]
        cells: dict[str, list[RunSpec]] = {}
        for run in self.runs:
            cells.setdefault(run.cell, []).append(run)
        return [group[i:i + pack] for group in cells.values() for i in range(0, len(group), pack)]

    def shard(self, shard: tuple[int, int] | None, pack: int | None = None) -> list[RunSpec]:
        """The runs of shard (i, n): every n-th unit starting at i (0-based), so each shard mixes the cells.

        A unit is one run, or with packing one pack of a cell's runs (units).
        """
        if shard is None:
            return list(self.runs)
        i, n = shard
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard {i}/{n}: I must be 0..N-1 (0-based) and N at least 1")
        return [run for unit in self.units(pack)[i::n] for run in unit]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "created": self.created, "base_config": self.base_config,
                "config": self.config, "fixed": self.fixed, "grid": self.grid, "seeds": self.seeds,
                **({"lr_scaling": self.lr_scaling} if self.lr_scaling else {}),
                **({"slurm": self.slurm} if self.slurm else {}),
                **({"pack": self.pack} if self.pack != 1 else {}),
                "runs": [r.to_dict() for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        runs = [RunSpec(r["name"], r["cell"], dict(r.get("overrides") or {}), int(r["seed"])) for r in d["runs"]]
        return cls(name=d["name"], config=d["config"], fixed=dict(d.get("fixed") or {}),
                   grid={k: list(v) for k, v in (d.get("grid") or {}).items()}, seeds=list(d["seeds"]),
                   base_config=d.get("base_config"), runs=runs, created=d.get("created", ""),
                   lr_scaling=d.get("lr_scaling"), slurm=dict(d.get("slurm") or {}), pack=int(d.get("pack", 1)))


def _resolve_base(raw: dict[str, Any], fixed: dict[str, Any], grid: dict[str, list[Any]],
                  source: str, origins: dict[str, str] | None = None) -> dict[str, Any]:
    """The base config with fixed overrides, defaults filled in, as a plain dict without seed."""
    for key in ("seed", "name"):
        if key in grid:
            raise ConfigError(f"'{key}' cannot be swept; " +
                              ("give seeds with --seeds (or seeds: in a sweep file)" if key == "seed"
                               else "each run is named after its cell and seed"))
    if "seed" in fixed:
        raise ConfigError("the sweep sets each run's seed; give seeds with --seeds (or seeds: in a sweep file)")
    merged = config_mod.apply_overrides(copy.deepcopy(raw), dict(fixed))
    # Keys that only some cells read (optimizer.momentum with a swept optimizer.name) are checked per
    # cell (Plan.configs); here they are set aside and put back as given.
    readable = copy.deepcopy(merged)
    aside = config_mod.reset_not_applying(readable)
    try:
        resolved = config_mod.validate(readable, source, origins=origins)
    except ConfigError:
        # Some settings are only valid with the swept values (ghost norm and a swept batch size):
        # resolve with the first cell's values; every cell overrides them again.
        first = config_mod.apply_overrides(copy.deepcopy(merged), {k: v[0] for k, v in grid.items()})
        aside = config_mod.reset_not_applying(first)
        resolved = config_mod.validate(first, source, origins=origins)
    out = config_mod.to_dict(resolved)
    for key in aside:
        section, leaf = key.split(".")
        out[section][leaf] = merged[section][leaf]
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
    return plan_from_parts(raw, fixed, grid, seeds, name, str(config_path) if config_path is not None else None,
                           config_mod.command_line_origins(list(overrides)))


def plan_from_parts(raw: dict[str, Any], fixed: dict[str, Any], grid: dict[str, Any],
                    seeds: int | str | Sequence[int] | None = None, name: str | None = None,
                    base_config: str | None = None, origins: dict[str, str] | None = None) -> Plan:
    """A plan from a raw base config mapping, fixed {key: value} and swept {key: [values]}; every cell validated.

    ``origins``: where each override came from, for error messages (see config.validate)."""
    grid = _check_grid(grid, "overrides")
    if seeds is None:
        seeds = [int(raw.get("seed", 0))]
    config = _resolve_base(copy.deepcopy(raw), fixed, grid, base_config or "", origins)
    plan = Plan(name=_sweep_name(name, config), config=config, fixed=dict(fixed), grid=grid, seeds=parse_seeds(seeds),
                base_config=base_config)
    return plan.validate().refuse_unread()


# slurm: read by bnctl.launchers; study: the claim and estimand a study section declares (bnctl.studyspec);
# pack: seeds per process trained as one vectorized pack (bnctl.packed)
SWEEP_FILE_KEYS = {"name", "base", "fixed", "grid", "seeds", "slurm", "study", "lr_scaling", "pack"}
LR_SCALING_RULES = {"linear": 1.0, "sqrt": 0.5}  # rule -> exponent of batch / reference_batch


def check_pack_size(value: Any, where: str) -> int:
    """A pack size: a whole number of runs, at least 1 (1: no packing)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a whole number of runs, at least 1 (1: no packing), got {value!r}")
    return value


def scaled_lr(base_lr: float, batch_size: int, scaling: dict[str, Any]) -> float:
    """base_lr * (batch_size / reference_batch) ** exponent, rounded to 6 significant digits for readable configs."""
    lr = base_lr * (batch_size / scaling["reference_batch"]) ** LR_SCALING_RULES[scaling["rule"]]
    return float(f"{lr:.6g}")


def _check_lr_scaling(raw: Any, grid: dict[str, list[Any]], fixed: dict[str, Any], source: str) -> dict[str, Any] | None:
    """lr_scaling: {rule: linear|sqrt, reference_batch: B0}; needs a swept train.batch_size and an unswept lr."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"rule", "reference_batch"}:
        raise ConfigError(f"{source}: lr_scaling must be a mapping with exactly rule ({'|'.join(LR_SCALING_RULES)}) "
                          "and reference_batch")
    if raw["rule"] not in LR_SCALING_RULES:
        raise ConfigError(f"{source}: lr_scaling.rule must be one of {', '.join(LR_SCALING_RULES)} "
                          f"(got {raw['rule']!r})")
    ref = raw["reference_batch"]
    if isinstance(ref, bool) or not isinstance(ref, int) or ref < 1:
        raise ConfigError(f"{source}: lr_scaling.reference_batch must be a positive integer (got {ref!r})")
    if "train.batch_size" not in grid:
        raise ConfigError(f"{source}: lr_scaling scales the lr with train.batch_size, which the grid must sweep")
    if "optimizer.lr" in grid:
        raise ConfigError(f"{source}: lr_scaling sets each cell's optimizer.lr; do not sweep optimizer.lr too")
    return {"rule": raw["rule"], "reference_batch": ref}


def plan_from_file(path: Path, extra_overrides: Sequence[str] = (), shared: bool = False) -> Plan:
    """A plan from a sweep file (name, base, fixed, grid, seeds); extra KEY=v overrides add to fixed.

    ``base`` is a config path (relative to the sweep file, else to the working directory), a
    built-in config's name (quickstart, seed) or an inline mapping. An extra KEY=a,b override sweeps that key too.
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
        try:
            found = configfiles.resolve(base, relative_to=path.parent)
        except ConfigError:
            raise ConfigError(f"sweep file {path}: base config {base} not found (looked next to the sweep file, "
                              "in the working directory and among the built-in configs: bnctl config list)") from None
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
    lr_scaling = _check_lr_scaling(spec.get("lr_scaling"), grid, fixed, f"sweep file {path}")
    if "study" in spec:  # a study section's declaration: validated here, so a bad one fails before anything runs
        from bnctl import studyspec

        studyspec.check_against_grid(studyspec.parse(spec["study"], f"sweep file {path}"), grid,
                                     f"sweep file {path}")
    origins = {k: f"{path}'s fixed: {k}" for k in spec.get("fixed") or {}}
    origins |= config_mod.command_line_origins(list(extra_overrides))
    config = _resolve_base(raw, fixed, grid, str(base_path or path), origins)
    plan = Plan(name=_sweep_name(spec.get("name"), config), config=config, fixed=fixed, grid=grid,
                seeds=parse_seeds(spec.get("seeds", 1)), base_config=base_path, lr_scaling=lr_scaling)
    slurm = spec.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise ConfigError(f"sweep file {path}: slurm must be a mapping of settings (partition: ..., time_min: ...)")
    plan.slurm = dict(slurm)
    plan.pack = check_pack_size(spec.get("pack", 1), f"sweep file {path}: pack")
    plan.validate()
    return plan if shared else plan.refuse_unread()  # shared: one of a study's sweeps


