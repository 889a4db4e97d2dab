"""`bnctl study claims`: the sweeps that test the notebook's claims, then one REPORT.md of verdicts.

A study directory runs/studies/<YYYYmmdd-HHMMSS>-claims-<profile>/ holds study.json (the
profile, the data overrides and which sweep answers which section), sweeps/ (ordinary sweep
directories, each with its own report), notebook_eval.csv (section 5's evaluations, one row
per checkpoint) and REPORT.md with its figures. Running it again with --resume picks up
where it stopped: finished runs and evaluations are kept.

Over 350 lines: the study's sections, its runs, section 5's evaluations and REPORT.md share
one study directory and its study.json.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from bnctl import configfiles, report, rundir, stats, studyspec, sweepdir, verdicts
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
    Section("landscape", "6. Loss-landscape smoothness",
            "Is the loss landscape smoother with BN along the training trajectory, compared at the same training "
            "loss (Santurkar et al. 2018, figure 4)?"),
]
# Section 7 reads section 6's runs (their landscape.csv files); it has no sweep of its own.
ICS_SECTION = Section("ics", "7. Internal covariate shift",
                      "Does BN reduce internal covariate shift, as the notebook says (Santurkar et al. 2018, "
                      "figure 5, found it does not)?")
ICS_SWEEP = "landscape"
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
    return {s.key: sweep.plan_from_file(sweep_file(profile, s.key, studies), list(overrides), shared=True) for s in SECTIONS}


def create(profile: str, overrides: Sequence[str], root: Path = Path("runs/studies"),
           studies: Path | None = None) -> Path:
    """Validate every sweep of the profile, then create the study directory and its sweeps (nothing runs yet)."""
    from bnctl import sweep

    # Every cell of every sweep is validated before anything is created: a bad override fails in a second.
    plans = plan(profile, overrides, studies)
    declared = {s.key: studyspec.dump(declared_estimands(sweep_file(profile, s.key, studies))) for s in SECTIONS}
    path = rundir.new_stamped_folder(root, f"claims-{profile}", "--root", "study directory")
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
    from bnctl import checkpoint, evaluation

    data = report.load(sweep_dir)
    path = Path(study_dir) / EVAL_FILE
    done = _read_evals(path)
    targets = [r for r in data.rows if r["status"] == "completed" and all(r.get(k) == v for k, v in NOTEBOOK.items())]
    for row in targets:
        if row["run"] in done:
            continue
        on_run(row["run"])
        ckpt = checkpoint.last_path(sweepdir.run_dir(sweep_dir, row["run"]))
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
            if section.key not in info["sweeps"]:  # a study created before the section existed
                continue
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

@dataclass
class RunFacts:
    """What the finished runs' run.json files say about the data and the steps (None where no run says)."""

    chance: float = 10.0  # 100 / classes (10 classes if no run says)
    quantum: float | None = None  # 100 / test images: the step in which test accuracy moves
    train_images: int | None = None
    test_images: int | None = None
    steps_per_epoch: dict[Any, int] = field(default_factory=dict)  # batch size -> optimizer steps per epoch


def _run_facts(data: report.SweepData) -> RunFacts:
    facts = RunFacts()
    for row in data.rows:
        path = sweepdir.run_dir(data.dir, row["run"]) / rundir.RUN_INFO_FILE
        try:
            info = rundir.read_json(path) if path.is_file() else {}
        except (OSError, ValueError):
            info = {}
        if not info:
            continue
        if info.get("num_classes"):
            facts.chance = 100.0 / info["num_classes"]
        if info.get("test_images"):
            facts.test_images = int(info["test_images"])
            facts.quantum = 100.0 / facts.test_images
        facts.train_images = info.get("train_images", facts.train_images)
        batch = row.get("train.batch_size", (data.plan.get("config") or {}).get("train", {}).get("batch_size"))
        if info.get("steps_per_epoch"):
            facts.steps_per_epoch[batch] = int(info["steps_per_epoch"])
    return facts


