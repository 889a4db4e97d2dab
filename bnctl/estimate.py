"""How big a set of sweeps is and about how long it will take, said before anything runs.

The time comes from step counts and a short probe. Each run's work is counted from its config
(training steps, images evaluated, epochs left over from a partly done run); each distinct kind of
run (model, norm, width, batch size, device, precision) is timed for a few training steps and one
evaluation batch on random images of the data's size, in this process, with the threads each
worker will get. The estimate is therefore for this machine at its current load, and it leaves
out section 5's evaluations and the imports and data loading of each worker, apart from a fixed
allowance; it is meant to say "minutes or hours", not to the minute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bnctl import rundir

CIFAR_SIZES = (50000, 10000)  # CIFAR-10's training and test images
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RUN_OVERHEAD_S = 1.0  # per run: folder, model build, checkpoint writes (measured ~0.5-1.5 s on a 2-core CPU)
WORKER_START_S = 8.0  # per worker process: importing torch and loading a dataset such as CIFAR-10
PROBE_IMAGES = 128  # training images timed per kind of run (at least 4 steps, at most 32)


@dataclass
class Work:
    """What one run still has to do."""

    key: tuple  # the kind of run: what decides its speed
    steps: int  # training steps left
    eval_images: int  # images evaluated in eval mode over its remaining epochs
    epochs: int  # epochs left


@dataclass
class Estimate:
    """A study's (or sweep's) size, how much of it is done, and the expected time of the rest."""

    runs: int = 0
    finished: int = 0  # completed or diverged
    partly_done: int = 0  # interrupted or stopped mid-way with a checkpoint: continued from it
    to_run: int = 0  # not finished (partly done ones included)
    jobs: int = 1
    device: str = "cpu"
    seconds: float | None = None  # None: some run's data size is unknown
    probe_s: float = 0.0  # what the probe itself took
    unknown: list[str] = field(default_factory=list)  # why there is no time

    def line(self) -> str:
        parts = [f"{self.runs} runs", f"{self.finished} finished"]
        if self.partly_done:
            parts.append(f"{self.partly_done} partly done (continued from their checkpoints)")
        parts.append(f"{self.to_run} to run with {self.jobs} job(s) on {self.device}" if self.to_run
                     else "nothing left to run")
        text = ", ".join(parts)
        if self.to_run and self.seconds is not None:
            text += (f"; estimated {format_duration(self.seconds)} at this machine's current speed "
                     f"(step counts x a {self.probe_s:.0f}s probe)")
        elif self.to_run:
            text += f"; no time estimate ({'; '.join(self.unknown)})"
        return text


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def data_sizes(data) -> tuple[int | None, int | None]:
    """Training images a run uses (after data.train_limit) and test images, from the config and the folder."""
    if data.name == "synthetic":
        train, test = data.train_size, data.test_size
    elif data.name == "cifar10":
        train, test = CIFAR_SIZES
    else:  # imagefolder: count the files (no decoding)
        root = Path(data.root).expanduser()
        train = _count_images(root / "train") if (root / "train").is_dir() else None
        test = _count_images(root / "test") if (root / "test").is_dir() else None
    if train is not None and data.train_limit is not None:
        train = min(train, data.train_limit)
    if test is not None and data.test_limit is not None:
        test = min(test, data.test_limit)
    return train, test


def speed_key(cfg) -> tuple:
    """What decides a run's time per step (not its seed, lr, init scale or dropout rate)."""
    m, t = cfg.model, cfg.train
    return (cfg.device, m.name, m.norm, m.width, m.depth, m.groups, m.virtual_batch_size, m.dropout > 0,
            t.batch_size, t.eval_batch_size, t.precision, t.channels_last, cfg.data.augment,
            getattr(cfg.data, "image_size", 32) if cfg.data.name == "imagefolder" else 32)


