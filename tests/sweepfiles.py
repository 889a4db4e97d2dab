"""Constructed sweep directories that follow the sweep contract (sweep.yaml, runs/<name>/summary.json, metrics.csv).

The report and the verdict rules read only these files, so tests build them directly with
known numbers instead of training.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import yaml

RESULT_COLUMNS = ["status", "epochs", "final_test_acc", "final_test_loss", "final_train_acc",
                  "final_clean_train_acc", "best_test_acc", "best_epoch", "wall_time_s", "error"]


def cell_name(overrides: dict[str, Any]) -> str:
    return "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in overrides.items())


def make_sweep(root: Path, grid: dict[str, list], seeds: list[int],
               result: Callable[[dict[str, Any], int], dict[str, Any] | None], name: str = "test") -> Path:
    """A sweep dir whose run (overrides, seed) has result(overrides, seed) (None: not started yet).

    A result may hold 'curve': a list of per-epoch test accuracies, written to the run's metrics.csv.
    """
    sweep = root / name
    (sweep / "runs").mkdir(parents=True)
    runs, rows = [], []
    for values in itertools.product(*grid.values()):
        overrides = dict(zip(grid, values))
        for seed in seeds:
            cell = cell_name(overrides)
            run = {"name": f"{cell}-seed{seed}", "cell": cell, "overrides": overrides, "seed": seed}
            runs.append(run)
            res = result(overrides, seed)
            row = {"run": run["name"], "cell": cell, "seed": seed, **overrides}
            row.update({c: "" for c in RESULT_COLUMNS})
            row["status"] = "pending"
            if res is not None:
                curve = res.pop("curve", None)
                row.update(res)
                run_dir = sweep / "runs" / run["name"]
                run_dir.mkdir()
                summary = {"status": row["status"], "epochs_completed": row["epochs"] or None,
                           "final": {"test_acc": res.get("final_test_acc"), "test_loss": res.get("final_test_loss"),
                                     "train_acc": res.get("final_train_acc"),
                                     "clean_train_acc": res.get("final_clean_train_acc")},
                           "best": {"test_acc": res.get("best_test_acc"), "epoch": res.get("best_epoch")},
                           "wall_time_s": res.get("wall_time_s")}
                if res.get("error"):
                    summary["error"] = res["error"]
                (run_dir / "summary.json").write_text(json.dumps(summary))
                if curve:
                    lines = ["epoch,train_loss,train_acc,test_loss,test_acc"]
                    lines += [f"{e},1.0,50.0,1.0,{acc!r}" for e, acc in enumerate(curve, 1)]
                    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
            rows.append(row)
    plan = {"name": name, "created": "2026-11-30T09:00:00", "base_config": "configs/quickstart.yaml",
            "config": {}, "fixed": {"train.epochs": 3}, "grid": grid, "seeds": seeds, "runs": runs}
    (sweep / "sweep.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    with open(sweep / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "cell", "seed", *grid, *RESULT_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return sweep
