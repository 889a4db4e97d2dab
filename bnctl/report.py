"""A sweep's report: statistics over seeds per cell, summary.csv, report.md and figures.

Reads files only (sweep.yaml, each run's summary.json and metrics.csv), like plotting: it
imports neither torch nor the engine, so it runs on any machine and on a sweep that is
still running or was stopped part-way; what is missing is listed, never guessed.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnctl import rundir, stats, sweepdir
from bnctl.errors import ConfigError

SWEEP_FILE, RESULTS_FILE = sweepdir.PLAN_FILE, sweepdir.RESULTS_FILE
REPORT_FILE, SUMMARY_CSV, DIFFERENCES_CSV = "report.md", "summary.csv", "differences.csv"

# Per-run metrics summarized over seeds: (results.csv column or derived name, label, decimals).
METRICS = [
    ("final_test_acc", "final test acc %", 2),
    ("best_test_acc", "best test acc %", 2),
    ("final_test_loss", "final test loss", 4),
    ("gap", "train-test gap (points)", 2),  # clean (eval-mode) train acc - test acc; needs train.eval_train
]
# The values a metric can take: a 95% t-interval over few seeds can reach past them, and is then drawn cut
# there (the numbers are never cut). The gap is a difference of two accuracies.
METRIC_RANGE = {"final_test_acc": (0.0, 100.0), "best_test_acc": (0.0, 100.0), "gap": (-100.0, 100.0)}
# Keys whose values are drawn on a log axis: rates and scales are chosen log-spaced.
LOG_KEYS = ("lr", "init_scale", "init_std", "weight_decay", "min_lr", "bn_eps", "batch_size")
FINISHED = sweepdir.FINISHED  # statuses that are results; anything else is missing


@dataclass
class Cell:
    """One grid point: its swept values, its runs' statuses and the statistics over its completed seeds."""

    name: str
    values: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)  # results.csv rows, in seed order
    stats: dict[str, stats.Summary] = field(default_factory=dict)

    def count(self, *statuses: str) -> int:
        return sum(r["status"] in statuses for r in self.runs)

    @property
    def missing(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] not in FINISHED]


@dataclass
class SweepData:
    """A sweep as its files describe it: the plan and one results row per planned run."""

    dir: Path
    plan: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def grid(self) -> dict[str, list]:
        return dict(self.plan.get("grid") or {})

    @property
    def name(self) -> str:
        return str(self.plan.get("name") or self.dir.name)


def _gap(row: dict[str, Any]) -> float | None:
    train, test = row.get("final_clean_train_acc"), row.get("final_test_acc")
    return None if train is None or test is None else float(train) - float(test)


def load(sweep_dir: Path) -> SweepData:
    """The plan and one row per planned run, read fresh from the run directories (results.csv may lag a crash)."""
    from bnctl import sweep

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / SWEEP_FILE).is_file():
        raise ConfigError(f"{sweep_dir} is not a bnctl sweep directory (no {SWEEP_FILE})")
    plan, rows = sweep.load(sweep_dir)
    if not plan.runs:
        raise ConfigError(f"{sweep_dir / SWEEP_FILE} lists no runs")
    for row in rows:
        row["gap"] = _gap(row)
    return SweepData(sweep_dir, plan.to_dict(), rows)


def cells(data: SweepData) -> list[Cell]:
    """The grid's cells in plan order, each with statistics over its completed runs.

    Diverged runs are counted, not averaged: their final metrics are not a trained model's.
    """
    by_name: dict[str, Cell] = {}
    for row in data.rows:
        cell = by_name.setdefault(row["cell"], Cell(row["cell"], {k: row.get(k) for k in data.grid}))
        cell.runs.append(row)
    for cell in by_name.values():
        done = [r for r in cell.runs if r["status"] == "completed"]
        cell.stats = {m: stats.summarize([r.get(m) for r in done]) for m, _, _ in METRICS}
    return list(by_name.values())


