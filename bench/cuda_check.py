"""Check bnctl's CUDA path on this machine's GPU(s) in one go, and print one table.

    python bench/cuda_check.py                 # eager fp32/bf16/fp16 x channels_last, seed_cnn: ~1-2 minutes
    python bench/cuda_check.py --full          # resnet20, 3 epochs, eager + torch.compile: 12 runs, 10+ minutes
    python bench/cuda_check.py --cifar-root ./data   # real CIFAR-10 instead of the synthetic shapes
    python bench/cuda_check.py --out cuda_check.json # also keep the rows as JSON

For every precision (fp32, bf16, fp16), memory layout (channels_last on/off) and, with --full or
--compile, execution mode (eager, torch.compile) it trains the same short run through bnctl's own
engine (`engine.fit`, a real run directory under a temporary folder) and reports training images/s
of the last epoch (the first pays for cuDNN autotuning and compilation), the first epoch's seconds,
the final test accuracy and the peak GPU memory. A row is "ok" only when the run finished, its test
accuracy reaches --acc-floor and it lies within --max-spread points of every other finished row
(precisions and layouts must agree: a broken autocast or layout would show here). With two or more
GPUs it also trains the fp32 run data-parallel under torchrun with nccl and compares it.

Each configuration runs in its own process with a time limit (--timeout each, --budget for all:
configurations not started within the budget are reported as skipped), so a crash, a compiler error
or an out-of-memory in one of them is reported in its row and the others still run. Without a GPU
the script says so and exits with status 0 (``--allow-cpu`` runs the same harness on the CPU, small
and without fp16, to check the script itself; the exit status is 1 when any row is not ok).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "fp16")


def _overrides(args: argparse.Namespace, device: str, precision: str, channels_last: bool, compile_: bool) -> list[str]:
    data = (["data.name=cifar10", f"data.root={args.cifar_root}"] if args.cifar_root
            else ["data.name=synthetic", f"data.train_size={args.train_size}", f"data.test_size={args.test_size}"])
    return [f"device={device}", "seed=0", "name=cuda_check", f"model.name={args.model}", *data,
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.eval_batch_size=1000",
            f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}",
            f"train.compile={str(compile_).lower()}", "optimizer.name=sgd", "optimizer.lr=0.05",
            "scheduler.name=onecycle", "data.augment=crop_flip"]


def _measure(run_dir: Path) -> dict:
    """The row's numbers from the run's own files."""
    sys.path.insert(0, str(REPO))
    from bnctl import rundir

    rows = rundir.read_csv(run_dir / "metrics.csv")
    info = rundir.read_json(run_dir / "run.json")
    return {"images_per_s": rows[-1]["images_per_s"], "first_epoch_s": rows[0]["epoch_time_s"],
            "test_acc": rows[-1]["test_acc"], "epochs": len(rows), "world_size": info.get("world_size", 1),
            "backend": info.get("backend")}


def one(spec: dict) -> dict:
    """Child process: one configuration through engine.fit; returns its row."""
    sys.path.insert(0, str(REPO))
    import torch

    from bnctl import config as config_mod, engine

    cfg = config_mod.load(None, spec["overrides"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = engine.fit(cfg, runs_root=Path(spec["root"]))
    row = _measure(result.run_dir)
    row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return row


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed ({done.returncode}): {tail[:120]}"}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT "):])}


def run_ddp(args: argparse.Namespace, root: Path, timeout: float) -> dict:
    """fp32 data-parallel on 2 GPUs (nccl, synchronized BN) through torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bnctl",
           "train", "--runs-root", str(root), *_overrides(args, "cuda", "fp32", True, False)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f}s"}
    runs = sorted(root.glob("*-cuda_check"))
    if done.returncode != 0 or not runs:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed ({done.returncode}): {tail[:120]}"}
    return {"status": "ok", **_measure(runs[-1]), "peak_mib": None}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print()
    print("| run | precision | channels_last | mode | train img/s | first epoch s | test acc % | peak GPU MiB "
          "| status |")
    print("|---|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['label']} | {r['precision']} | {r['channels_last']} | {r['mode']} | "
              f"{_cell(r.get('images_per_s'), '.0f')} | {_cell(r.get('first_epoch_s'), '.1f')} | "
              f"{_cell(r.get('test_acc'), '.2f')} | {_cell(r.get('peak_mib'), '.0f')} | {r['status']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small data (5000 images), eager only")
    parser.add_argument("--full", action="store_true", help="resnet20, 3 epochs of 20000 images, eager + compile")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    parser.add_argument("--model", default=None, help="default seed_cnn (resnet20 with --full)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2 (3 with --full)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=None, help="synthetic images (default 10000; 20000 "
                                                                      "--full; 5000 --quick)")
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--cifar-root", default=None, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (even with --full)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds each configuration may take")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all configurations together")
    parser.add_argument("--acc-floor", type=float, default=30.0, help="test accuracy (%%) every row must reach")
    parser.add_argument("--max-spread", type=float, default=5.0,
                        help="most test-accuracy points between any two finished rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--allow-cpu", action="store_true", help="no GPU: run the harness on the CPU (small)")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))), flush=True)
        return 0

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0 and not args.allow_cpu:
        print("cuda_check: no CUDA GPU is visible here (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}); nothing to check. Run it on a machine with a GPU.")
        return 0
    device = "cuda" if gpus else "cpu"
    args.model = args.model or ("resnet20" if args.full else "seed_cnn")
    args.epochs = args.epochs or (3 if args.full else 2)
    args.train_size = args.train_size or (5000 if args.quick else 20000 if args.full else 10000)
    if device == "cpu":
        args.train_size = min(args.train_size, 1000)
        args.test_size, args.batch_size, args.model = min(args.test_size, 500), min(args.batch_size, 64), "seed_cnn"
    modes = [False, True] if (args.full or args.compile) and not (args.quick or args.no_compile) else [False]
    precisions = [p for p in PRECISIONS if device == "cuda" or p != "fp16"]  # fp16 is CUDA-only in bnctl

    name = torch.cuda.get_device_name(0) if gpus else "CPU (harness check only)"
    header = (f"## bnctl CUDA check: {name} x{gpus}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version() if gpus else '-'}\n\n"
              f"{args.model}, batch {args.batch_size}, {args.epochs} epochs of "
              f"{'CIFAR-10' if args.cifar_root else f'{args.train_size} synthetic images'}, SGD + one-cycle, "
              "crop+flip; img/s: training images per second in the last epoch")
    rows: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bnctl-cuda-check-") as tmp:
        for compile_ in modes:
            for precision in precisions:
                for channels_last in (True, False):
                    label = f"{precision}{' cl' if channels_last else ''}{' compiled' if compile_ else ''}"
                    row = {"label": "1 GPU" if gpus else "CPU", "precision": precision,
                           "channels_last": channels_last, "mode": "compile" if compile_ else "eager"}
                    left = args.budget - (time.time() - started)
                    if left < 10:
                        rows.append({**row, "status": f"skipped: the {args.budget:.0f}s budget is spent"})
                        continue
                    print(f"... {label}", file=sys.stderr, flush=True)
                    spec = {"overrides": _overrides(args, device, precision, channels_last, compile_),
                            "root": str(Path(tmp) / label.replace(" ", "_"))}
                    rows.append({**row, **run_child(spec, min(args.timeout, left))})
        if gpus >= 2:
            print("... DDP nccl x2", file=sys.stderr, flush=True)
            rows.append({"label": "2 GPUs DDP nccl, sync BN", "precision": "fp32", "channels_last": True,
                         "mode": "eager", **run_ddp(args, Path(tmp) / "ddp", args.timeout)})
    agreement = judge_accuracy(rows, args.acc_floor, args.max_spread)  # before the table: it can fail rows
    print_table(rows, header)
    if gpus < 2:
        print("\nDDP with nccl: not checked (needs 2 GPUs; this machine has "
              f"{gpus}).")
    else:
        single = next((r for r in rows if r["precision"] == "fp32" and r["channels_last"] and r["mode"] == "eager"), {})
        ddp = rows[-1]
        if single.get("status") == ddp.get("status") == "ok":
            print(f"\nDDP vs 1 GPU (fp32, same global batch): test acc {ddp['test_acc']:.2f}% vs "
                  f"{single['test_acc']:.2f}% (synchronized BN: equal up to float reduction order), "
                  f"{ddp['images_per_s'] / single['images_per_s']:.2f}x the images/s; backend {ddp.get('backend')}")
    print(f"\n{agreement}")
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)}/{len(rows)} configurations ok in {time.time() - started:.0f}s"
          + (f"; {len(failed)} not (see the status column)" if failed else ""))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "accuracy": agreement, "acc_floor": args.acc_floor,
                                        "max_spread": args.max_spread}, indent=2) + "\n")
    return 1 if failed else 0


def judge_accuracy(rows: list[dict], floor: float, spread: float) -> str:
    """Mark finished rows below the floor, or outside the spread of the others, as not ok; say what was found."""
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return "accuracy: no run finished"
    median = sorted(r["test_acc"] for r in done)[len(done) // 2]
    for r in done:
        if r["test_acc"] < floor:
            r["status"] = f"accuracy {r['test_acc']:.2f}% below the floor {floor:g}%"
        elif abs(r["test_acc"] - median) > spread / 2:
            r["status"] = f"accuracy {r['test_acc']:.2f}% is {r['test_acc'] - median:+.2f} from the median"
    accs = [r["test_acc"] for r in done]
    return (f"accuracy: {min(accs):.2f}-{max(accs):.2f}% over {len(done)} finished runs (spread "
            f"{max(accs) - min(accs):.2f}, allowed {spread:g}; floor {floor:g}%)")


if __name__ == "__main__":
    sys.exit(main())