def run_work(cfg, epochs_done: int = 0) -> Work | None:
    """The work left in one run; None when its data size cannot be known without loading it."""
    train, test = data_sizes(cfg.data)
    if train is None or test is None:
        return None
    epochs = max(0, cfg.train.epochs - epochs_done)
    steps_per_epoch = train // cfg.train.batch_size  # the incomplete last batch is dropped
    per_epoch_eval = test + (train if cfg.train.eval_train else 0)
    return Work(speed_key(cfg), steps_per_epoch * epochs, per_epoch_eval * epochs, epochs)


def probe(cfg, threads: int) -> tuple[float, float]:
    """Seconds per training step and per evaluated image for runs like cfg, timed here and now."""
    import torch

    from bnctl import engine, experiment
    from bnctl.data import ImageData

    size = speed_key(cfg)[-1]
    bs = cfg.train.batch_size
    steps = min(32, max(4, math.ceil(PROBE_IMAGES / bs)))
    eval_n = min(cfg.train.eval_batch_size, 500)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    labels = lambda n: torch.arange(n) % 10  # noqa: E731
    data = ImageData(rand(bs * steps), labels(bs * steps), rand(eval_n), labels(eval_n), [str(i) for i in range(10)])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exp = experiment.setup(cfg, data=data)
        engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 1)
        t0 = time.perf_counter()  # the second epoch: allocations and first-call costs are paid
        engine.train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 2)
        t1 = time.perf_counter()
        engine.evaluate(exp.forward, exp.test_batches, exp.precision)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    return (t1 - t0) / max(1, len(exp.train_batches)), (t2 - t1) / eval_n


def _epochs_done(sweep_dir: Path, spec) -> int:
    path = Path(sweep_dir) / "runs" / spec.name / rundir.SUMMARY_FILE
    try:
        return int(rundir.read_json(path).get("epochs_completed") or 0) if path.is_file() else 0
    except (OSError, ValueError, TypeError):
        return 0


def estimate(sweep_dirs: Sequence[Path], jobs: int, *, timed: bool = True) -> Estimate:
    """Count the runs of the sweeps (finished, partly done, to run) and estimate the time of the rest."""
    from bnctl import sweep, workers

    est = Estimate(jobs=jobs)
    work: list[Work] = []
    configs: dict[tuple, Any] = {}
    for sweep_dir in sweep_dirs:
        plan = sweep.read_plan(sweep_dir)
        for spec, cfg in plan.configs():
            est.runs += 1
            status, _ = sweep.run_status(sweep_dir, spec)
            if status in sweep.FINISHED:
                est.finished += 1
                continue
            est.to_run += 1
            # as bnctl.sweep.execute counts them: stopped mid-way with a checkpoint to continue from
            partly = (status in ("interrupted", "running")
                      and rundir.last_checkpoint(sweep.run_dir(sweep_dir, spec)).is_file())
            est.partly_done += partly
            done = _epochs_done(sweep_dir, spec) if partly else 0
            w = run_work(cfg, done)
            if w is None:
                est.unknown.append(f"the number of images under data.root={cfg.data.root} is unknown")
                continue
            work.append(w)
            configs.setdefault(w.key, cfg)
    if configs:
        from bnctl.experiment import resolve_device

        est.device = resolve_device(next(iter(configs.values())).device).type
    if not timed or est.unknown or not work:
        est.seconds = None if est.unknown or not timed else 0.0
        return est
    workers_n = min(jobs, len(work))
    threads = max(1, workers.available_cpus() // workers_n)  # what each worker gets (bnctl.workers)
    started = time.perf_counter()
    speeds = {key: probe(cfg, threads) for key, cfg in configs.items()}
    est.probe_s = time.perf_counter() - started
    per_run = [speeds[w.key][0] * w.steps + speeds[w.key][1] * w.eval_images + RUN_OVERHEAD_S for w in work]
    # Runs are handed to free workers one by one: the total is split between them, but never below the longest run.
    est.seconds = max(sum(per_run) / workers_n, max(per_run)) + WORKER_START_S
    return est