def _metrics_present(all_cells: list[Cell]) -> list[tuple[str, str, int]]:
    return [m for m in METRICS if any(c.stats[m[0]].n for c in all_cells)]


def fmt_summary(s: stats.Summary, digits: int) -> str:
    if s.n == 0:
        return "-"
    if s.n == 1:
        return f"{s.mean:.{digits}f} (n=1)"
    return f"{s.mean:.{digits}f} ± {s.std:.{digits}f} [{s.lo:.{digits}f}, {s.hi:.{digits}f}]"


def table_rows(data: SweepData, all_cells: list[Cell],
               only: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """The report's table: swept values, n (completed/planned), diverged, then mean ± std [95% CI] per metric."""
    metrics = [m for m in _metrics_present(all_cells) if only is None or m[0] in only]
    header = [*data.grid, "n", "diverged", *(label for _, label, _ in metrics)]
    body = []
    for c in all_cells:
        body.append([*(str(c.values[k]) for k in data.grid), f"{c.count('completed')}/{len(c.runs)}",
                     str(c.count("diverged")), *(fmt_summary(c.stats[m], d) for m, _, d in metrics)])
    return header, body


def write_summary_csv(data: SweepData, all_cells: list[Cell], path: Path) -> Path:
    """summary.csv: one row per cell with run counts and mean, std, n, ci_lo, ci_hi per metric."""
    buf = io.StringIO()
    columns = ["cell", *data.grid, "planned", "completed", "diverged", "failed", "missing"]
    for m, _, _ in METRICS:
        columns += [f"{m}_{s}" for s in ("mean", "std", "n", "ci_lo", "ci_hi")]
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(columns)
    for c in all_cells:
        row = [c.name, *(c.values[k] for k in data.grid), len(c.runs), c.count("completed"), c.count("diverged"),
               c.count("failed"), len(c.missing)]
        for m, _, _ in METRICS:
            s = c.stats[m]
            row += ["" if v is None else (repr(v) if isinstance(v, float) else v)
                    for v in (s.mean, s.std, s.n, s.lo, s.hi)]
        out.writerow(row)
    rundir.atomic_write_text(path, buf.getvalue())
    return path


# ------------------------------------------------------------------ differences between levels

# Metrics whose level differences the report gives (best_test_acc is a maximum over epochs: biased upwards).
DIFFERENCE_METRICS = ("final_test_acc", "gap")
# The level every other one is compared against when the sweep varies this key and includes it: the
# control of a normalization study. Other keys: the first value listed in the grid.
DEFAULT_REFERENCE = {"model.norm": "none"}


@dataclass
class LevelDifference:
    """One level of a swept key minus the reference level, at fixed values of the other swept keys."""

    key: str
    level: Any
    reference: Any
    at: dict[str, Any]  # the other swept keys' values
    metric: str
    diff: stats.Difference | None  # Welch; None with fewer than 2 completed runs on a side
    n: tuple[int, int]  # completed runs with a value: (level, reference)


def _same_value(a: Any, b: Any) -> bool:
    """Grid values as the plan holds them and as typed or read back from CSV (0.001, '1e-3')."""
    if a == b or str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def reference_level(key: str, levels: list, chosen: dict[str, Any] | None = None) -> Any:
    """The level of `key` that the others are compared against: chosen[key], else DEFAULT_REFERENCE's, else the first."""
    if chosen and key in chosen:
        match = [v for v in levels if _same_value(v, chosen[key])]
        if not match:
            raise ConfigError(f"--reference {key}={chosen[key]}: not a level of the sweep "
                              f"(its levels: {', '.join(map(str, levels))})")
        return match[0]
    default = DEFAULT_REFERENCE.get(key)
    return default if default in levels else levels[0]


def level_differences(data: SweepData, all_cells: list[Cell], reference: dict[str, Any] | None = None,
                      metrics: tuple[str, ...] = DIFFERENCE_METRICS) -> list[LevelDifference]:
    """For every swept key with two or more levels: each level minus the reference level, at every combination
    of the other swept keys, over completed runs (diverged ones are left out, as in the per-cell table)."""
    unknown = set(reference or {}) - set(data.grid)
    if unknown:
        raise ConfigError(f"--reference {', '.join(sorted(unknown))}: not a swept key of this sweep "
                          f"(swept: {', '.join(data.grid) or 'none'})")
    overrides = {r["cell"]: dict(r.get("overrides") or {}) for r in data.plan.get("runs") or []}

    def find(values: dict[str, Any]) -> Cell | None:
        for c in all_cells:
            mine = overrides.get(c.name, c.values)
            if all(_same_value(mine.get(k), v) for k, v in values.items()):
                return c
        return None

    def completed(cell: Cell | None, metric: str) -> list[float]:
        if cell is None:
            return []
        return [float(r[metric]) for r in cell.runs if r["status"] == "completed" and _is_number(r.get(metric))
                and math.isfinite(float(r[metric]))]

    out = []
    for key, levels in data.grid.items():
        if len(levels) < 2:
            continue
        ref = reference_level(key, levels, reference)
        others = [k for k in data.grid if k != key]
        for combo in itertools.product(*(data.grid[k] for k in others)):
            at = dict(zip(others, combo))
            base = find({**at, key: ref})
            for level in [v for v in levels if not _same_value(v, ref)]:
                cell = find({**at, key: level})
                for metric in metrics:
                    a, b = completed(cell, metric), completed(base, metric)
                    if a or b:
                        out.append(LevelDifference(key, level, ref, at, metric, stats.welch(a, b), (len(a), len(b))))
    return out


def fmt_difference(d: LevelDifference, digits: int = 2) -> str:
    n = f"n={d.n[0]}/{d.n[1]}"
    if d.diff is None:
        return f"- ({n})"
    e = d.diff
    return f"{e.effect:+.{digits}f} [{e.lo:+.{digits}f}, {e.hi:+.{digits}f}] ({n})"


def difference_rows(diffs: list[LevelDifference]) -> tuple[list[str], list[list[str]]]:
    """The differences as a table: one row per (key, level, other keys' values), one column per metric."""
    metrics = list(dict.fromkeys(d.metric for d in diffs))
    labels = dict((m, lab) for m, lab, _ in METRICS)
    header = ["swept key", "difference", "at", *(labels[m] for m in metrics)]
    rows: dict[tuple, dict[str, str]] = {}
    for d in diffs:
        short = d.key.rsplit(".", 1)[-1]
        where = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in d.at.items()) or "-"
        rows.setdefault((d.key, f"{short}={d.level} minus {short}={d.reference}", where), {})[d.metric] = \
            fmt_difference(d)
    return header, [[*k, *(v.get(m, "-") for m in metrics)] for k, v in rows.items()]


