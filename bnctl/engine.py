"""Training and evaluation: train_one_epoch, evaluate, fit.

The same code runs on CPU, CUDA or MPS; only the device differs. Data stays on
the device as uint8 (see data.Batches); evaluation is always eval mode under
inference mode, because BN's behaviour depends on it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bnctl import checkpoint, config as config_mod, rundir
from bnctl.config import Config
from bnctl.data import Batches, ImageData, load_dataset
from bnctl.errors import CheckpointError, ConfigError, DataError, DivergedError, InterruptedRun
from bnctl.models import build_model, count_parameters
from bnctl.norms import is_norm, uses_batch_stats

METRIC_COLUMNS = [
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
    "epoch_time_s", "train_time_s", "eval_time_s", "images_per_s",
]
CLEAN_TRAIN_COLUMNS = ["clean_train_loss", "clean_train_acc"]


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
# nothing (2 cores: equal at batch 8), and when another process holds a core every op waits
# for the descheduled thread: 10-100x slower at batch 4. bench/RESULTS.md has the figures.
SMALL_CPU_BATCH = 16


def training_threads(device: torch.device, batch_size: int) -> int:
    """The intra-op thread count train_one_epoch uses: one for small CPU batches unless OMP_NUM_THREADS is set."""
    if device.type == "cpu" and batch_size < SMALL_CPU_BATCH and "OMP_NUM_THREADS" not in os.environ:
        return 1
    return torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads_for(batches: Batches):
    """Train with training_threads(...) threads, then restore the previous count."""
    before, wanted = torch.get_num_threads(), training_threads(batches.x.device, batches.batch_size)
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sum_dtype(device: torch.device) -> torch.dtype:
    # Running sums in float64 where the device has it (Apple's MPS has not).
    return torch.float32 if device.type == "mps" else torch.float64


# ------------------------------------------------------------------ optimizers and schedules

def _param_groups(model: nn.Module, cfg: config_mod.OptimizerConfig) -> list[dict]:
    """Norm scales/shifts get their own weight decay (usually none)."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    norm = [p for p in model.parameters() if id(p) in norm_params]
    rest = [p for p in model.parameters() if id(p) not in norm_params]
    groups = [{"params": rest, "weight_decay": cfg.weight_decay}]
    if norm:
        groups.append({"params": norm, "weight_decay": cfg.norm_weight_decay})
    return groups


def _fast_impl(device: torch.device) -> dict[str, bool]:
    # Fused kernels exist for CPU and CUDA optimizers and are markedly faster on small models.
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


OPTIMIZERS: dict[str, Callable[[list[dict], config_mod.OptimizerConfig, torch.device], torch.optim.Optimizer]] = {
    "adam": lambda g, c, d: torch.optim.Adam(g, lr=c.lr, betas=c.betas, **_fast_impl(d)),
    "adamw": lambda g, c, d: torch.optim.AdamW(g, lr=c.lr, betas=c.betas, **_fast_impl(d)),
    "sgd": lambda g, c, d: torch.optim.SGD(g, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, **_fast_impl(d)),
}


def make_optimizer(model: nn.Module, cfg: config_mod.OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](_param_groups(model, cfg), cfg, device)


# Learning-rate multipliers as functions of (step, total_steps, steps_per_epoch, cfg).
# Being pure functions of the step, they stay correct when a resumed run is extended.
def _cosine(t: int, total: int, spe: int, c: Config) -> float:
    floor = c.scheduler.min_lr / c.optimizer.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def _onecycle(t: int, total: int, spe: int, c: Config) -> float:
    # Warm up linearly from lr/25 to lr, then anneal with a cosine to lr/1e4 (Smith & Topin).
    warm = max(1, int(c.scheduler.warmup_pct * total))
    if t < warm:
        return 1 / 25 + (1 - 1 / 25) * t / warm
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t - warm, total - warm) / max(1, total - warm)))


