"""Figures drawn from a run's files alone (metrics.csv, diagnostics.csv, eval/*.json).

Imports neither torch nor the engine, so `bnctl plot` is quick and works anywhere. The figure style
lives in figstyle.py, and what compare compares (keys, names, the table) in comparison.py.

Over 350 lines: one builder per figure (curves, confusion, diagnostics, compare), each with the axis
choices that keep it readable for diverging or near-chance runs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bnctl import config as config_mod, rundir
from bnctl.comparison import differing_keys, run_dir_title, run_label, run_names
from bnctl.errors import BnctlError
from bnctl.figstyle import build_styled, pyplot, save_figure

TRAIN_COLOR, TEST_COLOR, CLEAN_COLOR = "#1f77b4", "#d62728", "#2ca02c"

# Shared with the other figure modules (landscape_plot.py, report, study): one style, one way to save.
_pyplot, _save, _styled = pyplot, save_figure, build_styled

_run_title = run_dir_title


def _run_info(run_dir: Path) -> dict[str, Any]:
    """run.json's contents, or {} when it is missing or unreadable (plots must still work)."""
    try:
        return rundir.read_json(run_dir / rundir.RUN_INFO_FILE)
    except (OSError, ValueError):
        return {}



def num_classes(run_dir: Path) -> int | None:
    """Classes of a run's data: run.json records them; the built-in datasets have 10."""
    n = _run_info(run_dir).get("num_classes")
    if isinstance(n, int) and n > 0:
        return n
    cfg_path = run_dir / rundir.CONFIG_FILE
    raw = config_mod.read_yaml(cfg_path) if cfg_path.is_file() else None
    name = ((raw or {}).get("data") or {}).get("name", "synthetic") if isinstance(raw, dict) else None
    return 10 if name in ("synthetic", "cifar10") else None


def accuracy_axis(ax, values: list[float], chance: float | None) -> None:
    """Chance as a line, and a y-range of at least 20 points around data and chance, so noise at
    chance level stays flat instead of filling the panel like a learning curve."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if chance is not None:
        ax.axhline(chance, color="0.45", lw=1.0, ls=":", zorder=0, label=f"chance ({chance:.3g}%)")
        values = values + [chance]
    if not values:
        return
    lo, hi = max(0.0, min(values) - 3), min(100.0, max(values) + 3)
    if hi - lo < 20:
        hi = min(100.0, lo + 20)
        lo = max(0.0, hi - 20)
    ax.set_ylim(lo, hi)


def integer_axis(ax, values: list[int]) -> None:
    """x ticks at whole numbers (epochs, steps) only; a span under 2 gets a margin of a half, since
    matplotlib would otherwise tick one epoch at 0.98, 1.00, 1.02."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    values = [v for v in values if v is not None]
    if values and max(values) - min(values) < 2:
        ax.set_xlim(min(values) - 0.5, max(values) + 0.5)