def _chance(data: report.SweepData) -> float:
    """100 / number of classes, read from a finished run's run.json (10 classes if none says)."""
    return _run_facts(data).chance


def _spec(specs: dict[str, list], key: str, estimand: str):
    """The section's declared estimand of that kind, or None when its sweep file declares none."""
    return next((s for s in specs.get(key, []) if s.estimand == estimand), None)


def _undeclared(title: str, estimand: str) -> verdicts.Verdict:
    v = verdicts.Verdict(title, "(not declared)", "(not declared)", "", "", studyspec.UNIT[estimand], 0.0,
                         status=verdicts.NOT_TESTABLE,
                         reason=f"here: the section's sweep file declares no {estimand} estimand (a study: block; "
                                "see docs/studies.md)")
    return verdicts.decide_all([v])[0]


def _rule(key: str, estimand: str, apply: Callable) -> Callable:
    def rule(data: report.SweepData, facts: RunFacts, specs: dict[str, list]) -> verdicts.Verdict:
        spec = _spec(specs, key, estimand)
        return _undeclared(key, estimand) if spec is None else apply(data, facts, spec)
    return rule


# Section -> its verdict rule, given the sweep's data, the facts of its runs and the declared estimands.
RULES: dict[str, Callable[[report.SweepData, RunFacts, dict[str, list]], verdicts.Verdict]] = {
    "lr": _rule("lr", "lr_tolerance", lambda data, f, spec: verdicts.lr_tolerance(data.rows, spec, f.chance)),
    "init": _rule("init", "init_reference",
                  lambda data, f, spec: verdicts.init_reference(data.rows, spec, f.chance, f.quantum)),
    "regularization": _rule("regularization", "gap_reduction",
                            lambda data, f, spec: verdicts.gap_reduction(data.rows, spec, f.quantum)),
    "small_batches": _rule("small_batches", "batch_interaction",
                           lambda data, f, spec: verdicts.batch_interaction(data.rows, spec, f.chance, f.quantum)),
    "landscape": _rule("landscape", "landscape_smoothness",
                       lambda data, f, spec: verdicts.landscape_smoothness(data.rows, landscapes(data), spec)),
}
ICS_RULE = _rule(ICS_SWEEP, "ics_reduction",
                 lambda data, f, spec: verdicts.ics_reduction(data.rows, landscapes(data), spec))


def landscapes(data: report.SweepData) -> dict[str, Any]:
    """Run name -> its landscape.csv as series (bnctl.landscape_plot.read), None for a run without one."""
    from bnctl import landscape_plot

    return {r["run"]: landscape_plot.read(data.dir / "runs" / r["run"]) for r in data.rows}


def _landscape_figure(data: report.SweepData, out: Path, spec) -> Path | None:
    """The first seed's arm and control runs overlaid (bnctl.landscape_plot), labelled by norm."""
    from bnctl import landscape_plot

    if spec is None:
        return None
    seeds = sorted({r.get("seed") for r in data.rows if r.get("status") == "completed"}, key=str)
    for seed in seeds:
        pair = [(f"{spec.norm_key}={n}, seed {seed}", data.dir / "runs" / r["run"]) for n in (spec.arm, spec.control)
                for r in data.rows if r.get("seed") == seed and r.get(spec.norm_key) == n
                and r.get("status") == "completed"]
        if len(pair) == 2:
            return landscape_plot.plot_compare(pair, out)
    return None


def _missing_section(section: Section) -> verdicts.Verdict:
    v = verdicts.Verdict(section.title, "(not in this study)", "(not in this study)", "", "", "", 0.0,
                         status=verdicts.NOT_TESTABLE,
                         reason="here: the study was created before this section existed; start a new study")
    return verdicts.decide_all([v])[0]


