"""Tests for the normalization registry and bnctl's own BatchNorm variants."""

from typing import get_args

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnctl.config import BATCH_STAT_NORMS, ModelConfig, NormName
from bnctl.errors import ConfigError
import copy

from bnctl import norms
from bnctl.norms import (NORMS, CumulativeBatchNorm1d, CumulativeBatchNorm2d, GhostBatchNorm, ManualBatchNorm,
                         is_norm, make_norm, uses_batch_stats)

C = 3  # channels in the comparison tests: small, but more than one


def _batch(dim: int, seed: int, n: int = 8, channels: int = C, dtype=torch.float64) -> torch.Tensor:
    """A deterministic input batch whose mean and scale change with the seed."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, channels, 4, 5) if dim == 2 else (n, channels)
    # Shifted and scaled so running statistics move visibly from their (0, 1) start.
    return torch.randn(shape, generator=g, dtype=dtype) * (1 + seed) + seed


def _step(module: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One forward/backward pass; returns the output, the input gradient and the parameter gradients."""
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    y = module(x)
    # A random upstream gradient: the gradient of y.sum() through BN is zero and would test nothing.
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + seed), dtype=y.dtype)
    (y * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return y.detach(), x.grad, grads


def _assert_same_step(ref: nn.Module, mod: nn.Module, x: torch.Tensor, seed: int, tol: float = 1e-10) -> None:
    """Both modules give the same output, gradients and state after one step on x."""
    y_ref, gx_ref, gp_ref = _step(ref, x, seed)
    y, gx, gp = _step(mod, x, seed)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=tol)
    assert gp.keys() == gp_ref.keys()
    for name in gp_ref:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=0, atol=tol)
    _assert_same_state(ref, mod, tol)


def _assert_same_state(ref: nn.Module, mod: nn.Module, tol: float = 1e-10) -> None:
    """Same state_dict keys and values (num_batches_tracked exactly)."""
    s_ref, s = ref.state_dict(), mod.state_dict()
    assert s.keys() == s_ref.keys()
    for key in s_ref:
        torch.testing.assert_close(s[key], s_ref[key], rtol=0, atol=tol)


def _torch_bn(dim: int, **kwargs) -> nn.Module:
    """torch's float64 BatchNorm for the given feature dim: the reference implementation."""
    return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(C, **kwargs).double()


def _randomize_affine(module: nn.Module) -> None:
    """Move gamma/beta away from (1, 0) so a missing or swapped affine step shows."""
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 1.5, module.num_features))
            module.bias.copy_(torch.linspace(-0.3, 0.4, module.num_features))


# ---------------------------------------------------------------- ManualBatchNorm


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dim", [1, 2])
def test_manual_batchnorm_matches_torch(dim, momentum, affine, track):
    kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track)
    ref = _torch_bn(dim, **kwargs)
    _randomize_affine(ref)
    manual = ManualBatchNorm(C, **kwargs).double()
    manual.load_state_dict(ref.state_dict())

    for step in range(3):
        _assert_same_step(ref, manual, _batch(dim, seed=step), seed=step)
    if track:
        assert manual.num_batches_tracked.item() == 3

    ref.eval()
    manual.eval()
    for step in range(3, 5):
        _assert_same_step(ref, manual, _batch(dim, seed=step), seed=step)


def test_manual_batchnorm_runtime_momentum_and_reset_like_torch():
    # Recalibration code switches momentum to None and resets the stats on a live module.
    ref, manual = _torch_bn(2), ManualBatchNorm(C).double()
    for step in range(2):
        _assert_same_step(ref, manual, _batch(2, seed=step), seed=step)
    for module in (ref, manual):
        module.reset_running_stats()
        module.momentum = None
    assert manual.num_batches_tracked.item() == 0
    for step in range(2, 5):
        _assert_same_step(ref, manual, _batch(2, seed=step), seed=step)


