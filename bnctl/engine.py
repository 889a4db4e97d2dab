"""Training and evaluation: train_one_epoch, evaluate, fit.

The same code runs on CPU, CUDA or MPS; only the device differs. Data stays on
the device as uint8 (see data.Batches); evaluation is always eval mode under
inference mode, because BN's behaviour depends on it.

Over 350 lines: train_one_epoch carries two ways of watching the loss (the CPU checks every step;
CUDA reads it one progress update late, LaggedRead, so that no step waits for the device), and fit
claims and locks the run directory for single runs, sweeps and restarted torchrun groups alike. What a
run keeps on disk is bnctl/recorder.py's and bnctl/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bnctl import checkpoint, config as config_mod, distributed, elastic, landscape, recorder, rundir, stopping, tblog
from bnctl.config import Config
from bnctl.data import Batches, ImageData
from bnctl.distributed import SINGLE, Dist
from bnctl.errors import ConfigError, DataError, DivergedError, InterruptedRun
from bnctl.experiment import Experiment, Precision, check_fits, cpu_threads_for, setup, sum_dtype
from bnctl.norms import set_bn_batch_mode
from bnctl.recorder import RunRecorder

METRIC_COLUMNS = recorder.METRIC_COLUMNS  # metrics.csv's columns (recorder.py owns them)


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
                    probe=None, first_step: int = 0, dist: Dist = SINGLE, step_log=None,
                    lagged: bool | None = None, threads: int | None = None) -> dict[str, float]:
    """One pass over the training batches; returns running train loss and accuracy.

    ``lagged`` (default: on CUDA without DDP) reads the running loss back only at progress
    updates, one update late (LaggedRead), so no step waits for the device; otherwise the
    CPU checks every step, as reading there costs nothing.

    Under data parallelism each rank trains on its share of every batch and the returned
    numbers are summed over ranks: the same as one process training on whole batches.
    """
    model.train()
    device = batches.x.device
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype(device))
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    report_every = max(1, len(batches) // 50)  # progress updates cost a read; ~50 per epoch is plenty
    # Reading a number back is nearly free on CPU but stalls a GPU's queue, so there the finiteness
    # check waits for the progress updates and reads the running sum one update late (LaggedRead):
    # the step itself never waits for the device. A NaN or inf stays in the running sum.
    if lagged is None:  # DDP's check is an all-reduce that every rank takes at the same step: not lagged
        lagged = device.type == "cuda" and not dist.enabled
    check_every = 1 if device.type == "cpu" else report_every
    reader = LaggedRead() if lagged else None
    if lagged:  # the host may run up to read_every steps ahead of the device, never more
        report_every = max(report_every, LAGGED_READ_EVERY)
    with cpu_threads_for(batches, threads):
        for i, (x, y) in enumerate(batches):
            if probe is not None:
                probe.start_step(first_step + i, epoch)
            with precision.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            loss_sum += loss.detach() * len(y)
            if reader is not None:
                if (i + 1) % report_every == 0:
                    _check_lagged(reader.push(loss_sum, (i + 1, seen + len(y))), epoch, reporter)
            elif (i + 1) % check_every == 0:  # under DDP the sum over ranks, so every rank stops at the same step
                _check_step(loss_sum, loss, dist, epoch, i + 1)
            optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            if probe is not None:
                probe.after_backward(x, y)
            precision.scaler.step(optimizer)
            precision.scaler.update()
            if step_log is not None:  # e.g. TensorBoard: this step's loss and the lr it used
                step_log(first_step + i, loss, optimizer.param_groups[0]["lr"])
            scheduler.step()
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if reader is None and (i + 1) % report_every == 0:
                reporter.step(i + 1, (loss_sum / seen).item())
    if seen == 0:
        raise DataError(f"no complete training batch: {len(batches.y)} images < batch_size {batches.batch_size}")
    loss_sum, correct, seen = dist.sum_counts(loss_sum, correct, seen)
    if not math.isfinite(loss_sum.item()):  # a GPU run may have diverged after its last check
        raise DivergedError(f"loss became non-finite in epoch {epoch}", epoch, len(batches))
    return {"train_loss": (loss_sum / seen).item(), "train_acc": 100.0 * correct.item() / seen, "images": seen}


def _check_step(loss_sum: torch.Tensor, loss: torch.Tensor, dist: Dist, epoch: int, step: int) -> None:
    """Stop at this step if the loss stopped being finite or a stop was requested (stopping.py).

    Under DDP both are read from every rank in one all-reduce, so every rank stops at the same step.
    """
    if dist.enabled:
        mine = torch.cat([loss_sum.reshape(1), loss_sum.new_tensor(stopping.flags())])
        total, *requests = dist.sum(mine).tolist()
    else:
        total, requests = loss_sum.item(), stopping.flags()
    why = stopping.reason(requests)
    if why is not None:
        raise KeyboardInterrupt(why)  # the Ctrl-C path: status interrupted, last checkpoint kept
    if not math.isfinite(total):
        raise DivergedError(f"loss became {loss.item()} at epoch {epoch}, step {step}", epoch, step)


LAGGED_READ_EVERY = 10  # lagged reads: at most one per this many steps (a GPU queue some steps deep)


class LaggedRead:
    """Read a device scalar back one request late, so that reading never waits for the step just queued.

    push() starts an asynchronous copy of the value into pinned host memory and returns the
    previous push's value (with its tag), whose copy finished long ago: the device keeps the
    steps in between queued and never drains. Off CUDA the copy is immediate (same logic, for tests).
    """

    def __init__(self) -> None:
        self.pending: tuple[torch.Tensor, Any, Any] | None = None

    def push(self, value: torch.Tensor, tag: Any) -> tuple[float, Any] | None:
        previous = self.pending
        cuda = value.device.type == "cuda"
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=cuda)
        host.copy_(value.detach(), non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        self.pending = (host, done, tag)
        if previous is None:
            return None
        if previous[1] is not None:
            previous[1].synchronize()  # recorded report_every steps ago: normally long complete
        return previous[0].item(), previous[2]


def _check_lagged(read: tuple[float, Any] | None, epoch: int, reporter: Reporter) -> None:
    """The GPU's check and progress update from a lagged read of the running loss sum (see LaggedRead)."""
    why = stopping.reason(stopping.flags())  # host-side flags: no device read needed
    if why is not None:
        raise KeyboardInterrupt(why)
    if read is None:
        return
    total, (step, seen) = read
    if not math.isfinite(total):
        raise DivergedError(f"the running loss became {total} by epoch {epoch}, step {step}", epoch, step)
    reporter.step(step, total / seen)