def write_differences_csv(diffs: list[LevelDifference], path: Path) -> Path:
    """differences.csv: one row per level difference and metric, with the Welch interval and both n."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["key", "level", "reference", "at", "metric", "difference", "ci_lo", "ci_hi", "n_level",
                  "n_reference", "p", "method"])
    for d in diffs:
        e = d.diff
        out.writerow([d.key, d.level, d.reference, ";".join(f"{k}={v}" for k, v in d.at.items()), d.metric,
                      *(("", "", "") if e is None else (repr(e.effect), repr(e.lo), repr(e.hi))), *d.n,
                      "" if e is None or e.p is None else repr(e.p), "" if e is None else "Welch"])
    rundir.atomic_write_text(path, buf.getvalue())
    return path


DIFFERENCES_TEXT = ("Each row: a level of one swept key minus the reference level (`model.norm=none` when "
                    "the sweep includes it, else the key's first value; `bnctl report --reference KEY=VALUE` "
                    "chooses), with the other swept keys held at the values in `at`. Mean difference over "
                    "completed seeds with Welch's 95% interval (`scipy.stats.ttest_ind`, `equal_var=False`); "
                    "n = completed runs of the level/of the reference; `-` below 2 on a side. Diverged runs "
                    "are left out, as in the table above. Each interval holds for its own row: with many rows, "
                    "some exclude 0 by chance alone.")


# ------------------------------------------------------------------ figures

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numeric_keys(data: SweepData) -> list[str]:
    """Swept keys whose values are all numbers (at least two of them): these get a metric-vs-key figure."""
    return [k for k, vals in data.grid.items() if len(vals) > 1 and all(_is_number(v) for v in vals)]


def _log_axis(key: str, values: list) -> bool:
    positive = all(v > 0 for v in values)
    return positive and (key.rsplit(".", 1)[-1] in LOG_KEYS or max(values) / min(values) >= 100)


def _label(values: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={values[k]}" for k in keys) or "all runs"


def draw_metric_vs_key(ax, data: SweepData, all_cells: list[Cell], key: str, metric: str = "final_test_acc",
                       title: str | None = None) -> bool:
    """On ax: metric against one numeric swept key, one line per value of the other keys, 95% t-interval bars."""
    label = dict((m, lab) for m, lab, _ in METRICS)[metric]
    others = [k for k in data.grid if k != key]
    lines: dict[tuple, list[Cell]] = {}
    for c in all_cells:
        lines.setdefault(tuple(c.values[k] for k in others), []).append(c)
    drawn = clipped = False
    lo_cap, hi_cap = METRIC_RANGE.get(metric, (-math.inf, math.inf))
    diverged: dict[Any, list[str]] = {}  # x -> the lines whose cell there diverged in every finished run
    for group, members in lines.items():
        pts = sorted((c.values[key], c.stats[metric]) for c in members if c.stats[metric].n)
        if pts:
            # The bar is drawn within the metric's possible range; the interval itself (table, summary.csv) is not cut.
            below = [s.mean - max(s.lo, lo_cap) if s.lo is not None else 0.0 for _, s in pts]
            above = [min(s.hi, hi_cap) - s.mean if s.hi is not None else 0.0 for _, s in pts]
            clipped |= any(s.lo is not None and (s.lo < lo_cap or s.hi > hi_cap) for _, s in pts)
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[below, above],
                        marker="o", capsize=3, label=_label(dict(zip(others, group)), others))
            drawn = True
        for c in members:  # a cell whose finished runs all diverged has no mean: name it at its x, not a hole
            if not c.stats[metric].n and c.count("diverged"):
                diverged.setdefault(c.values[key], []).append(_label(c.values, others) if others else "all")
    for x, labels in diverged.items():
        ax.annotate("diverged: " + "; ".join(labels), (x, 0.03), xycoords=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=7, rotation=90, color="0.3")
    values = list(data.grid[key])
    if _log_axis(key, values):
        ax.set_xscale("log", base=2 if key.endswith("batch_size") else 10)
    if key.endswith("batch_size") or len(values) <= 6:
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    ns = sorted({c.stats[metric].n for c in all_cells if c.stats[metric].n})
    ax.set_title(title or f"{data.name}: {label} vs {key}\nmean over seeds (n={'/'.join(map(str, ns))}), "
                          "bars: 95% t-interval", fontsize=10)
    if drawn and (others or len(lines) > 1):
        ax.legend(fontsize=8)
    if clipped:
        clip_note(ax, "bars", lo_cap, hi_cap)
    return drawn


def clip_note(ax, what: str, lo: float, hi: float) -> None:
    """Say under the axes that some interval was drawn cut at the metric's possible range."""
    ax.annotate(f"{what} cut at {lo:g}% and {hi:g}% where a 95% interval reaches beyond (report.md and "
                "summary.csv give it uncut)", (0.5, 0), xycoords="axes fraction",
                xytext=(0, -30), textcoords="offset points", ha="center", va="top", fontsize=7.5, color="0.3")


