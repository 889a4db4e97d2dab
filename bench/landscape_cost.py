"""What train.landscape probes cost: CPU time of training steps with probes off, every 50 and every 200 steps.

    python bench/landscape_cost.py [--batch 4 128] [--steps 400 100] [--threads 1]

The notebook's network (seed_cnn with BN, SGD lr 0.05) on the synthetic data. For each batch size it
trains the same steps three times (probes off, every 50, every 200; the same seed, so the same
batches) and reports process CPU time (user+sys of every thread: less sensitive than wall time to
other processes on shared cores, but not immune to them), wall time, the load average, the probes
taken and, from them, one probe's cost in training steps and the overhead at every=50 and every=200.
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


def measure(batch: int, steps: int, every: int, tmp: Path) -> dict:
    raw = {"seed": 0, "device": "cpu", "data": {"name": "synthetic", "train_size": batch * steps, "test_size": 10},
           "model": {"name": "seed_cnn", "norm": "batch"}, "optimizer": {"name": "sgd", "lr": 0.05},
           "train": {"epochs": 1, "batch_size": batch, "landscape": {"every": every}}}
    cfg = config_mod.validate(raw)
    exp = setup(cfg)
    probe = LandscapeProbe.for_experiment(exp, tmp, 1) if every else None
    if probe is not None:
        probe.open()
    c0, w0 = cpu_seconds(), time.perf_counter()
    engine.train_one_epoch(exp.model, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 1,
                           probe=probe)
    c1, w1 = cpu_seconds(), time.perf_counter()
    probes = len({r[0] for r in probe.rows}) if probe is not None else 0
    return {"cpu_s": c1 - c0, "wall_s": w1 - w0, "probes": probes, "steps": len(exp.train_batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 128])
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 100], help="training steps per batch size")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"landscape_cost_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average at start {os.getloadavg()}")
    for batch, steps in zip(args.batch, args.steps):
        res = {every: measure(batch, steps, every, tmp) for every in (0, 50, 200)}
        step_cpu = res[0]["cpu_s"] / res[0]["steps"]
        print(f"\nbatch {batch}, {steps} steps; load average now {os.getloadavg()}")
        for every, r in res.items():
            extra = r["cpu_s"] - res[0]["cpu_s"]
            line = (f"  every={every or 'off':>4}: CPU {r['cpu_s']:7.2f} s  wall {r['wall_s']:7.2f} s  "
                    f"probes {r['probes']}")
            if every:
                per_probe = extra / max(1, r["probes"])
                line += (f"  measured overhead {100 * extra / res[0]['cpu_s']:5.1f}%  one probe {per_probe:.3f} s CPU "
                         f"= {per_probe / step_cpu:.1f} steps -> overhead at every={every}: "
                         f"{100 * per_probe / (every * step_cpu):.1f}%")
            print(line)
        print(f"  one training step: {1000 * step_cpu:.1f} ms CPU")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