@_styled
def curves_figure(run_dir: Path):
    """The two-panel loss and accuracy figure (train and test per epoch), from metrics.csv."""
    run_dir = Path(run_dir)
    rows = rundir.read_csv(run_dir / rundir.METRICS_FILE)
    if not rows:
        raise BnctlError(f"{run_dir / rundir.METRICS_FILE} has no epochs yet; nothing to plot")
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    marker = "o" if len(rows) <= 30 else None
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=marker, color=TRAIN_COLOR, label="train (running)")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], marker=marker, color=TEST_COLOR, label="test (eval mode)")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], marker=marker, color=TRAIN_COLOR, label="train (running)")
    ax_acc.plot(epochs, [r["test_acc"] for r in rows], marker=marker, color=TEST_COLOR, label="test (eval mode)")
    if rows[0].get("clean_train_acc") is not None:
        ax_loss.plot(epochs, [r["clean_train_loss"] for r in rows], marker=marker, ls="--", color=CLEAN_COLOR,
                     label="train (eval mode)")
        ax_acc.plot(epochs, [r["clean_train_acc"] for r in rows], marker=marker, ls="--", color=CLEAN_COLOR,
                    label="train (eval mode)")
    classes = num_classes(run_dir)
    chance = 100.0 / classes if classes else None
    accuracy_axis(ax_acc, [r[k] for r in rows for k in ("train_acc", "test_acc", "clean_train_acc")
                            if r.get(k) is not None], chance)
    if classes and classes > 1:
        ax_loss.axhline(math.log(classes), color="0.45", lw=1.0, ls=":", zorder=0,
                        label=f"chance (ln {classes} = {math.log(classes):.2f})")
    best = max(rows, key=lambda r: r["test_acc"])
    ax_acc.scatter([best["epoch"]], [best["test_acc"]], s=140, facecolors="none", edgecolors=TEST_COLOR, zorder=3)
    # Anchor the label's far side at the first or last epoch so it stays inside the axes.
    ha = "center"
    if len(rows) > 1 and best["epoch"] in (epochs[0], epochs[-1]):
        ha = "left" if best["epoch"] == epochs[0] else "right"
    near_chance = chance is not None and best["test_acc"] < chance + 5  # say so rather than circle noise as a result
    ax_acc.annotate(f"best test {best['test_acc']:.1f}%" + (" (about chance)" if near_chance else ""),
                    (best["epoch"], best["test_acc"]),
                    textcoords="offset points", xytext={"left": (6, 8), "right": (-6, 8)}.get(ha, (0, 10)),
                    ha=ha, color=TEST_COLOR, fontsize=9)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        integer_axis(ax, epochs)
    fig.suptitle(_run_title(run_dir), fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """curves_figure -> curves.png (or out)."""
    return _save(curves_figure(run_dir), out or Path(run_dir) / "curves.png")


def plot_confusion(eval_json: Path, out: Path | None = None) -> Path:
    """Row-normalized confusion matrix (percent of each true class) from an eval.json -> its PNG."""
    eval_json = Path(eval_json)
    try:
        result = rundir.read_json(eval_json)
        result["classes"], result["confusion"]
    except (ValueError, KeyError, TypeError):  # a file of another kind, or cut short
        raise BnctlError(f"{eval_json} is not a bnctl eval result (JSON with classes and confusion)") from None
    # eval/running.json -> eval/running.png; a legacy eval.json keeps its confusion.png
    default = eval_json.with_name("confusion.png") if eval_json.name == "eval.json" else eval_json.with_suffix(".png")
    return _save(confusion_figure(result), out or default)


@_styled
def confusion_figure(result: dict[str, Any]):
    """Row-normalized confusion matrix (percent of each true class) of an evaluation result."""
    classes, matrix = result["classes"], result["confusion"]
    plt = _pyplot()
    k = len(classes)
    pct = [[100.0 * v / max(1, sum(row)) for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.grid(False)
    for i in range(k):
        for j in range(k):
            if matrix[i][j]:
                ax.text(j, i, f"{pct[i][j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if pct[i][j] > 55 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted class", ylabel="true class")
    if result.get("bn_mode") == "batch":
        mode = f"BN: statistics of each test batch of {result.get('batch_size')}"
    elif "recalibration" in result:
        mode = f"BN: running statistics recalibrated on {result['recalibration']['images']} training images"
    else:
        mode = "BN: running statistics"
    epoch = f"epoch {result['epoch']}, " if "epoch" in result else ""
    ax.set_title(f"Confusion (% of each true class)\n{epoch}accuracy {result['acc']:.2f}%, {mode}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_diagnostics(run_dir: Path, out: Path | None = None) -> Path | None:
    """diagnostics_figure -> diagnostics.png (or out); None without samples."""
    fig = diagnostics_figure(run_dir)
    return None if fig is None else _save(fig, out or Path(run_dir) / "diagnostics.png")


@_styled
def diagnostics_figure(run_dir: Path):
    """Per-layer BN statistics over training, from diagnostics.csv; None without samples."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.DIAGNOSTICS_FILE
    if not path.is_file():
        return None
    rows = rundir.read_csv(path)
    if not rows:
        return None
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    layers: dict[str, None] = {}  # model order, as the probe wrote them
    epoch_starts: dict[int, int] = {}
    for r in rows:
        series[r["stat"]][r["layer"]].append((r["step"], r["value"]))
        layers.setdefault(r["layer"])
        epoch_starts[r["epoch"]] = min(r["step"], epoch_starts.get(r["epoch"], r["step"]))
    steps_per_epoch = _run_info(run_dir).get("steps_per_epoch")
    if steps_per_epoch:  # exact boundaries; without run.json, the first sampled step of each epoch
        epoch_starts = {e: (e - 1) * steps_per_epoch for e in epoch_starts}
    panels = [p for p in DIAGNOSTIC_PANELS if p[0] in series]
    if "output_mean" not in series:  # no norm layers: what enters "the norm" is simply the layer's output
        panels = [(stat, title.replace("pre-norm activation", "conv/fc output (no norm layers)"), ref)
                  for stat, title, ref in panels]
    plt = _pyplot()
    from matplotlib import ticker

    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows + 0.5), squeeze=False,
                             layout="constrained")
    names = list(layers)
    # viridis stops short of its pale yellow end, which vanishes on white; dark = first layer.
    colors = {name: plt.get_cmap("viridis")(0.85 * i / max(1, len(names) - 1)) for i, name in enumerate(names)}
    for ax, (stat, title, reference) in zip(axes.flat, panels):
        values = []
        for layer, pts in series[stat].items():
            pts = sorted(pts)
            values += [v for _, v in pts if v is not None and math.isfinite(v)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[layer], label=layer, lw=1.3,
                    marker="o" if len(pts) == 1 else None, ms=3)
        if reference is not None:
            ax.axhline(reference, color="0.4", lw=0.8, ls=":", zorder=0)
        # Log scale only where a statistic can span orders of magnitude and actually does.
        if stat in LOG_STATS and values and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_yscale("log")
            # 1-2-5 ticks over a few decades, decades only beyond (a run blowing up spans dozens).
            few_decades = max(values) / min(values) < 1e3
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if few_decades else (1.0,)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        elif values and max(abs(v) for v in values) >= 1e4:
            # Label each tick itself: matplotlib's shared "1e10" multiplier would sit on the panel title.
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
        if stat == "dead_frac":  # a share: the full 0..1 range, so one unit dying does not fill the panel
            ax.set_ylim(-0.03, 1.03)
        integer_axis(ax, [r["step"] for r in rows])
        for start in sorted(epoch_starts.values())[1:] if len(epoch_starts) <= 30 else []:
            ax.axvline(start, color="0.75", lw=0.7, ls="--", zorder=0)  # epoch boundaries
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel("training step", fontsize=8.5)
        ax.tick_params(labelsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    legend_cols = 1 + (len(labels) - 1) // 12  # at most 12 entries per column
    if spare:  # the grid's empty cells hold the legend
        spare[0].legend(handles, labels, loc="center", ncol=legend_cols, fontsize=8,
                        title="layer (input side first)", title_fontsize=8.5)
    else:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, ncol=legend_cols,
                   title="layer", title_fontsize=8.5)
    fig.suptitle(f"Normalization diagnostics (train mode; dashed lines: epoch boundaries)\n{_run_title(run_dir)}",
                 fontsize=10)
    return fig


# (stat name in diagnostics.csv, panel title, reference line or None), in display order.
DIAGNOSTIC_PANELS = [
    ("input_mean", "pre-norm activation: mean", 0.0),
    ("input_std", "pre-norm activation: std", None),
    ("output_mean", "post-norm activation: mean", 0.0),
    ("output_std", "post-norm activation: std", 1.0),
    ("running_mean_avg", "running mean (channel average)", 0.0),
    ("running_var_avg", "running var (channel average)", None),
    ("gamma_mean", "gamma (scale): mean", 1.0),
    ("beta_mean", "beta (shift): mean", 0.0),
    ("weight_norm", "conv/fc weight: L2 norm", None),
    ("grad_norm", "conv/fc weight gradient: L2 norm", None),
    ("dead_frac", "dead ReLU units (share of channels)", 0.0),
]
LOG_STATS = {"input_std", "running_var_avg", "weight_norm", "grad_norm"}


def plot_run(run_dir: Path) -> list[Path]:
    """Redraw every figure a run's files support."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BnctlError(f"run directory not found: {run_dir}")
    # Diagnostics first: a run that diverged in its first epoch has no curves, but its
    # diagnostics show how it blew up.
    diag = plot_diagnostics(run_dir)
    try:
        drawn = [plot_curves(run_dir)]
    except BnctlError:
        if diag is None:
            raise
        drawn = []
    if diag is not None:
        drawn.append(diag)
    from bnctl import landscape_plot  # torch-free, like this module

    landscape = landscape_plot.plot_run(run_dir)
    if landscape is not None:
        drawn.append(landscape)
    legacy = run_dir / "eval.json"  # written by bnctl before results were kept under eval/
    for eval_json in ([legacy] if legacy.is_file() else []) + sorted((run_dir / rundir.EVAL_DIR).glob("*.json")):
        drawn.append(plot_confusion(eval_json))
    return drawn


def plot_compare(runs: list[dict[str, Any]], out: Path) -> Path:
    """compare_figure -> a PNG at out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(compare_figure(runs), out)


@_styled
def compare_figure(runs: list[dict[str, Any]]):
    """Overlay several runs' loss and accuracy curves (solid: test, dashed: train) in one figure."""
    plt = _pyplot()
    keys = differing_keys(runs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    colors = plt.get_cmap("tab10")
    for i, (run, name) in enumerate(zip(runs, run_names(runs))):
        rows, color, label = run["rows"], colors(i % 10), run_label(run, keys, name)
        epochs = [r["epoch"] for r in rows]
        marker = "o" if len(rows) <= 30 else None
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [r[f"test_{metric}"] for r in rows], color=color, lw=1.8, marker=marker, ms=3.5,
                    label=label)
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], color=color, lw=1.2, ls="--", alpha=0.7)
            if any(r.get(f"clean_train_{metric}") is not None for r in rows):  # train.eval_train
                ax.plot(epochs, [r.get(f"clean_train_{metric}") for r in rows], color=color, lw=1.2, ls="-.",
                        alpha=0.85)
    losses = [r[k] for run in runs for r in run["rows"] for k in ("train_loss", "test_loss")
              if r.get(k) is not None and math.isfinite(r[k])]
    # One run far above the others (a diverging one) would squash every other curve on a linear axis.
    log_loss = bool(losses) and min(losses) > 0 and max(losses) / min(losses) >= 3
    if log_loss:
        from matplotlib import ticker

        ax_loss.set_yscale("log")
        # Labelled ticks every few values within a decade, 1-2-5 over several, never bare decades only.
        subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0) if max(losses) / min(losses) < 10 else (1.0, 2.0, 5.0)
        ax_loss.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax_loss.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_loss.yaxis.set_minor_formatter(ticker.NullFormatter())
    classes = {num_classes(Path(run["dir"])) for run in runs}
    chance = 100.0 / classes.pop() if len(classes) == 1 and None not in classes else None
    accuracy_axis(ax_acc, [r[k] for run in runs for r in run["rows"] for k in ("train_acc", "test_acc", "clean_train_acc")
                           if r.get(k) is not None], chance)
    clean = any(r.get("clean_train_acc") is not None for run in runs for r in run["rows"])
    lines = "solid: test, dashed: train" + (", dash-dot: train in eval mode" if clean else "")
    ax_loss.set(title=f"Loss ({lines}" + ("; log scale)" if log_loss else ")"), xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title=f"Accuracy ({lines}" + ("; dotted: chance)" if chance else ")"), xlabel="epoch",
               ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        integer_axis(ax, [r["epoch"] for run in runs for r in run["rows"]])
    handles, labels = ax_loss.get_legend_handles_labels()  # the runs only (the chance line is on ax_acc)
    # One run per line reads in order; two columns only once the list gets long.
    fig.legend(handles, labels, loc="outside lower center", ncol=1 if len(labels) <= 5 else 2, fontsize=9)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap("Runs differ in: " + (", ".join(keys) if keys else "nothing that changes "
                                          "the experiment"), width=130)), fontsize=10)
    return fig
