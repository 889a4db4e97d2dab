"""Each number bnctl reports is what its name says: per-class accuracy is recall, and every
BN diagnostic equals an independent computation on the same batch.

These pin meaning, not just plumbing: a transposed confusion matrix or a variance recorded
as a standard deviation leaves every shape and range check green, and fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnctl import checkpoint, config as config_mod, engine, evaluation, plotting, rundir
from bnctl.data import Batches
from bnctl.diagnostics import BNProbe
from bnctl.errors import CheckpointError, DataError
from bnctl.experiment import Precision, setup
from conftest import tiny_raw


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- confusion matrix and per-class accuracy

# Rows are true classes, columns predicted ones. Row and column sums differ for every class,
# so recall (row-normalized diagonal) and precision (column-normalized) differ too.
CONFUSION = [[4, 0, 0],
             [2, 1, 1],
             [0, 0, 2]]
RECALL = [100.0, 25.0, 100.0]
PRECISION = [100.0 * 4 / 6, 100.0, 100.0 * 2 / 3]


def _predictions(confusion: list[list[int]]) -> tuple[list[int], list[int]]:
    """(true labels, predicted labels) realizing a confusion matrix, in a shuffled order."""
    pairs = [(t, p) for t, row in enumerate(confusion) for p, count in enumerate(row) for _ in range(count)]
    order = np.random.default_rng(0).permutation(len(pairs))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


class _Oracle(nn.Module):
    """Predicts the class written into each image's first pixel (images normalized as x / 255)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = torch.round(x[:, 0, 0, 0] * 255).long()
        return F.one_hot(pred, self.num_classes).float() * 5.0


def test_the_example_separates_recall_from_precision():
    assert RECALL != PRECISION  # otherwise the tests below could not tell the two apart