def evaluate(model: nn.Module, batches: Batches, precision: Precision,
             num_classes: Optional[int] = None, bn_batch_stats: bool = False, dist: Dist = SINGLE) -> dict[str, Any]:
    """Loss and accuracy in one pass, in eval mode (BN uses its running statistics).

    Under data parallelism each rank evaluates its shard and the counts and sums are
    added over ranks, so the numbers are those of one process evaluating everything.

    ``bn_batch_stats`` makes BN normalize with each test batch's own statistics, as a
    model left in train mode does; call it on a copy, since that also moves running stats.
    """
    was_training = model.training
    model.eval()
    if bn_batch_stats:
        set_bn_batch_mode(model)
    device = batches.x.device
    loss_sum = torch.zeros((), device=device, dtype=sum_dtype(device))
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
    loss_sum, correct, n = dist.sum_counts(loss_sum, correct, len(batches.y))
    confusion = dist.sum(confusion)
    out: dict[str, Any] = {"loss": (loss_sum / n).item(), "acc": 100.0 * correct.item() / n, "images": n}
    if num_classes:
        out["confusion"] = confusion.cpu().tolist()
    return out


# ------------------------------------------------------------------ fit

@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]  # its wall_time_s is the run's time, over every session (see _Summary)
    session_wall_time_s: float = 0.0  # this call of fit's share of it


