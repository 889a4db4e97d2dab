"""How `bnctl sweep --jobs N` scales, and what a sweep costs per run beyond training and evaluation.

    python bench/sweep_jobs.py --quick      # smoke run: 4 small runs per arm, about a minute on 2 quiet cores
    python bench/sweep_jobs.py              # 8 notebook-sized runs (batch 4, 10,000 images, 1 epoch) per arm
    python bench/sweep_jobs.py --jobs 1 2 4 # other arms
    python bench/sweep_jobs.py --jobs 1 2 --pack 4 --batch 32   # and a --pack 4 arm (one process), at batch 32

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
        "train": {"epochs": 1, "batch_size": spec["batch"], "eval_batch_size": 1000}}
cfg = Path(spec["dir"]) / "base.yaml"
cfg.write_text(json.dumps(base))
plan = sweep.plan_inline(cfg, [], seeds=spec["runs"], name="bench")
d = sweep.create(plan, Path(spec["dir"]) / "sweeps")
t1 = time.perf_counter()
out = sweep.execute(d, jobs=spec["jobs"], pack=spec["pack"])
t2 = time.perf_counter()
print(json.dumps({"dir": str(d), "execute_s": t2 - t1, "before_execute_s": t1 - t0,
                  "completed": len(out.completed), "timings": out.timings}))
"""


def run_arm(arm: tuple[int, int], p: dict, workdir: Path) -> dict:
    jobs, pack = arm
    folder = Path(tempfile.mkdtemp(prefix=f"jobs{jobs}-pack{pack}-", dir=workdir))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, "-c", ARM, json.dumps({**p, "jobs": jobs, "pack": pack, "dir": str(folder)})],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if out.returncode != 0:
        sys.exit(f"arm {label(arm)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["completed"] != p["runs"]:
        sys.exit(f"arm {label(arm)}: only {result['completed']} of {p['runs']} runs completed")
    own = {}  # run -> its own train + eval seconds, from metrics.csv
    for run in (Path(result["dir"]) / "runs").iterdir():
        with open(run / "metrics.csv", newline="") as f:
            own[run.name] = sum(float(r["epoch_time_s"]) for r in csv.DictReader(f))
    # A packed run's timing is its pack's, and its own time a share of it: no per-run steady overhead to take.
    steady = [t["seconds"] - own[name] for name, t in result["timings"].items()
              if not t["first_in_process"] and pack == 1]
    return {"jobs": jobs, "wall_s": wall, "cpu_s": cpu, "cpu_per_run_s": cpu / p["runs"], "execute_s": result["execute_s"], "own_s": sum(own.values()),
            "mean_run_s": statistics.mean(own.values()),
            "all_in_overhead_s": (jobs * result["execute_s"] - sum(own.values())) / p["runs"],
            "steady_overhead_s": statistics.median(steady) if steady else float("nan")}


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (a waited arm includes its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def label(arm: tuple[int, int]) -> str:
    jobs, pack = arm
    return f"--jobs {jobs}" + (f" --pack {pack}" if pack > 1 else "")


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 small runs per arm, one round")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="arms (default: 1 2)")
    ap.add_argument("--pack", type=int, nargs="*", default=[],
                    help="also arms that pack K seeds per process, with one job (e.g. --pack 4)")
    ap.add_argument("--batch", type=int, default=4, help="training batch size (default: 4)")
    ap.add_argument("--runs", type=int, help="runs per arm (default: 8, or 4 with --quick)")
    ap.add_argument("--rounds", type=int, help="repetitions of every arm (default: 2, or 1 with --quick)")
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    p["batch"] = args.batch
    if args.rounds:
        p["rounds"] = args.rounds
    if args.runs:
        p["runs"] = args.runs
    arms = [(j, 1) for j in args.jobs] + [(1, k) for k in args.pack]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before, started = load(), time.time()
    results: dict[tuple[int, int], list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="bnctl-bench-sweep-") as tmp:
        for r in range(p["rounds"]):
            order = arms if r % 2 == 0 else list(reversed(arms))
            for arm in order:
                res = run_arm(arm, p, Path(tmp))
                results[arm].append(res)
                print(f"  round {r + 1} {label(arm)}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, "
                      f"load {load()}", file=sys.stderr)
    med = {a: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for a, rs in results.items()}
    base = med[arms[0]]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} with `python bench/sweep_jobs.py{''.join(' ' + a for a in sys.argv[1:])}` "
        f"({(time.time() - started) / 60:.1f} min) on {platform.processor() or platform.machine()}, {cores} cores, "
        f"Python {platform.python_version()}. Load average (1 min) {load_before} before, {load()} after "
        "(the benchmark itself accounts for up to the number of jobs; more means other work shared the cores).",
        "",
        f"{p['runs']} runs per arm: seed_cnn with BN, batch {p['batch']}, {p['train']:,} synthetic training / {p['test']:,} "
        f"test images, 1 epoch, seeds 0-{p['runs'] - 1}; median of {p['rounds']} round(s).",
        "",
        "| arm | wall s (whole process) | runs/hour | speed-up | runs/hour, execute only | speed-up | "
        "train+eval s per run | overhead per run, all-in | overhead per run, steady | CPU s per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        m = med[arm]
        rph, rph_exec = 3600 * p["runs"] / m["wall_s"], 3600 * p["runs"] / m["execute_s"]
        base_rph, base_exec = 3600 * p["runs"] / base["wall_s"], 3600 * p["runs"] / base["execute_s"]
        lines.append(f"| {label(arm)} | {m['wall_s']:.1f} | {rph:.0f} | {rph / base_rph:.2f}x | {rph_exec:.0f} | "
                     f"{rph_exec / base_exec:.2f}x | {m['mean_run_s']:.2f} | {m['all_in_overhead_s']:.2f} s | "
                     f"{'-' if arm[1] > 1 else format(m['steady_overhead_s'], '.2f') + ' s'} | {m['cpu_per_run_s']:.2f} |")
    lines += ["", "Targets: --jobs 2 at least 1.8x the runs/hour of --jobs 1 on 2 cores; overhead per run under 1 s. "
              "'all-in' spreads the start-up (importing torch, generating the data, starting workers) over the runs; "
              "'steady' is what each further run costs. CPU s per run (user + system, all processes of the arm, "
              "start-up included) barely depends on other load: similar figures for both arms mean the workers "
              "add little work, so on 2 otherwise idle cores --jobs 2 would approach twice the runs/hour."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
