"""Running a sweep's runs: per-run claims, the dataset cache, and long-lived worker processes.

Each run is claimed with an flock on claims/<run>.lock for as long as it trains, so two
processes working on one sweep (two resumes, or shards that overlap by mistake) never
run the same run twice; the claim vanishes with its process. Workers are started with
"spawn" (a fork after torch's thread pools exist can deadlock), import torch once, split
the CPU threads between them and keep each dataset they load for the next run.

Over 350 lines: claims, the worker processes and their stop handling (a Ctrl-C reaching parent and
workers at once) depend on one another's timing and are read together.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from bnctl import rundir, stopping, sweepdir
from bnctl.errors import DivergedError, InterruptedRun
from bnctl.plan import RunSpec


@dataclass
class Task:
    """One run to do: where, which, and its resolved config (a plain dict, cheap to send to a worker)."""

    sweep_dir: Path
    spec: RunSpec
    config: dict[str, Any]
    pack: list["Task"] = field(default_factory=list)  # runs of the same cell trained packed with this one (packed.py)

    @property
    def specs(self) -> list[RunSpec]:
        return [self.spec, *(t.spec for t in self.pack)]


@dataclass
class Result:
    """How a task ended: completed | diverged | failed | interrupted | busy (claimed elsewhere) | skipped."""

    spec: RunSpec
    outcome: str
    error: str | None = None
    seconds: float = 0.0  # from receiving the task to its end, in the process that ran it
    first_in_process: bool = False  # the first run this process trained (it paid for imports and data)
    others: list["Result"] = field(default_factory=list)  # a packed task's other runs, each with its own result

    @property
    def all(self) -> list["Result"]:
        return [self, *self.others]

    @property
    def interrupted(self) -> bool:
        """Whether a stop (Ctrl-C, SIGTERM) ended any of the task's runs: the sweep stops too."""
        return any(r.outcome == "interrupted" for r in self.all)


# ------------------------------------------------------------------ claims

@contextlib.contextmanager
def claim(sweep_dir: Path, name: str) -> Iterator[bool]:
    """Hold the run's claim (True) or learn that another process holds it (False)."""
    folder = Path(sweep_dir) / sweepdir.CLAIMS_DIR
    folder.mkdir(exist_ok=True)
    held, f = rundir.take_flock(folder / f"{name}.lock")  # no flock (Windows): one process per sweep is up to the user
    try:
        yield held
    finally:
        if f is not None:
            f.close()  # releases the flock


# ------------------------------------------------------------------ one run

_DATA: collections.OrderedDict = collections.OrderedDict()
_RUNS_STARTED = [0]  # runs this process has started (the first pays for importing torch and the engine)
DATA_CACHE_SIZE = 2  # datasets kept per process (a sweep rarely varies its data; CIFAR-10 is ~180 MB)


def cached_data(data_cfg):
    """The dataset of a data config, loaded once per process and reused by later runs."""
    from bnctl.data import load_dataset

    key = json.dumps(data_cfg.model_dump(mode="json"), sort_keys=True)
    if key in _DATA:
        _DATA.move_to_end(key)
        return _DATA[key]
    data = load_dataset(data_cfg)
    _DATA[key] = data
    while len(_DATA) > DATA_CACHE_SIZE:
        _DATA.popitem(last=False)
    return data


Progress = Callable[[RunSpec, int, int], None]  # (run, epochs done, epochs): the sweep's progress display


class _EpochReporter:
    """Forwards the end of each epoch to the sweep's progress display."""

    def __init__(self, progress: Progress, spec: RunSpec, epochs: int):
        self.progress, self.spec, self.epochs = progress, spec, epochs

    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, done: int, loss: float) -> None: ...

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.progress(self.spec, int(row["epoch"]), self.epochs)


