"""Everything a run builds before its first step: device, precision, data, model, optimizer.

Shared by training (engine.fit), checkpoint evaluation and sweep workers; it raises
before any run directory exists, so a bad config or missing data leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnctl.config import BATCH_STAT_NORMS, Config, batch_stats_at_eval
from bnctl.data import Batches, ImageData, load_dataset
from bnctl.distributed import SINGLE, Dist, convert_sync_bn
from bnctl.errors import ConfigError, DataError
from bnctl.models import build_model
from bnctl.optim import make_optimizer, make_scheduler


# ------------------------------------------------------------------ devices and precision

# ------------------------------------------------------------------ devices and precision

def resolve_device(name: str) -> torch.device:
    """Turn the config's device string into a torch.device, or explain why it is unavailable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but this machine has no usable CUDA GPU; use device=cpu or device=auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but Apple's Metal backend is not available here; use device=cpu or auto")
    return torch.device(name)


@dataclass
class Precision:
    """Autocast and gradient scaling for one device and precision setting."""

    device: torch.device
    name: str = "fp32"
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.name == "fp16" and self.device.type != "cuda":
            raise ConfigError(f"train.precision=fp16 needs a CUDA device (got {self.device}); use bf16 instead")
        # Only fp16 needs loss scaling; a disabled scaler passes straight through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


# Below this many images per step, splitting each tiny convolution across CPU threads gains
# little when the cores are idle (~22% on 2 cores at batch 4), and when another process holds a core
# every op waits for the descheduled thread: 10-100x slower at batch 4. So small batches take as
# many threads as the machine has free cores, one when it is busy. bench/RESULTS.md has the figures.
SMALL_CPU_BATCH = 16
FREE_CORE = 0.75  # a core counts as free when the 1-minute load average leaves at least this much of it


def choose_threads(device: torch.device, batch_size: int) -> tuple[int, str]:
    """The intra-op thread count for training, and why (run.json records both).

    Large batches and other devices keep torch's count; OMP_NUM_THREADS is the user's choice.
    Batches below SMALL_CPU_BATCH get one thread per free core (cores minus the 1-minute load
    average), at least one. The thread count changes the order of float sums, so two runs of one
    seed can differ in their last bits when they chose differently; a resumed run keeps its count.
    """
    available = torch.get_num_threads()
    if device.type != "cpu" or batch_size >= SMALL_CPU_BATCH:
        return available, "torch's default"
    if "OMP_NUM_THREADS" in os.environ:
        return available, "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float(cores)  # unknown: assume busy
    free = int(cores - load + (1 - FREE_CORE))
    threads = max(1, min(available, free))
    return threads, f"batch {batch_size} < {SMALL_CPU_BATCH}: {max(0, free)} of {cores} cores free (1-min load {load:.2f})"


def training_threads(device: torch.device, batch_size: int) -> int:
    """The thread count choose_threads picks now."""
    return choose_threads(device, batch_size)[0]


@contextlib.contextmanager
def cpu_threads_for(batches: Batches, threads: int | None = None):
    """Train with ``threads`` threads (default: training_threads now), then restore the previous count."""
    before = torch.get_num_threads()
    wanted = threads if threads is not None else training_threads(batches.x.device, batches.batch_size)
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply_backend_settings(cfg: Config, device: torch.device) -> dict[str, Any]:
    """Set cuDNN autotuning and TF32 as train.cudnn_benchmark / train.tf32 say; return what is in force (run.json).

    torch's own defaults differ between matmuls (TF32 off) and convolutions (TF32 on), so an
    unset "fp32" GPU run would be partly TF32; bnctl always sets both explicitly.
    """
    if device.type != "cuda":
        return {"cudnn_benchmark": None, "tf32": None}  # CPU (and MPS): neither applies
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32}


def sum_dtype(device: torch.device) -> torch.dtype:
    # Running sums in float64 where the device has it (Apple's MPS has not).
    return torch.float32 if device.type == "mps" else torch.float64


# ------------------------------------------------------------------ setup shared by train and eval

