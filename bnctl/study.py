"""`bnctl study claims`: the sweeps that test the notebook's claims, then one REPORT.md of verdicts.

A study directory runs/studies/<YYYYmmdd-HHMMSS>-claims-<profile>/ holds study.json (the
profile, the data overrides and which sweep answers which section), sweeps/ (ordinary sweep
directories, each with its own report), notebook_eval.csv (section 5's evaluations, one row
per checkpoint) and REPORT.md with its figures. Running it again with --resume picks up
where it stopped: finished runs and evaluations are kept.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from bnctl import configfiles, report, rundir, stats, studyspec, verdicts
from bnctl.errors import ConfigError, InterruptedRun

STUDY_FILE, REPORT_FILE, EVAL_FILE, SWEEPS_DIR, FIGURES_DIR = (
    "study.json", "REPORT.md", "notebook_eval.csv", "sweeps", "figures")
PROFILES = {  # profile -> images used to recalibrate BN in section 5, and the hardware its budget is sized for
    "quick": {"recalibrate": 2000, "sized_for": "cpu"},  # synthetic shapes, ~5 min on 2 idle cores
    "laptop": {"recalibrate": 2000, "sized_for": "cpu"},  # CIFAR-10 (or an image folder), ~20 min on 2 idle cores
    "full": {"recalibrate": 10000, "sized_for": "gpu"},
}
NOTEBOOK = {"train.batch_size": 4, "model.norm": "batch"}  # section 5 evaluates the BN runs at the notebook's batch
EVAL_BATCH = 4  # the notebook's test batch size


@dataclass(frozen=True)
class Section:
    key: str  # also the sweep file's stem in bnctl/configs/studies/<profile>/
    title: str
    question: str


SECTIONS = [
    Section("lr", "1. Higher learning rates",
            "Does BN let the network train at learning rates where the plain network fails?"),
    Section("init", "2. Initialization",
            "Is accuracy with BN less sensitive to the scale of the initial weights?"),
    Section("regularization", "3. Regularization",
            "Does BN shrink the gap between training and test accuracy, as dropout does?"),
    Section("small_batches", "4. Small batches",
            "Does BN lose more accuracy than GroupNorm as the batch shrinks (Wu & He 2018)?"),
]
NOTEBOOK_SECTION = Section("notebook_eval", "5. The notebook's evaluation",
                           "How much accuracy does evaluating with each test batch's own BN statistics "
                           f"(a model left in train mode, batches of {EVAL_BATCH}) cost, against eval mode?")


def studies_dir() -> Path:
    """The packaged profiles' sweep files (bnctl/configs/studies)."""
    return configfiles.STUDIES_DIR


def sweep_file(profile: str, key: str, root: Path | None = None) -> Path:
    path = (root or studies_dir()) / profile / f"{key}.yaml"
    if not path.is_file():
        raise ConfigError(f"study sweep file {path} not found (a --studies DIR holds one folder per profile, "
                          f"each with {', '.join(s.key + '.yaml' for s in SECTIONS)})")
    return path


# ------------------------------------------------------------------ creating and resuming a study

def plan(profile: str, overrides: Sequence[str], studies: Path | None = None) -> dict[str, Any]:
    """Section key -> the validated sweep plan of each section of the profile (nothing is created)."""
    from bnctl import sweep

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    return {s.key: sweep.plan_from_file(sweep_file(profile, s.key, studies), list(overrides)) for s in SECTIONS}


def create(profile: str, overrides: Sequence[str], root: Path = Path("runs/studies"),
           studies: Path | None = None) -> Path:
    """Validate every sweep of the profile, then create the study directory and its sweeps (nothing runs yet)."""
    from bnctl import sweep

    # Every cell of every sweep is validated before anything is created: a bad override fails in a second.
    plans = plan(profile, overrides, studies)
    declared = {s.key: studyspec.dump(declared_estimands(sweep_file(profile, s.key, studies))) for s in SECTIONS}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-claims-{profile}"
    for attempt in range(1, 1000):
        path = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"could not create a new study directory under {root}")
    sweeps = {key: str(sweep.create(plan, path / SWEEPS_DIR).relative_to(path)) for key, plan in plans.items()}
    rundir.write_json(path / STUDY_FILE, {"profile": profile, "overrides": list(overrides), "sweeps": sweeps,
                                          "estimands": declared,
                                          "created": datetime.now().isoformat(timespec="seconds"),
                                          "wall_time_s": 0.0})
    return path


