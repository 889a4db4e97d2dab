"""The public Python API (bnctl.train, evaluate, compare, run_sweep, sweep_report, study_claims, Run, ...):
the same results and errors as the commands, figures as objects, no output unless asked for."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bnctl
from bnctl import api
from bnctl.errors import BnctlError, ConfigError
from tests.conftest import tiny_raw, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).parents[1] / "docs" / "api.md"


# ------------------------------------------------------------------ the package's surface

def test_import_bnctl_is_light_and_the_api_loads_on_first_use():
    code = ("import sys, bnctl; heavy = ('torch', 'matplotlib', 'pydantic', 'pandas', 'rich');"
            "before = [m for m in heavy if m in sys.modules]; bnctl.train; bnctl.Run;"
            "after = [m for m in heavy if m in sys.modules]; print(before, after)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_public_names_are_the_api_and_never_a_submodule_name():
    submodules = {m.name for m in pkgutil.iter_modules(bnctl.__path__)}
    # Importing a submodule sets the package attribute of its name: a public function of that name would vanish.
    assert not submodules & set(bnctl.__all__)
    import importlib

    for name in submodules - {"__main__"}:
        importlib.import_module(f"bnctl.{name}")
    for name in bnctl.__all__:
        if name != "__version__":
            assert getattr(bnctl, name) is getattr(api, name, None) or getattr(bnctl, name) is getattr(bnctl.errors, name)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        bnctl.trian  # noqa: B018


def test_every_public_name_is_documented_with_a_docstring():
    text = DOCS.read_text()
    for name in bnctl.__all__:
        if name != "__version__":
            assert f"`{name}" in text, name
            assert getattr(bnctl, name).__doc__, name
    assert "deprecat" in text  # the promise: public names change only with a deprecation


# ------------------------------------------------------------------ train and Run

TINY_KW = {"train.epochs": 2, "data.train_size": 256, "data.test_size": 128}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny BN run with diagnostics, trained through the API; the epoch rows its progress function received."""
    root = tmp_path_factory.mktemp("api_runs")
    rows: list[dict] = []
    run = bnctl.train(tiny_raw(), {**TINY_KW, "train.diagnostics": True, "train.diagnostics_every": 4},
                      runs_root=root, progress=rows.append)
    return run, rows


def test_train_returns_the_run_its_files_and_its_progress(trained):
    run, rows = trained
    assert isinstance(run, bnctl.Run) and run.dir.is_dir()
    assert [r["epoch"] for r in rows] == [1, 2]  # the progress function got each epoch's row as it ended
    assert [m["test_acc"] for m in run.metrics] == [r["test_acc"] for r in rows]
    assert run.status == "completed" and run.summary["best"]["test_acc"] == max(r["test_acc"] for r in rows)
    assert run.config["data"]["train_size"] == 256 and run.config["train"]["diagnostics"] is True
    assert run.checkpoint == run.dir / "checkpoints" / "best.pt" and run.checkpoint.is_file()
    assert (run.dir / "curves.png").is_file() and (run.dir / "diagnostics.png").is_file()  # as `bnctl train` leaves
    assert bnctl.load_run(run.dir) == run and str(run.dir) in repr(run) and "completed" in repr(run)