SCHEDULERS: dict[str, Callable[[int, int, int, Config], float]] = {
    "none": lambda t, total, spe, c: 1.0,
    "cosine": _cosine,
    "step": lambda t, total, spe, c: c.scheduler.gamma ** (t // (c.scheduler.step_size * spe)),
    "onecycle": _onecycle,
}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    total = cfg.train.epochs * steps_per_epoch
    rule = SCHEDULERS[cfg.scheduler.name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: rule(t, total, steps_per_epoch, cfg))


# ------------------------------------------------------------------ one epoch

class Reporter(Protocol):
    """What the engine tells its caller (the CLI draws progress bars from it)."""

    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, done: int, loss: float) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, done: int, loss: float) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, scheduler,
                    precision: Precision, epoch: int, reporter: Reporter = SilentReporter(),
                    probe=None, first_step: int = 0) -> dict[str, float]:
    """One pass over the training batches; returns running train loss and accuracy."""
    model.train()
    device = batches.x.device
    loss_sum = torch.zeros((), device=device, dtype=_sum_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    report_every = max(1, len(batches) // 50)  # progress updates cost a sync; ~50 per epoch is plenty
    # Reading a number back is nearly free on CPU but stalls a GPU's queue, so there the
    # finiteness check waits for the progress updates (a NaN or inf stays in the running sum).
    check_every = 1 if device.type == "cpu" else report_every
    with cpu_threads_for(batches):
        for i, (x, y) in enumerate(batches):
            if probe is not None:
                probe.start_step(first_step + i, epoch)
            with precision.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            loss_sum += loss.detach() * len(y)
            if (i + 1) % check_every == 0 and not math.isfinite(loss_sum.item()):
                raise DivergedError(f"loss became {loss.item()} at epoch {epoch}, step {i + 1}", epoch, i + 1)
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            if probe is not None:
                probe.after_backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            scheduler.step()
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if (i + 1) % report_every == 0:
                reporter.step(i + 1, (loss_sum / seen).item())
    if seen == 0:
        raise DataError(f"no complete training batch: {len(batches.y)} images < batch_size {batches.batch_size}")
    if not math.isfinite(loss_sum.item()):  # a GPU run may have diverged after its last check
        raise DivergedError(f"loss became non-finite in epoch {epoch}", epoch, len(batches))
    return {"train_loss": (loss_sum / seen).item(), "train_acc": 100.0 * correct.item() / seen, "images": seen}


def evaluate(model: nn.Module, batches: Batches, precision: Precision,
             num_classes: Optional[int] = None, bn_batch_stats: bool = False) -> dict[str, Any]:
    """Loss and accuracy in one pass, in eval mode (BN uses its running statistics).

    ``bn_batch_stats`` makes BN normalize with each test batch's own statistics, as a
    model left in train mode does; call it on a copy, since that also moves running stats.
    """
    was_training = model.training
    model.eval()
    if bn_batch_stats:
        _set_bn_batch_mode(model)
    device = batches.x.device
    loss_sum = torch.zeros((), device=device, dtype=_sum_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.int64)
    confusion = torch.zeros(num_classes or 1, num_classes or 1, dtype=torch.int64, device=device)
    with torch.inference_mode(), precision.autocast():
        for x, y in batches:
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            pred = logits.argmax(1)
            correct += (pred == y).sum()
            if num_classes:
                confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2).view_as(confusion)
    model.train(was_training)
    n = len(batches.y)
    out: dict[str, Any] = {"loss": (loss_sum / n).item(), "acc": 100.0 * correct.item() / n, "images": n}
    if num_classes:
        out["confusion"] = confusion.cpu().tolist()
    return out


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

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, **options: Any) -> Batches:
        """Unaugmented batches of any tensors (plain by default, e.g. for evaluation)."""
        d = self.cfg.data
        return Batches(x, y, batch_size, device=self.device, mean=d.mean, std=d.std,
                       channels_last=self.cfg.train.channels_last, **options)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: Config, data: ImageData | None = None) -> Experiment:
    """Resolve the device, load data and build model and optimizer; raise before any run dir exists."""
    device = resolve_device(cfg.device)
    precision = Precision(device, cfg.train.precision)
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
    forward = torch.compile(model) if cfg.train.compile else model
    generator = torch.Generator().manual_seed(cfg.seed)
    d = cfg.data
    common = dict(device=device, mean=d.mean, std=d.std, channels_last=cfg.train.channels_last)
    # Drop the incomplete last batch: a tiny final batch would give BN noisy (or, at size 1, no) statistics.
    train_batches = Batches(data.train_x, data.train_y, cfg.train.batch_size, shuffle=True, drop_last=True,
                            augment=d.augment, generator=generator, **common)
    test_batches = Batches(data.test_x, data.test_y, cfg.train.eval_batch_size, **common)
    optimizer = make_optimizer(model, cfg.optimizer, device)
    scheduler = make_scheduler(optimizer, cfg, max(1, len(train_batches)))  # eval needs no full training batch
    return Experiment(cfg, device, data, model, forward, precision, generator, train_batches, test_batches,
                      optimizer, scheduler)