def declared_estimands(path: Path) -> list:
    """The estimands a section's sweep file declares under study: (validated; an empty list if it declares none)."""
    from bnctl import config as config_mod

    raw = config_mod.read_yaml(path)
    return studyspec.parse((raw or {}).get("study"), f"sweep file {path}")


def estimands(study_dir: Path) -> dict[str, list]:
    """Section key -> its declared estimands, as recorded when the study was created."""
    info = rundir.read_json(Path(study_dir) / STUDY_FILE)
    return {key: studyspec.parse(raw, f"{study_dir / STUDY_FILE}") for key, raw in (info.get("estimands") or {}).items()}


def read(study_dir: Path) -> dict[str, Any]:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"{study_dir} is not a bnctl study directory (no {STUDY_FILE})")
    try:
        info = rundir.read_json(path)
        return info | {"sweeps": {k: Path(study_dir) / v for k, v in info["sweeps"].items()}}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path} is damaged ({type(err).__name__}: {err})") from None


# ------------------------------------------------------------------ section 5: evaluating checkpoints

EVAL_COLUMNS = ["run", "seed", "checkpoint", "running_acc", "batch_stats_acc", "recalibrated_acc", "recal_images"]


def _read_evals(path: Path) -> dict[str, dict[str, Any]]:
    return {str(r["run"]): r for r in rundir.read_csv(path)} if path.is_file() else {}


def notebook_evals(study_dir: Path, sweep_dir: Path, recalibrate: int,
                   on_run: Callable[[str], None] = lambda name: None) -> list[dict[str, Any]]:
    """Evaluate each completed BN run at batch 4 three ways; cached per run in notebook_eval.csv.

    Every evaluation works on a copy of the weights (bnctl.evaluation): checkpoints are only read.
    """
    from bnctl import evaluation

    data = report.load(sweep_dir)
    path = Path(study_dir) / EVAL_FILE
    done = _read_evals(path)
    targets = [r for r in data.rows if r["status"] == "completed" and all(r.get(k) == v for k, v in NOTEBOOK.items())]
    for row in targets:
        if row["run"] in done:
            continue
        on_run(row["run"])
        ckpt = sweep_dir / "runs" / row["run"] / rundir.CHECKPOINT_DIR / "last.pt"
        batch = evaluation.evaluate_checkpoint(ckpt, bn_mode="batch", batch_size=EVAL_BATCH)
        recal = evaluation.evaluate_checkpoint(ckpt, recalibrate=recalibrate)
        done[row["run"]] = {"run": row["run"], "seed": row["seed"], "checkpoint": str(ckpt.relative_to(study_dir)),
                            "running_acc": recal["recalibration"]["before_acc"], "batch_stats_acc": batch["acc"],
                            "recalibrated_acc": recal["acc"], "recal_images": recal["recalibration"]["images"]}
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EVAL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(done.values())
        rundir.atomic_write_text(path, buf.getvalue())  # after every checkpoint: an interrupted study keeps them
    wanted = {r["run"] for r in targets}
    return [r for r in done.values() if r["run"] in wanted]


# ------------------------------------------------------------------ running

@dataclass
class StudyResult:
    dir: Path
    report: Path
    verdicts: dict[str, verdicts.Verdict]
    failed: dict[str, str] = field(default_factory=dict)  # run -> error, over all sweeps
    wall_time_s: float = 0.0