def test_train_gives_the_same_run_as_the_command_line(trained, tmp_path, cli):
    run, _ = trained
    config = write_config(tmp_path / "tiny.yaml", tiny_raw())
    result = cli("train", "--config", config, "--runs-root", tmp_path / "cli", "train.epochs=2",
                 "data.train_size=256", "data.test_size=128", "train.diagnostics=true", "train.diagnostics_every=4")
    assert result.exit_code == 0, result.output
    (cli_dir,) = (tmp_path / "cli").iterdir()
    cli_run = bnctl.load_run(cli_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(cli_run.metrics) == strip(run.metrics)
    assert cli_run.config == run.config


def test_overrides_as_a_mapping_strings_or_keywords_mean_the_same():
    a = bnctl.load_config("quickstart", {"optimizer.lr": 0.01, "train.epochs": 3})
    b = bnctl.load_config("quickstart", ["optimizer.lr=0.01", "train.epochs=3"])
    c = bnctl.load_config("quickstart", optimizer__lr=0.01, train__epochs=3)
    assert a == b == c and a.optimizer.lr == 0.01 and a.train.epochs == 3 and a.name == "quickstart"
    assert bnctl.load_config(tiny_raw(), seed=5).seed == 5


def test_a_bad_key_raises_the_error_the_command_line_prints(tmp_path, cli):
    config = write_config(tmp_path / "tiny.yaml", tiny_raw())
    shown = cli("train", "--config", config, "optimizer.lrr=0.1", "--runs-root", tmp_path / "runs").output
    with pytest.raises(ConfigError) as err:
        bnctl.train(config, {"optimizer.lrr": 0.1}, runs_root=tmp_path / "runs")
    problem = "  optimizer.lrr: unknown key; did you mean 'lr'?"
    assert problem + " (from the command line: optimizer.lrr=0.1)" in shown
    assert str(err.value).splitlines() == [f"invalid override for config {config}:",
                                           problem + " (from the overrides: optimizer.lrr=0.1)"]
    assert not (tmp_path / "runs").exists()  # nothing written
    cli_message = cli("train", "--config", config, "optimizer.lr").output
    with pytest.raises(ConfigError) as err:
        bnctl.train(config, ["optimizer.lr"])
    assert str(err.value) in " ".join(cli_message.split())
    with pytest.raises(ConfigError, match="'optimizer..lr' is not a config key"):
        bnctl.train(config, {"optimizer..lr": 0.1})
    with pytest.raises(ConfigError, match=r"model.norm: .*'batchnorm'"):
        bnctl.train(config, model__norm="batchnorm")


def test_config_names_paths_and_their_errors(tmp_path):
    assert bnctl.load_config("quickstart").name == "quickstart"  # a built-in name
    with pytest.raises(ConfigError, match=r"config file not found: quickstrat; nor is it a built-in config .*quickstart"):
        bnctl.train("quickstrat")  # the message `bnctl train --config quickstrat` prints
    with pytest.raises(ConfigError, match=str(tmp_path)):
        bnctl.train(tmp_path)
    with pytest.raises(ConfigError, match="not int"):
        bnctl.train(3)
    with pytest.raises(ConfigError, match="progress must be"):
        bnctl.train(tiny_raw(), progress="yes")


@pytest.mark.slow  # trains runs
def test_progress_true_prints_a_line_per_epoch_and_false_nothing(tmp_path, capsys):
    bnctl.train(tiny_raw(), {"train.epochs": 1, "data.train_size": 64, "data.test_size": 32},
                runs_root=tmp_path, progress=False)
    assert capsys.readouterr() == ("", "")  # the library prints nothing of its own
    bnctl.train(tiny_raw(), {"train.epochs": 1, "data.train_size": 64, "data.test_size": 32},
                runs_root=tmp_path, progress=True)
    out = capsys.readouterr().out
    assert "run directory:" in out and "epoch 1/1  train loss" in out and "test loss" in out


def test_run_figures_are_objects_outside_pyplot_and_leave_the_style_alone(trained):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    run, _ = trained
    backend, style = matplotlib.get_backend(), dict(matplotlib.rcParams)
    curves = run.curves()
    assert isinstance(curves, Figure)
    assert [ax.get_title() for ax in curves.axes] == ["Loss", "Accuracy"]
    assert len(curves.axes[1].get_lines()[1].get_xdata()) == 2  # test accuracy per epoch
    diag = run.diagnostics()
    assert isinstance(diag, Figure) and "Normalization diagnostics" in diag._suptitle.get_text()
    assert plt.get_fignums() == []  # not kept by pyplot: a notebook shows each once, and they are freed
    assert curves._repr_png_().startswith(b"\x89PNG")  # what Jupyter shows, with or without pyplot imported
    assert matplotlib.get_backend() == backend and dict(matplotlib.rcParams) == style
    # Drawing applies the house style to these figures only: a grid, no legend frame.
    assert curves.axes[0].xaxis._major_tick_kw.get("gridOn") is True
    assert not curves.axes[0].get_legend().get_frame_on()


@pytest.mark.slow  # trains runs
def test_a_run_without_diagnostics_or_evaluations_says_what_to_do(tmp_path):
    run = bnctl.train(tiny_raw(), {"train.epochs": 1, "data.train_size": 64, "data.test_size": 32},
                      runs_root=tmp_path, progress=False)
    with pytest.raises(BnctlError, match="train.diagnostics=true"):
        run.diagnostics()
    with pytest.raises(BnctlError, match=r"no evaluation yet; run bnctl.evaluate\(run\)"):
        run.confusion()
    with pytest.raises(BnctlError, match="run directory not found"):
        bnctl.load_run(tmp_path / "nope")
    with pytest.raises(BnctlError, match="not a bnctl run directory"):
        bnctl.load_run(tmp_path)


def test_to_pandas_and_its_message_without_pandas(trained, monkeypatch):
    run, _ = trained
    pandas = pytest.importorskip("pandas")  # in the test extra; this branch shows the missing-package path too
    frame = run.to_pandas()
    assert isinstance(frame, pandas.DataFrame) and list(frame["epoch"]) == [1, 2]
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now fails, as when it is not installed
    with pytest.raises(BnctlError, match=r"Run.to_pandas\(\) needs pandas.*pip install pandas"):
        run.to_pandas()


# ------------------------------------------------------------------ evaluate

def test_evaluate_matches_the_eval_command_and_keeps_its_files(trained, cli):
    run, _ = trained
    running = bnctl.evaluate(run)
    shown = json.loads(cli("eval", run.dir, "--json").output)
    assert running.acc == shown["acc"] and running.loss == shown["loss"] and running.bn_mode == "running"
    assert running.acc == run.summary["best"]["test_acc"]  # eval mode is what training measured
    batch = bnctl.evaluate(run.dir, bn_mode="batch", batch_size=4)
    shown = json.loads(cli("eval", run.dir, "--json", "--bn-mode", "batch", "--batch-size", "4").output)
    assert batch.acc == shown["acc"] and batch.batch_size == 4 and batch.loss != running.loss
    assert batch.path == run.dir / "eval" / "batch-bs4.json" and batch.path.with_suffix(".png").is_file()
    assert json.loads(batch.path.read_text())["acc"] == batch.acc
    assert "each test batch's statistics (batch 4)" in repr(batch)
    assert run.evaluations[-1].result["bn_mode"] in ("running", "batch")
    fig = run.confusion()
    assert "Confusion" in fig.axes[0].get_title()
    unsaved = bnctl.evaluate(run.checkpoint, recalibrate=64, save=False)
    assert unsaved.path is None and unsaved.result["recalibration"]["images"] == 64


def test_evaluation_options_are_named_for_python_and_the_command_line(tmp_path):
    """Checked before the checkpoint is read, so a missing file is enough; the messages fit both callers."""
    from bnctl import evaluation

    for options, message in (({"bn_mode": "train"}, "unknown bn_mode (--bn-mode) 'train'"),
                             ({"batch_size": 0}, "batch_size (--batch-size) must be at least 1 (got 0)"),
                             ({"recalibrate": -1}, "recalibrate (--recalibrate) is a number of training images"),
                             ({"recalibrate": 8, "bn_mode": "batch"},
                              "recalibrate (--recalibrate) recomputes BN's running statistics, which bn_mode 'batch'"),
                             ({"recalibrate_batch_size": 1}, "recalibrate_batch_size (--recalibrate-batch-size) must")):
        with pytest.raises(ConfigError) as err:
            evaluation.evaluate_checkpoint(tmp_path / "missing.pt", **options)
        assert str(err.value).startswith(message)


def test_evaluate_raises_the_commands_errors(trained, tmp_path):
    run, _ = trained
    with pytest.raises(ConfigError, match=r"unknown bn_mode \(--bn-mode\) 'train'; choose one of: running, batch"):
        bnctl.evaluate(run, bn_mode="train")
    with pytest.raises(ConfigError, match=r"^batch_size \(--batch-size\) must be at least 1 \(got 0\)$"):
        bnctl.evaluate(run, batch_size=0)  # not pydantic's ValidationError from deep inside
    with pytest.raises(ConfigError, match=r"^recalibrate \(--recalibrate\) is a number of training images"):
        bnctl.evaluate(run, recalibrate=-1)  # not an evaluation "recalibrated on 0 images"
    with pytest.raises(ConfigError, match="recalibrate"):
        bnctl.evaluate(run, bn_mode="batch", recalibrate=100)
    with pytest.raises(BnctlError):
        bnctl.evaluate(tmp_path / "missing")


# ------------------------------------------------------------------ compare

def test_compare_tabulates_how_runs_differ_and_overlays_them(trained, tmp_path):
    run, _ = trained
    other = bnctl.train(tiny_raw(), {**TINY_KW, "model.norm": "none"}, runs_root=tmp_path, progress=False)
    cmp = bnctl.compare([run, other.dir])
    assert cmp.keys == ["model.norm"]  # diagnostics settings do not change what a run learns
    assert [r["differs"]["model.norm"] for r in cmp.rows] == ["batch", "none"]
    assert [r["final_test_acc"] for r in cmp.rows] == [run.metrics[-1]["test_acc"], other.metrics[-1]["test_acc"]]
    fig = cmp.figure()
    assert len(fig.legends[0].get_texts()) == 2 and "model.norm" in fig._suptitle.get_text()
    assert list(cmp.to_pandas()["model.norm"]) == ["batch", "none"]
    with pytest.raises(ConfigError, match="at least one run"):
        bnctl.compare([])


# ------------------------------------------------------------------ sweeps and reports

SWEEP_FIXED = {"train.epochs": 1, "data.train_size": 64, "data.test_size": 32, "train.batch_size": 16}


def test_run_sweep_plans_as_the_command_line_does(tmp_path):
    from bnctl import plan as plan_mod

    config = write_config(tmp_path / "tiny.yaml", tiny_raw())
    ours = plan_mod.plan_from_parts(tiny_raw(), SWEEP_FIXED, {"model.norm": ["batch", "none"]}, 2, None, str(config))
    cli = plan_mod.plan_inline(config, ["model.norm=batch,none", *(f"{k}={v}" for k, v in SWEEP_FIXED.items())], 2)
    strip = lambda d: {k: v for k, v in d.items() if k != "created"}  # noqa: E731
    assert strip(ours.to_dict()) == strip(cli.to_dict())


@pytest.mark.slow  # trains runs
def test_run_sweep_then_its_report(tmp_path):
    seen: list[dict] = []
    result = bnctl.run_sweep(tiny_raw(), {"model.norm": ["batch", "none"]}, seeds=1, root=tmp_path,
                             progress=seen.append, **SWEEP_FIXED)
    assert sorted(result.completed) == ["norm-batch-seed0", "norm-none-seed0"] and not result.failed
    assert [r["status"] for r in result.results] == ["completed", "completed"]
    assert sorted(r["run"] for r in seen) == sorted(result.completed)
    runs = result.runs()
    assert [r.config["model"]["norm"] for r in runs] == ["batch", "none"]
    assert [r.config["train"]["epochs"] for r in runs] == [1, 1]
    rep = result.report()
    assert rep.body == bnctl.sweep_report(result.dir).body
    assert [row[0] for row in rep.body] == ["batch", "none"] and not rep.missing
    assert rep.markdown.is_file() and all(f.is_file() for f in rep.figures) and rep.figures
    markdown = rep._repr_markdown_()
    assert markdown.startswith("| model.norm |") and "| batch |" in markdown and "Incomplete" not in markdown
    assert len(rep.summary) == 2 and bnctl.load_sweep(result.dir).dir == result.dir


@pytest.mark.slow  # trains runs
def test_run_sweep_of_a_sweep_file(tmp_path):
    import yaml

    spec = {"name": "filed", "base": str(write_config(tmp_path / "tiny.yaml", tiny_raw())),
            "fixed": SWEEP_FIXED, "grid": {"optimizer.lr": [0.003]}, "seeds": 1}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    result = bnctl.run_sweep(tmp_path / "sweep.yaml", root=tmp_path / "out", progress=False, model__norm="none")
    (row,) = result.results
    assert row["status"] == "completed" and result.runs()[0].config["model"]["norm"] == "none"
    assert "filed" in result.dir.name


def test_sweep_errors_come_before_anything_is_created(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer.lrr: unknown key.*from the overrides"):
        bnctl.run_sweep(tiny_raw(), {"model.norm": ["batch"]}, root=tmp_path / "a", optimizer__lrr=0.1)
    with pytest.raises(ConfigError, match="'seed' cannot be swept"):
        bnctl.run_sweep(tiny_raw(), {"seed": [0, 1]}, root=tmp_path / "a")
    with pytest.raises(ConfigError, match="needs a non-empty list"):
        bnctl.run_sweep(tiny_raw(), {"model.norm": []}, root=tmp_path / "a")
    with pytest.raises(ConfigError, match="give the swept keys"):
        bnctl.run_sweep(tiny_raw())
    assert not (tmp_path / "a").exists()
    with pytest.raises(BnctlError, match="not a sweep directory"):
        bnctl.sweep_report(tmp_path)
    with pytest.raises(BnctlError, match="not a sweep directory"):
        bnctl.load_sweep(tmp_path)


# ------------------------------------------------------------------ studies

@pytest.mark.slow  # trains runs
def test_study_claims_runs_a_tiny_study_and_rewrites_its_report(tmp_path):
    import yaml

    from bnctl import study
    from tests.test_study import TINY_EXTRA, TINY_FIXED, TINY_GRIDS

    folder = tmp_path / "studies" / "quick"  # the quick profile's sweeps, tiny, one seed each
    folder.mkdir(parents=True)
    fixed = {k: v for k, v in TINY_FIXED.items() if k != "model.groups"}  # no group-norm cell here
    for key, grid in TINY_GRIDS.items():
        spec = {"name": f"tiny_{key}", "base": "quickstart", "grid": grid, "seeds": 1,
                "fixed": dict(fixed, **TINY_EXTRA.get(key, {}))}
        (folder / f"{key}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    events: list[dict] = []
    result = bnctl.study_claims(root=tmp_path / "out", studies=tmp_path / "studies", progress=events.append)
    assert set(result.verdicts) == {s.key for s in study.SECTIONS} | {"notebook_eval", "ics"}
    assert result.report.is_file() and not result.failed
    assert len(events) == 8  # one row per finished run, over the five sweeps
    again = bnctl.study_claims(resume=result.dir, report_only=True)
    assert again.verdicts == result.verdicts and again.sentences == result.sentences
    assert "| notebook_eval |" in again._repr_markdown_()


def test_study_claims_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        bnctl.study_claims("huge", root=tmp_path)
    with pytest.raises(ConfigError, match="optimizer.lrr"):
        bnctl.study_claims(optimizer__lrr=0.1, root=tmp_path)
    with pytest.raises(ConfigError, match="give resume=STUDY_DIR"):
        bnctl.study_claims(report_only=True)
    with pytest.raises(BnctlError, match="not a study directory"):
        bnctl.study_claims(resume=tmp_path)


def test_the_api_reporters_take_what_the_library_passes_them():
    """Fast guard: the sweep and epoch protocols may grow a parameter; the API's reporters must follow."""
    import inspect

    from bnctl import api, engine, sweep

    def params(fn):
        return [p.name for p in inspect.signature(fn).parameters.values() if p.name != "self"]

    for mine, protocol in ((api._SweepProgress, sweep.SweepReporter), (api._EpochProgress, engine.Reporter)):
        for name, fn in inspect.getmembers(protocol, inspect.isfunction):
            if not name.startswith("_") and hasattr(mine, name):
                assert params(getattr(mine, name)) == params(fn), (mine.__name__, name)


def test_the_command_and_the_api_train_and_keep_evaluations_through_one_function(tmp_path, monkeypatch, cli):
    """One implementation of what `bnctl train`/`bnctl eval` do around their library call, not two copies."""
    from bnctl import evaluation, workflow

    trained_by: list[int] = []

    def fake_train_run(cfg, **options):
        trained_by.append(cfg.train.epochs)
        raise ConfigError("stopped here")

    monkeypatch.setattr(workflow, "train_run", fake_train_run)
    config = write_config(tmp_path / "tiny.yaml", tiny_raw())
    with pytest.raises(ConfigError, match="stopped here"):
        bnctl.train(config, train__epochs=3, runs_root=tmp_path / "runs", progress=False)
    result = cli("train", "-c", config, "train.epochs=4", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 2 and "stopped here" in result.output
    assert trained_by == [3, 4]

    kept: list[tuple] = []
    canned = {"acc": 50.0, "loss": 1.0, "bn_mode": "running", "batch_size": 8, "epoch": 1, "images": 8,
              "per_class_acc": {}, "notes": [], "bn_layers": 1, "confusion": [[1]]}
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", lambda path, **options: dict(canned))
    monkeypatch.setattr(workflow, "save_evaluation",
                        lambda ckpt, result, bs=None: kept.append((ckpt, bs)) or (tmp_path / "e.json", tmp_path / "e.png"))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    assert bnctl.evaluate(ckpt, recalibrate_batch_size=16).path == tmp_path / "e.json"
    assert cli("eval", ckpt, "--recalibrate-batch-size", "16", "--json").exit_code == 0
    assert kept == [(ckpt, 16), (ckpt, 16)]


def test_a_comparison_shows_as_a_short_table_not_a_dump_of_its_rows():
    rows = [{"name": "a", "differs": {"model.norm": "batch"}, "status": "completed", "epochs": 2,
             "final_test_acc": 15.5, "best_test_acc": 15.5, "best_epoch": 2, "dir": "runs/a", "final_gap": None},
            {"name": "b", "differs": {"model.norm": "none"}, "status": "diverged", "epochs": 1,
             "final_test_acc": None, "best_test_acc": None, "best_epoch": None, "dir": "runs/b", "final_gap": None}]
    cmp = api.Comparison([], rows, ["model.norm"])
    assert repr(cmp).splitlines() == [
        "run  model.norm  status     epochs  final test acc %  best test acc % (epoch)",
        "a    batch       completed  2       15.50             15.50 (2)",
        "b    none        diverged   1       -                 - (-)"]
    assert cmp._repr_markdown_().splitlines()[2] == "| a | batch | completed | 2 | 15.50 | 15.50 (2) |"
