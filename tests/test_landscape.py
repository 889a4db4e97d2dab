"""Loss-landscape and ICS probes: closed forms, a hand-computed ICS, and probes that change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnctl import config as config_mod, engine, landscape, rundir
from bnctl.errors import ConfigError

from conftest import tiny_raw

TIME_COLUMNS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"}


# ------------------------------------------------------------------ a quadratic: everything is closed-form

def _quadratic(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(n, dtype=torch.float64)  # symmetric positive definite, not a multiple of I
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
    loss = lambda: 0.5 * x @ h @ x - b @ x  # noqa: E731
    return h, b, x, loss


def test_landscape_on_a_quadratic_matches_the_closed_forms():
    h, b, x, loss_fn = _quadratic()
    lr, scales = 0.05, [0.5, 1.0, 2.0, 4.0]
    start = x.detach().clone()
    g = h @ start - b
    # The optimizer's update, found by stepping and undoing: plain SGD moves by -lr*g.
    x.grad = g.clone()
    opt = torch.optim.SGD([x], lr=lr)
    update = landscape.optimizer_update(opt, [x])
    assert torch.allclose(update[0], -lr * g, rtol=1e-12, atol=1e-15)
    assert torch.equal(x.detach(), start) and torch.equal(x.grad, g) and not opt.state.get(x)

    found = landscape.along(loss_fn, [x], update, scales)
    assert torch.equal(x.detach(), start)  # the parameters end where they began
    l0 = float(loss_fn().detach())
    gg, ghg, hg = float(g @ g), float(g @ h @ g), float((h @ g).norm())
    for j, c in enumerate(scales):
        eta = c * lr
        # L(x - eta g) = L(x) - eta g.g + eta^2/2 g.H.g ; grad(x - eta g) - grad(x) = -eta H g
        assert found["loss"][j].item() == pytest.approx(l0 - eta * gg + 0.5 * eta**2 * ghg, rel=1e-10)
        assert found["grad_change"][j].item() == pytest.approx(eta * hg, rel=1e-10)
        # Effective beta-smoothness along g: ||H g|| / ||g||, whatever the step size.
        assert found["beta"][j].item() == pytest.approx(hg / gg**0.5, rel=1e-10)
        # The Hessian's Rayleigh quotient along g: g.H.g / g.g (<= ||Hg||/||g|| by Cauchy-Schwarz).
        assert found["curvature"][j].item() == pytest.approx(ghg / gg, rel=1e-10)
    assert found["loss_here"].item() == pytest.approx(l0, rel=1e-12)
    assert found["step_norm"].item() == pytest.approx(lr * gg**0.5, rel=1e-12)
    assert ghg / gg < hg / gg**0.5  # g is not an eigenvector: the two measures differ and the test tells them apart


def test_beta_is_the_rayleigh_quotient_when_g_is_an_eigenvector():
    h = torch.diag(torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64))
    x = nn.Parameter(torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64))
    loss_fn = lambda: 0.5 * x @ h @ x  # noqa: E731
    g = h @ x.detach()
    found = landscape.along(loss_fn, [x], [-0.01 * g], [1.0, 3.0])
    assert found["beta"].tolist() == pytest.approx([10.0, 10.0], rel=1e-12)
    assert found["curvature"].tolist() == pytest.approx([10.0, 10.0], rel=1e-12)


def test_a_non_quadratic_loss_has_a_scale_dependent_beta():
    # L = x^4 / 4: grad change along -eta g grows faster than linearly, so beta grows with the step.
    x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    found = landscape.along(lambda: (x**4).sum() / 4, [x], [torch.tensor([-0.1], dtype=torch.float64)], [1.0, 2.0])
    # grad = x^3: |1 - 0.9^3| / 0.1 and |1 - 0.8^3| / 0.2
    assert found["beta"].tolist() == pytest.approx([(1 - 0.9**3) / 0.1, (1 - 0.8**3) / 0.2], rel=1e-12)


# ------------------------------------------------------------------ ICS on a two-layer network, by hand

def test_ics_on_a_two_layer_linear_network_matches_the_hand_computation():
    torch.manual_seed(0)
    n, hidden, batch, lr = 4, 3, 5, 0.1
    net = nn.Sequential(nn.Linear(n, hidden, bias=False), nn.Linear(hidden, 1, bias=False)).double()
    xs = torch.randn(batch, n, dtype=torch.float64)
    t = torch.randn(batch, 1, dtype=torch.float64)
    loss_fn = lambda: 0.5 * ((net(xs) - t) ** 2).mean()  # noqa: E731

    # By hand: L = 1/(2B) sum_b (W2 W1 x_b - t_b)^2, r_b = W2 W1 x_b - t_b
    w1, w2 = net[0].weight.detach().clone(), net[1].weight.detach().clone()
    r = xs @ w1.T @ w2.T - t                                # (B, 1)
    g1 = (w2.T @ r.T @ xs) / batch                          # dL/dW1 = 1/B sum_b r_b W2^T x_b^T
    g2 = (r.T @ (xs @ w1.T)) / batch                        # dL/dW2 = 1/B sum_b r_b (W1 x_b)^T
    w1_new = w1 - lr * g1                                   # layer 1 after its SGD step
    r_new = xs @ w1_new.T @ w2.T - t
    g2_after = (r_new.T @ (xs @ w1_new.T)) / batch          # G': layer 2's gradient after layer 1 moved
    expected_l2 = float((g2 - g2_after).norm())
    expected_cos = float((g2 * g2_after).sum() / (g2.norm() * g2_after.norm()))

    layers = landscape.model_layers(net)
    assert [name for name, _ in layers] == ["fc1", "fc2"]
    loss = loss_fn()
    loss.backward()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    update = landscape.optimizer_update(opt, [p for _, ps in layers for p in ps])
    assert torch.allclose(update[0], -lr * g1) and torch.allclose(update[1], -lr * g2)
    found = landscape.covariate_shift(loss_fn, layers, [[update[0]], [update[1]]])
    assert [f[0] for f in found] == ["fc2"]
    _, l2, cos, gnorm = found[0]
    assert l2.item() == pytest.approx(expected_l2, rel=1e-10) and expected_l2 > 1e-4
    assert cos.item() == pytest.approx(expected_cos, rel=1e-10)
    assert gnorm.item() == pytest.approx(float(g2.norm()), rel=1e-10)
    assert torch.equal(net[0].weight.detach(), w1)  # weights put back


def test_model_layers_group_each_norm_with_its_layer():
    from bnctl.models import build_model
    cfg = config_mod.validate(tiny_raw())
    model = build_model(cfg.model, 10, (32, 32))
    layers = landscape.model_layers(model)
    assert [n for n, _ in layers] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert [len(ps) for _, ps in layers] == [4, 4, 4, 4, 2]  # weight, bias, gamma, beta (the last fc: no norm)
    assert sum(len(ps) for _, ps in layers) == len(list(model.parameters()))


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda ps: torch.optim.AdamW(ps, lr=0.01)])
def test_finding_the_update_leaves_the_optimizer_exactly_as_it_was(make):
    def run(peek: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        opt = make(list(net.parameters()))
        xs = torch.randn(8, 3)
        for step in range(3):
            opt.zero_grad()
            net(xs).pow(2).mean().backward()
            if peek:
                before = [p.detach().clone() for p in net.parameters()]
                update = landscape.optimizer_update(opt, list(net.parameters()))
            opt.step()
            if peek:  # the update found is the one the step then makes
                for p, b, u in zip(net.parameters(), before, update):
                    assert torch.equal(p.detach() - b, u)
        return [p.detach().clone() for p in net.parameters()] + [
            v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ics", [True, False])
def test_a_probe_costs_one_pass_here_one_per_step_size_and_one_per_layer_after_the_first(tmp_path, ics):
    from bnctl import models
    torch.manual_seed(0)
    model = models.build_model(config_mod.ModelConfig())  # seed_cnn: conv1..conv3, fc1, fc2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    settings = config_mod.LandscapeConfig(every=1, scales=(0.5, 1.0, 2.0), ics=ics)
    probe = landscape.LandscapeProbe(model, optimizer, settings, tmp_path / "l.csv")
    probe.start_step(0, 1)
    probe.after_backward(x, y)
    assert len(probe.layers) == 5
    assert len(passes) == 1 + 3 + (4 if ics else 0)  # docs/landscape.md's cost: 9 passes with the defaults


def test_landscape_settings_are_validated():
    cfg = config_mod.validate(tiny_raw())
    assert cfg.train.landscape.every == 0  # off by default
    for bad in ({"scales": []}, {"scales": [0.5, -1]}, {"every": -1}, {"direction": "sideways"}, {"each": 3}):
        with pytest.raises(ConfigError):
            config_mod.validate(tiny_raw(train={"landscape": bad}))


# ------------------------------------------------------------------ probes change nothing

def _run(tmp_path, name, every, epochs=2, resume=None, **model):
    raw = tiny_raw(data={"train_size": 192, "test_size": 32, "augment": "crop_flip"},
                   model={"dropout": 0.3, **model}, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
                   train={"epochs": epochs, "batch_size": 32, "landscape": {"every": every, "scales": [0.5, 2.0]}})
    cfg = config_mod.validate(raw)
    if resume is not None:
        return engine.fit(cfg, resume=resume).run_dir
    return engine.fit(cfg, run_dir=tmp_path / name).run_dir


def _metrics(run):
    return [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in rundir.read_csv(run / "metrics.csv")]


def _final_state(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


def _same_state(a, b, where="state"):
    """Equal, bit for bit, through nested dicts, lists and tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _strip_times(state):
    state = dict(state)
    state["history"] = [{k: v for k, v in r.items() if k not in TIME_COLUMNS} for r in state["history"]]
    state["scheduler"] = {k: v for k, v in state["scheduler"].items() if k != "_step_count"}  # resume bumps
    # this warning counter once (engine._restore re-takes the last scheduler step); the lr is unaffected
    state["config"] = {**state["config"], "train": {k: v for k, v in state["config"]["train"].items()
                                                    if k != "landscape"}}
    return state


