"""Data-parallel training on a 2-core CPU: 2 ranks x 1 thread against 1 process x 2 threads.

    python bench/distributed.py                 # 2 alternating repetitions of every arm, a few minutes
    python bench/distributed.py --reps 1 --epochs 2 --train 2560   # quicker

Every arm is a real `bnctl train` (seed_cnn, synthetic data, global batch 128, fp32,
channels_last) in fresh processes; the 2-rank arms go through torchrun (gloo). The
figure is rank 0's training images/s from metrics.csv, the median over epochs after the
first (which pays for warm-up) and over repetitions; arms alternate so that a busy
machine slows them alike. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bnctl import rundir  # noqa: E402 - after the path tweak, so the checkout's bnctl is measured

ARMS = {  # name: (processes, threads each, extra overrides)
    "1 process x 2 threads": (1, 2, []),
    "2 ranks x 1 thread, sync BN (gloo)": (2, 1, []),
    "2 ranks x 1 thread, unsynchronized BN": (2, 1, ["train.sync_bn=false"]),
    "1 process x 1 thread (reference)": (1, 1, []),
}


def run_arm(procs: int, threads: int, extra: list[str], args, workdir: Path) -> dict:
    run_dir = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    overrides = [f"data.train_size={args.train}", f"data.test_size={args.test}", f"train.epochs={args.epochs}",
                 "train.batch_size=128", "train.eval_batch_size=500", "device=cpu", "model.name=seed_cnn",
                 "data.name=synthetic", *extra]
    train = ["-m", "bnctl", "train", "--config", str(ROOT / "bnctl" / "configs" / "seed.yaml"), "--run-dir", str(run_dir),
             *overrides]
    launcher = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(launcher + train, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"arm failed:\n{done.stdout}\n{done.stderr}")
    rows = rundir.read_csv(run_dir / rundir.METRICS_FILE)
    return {"img_s": [r["images_per_s"] for r in rows[1:]], "train_s": [r["train_time_s"] for r in rows[1:]],
            "wall": wall, "acc": rows[-1]["test_acc"], "loss": rows[-1]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=5120)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(ARMS) if rep % 2 == 0 else list(reversed(ARMS))
            for name in order:
                results[name].append(run_arm(*ARMS[name], args, Path(tmp)))
                print(f"  rep {rep + 1} {name}: {statistics.median(results[name][-1]['img_s']):.0f} img/s",
                      file=sys.stderr)
    load_after = os.getloadavg()[0]
    base = statistics.median(x for r in results["1 process x 2 threads"] for x in r["img_s"])
    print(f"seed_cnn, synthetic, global batch 128, fp32 channels_last, {args.train} training images, "
          f"{args.epochs} epochs, {args.reps} repetition(s); {os.cpu_count()} CPUs; "
          f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after\n")
    print("| arm | train img/s (median; min-max) | vs 1 process x 2 threads | final train loss | "
          "final test acc | wall s per run (incl. start-up) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        speeds = [x for r in runs for x in r["img_s"]]
        med = statistics.median(speeds)
        print(f"| {name} | {med:.0f} ({min(speeds):.0f}-{max(speeds):.0f}) | {med / base:.2f}x | "
              f"{runs[-1]['loss']:.4f} | {runs[-1]['acc']:.2f}% | {statistics.median(r['wall'] for r in runs):.1f} |")


if __name__ == "__main__":
    main()