def _check_fits(exp: Experiment) -> None:
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


# ------------------------------------------------------------------ fit

@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def _state(exp: Experiment, epoch: int, history: list[dict], best: dict) -> dict[str, Any]:
    return {
        "epoch": epoch, "model": exp.model.state_dict(), "optimizer": exp.optimizer.state_dict(),
        "scheduler": exp.scheduler.state_dict(), "scaler": exp.precision.scaler.state_dict(),
        "history": history, "best": best, "config": config_mod.to_dict(exp.cfg),
        "rng": checkpoint.capture_rng(exp.generator),
    }


def fit(cfg: Config, *, runs_root: Path = Path("runs"), run_dir: Path | None = None, resume: Path | None = None,
        reporter: Reporter = SilentReporter(), on_run_dir: Callable[[Path], None] = lambda p: None,
        probe_factory=None) -> RunResult:
    """Train cfg.train.epochs epochs, writing metrics, checkpoints and summary to a run directory.

    With ``resume``, continue that run from its last checkpoint so that the result is
    identical to an uninterrupted run.
    """
    exp = setup(cfg)
    if len(exp.train_batches) == 0:
        raise DataError(f"only {len(exp.data.train_y)} training images, fewer than "
                        f"train.batch_size={cfg.train.batch_size}; lower the batch size or add data")
    _check_fits(exp)
    if resume is not None and not (Path(resume) / rundir.CHECKPOINT_DIR / "last.pt").is_file():
        raise ConfigError(f"{resume} has no checkpoint to resume from (no epoch completed); start a new run")
    run_dir = Path(resume) if resume is not None else rundir.create(runs_root, cfg.name, exact=run_dir)
    # One process per run directory: resuming a run that is still training would interleave two writers.
    with rundir.RunLock(run_dir):
        return _fit_in(exp, run_dir, resume is not None, reporter, on_run_dir, probe_factory)