@dataclass
class Experiment:
    """Everything built from a config before the first step: device, data, model, optimizer."""

    cfg: Config
    device: torch.device
    data: ImageData
    model: nn.Module  # the plain module: what checkpoints save
    forward: nn.Module  # what training calls (compiled when train.compile)
    precision: Precision
    generator: torch.Generator
    train_batches: Batches
    test_batches: Batches
    optimizer: torch.optim.Optimizer
    scheduler: Any
    notes: list[str] = field(default_factory=list)  # what setup changed and why (e.g. a precision adapted to the device)
    eval_order_seed: int | None = None  # evaluation batches are drawn in this seed's order when BN uses batch statistics at eval
    dist: Dist = SINGLE  # this process's place in a data-parallel group (SINGLE: one process)
    eval_forward: Any = None  # what evaluation calls when training calls a DDP wrapper (None: forward)
    backend: dict[str, Any] = field(default_factory=dict)  # the CUDA settings in force (apply_backend_settings)
    threads: int = 1  # intra-op threads for training, chosen once per run (choose_threads)
    threads_reason: str = ""
    packed: dict[str, Any] | None = None  # trained packed with other seeds: {"members", "index", "runs"} (packed.py)

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, **options: Any) -> Batches:
        """Unaugmented batches of any tensors (plain by default, e.g. for evaluation)."""
        d = self.cfg.data
        return Batches(x, y, batch_size, device=self.device, mean=d.mean, std=d.std,
                       channels_last=self.cfg.train.channels_last, **options)

    def eval_batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Batches:
        """Evaluation batches, in eval_order_seed's fixed random order when that is set (see setup).

        Under data parallelism, this rank's shard of them (evaluate sums over ranks).
        """
        if self.eval_order_seed is not None:
            x, y = seeded_order(x, y, self.eval_order_seed)
        shard = eval_shard(self.cfg, self.dist, len(y), batch_size)
        return self.batches(x[shard], y[shard], batch_size)


