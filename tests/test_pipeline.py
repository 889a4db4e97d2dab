"""Tests for the fast path: device batches, augmentation, precision and layout, threads, start-up imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bnctl import config as config_mod, engine, experiment, rundir
from bnctl.data import Batches, crop_flip
from bnctl.errors import DivergedError
from conftest import tiny_raw

CPU = torch.device("cpu")
TIMING_COLUMNS = {"epoch_time_s", "train_time_s", "eval_time_s", "images_per_s"}


def _images(n: int = 16, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    """Random uint8 images with no symmetry, so any shift or flip changes them."""
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _batches(x: torch.Tensor, batch_size: int, **kw) -> Batches:
    return Batches(x, torch.arange(len(x)), batch_size, device=CPU, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kw)


# ------------------------------------------------------------------ augmentation

def test_crop_flip_keeps_shape_and_is_fixed_by_the_seed():
    x = _images()
    out = crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, crop_flip(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, crop_flip(x, torch.Generator().manual_seed(2)))


def test_crop_flip_is_a_padded_crop_then_an_optional_mirror():
    x, pad = _images(n=32), 4
    out = crop_flip(x, torch.Generator().manual_seed(3), pad=pad)
    # Replay the generator's draws in crop_flip's order and build each image by hand.
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 2 * pad + 1, (32,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    h, w = x.shape[-2:]
    for i in range(32):
        expected = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected), i
    # The draws cover shifted crops, centred crops and both flip states, so the check above had teeth.
    shifted = (dy != pad) | (dx != pad)
    assert shifted.any() and (~shifted).any() and flip.any() and (~flip).any()
    assert not torch.equal(out[shifted.nonzero()[0, 0]], x[shifted.nonzero()[0, 0]])


def test_crop_flip_without_padding_only_mirrors():
    # With pad=0 the only crop is the centred one: each image comes back as itself or its mirror.
    x = _images(n=64)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()
    assert 10 < mirrored.sum() < 54  # about half are flipped


# ------------------------------------------------------------------ batching and normalization

@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_normalize_as_the_formula_says(channels_last):
    x = _images(n=6)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    b = Batches(x, torch.arange(6), 6, device=CPU, mean=mean, std=std, channels_last=channels_last)
    (xb, yb), = list(b)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert xb.dtype == torch.float32
    torch.testing.assert_close(xb, expected, rtol=1e-6, atol=1e-6)
    assert xb.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(yb, torch.arange(6))


def test_drop_last_drops_only_the_incomplete_batch():
    x = _images(n=10)
    kept = _batches(x, 4, drop_last=True, shuffle=True, generator=torch.Generator().manual_seed(0))
    sizes = [len(y) for _, y in kept]
    assert sizes == [4, 4] and len(kept) == 2
    labels = torch.cat([y for _, y in kept])
    assert len(set(labels.tolist())) == 8  # a permutation: no image twice
    assert [len(y) for _, y in _batches(x, 4)] == [4, 4, 2]


def test_a_lone_last_image_joins_the_previous_evaluation_batch():
    """BN with batch statistics cannot normalize one sample, so no evaluation batch has one."""
    batches = _batches(_images(n=9), 4)
    assert [len(y) for _, y in batches] == [4, 5] and len(batches) == 2
    assert torch.cat([y for _, y in batches]).tolist() == list(range(9))
    assert [len(y) for _, y in _batches(_images(n=1), 4)] == [1]


def test_shuffled_order_follows_the_generator_and_changes_each_epoch():
    x = _images(n=20)
    order = lambda b: torch.cat([y for _, y in b]).tolist()  # noqa: E731
    a = _batches(x, 5, shuffle=True, generator=torch.Generator().manual_seed(7))
    b = _batches(x, 5, shuffle=True, generator=torch.Generator().manual_seed(7))
    first = order(a)
    assert first == order(b)
    assert order(a) != first  # the second epoch draws a new permutation
    assert sorted(first) == list(range(20))


def test_augmented_batches_are_reproducible_under_a_seed():
    x = _images(n=12)
    epoch = lambda seed: [xb for xb, _ in _batches(x, 4, shuffle=True, augment="crop_flip",  # noqa: E731
                                                   generator=torch.Generator().manual_seed(seed))]
    one, again, other = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not all(torch.equal(a, b) for a, b in zip(one, other))


# ------------------------------------------------------------------ precision, layout, threads

def _experiment(train_size: int = 128, **train) -> experiment.Experiment:
    # Batch 8 keeps training on one thread, which stays fast even when other work shares the cores.
    raw = tiny_raw(data={"train_size": train_size, "test_size": 64}, train={"epochs": 1, "batch_size": 8, **train})
    return experiment.setup(config_mod.validate(raw))


def _one_epoch(exp: experiment.Experiment, probe=None) -> dict:
    return engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision,
                                  1, probe=probe)


def test_bf16_trains_on_cpu_with_float32_bn_statistics():
    exp = _experiment(precision="bf16")
    result = _one_epoch(exp)
    assert torch.isfinite(torch.tensor(result["train_loss"])) and result["images"] == 128
    bns = [m for m in exp.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    for bn in bns:
        assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == torch.float32
        assert bn.running_mean.abs().sum() > 0  # they moved from their zero start
    assert all(p.dtype == torch.float32 for p in exp.model.parameters())
    assert 0 <= engine.evaluate(exp.forward, exp.test_batches, exp.precision)["acc"] <= 100


@pytest.mark.slow
def test_channels_last_trains_like_the_default_layout():
    plain, nhwc = _experiment(channels_last=False), _experiment(channels_last=True)
    conv = next(m for m in nhwc.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = _one_epoch(plain), _one_epoch(nhwc)
    # Same seed and data: only the summation order inside the kernels differs.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert b["images"] == a["images"]


def test_evaluate_uses_running_statistics_and_leaves_them_alone():
    exp = _experiment()
    _one_epoch(exp)
    stats = {k: v.clone() for k, v in exp.model.state_dict().items() if "running" in k}
    test = exp.data.test_x, exp.data.test_y
    whole, pieces = (engine.evaluate(exp.forward, exp.batches(*test, size), exp.precision) for size in (64, 7))
    # In eval mode a prediction cannot depend on which other images share its batch.
    assert whole["acc"] == pieces["acc"]
    assert whole["loss"] == pytest.approx(pieces["loss"], rel=1e-5)
    assert all(torch.equal(v, exp.model.state_dict()[k]) for k, v in stats.items())
    assert exp.model.training  # back in train mode for the next epoch


class _ThreadProbe:
    """Records the intra-op thread count at every training step."""

    def __init__(self):
        self.threads: list[int] = []

    def start_step(self, step: int, epoch: int) -> None:
        self.threads.append(torch.get_num_threads())

    def after_backward(self, *args) -> None:
        pass


@pytest.mark.parametrize("batch_size, load, inside", [(4, 2.0, 1), (4, 1.0, 1), (4, 0.25, 2), (4, 0.1, 2),
                                                       (32, 2.0, 2), (32, 0.0, 2)])
def test_small_cpu_batches_take_one_thread_per_free_core(monkeypatch, batch_size, load, inside):
    """Below SMALL_CPU_BATCH: as many threads as the 2 cores leave free (at least 0.75 of a core each), else 1."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    images = max(16, 2 * batch_size)  # a few steps, each probed (the data's least is 10 images)
    exp = _experiment(train_size=images, batch_size=batch_size)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probe = _ThreadProbe()
        _one_epoch(exp, probe)
        assert len(probe.threads) == images // batch_size and set(probe.threads) == {inside}
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)


