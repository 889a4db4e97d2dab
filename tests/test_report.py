"""`bnctl report`: statistics per cell, summary.csv, report.md and figures, from a sweep's files only."""

import subprocess
import sys

import pytest

from bnctl import report, rundir
from tests.sweepfiles import make_sweep

GRID = {"model.norm": ["batch", "none"], "optimizer.lr": [0.001, 0.01]}
ACC = {("batch", 0.001): [80.0, 82.0, 84.0], ("batch", 0.01): [85.0, 86.0, 90.0],
       ("none", 0.001): [70.0, 75.0, 77.0], ("none", 0.01): [10.0, 10.0, 10.0]}


def _result(o, seed):
    norm, lr = o["model.norm"], o["optimizer.lr"]
    if (norm, lr, seed) == ("none", 0.001, 2):
        return None  # not started yet
    if (norm, lr, seed) == ("none", 0.01, 2):
        return {"status": "diverged", "epochs": 1, "final_test_acc": 10.0}
    if (norm, lr, seed) == ("batch", 0.01, 2):
        return {"status": "failed", "error": "RuntimeError: boom"}
    acc = ACC[norm, lr][seed]
    return {"status": "completed", "epochs": 3, "final_test_acc": acc, "best_test_acc": acc + 1,
            "final_test_loss": 0.5, "final_clean_train_acc": acc + 5, "wall_time_s": 2.0,
            "curve": [acc - 20, acc - 10, acc]}


@pytest.fixture
def sweep(tmp_path):
    return make_sweep(tmp_path, GRID, [0, 1, 2], _result)


def test_cells_aggregate_completed_runs_and_count_the_rest(sweep):
    cells = {c.name: c for c in report.cells(report.load(sweep))}
    bn = cells["norm-batch_lr-0.001"]
    assert bn.stats["final_test_acc"].n == 3 and bn.stats["final_test_acc"].mean == pytest.approx(82.0)
    assert bn.stats["final_test_acc"].std == pytest.approx(2.0)
    assert bn.stats["gap"].mean == pytest.approx(5.0)  # clean train acc - test acc
    failed = cells["norm-batch_lr-0.01"]
    assert failed.stats["final_test_acc"].n == 2 and failed.count("failed") == 1
    diverged = cells["norm-none_lr-0.01"]
    assert diverged.count("diverged") == 1 and diverged.stats["final_test_acc"].n == 2  # counted, not averaged
    assert [r["run"] for r in cells["norm-none_lr-0.001"].missing] == ["norm-none_lr-0.001-seed2"]


def test_build_writes_summary_markdown_and_figures(sweep):
    rep = report.build(sweep)
    rows = {r["cell"]: r for r in rundir.read_csv(sweep / "summary.csv")}
    assert rows["norm-batch_lr-0.001"]["final_test_acc_mean"] == pytest.approx(82.0)
    assert rows["norm-batch_lr-0.001"]["final_test_acc_ci_lo"] == pytest.approx(82.0 - 4.302652729911275 * 2 / 3 ** 0.5)
    assert (rows["norm-none_lr-0.01"]["diverged"], rows["norm-none_lr-0.01"]["completed"]) == (1, 2)
    assert rows["norm-none_lr-0.001"]["missing"] == 1 and rows["norm-batch_lr-0.01"]["failed"] == 1
    text = (sweep / "report.md").read_text()
    assert "82.00 ± 2.00" in text and "| batch | 0.001 | 3/3 | 0 |" in text
    assert "**Incomplete:** 2 of 12 runs" in text
    assert "norm-batch_lr-0.01-seed2: failed (RuntimeError: boom)" in text
    assert "norm-none_lr-0.001-seed2: pending" in text
    names = {p.name for p in rep.files}
    assert {"final_test_acc_vs_lr.png", "gap_vs_lr.png", "curves_test_acc.png"} <= names
    assert all((sweep / n).stat().st_size > 5000 for n in names if n.endswith(".png"))
    assert report.numeric_keys(rep.data) == ["optimizer.lr"]
    assert report._log_axis("optimizer.lr", [0.001, 0.01]) and not report._log_axis("model.width", [0.5, 2.0])
    assert report._log_axis("train.batch_size", [2, 64])