def run(study_dir: Path, *, jobs: int = 1, reporter_factory: Callable[[], Any] | None = None,
        on_event: Callable[[str], None] = lambda msg: None) -> StudyResult:
    """Run (or finish) every sweep of a study, evaluate section 5's checkpoints, and write REPORT.md."""
    from bnctl import sweep

    info = read(study_dir)
    started = time.monotonic()
    failed: dict[str, str] = {}
    _record(study_dir, jobs=jobs)  # a resume without --jobs reuses it
    try:
        for section in SECTIONS:
            on_event(f"{section.title}: {info['sweeps'][section.key]}")
            reporter = reporter_factory() if reporter_factory else None
            try:
                outcome = sweep.execute(info["sweeps"][section.key], jobs=jobs, reporter=reporter)
            except InterruptedRun:
                raise InterruptedRun(f"study interrupted; finished runs are kept. Continue with: "
                                     f"bnctl study claims --resume {study_dir}") from None
            finally:
                if reporter is not None and hasattr(reporter, "close"):
                    reporter.close()
            failed |= outcome.failed
        on_event(f"{NOTEBOOK_SECTION.title}: evaluating the BN checkpoints at batch {EVAL_BATCH}")
        notebook_evals(study_dir, info["sweeps"]["small_batches"], PROFILES[info["profile"]]["recalibrate"],
                       on_run=lambda name: on_event(f"  evaluating {name}"))
    finally:
        info_raw = rundir.read_json(Path(study_dir) / STUDY_FILE)
        info_raw["wall_time_s"] = info_raw.get("wall_time_s", 0.0) + time.monotonic() - started
        rundir.write_json(Path(study_dir) / STUDY_FILE, info_raw)
    result = write_report(study_dir)
    result.failed = failed
    return result


# ------------------------------------------------------------------ the report

def _chance(data: report.SweepData) -> float:
    """100 / number of classes, read from a finished run's run.json (10 classes if none says)."""
    for row in data.rows:
        path = data.dir / "runs" / row["run"] / rundir.RUN_INFO_FILE
        try:
            n = rundir.read_json(path).get("num_classes") if path.is_file() else None
        except (OSError, ValueError):
            n = None
        if n:
            return 100.0 / n
    return 10.0


# Section -> its verdict rule, given the sweep's data and the chance accuracy.
RULES: dict[str, Callable[[report.SweepData, float], verdicts.Verdict]] = {
    "lr": lambda data, chance: verdicts.higher_lr(data.rows, chance),
    "init": lambda data, chance: verdicts.init_sensitivity(data.rows, chance),
    "regularization": lambda data, chance: verdicts.regularization(data.rows,
                                                                   dropout=max(data.grid["model.dropout"])),
    "small_batches": lambda data, chance: verdicts.small_batches(data.rows, chance),
}


FIGURE_KEYS = {"lr": ("optimizer.lr", ["final_test_acc"]), "init": ("model.init_scale", ["final_test_acc"]),
               "regularization": ("model.dropout", ["gap", "final_test_acc"]),
               "small_batches": ("train.batch_size", ["final_test_acc"])}


def _section_figure(key: str, data: report.SweepData, cells: list[report.Cell], out: Path,
                    chance: float) -> Path | None:
    from bnctl.plotting import _pyplot, _save

    x, metrics = FIGURE_KEYS[key]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.2), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        label = dict((m, lab) for m, lab, _ in report.METRICS)[metric]
        ns = sorted({c.stats[metric].n for c in cells if c.stats[metric].n})
        if metric == "final_test_acc":  # the level a network that learned nothing reaches
            ax.axhline(chance, color="0.5", ls=":", lw=1, label=f"chance ({chance:g}%)")
        drawn |= report.draw_metric_vs_key(ax, data, cells, x, metric,
                                           title=f"{label}, mean of n={'/'.join(map(str, ns)) or 0} seeds, "
                                                 "bars: 95% t-interval")
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, out)


