"""Properties over random inputs, where a rule is cleaner than a list of examples.

bnctl's BatchNorm against torch's over random shapes and settings, ghost BN's chunking
rule, the batching and one-image-batch rules, and the learning-rate schedules' shapes.
Derandomized (the same examples on every run) and small, so the suite stays fast and
deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnctl import config as config_mod, evaluation, optim
from bnctl.data import Batches, crop_flip
from bnctl.norms import GhostBatchNorm, ManualBatchNorm

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _shape(n: int, c: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    return (n, c, *spatial)


spatial_dims = st.one_of(st.just(()), st.tuples(st.integers(1, 3), st.integers(1, 4)))
momenta = st.one_of(st.none(), st.floats(0.01, 1.0))
epsilons = st.sampled_from([1e-5, 1e-3, 0.1, 1.0])


# ---------------------------------------------------------------- ManualBatchNorm == torch BatchNorm

@PROPERTY
@given(n=st.integers(2, 6), c=st.integers(1, 4), spatial=spatial_dims, momentum=momenta, eps=epsilons,
       affine=st.booleans(), track=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_manual_matches_torch_batchnorm(n, c, spatial, momentum, eps, affine, track, seed):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    ref = (nn.BatchNorm2d if spatial else nn.BatchNorm1d)(c, **kwargs).double()
    manual = ManualBatchNorm(c, **kwargs).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    manual.load_state_dict(ref.state_dict())
    for mode in ("train", "train", "train", "eval"):
        ref.train(mode == "train")
        manual.train(mode == "train")
        x = torch.randn(_shape(n, c, spatial), generator=g, dtype=torch.float64) * (1 + 3 * torch.rand(1, generator=g,
                                                                                                      dtype=torch.float64)) + 2.0
        upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x_ref, x_man = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref, y_man = ref(x_ref), manual(x_man)
        torch.testing.assert_close(y_man, y_ref, rtol=1e-9, atol=1e-9)
        (y_ref * upstream).sum().backward()
        (y_man * upstream).sum().backward()
        torch.testing.assert_close(x_man.grad, x_ref.grad, rtol=1e-7, atol=1e-8)
        for (name, p_ref), (_, p_man) in zip(ref.named_parameters(), manual.named_parameters()):
            torch.testing.assert_close(p_man.grad, p_ref.grad, rtol=1e-7, atol=1e-8, msg=name)
        s_ref, s_man = ref.state_dict(), manual.state_dict()
        assert s_man.keys() == s_ref.keys()
        for key in s_ref:
            torch.testing.assert_close(s_man[key], s_ref[key], rtol=1e-9, atol=1e-9, msg=key)


# ---------------------------------------------------------------- ghost BN's chunking rule

@PROPERTY
@given(n=st.integers(2, 13), virtual=st.integers(1, 6), c=st.integers(1, 3), spatial=spatial_dims,
       momentum=momenta, seed=st.integers(0, 2**16))
def test_ghost_normalizes_consecutive_virtual_batches_in_turn(n, virtual, c, spatial, momentum, seed):
    sizes = [min(virtual, n - s) for s in range(0, n, virtual)] if n > virtual else [n]
    per_channel = math.prod(spatial)
    if any(size * per_channel < 2 for size in sizes):  # a virtual batch with one value per channel has no variance
        return
    g = torch.Generator().manual_seed(seed)
    ghost = GhostBatchNorm(c, virtual, momentum=momentum).double()
    ref = nn.BatchNorm2d(c, momentum=momentum).double() if spatial else nn.BatchNorm1d(c, momentum=momentum).double()
    x = torch.randn(_shape(n, c, spatial), generator=g, dtype=torch.float64) * 3 + 1
    y = ghost(x)
    # Consecutive slices of `virtual` samples, the last one shorter, each standardized on its own.
    start, outputs = 0, []
    for size in sizes:
        chunk = x[start:start + size]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * len(spatial)
        mean, var = chunk.mean(dims).view(shape), chunk.var(dims, unbiased=False).view(shape)
        outputs.append((chunk - mean) / torch.sqrt(var + ghost.eps))
        ref(chunk)  # one running-estimate update per virtual batch, in order
        start += size
    torch.testing.assert_close(y, torch.cat(outputs), rtol=1e-9, atol=1e-9)
    assert ghost.num_batches_tracked.item() == len(sizes)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, ref.running_var, rtol=1e-9, atol=1e-12)
    # Eval mode: the whole batch with the running estimates, whatever its size.
    ghost.eval()
    ref.eval()
    torch.testing.assert_close(ghost(x), ref(x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- batching

@PROPERTY
@given(n=st.integers(1, 40), size=st.integers(1, 12), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batches_serve_each_image_once_in_batches_of_the_size(n, size, shuffle, drop_last, seed):
    x = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 3, 2, 2).to(torch.uint8)
    y = torch.arange(n)
    batches = Batches(x, y, size, device=CPU, mean=(0.0,) * 3, std=(1 / 255,) * 3, shuffle=shuffle,
                      drop_last=drop_last, generator=torch.Generator().manual_seed(seed))
    served = list(batches)
    assert len(served) == len(batches)
    sizes = [len(yb) for _, yb in served]
    seen = torch.cat([yb for _, yb in served]).tolist() if served else []
    for xb, yb in served:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 2, 2)
        assert torch.equal(xb[:, 0, 0, 0], yb.float())  # (x/255 - 0) / (1/255) = x: image and label stay paired
    assert len(set(seen)) == len(seen)  # no image twice
    if shuffle:
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        assert seen == expected[:len(seen)]
    else:
        assert seen == list(range(len(seen)))
    if drop_last:
        assert sizes == [size] * (n // size)
    else:
        assert sorted(seen) == list(range(n))  # every image, once
        assert all(s == size for s in sizes[:-1])
        if n > 1 and size > 1:
            assert 1 not in sizes  # a lone last image joins the batch before it
        last = n - size * (len(sizes) - 1)
        assert sizes[-1] == last and (last <= size or (last == size + 1 and n % size == 1))


@PROPERTY
@given(mean=st.tuples(*[st.floats(0.0, 1.0)] * 3), std=st.tuples(*[st.floats(0.05, 2.0)] * 3),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_batches_normalize_each_channel_by_its_mean_and_std(mean, std, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (5, 3, 3, 4), generator=g, dtype=torch.uint8)
    (xb, _), = Batches(x, torch.zeros(5, dtype=torch.long), 5, device=CPU, mean=mean, std=std,
                       channels_last=channels_last)
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(xb.double(), expected, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(n=st.integers(1, 6), h=st.integers(1, 6), w=st.integers(1, 6), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_crop_flip_shows_a_window_of_the_padded_image_maybe_mirrored(n, h, w, pad, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, 2, h, w), generator=g, dtype=torch.uint8)
    out = crop_flip(x, torch.Generator().manual_seed(seed), pad=pad)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(n):
        windows = [padded[i, :, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], win) or torch.equal(out[i], win.flip(-1)) for win in windows)


@PROPERTY
@given(n=st.integers(2, 30), size=st.integers(2, 9), world=st.integers(1, 3), shuffle=st.booleans(),
       augment=st.sampled_from(["none", "crop_flip"]), seed=st.integers(0, 2**16))
def test_ranks_together_serve_exactly_the_batches_of_one_process(n, size, world, shuffle, augment, seed):
    """Data parallel: rank r of W serves its contiguous share of every global batch, augmented as one process
    would augment the whole batch, so the ranks' shares side by side are the single process's batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 5, 5), generator=g, dtype=torch.uint8)
    y = torch.arange(n)

    def served(part):
        return list(Batches(x, y, size, device=CPU, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=shuffle,
                            augment=augment, generator=torch.Generator().manual_seed(seed), part=part))

    whole = served((0, 1))
    shares = [served((rank, world)) for rank in range(world)]
    assert all(len(share) == len(whole) for share in shares)
    for i, (xb, yb) in enumerate(whole):
        assert [len(share[i][1]) for share in shares] == [
            (r + 1) * len(yb) // world - r * len(yb) // world for r in range(world)]
        torch.testing.assert_close(torch.cat([share[i][0] for share in shares]), xb, rtol=0, atol=0)
        assert torch.equal(torch.cat([share[i][1] for share in shares]), yb)


@PROPERTY
@given(n=st.integers(2, 20), size=st.integers(2, 6), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_training_batches_are_crop_flipped_with_the_runs_generator(n, size, shuffle, seed):
    """augment="crop_flip": each batch is crop_flip of its raw images, drawn from the same generator
    right after the epoch's order, so a seed fixes every augmented batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(n)
    served = list(Batches(x, y, size, device=CPU, mean=(0.0,) * 3, std=(1 / 255,) * 3, shuffle=shuffle,
                          drop_last=True, augment="crop_flip", generator=torch.Generator().manual_seed(seed)))
    mirror = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=mirror) if shuffle else torch.arange(n)
    for i, (xb, yb) in enumerate(served):
        idx = order[i * size:(i + 1) * size]
        assert torch.equal(yb, y[idx])
        assert torch.equal(xb, crop_flip(x[idx], mirror).float())  # (x/255 - 0) / (1/255) = x


@PROPERTY
@given(n=st.integers(1, 8), pieces=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_crop_flip_of_a_slice_is_that_slice_of_the_whole_batch(n, pieces, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 2, 4, 6), generator=g, dtype=torch.uint8)
    whole = crop_flip(x, torch.Generator().manual_seed(seed))
    cuts = sorted({0, n, *torch.randint(0, n + 1, (pieces,), generator=g).tolist()})
    for start, end in zip(cuts, cuts[1:]):
        part = crop_flip(x[start:end], torch.Generator().manual_seed(seed), within=(start, n))
        assert torch.equal(part, whole[start:end])


# ---------------------------------------------------------------- one-image batches under --bn-mode batch

@pytest.mark.parametrize("virtual", [None, 2, 3, 5])
def test_one_image_batch_rule_predicts_what_bn_sees(virtual):
    """Every split of up to 30 images into batches of up to 10: the rule says "one image" exactly when
    some BN call gets one. Exhaustive, because the cases that differ are few (a lone last image,
    a virtual batch that leaves one over). virtual >= 2, as the config requires."""
    bn = nn.BatchNorm1d(2) if virtual is None else GhostBatchNorm(2, virtual)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2), bn)
    evaluation.set_bn_batch_mode(model)
    real = F.batch_norm
    seen: list[int] = []

    def spy(x, *args, **kwargs):
        seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(F, "batch_norm", spy)
        for n in range(1, 31):
            for size in range(1, 11):
                seen.clear()
                for xb, _ in Batches(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                                     size, device=CPU, mean=(0.5,) * 3, std=(0.5,) * 3):
                    try:
                        model(xb)
                    except ValueError:  # torch refuses one value per channel; the sizes seen are what matters
                        pass
                assert evaluation._one_image_batch(n, size, model) == (1 in seen), (n, size, seen)
                # Without splitting into virtual batches (eval mode's rule), only whole batches count.
                assert evaluation._one_image_batch(n, size, model, split_virtual=False) == (1 in _served_sizes(n, size))


def _served_sizes(n: int, size: int) -> list[int]:
    return [len(yb) for _, yb in Batches(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                                         size, device=CPU, mean=(0.5,) * 3, std=(0.5,) * 3)]


# ---------------------------------------------------------------- learning-rate schedules

def _cfg(name: str, *, epochs: int, lr: float = 0.1, **scheduler) -> config_mod.Config:
    from bnctl.normspec import SCHEDULER_KEYS

    read = {k: v for k, v in scheduler.items() if k in SCHEDULER_KEYS[name]}  # a key the schedule ignores is refused
    return config_mod.validate({"train": {"epochs": epochs}, "optimizer": {"name": "sgd", "lr": lr},
                                "scheduler": {"name": name, **read}})


def _curve(cfg: config_mod.Config, spe: int, extra: int = 0) -> list[float]:
    """The multiplier at every step of the run (and `extra` steps past its end)."""
    total = cfg.train.epochs * spe
    rule = optim.SCHEDULERS[cfg.scheduler.name]
    return [rule(t, total, spe, cfg) for t in range(total + 1 + extra)]


def _non_increasing(values: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


@PROPERTY
@given(epochs=st.integers(1, 6), spe=st.integers(1, 9), lr=st.floats(1e-3, 1.0),
       floor=st.floats(0.0, 1.0))
def test_cosine_falls_from_lr_to_min_lr_and_stays(epochs, spe, lr, floor):
    cfg = _cfg("cosine", epochs=epochs, lr=lr, min_lr=floor * lr)
    curve = _curve(cfg, spe, extra=5)
    total = epochs * spe
    assert curve[0] == pytest.approx(1.0)
    assert curve[total] == pytest.approx(floor, abs=1e-12)
    assert _non_increasing(curve)
    assert curve[total:] == [curve[total]] * 6  # extended past the end: stays at the floor
    if total >= 2 and total % 2 == 0:  # halfway: halfway between lr and min_lr
        assert curve[total // 2] == pytest.approx((1 + floor) / 2)


@PROPERTY
@given(epochs=st.integers(1, 6), spe=st.integers(1, 9), warmup=st.floats(0.01, 0.99))
def test_onecycle_warms_up_linearly_then_anneals(epochs, spe, warmup):
    cfg = _cfg("onecycle", epochs=epochs, warmup_pct=warmup)
    curve = _curve(cfg, spe, extra=3)
    total = epochs * spe
    warm = max(1, int(warmup * total))
    assert curve[0] == pytest.approx(1 / 25)
    if warm < total:
        assert curve[warm] == pytest.approx(1.0)  # the peak lr, reached after the warm-up
        assert max(curve) == pytest.approx(1.0)
    rise = curve[:warm + 1]
    steps = [b - a for a, b in zip(rise, rise[1:])]
    assert all(s == pytest.approx((1 - 1 / 25) / warm) for s in steps)  # linear warm-up
    assert _non_increasing(curve[warm:])
    if warm < total:  # (a one-step run has only its warm-up step)
        assert curve[total] == pytest.approx(1e-4)
        assert all(v == pytest.approx(1e-4) for v in curve[total:])


@pytest.mark.parametrize("total", [50, 37, 100, 1000])
def test_onecycle_reaches_exactly_the_peak_lr_when_the_warm_up_ends(total):
    """The step where warm-up ends is the anneal's first, at exactly lr (the warm-up line would reach it
    only to within rounding, e.g. 0.9999999999999999 with 15 warm-up steps)."""
    cfg = _cfg("onecycle", epochs=total, warmup_pct=0.3)
    warm = max(1, int(0.3 * total))
    assert optim.SCHEDULERS["onecycle"](warm, total, 1, cfg) == 1.0


@PROPERTY
@given(epochs=st.integers(1, 8), spe=st.integers(1, 6), step_size=st.integers(1, 4), gamma=st.floats(0.05, 1.0))
def test_step_decays_by_gamma_every_step_size_epochs(epochs, spe, step_size, gamma):
    cfg = _cfg("step", epochs=epochs, step_size=step_size, gamma=gamma)
    curve = _curve(cfg, spe)
    for t, value in enumerate(curve):
        epoch = t // spe  # completed epochs at step t
        assert value == pytest.approx(gamma ** (epoch // step_size))


@settings(PROPERTY, max_examples=12)
@given(name=st.sampled_from(sorted(optim.SCHEDULERS)), epochs=st.integers(1, 4), spe=st.integers(1, 5),
       lr=st.floats(1e-3, 1.0))
def test_the_optimizer_gets_lr_times_the_schedule_at_every_step(name, epochs, spe, lr):
    cfg = _cfg(name, epochs=epochs, lr=lr, step_size=1, gamma=0.5, min_lr=lr / 10)
    model = nn.Linear(2, 1)
    opt = optim.make_optimizer(model, cfg.optimizer, CPU)
    sched = optim.make_scheduler(opt, cfg, spe)
    expected = _curve(cfg, spe)
    for t in range(epochs * spe):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * expected[t]), t
        opt.step()
        sched.step()