def test_manual_batchnorm_running_stats_stay_out_of_autograd():
    manual = ManualBatchNorm(C).double()
    x = _batch(2, seed=1).requires_grad_(True)
    manual(x).sum().backward()
    for name in ("running_mean", "running_var"):
        buf = getattr(manual, name)
        assert not buf.requires_grad and buf.grad_fn is None, name
    # In eval mode the running estimates are used as constants: no gradient reaches them.
    manual.eval()
    manual(x).sum().backward()
    assert manual.running_mean.grad is None and manual.running_var.grad is None


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dim", [1, 2])
def test_manual_batchnorm_state_dict_interchangeable_with_torch(dim, track):
    kwargs = dict(track_running_stats=track)
    # Manual -> torch: train ours, load into torch's (strict), and both agree in eval.
    manual, ref = ManualBatchNorm(C, **kwargs).double(), _torch_bn(dim, **kwargs)
    _randomize_affine(manual)
    for step in range(2):
        _step(manual, _batch(dim, seed=step), seed=step)
    ref.load_state_dict(manual.state_dict())
    _assert_same_state(manual, ref, tol=0)
    manual.eval()
    ref.eval()
    x = _batch(dim, seed=7)
    torch.testing.assert_close(manual(x), ref(x), rtol=0, atol=1e-10)

    # Torch -> manual.
    ref2, manual2 = _torch_bn(dim, **kwargs), ManualBatchNorm(C, **kwargs).double()
    _randomize_affine(ref2)
    for step in range(2):
        _step(ref2, _batch(dim, seed=step), seed=step)
    manual2.load_state_dict(ref2.state_dict())
    _assert_same_state(ref2, manual2, tol=0)
    ref2.eval()
    manual2.eval()
    torch.testing.assert_close(manual2(x), ref2(x), rtol=0, atol=1e-10)


