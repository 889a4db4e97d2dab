"""One call that tells whether bnctl's CUDA path is right and fast, made to fit a few minutes of GPU time.

    bash bench/gpu_check.sh                      # on the GPU machine: installs the carried wheels, then this
    python bench/gpu_check.py --allow-cpu --tiny # here: the same checks on the CPU, tiny sizes (tests the script)

Parts (each a row of the table; a failing part does not stop the others):

  a  train    the notebook's network (seed_cnn + BN) through the CLI on CIFAR-format data of CIFAR-10's
              size (bnctl's synthetic shapes written as CIFAR-10 batch files), batch 512, a few epochs;
              the final test accuracy must reach a floor
  b  devices  the same few SGD steps on the CPU and on CUDA (fp32, TF32 off): losses and every weight
              and BN buffer must agree within a tolerance
  c  syncs    host synchronizations per training step, counted with CUDA's sync debug mode (on the
              CPU: tensor reads to the host); every step must have none except the progress updates,
              where the running loss is read one update late
  d  precis.  bench/cuda_check.py over fp32/bf16/fp16 x channels_last: every run above a floor and
              the test accuracies within a spread of each other
  e  compile  a train.compile=true run through the CLI with TORCH_LOGS=recompiles: its (compiled)
              evaluation must agree with an eager evaluation of its checkpoint; recompiles are
              counted and must stay under dynamo's cache limit (beyond it torch silently falls back)
  f  pack     packed seeds (bnctl sweep --pack 4) against the same 4 runs one after another, at batch
              4 and 32 on a slice of the data: runs/hour of each, and every packed member's train loss
              near its unpacked run's (a gross check; tests/test_packed.py holds the exact ones)

It prints one table and writes everything measured to --out (JSON); the exit status is 1 when a
part failed. The default sizes are for one GPU and about 5 minutes (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Sizes and limits per mode. "gpu": CIFAR-10's size; no GPU has run these settings yet, so the accuracy
# floors are 3x and 2x chance: they catch training that does not learn (the JSON calibrates them later).
# "tiny": every part on 2 CPU cores, to test the script. 94 steps barely start learning: its floor (13%)
# is chance plus 2.3 standard errors of 500 test images; its cuda_check runs are too short to learn, so
# part d has no floor there (harness only).
MODES = {
    "gpu": dict(train=50_000, test=10_000, batch=512, epochs=3, floor=30.0, steps_images=512 * 5,
                sync_images=512 * 24, check_train=10_000, check_epochs=2, check_floor=20.0, check_spread=5.0,
                compile_images=10_000, compile_epochs=2, pack_k=4, pack_batches=(4, 32), pack_images=2048),
    "tiny": dict(train=1_500, test=500, batch=32, epochs=2, floor=13.0, steps_images=32 * 4,
                 sync_images=32 * 24, check_train=500, check_epochs=1, check_floor=0.0, check_spread=100.0,
                 compile_images=256, compile_epochs=1, pack_k=4, pack_batches=(4, 32), pack_images=128),
}
# Parts b and e: how closely two computations of the same thing must agree.
DEVICE_WEIGHT_ATOL = 1e-4  # max |w_cpu - w_cuda| over every weight and BN buffer after the steps (SGD, fp32)
DEVICE_LOSS_RTOL = 1e-4  # relative difference of the running train loss and the test loss
COMPILE_ACC_TOL = 0.5  # test accuracy points between the compiled evaluation and the eager one
COMPILE_LOSS_RTOL = 1e-3
# Part f: a packed member's final running train loss against its unpacked run's. Rounding grows over an
# epoch of steps (bench/RESULTS.md, packed seeds), so this only catches a member trained on the wrong thing.
PACK_LOSS_ATOL = 0.1


def env_with_repo() -> dict[str, str]:
    """The environment for a child: bnctl importable from this tree (no install needed)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def write_cifar_format(root: Path, train: int, test: int) -> Path:
    """bnctl's synthetic shapes as CIFAR-10 python batch files (5 train + 1 test) under root/cifar-10-batches-py."""
    from bnctl.config import DataConfig
    from bnctl.data import CIFAR_DIR, CIFAR_TEST_FILES, CIFAR_TRAIN_FILES, load_synthetic

    data = load_synthetic(DataConfig(train_size=train, test_size=test))
    folder = root / CIFAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    train_x = data.train_x.reshape(len(data.train_y), -1).numpy()
    chunks = [(i * train // 5, (i + 1) * train // 5) for i in range(5)]
    for name, (lo, hi) in zip(CIFAR_TRAIN_FILES, chunks):
        entry = {"data": train_x[lo:hi], "labels": data.train_y[lo:hi].tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    entry = {"data": data.test_x.reshape(len(data.test_y), -1).numpy(), "labels": data.test_y.tolist()}
    (folder / CIFAR_TEST_FILES[0]).write_bytes(pickle.dumps(entry, protocol=2))
    return root


def write_config(path: Path, device: str, data_root: Path, **train) -> Path:
    """A config file for the CLI (the notebook's network; Adam + one-cycle)."""
    import yaml

    cfg = {"name": "gpu_check", "seed": 0, "device": device,
           "data": {"name": "cifar10", "root": str(data_root), "augment": "crop_flip"},
           "model": {"name": "seed_cnn", "norm": "batch"},
           "optimizer": {"name": "adam", "lr": 0.003},
           "scheduler": {"name": "onecycle"},
           "train": {"eval_batch_size": 1000, "tf32": False, "cudnn_benchmark": False, **train}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(args: list[str], log: Path, extra_env: dict[str, str] | None = None, timeout: float = 300) -> Path:
    """`python -m bnctl ARGS` in a child process; returns the run directory it created."""
    done = subprocess.run([sys.executable, "-m", "bnctl", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**env_with_repo(), **(extra_env or {})})
    log.write_text(f"$ bnctl {' '.join(args)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"bnctl exited with {done.returncode}: {tail[:200]} (log: {log})")
    root = Path(args[args.index("--runs-root") + 1])
    return sorted(p for p in root.iterdir() if p.is_dir())[-1]


# ------------------------------------------------------------------ the parts

def part_train(ctx: dict) -> dict:
    from bnctl import rundir

    m = ctx["mode"]
    cfg = write_config(ctx["tmp"] / "a.yaml", ctx["device"], ctx["data"], epochs=m["epochs"], batch_size=m["batch"])
    run = run_cli(["train", "-c", str(cfg), "--runs-root", str(ctx["tmp"] / "a")], ctx["out"] / "a_train.log")
    rows = rundir.read_csv(run / "metrics.csv")
    info = rundir.read_json(run / "run.json")
    acc = rows[-1]["test_acc"]
    return {"measured": f"test acc {acc:.2f}% after {len(rows)} epochs",
            "limit": f">= {m['floor']:.0f}%", "ok": acc >= m["floor"],
            "details": {"rows": rows, "run_json": {k: info.get(k) for k in ("device", "threads", "cudnn_benchmark",
                                                                            "tf32", "steps_per_epoch")},
                        "last_epoch_images_per_s": rows[-1]["images_per_s"]}}


def _steps_state(device: str, ctx: dict) -> tuple[dict, dict]:
    """A few SGD steps (one epoch of steps_images) on one device: metrics row and the final state_dict on the CPU."""
    import torch

    from bnctl import checkpoint, config as config_mod, engine

    m = ctx["mode"]
    raw = {"name": f"steps-{device}", "seed": 0, "device": device,
           "data": {"name": "cifar10", "root": str(ctx["data"]), "train_limit": m["steps_images"], "augment": "crop_flip"},
           "model": {"name": "seed_cnn", "norm": "batch"},
           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
           "train": {"epochs": 1, "batch_size": m["batch"], "eval_batch_size": 1000, "tf32": False,
                     "cudnn_benchmark": False, "channels_last": True}}
    cfg = config_mod.validate(raw, "gpu_check part b")
    result = engine.fit(cfg, runs_root=ctx["tmp"] / "b")
    state = checkpoint.load(result.run_dir / "checkpoints" / "last.pt")
    return state["history"][-1], {k: v.detach().to("cpu", torch.float64) for k, v in state["model"].items()}


def part_devices(ctx: dict) -> dict:
    other = ctx["device"]
    row_cpu, sd_cpu = _steps_state("cpu", ctx)
    row_dev, sd_dev = _steps_state(other, ctx)
    weight_diff = max(float((sd_cpu[k] - sd_dev[k]).abs().max()) for k in sd_cpu)
    loss_diff = max(abs(row_cpu[k] - row_dev[k]) / max(abs(row_cpu[k]), 1e-12) for k in ("train_loss", "test_loss"))
    ok = weight_diff <= DEVICE_WEIGHT_ATOL and loss_diff <= DEVICE_LOSS_RTOL
    return {"measured": f"cpu vs {other}: max |dw| {weight_diff:.1e}, loss rel {loss_diff:.1e}",
            "limit": f"|dw| <= {DEVICE_WEIGHT_ATOL:g}, rel <= {DEVICE_LOSS_RTOL:g}", "ok": ok,
            "details": {"cpu": row_cpu, other: row_dev, "max_abs_weight_diff": weight_diff,
                        "max_rel_loss_diff": loss_diff}}


class _SyncCounter:
    """Counts host synchronizations per training step (a probe: train_one_epoch calls start_step each step).

    On CUDA it counts the warnings of torch.cuda.set_sync_debug_mode("warn"); on the CPU, where
    nothing synchronizes, it counts tensor reads to the host (item, tolist, bool/int/float).
    """

    READS = ("item", "tolist", "__bool__", "__int__", "__float__")

    def __init__(self, cuda: bool):
        self.cuda, self.marks, self.count = cuda, [], 0
        self.saved: dict = {}

    def __enter__(self):
        import torch

        if self.cuda:
            self._catch = warnings.catch_warnings(record=True)
            self.caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        else:
            for name in self.READS:
                real = getattr(torch.Tensor, name)
                self.saved[name] = real

                def counted(t, *a, _real=real, **k):
                    self.count += 1
                    return _real(t, *a, **k)
                setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
            self._catch.__exit__(*exc)
        else:
            for name, real in self.saved.items():
                setattr(torch.Tensor, name, real)

    def now(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self.caught) if self.cuda else self.count

    def start_step(self, step: int, epoch: int) -> None:
        self.marks.append(self.now())

    def after_backward(self, *args) -> None:
        pass

    def messages(self) -> list[str]:
        return sorted({str(w.message).splitlines()[0] for w in self.caught}) if self.cuda else []


def part_syncs(ctx: dict) -> dict:
    import torch

    from bnctl import config as config_mod
    from bnctl.engine import LAGGED_READ_EVERY, train_one_epoch
    from bnctl.experiment import setup

    m = ctx["mode"]
    raw = {"name": "syncs", "seed": 0, "device": ctx["device"],
           "data": {"name": "cifar10", "root": str(ctx["data"]), "train_limit": m["sync_images"], "augment": "crop_flip"},
           "model": {"name": "seed_cnn", "norm": "batch"}, "optimizer": {"name": "adam"},
           "scheduler": {"name": "onecycle"}, "train": {"epochs": 2, "batch_size": m["batch"]}}
    exp = setup(config_mod.validate(raw, "gpu_check part c"))
    steps = len(exp.train_batches)
    # Epoch 1 warms up (allocator, cuDNN); epoch 2 is counted. lagged=True: the CUDA default, forced on the CPU too.
    train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 1, lagged=True)
    with _SyncCounter(exp.device.type == "cuda") as counter:
        train_one_epoch(exp.forward, exp.train_batches, exp.optimizer, exp.scheduler, exp.precision, 2,
                        probe=counter, first_step=steps, lagged=True)
        end = counter.now()
    if exp.device.type == "cuda":
        torch.cuda.synchronize()
    marks = counter.marks + [end]
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # each step, data included; the last one holds the epoch's end
    report_every = max(1, steps // 50, LAGGED_READ_EVERY)
    read_steps = {i for i in range(steps) if (i + 1) % report_every == 0} | {steps - 1}
    quiet = [n for i, n in enumerate(per_step) if i not in read_steps]
    ok = all(n == 0 for n in quiet) and len(quiet) > 0
    what = "syncs" if exp.device.type == "cuda" else "host reads"
    return {"measured": f"{sum(quiet)} {what} in {len(quiet)} plain steps; {sum(per_step) - sum(quiet)} at "
                        f"{len(read_steps)} progress/end steps; {marks[0]} before step 1",
            "limit": "0 in plain steps", "ok": ok,
            "details": {"per_step": per_step, "before_first_step": marks[0], "report_every": report_every,
                        "steps": steps, "messages": counter.messages()}}


def part_precisions(ctx: dict) -> dict:
    m = ctx["mode"]
    out = ctx["out"] / "d_cuda_check.json"
    cmd = [sys.executable, str(REPO / "bench" / "cuda_check.py"), "--model", "seed_cnn", "--no-compile",
           "--epochs", str(m["check_epochs"]), "--batch-size", str(m["batch"]), "--train-size", str(m["check_train"]),
           "--test-size", str(min(2000, m["test"])), "--timeout", "120", "--out", str(out),
           "--acc-floor", str(m["check_floor"]), "--max-spread", str(m["check_spread"])]
    if ctx["device"] == "cpu":
        cmd.append("--allow-cpu")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env_with_repo())
    (ctx["out"] / "d_cuda_check.log").write_text(done.stdout + "\n--- stderr\n" + done.stderr)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    accs = {f"{r['precision']}{' cl' if r['channels_last'] else ''}": r.get("test_acc") for r in rows}
    shown = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in accs.items())
    return {"measured": f"test acc: {shown}" if rows else "no rows",
            "limit": f">= {m['check_floor']:.0f}%, spread <= {m['check_spread']:g}", "ok": done.returncode == 0 and bool(rows),
            "details": {"rows": rows, "exit": done.returncode}}


def part_compile(ctx: dict) -> dict:
    from bnctl import rundir
    from bnctl.evaluation import evaluate_checkpoint

    m = ctx["mode"]
    cfg = write_config(ctx["tmp"] / "e.yaml", ctx["device"], ctx["data"], epochs=m["compile_epochs"],
                       batch_size=m["batch"], compile=True)
    log = ctx["out"] / "e_compile.log"
    # The data limit goes on the command line: an override, as a user would give it.
    run = run_cli(["train", "-c", str(cfg), "--runs-root", str(ctx["tmp"] / "e"),
                   f"data.train_limit={m['compile_images']}"], log,
                  extra_env={"TORCH_LOGS": "recompiles"}, timeout=600)
    text = log.read_text()
    recompiles = len(re.findall(r"Recompiling function", text))
    import torch._dynamo

    limit = getattr(torch._dynamo.config, "recompile_limit", getattr(torch._dynamo.config, "cache_size_limit", 8))
    compiled = rundir.read_csv(run / "metrics.csv")[-1]
    eager = evaluate_checkpoint(run / "checkpoints" / "last.pt")
    d_acc = abs(compiled["test_acc"] - eager["acc"])
    d_loss = abs(compiled["test_loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-12)
    ok = d_acc <= COMPILE_ACC_TOL and d_loss <= COMPILE_LOSS_RTOL and recompiles < limit
    return {"measured": f"acc {compiled['test_acc']:.2f} vs eager {eager['acc']:.2f}, loss rel {d_loss:.1e}, "
                        f"{recompiles} recompiles",
            "limit": f"|dacc| <= {COMPILE_ACC_TOL:g}, rel <= {COMPILE_LOSS_RTOL:g}, recompiles < {limit}", "ok": ok,
            "details": {"compiled": compiled, "eager": {k: eager[k] for k in ("acc", "loss", "images")},
                        "recompiles": recompiles, "recompile_lines": [ln for ln in text.splitlines()
                                                                      if "Recompiling" in ln or "triggered by" in ln][:40]}}


def part_pack(ctx: dict) -> dict:
    import torch

    from bnctl import rundir, sweep

    m, k = ctx["mode"], ctx["mode"]["pack_k"]
    arms, ok, shown = [], True, []
    for batch in m["pack_batches"]:
        cfg = write_config(ctx["tmp"] / f"f{batch}.yaml", ctx["device"], ctx["data"], epochs=1, batch_size=batch)
        plan = sweep.plan_inline(cfg, [f"data.train_limit={m['pack_images']}"], seeds=k, name=f"pack-b{batch}")
        losses = {}
        for pack in (1, k):  # one by one in this process, then one pack of k
            d = sweep.create(plan, ctx["tmp"] / "f" / f"b{batch}-pack{pack}")
            if ctx["device"] == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outcome = sweep.execute(d, pack=pack)
            wall = time.perf_counter() - t0
            done = len(outcome.completed) == len(plan.runs)
            losses[pack] = [rundir.read_csv(d / "runs" / r.name / "metrics.csv")[-1]["train_loss"] if done else None
                            for r in plan.runs]
            arms.append({"batch": batch, "pack": pack, "wall_s": wall, "runs_per_hour": 3600 * len(plan.runs) / wall,
                         "completed": len(outcome.completed), "train_loss": losses[pack]})
            ok &= done
        if ok:
            gap = max(abs(a - b) for a, b in zip(losses[1], losses[k]))
            ok &= gap <= PACK_LOSS_ATOL
            one, packed = arms[-2]["runs_per_hour"], arms[-1]["runs_per_hour"]
            shown.append(f"batch {batch}: {packed:.0f} vs {one:.0f} runs/h ({packed / one:.2f}x), loss gap {gap:.1e}")
    return {"measured": "; ".join(shown) or "runs did not complete",
            "limit": f"all complete, train loss gap <= {PACK_LOSS_ATOL:g}", "ok": bool(ok),
            "details": {"arms": arms, "images": m["pack_images"], "members": k}}


PARTS = {"train": ("a", part_train), "devices": ("b", part_devices), "syncs": ("c", part_syncs),
         "precisions": ("d", part_precisions), "compile": ("e", part_compile), "pack": ("f", part_pack)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="without a GPU, run every part on the CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without a GPU)")
    parser.add_argument("--skip", action="append", default=[], choices=list(PARTS), help="leave a part out")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file to write")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data and runs in this folder")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "--allow-cpu runs the checks on the CPU at tiny sizes")
        return 2
    mode = MODES["tiny" if (args.tiny or not cuda) else "gpu"]
    device = "cuda" if cuda else "cpu"
    started = time.time()
    out_dir = args.out.resolve().parent / (args.out.stem + "_logs")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bnctl-gpu-check-") as scratch:
        tmp = args.keep.resolve() if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        data = write_cifar_format(tmp / "data", mode["train"], mode["test"])
        ctx = {"mode": mode, "device": device, "tmp": tmp, "data": data, "out": out_dir}
        rows = [{"part": "-", "check": "data", "measured": f"{mode['train']} + {mode['test']} images written",
                 "limit": "", "ok": True, "seconds": time.time() - t0}]
        for name, (letter, fn) in PARTS.items():
            if name in args.skip:
                rows.append({"part": letter, "check": name, "measured": "skipped (--skip)", "limit": "", "ok": None,
                             "seconds": 0.0})
                continue
            print(f"... {letter} {name}", file=sys.stderr, flush=True)
            t0 = time.time()
            try:
                row = fn(ctx)
            except Exception as err:  # one part's failure is its row; the others still run
                row = {"measured": f"{type(err).__name__}: {str(err)[:160]}", "limit": "", "ok": False,
                       "details": {"traceback": traceback.format_exc()}}
            rows.append({"part": letter, "check": name, **row, "seconds": time.time() - t0})
    total = time.time() - started
    name = torch.cuda.get_device_name(0) if cuda else "CPU (harness check, tiny sizes)"
    print(f"## bnctl gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{'tiny' if mode is MODES['tiny'] else 'full'} sizes, {total:.0f} s in all\n")
    print("| part | check | measured | limit | result | s |")
    print("|---|---|---|---|---|---:|")
    for r in rows:
        verdict = {True: "ok", False: "FAILED", None: "-"}[r["ok"]]
        print(f"| {r['part']} | {r['check']} | {r['measured']} | {r['limit']} | {verdict} | {r['seconds']:.0f} |")
    failed = [r for r in rows if r["ok"] is False]
    args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                                    "sizes": mode, "total_s": total, "rows": rows}, indent=2, default=str) + "\n")
    print(f"\n{len(failed)} part(s) failed; JSON: {args.out}, logs: {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
