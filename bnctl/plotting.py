"""Figures drawn from a run's files alone (metrics.csv, diagnostics.csv, eval.json).

Imports neither torch nor the engine, so `bnctl plot` is quick and works anywhere.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from bnctl import config as config_mod, rundir
from bnctl.errors import BnctlError

TRAIN_COLOR, TEST_COLOR, CLEAN_COLOR = "#1f77b4", "#d62728", "#2ca02c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "legend.frameon": False, "font.size": 10,
    })
    return plt


def _save(fig, path: Path) -> Path:
    """Save a figure atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def _run_title(run_dir: Path) -> str:
    cfg_path = run_dir / rundir.CONFIG_FILE
    if not cfg_path.is_file():
        return run_dir.name
    raw = config_mod.read_yaml(cfg_path) or {}
    model, data, opt = raw.get("model", {}), raw.get("data", {}), raw.get("optimizer", {})
    train = raw.get("train", {})
    return (f"{raw.get('name', run_dir.name)}: {model.get('name')} norm={model.get('norm')} on {data.get('name')}, "
            f"{opt.get('name')} lr={opt.get('lr')}, batch {train.get('batch_size')}")


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """The two-panel loss and accuracy figure (train and test per epoch) -> curves.png."""
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
    best = max(rows, key=lambda r: r["test_acc"])
    ax_acc.scatter([best["epoch"]], [best["test_acc"]], s=140, facecolors="none", edgecolors=TEST_COLOR, zorder=3)
    ax_acc.annotate(f"best test {best['test_acc']:.1f}%", (best["epoch"], best["test_acc"]),
                    textcoords="offset points", xytext=(0, 10), ha="center", color=TEST_COLOR, fontsize=9)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(_run_title(run_dir), fontsize=10)
    fig.tight_layout()
    return _save(fig, out or run_dir / "curves.png")


def plot_confusion(eval_json: Path, out: Path | None = None) -> Path:
    """Row-normalized confusion matrix (percent of each true class) from an eval.json."""
    eval_json = Path(eval_json)
    result = rundir.read_json(eval_json)
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
    ax.set_title(f"Confusion (% of true class), accuracy {result['acc']:.2f}%, BN mode: {result['bn_mode']}",
                 fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, out or eval_json.with_name("confusion.png"))


def plot_diagnostics(run_dir: Path, out: Path | None = None) -> Path | None:
    """Per-layer BN statistics over training (diagnostics.csv) -> diagnostics.png."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.DIAGNOSTICS_FILE
    if not path.is_file():
        return None
    rows = rundir.read_csv(path)
    if not rows:
        return None
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        series[r["stat"]][r["layer"]].append((r["step"], r["value"]))
    panels = [(s, t) for s, t in DIAGNOSTIC_PANELS if s in series]
    plt = _pyplot()
    cols = 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (stat, title) in zip(axes.flat, panels):
        layers = list(series[stat])
        for i, layer in enumerate(layers):
            pts = sorted(series[stat][layer])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(i / max(1, len(layers) - 1)),
                    label=layer, lw=1.4)
        ax.set(title=title, xlabel="training step")
        if stat.startswith(("grad_norm", "weight_norm")):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"BN diagnostics, {_run_title(run_dir)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out or run_dir / "diagnostics.png")


# (stat name in diagnostics.csv, panel title), in display order.
DIAGNOSTIC_PANELS = [
    ("input_mean", "norm input: mean"),
    ("input_std", "norm input: std"),
    ("output_mean", "norm output: mean (train mode)"),
    ("output_std", "norm output: std (train mode)"),
    ("running_mean_avg", "running mean (channel average)"),
    ("running_var_avg", "running var (channel average)"),
    ("gamma_mean", "gamma (scale): mean"),
    ("beta_mean", "beta (shift): mean"),
    ("weight_norm", "preceding layer: weight norm"),
    ("grad_norm", "preceding layer: gradient norm"),
]


def plot_run(run_dir: Path) -> list[Path]:
    """Redraw every figure a run's files support."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BnctlError(f"run directory not found: {run_dir}")
    drawn = [plot_curves(run_dir)]
    diag = plot_diagnostics(run_dir)
    if diag is not None:
        drawn.append(diag)
    eval_json = run_dir / "eval.json"
    if eval_json.is_file():
        drawn.append(plot_confusion(eval_json))
    return drawn


# ------------------------------------------------------------------ comparing runs

def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's metrics, flattened config and summary, for comparison."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.METRICS_FILE).is_file():
        raise BnctlError(f"{run_dir} is not a bnctl run directory (no {rundir.METRICS_FILE})")
    raw = config_mod.read_yaml(run_dir / rundir.CONFIG_FILE) if (run_dir / rundir.CONFIG_FILE).is_file() else {}
    summary = rundir.read_json(run_dir / rundir.SUMMARY_FILE) if (run_dir / rundir.SUMMARY_FILE).is_file() else {}
    return {"dir": run_dir, "rows": rundir.read_csv(run_dir / rundir.METRICS_FILE),
            "config": config_mod.flatten(raw or {}), "summary": summary}


IGNORED_DIFFS = {"name"}  # differs between every pair of runs; says nothing about why


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if k not in IGNORED_DIFFS and len({repr(r["config"].get(k)) for r in runs}) > 1]


def run_label(run: dict[str, Any], keys: list[str]) -> str:
    name = run["config"].get("name", run["dir"].name)
    diffs = ", ".join(f"{k.split('.')[-1]}={run['config'].get(k)}" for k in keys[:4])
    return f"{name} ({diffs})" if diffs else name


def compare_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: final and best metrics, epochs and wall time."""
    keys = differing_keys(runs)
    table = []
    for run in runs:
        rows = run["rows"]
        last = rows[-1] if rows else {}
        best = max(rows, key=lambda r: r["test_acc"]) if rows else {}
        table.append({
            "run": run_label(run, keys), "dir": str(run["dir"]), "status": run["summary"].get("status", "?"),
            "epochs": len(rows), "final_train_acc": last.get("train_acc"), "final_test_acc": last.get("test_acc"),
            "final_test_loss": last.get("test_loss"), "best_test_acc": best.get("test_acc"),
            "best_epoch": best.get("epoch"),
            "wall_time_s": run["summary"].get("wall_time_s", sum(r.get("epoch_time_s") or 0 for r in rows)),
        })
    return table


def plot_compare(runs: list[dict[str, Any]], out: Path) -> Path:
    """Overlay several runs' loss and accuracy curves (solid: test, dashed: train)."""
    plt = _pyplot()
    keys = differing_keys(runs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.get_cmap("tab10")
    for i, run in enumerate(runs):
        rows, color, label = run["rows"], colors(i % 10), run_label(run, keys)
        epochs = [r["epoch"] for r in rows]
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(epochs, [r[f"test_{metric}"] for r in rows], color=color, lw=1.8, marker="o", ms=3, label=label)
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], color=color, lw=1.2, ls="--", alpha=0.7)
    ax_loss.set(title="Loss (solid: test, dashed: train)", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy (solid: test, dashed: train)", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = ax_acc.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=9, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("Runs differ in: " + (", ".join(keys) if keys else "nothing but their name"), fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)
