"""`bnctl study claims`: plans validated up front, section 5's evaluations, REPORT.md, resume."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnctl import study, verdicts
from bnctl.errors import ConfigError
from tests import worlds as W
from tests.sweepfiles import make_sweep

TINY_FIXED = {"device": "cpu", "model.width": 0.25, "model.groups": 4, "data.train_size": 96, "data.test_size": 64,
              "data.augment": "none", "train.epochs": 1, "train.batch_size": 16, "train.eval_batch_size": 64}
TINY_GRIDS = {  # 8 cells x 2 seeds: enough to exercise every step (the verdicts are then mostly inconclusive)
    "lr": {"model.norm": ["batch", "none"], "optimizer.lr": [0.001]},
    "init": {"model.norm": ["batch", "none"], "model.init_scale": [3.0]},
    "regularization": {"model.norm": ["batch"], "model.dropout": [0.0]},
    "small_batches": {"model.norm": ["batch"], "train.batch_size": [4]},
    "landscape": {"model.norm": ["batch", "none"]},
}
# Per-sweep fixed keys beyond TINY_FIXED: the regularization sweep measures the train set, the landscape sweep probes
# (twice a run, at steps 0 and 3 of 6, at two step sizes: the probes were most of the tiny study's time).
TINY_EXTRA = {"regularization": {"train.eval_train": True},
              "landscape": {"train.landscape.every": 3, "train.landscape.scales": [0.5, 2.0]}}


def tiny_studies(tmp_path: Path, grids=TINY_GRIDS, seeds=2) -> Path:
    """A --studies folder whose quick profile holds tiny versions of its sweep files."""
    folder = tmp_path / "studies" / "quick"
    folder.mkdir(parents=True)
    for key, grid in grids.items():
        fixed = dict(TINY_FIXED, **TINY_EXTRA.get(key, {}))
        spec = {"name": f"tiny_{key}", "base": str(Path(__file__).parents[1] / "bnctl" / "configs" / "quickstart.yaml"),
                "fixed": fixed, "grid": grid, "seeds": seeds}
        (folder / f"{key}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "studies"


def test_shipped_sweep_files_plan_and_validate():
    from bnctl import sweep

    for profile in study.PROFILES:
        plans = {s.key: sweep.plan_from_file(study.sweep_file(profile, s.key)) for s in study.SECTIONS}
        assert plans["small_batches"].grid["train.batch_size"] == [2, 4, 16, 64]
        assert {"batch", "group", "none"} <= set(plans["small_batches"].grid["model.norm"])
        assert plans["regularization"].config["train"]["eval_train"] is True
        notebook = [r for r in plans["small_batches"].runs if study.NOTEBOOK.items() <= r.overrides.items()]
        # The batch-size sweep scales the lr with the batch; batch 4 keeps the notebook's 0.001.
        assert {r.overrides["optimizer.lr"] for r in notebook} == {0.001}
        assert len(notebook) >= 3  # section 5 needs several seeds of BN at batch 4
        cfg = plans["small_batches"].config_for(notebook[0])
        assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.model.name) == ("adam", 0.001, "seed_cnn")


def test_a_bad_override_fails_before_any_sweep_is_created(tmp_path):
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        study.create("quick", ["optimizer.lrr=0.1"], tmp_path / "studies_out")
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        study.create("huge", [], tmp_path / "studies_out")
    assert not (tmp_path / "studies_out").exists() or not any((tmp_path / "studies_out").iterdir())


def _write_landscape(run_dir: Path, series: dict) -> None:
    """A landscape.csv (long format, as bnctl.landscape writes it) holding these series."""
    lines = ["step,epoch,layer,scale,measure,value"]
    for measure, by_step in series["summary"].items():
        lines += [f"{t},1,,,{measure},{v!r}" for t, v in by_step.items()]
    for measure, layers in series["ics"].items():
        lines += [f"{t},1,{layer},,{measure},{v!r}" for layer, by_step in layers.items() for t, v in by_step.items()]
    (run_dir / "landscape.csv").write_text("\n".join(lines) + "\n")


def _constructed_study(tmp_path: Path, unfinished: tuple[str, ...] = (), landscape: bool = False) -> Path:
    """A study directory whose sweeps hold constructed results with known verdicts.

    Without ``landscape`` it is a study made before sections 6 and 7 existed (no landscape sweep).
    """
    d = tmp_path / "study"
    (d / "sweeps").mkdir(parents=True)
    acc = {
        "lr": lambda o, s: 80 + s if o["model.norm"] == "batch" or o["optimizer.lr"] < 0.01 else 10.0,
        "init": lambda o, s: 80 + s if o["model.norm"] == "batch" or o["model.init_scale"] == 1.0 else 30 + s,
        "regularization": lambda o, s: 70.0 + s if o["model.norm"] == "none" and not o["model.dropout"] else 85.0 + s,
        "small_batches": lambda o, s: 80 + s - (30 if o["model.norm"] == "batch" and o["train.batch_size"] == 2 else 0),
    }
    grids = {"lr": {"model.norm": ["batch", "none"], "optimizer.lr": [0.001, 0.01, 0.1]},
             "init": {"model.norm": ["batch", "none"], "model.init_scale": [0.1, 1.0, 10.0]},
             "regularization": {"model.norm": ["none", "batch"], "model.dropout": [0.0, 0.3]},
             "small_batches": {"model.norm": ["batch", "group"], "train.batch_size": [2, 4, 64]}}
    if landscape:
        acc["landscape"] = lambda o, s: 60.0 + s
        grids["landscape"] = {"model.norm": ["batch", "none"]}
    sweeps = {}
    for key, grid in grids.items():
        def result(o, s, key=key):
            if key in unfinished and s == 2 and list(o.values())[0] == "batch":
                return None  # not started yet
            a = float(acc[key](o, s))
            clean = 99.0 if key == "regularization" else a + 3
            return {"status": "completed", "epochs": 2, "final_test_acc": a, "best_test_acc": a,
                    "final_clean_train_acc": clean, "curve": [a - 5, a]}
        seeds = [0, 1, 2, 3, 4] if key == "lr" else [0, 1, 2]  # the lr section's rank test needs 5 seeds per norm
        sweeps[key] = str(make_sweep(d / "sweeps", grid, seeds, result, name=key).relative_to(d))
        if key == "landscape":  # BN 3x smoother at the same loss; the same relative ICS
            rng = np.random.default_rng(0)
            for norm in grid["model.norm"]:
                for seed in seeds:
                    run = W.landscape_run(rng, 1.0 if norm == "batch" else 3.0, 0.2, 60.0 if norm == "batch" else 150.0,
                                          run_sd=0.1, probe_sd=0.1)
                    _write_landscape(d / sweeps[key] / "runs" / f"norm-{norm}-seed{seed}", run)
    declared = {key: [s.model_dump() for s in study.declared_estimands(study.sweep_file("quick", key))]
                for key in grids}
    (d / study.STUDY_FILE).write_text(json.dumps({"profile": "quick", "overrides": [], "sweeps": sweeps,
                                                  "estimands": declared,
                                                  "created": "2026-11-30T09:00:00", "wall_time_s": 600.0}))
    (d / study.EVAL_FILE).write_text("run,seed,checkpoint,running_acc,batch_stats_acc,recalibrated_acc,recal_images\n"
                                     + "".join(f"norm-batch_batch_size-4-seed{i},{i},x,{r},{b},{c},2000\n" for i, (r, b, c) in enumerate(
                                         [(80.0, 70.0, 80.5), (82.0, 71.0, 82.0), (78.0, 69.0, 78.2)])))
    return d


@pytest.mark.slow
def test_report_gives_five_sections_with_figure_table_and_verdict(tmp_path):
    d = _constructed_study(tmp_path)
    result = study.write_report(d)
    got = {k: v.verdict for k, v in result.verdicts.items()}
    assert got == {"lr": verdicts.SUPPORTED, "init": verdicts.SUPPORTED, "regularization": verdicts.SUPPORTED,
                   "small_batches": verdicts.SUPPORTED, "notebook_eval": verdicts.SUPPORTED,
                   "landscape": verdicts.NOT_TESTABLE, "ics": verdicts.NOT_TESTABLE}
    assert result.verdicts["notebook_eval"].effect.effect == pytest.approx((10 + 11 + 9) / 3)
    text = result.report.read_text()
    for section in [*study.SECTIONS[:4], study.NOTEBOOK_SECTION]:
        body = text.split(f"## {section.title}")[1].split("\n## ")[0]
        assert f"![{section.title}](figures/{section.key}.png)" in body
        assert "| --- |" not in body and "|---|" in body  # a markdown table
        assert "**Verdict:** supported: " in body and "*Test:*" in body and "**Estimand.**" in body
        assert "**Budget.**" in body and "**Claim.**" in body
        assert (d / "figures" / f"{section.key}.png").stat().st_size > 5000
    assert "wall time so far 10.0 min" in text
    assert (d / "sweeps" / "lr" / "report.md").is_file()  # each sweep gets its own report too


def test_an_unfinished_study_is_incomplete_where_runs_are_missing(tmp_path):
    """--report-only on a study still running: its unfinished sections say "incomplete", not "inconclusive"."""
    d = _constructed_study(tmp_path, unfinished=("small_batches",))
    result = study.write_report(d)
    got = {k: v.verdict for k, v in result.verdicts.items()}
    assert got == {"lr": verdicts.SUPPORTED, "init": verdicts.SUPPORTED, "regularization": verdicts.SUPPORTED,
                   "small_batches": verdicts.INCOMPLETE, "notebook_eval": verdicts.INCOMPLETE,
                   "landscape": verdicts.NOT_TESTABLE, "ics": verdicts.NOT_TESTABLE}
    assert "created before this section existed" in result.verdicts["ics"].reason
    text = result.report.read_text()
    assert "| 4. Small batches | incomplete | 15 of 18 runs finished; rerun with --resume to finish |" in text
    assert "2 of 3 BN checkpoints at batch 4 evaluated" in text
    # Holm counts the three tested sections only.
    assert "Holm-adjusted across the sections tested (3 here)" in text


@pytest.mark.slow
def test_section_figures_draw_the_chance_level(tmp_path, monkeypatch):
    from bnctl import plotting

    d = _constructed_study(tmp_path)
    figs = {}
    real_save = plotting.save_figure
    monkeypatch.setattr(plotting, "save_figure", lambda fig, out: figs.setdefault(Path(out).name, [
        [line.get_label() for line in ax.get_lines()] for ax in fig.axes]) and real_save(fig, out))
    study.write_report(d)
    assert "chance (10%)" in figs["lr.png"][0] and "chance (10%)" in figs["small_batches.png"][0]
    assert [("chance (10%)" in labels) for labels in figs["regularization.png"]] == [False, True]  # gap, accuracy


@pytest.mark.slow
def test_study_runs_evaluates_and_resumes_without_rerunning(tmp_path, cli):
    studies = tiny_studies(tmp_path)
    first = cli("study", "claims", "--jobs", "1", "--root", tmp_path / "out", "--studies", studies)
    assert first.exit_code == 0, first.output
    (study_dir,) = (tmp_path / "out").iterdir()
    info = study.read(study_dir)
    evals = study.notebook_eval_rows(study_dir)
    assert sorted(r["run"] for r in evals) == ["norm-batch_batch_size-4-seed0", "norm-batch_batch_size-4-seed1"]
    ckpt = study_dir / evals[0]["checkpoint"]
    summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
    assert evals[0]["running_acc"] == pytest.approx(summary["final"]["test_acc"])  # last.pt is the final epoch
    assert evals[0]["recal_images"] == 96 and 0 <= evals[0]["batch_stats_acc"] <= 100
    text = (study_dir / "REPORT.md").read_text()
    assert text.count("**Verdict:** ") == 7 and "16 of 16 runs finished" in text
    # These tiny sweep files declare no estimand: every section says so instead of guessing one.
    assert "not testable here: the section's sweep file declares no lr_tolerance estimand" in text
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    mtimes = {p: p.stat().st_mtime_ns for p in study_dir.rglob("summary.json")}
    again = cli("study", "claims", "--resume", study_dir)
    assert again.exit_code == 0, again.output
    assert again.output.count("0 to run") == 5 and "evaluating norm-" not in again.output
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("summary.json")} == mtimes
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest  # evaluation never writes a checkpoint
    assert study.read(study_dir)["wall_time_s"] > info["wall_time_s"]
    clash = cli("study", "claims", "--resume", study_dir, "train.epochs=3")
    assert clash.exit_code == 2 and "give none" in clash.output


def test_the_budget_is_read_from_the_config_not_assumed(tmp_path):
    """Review 8: section 5 always said "(Adam, lr 0.001: the notebook's settings)", even for an SGD study."""
    from bnctl import report

    plan = {"config": {"data": {"name": "synthetic", "train_size": 3000, "test_size": 500},
                       "train": {"epochs": 3, "batch_size": 32},
                       "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "scheduler": {"name": "cosine"}},
            "grid": {"model.norm": ["batch", "group"], "train.batch_size": [2, 64]}, "seeds": [0, 1, 2, 3],
            "lr_scaling": {"rule": "linear", "reference_batch": 64}}
    data = report.SweepData(tmp_path, plan, [])
    facts = study.RunFacts(test_images=500, train_images=3000, steps_per_epoch={2: 1500, 64: 46})
    assert study.budget(data, facts) == (
        "synthetic data, 3,000 training and 500 test images; 3 epochs; 4,500 steps at batch 2; 138 steps at batch 64; "
        "SGD (momentum 0.9), lr 0.05 x batch/64 (0.0015625 at 2, 0.05 at 64), cosine schedule; 4 seeds per cell.")
    assert study._lr_text_at(data, 2) == "SGD (momentum 0.9), lr 0.0015625"
    adam = report.SweepData(tmp_path, plan | {"config": plan["config"] | {"optimizer": {"name": "adam", "lr": 3e-4}},
                                              "lr_scaling": None}, [])
    assert "Adam, lr 0.0003, cosine schedule;" in study.budget(adam, facts)


def test_the_landscape_sections_read_their_runs_landscape_csv_through_the_report(tmp_path):
    """Sections 6 and 7 from one landscape sweep: BN 3x smoother at matched loss (supported), equal ICS (not supported)."""
    d = _constructed_study(tmp_path, landscape=True)
    result = study.write_report(d)
    smooth, ics = result.verdicts["landscape"], result.verdicts["ics"]
    assert smooth.kind == verdicts.SUPPORTED, smooth.sentence()
    assert smooth.effect.n == (3,) and 0.8 < smooth.effect.effect < 1.4  # ln 3 = 1.10
    assert smooth.p_adjusted is not None and smooth.p_adjusted >= smooth.effect.p  # in Holm's family
    assert ics.kind != verdicts.SUPPORTED and ics.effect.n == (3,), ics.sentence()
    text = result.report.read_text()
    for title in ("## 6. Loss-landscape smoothness", "## 7. Internal covariate shift"):
        assert title in text
    body = text.split("## 6. Loss-landscape smoothness")[1].split("\n## ")[0]
    assert "![6. Loss-landscape smoothness](figures/landscape.png)" in body and "**Verdict:** supported" in body
    assert (d / "figures" / "landscape.png").stat().st_size > 5000
    assert text.index("## 5. The notebook's evaluation") < text.index("## 6.") < text.index("## 7.")