def _record_error(sweep_dir: Path, name: str, error: str, trace: str = "") -> None:
    folder = Path(sweep_dir) / sweepdir.ERRORS_DIR
    folder.mkdir(exist_ok=True)
    rundir.write_json(folder / f"{name}.json", {"error": error, "traceback": trace,
                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def run_task(task: Task, progress: Progress = lambda spec, e, n: None) -> Result:
    """Claim the run, then start it, resume it from its checkpoint, or find it already finished."""
    if task.pack:
        return _run_pack(task, progress)
    start = time.perf_counter()
    spec = task.spec
    with claim(task.sweep_dir, spec.name) as held:
        if not held:
            return Result(spec, "busy")
        status, _ = sweepdir.run_status(task.sweep_dir, spec)  # read under the claim: nobody else writes now
        if status in sweepdir.FINISHED:
            return Result(spec, "skipped")
        _RUNS_STARTED[0] += 1
        first = _RUNS_STARTED[0] == 1
        try:
            outcome, error = _run_claimed(task, status, progress)
        except KeyboardInterrupt:  # before fit's own handler took over (while loading data, building the model)
            outcome, error = "interrupted", None
        return Result(spec, outcome, error, time.perf_counter() - start, first)


def _resumable(task: Task, status: str) -> bool:
    """Whether the run stopped mid-way with a checkpoint to continue from (Ctrl-C, or killed while "running")."""
    folder = sweepdir.run_dir(task.sweep_dir, task.spec)
    return status in ("interrupted", "running") and rundir.last_checkpoint(folder).is_file()


def _clear_for_start(task: Task) -> None:
    """Remove what a failed run, or one stopped before its first checkpoint, left: it starts again."""
    (Path(task.sweep_dir) / sweepdir.ERRORS_DIR / f"{task.spec.name}.json").unlink(missing_ok=True)
    folder = sweepdir.run_dir(task.sweep_dir, task.spec)
    if folder.exists():
        shutil.rmtree(folder)


def _run_claimed(task: Task, status: str, progress: Progress) -> tuple[str, str | None]:
    from bnctl import config as config_mod, engine

    spec, folder = task.spec, sweepdir.run_dir(task.sweep_dir, task.spec)
    resume = folder if folder.exists() and _resumable(task, status) else None
    if resume is None:
        _clear_for_start(task)
    else:
        (Path(task.sweep_dir) / sweepdir.ERRORS_DIR / f"{spec.name}.json").unlink(missing_ok=True)
    try:
        cfg = config_mod.validate(task.config, f"of run {spec.name}")
        data = cached_data(cfg.data)
        engine.fit(cfg, run_dir=None if resume else folder, resume=resume, data=data,
                   reporter=_EpochReporter(progress, spec, cfg.train.epochs))
        return "completed", None
    except DivergedError as err:
        return "diverged", str(err)
    except InterruptedRun:
        return "interrupted", None
    except Exception as err:  # noqa: BLE001 - any crash of one run is recorded; the sweep goes on
        error = f"{type(err).__name__}: {err}"
        _record_error(task.sweep_dir, spec.name, error, traceback.format_exc())
        return "failed", error


def _run_pack(task: Task, progress: Progress) -> Result:
    """Claim a pack's runs; train those that start afresh as one pack, then continue stopped ones one by one.

    A run that stopped mid-way resumes unpacked from its checkpoint (the pack's members would not be at the
    same epoch); one that failed or stopped before its first checkpoint starts again in the pack.
    """
    start = time.perf_counter()
    members = [task, *task.pack]
    results: dict[str, Result] = {}
    with contextlib.ExitStack() as claims:
        fresh, stopped = [], []
        for t in members:
            if not claims.enter_context(claim(t.sweep_dir, t.spec.name)):
                results[t.spec.name] = Result(t.spec, "busy")
                continue
            status, _ = sweepdir.run_status(t.sweep_dir, t.spec)  # read under the claim: nobody else writes now
            if status in sweepdir.FINISHED:
                results[t.spec.name] = Result(t.spec, "skipped")
            elif _resumable(t, status):
                stopped.append((t, status))
            else:
                fresh.append(t)
        _RUNS_STARTED[0] += 1
        first = _RUNS_STARTED[0] == 1
        if len(fresh) == 1:  # a pack of one is an ordinary run
            stopped.insert(0, (fresh.pop(), "pending"))
        if fresh:
            results |= _train_pack(fresh, progress)
        for t, status in stopped:
            if any(r.outcome == "interrupted" for r in results.values()):  # a stop ends the task: not started
                results[t.spec.name] = Result(t.spec, "interrupted")
                continue
            try:
                outcome, error = _run_claimed(t, status, progress)
            except KeyboardInterrupt:
                outcome, error = "interrupted", None
            results[t.spec.name] = Result(t.spec, outcome, error)
    seconds = time.perf_counter() - start
    ordered = [results[t.spec.name] for t in members]
    for r in ordered:
        r.seconds, r.first_in_process = seconds, first
    return Result(**{**ordered[0].__dict__, "others": ordered[1:]})


def _train_pack(tasks: list[Task], progress: Progress) -> dict[str, Result]:
    """Train claimed runs as one pack (bnctl/packed.py): each run's result."""
    from bnctl import config as config_mod, packed

    specs = {t.spec.name: t.spec for t in tasks}
    for t in tasks:
        _clear_for_start(t)
    try:
        cfgs = [config_mod.validate(t.config, f"of run {t.spec.name}") for t in tasks]
        data = cached_data(cfgs[0].data)
        ended = packed.fit_packed(cfgs, [sweepdir.run_dir(t.sweep_dir, t.spec) for t in tasks], data=data,
                                  progress=lambda name, e, n: progress(specs[name], e, n))
    except KeyboardInterrupt:  # before any run began: nothing was kept
        return {name: Result(spec, "interrupted") for name, spec in specs.items()}
    except Exception as err:  # noqa: BLE001 - the pack could not start (e.g. it cannot be packed): each run failed
        error = f"{type(err).__name__}: {err}"
        for name in specs:
            _record_error(tasks[0].sweep_dir, name, error, traceback.format_exc())
        return {name: Result(spec, "failed", error) for name, spec in specs.items()}
    results = {}
    for member in ended:
        if member.outcome == "failed":
            _record_error(tasks[0].sweep_dir, member.name, member.error or "failed", member.trace)
        results[member.name] = Result(specs[member.name], member.outcome,
                                      None if member.outcome in ("completed", "interrupted") else member.error)
    return results


# ------------------------------------------------------------------ many runs

def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_tasks(tasks: list[Task], jobs: int, reporter) -> Iterator[Result]:
    """Run the tasks (in this process when jobs == 1, else in worker processes), yielding each result.

    An interrupted run (Ctrl-C) ends the iteration with KeyboardInterrupt once every worker has stopped.
    """
    if jobs == 1 or len(tasks) <= 1:
        for task in tasks:
            for spec in task.specs:
                reporter.run_started(spec)
            result = run_task(task, reporter.run_progress)
            yield result
            if result.interrupted:
                raise KeyboardInterrupt
        return
    yield from _Pool(min(jobs, len(tasks)), max(1, available_cpus() // jobs)).run(tasks, reporter)


def results_after_stop(results: Iterator[Result], stop: BaseException) -> Iterator[Result]:
    """The results run_tasks still gives after ``stop`` (a KeyboardInterrupt) reached its caller.

    Ctrl-C lands in run_tasks (then it has stopped its workers and given their runs' results already)
    or in the caller's loop body; there it is passed into run_tasks, which stops the workers and gives
    how each run that was still going ended.
    """
    try:
        first = results.throw(stop)  # type: ignore[attr-defined]
    except (KeyboardInterrupt, StopIteration):
        return
    yield first
    with contextlib.suppress(KeyboardInterrupt):
        yield from results


def _worker_main(conn, threads: int) -> None:
    """A worker process: set its share of CPU threads, then run tasks until told to stop."""
    # Slurm and Kubernetes send SIGTERM to every process of a job, the workers too: stop the run as Ctrl-C
    # does (interrupted, resumable); by default SIGTERM would kill the worker and leave it "running".
    # The sweep interrupts a worker with SIGINT. A sweep started in the background by a non-interactive
    # shell (`nohup bnctl sweep ... &`) has SIGINT ignored, and its workers inherit that: restore Ctrl-C.
    # Either stops the worker once (see _stop_once).
    for signum in _HELD:
        signal.signal(signum, _stop_once)
    try:
        # The process began with these signals held (see _Pool._start), so that a Ctrl-C during its start-up
        # imports waits until here; one that came meanwhile is raised now and ends the worker quietly.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
        _serve(conn, threads)
    except KeyboardInterrupt:  # Ctrl-C while starting up (importing torch): nothing was claimed yet
        pass


_HELD = {signal.SIGINT, signal.SIGTERM}  # held while a worker starts


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM in this thread, and so in a process started now, until the block ends.

    A spawned worker imports bnctl (and with the `bnctl` script, the CLI's modules) before any code of
    ours runs; a KeyboardInterrupt there prints an import traceback per worker. The held signal mask
    survives fork and exec, so the worker's imports cannot be interrupted and the signal reaches it once
    _worker_main is ready; here it is delivered when the block ends, so no signal is lost.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    from multiprocessing import resource_tracker

    # Starting a spawned process starts the resource tracker first, once, and that unblocks SIGINT and
    # SIGTERM afterwards: let it start before they are held.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_once(signum: int, frame: Any) -> None:
    """Stop the worker's run as Ctrl-C does, and ignore every later stop signal.

    A worker stops once and then exits. A second signal (the sweep passes Ctrl-C on to a worker that was
    slow to report, and a loaded machine can make it slow) would otherwise land while the run records
    its stop, and leave it looking as if it were still running.
    """
    for held in _HELD:
        signal.signal(held, signal.SIG_IGN)
    raise KeyboardInterrupt("SIGTERM" if signum == signal.SIGTERM else "")


def _serve(conn, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):  # the sweep process is gone, or Ctrl-C while idle
            return
        if task is None:
            return
        try:
            result = run_task(task, lambda spec, e, n: conn.send(("epoch", spec.name, e, n)))
            conn.send(("done", result))
        except (BrokenPipeError, EOFError, OSError, KeyboardInterrupt):
            return
        if result.interrupted:
            return


class _Slot:
    def __init__(self, process, conn):
        self.process, self.conn, self.task = process, conn, None


class _Pool:
    """N long-lived worker processes, each given its next task as soon as it is free."""

    GRACE_S = 15.0  # after Ctrl-C: time for workers to record their runs as interrupted

    def __init__(self, n: int, threads: int):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.n, self.threads = n, threads
        self.slots: list[_Slot] = []
        self.stopped_by: str | None = None  # the signal that stopped this process, passed on to busy workers

    def _start(self, slot: _Slot | None = None) -> _Slot:
        """Start a worker: a new slot (appended to self.slots), or a fresh process for ``slot``."""
        parent, child = self.ctx.Pipe()
        process = self.ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True,
                                   name="bnctl-sweep-worker")
        with _signals_held():  # a Ctrl-C now lands after the process is in self.slots, where _stop finds it
            process.start()
            child.close()
            if slot is None:
                slot = _Slot(process, parent)
                self.slots.append(slot)
            else:
                slot.process, slot.conn = process, parent
        return slot

    def run(self, tasks: list[Task], reporter) -> Iterator[Result]:
        from multiprocessing.connection import wait

        pending = collections.deque(tasks)
        try:
            self.slots = []
            for _ in range(self.n):
                self._start()
            for slot in self.slots:
                self._assign(slot, pending, reporter)
            while any(s.task for s in self.slots):
                busy = [s for s in self.slots if s.task]
                ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy])
                for slot in busy:
                    result = self._poll(slot, ready, reporter)
                    if result is None:
                        continue
                    yield result
                    if result.interrupted:
                        raise KeyboardInterrupt
                    if slot.process.is_alive():
                        self._assign(slot, pending, reporter)
                    elif pending:
                        self._assign(self._start(slot), pending, reporter)
        except KeyboardInterrupt as err:  # Ctrl-C, or the CLI's SIGTERM handler (its message names the signal)
            self.stopped_by = str(err) if str(err) in stopping.REASONS else None
            yield from self._stop()  # how each run the stop caught ended: the caller reports each
            raise
        finally:
            if self.slots:  # the caller stopped iterating early
                for _ in self._stop():
                    pass

    def _assign(self, slot: _Slot, pending: collections.deque, reporter) -> None:
        slot.task = pending.popleft() if pending else None
        if slot.task is not None:
            for spec in slot.task.specs:
                reporter.run_started(spec)
            try:
                slot.conn.send(slot.task)
            except OSError:  # the worker died while idle: start another for this task
                slot.process.join()
                self._start(slot)
                slot.conn.send(slot.task)

    def _poll(self, slot: _Slot, ready: list, reporter) -> Result | None:
        """The slot's finished result, if any; progress messages are passed on to the reporter."""
        while slot.conn in ready or slot.conn.poll():
            ready = []
            try:
                message = slot.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "epoch":
                spec = next(s for s in slot.task.specs if s.name == message[1])
                reporter.run_progress(spec, message[2], message[3])
                continue
            slot.task = None
            return message[1]
        if slot.process.sentinel in ready or not slot.process.is_alive():
            slot.process.join()
            task, slot.task = slot.task, None
            error = f"worker process died (exit code {slot.process.exitcode})"
            for spec in task.specs:
                _record_error(task.sweep_dir, spec.name, error)
            return Result(task.spec, "failed", error, others=[Result(spec, "failed", error) for spec in task.specs[1:]])
        return None

    @staticmethod
    def _still_busy(slot: _Slot, ended: list[Result]) -> bool:
        """True while a worker has neither reported the end of its run nor exited; a report goes to ``ended``."""
        if slot.task is None:
            return False
        with contextlib.suppress(EOFError, OSError):
            while slot.conn.poll():
                message = slot.conn.recv()
                if message[0] == "done":
                    slot.task = None
                    ended.append(message[1])
                    return False
        if not slot.process.is_alive():  # ended without a report: stopped before its run began, or in its end
            task, slot.task = slot.task, None
            ended.append(_unreported(task))
            return False
        return True

    def _stop(self) -> Iterator[Result]:
        """Let idle workers exit; give busy ones (after Ctrl-C) time to record their runs, then end them.

        Yields how each run that was still assigned to a worker ended (interrupted, mostly).
        """
        ended: list[Result] = []
        for slot in self.slots:
            if slot.task is None and slot.process.is_alive():
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        deadline = time.monotonic() + self.GRACE_S
        # A terminal's Ctrl-C reached the workers too: they mark their runs interrupted and report.
        # Only those that stay silent (this process alone was signalled) get a SIGINT of their own,
        # so that no worker is interrupted a second time while it writes its summary.
        quiet_until = time.monotonic() + 3.0
        while time.monotonic() < quiet_until and any([self._still_busy(s, ended) for s in self.slots]):
            time.sleep(0.05)
        # The same signal this process got, so that each run records what stopped it (summary.json's stopped_by).
        signum = signal.SIGTERM if self.stopped_by == "SIGTERM" else signal.SIGINT
        for slot in self.slots:
            if self._still_busy(slot, ended):
                with contextlib.suppress(OSError):
                    os.kill(slot.process.pid, signum)
            elif slot.process.is_alive():  # finished its run meanwhile: let it exit
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        for slot in self.slots:
            slot.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(timeout=5)
            self._still_busy(slot, ended)  # its last report, if it sent one while ending
            if slot.task is not None:  # killed without a word
                ended.append(_unreported(slot.task))
                slot.task = None
            slot.conn.close()
        self.slots = []
        yield from ended


def _unreported(task: Task) -> Result:
    """How a task's runs ended whose worker stopped without reporting: as their files say, else interrupted."""
    ended = []
    for spec in task.specs:
        status, _ = sweepdir.run_status(task.sweep_dir, spec)
        ended.append(Result(spec, status if status in ("completed", "diverged") else "interrupted"))
    return Result(**{**ended[0].__dict__, "others": ended[1:]})

