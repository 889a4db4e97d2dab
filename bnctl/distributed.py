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
from bnctl.norms import SYNC_TYPES, SYNCHRONIZABLE_TYPES, SyncBatchNorm, uses_batch_stats

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




def convert_sync_bn(module: nn.Module, cuda: bool) -> nn.Module:
    """Replace BN layers (torch's and bnctl's manual one) by synchronized BN, sharing their tensors.

    On CUDA torch's BatchNorm becomes torch's SyncBatchNorm; everything else becomes
    bnctl's. Ghost BN keeps its per-virtual-batch statistics and is not converted.
    """
    for name, child in module.named_children():
        if type(child) in SYNCHRONIZABLE_TYPES:  # exact types (normspec's synchronizable norms)
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
