"""bnctl's speed benchmark in one command; prints a markdown report (bench/README.md explains it).

    python bench/run.py --quick          # smoke run, about a minute
    python bench/run.py                  # full run, under ~10 minutes on 2 quiet cores
    python bench/run.py --write          # ... and put the report into bench/RESULTS.md

Every trial runs in its own process (bench/trials.py); the arms of a comparison
alternate (A B B A ...) so that a busy machine slows all of them alike, and the
report gives medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

FULL = {"train": 10000, "test": 2000, "reps": 5, "precision_reps": 3, "precision_epochs": 5, "memory_train": 50000}
QUICK = {"train": 2000, "test": 500, "reps": 1, "precision_reps": 1, "precision_epochs": 2, "memory_train": 10000}

# Mode 1: the notebook's loop against bnctl at the notebook's batch size.
NOTEBOOK_ARMS = {
    "notebook loop (DataLoader, 2 workers, PIL, 4 passes)": {"kind": "notebook"},
    "bnctl, seed settings (fp32, channels_last)": {"kind": "bnctl"},
    "bnctl, NCHW layout (channels_last=false)": {"kind": "bnctl", "settings": {"channels_last": False}},
}
# Mode 2: plain fp32 eager against bnctl's fast CPU settings at batch 128.
PRECISION_ARMS = {
    "fp32 eager, NCHW": {"kind": "bnctl", "settings": {"channels_last": False}},
    "bf16 + channels_last": {"kind": "bnctl", "settings": {"precision": "bf16", "channels_last": True}},
}
COMPILE_ARM = {"bf16 + channels_last + compile": {"kind": "bnctl", "settings": {
    "precision": "bf16", "channels_last": True, "compile": True}}}


def run_trial(spec: dict) -> dict:
    """One trial in a fresh Python process; its JSON result."""
    out = subprocess.run([sys.executable, str(BENCH / "trials.py"), json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"trial {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(arms: dict[str, dict], base: dict, reps: int, log) -> dict[str, list[dict]]:
    """Run every arm `reps` times, reversing the order each round (A B, B A, ...).

    Round k uses seed k for every arm: at batch 4, BN's running statistics come from a
    few dozen images, so one seed's eval-mode accuracy varies by a few points and only
    an average over seeds compares the arms' accuracy fairly.
    """
    results: dict[str, list[dict]] = {name: [] for name in arms}
    names = list(arms)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            result = run_trial({**base, **arms[name], "seed": rep})
            results[name].append(result)
            log(f"  rep {rep + 1}/{reps} {name}: epoch {fmt_s(result['epoch_s'][-1])}, "
                f"test acc {result['test_acc']:.2f}%")
    return results


def repetitions(n: int) -> str:
    return "1 run, seed 0" if n == 1 else f"{n} alternating repetitions, seeds 0-{n - 1}"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def steady_images_per_s(result: dict) -> float:
    """Training images per second, leaving out a compiled model's first (compiling) epoch."""
    train_s = result["train_s"][1:] if len(result["train_s"]) > 1 else result["train_s"]
    return result["train_images"] / statistics.median(train_s)


def summarize(results: list[dict]) -> dict:
    epoch = [r["epoch_s"][0] for r in results]
    accs = [r["test_acc"] for r in results]
    return {
        "epoch_s": statistics.median(epoch), "epoch_min": min(epoch), "epoch_max": max(epoch),
        "img_s": statistics.median(steady_images_per_s(r) for r in results),
        "total_s": statistics.median(sum(r["epoch_s"]) for r in results),
        "rss": max(r["peak_rss_mb"] for r in results),
        "workers_rss": max(r["workers_peak_rss_mb"] for r in results),
        "acc": statistics.mean(accs), "acc_min": min(accs), "acc_max": max(accs),
        "notebook_acc": (statistics.mean(r["notebook_test_acc"] for r in results)
                         if "notebook_test_acc" in results[0] else None),
        "threads": results[0]["threads"], "n": len(results),
    }