def fit(cfg: Config, *, runs_root: Path = Path("runs"), run_dir: Path | None = None, resume: Path | None = None,
        reporter: Reporter = SilentReporter(), on_run_dir: Callable[[Path], None] = lambda p: None,
        probe_factory=None, data: ImageData | None = None, dist: Dist = SINGLE) -> RunResult:
    """Train cfg.train.epochs epochs, writing metrics, checkpoints and summary to a run directory.

    With ``resume``, continue that run from its last checkpoint so that the result is
    identical to an uninterrupted run. ``data``, when given, is the already loaded dataset of
    cfg.data (a sweep worker loads each dataset once and reuses it across runs). Under data
    parallelism (``dist``) every rank calls fit; rank 0 alone writes, reports and owns the run directory.
    """
    started = time.time()  # the session's start: loading data and building the model count as the run's time
    if not dist.is_main:
        reporter, on_run_dir, probe_factory = SilentReporter(), lambda p: None, None

    # A failure on any rank stops every rank here, with one message.
    exp = dist.agree(lambda: prepare(cfg, data, resume, dist))
    with contextlib.ExitStack() as stack:
        def claim() -> tuple[str, bool] | None:
            if not dist.is_main:
                return None
            # A new folder, --resume's, or (a worker group torchrun restarted) the one its first attempt made.
            path, resuming = elastic.claim_run_dir(runs_root, cfg.name, run_dir, resume,
                                                   config_yaml=config_mod.to_yaml(exp.cfg))
            # One process per run directory: resuming a run that is still training would interleave two writers.
            stack.enter_context(rundir.RunLock(path))
            return str(path), resuming

        claimed, resuming = dist.agree(claim, share=True)  # rank 0 creates the folder; the others learn its path
        path = Path(claimed)
        try:
            return _fit_in(exp, path, resuming, reporter, on_run_dir, probe_factory, started)
        except (InterruptedRun, KeyboardInterrupt) as stop:
            # A KeyboardInterrupt here landed while _fit_in prepared, before its own handler was in place.
            by = stop.signal if isinstance(stop, InterruptedRun) else (
                str(stop) if str(stop) in stopping.REASONS else None)
            if not dist.is_main or resuming or checkpoint.last_path(path).exists():
                if isinstance(stop, InterruptedRun):
                    raise
                raise InterruptedRun(f"interrupted while the run started; continue with: bnctl train --resume {path}",
                                     signal=by) from None
            raise discard_unstarted(path, by) from None


def discard_unstarted(path: Path, by: str | None) -> InterruptedRun:
    """Remove the folder of a run stopped before its first checkpoint; return the InterruptedRun to raise.

    Such a folder holds only what the run wrote at its start and cannot be resumed, so it goes
    rather than lingering as a run that looks usable.
    """
    try:
        shutil.rmtree(path)
        fate = f"the run directory {path} was removed"
    except OSError as err:
        fate = f"{path} holds no checkpoint (removing it failed: {err.strerror or err})"
    return InterruptedRun(f"interrupted in epoch 1, before any epoch completed: nothing was kept and {fate}. "
                          "Start again with the same command", signal=by)


def prepare(cfg: Config, data: ImageData | None = None, resume: Path | None = None, dist: Dist = SINGLE) -> Experiment:
    """setup, then every check a run passes before its run directory exists."""
    # A resumed run may continue on a device without its precision (moved).
    exp = setup(cfg, data, moved=resume is not None, dist=dist)
    if len(exp.train_batches) == 0:
        raise DataError(f"only {len(exp.data.train_y)} training images, fewer than "
                        f"train.batch_size={cfg.train.batch_size}; lower the batch size or add data")
    check_fits(exp)
    if cfg.train.tensorboard:
        tblog.check_available()  # before any run directory exists
    if resume is not None and not checkpoint.last_path(resume).is_file():
        raise ConfigError(f"{resume} has no checkpoint to resume from (no epoch completed); start a new run")
    return exp