@pytest.mark.slow
def test_probes_change_nothing_about_training_even_across_a_resume(tmp_path):
    off = _run(tmp_path, "off", every=0)
    on = _run(tmp_path, "on", every=3)
    assert _metrics(on) == _metrics(off)
    # Weights, BN running statistics, optimizer state and every RNG state, bit for bit.
    _same_state(_strip_times(_final_state(on)), _strip_times(_final_state(off)))
    rows = rundir.read_csv(on / rundir.LANDSCAPE_FILE)
    steps = sorted({r["step"] for r in rows})
    assert steps == list(range(0, 12, 3))  # 6 steps per epoch, 2 epochs
    _check_measures(rows)
    assert not (off / rundir.LANDSCAPE_FILE).exists()

    # Stopped after epoch 1 and resumed: the same metrics and the same landscape.csv, byte for byte.
    cut = _run(tmp_path, "cut", every=3, epochs=1)
    with open(cut / rundir.LANDSCAPE_FILE, "a") as f:
        f.write("999,2,conv1,,ics_")  # a kill mid-append leaves a cut line; resume drops it
    _run(tmp_path, "cut", every=3, epochs=2, resume=cut)
    assert _metrics(cut) == _metrics(off)
    assert (cut / rundir.LANDSCAPE_FILE).read_bytes() == (on / rundir.LANDSCAPE_FILE).read_bytes()
    _same_state(_strip_times(_final_state(cut)), _strip_times(_final_state(off)))