def acc_cell(s: dict) -> str:
    spread = f" ({s['acc_min']:.2f}-{s['acc_max']:.2f})" if s["acc_max"] > s["acc_min"] else ""
    return f"{s['acc']:.2f}%{spread}"


# ------------------------------------------------------------------ the four measurements

def notebook_mode(p: dict, data: dict, log) -> str:
    log(f"[1/4] notebook loop vs bnctl: batch 4, {p['train']} train / {p['test']} test images, 1 epoch")
    base = {"epochs": 1, "batch": 4, "train": p["train"], "test": p["test"], **data}
    sums = {name: summarize(r) for name, r in alternate(NOTEBOOK_ARMS, base, p["reps"], log).items()}
    ref = next(iter(sums.values()))
    lines = [
        f"**1. The notebook's loop vs bnctl** (batch 4, {p['train']:,} training / {p['test']:,} test images, "
        f"1 epoch + test evaluation, {repetitions(p['reps'])})\n",
        "| arm | epoch s (median; min-max) | speed-up | train img/s | peak RSS | test acc, eval mode (mean; min-max) "
        "| threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in sums.items():
        rss = f"{s['rss']:.0f} MB" + (f" + workers {s['workers_rss']:.0f} MB" if name == next(iter(sums)) else "")
        lines.append(f"| {name} | {fmt_s(s['epoch_s'])} ({fmt_s(s['epoch_min'])}-{fmt_s(s['epoch_max'])}) | "
                     f"{ref['epoch_s'] / s['epoch_s']:.1f}x | {s['img_s']:.0f} | {rss} | {acc_cell(s)} "
                     f"| {s['threads']} |")
    lines.append(f"\nThe notebook itself reports test accuracy in train mode: {ref['notebook_acc']:.2f}% "
                 f"(eval mode on the same weights: {ref['acc']:.2f}%). Its epoch is four passes "
                 "(train, test loss, train accuracy, test accuracy); bnctl's is train + one eval-mode test pass.")
    return "\n".join(lines)


def precision_mode(p: dict, data: dict, log, with_compile: bool) -> str:
    epochs = p["precision_epochs"]
    log(f"[2/4] fp32 eager vs bf16 + channels_last: batch 128, {epochs} epochs")
    base = {"epochs": epochs, "batch": 128, "train": p["train"], "test": p["test"], **data}
    results = alternate(PRECISION_ARMS, base, p["precision_reps"], log)
    if with_compile:
        results |= alternate(COMPILE_ARM, {**base, "epochs": max(2, epochs)}, 1, log)
    sums = {name: summarize(r) for name, r in results.items()}
    ref = next(iter(sums.values()))
    lines = [
        f"**2. Batch 128: plain fp32 eager vs bnctl's fast CPU settings** ({p['train']:,} training / "
        f"{p['test']:,} test images, {epochs} epochs, {repetitions(p['precision_reps'])}; "
        "all bnctl's engine)\n",
        "| settings | train img/s (median) | speed-up | time for all epochs | peak RSS "
        "| final test acc, eval mode (mean; min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sums.items():
        lines.append(f"| {name} | {s['img_s']:.0f} | {s['img_s'] / ref['img_s']:.2f}x | {fmt_s(s['total_s'])} | "
                     f"{s['rss']:.0f} MB | {acc_cell(s)} |")
    if with_compile:
        lines.append("\nThe compiled arm ran once; its img/s leaves out the first epoch, which includes "
                     "compilation; its total time includes it (shorter when torch's compile cache in /tmp "
                     "is already warm).")
    return "\n".join(lines)


def memory_mode(p: dict, data: dict, log, runs_root: Path) -> tuple[str, Path | None]:
    log("[3/4] peak memory of `bnctl train`, CIFAR-10-sized data")
    overrides = ["data.name=synthetic", f"data.train_size={p['memory_train']}", "data.test_size=10000",
                 "train.epochs=1", "device=cpu"]
    if data.get("cifar_root"):
        overrides = ["data.name=cifar10", f"data.root={data['cifar_root']}", "train.epochs=1", "device=cpu"]
    cmd = bnctl_command() + ["train", "--config", str(ROOT / "bnctl" / "configs" / "seed.yaml"), *overrides,
                             "--runs-root", str(runs_root)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bnctl train failed:\n{output[-3000:]}")
    run_dir = next((Path(line.strip()) for line in reversed(output.splitlines()) if Path(line.strip()).is_dir()), None)
    peak = usage.ru_maxrss / 1024
    log(f"  peak RSS {peak:.0f} MB in {wall:.0f} s")
    text = (f"**3. Peak memory of `bnctl train`** (bnctl/configs/seed.yaml with {' '.join(overrides)}: "
            f"every training and test image resident as uint8, one full epoch at batch 4, eval batch 1000): "
            f"**{peak:.0f} MB** max RSS (target < 1,500 MB); the whole command took {wall:.0f} s.")
    return text, run_dir


def cli_mode(log, run_dir: Path | None) -> str:
    log("[4/4] CLI start-up")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run(bnctl_command() + ["--help"], cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    text = f"**4. CLI start-up:** `bnctl --help` {statistics.median(times):.2f} s (median of 5; target < 0.5 s)"
    if run_dir is not None:
        probe = ("import sys, time; from bnctl.cli import app; t = time.perf_counter()\n"
                 "try:\n    app(['plot', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
                 "print('torch' in sys.modules, time.perf_counter() - t)")
        out = subprocess.run([sys.executable, "-c", probe, str(run_dir)], cwd=ROOT, capture_output=True, text=True)
        imported, seconds = out.stdout.split()[-2:]
        text += (f"; `bnctl plot RUN_DIR` {float(seconds):.2f} s in-process, "
                 f"{'imports torch (!)' if imported == 'True' else 'without importing torch'}.")
    return text


def bnctl_command() -> list[str]:
    script = Path(sys.executable).parent / "bnctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bnctl"]


# ------------------------------------------------------------------ report

def machine() -> str:
    import torch

    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16 = "avx512_bf16" in flags
    return (f"{model}, {os.cpu_count()} cores{' (avx512_bf16)' if bf16 else ''}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition (a smoke test)")
    parser.add_argument("--reps", type=int, help="repetitions of each arm (full: 5 at batch 4, 3 at batch 128)")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile arm at batch 128 (~1 min extra)")
    parser.add_argument("--cifar-root", help="use real CIFAR-10 from this folder (holding cifar-10-batches-py/)")
    parser.add_argument("--write", action="store_true", help=f"put the report into {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()

    p = dict(QUICK if args.quick else FULL)
    if args.reps:
        p["reps"] = p["precision_reps"] = args.reps
    data = {"cifar_root": str(Path(args.cifar_root).resolve())} if args.cifar_root else {}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bnctl-bench-") as tmp:
        sections = [notebook_mode(p, data, log), precision_mode(p, data, log, args.compile)]
        memory_text, run_dir = memory_mode(p, data, log, Path(tmp))
        sections += [memory_text, cli_mode(log, run_dir)]
    minutes = (time.perf_counter() - started) / 60
    header = (f"Measured {datetime.date.today().isoformat()} with `python bench/run.py"
              f"{' --quick' if args.quick else ''}{' --compile' if args.compile else ''}` "
              f"({minutes:.1f} min) on {machine()}. Data: "
              f"{'CIFAR-10 from ' + data['cifar_root'] if data else 'bnctl synthetic shapes'}. "
              f"Load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              f"(the benchmark itself accounts for 1-2; more means other work shared the cores).")
    report = "\n\n".join([header, *sections]) + "\n"
    print(report)
    if args.write:
        write_results(report)
        log(f"wrote {RESULTS}")


def write_results(report: str) -> None:
    """Replace the generated part of RESULTS.md, keeping the notes written around it."""
    block = f"{BEGIN}\n{report}{END}"
    if RESULTS.exists() and BEGIN in (text := RESULTS.read_text()) and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = f"# Benchmark results\n\n{block}\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
