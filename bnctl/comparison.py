"""Which config keys make runs differ, what to call each run, and the table `bnctl compare` shows.

Read from a run's files alone (config.yaml, metrics.csv, summary.json): no torch, no matplotlib.
The figures that use these (plotting, landscape_plot) import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnctl import config as config_mod, rundir
from bnctl.errors import BnctlError
from bnctl.normspec import BATCH_STAT_NORMS


# Keys that never change what a run learns or measures: bookkeeping, speed, extra outputs.
# The landscape probes measure beside the training and leave it exactly as it was (tests/test_landscape.py);
# landscape figures and `bnctl compare`'s matched-loss lines name their settings themselves.
PROBE_SETTINGS = ("train.landscape.every", "train.landscape.scales", "train.landscape.direction",
                  "train.landscape.ics")
NON_EXPERIMENT_KEYS = {"name", "device", "data.download", "train.channels_last", "train.compile",
                       "train.diagnostics", "train.diagnostics_every", "train.tensorboard", "train.eval_train",
                       *PROBE_SETTINGS}
_synthetic = lambda c: c.get("data.name", "synthetic") == "synthetic"  # noqa: E731
# Keys that matter only for some settings (the rest of the time any value gives the same run).
APPLIES = {
    "data.root": lambda c: not _synthetic(c),
    "data.train_size": _synthetic, "data.test_size": _synthetic, "data.synthetic_seed": _synthetic,
    "data.image_size": lambda c: c.get("data.name") == "imagefolder",
    # Evaluation batches matter only where eval mode still normalizes with batch statistics.
    "train.eval_batch_size": lambda c: (c.get("model.norm", "batch") in BATCH_STAT_NORMS
                                        and c.get("model.bn_track_running_stats") is False),
}


# The keys only some models, norms, inits, optimizers or schedules read, from config's one table.
APPLIES.update({key: (lambda c, choice=choice, applies=applies: c.get(choice, config_mod.default_of(choice)) in applies)
                for key, (choice, applies) in config_mod.KEY_APPLIES.items()})


def experiment_key(key: str, flat: dict[str, Any]) -> bool:
    """Whether a dotted config key changes what this run (its flattened config) learns or measures."""
    return key not in NON_EXPERIMENT_KEYS and APPLIES.get(key, lambda c: True)(flat)


def _defaults() -> dict[str, Any]:
    return config_mod.flatten(config_mod.Config().model_dump(mode="json"))


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b))


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


# Always in the title, whether default or not: what a reader needs to place the run.
_TITLE_KEYS = ["model.name", "model.norm", "data.name", "optimizer.name", "optimizer.lr", "train.batch_size"]


def run_title(raw: dict[str, Any], fallback: str, width: int = 120) -> str:
    """'name: seed_cnn, norm=batch, synthetic, adam lr=0.001, batch 64' plus every other experiment
    key that is not at its default (init_scale=5, dropout=0.3, train_limit=2000...), wrapped to width."""
    import textwrap

    flat, defaults = config_mod.flatten(raw), _defaults()
    leaves = [k.rsplit(".", 1)[-1] for k in defaults]
    short = lambda k: k.rsplit(".", 1)[-1] if leaves.count(k.rsplit(".", 1)[-1]) == 1 else k  # noqa: E731
    head = (f"{raw.get('name', fallback)}: {flat.get('model.name')}, norm={flat.get('model.norm')}, "
            f"{flat.get('data.name')}, {flat.get('optimizer.name')} lr={_fmt_value(flat.get('optimizer.lr'))}, "
            f"batch {flat.get('train.batch_size')}")
    extra = [f"{short(k)}={_fmt_value(v)}" for k, v in flat.items()
             if k not in _TITLE_KEYS and k in defaults and experiment_key(k, flat) and not _same(v, defaults[k])]
    return "\n".join(textwrap.wrap(", ".join([head] + extra), width=width, break_long_words=False))


def run_dir_title(run_dir: Path, width: int = 120) -> str:
    """A figure title naming the run: its config name and the settings that differ from the defaults."""
    return _run_title(run_dir, width)


def _run_title(run_dir: Path, width: int = 120) -> str:
    cfg_path = run_dir / rundir.CONFIG_FILE
    if not cfg_path.is_file():
        return run_dir.name
    return run_title(config_mod.read_yaml(cfg_path) or {}, run_dir.name, width)


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's metrics, flattened config and summary, for comparison."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.METRICS_FILE).is_file():
        raise BnctlError(f"{run_dir} is not a bnctl run directory (no {rundir.METRICS_FILE})")
    raw = config_mod.read_yaml(run_dir / rundir.CONFIG_FILE) if (run_dir / rundir.CONFIG_FILE).is_file() else {}
    try:  # unreadable (cut short, edited by hand): compared without it, as `bnctl runs` lists it
        summary = rundir.read_json(run_dir / rundir.SUMMARY_FILE) if (run_dir / rundir.SUMMARY_FILE).is_file() else {}
    except (OSError, ValueError):
        summary = {}
    return {"dir": run_dir, "rows": rundir.read_csv(run_dir / rundir.METRICS_FILE),
            "config": config_mod.flatten(raw or {}), "summary": summary}


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Dotted config keys whose values are not the same in every run, among those that change an experiment
    (not device or diagnostics; not data.root for synthetic data, nor a key that applies to none of the runs)."""
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1
            and any(experiment_key(k, r["config"]) for r in runs)]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Readable names for dotted keys: the leaf ('lr'), or the section for '*.name' ('model'); dotted if ambiguous."""
    short = {k: (k.split(".")[0] if k.endswith(".name") else k.split(".")[-1]) for k in keys}
    clashes = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {k: (k if v in clashes else v) for k, v in short.items()}


def run_names(runs: list[dict[str, Any]]) -> list[str]:
    """Short, unique labels: each run's config name; where names repeat, the part of the directory
    names that tells them apart (e.g. the start time), joined to the name."""
    names = [str(r["config"].get("name") or Path(r["dir"]).name) for r in runs]
    out = list(names)
    for name in set(names):
        same = [i for i, n in enumerate(names) if n == name]
        if len(same) == 1:
            continue
        parts = [Path(runs[i]["dir"]).name.split("-") for i in same]
        width = min(len(p) for p in parts)
        varying = [j for j in range(width) if len({tuple(p[j:j + 1]) for p in parts}) > 1]
        for i, p in zip(same, parts):
            tail = "-".join(p[j] for j in varying) + ("-" + "-".join(p[width:]) if len(p) > width else "")
            out[i] = f"{name}@{tail.strip('-')}" if tail.strip("-") else Path(runs[i]["dir"]).name
    if len(set(out)) < len(out):  # still ambiguous (same folder name under different roots): the full path
        out = [n if out.count(n) == 1 else str(r["dir"]) for n, r in zip(out, runs)]
    return out


def run_label(run: dict[str, Any], keys: list[str], name: str | None = None) -> str:
    """'name (norm=none, lr=0.01)': the run's name and its values of the keys in which the runs differ."""
    name = name or str(run["config"].get("name") or run["dir"].name)
    short = short_keys(keys)
    diffs = ", ".join(f"{short[k]}={run['config'].get(k)}" for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{name} ({diffs})" if keys else name


def compare_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: its label and differing config values, final and best metrics, epochs and wall time."""
    keys = differing_keys(runs)
    table = []
    for run, name in zip(runs, run_names(runs)):
        rows = run["rows"]
        last = rows[-1] if rows else {}
        best = max(rows, key=lambda r: r["test_acc"]) if rows else {}
        table.append({
            "run": run_label(run, keys, name), "name": name, "dir": str(run["dir"]),
            "differs": {k: run["config"].get(k) for k in keys},
            "status": rundir.effective_status(run["dir"], run["summary"]) if run["summary"] else "unknown",
            "epochs": len(rows), "epochs_planned": run["config"].get("train.epochs"),
            "final_train_acc": last.get("train_acc"), "final_test_acc": last.get("test_acc"),
            # train.eval_train's eval-mode train accuracy: the fair side of the train-test gap
            "final_clean_train_acc": last.get("clean_train_acc"),
            "final_gap": (None if last.get("clean_train_acc") is None or last.get("test_acc") is None
                          else last["clean_train_acc"] - last["test_acc"]),
            "final_train_loss": last.get("train_loss"), "final_test_loss": last.get("test_loss"),
            "best_test_acc": best.get("test_acc"), "best_epoch": best.get("epoch"),
            "wall_time_s": run["summary"].get("wall_time_s"),  # the run's time has one definition: summary.json's
        })
    return table