def _check_measures(rows):
    """landscape.csv holds every measure at every probe, consistently."""
    at0 = [r for r in rows if r["step"] == 0]
    per_scale = {(r["scale"], r["measure"]) for r in at0 if r["layer"] is None and r["scale"] is not None}
    assert per_scale == {(c, m) for c in (0.5, 2.0) for m in landscape.SCALE_MEASURES}
    summary = {r["measure"]: r["value"] for r in at0 if r["layer"] is None and r["scale"] is None}
    assert set(summary) == set(landscape.SUMMARY_MEASURES)
    losses = [r["value"] for r in at0 if r["measure"] == "loss" and r["scale"] is not None]
    assert summary["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert summary["lr"] == 0.05
    ics = {(r["layer"], r["measure"]) for r in at0 if r["layer"] is not None}
    assert ics == {(n, m) for n in ("conv2", "conv3", "fc1", "fc2") for m in landscape.LAYER_MEASURES}
    cos = [r["value"] for r in at0 if r["measure"] == "ics_cos"]
    assert all(-1 <= c <= 1 for c in cos)


# ------------------------------------------------------------------ figures from landscape.csv alone

def _write_landscape(run, rows):
    lines = [",".join(landscape.COLUMNS)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    (run / rundir.LANDSCAPE_FILE).write_text("\n".join(lines) + "\n")


def _fake_rows(shift=0.0):
    rows = []
    for step, epoch in ((0, 1), (10, 1), (20, 2)):
        losses = {0.5: 2.0 - step / 100 + shift, 2.0: 1.5 - step / 100 + shift}
        for c, loss in losses.items():
            rows += [(step, epoch, None, c, "loss", loss), (step, epoch, None, c, "grad_change", c),
                     (step, epoch, None, c, "beta", 3.0), (step, epoch, None, c, "curvature", 1.0)]
        rows += [(step, epoch, None, None, "loss_min", min(losses.values())),
                 (step, epoch, None, None, "loss_max", max(losses.values())),
                 (step, epoch, None, None, "loss_here", 2.1), (step, epoch, None, None, "beta_max", 3.0 + step)]
        for layer in ("conv2", "fc1"):
            rows += [(step, epoch, layer, None, "ics_l2", 0.1 * (1 + step)), (step, epoch, layer, None, "ics_cos", 0.9)]
    return rows


def test_landscape_figures_come_from_the_file_alone(tmp_path):
    from bnctl import landscape_plot
    run = tmp_path / "run"
    run.mkdir()
    _write_landscape(run, _fake_rows())
    with open(run / rundir.LANDSCAPE_FILE, "a") as f:
        f.write("30,2,fc1,,ics_")  # a cut last line is not a row
    data = landscape_plot.read(run)
    assert data["layers"] == ["conv2", "fc1"]
    assert data["per_scale"]["grad_change"][10] == [0.5, 2.0]
    assert data["summary"]["beta_max"] == {0: 3.0, 10: 13.0, 20: 23.0}
    assert data["ics"]["ics_l2"]["fc1"][20] == pytest.approx(2.1)
    assert 30 not in data["ics"]["ics_l2"]["fc1"]
    assert landscape_plot.plot_run(run) == run / "landscape.png" and (run / "landscape.png").stat().st_size > 10_000
    assert landscape_plot.read(tmp_path) is None and landscape_plot.plot_run(tmp_path) is None
    other = tmp_path / "other"
    other.mkdir()
    _write_landscape(other, _fake_rows(shift=0.5))
    out = landscape_plot.plot_compare([("bn", run), ("none", other), ("no file", tmp_path)], tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.stat().st_size > 10_000
    assert landscape_plot.plot_compare([("no file", tmp_path)], tmp_path / "d.png") is None


def test_a_comparison_figure_names_its_runs_even_when_only_one_has_a_landscape(tmp_path, monkeypatch):
    from bnctl import figstyle, landscape_plot
    run = tmp_path / "run"
    run.mkdir()
    _write_landscape(run, _fake_rows())
    texts = []

    def keep_texts(fig, out):  # what a reader of the figure sees, instead of a PNG
        texts.extend(t.get_text().replace("\n  ", " ").replace("\n", " ") for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        return out

    monkeypatch.setattr(figstyle, "save_figure", keep_texts)  # landscape_plot saves through figstyle
    landscape_plot.plot_compare([("probed-bn", run), ("plain-unprobed", tmp_path)], tmp_path / "c.png")
    assert "probed-bn" in texts  # which run the lone overlay is
    assert "plain-unprobed: no landscape.csv" in texts  # and which compared run drew nothing
    texts.clear()
    landscape_plot.plot_run(run)  # a single run's own figure needs no legend
    assert texts == []


def _fake_run(path, shift, norm):
    path.mkdir()
    _write_landscape(path, _fake_rows(shift))
    rows = [[str(e), "1.5", "40.0", "1.4", "45.0", "0.001", "1.0", "0.8", "0.2", "900"] for e in (1, 2)]
    (path / rundir.METRICS_FILE).write_text("\n".join([",".join(engine.METRIC_COLUMNS), *(",".join(r) for r in rows)])
                                            + "\n")
    (path / rundir.CONFIG_FILE).write_text(f"name: {path.name}\nmodel:\n  norm: {norm}\n")
    return path


def test_bnctl_compare_overlays_the_landscapes(tmp_path, cli):
    bn, plain = _fake_run(tmp_path / "bn", 0.0, "batch"), _fake_run(tmp_path / "plain", 0.5, "none")
    out = tmp_path / "figs" / "cmp.png"
    result = cli("compare", bn, plain, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "figs" / "cmp-landscape.png").stat().st_size > 10_000
    assert "cmp-landscape.png" in result.output.replace("\n", "")
    assert "landscape at matched training loss: not comparable (fewer than 5 probes in a run)" in result.output


def test_bnctl_compare_refuses_to_match_runs_that_probed_differently(tmp_path, cli):
    bn, plain = _fake_run(tmp_path / "bn", 0.0, "batch"), _fake_run(tmp_path / "plain", 0.5, "none")
    for run, direction in ((bn, "gradient"), (plain, "update")):
        with open(run / rundir.CONFIG_FILE, "a") as f:
            f.write(f"train:\n  landscape:\n    every: 10\n    direction: {direction}\n")
    result = cli("compare", bn, plain, "--out", tmp_path / "cmp.png")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert ("landscape at matched training loss: not comparable (the runs probed differently: "
            "train.landscape.direction gradient / update)") in out


def test_probe_settings_are_not_experiment_differences_but_the_landscape_figures_say_them(tmp_path, cli):
    from bnctl import comparison, landscape_plot

    a, b = _fake_run(tmp_path / "a", 0.0, "batch"), _fake_run(tmp_path / "b", 0.5, "batch")
    with open(b / rundir.CONFIG_FILE, "a") as f:  # b probed, a did not: the training is the same
        f.write("train:\n  landscape:\n    every: 25\n    direction: gradient\n    ics: false\n")
    runs = [comparison.load_run(a), comparison.load_run(b)]
    assert comparison.differing_keys(runs) == []  # compare's table lists no "every 0 / 25" difference
    assert landscape_plot.probe_settings(a) == ("probes every 0 steps along the optimizer's update, "
                                                "step sizes 0.5, 1, 2, 4x")
    assert landscape_plot.probe_settings(b) == ("probes every 25 steps along -lr x the batch gradient, "
                                                "step sizes 0.5, 1, 2, 4x, no ICS")
    result = cli("compare", a, b, "--out", tmp_path / "cmp.png")
    assert result.exit_code == 0, result.output
    assert "not comparable (the runs probed differently" in " ".join(result.output.split())
    assert (tmp_path / "cmp-landscape.png").is_file() and landscape_plot.plot_run(b).is_file()


def test_bnctl_plot_draws_the_landscape_without_torch(tmp_path):
    import subprocess
    import sys
    run = tmp_path / "run"
    run.mkdir()
    _write_landscape(run, _fake_rows())
    rows = [[str(e), "1.5", "40.0", "1.4", "45.0", "0.001", "1.0", "0.8", "0.2", "900"] for e in (1, 2)]
    (run / rundir.METRICS_FILE).write_text("\n".join([",".join(engine.METRIC_COLUMNS), *(",".join(r) for r in rows)])
                                           + "\n")
    code = ("import sys\nfrom bnctl.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "plot", str(run)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (run / "landscape.png").is_file()
    assert "torch" not in out.stdout.strip().splitlines()[-1].split()


def _series(losses, betas):
    return {"summary": {"loss_here": dict(enumerate(losses)), "beta_max": dict(enumerate(betas)),
                        "loss_range": dict(enumerate(betas)), "grad_change_max": dict(enumerate(betas))}}


def test_matched_loss_compares_runs_only_where_their_losses_overlap():
    from bnctl import landscape_plot
    # A learns from 2.3 to 1.0; B sits on its plateau at 2.3 and then descends to 1.8.
    a = _series([2.3 - 0.1 * i for i in range(14)], [10.0 + i for i in range(14)])
    b = _series([2.3] * 10 + [2.2, 2.1, 2.0, 1.9, 1.8] * 2, [1.0] * 20)
    m = landscape_plot.matched_loss(a, b, min_probes=3)
    # Window: the overlap of the central 10-90% loss ranges: A's [1.13, 2.17] and B's [1.89, 2.3].
    assert m["window"] == (pytest.approx(1.89), pytest.approx(2.17))
    assert m["n"] == (3, 6)  # A at 2.1, 2.0, 1.9; B twice each: B's plateau at 2.3 is left out
    assert m["medians"]["beta_max"] == (pytest.approx(13.0), 1.0)  # A's probes at those losses, not its later ones
    # B never leaves the plateau: no overlap with A's descent, so no comparison.
    c = _series([2.3] * 10, [1.0] * 10)
    a2 = _series([2.0 - 0.1 * i for i in range(10)], [5.0] * 10)
    assert landscape_plot.matched_loss(a2, c)["medians"] is None
    assert "do not overlap" in landscape_plot.matched_loss(a2, c)["reason"]
    few = landscape_plot.matched_loss(a, b, min_probes=4)
    assert few["medians"] is None and "fewer than 4" in few["reason"]


@pytest.mark.slow
def test_probes_leave_noisy_bn_noise_where_it_was(tmp_path):
    # noisy_batch draws its noise from torch's global generator at every step, as dropout does: a probe's
    # own passes (which draw noise too) must not move that generator.
    off = _run(tmp_path, "off", every=0, epochs=1, norm="noisy_batch")
    on = _run(tmp_path, "on", every=2, epochs=1, norm="noisy_batch")
    assert _metrics(on) == _metrics(off)
    _same_state(_strip_times(_final_state(on)), _strip_times(_final_state(off)))