def eval_shard(cfg: Config, dist: Dist, n: int, batch_size: int) -> slice:
    """This rank's share of n evaluation items (all of them for one process).

    When BN normalizes with batch statistics at eval, a rank takes whole batches of one
    process's evaluation (cut as Batches cuts them), so every test batch, and each number,
    is the same under any world size; otherwise any split gives the same numbers.
    """
    if not batch_stats_at_eval(cfg):
        return dist.part(n)
    count = max(1, n // batch_size) if n % batch_size == 1 else -(-n // batch_size)  # len(Batches)
    first, last = dist.rank * count // dist.world_size, (dist.rank + 1) * count // dist.world_size
    return slice(first * batch_size, n if last == count else last * batch_size)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def adapt_precision(cfg: Config, device: torch.device) -> str | None:
    """Turn fp16 into fp32 off CUDA (for a run evaluated or resumed elsewhere); return what changed, or None."""
    if cfg.train.precision != "fp16" or device.type == "cuda":
        return None
    cfg.train.precision = "fp32"
    return (f"train.precision fp16 -> fp32: fp16 autocast and loss scaling need CUDA, and this runs on {device}; "
            "numbers can differ slightly from the fp16 run's")


def seeded_order(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y in a random order fixed by seed (a copy)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def setup(cfg: Config, data: ImageData | None = None, moved: bool = False, dist: Dist = SINGLE) -> Experiment:
    """Resolve the device, load data and build model and optimizer; raise before any run dir exists.

    ``moved``: an existing run evaluated or resumed on this device; a precision the device
    lacks is adapted (see adapt_precision) and noted in Experiment.notes instead of refused.
    Under data parallelism (``dist``) the device is this rank's, BN layers become synchronized
    ones (train.sync_bn), and each rank gets its share of every training batch and a shard
    of the test set. Nothing here communicates, so a failure can be agreed on (Dist.agree).
    """
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly "
                          f"over the {dist.world_size} processes; use a multiple of {dist.world_size}")
    share = cfg.train.batch_size // dist.world_size  # the samples each process normalizes alone
    if cfg.model.norm == "ghost" and share % cfg.model.virtual_batch_size == 1:
        raise ConfigError(f"each of the {dist.world_size} processes gets {share} samples of train.batch_size="
                          f"{cfg.train.batch_size}, which leaves a ghost batch of one sample with "
                          f"model.virtual_batch_size={cfg.model.virtual_batch_size}; choose sizes that divide evenly")
    if dist.enabled and not cfg.train.sync_bn and cfg.model.norm in BATCH_STAT_NORMS and share == 1:
        raise ConfigError(f"train.sync_bn=false normalizes each process's {share} sample of train.batch_size="
                          f"{cfg.train.batch_size} alone, and one sample has no variance; use a larger batch "
                          "or train.sync_bn=true")
    notes = [note] if moved and (note := adapt_precision(cfg, device)) else []
    precision = Precision(device, cfg.train.precision)
    backend = apply_backend_settings(cfg, device)
    threads, threads_reason = choose_threads(device, cfg.train.batch_size)
    data = data if data is not None else load_dataset(cfg.data)
    seed_everything(cfg.seed)
    try:
        model = build_model(cfg.model, num_classes=len(data.classes), image_size=data.image_size)
    except RuntimeError as err:  # a layer's kernel or pooling window is larger than what is left of the image
        raise DataError(f"images of {data.image_size[0]}x{data.image_size[1]} pixels are too small for model "
                        f"{cfg.model.name} ({str(err).splitlines()[0]}); use larger images "
                        "(data.image_size for imagefolder) or another model") from None
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    if dist.enabled and cfg.train.sync_bn:
        convert_sync_bn(model, cuda=device.type == "cuda")
    forward = torch.compile(model) if cfg.train.compile else model
    generator = torch.Generator().manual_seed(cfg.seed)
    d = cfg.data
    common = dict(device=device, mean=d.mean, std=d.std, channels_last=cfg.train.channels_last)
    # Drop the incomplete last batch: a tiny final batch would give BN noisy (or, at size 1, no) statistics.
    train_batches = Batches(data.train_x, data.train_y, cfg.train.batch_size, shuffle=True, drop_last=True,
                            augment=d.augment, generator=generator, part=(dist.rank, dist.world_size), **common)
    test_x, test_y, order_seed = data.test_x, data.test_y, None
    if batch_stats_at_eval(cfg):
        # Eval mode normalizes with each test batch's statistics here, so the batches must mix the
        # classes: files listed class by class would give one-class batches and a meaningless accuracy.
        order_seed = cfg.seed
        test_x, test_y = seeded_order(test_x, test_y, order_seed)
    shard = eval_shard(cfg, dist, len(test_y), cfg.train.eval_batch_size)  # evaluation sums counts over ranks
    test_batches = Batches(test_x[shard], test_y[shard], cfg.train.eval_batch_size, **common)
    optimizer = make_optimizer(model, cfg.optimizer, device)
    scheduler = make_scheduler(optimizer, cfg, max(1, len(train_batches)))  # eval needs no full training batch
    return Experiment(cfg, device, data, model, forward, precision, generator, train_batches, test_batches,
                      optimizer, scheduler, notes, order_seed, dist, backend=backend, threads=threads,
                      threads_reason=threads_reason)


def check_fits(exp: Experiment) -> None:
    """Catch a data/model mismatch now, with a clear message, rather than mid-epoch."""
    x = exp.data.train_x[:2].to(exp.device).float()
    try:
        exp.model.eval()
        with torch.inference_mode():
            out = exp.model(x)
    except RuntimeError as err:
        raise DataError(f"the data's images ({tuple(x.shape[1:])}) do not fit model {exp.cfg.model.name}: "
                        f"{str(err).splitlines()[0]}") from None
    finally:
        exp.model.train()
    if out.shape[1] != exp.num_classes:
        raise DataError(f"model outputs {out.shape[1]} classes but the data has {exp.num_classes}")