def _eval_figure(evals: list[dict[str, Any]], out: Path) -> Path | None:
    from bnctl.plotting import _pyplot, _save

    if not evals:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cols = [("running_acc", "eval mode\n(running stats)"), ("batch_stats_acc", f"test-batch stats\n(batch {EVAL_BATCH})"),
            ("recalibrated_acc", "eval mode,\nrecalibrated")]
    for r in evals:
        ax.plot(range(3), [r[c] for c, _ in cols], color="0.6", marker="o", ms=3, lw=0.8)
    for i, (c, _) in enumerate(cols):
        s = stats.summarize([r[c] for r in evals])
        ax.errorbar([i + 0.12], [s.mean], yerr=[[s.mean - s.lo], [s.hi - s.mean]] if s.lo is not None else None,
                    color="#d62728", marker="D", capsize=4, label="mean, 95% t-interval" if i == 0 else None)
    ax.set_xticks(range(3), [lab for _, lab in cols])
    ax.set_xlim(-0.4, 2.5)
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"The same {len(evals)} BN checkpoints evaluated three ways (grey: one per seed)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out)


def _verdict_md(v: verdicts.Verdict) -> list[str]:
    lines = [f"**Verdict: {v.verdict}.** {v.sentence()[len(v.verdict) + 2:]}", ""]
    lines += [f"- {d}" for d in v.details] + ([""] if v.details else [])
    lines += [f"*Rule:* {v.rule}", ""]
    return lines


def write_report(study_dir: Path) -> StudyResult:
    """REPORT.md from the study's files: per section a figure, a table and a verdict (runs nothing)."""
    study_dir = Path(study_dir)
    info = read(study_dir)
    (study_dir / FIGURES_DIR).mkdir(exist_ok=True)
    sections_md: list[str] = []
    results: dict[str, verdicts.Verdict] = {}
    missing_total, planned_total = 0, 0
    data_names = set()
    for section in SECTIONS:
        sweep_dir = info["sweeps"][section.key]
        rep = report.build(sweep_dir)  # the sweep's own report.md, summary.csv and figures
        data, cells = rep.data, rep.cells
        data_names.add(str((data.plan.get("config") or {}).get("data", {}).get("name")))
        missing_total += len(rep.missing)
        planned_total += len(data.rows)
        chance = _chance(data)
        v = RULES[section.key](data, chance)
        results[section.key] = v
        fig = _section_figure(section.key, data, cells, study_dir / FIGURES_DIR / f"{section.key}.png", chance)
        only = ["final_test_acc", "gap"] if section.key == "regularization" else ["final_test_acc"]
        header, body = report.table_rows(data, cells, only)
        sections_md += [f"## {section.title}", "", section.question, ""]
        if fig:
            sections_md += [f"![{section.title}]({fig.relative_to(study_dir)})", ""]
        sections_md += [report.md_table(header, body), ""]
        if rep.missing:
            sections_md += [f"*{len(rep.missing)} of {len(data.rows)} runs are not finished; "
                            "the numbers use the finished ones.*", ""]
        sections_md += _verdict_md(v)
        sections_md += [f"Sweep: `{sweep_dir.relative_to(study_dir)}` (its `report.md` has every metric and the "
                        "curves per cell).", ""]
    evals = notebook_eval_rows(study_dir)
    v5 = verdicts.notebook_eval([r["running_acc"] for r in evals], [r["batch_stats_acc"] for r in evals],
                                [r["recalibrated_acc"] for r in evals], EVAL_BATCH)
    results[NOTEBOOK_SECTION.key] = v5
    fig5 = _eval_figure(evals, study_dir / FIGURES_DIR / f"{NOTEBOOK_SECTION.key}.png")
    sections_md += [f"## {NOTEBOOK_SECTION.title}", "", NOTEBOOK_SECTION.question,
                    f"The checkpoints are the final ones of section 4's runs with "
                    f"{', '.join(f'{k}={v}' for k, v in NOTEBOOK.items())} (Adam, lr 0.001: the notebook's settings).", ""]
    if fig5:
        sections_md += [f"![{NOTEBOOK_SECTION.title}]({fig5.relative_to(study_dir)})", ""]
    header = ["evaluation", "test acc %"]
    body = [[lab, report.fmt_summary(stats.summarize([r[c] for r in evals]), 2)] for c, lab in (
        ("running_acc", "eval mode (running statistics)"),
        ("batch_stats_acc", f"each test batch of {EVAL_BATCH}'s own statistics (the notebook)"),
        ("recalibrated_acc", "eval mode after recalibration"))]
    sections_md += [report.md_table(header, body), ""] + _verdict_md(v5)

    rows = [[s.title, results[s.key].verdict, _effect_cell(results[s.key])] for s in [*SECTIONS, NOTEBOOK_SECTION]]
    head = [f"# The notebook's claims, tested ({info['profile']} profile)", "",
            f"Study directory `{study_dir}`, created {info.get('created')}; data: {', '.join(sorted(data_names))}"
            + (f"; overrides: `{' '.join(info['overrides'])}`" if info.get("overrides") else "")
            + f"; {planned_total - missing_total} of {planned_total} runs finished"
            + (f"; wall time so far {info.get('wall_time_s', 0) / 60:.1f} min." if info.get("wall_time_s") else "."), "",
            "Each verdict follows a stated rule: **supported** when the effect's 95% interval lies on the side "
            "the claim predicts, **contradicted** when it lies on the other side, **inconclusive at this budget** "
            "when it includes zero. Numbers are mean ± sample std [95% t-interval] over seeds; diverged runs are "
            "counted per cell and, in the verdict rules, as chance accuracy. The verdicts hold for this model, "
            "data and budget; they are not general truths about BN.", "",
            report.md_table(["section", "verdict", "effect [95% interval]"], rows), ""]
    path = study_dir / REPORT_FILE
    rundir.atomic_write_text(path, "\n".join(head + sections_md))
    return StudyResult(study_dir, path, results, wall_time_s=info.get("wall_time_s", 0.0))