@pytest.mark.slow
def test_report_cli_prints_the_table_without_importing_torch(sweep):
    code = ("import sys\nfrom bnctl.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "report", str(sweep)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "82.00 ± 2.00" in out.stdout and "incomplete: 2 of 12 runs" in out.stdout
    modules = set(out.stdout.strip().splitlines()[-1].split())
    assert "scipy.stats" in modules and "torch" not in modules


def test_report_refuses_a_folder_that_is_not_a_sweep(tmp_path, cli):
    result = cli("report", tmp_path)
    assert result.exit_code == 2 and "not a bnctl sweep directory" in result.output


def test_a_cell_whose_runs_all_diverged_is_marked_in_the_figure(tmp_path):
    from bnctl.plotting import pyplot

    def result(o, seed):
        if o["optimizer.lr"] == 0.01:
            return {"status": "diverged", "epochs": 1, "final_test_acc": 10.0}
        return {"status": "completed", "epochs": 1, "final_test_acc": 50.0 + seed, "final_test_loss": 1.0}

    data = report.load(make_sweep(tmp_path, GRID, [0, 1], result))
    fig, ax = pyplot().subplots()
    assert report.draw_metric_vs_key(ax, data, report.cells(data), "optimizer.lr")
    assert [t.get_text() for t in ax.texts] == ["diverged: norm=batch; norm=none"]


def _keep_figures(monkeypatch) -> dict:
    from pathlib import Path

    from bnctl import plotting

    figs, real_save = {}, plotting.save_figure

    def keep(fig, out):
        figs[Path(out).name] = fig
        return real_save(fig, out)

    monkeypatch.setattr(plotting, "save_figure", keep)
    return figs


def _visible_xticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


def test_curves_test_acc_draws_the_chance_line_and_whole_epochs(sweep, monkeypatch):
    figs = _keep_figures(monkeypatch)
    report.build(sweep)
    ax = figs["curves_test_acc.png"].axes[0]
    chance = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [10.0, 10.0]  # 100% / 10 classes
    assert _visible_xticks(ax) == [1.0, 2.0, 3.0]


def test_a_one_epoch_sweep_gets_whole_epoch_ticks(tmp_path, monkeypatch):
    def result(o, seed):
        acc = 50.0 + seed
        return {"status": "completed", "epochs": 1, "final_test_acc": acc, "final_test_loss": 1.0, "curve": [acc]}

    figs = _keep_figures(monkeypatch)
    report.build(make_sweep(tmp_path, GRID, [0, 1], result))
    assert _visible_xticks(figs["curves_test_acc.png"].axes[0]) == [1.0]


def test_intervals_are_drawn_cut_at_0_and_100_and_the_numbers_are_not(tmp_path, monkeypatch):
    import numpy as np

    def result(o, seed):  # 3 seeds spread widely near 100% (BN) and near 0% (none): t-intervals pass both ends
        acc = (99.0, 100.0, 70.0)[seed] if o["model.norm"] == "batch" else (1.0, 0.0, 30.0)[seed]
        return {"status": "completed", "epochs": 2, "final_test_acc": acc, "best_test_acc": acc,
                "final_test_loss": 1.0, "curve": [acc, acc]}

    sweep = make_sweep(tmp_path, GRID, [0, 1, 2], result)
    figs = _keep_figures(monkeypatch)
    report.build(sweep)
    rows = {r["cell"]: r for r in rundir.read_csv(sweep / "summary.csv")}
    assert rows["norm-batch_lr-0.001"]["final_test_acc_ci_hi"] > 100  # the numbers stay as computed
    assert rows["norm-none_lr-0.001"]["final_test_acc_ci_lo"] < 0
    ax = figs["final_test_acc_vs_lr.png"].axes[0]
    ys = np.concatenate([np.asarray(seg)[:, 1] for col in ax.collections for seg in col.get_segments()])
    assert ys.max() == 100.0 and ys.min() == 0.0  # bars drawn up to the possible range, not beyond
    assert any("cut at 0% and 100%" in t.get_text() for t in ax.texts)
    curves = figs["curves_test_acc.png"].axes[0]
    band = np.concatenate([p.vertices[:, 1] for col in curves.collections for p in col.get_paths()])
    assert band.max() == 100.0 and band.min() == 0.0
    assert any("cut at 0% and 100%" in t.get_text() for t in curves.texts)
    assert "give the intervals uncut" in (sweep / "report.md").read_text()


def test_figures_within_range_carry_no_cut_note(tmp_path, monkeypatch):
    def result(o, seed):
        acc = 60.0 + seed
        return {"status": "completed", "epochs": 2, "final_test_acc": acc, "final_test_loss": 1.0,
                "final_clean_train_acc": acc + 5, "curve": [acc - 5, acc]}

    figs = _keep_figures(monkeypatch)
    report.build(make_sweep(tmp_path, GRID, [0, 1, 2], result))
    assert len(figs) == 3 and not any("cut at" in t.get_text() for fig in figs.values() for ax in fig.axes for t in ax.texts)


def _scipy_welch(a, b):
    from scipy import stats as st

    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return sum(a) / len(a) - sum(b) / len(b), ci.low, ci.high


def test_report_gives_the_difference_between_levels_with_welch_intervals_and_n(sweep):
    rep = report.build(sweep)
    diffs = {(d.key, d.level, tuple(d.at.values()), d.metric): d for d in rep.differences}
    # BN minus none at each learning rate; none is the reference even though batch is listed first.
    d = diffs["model.norm", "batch", (0.001,), "final_test_acc"]
    assert (d.reference, d.n) == ("none", (3, 2))  # none's seed 2 has not run
    effect, lo, hi = _scipy_welch([80.0, 82.0, 84.0], [70.0, 75.0])
    assert (d.diff.effect, d.diff.lo, d.diff.hi) == pytest.approx((effect, lo, hi)) and effect == pytest.approx(9.5)
    high = diffs["model.norm", "batch", (0.01,), "final_test_acc"]
    assert high.n == (2, 2) and high.diff.effect == pytest.approx(75.5)  # failed and diverged runs left out
    # The other swept key: each learning rate minus the first one listed, per norm.
    lr = diffs["optimizer.lr", 0.01, ("none",), "final_test_acc"]
    assert (lr.reference, lr.n, lr.diff.effect) == (0.001, (2, 2), pytest.approx(10.0 - 72.5))
    text = (sweep / "report.md").read_text()
    assert "## Differences between levels" in text
    assert "| model.norm | norm=batch minus norm=none | lr=0.001 | +9.50 [" in text and "(n=3/2) |" in text
    rows = rundir.read_csv(sweep / "differences.csv")
    row = next(r for r in rows if r["key"] == "model.norm" and r["at"] == "optimizer.lr=0.001"
               and r["metric"] == "final_test_acc")
    assert (row["level"], row["reference"], row["n_level"], row["n_reference"], row["method"]) == (
        "batch", "none", 3, 2, "Welch")
    assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((lo, hi))


def test_a_side_with_fewer_than_two_runs_gets_no_interval(tmp_path):
    def result(o, seed):
        if o["model.norm"] == "none" and seed == 1:
            return None
        return {"status": "completed", "epochs": 1, "final_test_acc": 50.0 + seed + (o["model.norm"] == "batch")}

    rep = report.build(make_sweep(tmp_path, GRID, [0, 1], result))
    d = next(d for d in rep.differences if d.key == "model.norm")
    assert d.diff is None and d.n == (2, 1) and report.fmt_difference(d) == "- (n=2/1)"


def test_the_reference_level_can_be_chosen_and_flips_the_sign(sweep, cli):
    default = {(d.key, tuple(d.at.values())): d.diff.effect for d in report.build(sweep).differences
               if d.metric == "final_test_acc" and d.diff}
    flipped = report.build(sweep, reference={"model.norm": "batch", "optimizer.lr": "1e-2"}).differences
    for d in flipped:
        if d.metric == "final_test_acc" and d.diff:
            assert d.diff.effect == pytest.approx(-default[d.key, tuple(d.at.values())])
    out = cli("report", sweep, "--reference", "model.norm=batch")
    assert out.exit_code == 0 and "norm=none minus norm=batch" in out.output, out.output
    bad = cli("report", sweep, "--reference", "model.norm=group")
    assert bad.exit_code == 2 and "not a level of the sweep (its levels: batch, none)" in bad.output
    assert cli("report", sweep, "--reference", "lr=0.1").exit_code == 2


def test_a_sweep_of_one_key_at_one_level_has_no_differences(tmp_path):
    def result(o, seed):
        return {"status": "completed", "epochs": 1, "final_test_acc": 50.0 + seed}

    sweep = make_sweep(tmp_path, {"model.norm": ["batch"]}, [0, 1], result)
    rep = report.build(sweep)
    assert rep.differences == [] and not (sweep / "differences.csv").exists()
    assert "Differences between levels" not in (sweep / "report.md").read_text()