def _fit_in(exp: Experiment, run_dir: Path, resuming: bool, reporter: Reporter,
            on_run_dir: Callable[[Path], None], probe_factory, started: float | None = None) -> RunResult:
    """fit's body, once the run directory is chosen and locked: train, evaluate, record, each epoch."""
    cfg, dist = exp.cfg, exp.dist

    # Everything that can fail (reading the checkpoint, the diagnostics kept so far) comes before
    # the first write, so a resume that fails leaves the run's files exactly as they were.
    def restore() -> tuple[list[dict], dict[str, Any], int, Any]:
        history, best, start = (checkpoint.resume_into(exp, run_dir) if resuming
                                else ([], {"test_acc": None, "epoch": None}, 1))
        probe = probe_factory(exp, run_dir, start) if (probe_factory and cfg.train.diagnostics) else None
        probe = landscape.attach(probe, exp, run_dir, start)  # train.landscape: loss-landscape and ICS probes
        return history, best, start, probe

    history, best, start, probe = dist.agree(restore)
    clean_train = clean_train_batches(exp)
    if resuming and exp.device.type == "cpu":
        _keep_threads(exp, run_dir)
    record = RunRecorder(exp, run_dir, history, best, start, resuming, started=started)
    on_run_dir(run_dir)
    # DDP once the weights are final (it broadcasts rank 0's at construction); evaluation skips it.
    exp.eval_forward, exp.forward = exp.forward, dist.wrap(exp.forward)
    record.open()
    if probe is not None:
        probe.open()
    steps = len(exp.train_batches)
    tb = tblog.TensorBoardLog(run_dir, steps, start) if cfg.train.tensorboard and dist.is_main else None
    try:
        for epoch in range(start, cfg.train.epochs + 1):
            reporter.epoch_start(epoch, steps)
            row = _train_and_evaluate(exp, epoch, reporter, probe, clean_train, tb.step if tb else None)
            if not math.isfinite(row["test_loss"]):
                # The epoch's last updates broke the weights (or BN's running statistics): keep the
                # previous checkpoint as the last good one rather than saving a broken model.
                raise DivergedError(f"test loss became {row['test_loss']} after epoch {epoch}", epoch, steps)
            record.epoch(row)
            if tb is not None:
                tb.epoch(epoch, row, exp.model, probe.rows if probe is not None else ())
            if probe is not None:
                probe.flush()
            reporter.epoch_end(row)
            record.summary("running")
        # Inside the try: a stop that lands while the final status is written is handled below like any other.
        final = record.summary("completed")
    except BaseException as err:
        stop = record_stop(record, err)
        if stop is None:
            raise
        raise stop from None
    finally:
        if probe is not None:
            probe.close()
        if tb is not None:
            tb.close()
    return RunResult(run_dir, final, final["wall_time_s"] - record.prior_wall)


def clean_train_batches(exp: Experiment) -> Batches | None:
    """The training images as evaluation batches when train.eval_train asks for the final model's train metrics."""
    if not exp.cfg.train.eval_train:
        return None
    return exp.eval_batches(exp.data.train_x, exp.data.train_y, exp.cfg.train.eval_batch_size)