def _lr_text(data: report.SweepData) -> str:
    """The optimizer and learning rate as configured, with a swept or batch-scaled lr spelled out."""
    cfg = data.plan.get("config") or {}
    opt = cfg.get("optimizer", {})
    if not opt.get("name") or opt.get("lr") is None:
        return "optimizer not recorded in the sweep"
    name = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}.get(opt.get("name"), str(opt.get("name")))
    if opt.get("name") == "sgd":
        name += f" (momentum {opt.get('momentum', 0):g})"
    sched = (cfg.get("scheduler") or {}).get("name", "none")
    sched_text = "" if sched in (None, "none") else f", {sched} schedule"
    if "optimizer.lr" in data.grid:
        return f"{name}, lr swept over " + ", ".join(f"{lr:g}" for lr in data.grid["optimizer.lr"]) + sched_text
    scaling = data.plan.get("lr_scaling")
    if scaling:
        from bnctl.plan import scaled_lr

        per = ", ".join(f"{scaled_lr(opt['lr'], b, scaling):g} at {b}" for b in data.grid.get("train.batch_size", []))
        rule = "batch/" if scaling["rule"] == "linear" else "sqrt(batch/"
        return (f"{name}, lr {opt.get('lr'):g} x {rule}{scaling['reference_batch']}"
                f"{')' if scaling['rule'] == 'sqrt' else ''} ({per}){sched_text}")
    return f"{name}, lr {opt.get('lr'):g}{sched_text}"


def budget(data: report.SweepData, facts: RunFacts) -> str:
    """One sentence: images, epochs, batch sizes and steps, optimizer and lr as configured, seeds."""
    cfg = data.plan.get("config") or {}
    if not cfg:
        return "not recorded (the sweep holds no resolved config)."
    train, dat = cfg.get("train", {}), cfg.get("data", {})
    images = facts.train_images or dat.get("train_limit") or (dat.get("train_size") if dat.get("name") == "synthetic"
                                                              else None)
    test = facts.test_images or (dat.get("test_size") if dat.get("name") == "synthetic" else None)
    epochs = train.get("epochs")
    batches = data.grid.get("train.batch_size") or [train.get("batch_size")]
    steps = []
    for b in batches:
        per_epoch = facts.steps_per_epoch.get(b) or (images // b if images and b else None)
        steps.append(f"{per_epoch * epochs:,} steps at batch {b}" if per_epoch and epochs else f"batch {b}")
    seeds = len(data.plan.get("seeds") or [])
    return (f"{dat.get('name')} data, {f'{images:,}' if images else 'all'} training and "
            f"{f'{test:,}' if test else 'all'} test images; {epochs} epochs; {'; '.join(steps)}; "
            f"{_lr_text(data)}; {seeds} seeds per cell"
            + ("; eval-mode train accuracy measured (train.eval_train)" if train.get("eval_train") else "") + ".")


FIGURE_KEYS = {"lr": ("optimizer.lr", ["final_test_acc"]), "init": ("model.init_scale", ["final_test_acc"]),
               "regularization": ("model.dropout", ["gap", "final_test_acc"]),
               "small_batches": ("train.batch_size", ["final_test_acc"])}


def _section_figure(key: str, data: report.SweepData, cells: list[report.Cell], out: Path,
                    chance: float, trains_at: float | None = None) -> Path | None:
    from bnctl.plotting import pyplot, save_figure

    if key not in FIGURE_KEYS:
        return None
    x, metrics = FIGURE_KEYS[key]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.2), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], metrics):
        label = dict((m, lab) for m, lab, _ in report.METRICS)[metric]
        ns = sorted({c.stats[metric].n for c in cells if c.stats[metric].n})
        if metric == "final_test_acc":  # the level a network that learned nothing reaches
            ax.axhline(chance, color="0.5", ls=":", lw=1, label=f"chance ({chance:g}%)")
            if trains_at is not None:  # section 1's criterion: a run at or above this line "trains"
                ax.axhline(trains_at, color="0.3", ls="--", lw=1, label=f"trains (>= {trains_at:g}%)")
        drawn |= report.draw_metric_vs_key(ax, data, cells, x, metric,
                                           title=f"{label}, mean of n={'/'.join(map(str, ns)) or 0} seeds, "
                                                 "bars: 95% t-interval")
    if not drawn:
        plt.close(fig)
        return None
    return save_figure(fig, out)


