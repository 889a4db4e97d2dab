"""The normalization layers a model can use, built by name from the model config.

``NORMS`` maps each ``model.norm`` name to a builder ``(cfg, num_features, dim)``
where ``dim=2`` means convolutional features (N, C, H, W) and ``dim=1`` fully
connected features (N, C). Models call :func:`make_norm` and never pick a layer
class themselves, so every norm is configured the same way everywhere. What each
norm is (batch statistics, synchronizable, the keys it reads) is bnctl/normspec.py's
table; the synchronized BN that data-parallel training swaps in lives here too.

Over 350 lines: every layer bnctl builds itself (manual, ghost, noisy and synchronized BN) is
written out beside the builders, so the BN variants share one running-statistics update.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from bnctl import normspec
from bnctl.config import ModelConfig
from bnctl.errors import ConfigError

NormBuilder = Callable[[ModelConfig, int, int], nn.Module]


def count_batch(module: nn.Module) -> int:
    """Add one to module.num_batches_tracked and return the new count, without reading the device per step.

    The cumulative average (momentum=None) weighs the k-th batch 1/k, and torch reads k back
    from the device for that in every BN layer at every step, which stalls a GPU. The count
    is kept on the host beside the buffer and trusted while the buffer's version counter shows
    that only this function changed it; after anything else (load_state_dict, reset, a copy)
    it is read once. The factor is then the same Python float torch computes.
    """
    tracked = module.num_batches_tracked
    known = module.__dict__.get("_host_count")
    tracked.add_(1)
    try:
        version = tracked._version
    except RuntimeError:  # an inference tensor has no version counter: read every time
        version = None
    if known is not None and version is not None and known[0] is tracked and known[1] == version - 1:
        count = known[2] + 1
    else:
        count = int(tracked)
    module.__dict__["_host_count"] = (tracked, version, count)  # plain attribute: not a buffer, not saved
    return count


class _HostCountedBatchNorm(_BatchNorm):
    """torch's BatchNorm whose cumulative average (momentum=None) takes its count from count_batch.

    With a momentum it is torch's layer unchanged; state_dicts and numbers are torch's either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.momentum is not None or not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        factor = 1.0 / count_batch(self)  # exactly torch's 1.0 / float(num_batches_tracked)
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                        True, factor, self.eps)


class CumulativeBatchNorm2d(_HostCountedBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d for bn_momentum=None without a per-step device read (see count_batch)."""


class CumulativeBatchNorm1d(_HostCountedBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d for bn_momentum=None without a per-step device read (see count_batch)."""


@torch.no_grad()
def update_running_stats(layer: nn.Module, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """Blend one batch's per-channel mean and unbiased variance into a BN layer's running estimates
    (PyTorch's momentum convention), as torch's BatchNorm does; bnctl's own BN layers all use this."""
    # momentum=None: cumulative average, the k-th batch weighted 1/k so all batches count equally.
    if layer.momentum is None:
        factor = 1.0 / count_batch(layer)  # counted on the host: no device read per layer per step
    else:
        layer.num_batches_tracked.add_(1)
        factor = layer.momentum
    # running = (1 - factor) * running + factor * batch, kept in the buffers' own dtype.
    layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean.dtype), alpha=factor)
    layer.running_var.mul_(1 - factor).add_(unbiased_var.to(layer.running_var.dtype), alpha=factor)