def record_stop(record: RunRecorder, err: BaseException) -> BaseException | None:
    """Record in a run's files how ``err`` stopped it: diverged, interrupted or failed.

    Returns the exception that tells the caller (a DivergedError or InterruptedRun with a message
    saying what was kept), or None when ``err`` itself should propagate (a failure).
    """
    cfg, run_dir, history = record.exp.cfg, record.run_dir, record.history
    record.settle()
    if isinstance(err, DivergedError):
        record.summary("diverged", diverged={"epoch": err.epoch, "step": err.step, "message": str(err)})
        kept = (f"the last good checkpoint (epoch {len(history)}) and its metrics are kept" if history
                else "no epoch completed, so there is no checkpoint")
        return DivergedError(f"training diverged: {err}. Try a lower optimizer.lr (now {cfg.optimizer.lr:g}), "
                             f"a warm-up schedule or normalization layers; {kept} in {run_dir}", err.epoch, err.step)
    if isinstance(err, KeyboardInterrupt):
        by = str(err) if str(err) in stopping.REASONS else None  # a signal's name when the CLI's handler sent it
        if len(history) >= cfg.train.epochs:  # the stop came as the run finished: every epoch is kept
            record.summary("completed")
            return InterruptedRun(f"stopped as the run finished: all {len(history)} epochs are kept and the run "
                                  f"is complete ({run_dir}); nothing to resume", signal=by)
        # The epoch in progress is the one after the last checkpointed one (the loop may not have advanced yet).
        record.summary("interrupted", interrupted_in_epoch=len(history) + 1, **({"stopped_by": by} if by else {}))
        return InterruptedRun(f"interrupted in epoch {len(history) + 1}; {len(history)} complete epoch(s) kept. "
                              f"Continue with: bnctl train --resume {run_dir}", signal=by)
    record.summary("failed", error=f"{type(err).__name__}: {err}")
    return None


def _train_and_evaluate(exp: Experiment, epoch: int, reporter: Reporter, probe,
                        clean_train: Batches | None, step_log=None) -> dict[str, Any]:
    """Train one epoch, evaluate it and time both: one metrics.csv row."""
    lr = exp.optimizer.param_groups[0]["lr"]  # the lr this epoch starts with
    steps = len(exp.train_batches)
    t0 = time.perf_counter()
    train = train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision,
                            epoch, reporter, probe, first_step=(epoch - 1) * steps, dist=exp.dist,
                            step_log=step_log, threads=exp.threads)
    # Unsynchronized BN leaves each rank its own running statistics: make them one model's (train.dist_bn).
    distributed.reconcile_running_stats(exp.model, exp.dist, exp.cfg.train.dist_bn)
    return evaluate_epoch(exp, epoch, lr, train, time.perf_counter() - t0, clean_train)


def evaluate_epoch(exp: Experiment, epoch: int, lr: float, train: dict[str, float], train_time_s: float,
                   clean_train: Batches | None = None) -> dict[str, Any]:
    """Evaluate the epoch just trained (``train``: train_one_epoch's numbers) into one metrics.csv row."""
    t1 = time.perf_counter()
    # Test metrics always come from eval mode: BN uses its running statistics (or, without them, the statistics
    # of test batches drawn in a seeded random order; see experiment.setup).
    evaluator = exp.forward if exp.eval_forward is None else exp.eval_forward  # never the DDP wrapper
    test = evaluate(evaluator, exp.test_batches, exp.precision, dist=exp.dist)
    row = {"epoch": epoch, "train_loss": train["train_loss"], "train_acc": train["train_acc"],
           "test_loss": test["loss"], "test_acc": test["acc"], "lr": lr}
    if clean_train is not None:  # the running train accuracy mixes many weights; this is the final model's
        clean = evaluate(evaluator, clean_train, exp.precision, dist=exp.dist)
        row |= {"clean_train_loss": clean["loss"], "clean_train_acc": clean["acc"]}
    eval_time_s = time.perf_counter() - t1
    return row | {"epoch_time_s": train_time_s + eval_time_s, "train_time_s": train_time_s, "eval_time_s": eval_time_s,
                  "images_per_s": train["images"] / train_time_s}


def _keep_threads(exp: Experiment, run_dir: Path) -> None:
    """A resumed CPU run trains with the thread count it started with: the count changes the order of float
    sums, so a different one would make the continuation differ from an uninterrupted run."""
    try:
        recorded = rundir.read_json(run_dir / rundir.RUN_INFO_FILE).get("threads")
    except (OSError, ValueError):
        return
    if isinstance(recorded, int) and 1 <= recorded <= torch.get_num_threads() and recorded != exp.threads:
        exp.threads, exp.threads_reason = recorded, f"kept from the run's start ({recorded})"
