"""What train.landscape probes cost: CPU time of training steps with probes off, every 50 and every 200 steps.

    python bench/landscape_cost.py [--batch 4 128] [--steps 400 100] [--threads 1]

The notebook's network (seed_cnn with BN, SGD lr 0.05) on the synthetic data. For each batch size it
times a training step (mean over `steps`) and one probe alone (mean over --probes), in process CPU
time (user+sys of every thread: less sensitive than wall time to other processes on shared cores,
but not immune to them); the overhead at every=N is one probe / (N training steps). An end-to-end
epoch with every=50 against one without checks the sum. The load average is printed with each.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

from bnctl import config as config_mod, engine
from bnctl.experiment import setup
from bnctl.landscape import LandscapeProbe


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _experiment(batch: int, steps: int, every: int):
    raw = {"seed": 0, "device": "cpu", "data": {"name": "synthetic", "train_size": batch * steps, "test_size": 10},
           "model": {"name": "seed_cnn", "norm": "batch"}, "optimizer": {"name": "sgd", "lr": 0.05},
           "train": {"epochs": 1, "batch_size": batch, "landscape": {"every": every}}}
    return setup(config_mod.validate(raw))


def train_cpu(batch: int, steps: int, every: int, tmp: Path) -> dict:
    """One epoch of `steps` training steps, probes every `every` (0: none): CPU and wall seconds."""
    exp = _experiment(batch, steps, every)
    probe = LandscapeProbe.for_experiment(exp, tmp, 1) if every else None
    if probe is not None:
        probe.open()
    c0, w0 = cpu_seconds(), time.perf_counter()
    engine.train_one_epoch(exp.model, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 1,
                           probe=probe)
    c1, w1 = cpu_seconds(), time.perf_counter()
    probes = len({r[0] for r in probe.rows}) if probe is not None else 0
    return {"cpu_s": c1 - c0, "wall_s": w1 - w0, "probes": probes, "steps": len(exp.train_batches)}


def probe_cpu(batch: int, probes: int, tmp: Path) -> float:
    """CPU seconds of one probe alone (its passes and the optimizer's update), averaged over `probes` batches."""
    import torch.nn.functional as F

    exp = _experiment(batch, probes, 1)
    probe = LandscapeProbe.for_experiment(exp, tmp, 1)
    total = 0.0
    for i, (x, y) in enumerate(exp.train_batches):
        exp.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(exp.model(x), y).backward()
        probe.start_step(i, 1)
        c0 = cpu_seconds()
        probe.after_backward(x, y)
        total += cpu_seconds() - c0
        exp.optimizer.step()
    return total / probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 128])
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 100], help="training steps per batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probes", type=int, default=10, help="probes timed alone per batch size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"landscape_cost_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average at start {os.getloadavg()}")
    for batch, steps in zip(args.batch, args.steps):
        base = train_cpu(batch, steps, 0, tmp)
        step_cpu = base["cpu_s"] / base["steps"]
        one = probe_cpu(batch, args.probes, tmp)
        print(f"\nbatch {batch}: load average {os.getloadavg()}")
        print(f"  training step: {1000 * step_cpu:.1f} ms CPU (mean of {steps}; wall {base['wall_s']:.1f} s in all)")
        print(f"  one probe: {1000 * one:.1f} ms CPU (mean of {args.probes}) = {one / step_cpu:.1f} training steps")
        for every in (50, 200):
            print(f"  overhead at every={every}: {100 * one / (every * step_cpu):.1f}% of training CPU time")
        check = train_cpu(batch, steps, 50, tmp)  # end to end, to check the sum above
        print(f"  end to end with every=50: {check['cpu_s']:.2f} s CPU against {base['cpu_s']:.2f} s without "
              f"({check['probes']} probes): {100 * (check['cpu_s'] / base['cpu_s'] - 1):+.1f}%")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
