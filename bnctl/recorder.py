"""A run's bookkeeping: provenance, metrics.csv, summary.json and the order of an epoch's writes.

engine.fit trains and evaluates; everything it keeps on disk goes through one RunRecorder, so the
epoch loop reads train, evaluate, record. Only rank 0 of a data-parallel group writes: the other
ranks keep the same history and best in memory, so that every rank returns the same summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bnctl import checkpoint, config as config_mod, distributed, elastic, rundir
from bnctl.models import count_parameters

METRIC_COLUMNS = [
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
    "epoch_time_s", "train_time_s", "eval_time_s", "images_per_s",
]
CLEAN_TRAIN_COLUMNS = ["clean_train_loss", "clean_train_acc"]


class RunRecorder:
    """What a run writes as it goes, in an order that a kill at any moment leaves resumable."""

    def __init__(self, exp, run_dir: Path, history: list[dict], best: dict[str, Any], start: int, resuming: bool,
                 started: float | None = None):
        self.exp, self.run_dir, self.history, self.best = exp, run_dir, history, best
        cfg, dist = exp.cfg, exp.dist
        self.write = dist.is_main  # only rank 0 writes; every rank computes the same rows
        self.columns = METRIC_COLUMNS + (CLEAN_TRAIN_COLUMNS if cfg.train.eval_train else [])
        self.saver = checkpoint.EpochSaver(run_dir, best["epoch"])
        self.metrics: rundir.MetricsWriter | None = None
        self.rows_on_disk = len(history)  # the rows metrics.csv has (-1: unknown, an append was cut)
        self._summary: _Summary | None = None
        self.started = started  # the session's start (fit called), for summary.json's wall time
        parallel = {"world_size": dist.world_size, "backend": dist.backend,
                    "sync_bn": distributed.count_sync_layers(exp.model) > 0}
        if resuming and self.write:
            rundir.remove_temp_files(run_dir)  # left by a run killed mid-write
            # A kill between last.pt and best.pt leaves best.pt an epoch behind (or missing).
            checkpoint.repair_best(run_dir / rundir.CHECKPOINT_DIR, start - 1, best["epoch"])
            rundir.atomic_write_text(run_dir / rundir.CONFIG_FILE, config_mod.to_yaml(cfg))
            rundir.record_resume(run_dir, {"from_epoch": start - 1, "epochs": cfg.train.epochs,
                                           "device": str(exp.device),
                                           "threads": exp.threads, "threads_reason": exp.threads_reason,
                                           "precision": cfg.train.precision, "notes": exp.notes, **parallel,
                                           **exp.backend,
                                           **elastic.run_info()})
        elif self.write:
            rundir.record_provenance(run_dir, config_mod.to_yaml(cfg), {
                "device": str(exp.device), "seed": cfg.seed,
                "threads": exp.threads, "threads_reason": exp.threads_reason,
                "num_classes": exp.num_classes, "classes": list(exp.data.classes),
                "train_images": len(exp.data.train_y), "steps_per_epoch": len(exp.train_batches),
                "test_images": len(exp.data.test_y), "eval_order_seed": exp.eval_order_seed, **parallel,
                **exp.backend, **({"packed": exp.packed} if exp.packed else {}),
                **elastic.run_info()})

    def open(self) -> None:
        """Start metrics.csv (header and the rows kept so far) and the summary's clock."""
        if self.write:
            self.metrics = rundir.MetricsWriter(self.run_dir / rundir.METRICS_FILE, self.columns, self.history)
        self._summary = _Summary(self.run_dir, self.exp.cfg, self.exp, self.history, write=self.write,
                                 started=self.started)

    def epoch(self, row: dict[str, Any]) -> None:
        """Keep one finished epoch: last.pt, then best.pt if it is the best, then its metrics.csv row.

        last.pt is what resume trusts, so it goes first and, once written, the epoch counts as kept; a kill
        before best.pt follows is repaired from it (settle). The metrics row comes last: a row on disk
        always has its checkpoint.
        """
        epoch = row["epoch"]
        is_best = self.best["test_acc"] is None or row["test_acc"] > self.best["test_acc"]
        new_best = {"test_acc": row["test_acc"], "test_loss": row["test_loss"], "epoch": epoch} if is_best else self.best
        state = checkpoint.state(self.exp, epoch, self.history + [row], new_best) if self.write else {}
        if self.write:
            self.saver.save_last(state)
        self.history.append(row)
        self.best = new_best
        if self.write and is_best:
            self.saver.save_best(state)
        if self.write:
            self.rows_on_disk = -1  # unknown until the append returns
            self.metrics.append(row)
            self.rows_on_disk = len(self.history)

    def settle(self) -> None:
        """After a stop: bring best.pt and metrics.csv level with last.pt, which resume trusts (best effort)."""
        if not self.write:
            return
        self.saver.repair(len(self.history), self.best["epoch"])
        if self.rows_on_disk != len(self.history):
            try:  # rewritten whole (atomically): the stop may have come in the middle of an append
                rundir.MetricsWriter(self.run_dir / rundir.METRICS_FILE, self.columns, self.history)
            except OSError:  # must not hide the error being handled; resume rewrites metrics.csv anyway
                pass

    def summary(self, status: str, **extra: Any) -> dict[str, Any]:
        """Rewrite summary.json with this status; returns it."""
        return self._summary.update(self.best, status, **extra)

    @property
    def prior_wall(self) -> float:
        """The wall time of the run's earlier sessions (0 for a new run)."""
        return self._summary.prior_wall


class _Summary:
    """summary.json, rewritten atomically after every epoch and at the end.

    Its wall_time_s is the one definition of a run's time that every command shows: wall-clock seconds
    from the start of each session (fit called: data loading and model building included) to the
    session's last summary write, summed over the sessions of the run (a resume adds its own).
    """

    def __init__(self, run_dir: Path, cfg, exp, history: list[dict], write: bool = True, started: float | None = None):
        self.path, self.cfg, self.exp, self.history = run_dir / rundir.SUMMARY_FILE, cfg, exp, history
        self.write = write  # False on data-parallel ranks other than 0
        self.started = time.time() if started is None else started
        try:
            previous = rundir.read_json(self.path) if self.path.exists() else {}
        except (OSError, ValueError):  # damaged by a crash: only the accumulated wall time is lost
            previous = {}
        self.prior_wall = previous.get("wall_time_s", 0.0) if history else 0.0

    def update(self, best: dict, status: str, **extra: Any) -> dict[str, Any]:
        final = self.history[-1] if self.history else None
        summary = {
            "name": self.cfg.name, "status": status, "epochs_completed": len(self.history),
            "epochs_planned": self.cfg.train.epochs, "final": final, "best": best,
            "wall_time_s": self.prior_wall + time.time() - self.started,
            "train_time_s": sum(r["train_time_s"] for r in self.history),
            "device": str(self.exp.device), "num_parameters": count_parameters(self.exp.model),
            "versions": rundir.versions(), **extra,
        }
        if self.write:
            rundir.write_json(self.path, summary)
        return summary