def _fit_in(exp: Experiment, run_dir: Path, resuming: bool, reporter: Reporter,
            on_run_dir: Callable[[Path], None], probe_factory) -> RunResult:
    """fit's body, once the run directory is chosen and locked."""
    cfg = exp.cfg
    history: list[dict] = []
    best: dict[str, Any] = {"test_acc": None, "epoch": None}
    start = 1
    if resuming:
        history, best, start = _restore(exp, run_dir)
        rundir.remove_temp_files(run_dir)  # left by a run killed mid-write
        rundir.atomic_write_text(run_dir / rundir.CONFIG_FILE, config_mod.to_yaml(cfg))
        rundir.record_resume(run_dir, {"from_epoch": start - 1, "epochs": cfg.train.epochs, "device": str(exp.device),
                                       "threads": training_threads(exp.device, cfg.train.batch_size)})
    else:
        rundir.record_provenance(run_dir, config_mod.to_yaml(cfg), {
            "device": str(exp.device), "seed": cfg.seed,
            "threads": training_threads(exp.device, cfg.train.batch_size),
            "num_classes": exp.num_classes, "train_images": len(exp.data.train_y),
            "steps_per_epoch": len(exp.train_batches),
            "test_images": len(exp.data.test_y)})
    on_run_dir(run_dir)

    columns = METRIC_COLUMNS + (CLEAN_TRAIN_COLUMNS if cfg.train.eval_train else [])
    metrics = rundir.MetricsWriter(run_dir / rundir.METRICS_FILE, columns, history)
    probe = probe_factory(exp, run_dir, start) if (probe_factory and cfg.train.diagnostics) else None
    clean_train = exp.batches(exp.data.train_x, exp.data.train_y, cfg.train.eval_batch_size) \
        if cfg.train.eval_train else None
    summary = _Summary(run_dir, cfg, exp, history, best)
    steps = len(exp.train_batches)
    epoch = start - 1
    try:
        for epoch in range(start, cfg.train.epochs + 1):
            reporter.epoch_start(epoch, steps)
            row = _train_and_evaluate(exp, epoch, reporter, probe, clean_train)
            if not math.isfinite(row["test_loss"]):
                # The epoch's last updates broke the weights (or BN's running statistics): keep the
                # previous checkpoint as the last good one rather than saving a broken model.
                raise DivergedError(f"test loss became {row['test_loss']} after epoch {epoch}", epoch, steps)
            is_best = best["test_acc"] is None or row["test_acc"] > best["test_acc"]
            new_best = {"test_acc": row["test_acc"], "test_loss": row["test_loss"], "epoch": epoch} if is_best else best
            # Checkpoint before the metrics row: a row on disk always has its checkpoint.
            state = _state(exp, epoch, history + [row], new_best)
            checkpoint.save(run_dir / rundir.CHECKPOINT_DIR / "last.pt", state)
            if is_best:
                checkpoint.save(run_dir / rundir.CHECKPOINT_DIR / "best.pt", state)
            history.append(row)
            best = new_best
            metrics.append(row)
            if probe is not None:
                probe.flush()
            reporter.epoch_end(row)
            summary.update(best, status="running")
    except DivergedError as err:
        summary.update(best, status="diverged", diverged={"epoch": err.epoch, "step": err.step, "message": str(err)})
        kept = (f"the last good checkpoint (epoch {len(history)}) and its metrics are kept" if history
                else "no epoch completed, so there is no checkpoint")
        raise DivergedError(f"training diverged: {err}. Try a lower optimizer.lr (now {cfg.optimizer.lr:g}), "
                            f"a warm-up schedule or normalization layers; {kept} in {run_dir}",
                            err.epoch, err.step) from None
    except KeyboardInterrupt:
        # The epoch in progress is the one after the last complete one (the loop may not have advanced yet).
        summary.update(best, status="interrupted", interrupted_in_epoch=len(history) + 1)
        kept = f"{len(history)} complete epoch(s) kept" if history else "no epoch had completed"
        raise InterruptedRun(f"interrupted in epoch {len(history) + 1}; {kept}. "
                             f"Continue with: bnctl train --resume {run_dir}") from None
    except BaseException as err:
        summary.update(best, status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        if probe is not None:
            probe.close()
    return RunResult(run_dir, summary.update(best, status="completed"))


def _train_and_evaluate(exp: Experiment, epoch: int, reporter: Reporter, probe,
                        clean_train: Batches | None) -> dict[str, Any]:
    """Train one epoch, evaluate it and time both: one metrics.csv row."""
    lr = exp.optimizer.param_groups[0]["lr"]  # the lr this epoch starts with
    steps = len(exp.train_batches)
    t0 = time.perf_counter()
    train = train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision,
                            epoch, reporter, probe, first_step=(epoch - 1) * steps)
    t1 = time.perf_counter()
    # Test metrics always come from eval mode: BN must use its running statistics, not the test batch's.
    test = evaluate(exp.forward, exp.test_batches, exp.precision)
    row = {"epoch": epoch, "train_loss": train["train_loss"], "train_acc": train["train_acc"],
           "test_loss": test["loss"], "test_acc": test["acc"], "lr": lr}
    if clean_train is not None:  # the running train accuracy mixes many weights; this is the final model's
        clean = evaluate(exp.forward, clean_train, exp.precision)
        row |= {"clean_train_loss": clean["loss"], "clean_train_acc": clean["acc"]}
    t2 = time.perf_counter()
    return row | {"epoch_time_s": t2 - t0, "train_time_s": t1 - t0, "eval_time_s": t2 - t1,
                  "images_per_s": train["images"] / (t1 - t0)}