class ManualBatchNorm(nn.Module):
    """Batch normalization written out from scratch (Ioffe & Szegedy 2015, Algorithm 1).

    Behaves like torch's BatchNorm1d/2d and uses the same parameter and buffer
    names, so state_dicts load either way; it exists to show the math, not to be fast.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum  # PyTorch convention; None = cumulative average
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))  # gamma, the learned scale
            self.bias = nn.Parameter(torch.empty(num_features))  # beta, the learned shift
        else:
            # Registered as None, as torch does, so `module.weight` exists either way.
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Forget the running estimates: mean 0, variance 1, no batches seen."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running estimates and make the layer start as a pure normalization (gamma 1, beta 0)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize each channel of x, shaped (N, C) or (N, C, H, W)."""
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ManualBatchNorm expected input shaped (N, {self.num_features}) or "
                f"(N, {self.num_features}, H, W), got {tuple(x.shape)}"
            )
        # One mean and variance per channel: reduce over the batch and every spatial position.
        reduce_dims = [0, *range(2, x.dim())]
        # Per-channel vectors are viewed as (1, C, 1, 1) so they broadcast against x.
        channel_shape = [1, self.num_features] + [1] * (x.dim() - 2)
        # Sums of squares in bf16/fp16 lose too many digits: do the statistics in at least float32.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))

        # Same rule as torch: batch statistics in training, and in eval when nothing was tracked.
        if self.training or self.running_mean is None:
            m = xf.numel() // self.num_features  # values per channel in this mini-batch
            if m < 2:
                raise ValueError(
                    f"ManualBatchNorm needs more than 1 value per channel to estimate a variance, "
                    f"got input shaped {tuple(x.shape)}"
                )
            mean = xf.mean(dim=reduce_dims, keepdim=True)  # mu_B = 1/m * sum_i x_i
            var = ((xf - mean) ** 2).mean(dim=reduce_dims, keepdim=True)  # sigma^2_B = 1/m * sum_i (x_i - mu_B)^2
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.flatten(), var.flatten(), m)
        else:
            mean = self.running_mean.view(channel_shape).to(xf.dtype)
            var = self.running_var.view(channel_shape).to(xf.dtype)

        x_hat = (xf - mean) / torch.sqrt(var + self.eps)  # x_hat_i = (x_i - mu) / sqrt(sigma^2 + eps)
        y = x_hat
        if self.affine:
            y = self.weight.view(channel_shape) * x_hat + self.bias.view(channel_shape)  # y_i = gamma * x_hat_i + beta
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, biased_var: torch.Tensor, m: int) -> None:
        """Blend one mini-batch's statistics into the running estimates used in eval mode."""
        # Inference estimates the population variance, so it gets the unbiased m/(m-1) correction;
        # normalization above used the biased one, as the paper's Algorithm 1 does.
        update_running_stats(self, mean, biased_var * (m / (m - 1)))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class GhostBatchNorm(_HostCountedBatchNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): BatchNorm over small virtual batches.

    In training the batch is cut into consecutive virtual batches of
    ``virtual_batch_size`` samples (the last may be smaller), each normalized with
    its own statistics and folded into the running estimates in turn. Eval mode,
    and a batch no larger than one virtual batch, behave exactly like BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.virtual_batch_size = virtual_batch_size

    def _check_input_dim(self, x: torch.Tensor) -> None:
        # One class serves both conv (N, C, H, W) and fully connected (N, C) features.
        if x.dim() < 2:
            raise ValueError(f"GhostBatchNorm expected input shaped (N, C) or (N, C, H, W), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize x per virtual batch in training, like BatchNorm otherwise."""
        if not self.training or x.shape[0] <= self.virtual_batch_size:
            return super().forward(x)
        # BatchNorm's own training step on each chunk gives per-chunk statistics and
        # one running-estimate update per chunk, with the same momentum rules.
        outputs = []
        for chunk in x.split(self.virtual_batch_size):
            outputs.append(super().forward(chunk))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class NoisyBatchNorm(_HostCountedBatchNorm):
    """BatchNorm followed by noise that shifts every channel's distribution anew at each training step.

    Santurkar et al. 2018, section 2.1: if BN helped by keeping layer inputs' distributions stable,
    injecting a distribution shift right after it should hurt. In training, every forward pass (one
    per step) draws, for each channel c,

        mu_c    ~ Uniform(-noise_mean, noise_mean)      the noise's mean this step
        sigma_c ~ Uniform(0, noise_std)                  its standard deviation this step

    and adds i.i.d. noise n ~ Normal(mu_c, sigma_c^2) to every activation of channel c (each sample
    and position), after BN's scale and shift. A channel leaving BN with mean beta and variance
    gamma^2 so leaves with mean beta + mu_c and variance gamma^2 + sigma_c^2, both different every
    step. The draws come from torch's global generator (like dropout's), so a seeded run is
    reproducible. Running statistics are BN's own (of the input, before the noise); eval mode adds
    no noise and is plain BN.
    """

    def __init__(self, num_features: int, noise_mean: float, noise_std: float, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.noise_mean, self.noise_std = noise_mean, noise_std

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"NoisyBatchNorm expected input shaped (N, C) or (N, C, H, W), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training or (self.noise_mean == 0 and self.noise_std == 0):
            return y
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        u = torch.rand(2, self.num_features, device=y.device, dtype=torch.float32)
        mu = ((2 * u[0] - 1) * self.noise_mean).view(shape)
        sigma = (u[1] * self.noise_std).view(shape)
        return y + (mu + sigma * torch.randn(y.shape, device=y.device, dtype=torch.float32)).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_mean={self.noise_mean}, noise_std={self.noise_std}"

# ---------------------------------------------------------------- synchronized BN

class _SyncBNFunction(torch.autograd.Function):
    """Batch normalization with statistics over every rank's batch.

    Forward all-reduces each channel's count, sum and sum of squares; backward
    all-reduces the two gradient sums Σdy and Σdy·x̂ that the input gradient needs.
    Both reductions are done in float64.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group):  # noqa: D102
        import torch.distributed as td

        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)
        xd = x.to(torch.float64)
        stats = torch.cat([count, xd.sum(dims), (xd * xd).sum(dims)])
        td.all_reduce(stats, group=group)
        total, (s, sq) = stats[0], stats[1:].chunk(2)
        if x.device.type == "cpu":  # reading the count is free here; on a GPU it would stall every layer
            if total < 2:
                raise ValueError(f"synchronized BN needs more than 1 value per channel over all ranks, got {int(total)}")
        else:  # checked on the device, asynchronously: a failure surfaces at the next synchronization
            torch._assert_async(total >= 2, "synchronized BN needs more than 1 value per channel over all ranks")
        mean = s / total
        var = (sq / total - mean * mean).clamp_min(0)  # biased: what normalization uses
        invstd = torch.rsqrt(var + eps)
        ct = torch.promote_types(x.dtype, torch.float32)
        x_hat = (x.to(ct) - mean.to(ct).view(shape)) * invstd.to(ct).view(shape)
        y = x_hat * weight.to(ct).view(shape) + bias.to(ct).view(shape) if weight is not None else x_hat
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.total, ctx.group, ctx.dims, ctx.shape = total, group, dims, shape
        unbiased = var * (total / (total - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx, dy, _mean, _var):  # noqa: D102
        import torch.distributed as td

        x_hat, invstd, weight = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dyc = dy.to(x_hat.dtype)
        local = torch.cat([dyc.sum(dims, dtype=torch.float64), (dyc * x_hat).sum(dims, dtype=torch.float64)])
        # Every rank reduces, whatever it needs: the ranks' collectives must match one for one.
        sums = local.clone()
        td.all_reduce(sums, group=ctx.group)
        sum_dy, sum_dy_xhat = (sums / ctx.total).chunk(2)
        scale = invstd if weight is None else invstd * weight.to(torch.float64)
        ct = x_hat.dtype
        dx = (dyc - sum_dy.to(ct).view(shape) - x_hat * sum_dy_xhat.to(ct).view(shape)) * scale.to(ct).view(shape)
        # Parameter gradients stay local: DDP averages them over ranks like every other gradient.
        local_dy, local_dy_xhat = local.chunk(2)
        grad_w = local_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = local_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.to(dy.dtype), grad_w, grad_b, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a process group, on any device (bnctl's, for gloo/CPU).

    Same parameters, buffers and momentum rules as torch's BatchNorm (state_dicts load
    either way); running statistics are updated from the global batch's mean and
    unbiased variance. Eval mode needs no communication.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expected input shaped (N, C) or (N, C, H, W), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:  # running statistics (or, untracked, this batch's): nothing to share
            use_batch = self.running_mean is None
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            use_batch, 0.0, self.eps)
        y, mean, unbiased = _SyncBNFunction.apply(x, self.weight, self.bias, self.eps, self.group)
        if self.track_running_stats:
            with torch.no_grad():
                update_running_stats(self, mean, unbiased)
        return y


SYNC_TYPES = (SyncBatchNorm, nn.SyncBatchNorm)


# ---------------------------------------------------------------- builders

def _batch_stat_kwargs(cfg: ModelConfig) -> dict:
    """The BatchNorm settings shared by every batch-statistics norm."""
    return dict(
        eps=cfg.bn_eps,
        momentum=cfg.bn_momentum,
        affine=cfg.bn_affine,
        track_running_stats=cfg.bn_track_running_stats,
    )


def _batch(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """torch's BatchNorm2d for conv features, BatchNorm1d for fully connected ones."""
    if cfg.bn_momentum is None:  # the same layer, minus a device read per step (count_batch)
        cls = CumulativeBatchNorm2d if dim == 2 else CumulativeBatchNorm1d
    else:
        cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
    return cls(num_features, **_batch_stat_kwargs(cfg))


def _batch_manual(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """bnctl's from-scratch BatchNorm (the same for both dims)."""
    return ManualBatchNorm(num_features, **_batch_stat_kwargs(cfg))


def _ghost(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """Ghost BatchNorm over virtual batches of model.virtual_batch_size samples."""
    return GhostBatchNorm(num_features, cfg.virtual_batch_size, **_batch_stat_kwargs(cfg))


def _noisy_batch(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """BatchNorm with a per-step random shift of each channel's mean and variance (Santurkar et al.)."""
    return NoisyBatchNorm(num_features, cfg.bn_noise_mean, cfg.bn_noise_std, **_batch_stat_kwargs(cfg))


def _group(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """GroupNorm with model.groups groups of channels, each normalized per sample."""
    groups = cfg.groups
    if num_features % groups:
        divisors = [d for d in range(1, num_features + 1) if num_features % d == 0]
        suggestion = min(divisors, key=lambda d: (abs(d - groups), d))
        fc_hint = " (this is a fully connected layer; model.fc_norm=false leaves it unnormalized)" if dim == 1 else ""
        raise ConfigError(
            f"model.norm=group: a layer with {num_features} channels cannot be split into "
            f"model.groups={groups} equal groups{fc_hint}. Use a number of groups that divides every "
            f"layer's channel count, e.g. model.groups={suggestion} (divisors of {num_features}: "
            f"{', '.join(map(str, divisors))})"
        )
    return nn.GroupNorm(groups, num_features, eps=cfg.bn_eps, affine=cfg.bn_affine)


def _layer(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """Layer normalization: each sample normalized over all its features, per-channel scale and shift."""
    # GroupNorm with one group takes each sample's statistics over (C, H, W), as
    # LayerNorm([C, H, W]) would, but needs neither H nor W when built (so any
    # image size works) and learns one gamma/beta per channel, the convention for CNNs.
    return nn.GroupNorm(1, num_features, eps=cfg.bn_eps, affine=cfg.bn_affine)


def _instance(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """InstanceNorm2d: each sample's channels normalized over their own H x W positions."""
    if dim == 1:
        raise ConfigError(
            "model.norm=instance cannot normalize a fully connected layer: instance norm takes the mean "
            "and variance of each channel of each sample, and a fully connected feature has a single value "
            "per channel per sample, so every output would be 0. Set model.fc_norm=false to leave the "
            "hidden fully connected layers unnormalized."
        )
    return nn.InstanceNorm2d(num_features, eps=cfg.bn_eps, affine=cfg.bn_affine, track_running_stats=False)


def _none(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """No normalization (the baseline)."""
    return nn.Identity()


NORMS: dict[str, NormBuilder] = {
    "batch": _batch,
    "batch_manual": _batch_manual,
    "ghost": _ghost,
    "noisy_batch": _noisy_batch,
    "group": _group,
    "layer": _layer,
    "instance": _instance,
    "none": _none,
}

# The exact layer types each builder returns; normspec says what they do (batch statistics, synchronized).
LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d, CumulativeBatchNorm1d, CumulativeBatchNorm2d),  # the latter: bn_momentum null
    "batch_manual": (ManualBatchNorm,),
    "ghost": (GhostBatchNorm,),
    "noisy_batch": (NoisyBatchNorm,),
    "group": (nn.GroupNorm,),
    "layer": (nn.GroupNorm,),
    "instance": (nn.InstanceNorm2d,),
    "none": (nn.Identity,),
}
if not set(NORMS) == set(LAYER_TYPES) == set(normspec.NORMS):  # a norm added in one place only
    raise ImportError(f"norms.NORMS {sorted(NORMS)}, norms.LAYER_TYPES {sorted(LAYER_TYPES)} and normspec.NORMS "
                      f"{sorted(normspec.NORMS)} must name the same norms")
# Layers that data-parallel training replaces by synchronized BN (distributed.convert_sync_bn).
SYNCHRONIZABLE_TYPES = tuple(t for name, types in LAYER_TYPES.items() if normspec.NORMS[name].synchronizable
                             for t in types)


def make_norm(cfg: ModelConfig, num_features: int, dim: int) -> nn.Module:
    """Build the normalization layer named by cfg.norm for num_features channels (dim 2: conv, 1: fc)."""
    if dim not in (1, 2):
        raise ValueError(f"dim must be 2 (conv features) or 1 (fully connected features), got {dim}")
    builder = NORMS.get(cfg.norm)
    if builder is None:
        raise ConfigError(f"unknown model.norm '{cfg.norm}'; choose one of: {', '.join(NORMS)}")
    return builder(cfg, num_features, dim)


# Every layer type the registry can produce (LayerNorm-style "layer" is a GroupNorm).
_NORM_TYPES = (_BatchNorm, ManualBatchNorm, nn.GroupNorm, _InstanceNorm)
# Layers that normalize with batch statistics in training and keep running estimates for eval.
_BATCH_STAT_TYPES = (_BatchNorm, ManualBatchNorm)


def is_norm(module: nn.Module) -> bool:
    """Whether module is a normalization layer (Identity, the 'none' norm, is not)."""
    return isinstance(module, _NORM_TYPES)


def uses_batch_stats(module: nn.Module) -> bool:
    """Whether module normalizes with batch statistics in training (torch, manual or ghost BatchNorm)."""
    # Decided by type alone: with track_running_stats=False such a layer has no running
    # estimates (running_mean is None) and reset_running_stats() does nothing, as in torch.
    return isinstance(module, _BATCH_STAT_TYPES)


def set_bn_batch_mode(model: nn.Module) -> None:
    """Eval mode everywhere except BN layers, which then normalize with each batch's statistics."""
    model.eval()
    for m in model.modules():
        if uses_batch_stats(m):
            m.train()
