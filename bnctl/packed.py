"""Packed seeds: several runs of one sweep cell trained in one process, their gradients computed as one.

Each member is an ordinary run: its own Experiment (engine.prepare: model, optimizer, schedule, data
order), run directory, RunRecorder and checkpoints, which load as a plain model. Only the gradient
computation is shared. Each step stacks the members' weights and BN buffers, runs one torch.func.vmap
over grad_and_value of a functional_call (each member on its own batch), hands every member its
gradients and updated running statistics, and steps the member's own optimizer and schedule. So
checkpoints, resume, schedules and bookkeeping are the unpacked code's, and a member that diverges
is recorded as its unpacked run would be and leaves the pack; the others go on.

Numbers: under vmap a convolution over stacked weights runs as one grouped convolution, whose float
sums run in another order, so a member matches its unpacked run to rounding that training amplifies
(tests/test_packed.py bounds it), not bit for bit. Dropout and noisy BN draw per member
(randomness="different") from the process's generator: the unpacked run's distribution, not its draws.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from bnctl import checkpoint, config as config_mod, engine, normspec, rundir, stopping
from bnctl.config import Config
from bnctl.data import ImageData
from bnctl.errors import ConfigError, DivergedError, InterruptedRun
from bnctl.experiment import Experiment, cpu_threads_for, seed_everything
from bnctl.recorder import RunRecorder

# Sections members may set differently: each member steps its own optimizer and schedule. Everything
# else must agree (the model's shapes, the data, the batch size and the epochs run in lock step).
MEMBER_OWN = ("seed", "name", "optimizer", "scheduler")

# Norms that run torch's batch_norm kernel. Under vmap on the CPU its batching rule rejects the bf16
# activations autocast gives it beside float32 weights and statistics ("expected scalar type BFloat16
# but found Float", torch 2.14), so such packs are refused there; batch_manual computes in float32 and packs.
TORCH_BATCH_NORMS = frozenset({"batch", "ghost", "noisy_batch"})


def refusal(cfg: Config, device: torch.device | None = None) -> str | None:
    """Why runs of this config cannot be packed (a sentence), or None when they can.

    ``device``: where the pack will train, once resolved; without it, only a config that names the CPU
    counts as the CPU (a sweep's check before its directory exists).
    """
    m, t = cfg.model, cfg.train
    on_cpu = device.type == "cpu" if device is not None else cfg.device == "cpu"
    if t.precision == "bf16" and m.norm in TORCH_BATCH_NORMS and on_cpu:
        return (f"train.precision=bf16 with model.norm={m.norm} on the CPU: vmap's batch-norm rule there rejects "
                "bf16 activations beside float32 weights and statistics; use fp32, model.norm=batch_manual, "
                "or run unpacked")
    if m.bn_momentum is None and normspec.NORMS[m.norm].batch_stats and m.bn_track_running_stats:
        return ("model.bn_momentum=null (the cumulative average) counts each BN layer's batches on the host "
                "at every step, which a vmapped step cannot; give a momentum (e.g. 0.1) or run unpacked")
    if t.precision == "fp16":
        return ("train.precision=fp16 scales the loss with one GradScaler, so one member's overflow would skip "
                "or rescale every member's step; use bf16 or fp32, or run unpacked")
    for on, what in ((t.diagnostics, "train.diagnostics"), (t.landscape.every > 0, "train.landscape.every"),
                     (t.tensorboard, "train.tensorboard"), (t.compile, "train.compile")):
        if on:
            return f"{what} hooks into one model's steps and is not supported packed; turn it off or run unpacked"
    return None


def check_packable(cfgs: list[Config]) -> None:
    """Raise ConfigError unless these runs can train as one pack."""
    for cfg in cfgs:
        why = refusal(cfg)
        if why is not None:
            raise ConfigError(f"cannot pack run {cfg.name}: {why}")
    shared = [{k: v for k, v in config_mod.to_dict(c).items() if k not in MEMBER_OWN} for c in cfgs]
    for cfg, other in zip(cfgs[1:], shared[1:]):
        if other != shared[0]:
            differ = sorted(k for k in set(other) | set(shared[0]) if other.get(k) != shared[0].get(k))
            raise ConfigError(f"runs {cfgs[0].name} and {cfg.name} differ in {', '.join(differ)}; a pack's members "
                              f"may differ only in {', '.join(MEMBER_OWN)}")


@dataclass
class MemberResult:
    """How one member ended: completed | diverged | interrupted | failed, with the message of the last three."""

    name: str
    run_dir: Path
    outcome: str
    error: str | None = None
    trace: str = ""  # a failure's traceback


@dataclass
class _Member:
    exp: Experiment
    run_dir: Path
    record: RunRecorder
    rng: dict[str, Any]  # the process-wide RNG states its unpacked run starts from (what its checkpoints keep)
    clean_train: Any = None  # train.eval_train's evaluation batches of the training set (engine.clean_train_batches)
    result: MemberResult | None = None  # set when the member stops
    sums: dict[str, Any] = field(default_factory=dict)  # the running epoch's loss sum, correct count, images

    def stop(self, err: BaseException) -> None:
        """Record how err stopped this member (engine.record_stop, as an unpacked run records it)."""
        told = engine.record_stop(self.record, err)
        name = self.exp.cfg.name
        if isinstance(told, DivergedError):
            self.result = MemberResult(name, self.run_dir, "diverged", str(told))
        elif isinstance(told, InterruptedRun):
            if not checkpoint.last_path(self.run_dir).exists():  # nothing to resume from, as fit does
                told = engine.discard_unstarted(self.run_dir, told.signal)
            finished = len(self.record.history) >= self.exp.cfg.train.epochs  # the stop came as it finished
            self.result = MemberResult(name, self.run_dir, "completed" if finished else "interrupted", str(told))
        else:
            self.result = MemberResult(name, self.run_dir, "failed", f"{type(err).__name__}: {err}",
                                       "".join(traceback.format_exception(err)))


def fit_packed(cfgs: list[Config], run_dirs: list[Path], *, data: ImageData | None = None,
               progress: Callable[[str, int, int], None] = lambda name, epoch, epochs: None) -> list[MemberResult]:
    """Train the runs of ``cfgs`` as one pack, each into its new run directory; how each ended.

    Raises (ConfigError, DataError) before any folder exists when they cannot be packed. Ctrl-C
    stops every member as it stops an unpacked run (interrupted, resumable from its last epoch,
    or its folder removed before the first) and is reported as their outcomes, not raised.
    """
    started = time.time()
    check_packable(cfgs)
    exps, own_rng = [], []
    for cfg in cfgs:  # each seeds the process as its unpacked run would: keep each member's streams
        exps.append(engine.prepare(cfg, data))
        own_rng.append(checkpoint.capture_process_rng())
    # The pack's shared dropout and noisy-BN stream: one no member's own streams start from, so that a
    # member resumed on its own (from its own streams, _own_rng) does not replay the pack's draws.
    seed_everything(zlib.crc32(("pack of seeds " + " ".join(str(c.seed) for c in cfgs)).encode()))
    for exp in exps:  # now that the device is resolved (device: auto)
        why = refusal(exp.cfg, exp.device)
        if why is not None:
            raise ConfigError(f"cannot pack run {exp.cfg.name}: {why}")
    names = [cfg.name for cfg in cfgs]
    members: list[_Member] = []
    created: list[Path] = []
    with contextlib.ExitStack() as stack:
        try:
            for k, (exp, path) in enumerate(zip(exps, run_dirs)):
                created.append(rundir.create(Path(path).parent, exp.cfg.name, exact=Path(path)))
                stack.enter_context(rundir.RunLock(created[-1]))
                exp.packed = {"members": len(exps), "index": k, "runs": names}
                record = RunRecorder(exp, created[-1], [], {"test_acc": None, "epoch": None}, 1, False, started=started)
                record.open()
                members.append(_Member(exp, created[-1], record, own_rng[k], engine.clean_train_batches(exp)))
        except BaseException:  # no member has trained: their folders go, as an unpacked run's would
            for path in created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        try:
            _train(members, progress)
        except BaseException as err:  # Ctrl-C, or a failure of the shared step: every member still going stops
            for m in members:
                if m.result is None:
                    m.stop(err)
            if not isinstance(err, (Exception, KeyboardInterrupt)):
                raise
    return [m.result for m in members]


def _train(members: list[_Member], progress: Callable[[str, int, int], None]) -> None:
    """The epoch loop of a pack: train all, then evaluate and record each member, as engine._fit_in does for one."""
    step = vmapped_step(members[0].exp.model)
    epochs = members[0].exp.cfg.train.epochs
    for epoch in range(1, epochs + 1):
        live = [m for m in members if m.result is None]
        if not live:
            return
        lrs = [m.exp.optimizer.param_groups[0]["lr"] for m in live]  # the lr each epoch starts with
        t0 = time.perf_counter()
        _train_epoch(live, step, epoch)
        share = (time.perf_counter() - t0) / len(live)  # each member's train_time_s: its share of the pack's time
        for m, lr in zip(live, lrs):
            if m.result is not None:  # diverged in this epoch
                continue
            row = engine.evaluate_epoch(m.exp, epoch, lr, _epoch_numbers(m), share, m.clean_train)
            if not math.isfinite(row["test_loss"]):  # as an unpacked run: keep the last good checkpoint
                m.stop(DivergedError(f"test loss became {row['test_loss']} after epoch {epoch}", epoch,
                                     len(m.exp.train_batches)))
                continue
            with _own_rng(m):
                m.record.epoch(row)
            m.record.summary("running")
            progress(m.exp.cfg.name, epoch, epochs)
    for m in members:
        if m.result is None:
            m.record.summary("completed")
            m.result = MemberResult(m.exp.cfg.name, m.run_dir, "completed")


@contextlib.contextmanager
def _own_rng(m: _Member):
    """The member's own process-wide RNG states while its checkpoint is written, then the pack's again.

    The pack's dropout and noisy-BN draws all come from one stream. Saved into every member's checkpoint,
    that one state would make members resumed on their own draw identical masks; each keeps its own seed's
    streams instead, so resumed members stay independent, as unpacked seeds are.
    """
    pack = checkpoint.capture_process_rng()
    checkpoint.restore_process_rng(m.rng)
    try:
        yield
    finally:
        checkpoint.restore_process_rng(pack)


def vmapped_step(model: torch.nn.Module):
    """f(params, buffers, x, y) -> (grads, (losses, logits)), each stacked over members; buffers updated in place."""
    structure = copy.deepcopy(model).to("meta").train()  # the layers only: weights come from the members

    def loss_of(params, buffers, x, y):
        logits = functional_call(structure, (params, buffers), (x,))
        return F.cross_entropy(logits.float(), y), logits

    return vmap(grad_and_value(loss_of, has_aux=True), randomness="different")


def _train_epoch(live: list[_Member], step, epoch: int) -> None:
    """One epoch of every live member, each on the batches its unpacked run would draw (train_one_epoch's order)."""
    first = live[0].exp
    device = first.device
    for m in live:
        m.exp.model.train()
        m.sums = {"loss": torch.zeros((), device=device, dtype=torch.float64),
                  "correct": torch.zeros((), device=device, dtype=torch.int64), "seen": 0}
    streams = [iter(m.exp.train_batches) for m in live]  # each member's own order and augmentation
    steps = len(first.train_batches)
    lagged = _lagged(device)
    p_names = [n for n, _ in first.model.named_parameters()]
    b_names = [n for n, _ in first.model.named_buffers()]
    with cpu_threads_for(first.train_batches, first.threads):
        for i, batches in enumerate(zip(*streams)):
            pack = [(m, b) for m, b in zip(live, batches) if m.result is None]
            if not pack:
                return
            params = [list(m.exp.model.parameters()) for m, _ in pack]
            buffers = [list(m.exp.model.buffers()) for m, _ in pack]
            stacked_p = {n: torch.stack([p[j].detach() for p in params]) for j, n in enumerate(p_names)}
            stacked_b = {n: torch.stack([b[j] for b in buffers]) for j, n in enumerate(b_names)}
            x = torch.stack([xb for _, (xb, _) in pack])
            y = torch.stack([yb for _, (_, yb) in pack])
            with first.precision.autocast():
                grads, (losses, logits) = step(stacked_p, stacked_b, x, y)
            why = stopping.reason(stopping.flags())  # the CLI's SIGTERM handler asks through these flags
            if why is not None:
                raise KeyboardInterrupt(why)
            for k, (m, (_, yb)) in enumerate(pack):
                m.sums["loss"] += losses[k].detach() * len(yb)
            # The CPU checks every step, as an unpacked run does; a GPU every few steps and at the epoch's end,
            # all members in one read (a diverged member's extra steps touch only its own weights, then it goes).
            if not lagged or (i + 1) % engine.LAGGED_READ_EVERY == 0 or i + 1 == steps:
                totals = torch.stack([m.sums["loss"] for m, _ in pack]).tolist()
                for k, (m, _) in enumerate(pack):
                    if not math.isfinite(totals[k]):  # this member diverged: its step is not taken, the others' are
                        what = f"non-finite (running sum {totals[k]})" if lagged else losses[k].item()
                        m.stop(DivergedError(f"loss became {what} at epoch {epoch}, step {i + 1}", epoch, i + 1))
            for k, (m, (_, yb)) in enumerate(pack):
                if m.result is not None:
                    continue
                with torch.no_grad():
                    for j, buf in enumerate(buffers[k]):
                        buf.copy_(stacked_b[b_names[j]][k])
                for j, p in enumerate(params[k]):
                    p.grad = grads[p_names[j]][k]
                m.exp.optimizer.step()  # fp16 (the one precision with a scaler) is refused: no scaling to undo
                m.exp.scheduler.step()
                m.sums["correct"] += (logits[k].argmax(1) == yb).sum()
                m.sums["seen"] += len(yb)


def _lagged(device: torch.device) -> bool:
    """Whether losses are read back only every few steps (a GPU: a read waits for the device), as engine's rule."""
    return device.type == "cuda"


def _epoch_numbers(m: _Member) -> dict[str, float]:
    """train_one_epoch's return value for a member: running train loss and accuracy, images seen."""
    s = m.sums
    return {"train_loss": (s["loss"] / s["seen"]).item(), "train_acc": 100.0 * s["correct"].item() / s["seen"],
            "images": s["seen"]}
