"""How `bnctl sweep --jobs N` scales, and what a sweep costs per run beyond training and evaluation.

    python bench/sweep_jobs.py --quick      # smoke run: 4 small runs per arm, about a minute on 2 quiet cores
    python bench/sweep_jobs.py              # 8 notebook-sized runs (batch 4, 10,000 images, 1 epoch) per arm
    python bench/sweep_jobs.py --jobs 1 2 4 # other arms

Every arm runs one whole sweep through `bnctl.sweep.execute` in a fresh Python process
(so it pays for importing torch, generating the data and, with --jobs > 1, starting the
workers, as a user's sweep does). Arms alternate (1 2, 2 1, ...) so a machine that gets
busier slows them alike; the table gives medians over rounds. Figures:

- runs/hour: runs / wall time of the whole process (start-up included), and of execute alone;
- overhead per run, all-in: (jobs x execute wall - the runs' own train + eval time) / runs,
  i.e. worker-seconds not spent training or evaluating, start-up amortized;
- overhead per run, steady: median over runs that were not their process's first of
  (time from the task reaching its process to the run's end - its train + eval time):
  run directory, provenance, model and optimizer, checkpoints, summary, results.csv;
- CPU s per run: user + system CPU time of the arm's processes (workers included) / runs,
  which other load on the machine hardly changes, unlike every wall-clock figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FULL = {"runs": 8, "train": 10000, "test": 2000, "rounds": 2}
QUICK = {"runs": 4, "train": 1000, "test": 500, "rounds": 1}

# One arm, in a fresh process: plan, create and execute a sweep; print one JSON line.
ARM = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from bnctl import sweep
spec = json.loads(sys.argv[1])
base = {"name": "bench", "device": "cpu",
        "data": {"name": "synthetic", "train_size": spec["train"], "test_size": spec["test"]},
        "model": {"name": "seed_cnn", "norm": "batch"}, "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 1, "batch_size": 4, "eval_batch_size": 1000}}
cfg = Path(spec["dir"]) / "base.yaml"
cfg.write_text(json.dumps(base))
plan = sweep.plan_inline(cfg, [], seeds=spec["runs"], name="bench")
d = sweep.create(plan, Path(spec["dir"]) / "sweeps")
t1 = time.perf_counter()
out = sweep.execute(d, jobs=spec["jobs"])
t2 = time.perf_counter()
print(json.dumps({"dir": str(d), "execute_s": t2 - t1, "before_execute_s": t1 - t0,
                  "completed": len(out.completed), "timings": out.timings}))
"""


def run_arm(jobs: int, p: dict, workdir: Path) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"jobs{jobs}-", dir=workdir))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, "-c", ARM, json.dumps({**p, "jobs": jobs, "dir": str(folder)})],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if out.returncode != 0:
        sys.exit(f"arm --jobs {jobs} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["completed"] != p["runs"]:
        sys.exit(f"arm --jobs {jobs}: only {result['completed']} of {p['runs']} runs completed")
    own = {}  # run -> its own train + eval seconds, from metrics.csv
    for run in (Path(result["dir"]) / "runs").iterdir():
        with open(run / "metrics.csv", newline="") as f:
            own[run.name] = sum(float(r["epoch_time_s"]) for r in csv.DictReader(f))
    steady = [t["seconds"] - own[name] for name, t in result["timings"].items() if not t["first_in_process"]]
    return {"jobs": jobs, "wall_s": wall, "cpu_per_run_s": cpu / p["runs"], "execute_s": result["execute_s"], "own_s": sum(own.values()),
            "mean_run_s": statistics.mean(own.values()),
            "all_in_overhead_s": (jobs * result["execute_s"] - sum(own.values())) / p["runs"],
            "steady_overhead_s": statistics.median(steady) if steady else float("nan")}


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (a waited arm includes its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 small runs per arm, one round")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="arms (default: 1 2)")
    ap.add_argument("--rounds", type=int, help="repetitions of every arm (default: 2, or 1 with --quick)")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.rounds:
        p["rounds"] = args.rounds
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before, started = load(), time.time()
    results: dict[int, list[dict]] = {j: [] for j in args.jobs}
    with tempfile.TemporaryDirectory(prefix="bnctl-bench-sweep-") as tmp:
        for r in range(p["rounds"]):
            order = args.jobs if r % 2 == 0 else list(reversed(args.jobs))
            for jobs in order:
                res = run_arm(jobs, p, Path(tmp))
                results[jobs].append(res)
                print(f"  round {r + 1} --jobs {jobs}: {res['wall_s']:.1f} s", file=sys.stderr)
    med = {j: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for j, rs in results.items()}
    base = med[args.jobs[0]]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python bench/sweep_jobs.py{' --quick' if args.quick else ''}` "
        f"({(time.time() - started) / 60:.1f} min) on {platform.processor() or platform.machine()}, {cores} cores, "
        f"Python {platform.python_version()}. Load average (1 min) {load_before} before, {load()} after "
        "(the benchmark itself accounts for up to the number of jobs; more means other work shared the cores).",
        "",
        f"{p['runs']} runs per arm: seed_cnn with BN, batch 4, {p['train']:,} synthetic training / {p['test']:,} "
        f"test images, 1 epoch, seeds 0-{p['runs'] - 1}; median of {p['rounds']} round(s).",
        "",
        "| --jobs | wall s (whole process) | runs/hour | speed-up | runs/hour, execute only | speed-up | "
        "train+eval s per run | overhead per run, all-in | overhead per run, steady | CPU s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in args.jobs:
        m = med[j]
        rph, rph_exec = 3600 * p["runs"] / m["wall_s"], 3600 * p["runs"] / m["execute_s"]
        base_rph, base_exec = 3600 * p["runs"] / base["wall_s"], 3600 * p["runs"] / base["execute_s"]
        lines.append(f"| {j} | {m['wall_s']:.1f} | {rph:.0f} | {rph / base_rph:.2f}x | {rph_exec:.0f} | "
                     f"{rph_exec / base_exec:.2f}x | {m['mean_run_s']:.2f} | {m['all_in_overhead_s']:.2f} s | "
                     f"{m['steady_overhead_s']:.2f} s | {m['cpu_per_run_s']:.2f} |")
    lines += ["", "Targets: --jobs 2 at least 1.8x the runs/hour of --jobs 1 on 2 cores; overhead per run under 1 s. "
              "'all-in' spreads the start-up (importing torch, generating the data, starting workers) over the runs; "
              "'steady' is what each further run costs. CPU s per run (user + system, all processes of the arm, "
              "start-up included) barely depends on other load: similar figures for both arms mean the workers "
              "add little work, so on 2 otherwise idle cores --jobs 2 would approach twice the runs/hour."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