def _eval_figure(evals: list[dict[str, Any]], out: Path) -> Path | None:
    from bnctl.plotting import pyplot, save_figure

    if not evals:
        return None
    plt = pyplot()
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
    return save_figure(fig, out)


def _verdict_md(v: verdicts.Verdict) -> list[str]:
    lines = ([f"**Claim.** {v.statement}", "", f"**Estimand.** {v.estimand}", ""] if v.rule else []) + [
             f"**Verdict:** {v.sentence()}", ""]
    if v.status == "tested" and v.effect is not None:
        lines += [f"Minimum detectable effect (80% power at level {v.mde_alpha:.2g}, Holm's strictest): "
                  f"{v.mde_text()}. Smallest effect that matters (declared): {v.smallest:g} {v.unit}.", ""]
    if v.caveats:
        lines += ["**Caveats.**", ""] + [f"- {c}" for c in v.caveats] + [""]
    lines += (["**Numbers.**", ""] + [f"- {d}" for d in v.details] + [""]) if v.details else []
    lines += [f"*Test:* {v.rule}", ""] if v.rule else []
    return lines


def _estimands_of(study_dir: Path, info: dict[str, Any]) -> dict[str, list]:
    """The estimands recorded at creation; a study made before they were declared reads its profile's sweep files."""
    found = estimands(study_dir)
    for section in SECTIONS:
        if section.key not in found:
            found[section.key] = declared_estimands(sweep_file(info["profile"], section.key))
    return found


def _diverged_column(data: report.SweepData, cells: list[report.Cell], chance: float) -> list[str]:
    """Per cell: final test accuracy with diverged runs counted as chance, as the verdicts count them."""
    out = []
    for c in cells:
        xs = verdicts.values(c.runs, "final_test_acc", chance)
        s = stats.summarize(xs)
        out.append(report.fmt_summary(s, 2) if c.count("diverged") else "same")
    return out