def plot_metric_vs_key(data: SweepData, all_cells: list[Cell], key: str, out: Path,
                       metric: str = "final_test_acc", title: str | None = None) -> Path | None:
    """metric against one numeric swept key -> a PNG (None when no cell has a value yet)."""
    from bnctl.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not draw_metric_vs_key(ax, data, all_cells, key, metric, title):
        plt.close(fig)
        return None
    return save_figure(fig, out)


def _epoch_series(run_dir: Path, column: str) -> dict[int, float]:
    path = run_dir / rundir.METRICS_FILE
    if not path.is_file():
        return {}
    series = {}
    for r in rundir.read_csv(path):
        v = r.get(column)
        if isinstance(r.get("epoch"), int) and _is_number(v) and math.isfinite(v):
            series[r["epoch"]] = float(v)
    return series


def plot_cell_curves(data: SweepData, all_cells: list[Cell], out: Path, column: str = "test_acc") -> Path | None:
    """Mean ± 95% t-band over epochs per cell, from each finished run's metrics.csv."""
    from bnctl.plotting import num_classes, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.get_cmap("tab10" if len(all_cells) <= 10 else "tab20")
    drawn, clipped, all_epochs, values, classes = 0, False, [], [], set()
    for i, c in enumerate(all_cells):
        per_run = [_epoch_series(sweepdir.run_dir(data.dir, r["run"]), column) for r in c.runs if r["status"] in FINISHED]
        epochs = sorted({e for s in per_run for e in s})
        if not epochs:
            continue
        sums = [stats.summarize([s.get(e) for s in per_run]) for e in epochs]
        color = colors(i % colors.N)
        ax.plot(epochs, [s.mean for s in sums], marker="o" if len(epochs) <= 30 else None, ms=3, color=color,
                label=f"{_label(c.values, list(data.grid))} (n={max(s.n for s in sums)})")
        # An accuracy's t-interval can cross 0 or 100 with few seeds; the drawn band stops at the possible range.
        lo_cap, hi_cap = (0.0, 100.0) if column.endswith("acc") else (-math.inf, math.inf)
        band = [(e, max(s.lo, lo_cap), min(s.hi, hi_cap)) for e, s in zip(epochs, sums) if s.lo is not None]
        clipped |= any(s.lo is not None and (s.lo < lo_cap or s.hi > hi_cap) for s in sums)
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=color, alpha=0.15)
        drawn += 1
        all_epochs += epochs
        values += [s.mean for s in sums] + [v for b in band for v in b[1:]]
        classes |= {num_classes(sweepdir.run_dir(data.dir, r["run"])) for r in c.runs if r["status"] in FINISHED}
    if not drawn:
        plt.close(fig)
        return None
    from bnctl.plotting import accuracy_axis, integer_axis

    if column.endswith("acc"):  # the level of a network that learned nothing, as in the other figures
        if classes == {None}:  # runs without run.json or config.yaml: the plan's data says it
            name = ((data.plan.get("config") or {}).get("data") or {}).get("name", "synthetic")
            classes = {10} if name in ("synthetic", "cifar10") else classes
        chance = 100.0 / classes.pop() if len(classes) == 1 and None not in classes else None
        accuracy_axis(ax, values, chance)
        if clipped:
            clip_note(ax, "bands", 0.0, 100.0)
    integer_axis(ax, all_epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel(column.replace("_", " ") + (" %" if column.endswith("acc") else ""))
    ax.set_title(f"{data.name}: {column.replace('_', ' ')} per cell, mean over seeds, band: 95% t-interval",
                 fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # cells, and the chance line
    return save_figure(fig, out)


# ------------------------------------------------------------------ report.md

def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


@dataclass
class Report:
    """What `bnctl report` produced: the cells, the table, the files written and the runs still missing."""

    data: SweepData
    cells: list[Cell]
    header: list[str]
    body: list[list[str]]
    files: list[Path]
    missing: list[dict[str, Any]]
    differences: list[LevelDifference] = field(default_factory=list)


def missing_lines(missing: list[dict[str, Any]]) -> list[str]:
    """One line per run that is not a result yet: its name, status and error (if it failed)."""
    return [f"{r['run']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in missing]


def build(sweep_dir: Path, out_dir: Path | None = None, reference: dict[str, Any] | None = None) -> Report:
    """Aggregate a sweep over seeds and write summary.csv, differences.csv, report.md and figures into out_dir
    (the sweep dir). ``reference``: swept key -> the level the others are compared against."""
    data = load(sweep_dir)
    all_cells = cells(data)
    diffs = level_differences(data, all_cells, reference)  # a bad --reference fails before anything is written
    out_dir = Path(out_dir or data.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, body = table_rows(data, all_cells)
    files = [write_summary_csv(data, all_cells, out_dir / SUMMARY_CSV)]
    if diffs:
        files.append(write_differences_csv(diffs, out_dir / DIFFERENCES_CSV))
    figures = []
    metrics = [m for m in ("final_test_acc", "gap") if any(c.stats[m].n for c in all_cells)]
    for key in numeric_keys(data):
        for metric in metrics:
            short = key.rsplit(".", 1)[-1]
            path = plot_metric_vs_key(data, all_cells, key, out_dir / f"{metric}_vs_{short}.png", metric)
            if path:
                figures.append(path)
    curves = plot_cell_curves(data, all_cells, out_dir / "curves_test_acc.png")
    if curves:
        figures.append(curves)
    missing = [r for c in all_cells for r in c.missing]
    files.append(_write_markdown(data, all_cells, header, body, figures, missing, out_dir / REPORT_FILE, diffs))
    return Report(data, all_cells, header, body, files + figures, missing, diffs)


def _write_markdown(data: SweepData, all_cells: list[Cell], header, body, figures, missing, path: Path,
                    diffs: list[LevelDifference] = ()) -> Path:
    counts = {s: sum(r["status"] == s for r in data.rows) for s in dict.fromkeys(r["status"] for r in data.rows)}
    fixed = data.plan.get("fixed") or {}
    lines = [f"# Sweep report: {data.name}", "",
             f"Sweep directory `{data.dir}`; base config `{data.plan.get('base_config')}`; "
             f"seeds {data.plan.get('seeds')}; {len(data.rows)} planned runs: "
             + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".", ""]
    if fixed:
        lines += ["Fixed: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()) + ".", ""]
    lines += ["Each cell: mean ± sample std [95% t-interval] over its completed seeds (scipy.stats.t); "
              "n = completed/planned. Diverged runs are counted, not averaged. The gap is eval-mode "
              "train accuracy minus test accuracy (needs `train.eval_train`).", "",
              md_table(header, body), ""]
    if diffs:
        lines += ["## Differences between levels", "", DIFFERENCES_TEXT, "", md_table(*difference_rows(diffs)), ""]
    if missing:
        lines += [f"**Incomplete:** {len(missing)} of {len(data.rows)} runs are not results yet; "
                  "the statistics above use only the finished ones.", ""]
        lines += [f"- {line}" for line in missing_lines(missing)] + [""]
    for fig in figures:
        lines += [f"![{fig.stem}]({Path(fig).relative_to(path.parent)})", ""]
    if figures:
        lines += ["The figures draw each 95% interval only within the values the metric can take (0-100% for an "
                  "accuracy), saying so on a figure where one is cut; the table above and summary.csv give the "
                  "intervals uncut.", ""]
    rundir.atomic_write_text(path, "\n".join(lines))
    return path