def test_evaluate_confusion_rows_are_true_classes():
    y, pred = _predictions(CONFUSION)
    x = torch.zeros(len(y), 3, 2, 2, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(pred, dtype=torch.uint8)
    # Batches of 4 over 10 images: the matrix must be summed over batches, not taken from the last one.
    batches = Batches(x, torch.tensor(y), 4, device=torch.device("cpu"), mean=(0.0,) * 3, std=(1.0,) * 3)
    out = engine.evaluate(_Oracle(3), batches, Precision(torch.device("cpu")), num_classes=3)
    assert out["confusion"] == CONFUSION
    assert all(type(count) is int for row in out["confusion"] for count in row)  # counts, written as 3 not 3.0
    assert out["acc"] == pytest.approx(100.0 * 7 / 10)
    assert out["images"] == 10


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    """A checkpoint of a freshly initialized seed_cnn: its predictions are lopsided, so recall != precision."""
    cfg = config_mod.validate(tiny_raw(data={"train_size": 64, "test_size": 200}, seed=3))
    exp = setup(cfg)
    path = tmp_path_factory.mktemp("untrained") / "init.pt"
    checkpoint.save(path, {"epoch": 0, "model": exp.model.state_dict(), "config": config_mod.to_dict(cfg)})
    return path, exp


def test_evaluate_accumulates_the_loss_exactly_over_many_batches():
    """The mean test loss is the sum of every batch's loss over the image count, accumulated in
    float64 on the CPU: a float32 running sum drifts by about 1e-7 per addition over thousands of batches."""
    import math

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3000, 3, 2, 2), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 4, (3000,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    batches = Batches(x, y, 3, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        per_batch = [F.cross_entropy(model(xb), yb, reduction="sum").item() for xb, yb in batches]
    out = engine.evaluate(model, batches, Precision(torch.device("cpu")))
    assert out["images"] == 3000 and len(per_batch) == 1000
    assert out["loss"] == pytest.approx(math.fsum(per_batch) / 3000, rel=1e-12)


def test_per_class_accuracy_is_recall(untrained_checkpoint):
    path, exp = untrained_checkpoint
    result = evaluation.evaluate_checkpoint(path)
    # Independently: predictions of the same weights on the test images, normalized by hand.
    model = copy.deepcopy(exp.model).eval()
    mean = torch.tensor(exp.cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(exp.cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((exp.data.test_x.float() / 255 - mean) / std)
    pred, true = logits.argmax(1).numpy(), exp.data.test_y.numpy()
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, exp.data.test_y).item(), rel=1e-5)
    assert {k: result[k] for k in ("checkpoint", "epoch", "bn_mode", "batch_size", "bn_layers", "classes",
                                   "device", "images")} == {
        "checkpoint": str(path), "epoch": 0, "bn_mode": "running", "batch_size": 128,
        "bn_layers": 4, "classes": exp.data.classes, "device": "cpu", "images": 200}
    k = len(exp.data.classes)
    recall = [100.0 * np.mean(pred[true == c] == c) for c in range(k)]
    precision = [100.0 * np.mean(true[pred == c] == c) if (pred == c).any() else 0.0 for c in range(k)]
    assert not np.allclose(recall, precision)  # the check below can tell the two apart
    assert list(result["per_class_acc"]) == exp.data.classes
    assert list(result["per_class_acc"].values()) == pytest.approx(recall)
    confusion = np.array(result["confusion"])
    assert confusion.sum(1).tolist() == np.bincount(true, minlength=k).tolist()  # rows: true classes
    assert confusion.sum(0).tolist() == np.bincount(pred, minlength=k).tolist()  # columns: predictions
    assert result["acc"] == pytest.approx(100.0 * np.mean(pred == true))


def test_evaluate_checkpoint_options_reach_the_result(untrained_checkpoint, tmp_path):
    path, exp = untrained_checkpoint  # 64 training images, seed 3
    assert evaluation.evaluate_checkpoint(path, bn_mode="batch")["order_seed"] == 3  # the run's seed by default
    assert evaluation.evaluate_checkpoint(path, bn_mode="batch", order_seed=11)["order_seed"] == 11
    assert evaluation.evaluate_checkpoint(path)["order_seed"] is None  # running statistics: order cannot matter
    two = evaluation.evaluate_checkpoint(path, recalibrate=8, recalibrate_batch_size=2)  # the smallest BN batch
    assert two["recalibration"]["batch_size"] == 2 and two["recalibration"]["images"] == 8
    whole = evaluation.evaluate_checkpoint(path, recalibrate=64, recalibrate_batch_size=64)  # one whole batch
    assert whole["recalibration"] == {**whole["recalibration"], "batch_size": 64, "images": 64}
    # Per-class accuracy is each confusion row's diagonal share, also for a class with a single test image.
    cfg = config_mod.validate(tiny_raw(data={"train_size": 16, "test_size": 11}, seed=3))
    small = tmp_path / "small.pt"
    checkpoint.save(small, {"epoch": 0, "model": setup(cfg).model.state_dict(), "config": config_mod.to_dict(cfg)})
    result = evaluation.evaluate_checkpoint(small)
    rows = result["confusion"]
    assert 1 in [sum(row) for row in rows]
    assert result["per_class_acc"] == {c: 100.0 * rows[i][i] / sum(rows[i]) for i, c in enumerate(result["classes"])}


def _checkpoint(path, raw: dict, **extra) -> Path:
    cfg = config_mod.validate(raw)
    checkpoint.save(path, {"epoch": 0, "model": setup(cfg).model.state_dict(), "config": config_mod.to_dict(cfg),
                           **extra})
    return path


def test_evaluate_checkpoint_refusals_name_the_checkpoint_and_the_reason(tmp_path):
    small = {"train_size": 16, "test_size": 11}
    # Ghost BN with virtual batches of 4: 11 test images in one batch split 4+4+3, fine; batches of 9
    # leave 9 = 4+4+1, a virtual batch of one image, which --bn-mode batch cannot normalize.
    ghost = _checkpoint(tmp_path / "ghost.pt", tiny_raw(data=small, model={"norm": "ghost", "virtual_batch_size": 4}))
    assert evaluation.evaluate_checkpoint(ghost, bn_mode="batch", batch_size=11)["images"] == 11
    with pytest.raises(config_mod.ConfigError) as err:
        evaluation.evaluate_checkpoint(ghost, bn_mode="batch", batch_size=9)
    assert str(err.value).startswith("bn_mode 'batch' normalizes each test batch with its own statistics")
    untracked = _checkpoint(tmp_path / "untracked.pt", tiny_raw(data=small, model={"bn_track_running_stats": False}))
    with pytest.raises(config_mod.ConfigError) as err:
        evaluation.evaluate_checkpoint(untracked, batch_size=1)  # batches of one image: no statistics
    assert str(err.value).startswith("this model keeps no running statistics (model.bn_track_running_stats=false), "
                                     "so eval mode normalizes each test batch with its own statistics")
    # Without running statistics eval mode normalizes whole batches (no virtual split): 9 images are fine.
    ghost_untracked = _checkpoint(tmp_path / "ghost_untracked.pt", tiny_raw(
        data=small, model={"norm": "ghost", "virtual_batch_size": 4, "bn_track_running_stats": False}))
    assert evaluation.evaluate_checkpoint(ghost_untracked, batch_size=9)["images"] == 11
    # A training batch of 2 is the default recalibration batch (the smallest BN can normalize).
    pairs = _checkpoint(tmp_path / "pairs.pt", tiny_raw(data=small, train={"batch_size": 2}))
    assert evaluation.evaluate_checkpoint(pairs, recalibrate=4)["recalibration"]["batch_size"] == 2
    # What a checkpoint carries is named with its path when it cannot be used.
    renamed = _checkpoint(tmp_path / "renamed.pt", tiny_raw(data=small), classes=["a", "b"])
    with pytest.raises(DataError, match=f"^{renamed} was trained on classes"):
        evaluation.evaluate_checkpoint(renamed)
    state = checkpoint.load(pairs)
    checkpoint.save(tmp_path / "other.pt", {**state, "model": {"fc.weight": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'other.pt'}"):
        evaluation.evaluate_checkpoint(tmp_path / "other.pt")
    state["config"]["train"]["epochs"] = 0
    checkpoint.save(tmp_path / "invalid.pt", state)
    with pytest.raises(config_mod.ConfigError, match=f"stored in {tmp_path / 'invalid.pt'}"):
        evaluation.evaluate_checkpoint(tmp_path / "invalid.pt")


def test_per_class_accuracy_of_a_class_with_one_test_image(untrained_checkpoint, monkeypatch):
    path, exp = untrained_checkpoint
    k = len(exp.data.classes)
    confusion = [[0] * k for _ in range(k)]
    confusion[0][0] = 1  # one image of class 0, predicted right
    confusion[1][1], confusion[1][2] = 1, 3  # four of class 1, one right
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: {"loss": 1.0, "acc": 40.0, "images": 5,
                                                                  "confusion": confusion})
    per_class = evaluation.evaluate_checkpoint(path)["per_class_acc"]
    assert per_class[exp.data.classes[0]] == 100.0 and per_class[exp.data.classes[1]] == 25.0
    assert per_class[exp.data.classes[2]] == 0.0  # no test images: 0, not a division by zero


def test_per_class_accuracy_with_batch_statistics_is_recall_too(untrained_checkpoint):
    path, exp = untrained_checkpoint
    result = evaluation.evaluate_checkpoint(path, bn_mode="batch", batch_size=50)
    confusion = np.array(result["confusion"])
    recall = 100.0 * np.diag(confusion) / np.maximum(1, confusion.sum(1))
    assert list(result["per_class_acc"].values()) == pytest.approx(recall.tolist())
    assert confusion.sum(1).tolist() == np.bincount(exp.data.test_y.numpy(), minlength=10).tolist()


def test_confusion_figure_puts_true_classes_on_rows_and_shows_recall(tmp_path, monkeypatch):
    eval_json = tmp_path / "eval.json"
    rundir.write_json(eval_json, {"classes": ["a", "b", "c"], "confusion": CONFUSION, "acc": 70.0,
                                  "epoch": 1, "bn_mode": "running"})
    drawn = {}
    real_save = plotting._save

    def keep(fig, path):
        ax = fig.axes[0]
        drawn["ylabel"], drawn["xlabel"] = ax.get_ylabel(), ax.get_xlabel()
        drawn["cells"] = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        drawn["image"] = np.asarray(ax.images[0].get_array())
        return real_save(fig, path)

    monkeypatch.setattr(plotting, "_save", keep)
    plotting.plot_confusion(eval_json)
    assert (drawn["ylabel"], drawn["xlabel"]) == ("true class", "predicted class")
    # imshow row i is true class i; its diagonal cell shows that class's recall.
    assert np.diag(drawn["image"]).tolist() == pytest.approx(RECALL)
    assert [drawn["cells"][i, i] for i in range(3)] == [f"{r:.0f}" for r in RECALL]
    assert drawn["cells"][1, 0] == "50"  # 2 of the 4 images of class b were called a
    assert (0, 1) not in drawn["cells"]  # an empty cell is left blank
    assert (tmp_path / "confusion.png").is_file()


# ---------------------------------------------------------------- BN diagnostics


class _Net(nn.Module):
    """conv -> BN -> ReLU -> fc -> BN -> ReLU -> classifier, the shape diagnostics pair up."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4, momentum=0.3)
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.bn1 = nn.BatchNorm1d(6, momentum=0.2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn2(self.conv(x)))
        return self.head(F.relu(self.bn1(self.fc(h.flatten(1)))))


def _randomize(net: _Net, gen: torch.Generator) -> None:
    """Give every parameter and running statistic a value no default shares."""
    with torch.no_grad():
        for bn in (net.bn2, net.bn1):
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=gen))
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


class _FakeScaler:
    """fp16's GradScaler as the probe sees it: gradients arrive multiplied by the scale."""

    def __init__(self, scale: float):
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


def _bn_reference(h: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 BN by its formula: (output, new running mean, new running var)."""
    dims = [0] + list(range(2, h.dim()))
    shape = [1, -1] + [1] * (h.dim() - 2)
    mean, var = h.mean(dims), h.var(dims, unbiased=False)
    m = h.numel() // h.shape[1]
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    out = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * gamma.view(shape) + beta.view(shape)
    run_mean = (1 - bn.momentum) * bn.running_mean.double() + bn.momentum * mean
    run_var = (1 - bn.momentum) * bn.running_var.double() + bn.momentum * var * m / (m - 1)
    return out, run_mean, run_var


def _std(t: torch.Tensor) -> float:
    return float(np.std(t.detach().numpy(), ddof=1))  # the sample std over every value of the tensor


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_every_diagnostic_equals_an_independent_computation(tmp_path, scale):
    gen = torch.Generator().manual_seed(7)
    net = _Net()
    _randomize(net, gen)
    x = torch.randn(8, 3, 5, 5, generator=gen) * 2 + 0.5
    y = torch.randint(0, 3, (8,), generator=gen)

    # The reference, in float64 on a copy, computed before the probed step changes anything.
    ref = copy.deepcopy(net).double()
    xd = x.double()
    h_conv = F.conv2d(xd, ref.conv.weight, ref.conv.bias, padding=1)
    out_conv, rm_conv, rv_conv = _bn_reference(h_conv, ref.bn2)
    h_fc = F.linear(F.relu(out_conv).flatten(1), ref.fc.weight, ref.fc.bias)
    out_fc, rm_fc, rv_fc = _bn_reference(h_fc, ref.bn1)
    loss = F.cross_entropy(ref.head(F.relu(out_fc)), y)
    g_conv, g_fc = torch.autograd.grad(loss, [ref.conv.weight, ref.fc.weight])
    expected = {}
    for name, layer, h, out, rm, rv, bn, g in (("conv1", ref.conv, h_conv, out_conv, rm_conv, rv_conv, ref.bn2, g_conv),
                                              ("fc1", ref.fc, h_fc, out_fc, rm_fc, rv_fc, ref.bn1, g_fc)):
        gamma = bn.weight.detach().numpy()
        expected[name] = {
            "input_mean": h.mean().item(), "input_std": _std(h),
            "output_mean": out.mean().item(), "output_std": _std(out),
            "running_mean_avg": rm.mean().item(), "running_var_avg": rv.mean().item(),
            "gamma_mean": float(gamma.mean()), "gamma_std": float(np.std(gamma, ddof=0)),
            "beta_mean": bn.bias.detach().mean().item(),
            "weight_norm": float(np.sqrt((layer.weight.detach().numpy() ** 2).sum())),
            "grad_norm": float(np.sqrt((g.numpy() ** 2).sum())),
        }

    probe = BNProbe(net, tmp_path / "diagnostics.csv", every=5,
                    scaler=_FakeScaler(scale) if scale else None)
    net.train()
    probe.start_step(10, 3)
    loss = F.cross_entropy(net(x), y)
    (loss * (scale or 1.0)).backward()  # what a GradScaler hands to backward
    probe.after_backward()
    recorded: dict[str, dict[str, float]] = {}
    for step, epoch, layer, stat, value in probe.rows:
        assert (step, epoch) == (10, 3)
        recorded.setdefault(layer, {})[stat] = value
    assert list(recorded) == ["conv1", "fc1"]  # the classifier has no norm after it and is not paired
    for layer, stats in expected.items():
        for stat, value in stats.items():
            assert recorded[layer][stat] == pytest.approx(value, rel=2e-5, abs=1e-6), (layer, stat)


def test_diagnostics_sample_only_every_nth_training_step(tmp_path):
    net = _Net()
    probe = BNProbe(net, tmp_path / "diagnostics.csv", every=3)
    probe.open()
    x, y = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 0])
    for step in range(7):
        probe.start_step(step, 1)
        net.train()
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            net.eval()
            net(x)  # an eval-mode forward in between records nothing
        probe.after_backward()
    assert sorted({row[0] for row in probe.rows}) == [0, 3, 6]
    per_step = len([r for r in probe.rows if r[0] == 0])
    assert per_step == len([r for r in probe.rows if r[0] == 3]) == 2 * 11  # 11 statistics of 2 pairs, once
    probe.close()
    assert len(rundir.read_csv(tmp_path / "diagnostics.csv")) == 3 * per_step


def test_dead_fraction_counts_channels_silent_for_every_sample():
    from bnctl.diagnostics import dead_fraction

    x = torch.randn(8, 4, 5, 5)
    x[:, 1] = -x[:, 1].abs()  # channel 1 never fires
    x[:, 3] = -1.0
    x[3, 3, 2, 2] = 0.5  # channel 3 fires once, for one sample at one position: alive
    assert dead_fraction(x).item() == pytest.approx(0.25)
    assert dead_fraction(torch.tensor([[-1.0, 2.0], [-3.0, -1.0]])).item() == pytest.approx(0.5)
    x[:, 0] = 0.0  # exactly 0 before the ReLU is 0 after it: dead too
    assert dead_fraction(x).item() == pytest.approx(0.5)


class _ReluNet(nn.Module):
    """conv -> GroupNorm -> nn.ReLU -> fc -> (no norm) -> nn.ReLU -> classifier: dead_frac at both pairs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.placeholder = nn.Identity()  # where model.norm=none leaves the norm out
        self.relu1 = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu2(self.gn(self.conv(x)))
        return self.head(self.relu1(self.placeholder(self.fc(h.flatten(1)))))


def test_dead_fraction_is_recorded_from_what_each_relu_receives(tmp_path):
    torch.manual_seed(0)
    net = _ReluNet()
    with torch.no_grad():
        net.gn.bias[1] = -100.0  # after the norm, channel 1 is negative everywhere: dead
        net.fc.bias[[0, 4]] = -1e3  # two hidden units never fire
    seen = {}
    for name, relu in (("conv1", net.relu2), ("fc1", net.relu1)):
        relu.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0].detach()))
    probe = BNProbe(net, tmp_path / "diagnostics.csv", every=1)
    net.train()
    probe.start_step(0, 1)
    F.cross_entropy(net(torch.randn(8, 3, 5, 5)), torch.randint(0, 3, (8,))).backward()
    probe.after_backward()
    recorded: dict[str, dict[str, float]] = {}
    for _, _, layer, stat, value in probe.rows:
        assert stat not in recorded.get(layer, {}), (layer, stat)  # each statistic once per layer and step
        recorded.setdefault(layer, {})[stat] = value
    for name, relu_input in seen.items():  # independently: units whose ReLU input is <= 0 for every sample
        fires = (relu_input > 0).flatten(2).any(-1) if relu_input.dim() == 4 else relu_input > 0
        assert recorded[name]["dead_frac"] == pytest.approx(1.0 - fires.any(0).float().mean().item())
    assert recorded["conv1"]["dead_frac"] == 0.25 and recorded["fc1"]["dead_frac"] == pytest.approx(2 / 6)
    # GroupNorm keeps no running statistics; without a norm there is no output, gamma or beta to record.
    assert set(recorded["conv1"]) == {"input_mean", "input_std", "output_mean", "output_std", "dead_frac",
                                      "gamma_mean", "gamma_std", "beta_mean", "weight_norm", "grad_norm"}
    assert set(recorded["fc1"]) == {"input_mean", "input_std", "dead_frac", "weight_norm", "grad_norm"}


def test_a_resumed_runs_probe_keeps_finished_epochs_and_sees_the_runs_scaler(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / rundir.DIAGNOSTICS_FILE
    rundir.CsvAppender(path, ["step", "epoch", "layer", "stat", "value"]).extend(
        [(0, 1, "conv1", "input_mean", 0.5), (4, 2, "conv1", "input_mean", 0.25), (8, 3, "conv1", "input_mean", 2.0)])
    scaler = _FakeScaler(8.0)
    exp = SimpleNamespace(model=_Net(), cfg=SimpleNamespace(train=SimpleNamespace(diagnostics_every=4)),
                          precision=SimpleNamespace(scaler=scaler))
    with open(path, "a") as f:
        f.write("9,,conv1,input_mean,1.0\n")  # a row without an epoch is nobody's: dropped
    probe = BNProbe.for_experiment(exp, tmp_path, 3)  # resuming at epoch 3: epoch 3's samples are redone
    assert probe.scaler is scaler and probe.every == 4 and probe.path == path
    probe.open()
    assert [(r["step"], r["epoch"]) for r in rundir.read_csv(path)] == [(0, 1), (4, 2)]
    BNProbe(exp.model, path, 4, keep_before_epoch=2).open()  # resuming at epoch 2 keeps epoch 1
    assert [(r["step"], r["epoch"]) for r in rundir.read_csv(path)] == [(0, 1)]
    BNProbe(exp.model, path, 4).open()  # a run from the start keeps nothing
    assert rundir.read_csv(path) == []
    missing = tmp_path / "elsewhere" / rundir.DIAGNOSTICS_FILE
    missing.parent.mkdir()
    BNProbe(exp.model, missing, 4, keep_before_epoch=3).open()  # resuming a run that had no diagnostics yet
    assert rundir.read_csv(missing) == []


def test_hooks_are_attached_only_for_sampled_steps():
    net = _Net()
    probe = BNProbe(net, Path("unused.csv"), every=2)

    def hooked():
        return sum(len(m._forward_hooks) for m in net.modules())

    probe.start_step(1, 1)
    assert hooked() == 0  # an unsampled step keeps torch's fast path
    probe.start_step(2, 1)
    assert hooked() == 4  # conv1 and fc1, each with its norm
    probe.start_step(3, 1)  # even when the sampled step never reached after_backward
    assert hooked() == 0 and not probe.active


def test_layer_pairs_pair_each_layer_with_the_norm_right_after_it():
    from bnctl.diagnostics import _followed_by_relu, layer_pairs

    conv1, conv2, conv3, bn, fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), \
        nn.Linear(4, 2)
    relu = nn.ReLU()
    # conv1 feeds a ReLU directly (no norm, no placeholder): not a pair, and later layers still pair up.
    net = nn.Sequential(conv1, relu, conv2, nn.Identity(), conv3, bn)
    assert [(n, layer, norm) for n, layer, norm in layer_pairs(net)] == [("conv2", conv2, None), ("conv3", conv3, bn)]
    assert layer_pairs(nn.Sequential(conv1, relu, fc)) == []  # the classifier, last of all, has nothing after it
    # dead_frac needs an nn.ReLU right after the norm (or the no-norm placeholder), wherever it sits in the model.
    for net, expected in ((nn.Sequential(conv2, bn, relu), {"conv1"}), (nn.Sequential(conv2, bn), set()),
                          (nn.Sequential(conv2, nn.Identity(), relu), {"conv1"}), (nn.Sequential(conv2, nn.Identity()), set())):
        assert _followed_by_relu(net, layer_pairs(net)) == expected


# ---------------------------------------------------------------- recalibration's sample


def test_recalibration_uses_whole_shuffled_training_batches_fixed_by_the_seed(tmp_path, monkeypatch):
    # 100 training images in batches of 32: whole batches give 96, the seed fixes which.
    cfg = config_mod.validate(tiny_raw(data={"train_size": 100, "test_size": 60}, seed=5))
    exp = setup(cfg)
    path = tmp_path / "init.pt"
    checkpoint.save(path, {"epoch": 0, "model": exp.model.state_dict(), "config": config_mod.to_dict(cfg)})
    seen = []
    real = evaluation.recalibrate_bn

    def spy(model, batches, num_images):
        seen.append([yb.tolist() for _, yb in batches])
        batches.generator.manual_seed(cfg.seed)  # hand the real pass the same order
        return real(model, batches, num_images)

    monkeypatch.setattr(evaluation, "recalibrate_bn", spy)
    result = evaluation.evaluate_checkpoint(path, recalibrate=100)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(cfg.seed))
    assert seen == [exp.data.train_y[order][:96].view(3, 32).tolist()]
    assert (result["recalibration"]["images"], result["recalibration"]["batch_size"]) == (96, 32)
    plain = evaluation.evaluate_checkpoint(path)
    assert (result["recalibration"]["before_acc"], result["recalibration"]["before_loss"]) == (plain["acc"], plain["loss"])
    assert result["loss"] != plain["loss"]  # the recalibrated statistics are the ones evaluated


def test_train_limit_subset_does_not_change_between_versions():
    """data.train_limit's subset is part of what a run trained on: resuming it, or recalibrating its
    checkpoint, must read the same images whatever the run's seed. The pinned indices make a change
    visible, in bnctl or in torch's seeded randperm, that would make an old run read other images."""
    from bnctl.config import DataConfig
    from bnctl.data import limit_indices, load_dataset

    torch.manual_seed(123)  # the run's own seed plays no part
    assert limit_indices(20, 6).tolist() == [4, 5, 13, 19, 7, 14]
    assert limit_indices(20, 20).sort().values.tolist() == list(range(20))
    full = load_dataset(DataConfig(train_size=40, test_size=10))
    limited = load_dataset(DataConfig(train_size=40, test_size=10, train_limit=12))
    keep = limit_indices(40, 12)
    assert torch.equal(limited.train_x, full.train_x[keep]) and torch.equal(limited.train_y, full.train_y[keep])
    assert torch.equal(limited.test_x, full.test_x)  # the test split is never limited
    same = load_dataset(DataConfig(train_size=40, test_size=10, train_limit=40))  # a limit of the whole split
    assert torch.equal(same.train_x, full.train_x) and torch.equal(same.train_y, full.train_y)
