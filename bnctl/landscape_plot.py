"""Santurkar-style figures from landscape.csv alone (no torch): one run, or several overlaid.

Top row, per probed step, over the step sizes probed (train.landscape.scales): the range of the
loss along the step (shaded, with the loss at the current weights as a line), the range of the
gradient change (gradient predictiveness) and the largest gradient change per distance moved
(effective beta-smoothness). Rows below: internal covariate shift per layer, ||G - G'|| and cos(G, G').
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

from bnctl import rundir

FIGURE = "landscape.png"


def read(run_dir: Path) -> dict[str, Any] | None:
    """landscape.csv as series: per-step summaries, per-step ranges over scales, per-layer ICS; None if absent."""
    path = Path(run_dir) / rundir.LANDSCAPE_FILE
    if not path.is_file():
        return None
    rows = rundir.read_csv(path)
    if not rows:
        return None
    summary: dict[str, dict[int, float]] = defaultdict(dict)
    per_scale: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ics: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    layers: dict[str, None] = {}
    for r in rows:
        step, measure, value = r["step"], r["measure"], r["value"]
        if not isinstance(value, (int, float)):
            continue
        if r["layer"] is not None:
            ics[measure][r["layer"]][step] = value
            layers.setdefault(r["layer"])
        elif r["scale"] is not None:
            per_scale[measure][step].append(value)
        else:
            summary[measure][step] = value
    return {"summary": summary, "per_scale": per_scale, "ics": ics, "layers": list(layers)}


# ------------------------------------------------------------------ comparing at matched training loss

MATCHED_MEASURES = ("loss_range", "grad_change_max", "beta_max")
# What a probe's numbers mean: two runs are compared only when they probed alike.
PROBE_KEYS = ("train.landscape.direction", "train.landscape.scales")


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def matched_window(la: dict[int, float], lb: dict[int, float], min_probes: int = 5) -> dict[str, Any]:
    """The matched-loss window of two runs' losses by step: the overlap of their 10th-90th percentile ranges.

    Returns ``window`` (lo, hi), ``steps`` (each run's probed steps inside it) and ``n``; ``reason`` says why
    the runs are not comparable (fewer than ``min_probes`` probes in a run or in the window, or no overlap).
    """
    out: dict[str, Any] = {"window": None, "steps": None, "n": (0, 0), "reason": None}
    if len(la) < min_probes or len(lb) < min_probes:
        out["reason"] = f"fewer than {min_probes} probes in a run"
        return out
    lo = max(_quantile(list(la.values()), 0.1), _quantile(list(lb.values()), 0.1))
    hi = min(_quantile(list(la.values()), 0.9), _quantile(list(lb.values()), 0.9))
    if lo > hi:
        out["reason"] = "the runs' training losses do not overlap (one has not reached the other's range)"
        return out
    steps = tuple([t for t, v in losses.items() if lo <= v <= hi] for losses in (la, lb))
    out["window"], out["steps"], out["n"] = (lo, hi), steps, (len(steps[0]), len(steps[1]))
    if min(out["n"]) < min_probes:
        out["reason"] = (f"only {out['n'][0]} and {out['n'][1]} probes at losses in [{lo:.3g}, {hi:.3g}], "
                         f"fewer than {min_probes}")
    return out


def matched_loss(a: dict[str, Any], b: dict[str, Any], min_probes: int = 5,
                 measures: tuple[str, ...] = MATCHED_MEASURES) -> dict[str, Any]:
    """Two runs' landscape measures compared where their training losses overlap.

    A network on its initial plateau looks smooth for that reason alone, so the runs are compared
    at the same loss, not at the same step: the window is the overlap of the two runs' central
    ranges (10th to 90th percentile) of the loss at the probed weights (loss_here); each run's
    probes inside it give a median per measure. With fewer than ``min_probes`` probes of either
    run in the window, the runs are not comparable and no medians are given (``reason`` says why).
    """
    m = matched_window(a["summary"].get("loss_here", {}), b["summary"].get("loss_here", {}), min_probes)
    out: dict[str, Any] = {"window": m["window"], "n": m["n"], "medians": None, "reason": m["reason"]}
    if m["reason"] is not None:
        return out
    out["medians"] = {mm: tuple(_quantile([d["summary"][mm][t] for t in ts if t in d["summary"].get(mm, {})], 0.5)
                                for d, ts in zip((a, b), m["steps"])) for mm in measures}
    return out


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _log_if_wide(ax, values: list[float]) -> None:
    values = _finite(values)
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        from matplotlib import ticker

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10, not 10^-1
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def draw(runs: list[tuple[str, dict[str, Any]]], out: Path, title: str, legend: bool = False,
         missing: tuple[str, ...] = ()) -> Path:
    """The figure for one or more (label, read(...)) pairs; ``legend`` names the runs even when only one
    is drawn (a comparison), and ``missing`` lists the compared runs that have no landscape.csv."""
    from bnctl.figstyle import pyplot, save_figure

    plt = pyplot()
    layers: list[str] = []
    for _, data in runs:
        layers += [n for n in data["layers"] if n not in layers]
    cols = max(4, len(layers))
    nrows = 3 if layers else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.8 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    colors = plt.get_cmap("tab10")
    several = len(runs) > 1
    legend = legend or several
    for i, (label, data) in enumerate(runs):
        color = colors(i % 10)
        s, ps = data["summary"], data["per_scale"]
        steps = sorted(s.get("loss_min", {}))
        ax = axes[0][0]
        ax.fill_between(steps, [s["loss_min"][t] for t in steps], [s["loss_max"][t] for t in steps],
                        color=color, alpha=0.3, lw=0, label=label)
        here = sorted(s.get("loss_here", {}))
        ax.plot(here, [s["loss_here"][t] for t in here], color=color, lw=1.0)
        ax = axes[0][1]
        gsteps = sorted(ps.get("grad_change", {}))
        lo = [min(ps["grad_change"][t]) for t in gsteps]
        hi = [max(ps["grad_change"][t]) for t in gsteps]
        ax.fill_between(gsteps, lo, hi, color=color, alpha=0.3, lw=0)
        ax.plot(gsteps, hi, color=color, lw=0.8)
        _log_if_wide(ax, lo + hi)
        ax = axes[0][2]
        bsteps = sorted(s.get("beta_max", {}))
        ax.plot(bsteps, [s["beta_max"][t] for t in bsteps], color=color, lw=1.2,
                marker="o" if len(bsteps) < 30 and not several else None, ms=2.5)
        _log_if_wide(ax, list(s.get("beta_max", {}).values()))
        for j, layer in enumerate(layers):
            for row, measure in ((1, "ics_l2"), (2, "ics_cos")):
                pts = sorted(data["ics"].get(measure, {}).get(layer, {}).items())
                if pts:
                    axes[row][j].plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.1,
                                      marker="o" if len(pts) < 30 and not several else None, ms=2.5)
    axes[0][0].set_title("loss along the step:\nrange over step sizes c\n(line: loss at the current weights)",
                         fontsize=9)
    axes[0][0].set_ylabel("cross-entropy", fontsize=8.5)
    axes[0][1].set_title("gradient predictiveness:\n||grad(x) - grad(x + c d)||,\nrange over step sizes c",
                         fontsize=9)
    axes[0][2].set_title("effective beta-smoothness:\nmax over c of gradient change / distance moved", fontsize=9)
    for j, layer in enumerate(layers):
        axes[1][j].set_title(f"ICS {layer}: ||G - G'||", fontsize=9)
        axes[2][j].set_title(f"ICS {layer}: cos(G, G')", fontsize=9)
        axes[2][j].axhline(1.0, color="0.5", lw=0.7, ls=":", zorder=0)
        _log_if_wide(axes[1][j], [v for _, d in runs for v in d["ics"].get("ics_l2", {}).get(layer, {}).values()])
    used = {(0, 0), (0, 1), (0, 2)} | {(r, j) for r in (1, 2) for j in range(len(layers))}
    for r in range(nrows):
        for j in range(cols):
            ax = axes[r][j]
            if (r, j) not in used:
                ax.axis("off")
                continue
            ax.set_xlabel("training step", fontsize=8.5)
            ax.tick_params(labelsize=8)
    spare = axes[0][3]
    handles, labels = axes[0][0].get_legend_handles_labels()
    if legend:
        if missing:  # a run in the comparison that drew nothing is named, not silently left out
            from matplotlib.patches import Patch

            handles = handles + [Patch(color="none") for _ in missing]
            labels = labels + [f"{name}: no landscape.csv" for name in missing]
        labels = [textwrap.fill(label, 48, subsequent_indent="  ") for label in labels]  # one column's width
        spare.legend(handles, labels, loc="center", fontsize=8.5, title="run (shaded: range over step sizes)",
                     title_fontsize=8.5)
    else:
        spare.text(0.02, 0.5, "shaded: range over the step sizes\nprobed at each step\n\nG: a layer's gradient;\n"
                   "G': the same after the layers\nbefore it took their step", fontsize=8.5, va="center",
                   transform=spare.transAxes)
    fig.suptitle(title, fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out)


def probe_settings(run_dir: Path) -> str:
    """How a run probed, in words ('probes every 25 steps along the optimizer's update, step sizes 0.5-4x').

    The probe settings leave training unchanged, so run titles and compare's labels leave them out;
    a landscape figure says them, since its numbers mean something else under other settings.
    """
    from bnctl import config as config_mod

    path = Path(run_dir) / rundir.CONFIG_FILE
    raw = (config_mod.read_yaml(path) or {}) if path.is_file() else {}
    probes = {**config_mod.LandscapeConfig().model_dump(mode="json"),
              **((raw.get("train") or {}).get("landscape") or {})}
    along = "the optimizer's update" if probes["direction"] == "update" else "-lr x the batch gradient"
    scales = ", ".join(f"{c:g}" for c in probes["scales"])
    return (f"probes every {probes['every']} steps along {along}, step sizes {scales}x"
            + ("" if probes["ics"] else ", no ICS"))


def plot_run(run_dir: Path) -> Path | None:
    """landscape.png for one run; None when it has no landscape.csv."""
    from bnctl.comparison import run_dir_title

    data = read(run_dir)
    if data is None:
        return None
    return draw([("", data)], Path(run_dir) / FIGURE,
                f"Loss landscape and internal covariate shift (Santurkar et al. 2018)\n{run_dir_title(Path(run_dir))}"
                f"\n{probe_settings(run_dir)}")


def plot_compare(runs: list[tuple[str, Path]], out: Path) -> Path | None:
    """The runs that have a landscape.csv, overlaid; None when none has."""
    read_all = [(label, read(d)) for label, d in runs]
    found = [(label, data) for label, data in read_all if data is not None]
    if not found:
        return None
    missing = tuple(label for label, data in read_all if data is None)
    probed = {label: probe_settings(d) for (label, d), (_, data) in zip(runs, read_all) if data is not None}
    said = (next(iter(probed.values())) if len(set(probed.values())) == 1
            else textwrap.fill("probed differently: " + "; ".join(f"{label}: {text}" for label, text in probed.items()),
                               width=160, break_long_words=False))
    return draw(found, out, "Loss landscape and internal covariate shift, overlaid (Santurkar et al. 2018, fig. 4-5)"
                f"\n{said}", legend=True, missing=missing)


def plot_compare_runs(runs: list[dict[str, Any]], out: Path) -> Path | None:
    """For `bnctl compare` (runs as comparison.load_run gives them): the overlay beside its figure, as
    <out's name>-landscape.png, labelled like the curves; None when no run has a landscape.csv."""
    from bnctl.comparison import differing_keys, run_label, run_names

    keys = differing_keys(runs)
    labelled = [(run_label(r, keys, name), Path(r["dir"])) for r, name in zip(runs, run_names(runs))]
    out = Path(out)
    return plot_compare(labelled, out.with_name(out.stem + "-landscape.png"))


def matched_summary(runs: list[dict[str, Any]]) -> list[str]:
    """For `bnctl compare` with exactly two runs that probed the landscape: the matched-loss comparison in words."""
    from bnctl.comparison import run_names

    found = [(name, data, r) for r, name in zip(runs, run_names(runs)) if (data := read(Path(r["dir"]))) is not None]
    if len(found) != 2:
        return []
    (na, a, ra), (nb, b, rb) = found
    probed = {k: (ra["config"].get(k), rb["config"].get(k)) for k in PROBE_KEYS}
    unlike = {k: v for k, v in probed.items() if repr(v[0]) != repr(v[1])}
    if unlike:  # a loss range along -lr*g and one along Adam's update (or at other step sizes) measure different things
        said = "; ".join(f"{k} {va} / {vb}" for k, (va, vb) in unlike.items())
        return [f"landscape at matched training loss: not comparable (the runs probed differently: {said})"]
    m = matched_loss(a, b)
    if m["medians"] is None:
        return [f"landscape at matched training loss: not comparable ({m['reason']})"]
    lo, hi = m["window"]
    lines = [f"landscape at matched training loss {lo:.3g}..{hi:.3g} (probes {m['n'][0]} / {m['n'][1]}), "
             f"medians {na} / {nb}:"]
    lines += [f"  {measure}: {va:.4g} / {vb:.4g}" for measure, (va, vb) in m["medians"].items()]
    return lines