def test_manual_batchnorm_bf16_keeps_float32_state():
    manual = ManualBatchNorm(C)
    x = _batch(2, seed=2, dtype=torch.float32).to(torch.bfloat16).requires_grad_(True)
    y = manual(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert manual.weight.grad.dtype == torch.float32
    for name in ("running_mean", "running_var"):
        assert getattr(manual, name).dtype == torch.float32, name

    # Statistics are computed in float32 from the bf16 values, so a float32 module fed
    # the same values upcast ends with the same running estimates.
    ref = ManualBatchNorm(C)
    y_ref = ref(x.detach().float())
    torch.testing.assert_close(manual.running_mean, ref.running_mean)
    torch.testing.assert_close(manual.running_var, ref.running_var)
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_manual_batchnorm_rejects_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ManualBatchNorm(C)(torch.randn(1, C))


# ---------------------------------------------------------------- GhostBatchNorm


@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dim", [1, 2])
def test_ghost_with_one_virtual_batch_equals_batchnorm(dim, momentum, extra):
    n = 8
    cfg = ModelConfig(norm="ghost", virtual_batch_size=n + extra, bn_momentum=momentum)
    ghost = make_norm(cfg, C, dim).double()
    ref = make_norm(cfg.model_copy(update={"norm": "batch"}), C, dim).double()
    _randomize_affine(ref)
    ghost.load_state_dict(ref.state_dict())
    for step in range(3):
        _assert_same_step(ref, ghost, _batch(dim, seed=step, n=n), seed=step)
    ref.eval()
    ghost.eval()
    _assert_same_step(ref, ghost, _batch(dim, seed=5, n=n), seed=5)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dim", [1, 2])
def test_ghost_normalizes_each_virtual_batch(dim, momentum):
    vbs, n = 4, 10  # virtual batches of 4, 4 and 2 samples
    ghost = GhostBatchNorm(C, vbs, momentum=momentum).double()
    ref = _torch_bn(dim, momentum=momentum)
    reduce_dims = [0, 2, 3] if dim == 2 else [0]

    for step in range(2):
        x = _batch(dim, seed=step, n=n)
        y, gx, gp = _step(ghost, x, seed=step)

        # gamma=1, beta=0 at init: each virtual batch comes out standardized per channel.
        for chunk in y.split(vbs):
            torch.testing.assert_close(chunk.mean(reduce_dims), torch.zeros(C, dtype=y.dtype), rtol=0, atol=1e-10)
            torch.testing.assert_close(chunk.std(reduce_dims, unbiased=False), torch.ones(C, dtype=y.dtype), atol=1e-3, rtol=0)
        full = F.batch_norm(x, None, None, training=True)
        assert (y - full).abs().max() > 1e-2, "ghost BN should differ from full-batch BN"

        # Reference: torch's BatchNorm applied to each virtual batch in turn.
        x_ref = x.clone().requires_grad_(True)
        ref.zero_grad()
        y_ref = torch.cat([ref(chunk) for chunk in x_ref.split(vbs)])
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1000 + step), dtype=y.dtype)
        (y_ref * upstream).sum().backward()
        torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(gx, x_ref.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(gp["weight"], ref.weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(gp["bias"], ref.bias.grad, rtol=0, atol=1e-10)
        _assert_same_state(ref, ghost)
    assert ghost.num_batches_tracked.item() == 6  # one update per virtual batch

    # Eval mode uses the running estimates on the whole batch, exactly like BatchNorm.
    ghost.eval()
    ref.eval()
    x = _batch(dim, seed=9, n=n)
    torch.testing.assert_close(ghost(x), ref(x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- registry


def test_registry_names_match_config():
    assert sorted(NORMS) == sorted(get_args(NormName))


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", sorted(NORMS))
def test_every_norm_builds_and_trains(name, dim):
    cfg = ModelConfig(norm=name, groups=4, virtual_batch_size=4)
    if name == "instance" and dim == 1:
        pytest.skip("instance norm at a fully connected layer is a ConfigError (tested below)")
    module = make_norm(cfg, 8, dim)
    assert is_norm(module) == (name != "none")
    assert uses_batch_stats(module) == (name in BATCH_STAT_NORMS)

    x = _batch(dim, seed=3, n=8, channels=8, dtype=torch.float32).requires_grad_(True)
    y = module(x)
    assert y.shape == x.shape
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["batch", "batch_manual", "ghost"])
@pytest.mark.parametrize("dim", [1, 2])
def test_batch_stat_norms_follow_the_config(name, dim):
    cfg = ModelConfig(norm=name, bn_momentum=None, bn_eps=1e-3, bn_affine=False, bn_track_running_stats=False)
    module = make_norm(cfg, 8, dim)
    assert module.momentum is None and module.eps == 1e-3
    assert module.weight is None and module.bias is None
    assert module.running_mean is None and module.running_var is None
    if name == "batch":  # the cumulative average's own subclass (see count_batch), torch's layer otherwise
        assert type(module) is (CumulativeBatchNorm2d if dim == 2 else CumulativeBatchNorm1d)
        assert isinstance(module, nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)
    module = make_norm(ModelConfig(norm=name, bn_momentum=0.3), 8, dim)
    if name == "batch":
        assert type(module) is (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)
    assert module.momentum == 0.3 and module.weight.shape == (8,) and module.running_var.shape == (8,)


@pytest.mark.parametrize("dim", [1, 2])
def test_layer_norm_normalizes_each_sample_over_all_features(dim):
    cfg = ModelConfig(norm="layer", bn_eps=1e-4)
    x = _batch(dim, seed=4, n=4, channels=6, dtype=torch.float32)
    y = make_norm(cfg, 6, dim)(x)
    torch.testing.assert_close(y, F.layer_norm(x, x.shape[1:], eps=1e-4))


def test_group_and_instance_norm_follow_the_config():
    cfg = ModelConfig(norm="group", groups=4, bn_eps=1e-3, bn_affine=False)
    group = make_norm(cfg, 8, 2)
    assert (group.num_groups, group.num_channels, group.eps, group.affine) == (4, 8, 1e-3, False)
    inst = make_norm(cfg.model_copy(update={"norm": "instance"}), 8, 2)
    assert isinstance(inst, nn.InstanceNorm2d)
    assert (inst.eps, inst.affine, inst.track_running_stats) == (1e-3, False, False)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", sorted(set(NORMS) - {"none"}))
def test_every_norm_takes_eps_and_affine_from_the_config(name, affine):
    """bn_eps and bn_affine reach every norm, whichever value the layer's own default has."""
    noise = {"bn_noise_mean": 0.0, "bn_noise_std": 0.0} if name == "noisy_batch" else {}  # noise off: plain BN
    cfg = ModelConfig(norm=name, bn_eps=0.25, bn_affine=affine, groups=2, **noise)
    module = make_norm(cfg, 4, 2)
    assert module.eps == 0.25
    assert (module.weight is not None, module.bias is not None) == (affine, affine)
    # eps is used, not just stored: a channel of constant 1s and 3s per sample has variance 1 everywhere it is
    # normalized (per channel, group, sample or instance), so the output is (x - mean) / sqrt(1 + eps).
    x = torch.tensor([1.0, 3.0]).repeat(2, 4, 2, 1)  # (N=2, C=4, H=2, W=2): columns alternate 1, 3
    with torch.no_grad():
        y = module.train()(x)
    torch.testing.assert_close(y, (x - 2.0) / (1.0 + 0.25) ** 0.5)


@pytest.mark.parametrize("groups, channels, suggestion", [(5, 16, 4), (32, 16, 16), (3, 10, 2)])
def test_group_norm_indivisible_channels_is_a_config_error(groups, channels, suggestion):
    with pytest.raises(ConfigError) as err:
        make_norm(ModelConfig(norm="group", groups=groups), channels, 2)
    msg = str(err.value)
    assert f"{channels} channels" in msg and f"model.groups={groups}" in msg
    assert f"model.groups={suggestion}" in msg
    divisors = ", ".join(str(d) for d in range(1, channels + 1) if channels % d == 0)
    assert f"(divisors of {channels}: {divisors})" in msg and "equal groups. Use" in msg  # a conv layer: no fc hint


def test_group_norm_error_at_a_fully_connected_layer_points_at_fc_norm():
    with pytest.raises(ConfigError) as err:
        make_norm(ModelConfig(norm="group", groups=4), 10, 1)
    assert "equal groups (this is a fully connected layer; model.fc_norm=false leaves it unnormalized). Use" \
        in str(err.value)


def test_instance_norm_at_fully_connected_layer_is_a_config_error():
    with pytest.raises(ConfigError, match="model.fc_norm=false") as err:
        make_norm(ModelConfig(norm="instance"), 8, 1)
    assert "single value per channel per sample" in str(err.value)


def test_unknown_norm_and_bad_dim():
    bogus = ModelConfig().model_copy(update={"norm": "bogus"})  # model_copy skips validation
    with pytest.raises(ConfigError) as err:
        make_norm(bogus, 8, 2)
    assert "bogus" in str(err.value) and all(name in str(err.value) for name in NORMS)
    with pytest.raises(ValueError, match="dim"):
        make_norm(ModelConfig(), 8, 3)


def test_is_norm_and_uses_batch_stats_reject_other_layers():
    for module in (nn.Identity(), nn.Conv2d(3, 3, 1), nn.Linear(3, 3), nn.ReLU()):
        assert not is_norm(module) and not uses_batch_stats(module)
    assert is_norm(nn.GroupNorm(1, 4)) and not uses_batch_stats(nn.GroupNorm(1, 4))


@pytest.mark.parametrize("name", ["batch", "batch_manual", "ghost"])
def test_recalibration_gives_the_cumulative_average(name):
    # The recalibration recipe other code uses: reset, momentum=None, forward batches in train mode.
    module = make_norm(ModelConfig(norm=name, virtual_batch_size=64), C, 2).double()
    for step in range(2):
        module(_batch(2, seed=step))
    assert uses_batch_stats(module)
    module.reset_running_stats()
    module.momentum = None
    module.train()
    batches = [_batch(2, seed=step) for step in range(2, 5)]
    with torch.no_grad():
        for x in batches:
            module(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    vars_ = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in batches])
    torch.testing.assert_close(module.running_mean, means.mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(module.running_var, vars_.mean(0), rtol=0, atol=1e-10)
    assert module.num_batches_tracked.item() == 3


# ---------------------------------------------------------------- edges found by mutation testing (docs/mutation.md)


@pytest.mark.parametrize("cls", [ManualBatchNorm, lambda c, **kw: GhostBatchNorm(c, 4, **kw)])
def test_layer_defaults_are_torchs(cls):
    ours, ref = cls(C), nn.BatchNorm2d(C)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == \
        (ref.eps, ref.momentum, ref.affine, ref.track_running_stats)


@pytest.mark.parametrize("shape", [(8, C + 1), (8, C + 1, 2, 2), (C,)])
def test_manual_batchnorm_rejects_the_wrong_channel_count(shape):
    with pytest.raises(ValueError, match=rf"expected input shaped \(N, {C}\)"):
        ManualBatchNorm(C)(torch.randn(shape))


def test_ghost_with_virtual_batches_of_one_normalizes_each_sample_alone():
    ghost = GhostBatchNorm(C, 1).double()
    x = _batch(2, seed=4, n=3)
    y = ghost(x)
    for i in range(3):  # each sample over its own H x W positions
        torch.testing.assert_close(y[i], F.batch_norm(x[i:i + 1], None, None, training=True)[0], rtol=0, atol=1e-10)
    assert ghost.num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        GhostBatchNorm(C, 0)


def test_untracked_statistics_are_none_attributes_like_torchs():
    ours, ref = ManualBatchNorm(C, track_running_stats=False), nn.BatchNorm2d(C, track_running_stats=False)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert getattr(ours, name) is None and getattr(ref, name) is None, name
    assert ours.state_dict().keys() == ref.state_dict().keys() == {"weight", "bias"}


def test_only_batch_norms_that_track_statistics_can_be_recalibrated():
    from bnctl.evaluation import _has_running_stats

    tracked = [nn.BatchNorm2d(3), ManualBatchNorm(3), GhostBatchNorm(3, 4)]
    untracked = [nn.BatchNorm2d(3, track_running_stats=False), ManualBatchNorm(3, track_running_stats=False),
                 GhostBatchNorm(3, 4, track_running_stats=False),
                 nn.InstanceNorm2d(3, track_running_stats=True),  # per-sample statistics: recalibration is BN's
                 nn.GroupNorm(1, 3), nn.Identity()]
    assert [_has_running_stats(m) for m in tracked] == [True] * 3
    assert [_has_running_stats(m) for m in untracked] == [False] * 6


def test_recalibration_measures_the_deployed_network_with_dropout_off():
    """Dropout before a BN layer: recalibrated statistics are those of eval-mode activations, not thinned ones."""
    from bnctl.data import Batches
    from bnctl.evaluation import recalibrate_bn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 3), nn.BatchNorm1d(3, momentum=0.3))
    x = torch.randint(0, 256, (16, 3, 2, 2), dtype=torch.uint8)
    batches = Batches(x, torch.zeros(16, dtype=torch.long), 8, device=torch.device("cpu"), mean=(0.5,) * 3,
                      std=(0.25,) * 3)
    assert recalibrate_bn(model, batches, 16) == 16
    with torch.no_grad():
        h = [model[2](xb.flatten(1)) for xb, _ in batches]  # the linear layer's output, nothing dropped
    torch.testing.assert_close(model[3].running_mean, torch.stack([b.mean(0) for b in h]).mean(0))
    torch.testing.assert_close(model[3].running_var, torch.stack([b.var(0) for b in h]).mean(0))
    assert not model.training and model[3].momentum == 0.3  # left in eval mode, its momentum restored


def test_ghost_without_running_statistics_normalizes_a_whole_eval_batch_at_once():
    """Eval mode has no running estimates to fall back on: the whole batch's statistics, no virtual split
    (which evaluation's one-image rule relies on: _one_image_batch(..., split_virtual=False))."""
    ghost = GhostBatchNorm(C, 4, track_running_stats=False, affine=False).double().eval()
    x = _batch(2, seed=5, n=10)
    torch.testing.assert_close(ghost(x), F.batch_norm(x, None, None, training=True, eps=ghost.eps))
    assert ghost(x[:9]).shape[0] == 9  # 4 + 4 + 1 would be a chunk of one image


@pytest.mark.parametrize("make", [lambda: CumulativeBatchNorm2d(3, momentum=None),
                                  lambda: ManualBatchNorm(3, momentum=None),
                                  lambda: GhostBatchNorm(3, 8, momentum=None)])
def test_cumulative_average_counts_on_the_host_and_equals_torchs(make, monkeypatch):
    """momentum=None without a device read per step (count_batch): torch's numbers (exactly, for torch's own
    layer; to float precision for the manual one), through load, reset and copy."""
    reads = []
    real_int = int
    monkeypatch.setattr(norms, "int", lambda t: reads.append(1) or real_int(t), raising=False)
    torch.manual_seed(0)
    xs = [torch.randn(8, 3, 4, 4) for _ in range(5)]
    ours, ref = make(), nn.BatchNorm2d(3, momentum=None)

    same = torch.equal if isinstance(ours, nn.BatchNorm2d) else (lambda a, b: torch.allclose(a, b, atol=1e-6))

    def run(a, b, n_reads):
        reads.clear()
        for x in xs:
            assert same(a(x), b(x))
        assert same(a.running_mean, b.running_mean) and same(a.running_var, b.running_var)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)
        assert len(reads) == n_reads  # once after an outside change, never per step

    run(ours, ref, 1)
    run(ours, ref, 0)
    ref.num_batches_tracked.fill_(41)
    ours.load_state_dict(ref.state_dict())  # the count changed behind the layer's back: read again, once
    run(ours, ref, 1)
    ours.reset_running_stats(), ref.reset_running_stats()
    run(ours, ref, 1)
    run(copy.deepcopy(ours), copy.deepcopy(ref), 1)