def _effect_cell(v: verdicts.Verdict) -> str:
    if v.effect is None:
        return v.no_effect
    return f"{v.effect_name}: {v.effect.effect:+.2f} [{v.effect.lo:+.2f}, {v.effect.hi:+.2f}]"


def notebook_eval_rows(study_dir: Path) -> list[dict[str, Any]]:
    return list(_read_evals(Path(study_dir) / EVAL_FILE).values())


def _record(study_dir: Path, **values: Any) -> None:
    path = Path(study_dir) / STUDY_FILE
    rundir.write_json(path, rundir.read_json(path) | values)


def preflight(study_dir: Path, jobs: int, timed: bool = True) -> tuple[Any, str | None]:
    """Before a study (re)starts: its size and estimated time (bnctl.estimate), and a warning when its
    profile is sized for a GPU that is not in use."""
    from bnctl import estimate

    info = read(study_dir)
    est = estimate.estimate([info["sweeps"][s.key] for s in SECTIONS], jobs, timed=timed)
    warning = None
    if PROFILES.get(info["profile"], {}).get("sized_for") == "gpu" and est.device == "cpu" and est.to_run:
        cpu_choice = [p for p, v in PROFILES.items() if v.get("sized_for") == "cpu"]
        warning = (f"the {info['profile']} profile is sized for a GPU and these runs will use the CPU"
                   + (f" ({estimate.format_duration(est.seconds)} estimated)" if est.seconds else "")
                   + f"; on a CPU use --profile {' or '.join(cpu_choice)}")
    return est, warning


def resume_check(study_dir: Path, profile: str | None, overrides: Sequence[str]) -> None:
    """A resumed study keeps its own profile and overrides; different ones on the command line are an error."""
    info = read(study_dir)
    if profile is not None and profile != info["profile"]:
        raise ConfigError(f"{study_dir} is a '{info['profile']}' study; drop --profile or start a new study")
    if overrides and list(overrides) != info["overrides"]:
        raise ConfigError(f"{study_dir} runs with overrides {info['overrides'] or 'none'}; --resume takes them from "
                         "the study directory, so give none")