def write_report(study_dir: Path) -> StudyResult:
    """REPORT.md from the study's files: per section the claim, estimand, budget, figure, table and verdict (runs nothing)."""
    study_dir = Path(study_dir)
    info = read(study_dir)
    specs = _estimands_of(study_dir, info)
    (study_dir / FIGURES_DIR).mkdir(exist_ok=True)
    parts: dict[str, list[str]] = {}
    results: dict[str, verdicts.Verdict] = {}
    missing_total, planned_total = 0, 0
    data_names = set()
    small_data = small_facts = None
    for section in SECTIONS:
        if section.key not in info["sweeps"]:  # a study created before the section existed
            results[section.key] = _missing_section(section)
            parts[section.key] = [f"## {section.title}", "", section.question, "", None]
            continue
        sweep_dir = info["sweeps"][section.key]
        rep = report.build(sweep_dir)  # the sweep's own report.md, summary.csv and figures
        data, cells = rep.data, rep.cells
        data_names.add(str((data.plan.get("config") or {}).get("data", {}).get("name")))
        missing_total += len(rep.missing)
        planned_total += len(data.rows)
        facts = _run_facts(data)
        if section.key == "small_batches":
            small_data, small_facts = data, facts
        results[section.key] = RULES[section.key](data, facts, specs)
        if section.key == ICS_SWEEP:
            results[ICS_SECTION.key] = ICS_RULE(data, facts, specs)
        lr_spec = _spec(specs, "lr", "lr_tolerance") if section.key == "lr" else None
        fig = _section_figure(section.key, data, cells, study_dir / FIGURES_DIR / f"{section.key}.png", facts.chance,
                              facts.chance + lr_spec.trains_above_chance if lr_spec else None)
        if section.key == "landscape":
            fig = _landscape_figure(data, study_dir / FIGURES_DIR / f"{section.key}.png",
                                    _spec(specs, "landscape", "landscape_smoothness"))
        only = ["final_test_acc", "gap"] if section.key == "regularization" else ["final_test_acc"]
        header, body = report.table_rows(data, cells, only)
        if section.key != "regularization" and any(c.count("diverged") for c in cells):
            header.append(f"final test acc %, diverged as chance ({facts.chance:g}%)")
            body = [row + [extra] for row, extra in zip(body, _diverged_column(data, cells, facts.chance))]
        md = [f"## {section.title}", "", section.question, "", f"**Budget.** {budget(data, facts)}", ""]
        if fig:
            md += [f"![{section.title}]({fig.relative_to(study_dir)})", ""]
        md += [report.md_table(header, body), ""]
        if any(c.count("diverged") for c in cells):
            md += ["*The table's accuracy columns average the completed runs; the verdict counts each diverged run "
                   f"as chance ({facts.chance:g}%), as the last column shows.*" if section.key != "regularization" else
                   "*Diverged runs have no train-test gap; the table and the verdict both leave them out.*", ""]
        if rep.missing:
            md += [f"*{len(rep.missing)} of {len(data.rows)} runs are not finished.*", ""]
        parts[section.key] = md + [None] + [f"Sweep: `{sweep_dir.relative_to(study_dir)}` (its `report.md` has every "
                                            "metric and the curves per cell).", ""]
    evals = notebook_eval_rows(study_dir)
    spec5 = _spec(specs, "small_batches", "notebook_eval")
    pending = [r for r in small_data.rows if r.get("status") not in verdicts.FINISHED
               and all(r.get(k) == v for k, v in NOTEBOOK.items())]
    wanted = [r for r in small_data.rows if r.get("status") == "completed" and all(r.get(k) == v for k, v in NOTEBOOK.items())]
    incomplete = None
    evaluated = len({r["run"] for r in evals} & {r["run"] for r in wanted})
    if pending or evaluated < len(wanted):
        incomplete = (f"{evaluated} of {len(wanted) + len(pending)} BN checkpoints at batch {EVAL_BATCH} evaluated; "
                      "rerun with --resume to finish")
    results[NOTEBOOK_SECTION.key] = _undeclared("the notebook's evaluation", "notebook_eval") if spec5 is None else (
        verdicts.notebook_eval([r["running_acc"] for r in evals], [r["batch_stats_acc"] for r in evals],
                               [r["recalibrated_acc"] for r in evals], spec5, small_facts.quantum, incomplete,
                               small_facts.chance))
    if ICS_SECTION.key not in results:
        results[ICS_SECTION.key] = _missing_section(ICS_SECTION)
    verdicts.decide_all(list(results.values()))  # Holm across the sections
    fig5 = _eval_figure(evals, study_dir / FIGURES_DIR / f"{NOTEBOOK_SECTION.key}.png")
    md5 = [f"## {NOTEBOOK_SECTION.title}", "", NOTEBOOK_SECTION.question, "",
           f"**Budget.** The final checkpoints of section 4's runs with "
           f"{', '.join(f'{k}={v}' for k, v in NOTEBOOK.items())} ({_lr_text_at(small_data, NOTEBOOK['train.batch_size'])}"
           f"), {len(evals)} of them; BN recalibrated on {PROFILES[info['profile']]['recalibrate']:,} training images.", ""]
    if fig5:
        md5 += [f"![{NOTEBOOK_SECTION.title}]({fig5.relative_to(study_dir)})", ""]
    header = ["evaluation", "test acc %"]
    body = [[lab, report.fmt_summary(stats.summarize([r[c] for r in evals]), 2)] for c, lab in (
        ("running_acc", "eval mode (running statistics)"),
        ("batch_stats_acc", f"each test batch of {EVAL_BATCH}'s own statistics (the notebook)"),
        ("recalibrated_acc", "eval mode after recalibration"))]
    md5 += [report.md_table(header, body), ""] + _verdict_md(results[NOTEBOOK_SECTION.key])
    sections_md: list[str] = []
    for section in SECTIONS:
        md = parts[section.key]
        at = md.index(None)
        sections_md += md[:at] + _verdict_md(results[section.key]) + md[at + 1:]
        if section.key == "small_batches":
            sections_md += md5
        if section.key == ICS_SWEEP:
            sections_md += [f"## {ICS_SECTION.title}", "", ICS_SECTION.question, "",
                            f"**Budget.** The runs of section {section.title.split('.')[0]} (their landscape.csv).", ""]
            sections_md += _verdict_md(results[ICS_SECTION.key])

    numbered = sorted([*SECTIONS, NOTEBOOK_SECTION, ICS_SECTION], key=lambda s: int(s.title.split(".")[0]))
    rows = [[s.title, results[s.key].verdict, effect_cell(results[s.key]), _p_cell(results[s.key]),
             results[s.key].mde_text()] for s in numbered]
    head = [f"# The notebook's claims, tested ({info['profile']} profile)", "",
            f"Study directory `{study_dir}`, created {info.get('created')}; data: {', '.join(sorted(data_names))}"
            + (f"; overrides: `{' '.join(info['overrides'])}`" if info.get("overrides") else "")
            + f"; {planned_total - missing_total} of {planned_total} runs finished"
            + (f"; wall time so far {info.get('wall_time_s', 0) / 60:.1f} min." if info.get("wall_time_s") else "."), "",
            report.md_table(["section", "verdict", "effect [95% interval]", "p (Holm-adjusted)",
                             "minimum detectable effect (80% power)"], rows), "",
            "**How to read a verdict.** Each section estimates one effect, declared in its sweep file before any run, "
            "signed so that **positive is what the claim predicts**. **Supported** / **contradicted**: its p-value, "
            f"Holm-adjusted across the sections tested ({sum(v.p_adjusted is not None for v in results.values())} here), is "
            "below 0.05 and its 95% interval lies on the claim's side / the other side (the chance that any section of "
            "a study without real effects comes out decisive is at most 5%). **No effect larger than X**: the 90% "
            "interval lies within +-X, the smallest effect the sweep file declares to matter. **Inconclusive**: "
            "neither; the minimum detectable effect says how large an effect this budget would find 80% of the time. "
            "**Not testable**: the design cannot answer here (the reason is given). **Incomplete**: runs are missing. "
            "Numbers are mean +- sample std [95% t-interval] over seeds. The verdicts hold for this model, data and "
            "budget; they are not general truths about BN. The rules and their measured error rates: docs/studies.md.",
            ""]
    path = study_dir / REPORT_FILE
    rundir.atomic_write_text(path, "\n".join(head + sections_md))
    return StudyResult(study_dir, path, results, wall_time_s=info.get("wall_time_s", 0.0))


def _lr_text_at(data: report.SweepData, batch: int) -> str:
    """The optimizer and the lr one batch size of the sweep trained with."""
    text = _lr_text(data)
    scaling = data.plan.get("lr_scaling")
    if scaling:
        from bnctl.plan import scaled_lr

        opt = (data.plan.get("config") or {}).get("optimizer", {})
        return f"{text.split(',')[0]}, lr {scaled_lr(opt['lr'], batch, scaling):g}"
    return text


def effect_cell(v: verdicts.Verdict) -> str:
    if v.effect is None or v.status != "tested":
        return v.reason or "-"
    e = v.effect
    return f"{v.effect_name}: {e.effect:+.2f} [{e.lo:+.2f}, {e.hi:+.2f}] {v.unit}"


def _p_cell(v: verdicts.Verdict) -> str:
    if v.p_adjusted is None:
        return "-"
    return f"{v.p_adjusted:.2g} (unadjusted {v.effect.p:.2g})"


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
    est = estimate.estimate([info["sweeps"][s.key] for s in SECTIONS if s.key in info["sweeps"]], jobs, timed=timed)
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