def _restore(exp: Experiment, run_dir: Path) -> tuple[list[dict], dict[str, Any], int]:
    """Load the last checkpoint into exp; return its history, best metrics and the next epoch."""
    state = _resume_state(run_dir, exp.cfg)
    checkpoint.load_model_state(exp.model, state["model"], run_dir / rundir.CHECKPOINT_DIR / "last.pt")
    exp.optimizer.load_state_dict(state["optimizer"])
    exp.precision.scaler.load_state_dict(state["scaler"])
    exp.scheduler.load_state_dict(state["scheduler"])
    # The schedule is a pure function of the step: redo the last step under this run's (maybe
    # extended) length, so the lr is exactly what an uninterrupted run of that length would use.
    exp.scheduler.last_epoch -= 1
    exp.scheduler.step()
    checkpoint.restore_rng(state["rng"], exp.generator)
    return state["history"], state["best"], state["epoch"] + 1


def _resume_state(run_dir: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint to continue from, after checking it belongs to this run's config."""
    path = run_dir / rundir.CHECKPOINT_DIR / "last.pt"
    state = checkpoint.load(path)
    now, then = config_mod.flatten(config_mod.to_dict(cfg)), config_mod.flatten(state["config"])
    changed = sorted(k for k in now.keys() | then.keys()
                     if k not in config_mod.RESUMABLE_KEYS and now.get(k) != then.get(k))
    if changed:
        raise ConfigError(f"{run_dir / rundir.CONFIG_FILE} no longer matches its checkpoint ({', '.join(changed[:5])} "
                          "differ); restore it or start a new run")
    missing = [k for k in ("optimizer", "scheduler", "scaler", "rng", "history", "best") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it can be evaluated but not resumed")
    return state


class _Summary:
    """summary.json, rewritten atomically after every epoch and at the end."""

    def __init__(self, run_dir: Path, cfg: Config, exp: Experiment, history: list[dict], best: dict):
        self.path, self.cfg, self.exp, self.history = run_dir / rundir.SUMMARY_FILE, cfg, exp, history
        self.started = time.time()
        try:
            previous = rundir.read_json(self.path) if self.path.exists() else {}
        except (OSError, ValueError):  # damaged by a crash: only the accumulated wall time is lost
            previous = {}
        self.prior_wall = previous.get("wall_time_s", 0.0) if history else 0.0

    def update(self, best: dict, status: str, **extra: Any) -> dict[str, Any]:
        final = self.history[-1] if self.history else None
        summary = {
            "name": self.cfg.name, "status": status, "epochs_completed": len(self.history),
            "epochs_planned": self.cfg.train.epochs, "final": final, "best": best,
            "wall_time_s": self.prior_wall + time.time() - self.started,
            "train_time_s": sum(r["train_time_s"] for r in self.history),
            "device": str(self.exp.device), "num_parameters": count_parameters(self.exp.model),
            "versions": rundir.versions(), **extra,
        }
        rundir.write_json(self.path, summary)
        return summary


# ------------------------------------------------------------------ evaluation of a saved checkpoint

BN_MODES = ("running", "batch")  # eval --bn-mode: population statistics, or each test batch's own


def _set_bn_batch_mode(model: nn.Module) -> None:
    """Eval mode everywhere except BN layers, which then normalize with each batch's statistics."""
    model.eval()
    for m in model.modules():
        if uses_batch_stats(m):
            m.train()


def _has_running_stats(module: nn.Module) -> bool:
    return uses_batch_stats(module) and getattr(module, "running_mean", None) is not None


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, num_images: int) -> int:
    """Recompute BN population statistics from training images with the weights frozen ("precise BN").

    Running estimates restart from scratch and become the plain average over the
    batches seen (momentum=None), so every image counts alike. Whole batches are
    used until at least num_images were seen. Only BN buffers change; the model is
    left in eval mode. Returns the number of images used.
    """
    bns = [m for m in model.modules() if _has_running_stats(m)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches, not an exponential one
    _set_bn_batch_mode(model)  # dropout stays off: statistics of the deployed network, not a thinned one
    used = 0
    try:
        for x, _ in batches:
            if used >= num_images:
                break
            model(x)
            used += len(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
    return used


def _one_image_batch(n: int, batch_size: int, model: nn.Module) -> bool:
    """Whether normalizing n images in batches of batch_size hands some BN layer a single image."""
    full, rest = divmod(n, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if rest == 1 and full:  # Batches folds a lone last image into the batch before it
        sizes[-2:] = [batch_size + 1]
    for m in model.modules():
        if not uses_batch_stats(m):
            continue
        virtual = getattr(m, "virtual_batch_size", None)  # ghost BN cuts larger batches into virtual ones
        for size in sizes:
            if size == 1 or (virtual is not None and size > virtual and size % virtual == 1):
                return True
    return False


def evaluate_checkpoint(path: Path, *, data_root: str | None = None, device: str | None = None,
                        bn_mode: str = "running", batch_size: int | None = None, recalibrate: int = 0) -> dict:
    """Rebuild a model from a checkpoint alone and evaluate it on the test split.

    ``bn_mode="batch"`` normalizes with each test batch's statistics (as a model left in
    train mode does); ``recalibrate=N`` first recomputes BN's running statistics from N
    training images. Both work on a copy of the weights: the checkpoint file is only read.
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown --bn-mode '{bn_mode}'; choose one of: {', '.join(BN_MODES)}")
    if recalibrate and bn_mode == "batch":
        raise ConfigError("--recalibrate recomputes BN's running statistics, which --bn-mode batch does not use; "
                          "recalibrate with --bn-mode running")
    state = checkpoint.load(path)
    raw = copy.deepcopy(state["config"])
    if data_root is not None:
        raw = config_mod.apply_overrides(raw, {"data.root": data_root})
    if device is not None:
        raw = config_mod.apply_overrides(raw, {"device": device})
    cfg = config_mod.validate(raw, f"stored in {path}")
    if batch_size is not None:
        cfg.train.eval_batch_size = batch_size
    exp = setup(cfg)
    checkpoint.load_model_state(exp.model, state["model"], Path(path))
    model, test = exp.model, exp.test_batches
    bn_layers = sum(uses_batch_stats(m) for m in model.modules())
    if bn_mode == "batch" and _one_image_batch(len(test.y), test.batch_size, model):
        raise ConfigError(
            f"--bn-mode batch normalizes each test batch with its own statistics, but {len(test.y)} test images "
            f"in batches of {test.batch_size} leave a batch of one image (counting ghost BN's virtual batches), "
            "which has none; choose another --batch-size")
    result: dict[str, Any] = {"checkpoint": str(path), "epoch": state["epoch"], "bn_mode": bn_mode,
                              "batch_size": test.batch_size, "bn_layers": bn_layers, "classes": exp.data.classes,
                              "device": str(exp.device)}
    if recalibrate:
        if not any(_has_running_stats(m) for m in model.modules()):
            raise ConfigError(f"--recalibrate needs BN layers that keep running statistics; this model has "
                              f"model.norm={cfg.model.norm}, bn_track_running_stats={cfg.model.bn_track_running_stats}")
        before = evaluate(model, test, exp.precision)
        model = copy.deepcopy(model)  # recalibrated statistics are reported, never written back
        # Shuffled whole training batches: class-sorted data (image folders) must not bias the statistics.
        recal = exp.batches(exp.data.train_x, exp.data.train_y, max(2, cfg.train.batch_size), shuffle=True,
                            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
        used = recalibrate_bn(model, recal, recalibrate)
        result["recalibration"] = {"images": used, "batch_size": recal.batch_size,
                                   "before_acc": before["acc"], "before_loss": before["loss"]}
    if bn_mode == "batch":
        model = copy.deepcopy(model)  # batch statistics must never reach the checkpoint's running estimates
    metrics = evaluate(model, test, exp.precision, exp.num_classes, bn_batch_stats=bn_mode == "batch")
    result |= {"loss": metrics["loss"], "acc": metrics["acc"], "images": metrics["images"],
               "confusion": metrics["confusion"]}
    result["per_class_acc"] = {
        c: 100.0 * row[i] / max(1, sum(row)) for i, (c, row) in enumerate(zip(exp.data.classes, metrics["confusion"]))
    }
    return result
