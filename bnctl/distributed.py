"""Data-parallel training on PyTorch's own distributed engine, and synchronized BN for gloo.

Under ``torchrun`` every process runs the same ``bnctl train``; :func:`process_group`
reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), starts the process
group (nccl on CUDA with one GPU per local rank, gloo on CPU) and hands the
engine a :class:`Dist`. One process gets ``SINGLE``, on which every method is a
no-op, so a single-process run takes exactly the code path it always took.

What data parallelism means for BN:

- ``train.sync_bn=true`` (default): BN layers (``batch``, ``batch_manual``) take their
  statistics over the global batch, so the run equals one process at the same
  ``train.batch_size``. On CUDA this is torch's ``SyncBatchNorm``; torch's refuses CPU
  tensors, so on gloo it is :class:`SyncBatchNorm` here. Ghost BN is never converted:
  its virtual batches stay per process and keep their meaning (statistics of
  ``model.virtual_batch_size`` consecutive samples of one process's slice).
- ``train.sync_bn=false``: each process normalizes its own slice of the batch, which is
  ghost BN with a virtual batch of ``batch_size / world_size``. Each process's running
  statistics then follow its own slices; ``train.dist_bn`` reconciles them at every
  epoch end (``reduce``: the average; ``broadcast``: rank 0's, what DDP's
  broadcast_buffers would leave in the checkpoint; ``none``: left alone, so each
  process evaluates its test shard with its own statistics).

``train.diagnostics`` under torchrun samples rank 0's share of each batch (activations are
per rank); the running statistics and parameters it records are the model's.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnctl.elastic import attempt_store
from bnctl.errors import BnctlError, ConfigError
from bnctl.norms import CumulativeBatchNorm1d, CumulativeBatchNorm2d, ManualBatchNorm, count_batch, uses_batch_stats

TIMEOUT_ENV = "BNCTL_DIST_TIMEOUT"  # seconds a collective may wait for the other processes
DEFAULT_TIMEOUT_S = 600  # longer than any checkpoint write rank 0 does while the others wait

T = TypeVar("T")


class LostPeer(BnctlError):
    """Another process of the group stopped answering (hung past the timeout, or died) mid-collective."""


class AgreedError(BnctlError):
    """A failure every rank raises together, so that none is left waiting in a collective."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} must be positive")
    return value


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the group; every method is a no-op for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: Optional[torch.device] = None  # the device this rank trains on (None: the config's)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous share of n items (shares differ by at most one item)."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of tensor over all ranks (a new tensor; tensor itself when single)."""
        if not self.enabled:
            return tensor
        import torch.distributed as td

        out = tensor.clone()
        td.all_reduce(out)
        return out

    def sum_counts(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A loss sum, a correct count and a sample count added over ranks, in one collective."""
        if not self.enabled:
            return loss_sum, correct, n
        count = torch.tensor(float(n), dtype=torch.float64, device=loss_sum.device)
        totals = self.sum(torch.stack([loss_sum.double(), correct.double(), count]))
        return totals[0], totals[1].long(), int(totals[2].item())

    def agree(self, fn: Callable[[], T], share: bool = False) -> T:
        """Run fn on every rank; if it fails on any rank, fail on every rank with one message.

        fn must not communicate. Every rank then exchanges its outcome (one collective), so a
        bad config or missing data on one rank cannot leave the others waiting in the next
        collective. With share=True every rank gets rank 0's return value (picklable).
        """
        failure: Optional[BaseException] = None
        value: Any = None
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
            if not self.enabled:
                raise
            failure = err
        if not self.enabled:
            return value
        import torch.distributed as td

        mine = None
        if failure is not None:
            known = isinstance(failure, BnctlError)
            text = str(failure) if known else f"internal error: {type(failure).__name__}: {failure}"
            mine = (text, getattr(failure, "exit_code", 1))
        outcomes: list[Any] = [None] * self.world_size
        td.all_gather_object(outcomes, (mine, value if share and self.is_main else None))
        failed = [(r, o[0]) for r, o in enumerate(outcomes) if o[0] is not None]
        if failed:
            rank, (text, code) = failed[0]
            where = "" if len(failed) == self.world_size else f"rank {rank}: "
            raise AgreedError(where + text, code) from failure
        return outcomes[0][1] if share else value

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around module for training (module itself when single).

        Buffers are not broadcast at each forward: synchronized BN keeps them equal on every
        rank by construction, and unsynchronized BN's are reconciled once per epoch (dist_bn).
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # Newer torch renames the option (and still syncs buffers once at construction, which is harmless here).
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        option = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(module, device_ids=ids, **option)


SINGLE = Dist()


def _device_for_rank(device_name: str, local_rank: int) -> torch.device:
    """The device one rank trains on: its own GPU (cuda:LOCAL_RANK) or the CPU."""
    if device_name == "mps":
        raise ConfigError("multi-process training needs CUDA (nccl) or the CPU (gloo); device=mps has neither")
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device_name} but this machine has no usable CUDA GPU; use device=cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {local_rank} needs its own GPU but this node has {torch.cuda.device_count()}; "
                          "start at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device_name: str) -> Iterator[Dist]:
    """Start the process group torchrun's environment describes, and destroy it at the end.

    Without torchrun (or with one process) this yields SINGLE and starts nothing.
    """
    world = env_world_size()
    if world <= 1:
        yield SINGLE
        return
    import torch.distributed as td

    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for_rank(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    limit = timeout_s()
    timeout = timedelta(seconds=limit)
    # Under torchrun, a store private to this attempt: a restarted group must not meet the dead one's keys.
    td.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=attempt_store(timeout))
    try:
        yield Dist(rank, world, local_rank, backend, device)
    except RuntimeError as err:
        # gloo reports a peer that hung or died as a bare RuntimeError; say what happened, not "internal error".
        if not (isinstance(err, td.DistError) or "gloo" in str(err)):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise LostPeer(f"rank {rank}: another process stopped answering (it died or hung: this one waited "
                       f"longer than {limit:g}s in a collective; {TIMEOUT_ENV} sets the limit): {first}") from err
    finally:
        td.destroy_process_group()


# ------------------------------------------------------------------ synchronized BN


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
                if self.momentum is None:
                    factor = 1.0 / count_batch(self)  # counted on the host: no device read per layer per step
                else:
                    self.num_batches_tracked.add_(1)
                    factor = self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y


SYNC_TYPES = (SyncBatchNorm, nn.SyncBatchNorm)
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, CumulativeBatchNorm1d, CumulativeBatchNorm2d, ManualBatchNorm)  # exact types: ghost BN is left alone


def convert_sync_bn(module: nn.Module, cuda: bool) -> nn.Module:
    """Replace BN layers (torch's and bnctl's manual one) by synchronized BN, sharing their tensors.

    On CUDA torch's BatchNorm becomes torch's SyncBatchNorm; everything else becomes
    bnctl's. Ghost BN keeps its per-virtual-batch statistics and is not converted.
    """
    for name, child in module.named_children():
        if type(child) in _CONVERTIBLE:
            cls = nn.SyncBatchNorm if cuda and isinstance(child, _BatchNorm) else SyncBatchNorm
            new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_sync_bn(child, cuda)
    return module


def count_sync_layers(model: nn.Module) -> int:
    return sum(isinstance(m, SYNC_TYPES) for m in model.modules())


DIST_BN_MODES = ("broadcast", "reduce", "none")


@torch.no_grad()
def reconcile_running_stats(model: nn.Module, dist: Dist, mode: str) -> int:
    """Make unsynchronized BN layers' running statistics agree across ranks (train.dist_bn).

    broadcast: rank 0's everywhere; reduce: the average over ranks; none: nothing.
    Synchronized layers already agree. Returns the number of layers touched.
    """
    if mode not in DIST_BN_MODES:
        raise ConfigError(f"unknown train.dist_bn '{mode}'; choose one of: {', '.join(DIST_BN_MODES)}")
    if not dist.enabled or mode == "none":
        return 0
    import torch.distributed as td

    layers = [m for m in model.modules() if uses_batch_stats(m) and not isinstance(m, SYNC_TYPES)
              and getattr(m, "running_mean", None) is not None]
    for m in layers:
        for buf in (m.running_mean, m.running_var):
            if mode == "broadcast":
                td.broadcast(buf, src=0)
            else:
                total = buf.to(torch.float64)
                td.all_reduce(total)
                buf.copy_(total / dist.world_size)
        td.broadcast(m.num_batches_tracked, src=0)
    return len(layers)