# ---------------------------------------------------------------- noisy BN (Santurkar et al. 2018, section 2.1)

def test_noisy_batch_norm_shifts_each_channel_by_fresh_noise_every_step():
    from bnctl.norms import NoisyBatchNorm
    torch.manual_seed(0)
    noisy = make_norm(ModelConfig(norm="noisy_batch", bn_noise_mean=0.5, bn_noise_std=1.0), 8, 2)
    plain = nn.BatchNorm2d(8)
    assert isinstance(noisy, NoisyBatchNorm) and uses_batch_stats(noisy)
    x = torch.randn(2, 8, 100, 100) * 3 + 1
    means, stds = [], []
    with torch.no_grad():
        for _ in range(40):  # one forward pass per training step
            noise = noisy(x) - plain(x)
            means.append(noise.mean(dim=(0, 2, 3)))
            stds.append(noise.std(dim=(0, 2, 3)))
    mu, sigma = torch.stack(means), torch.stack(stds)  # (steps, channels); 20,000 values per estimate
    # mu_c ~ U(-0.5, 0.5) and sigma_c ~ U(0, 1): inside the bounds, filling them, different at every step
    assert mu.abs().max() < 0.5 + 0.03 and mu.max() > 0.4 and mu.min() < -0.4
    assert sigma.max() < 1.0 + 0.03 and sigma.max() > 0.9 and sigma.min() < 0.1
    assert abs(mu.mean()) < 0.1 and abs(sigma.mean() - 0.5) < 0.1
    assert (mu[1:] - mu[:-1]).abs().min() > 0 and mu[0].std() > 0.1  # fresh each step, independent per channel
    # Running statistics are BN's own (of the input); eval mode adds nothing.
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    torch.testing.assert_close(noisy.running_var, plain.running_var)
    noisy.eval(), plain.eval()
    torch.testing.assert_close(noisy(x), plain(x), rtol=0, atol=0)
    assert set(noisy.state_dict()) == set(plain.state_dict())  # its checkpoints are BatchNorm's


def test_noisy_batch_norm_is_reproducible_and_its_settings_belong_to_it():
    from bnctl import config as C
    layer = make_norm(ModelConfig(norm="noisy_batch"), 4, 1)
    x = torch.randn(16, 4)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), a, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="does not apply to model.norm=batch .only to noisy_batch"):
        C.validate({"model": {"norm": "batch", "bn_noise_std": 2.0}})
    assert C.validate({"model": {"norm": "noisy_batch", "bn_noise_std": 2.0}}).model.bn_noise_std == 2.0