class _NanOnStep(nn.Module):
    """A linear classifier whose output turns to NaN on one chosen call."""

    def __init__(self, bad_call: int):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 10, 4)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls == self.bad_call else out


def test_non_finite_loss_stops_at_that_step_before_the_update():
    model = _NanOnStep(bad_call=3)
    batches = Batches(_images(n=20), torch.arange(20) % 4, 4, device=CPU, mean=(0.5,) * 3, std=(0.5,) * 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    weights = []
    model.fc.register_forward_pre_hook(lambda m, a: weights.append(m.weight.detach().clone()))
    with pytest.raises(DivergedError) as err:
        engine.train_one_epoch(model, batches, opt, sched, experiment.Precision(CPU), epoch=2)
    assert (err.value.epoch, err.value.step) == (2, 3)
    assert torch.isfinite(model.fc.weight).all()
    assert torch.equal(model.fc.weight, weights[-1])  # the NaN step never reached the optimizer


# ------------------------------------------------------------------ whole runs

def _fit_rows(tmp_path: Path, name: str, **sections) -> list[dict]:
    raw = tiny_raw(name=name, data={"train_size": 128, "test_size": 64, "augment": "crop_flip"}, **sections)
    raw["train"] = {**raw["train"], "batch_size": 8}
    result = engine.fit(config_mod.validate(raw), runs_root=tmp_path)
    rows = rundir.read_csv(result.run_dir / rundir.METRICS_FILE)
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_and_eval_train_only_adds_columns(tmp_path):
    first = _fit_rows(tmp_path, "a")
    assert len(first) == 2
    assert first == _fit_rows(tmp_path, "b")
    assert first != _fit_rows(tmp_path, "c", seed=1)
    with_clean = _fit_rows(tmp_path, "d", train={"eval_train": True})
    assert set(with_clean[0]) == set(first[0]) | {"clean_train_loss", "clean_train_acc"}
    assert all(0 <= row["clean_train_acc"] <= 100 and row["clean_train_loss"] > 0 for row in with_clean)
    # The extra eval-mode pass must not disturb training (BN statistics, random streams).
    assert [{k: r[k] for k in first[0]} for r in with_clean] == first


# ------------------------------------------------------------------ start-up imports

def _modules_after(argv: list[str]) -> set[str]:
    """Run the CLI in a fresh interpreter and return the modules it imported."""
    code = ("import sys\nfrom bnctl.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.strip().splitlines()[-1].split())  # the last line lists the modules


def test_help_does_not_import_torch():
    modules = _modules_after(["--help"])
    assert "bnctl.cli" in modules and "typer" in modules
    assert "torch" not in modules


@pytest.mark.slow
def test_plot_does_not_import_torch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    columns = engine.METRIC_COLUMNS
    rows = [[str(e), "1.5", "40.0", "1.4", "45.0", "0.001", "1.0", "0.8", "0.2", "900"] for e in (1, 2)]
    (run / rundir.METRICS_FILE).write_text("\n".join([",".join(columns), *(",".join(r) for r in rows)]) + "\n")
    modules = _modules_after(["plot", str(run)])
    assert (run / "curves.png").is_file()
    assert "matplotlib" in modules and "torch" not in modules


def test_crop_flip_pads_by_four_pixels_by_default():
    # Training batches call crop_flip without a pad: the standard CIFAR augmentation's 4 pixels.
    x = _images(n=64)
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(5)), crop_flip(x, torch.Generator().manual_seed(5), pad=4))
