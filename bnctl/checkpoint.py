"""Checkpoints: their schema, their paths, and the order an epoch writes them in.

A checkpoint is a plain dict with a format version holding everything needed to
continue or evaluate a run without its YAML: model and optimizer state, scheduler,
epoch, metric history, every RNG state and the resolved config (EVAL_KEYS,
RESUME_KEYS). It is saved atomically and loaded without unpickling arbitrary
objects.
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnctl import config as config_mod, rundir
from bnctl.errors import CheckpointError, ConfigError, DataError

FORMAT = "bnctl-checkpoint"
FORMAT_VERSION = 1

LAST, BEST = rundir.LAST_CHECKPOINT, rundir.BEST_CHECKPOINT

# What a checkpoint must hold: to be evaluated (load checks these), and to be continued as well.
EVAL_KEYS = ("model", "config", "epoch")
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "history", "best")


last_path = rundir.last_checkpoint  # RUN/checkpoints/last.pt: what a resume continues from


def best_path(run_dir: Path) -> Path:
    """RUN/checkpoints/best.pt: the epoch with the highest test accuracy, the one eval takes by default."""
    return Path(run_dir) / rundir.CHECKPOINT_DIR / BEST


def state(exp, epoch: int, history: list[dict], best: dict) -> dict[str, Any]:
    """The checkpoint of a run (an engine Experiment) after epoch: EVAL_KEYS, RESUME_KEYS and the classes."""
    return {
        "epoch": epoch, "model": exp.model.state_dict(), "optimizer": exp.optimizer.state_dict(),
        "scheduler": exp.scheduler.state_dict(), "scaler": exp.precision.scaler.state_dict(),
        "history": history, "best": best, "config": config_mod.to_dict(exp.cfg),
        "rng": capture_rng(exp.generator),
        "classes": list(exp.data.classes),  # eval refuses data whose class folders differ (labels would be permuted)
    }


def checkpoint_for(path: Path) -> Path:
    """What `bnctl eval PATH` evaluates: a checkpoint file as given, or a run directory's best.pt."""
    path = Path(path)
    if path.is_dir():
        best = best_path(path)
        if best.is_file():
            return best
        if (path / rundir.CONFIG_FILE).is_file():
            raise ConfigError(f"{path} has no checkpoints/best.pt yet (no epoch completed); nothing to evaluate")
        raise ConfigError(f"{path} is a folder but not a bnctl run directory (no {rundir.CONFIG_FILE}); "
                          "give a checkpoint file (.pt) or a run directory")
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    return path


def eval_output_name(result: dict[str, Any], recalibrate_batch_size: int | None = None) -> str:
    """The stem of an evaluation's files under RUN/eval/, named by what was measured.

    running, batch-bs4, recal-2000 (recal-2000-bs32 with an explicit recalibration batch size);
    a checkpoint other than best.pt prefixes its own name (last-running), so results never overwrite
    one another unless they measure the same thing. The recalibration's count is of the images it
    used: whole batches, so --recalibrate 100 in batches of 8 is recal-104-bs8.
    """
    if result.get("bn_mode") == "batch":
        stem = f"batch-bs{result.get('batch_size')}"
    elif "recalibration" in result:
        stem = f"recal-{result['recalibration']['images']}"
        if recalibrate_batch_size:
            stem += f"-bs{recalibrate_batch_size}"
    else:
        stem = "running"
    ckpt = Path(str(result.get("checkpoint", BEST)))
    return stem if ckpt.name == BEST else f"{ckpt.stem}-{stem}"


def save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with rundir.atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load(path: Path) -> dict[str, Any]:
    """Load a bnctl checkpoint with torch's weights-only unpickler; refuse anything else."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a checkpoint file, e.g. RUN_DIR/checkpoints/best.pt")
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was never completely written")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error below says enough
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the refused global ("GLOBAL posix.system"); other unpickling errors mean damage.
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if refused or "Can only create new object" in str(err):
            what = f" ({refused.group(1)})" if refused else ""
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors and plain data{what}, "
                "which could run code when unpickled; nothing in it was executed. Only load checkpoints you trust"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or not a torch file)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from None
    except Exception:  # noqa: BLE001 - torch reports damaged files with many exception types
        raise CheckpointError(f"{path} is not a readable checkpoint: truncated, corrupt or not a torch file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = " (it looks like a bare state_dict from another tool)" if isinstance(state, dict) else ""
        raise CheckpointError(f"{path} is not a bnctl checkpoint{hint}; bnctl writes them to RUN_DIR/checkpoints/")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this bnctl understands ({FORMAT_VERSION}); upgrade bnctl"
        )
    missing = [k for k in EVAL_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete bnctl checkpoint (missing {', '.join(missing)})")
    config_mod.upgrade_stored(state["config"])
    return state


def repair_best(folder: Path, last_epoch: int, best_epoch: int | None, on_disk: int | None = None) -> None:
    """Copy last.pt to best.pt when the last epoch is the best and best.pt (holding epoch on_disk) lags.

    Epochs write last.pt, then best.pt: a stop between the two is repaired from last.pt, which
    resume trusts. Best effort: it runs while another error is handled, which it must not hide.
    """
    if not last_epoch or best_epoch != last_epoch or on_disk == last_epoch:
        return
    try:
        with open(folder / LAST, "rb") as src, rundir.atomic_write(folder / BEST, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError:
        pass


class EpochSaver:
    """An epoch's checkpoint writes in their safe order: last.pt, then best.pt when the epoch is the best.

    last.pt is what resume trusts, so it goes first; a stop between the two is repaired from it.
    """

    def __init__(self, run_dir: Path, best_epoch: int | None):
        self.folder = Path(run_dir) / rundir.CHECKPOINT_DIR
        self.best_on_disk = best_epoch  # the epoch best.pt holds

    def save_last(self, state: dict[str, Any]) -> None:
        """First: once last.pt is written, the epoch counts as kept."""
        save(self.folder / LAST, state)

    def save_best(self, state: dict[str, Any]) -> None:
        """Then, for the best epoch so far, the same state as best.pt."""
        save(self.folder / BEST, state)
        self.best_on_disk = state["epoch"]

    def repair(self, last_epoch: int, best_epoch: int | None) -> None:
        """After a stop: best.pt brought level with last.pt when the last epoch is the best (best effort)."""
        repair_best(self.folder, last_epoch, best_epoch, self.best_on_disk)


def resume_into(exp, run_dir: Path) -> tuple[list[dict], dict[str, Any], int]:
    """Load run_dir's last.pt into an engine Experiment; return its history, best metrics and the next epoch."""
    path = last_path(run_dir)
    state = _resume_state(path, exp)
    check_classes(state, exp.data.classes, path)
    load_model_state(exp.model, state["model"], path)
    exp.optimizer.load_state_dict(state["optimizer"])
    exp.precision.scaler.load_state_dict(state["scaler"])
    exp.scheduler.load_state_dict(state["scheduler"])
    # The schedule is a pure function of the step: redo the last step under this run's (maybe
    # extended) length, so the lr is exactly what an uninterrupted run of that length would use.
    exp.scheduler.last_epoch -= 1
    exp.scheduler.step()
    restore_rng(state["rng"], exp.generator)
    return state["history"], state["best"], state["epoch"] + 1


def _resume_state(path: Path, exp) -> dict[str, Any]:
    """The checkpoint to continue from, after checking it belongs to this run's config."""
    state = load(path)
    # Both sides validated: a key added since the checkpoint was written compares as its default.
    stored = config_mod.validate(state["config"], f"stored in {path}", moved=True)
    now, then = config_mod.flatten(config_mod.to_dict(exp.cfg)), config_mod.flatten(config_mod.to_dict(stored))
    allowed = set(config_mod.RESUMABLE_KEYS)
    if exp.notes and then.get("train.precision") == "fp16":  # adapted to a device without fp16 (setup's note)
        allowed.add("train.precision")
    changed = sorted(k for k in now.keys() | then.keys() if k not in allowed and now.get(k) != then.get(k))
    if changed:
        raise ConfigError(f"{rundir.run_dir_of(path) / rundir.CONFIG_FILE} no longer matches its checkpoint "
                          f"({', '.join(changed[:5])} differ); restore it or start a new run")
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it can be evaluated but not resumed")
    return state


def check_classes(state: dict[str, Any], classes: list[str], path: Path) -> None:
    """Refuse data whose class folders differ from the ones the model was trained on (labels would be permuted)."""
    trained = state.get("classes")
    if trained is not None and list(trained) != list(classes):
        raise DataError(f"{path} was trained on classes {list(trained)} but the data has {list(classes)}; "
                        "the model's outputs follow the trained order, so every label would be wrong. "
                        "Evaluate on data with the same class folders (names and order)")


def load_model_state(model: torch.nn.Module, weights: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's weights into a model, explaining a mismatch instead of dumping torch's list."""
    expected = model.state_dict()
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: the 'model' entry is not a state_dict")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    resized = [k for k in expected if k in weights and getattr(weights[k], "shape", None) != expected[k].shape]
    if not (missing or unexpected or resized):
        model.load_state_dict(weights)
        return
    # The last weight is the output layer's: a mismatch there alone means a different class count.
    k = [k for k in expected if k.endswith(".weight")][-1]
    if resized and all(r.rsplit(".", 1)[0] == k.rsplit(".", 1)[0] for r in resized) and not (missing or unexpected):
        raise CheckpointError(
            f"{path} predicts {weights[k].shape[0]} classes but the data has {expected[k].shape[0]}; "
            "evaluate it on data with the classes it was trained on")
    if resized:
        k = resized[0]
        detail = f"{k} has shape {list(weights[k].shape)} there but {list(expected[k].shape)} here"
    else:
        detail = ", ".join(f"{n} {kind} (e.g. {ks[0]})" for kind, ks, n in
                           (("missing", missing, len(missing)), ("unexpected", unexpected, len(unexpected))) if ks)
    raise CheckpointError(f"{path} does not fit the model its config describes: {detail}. "
                          "Was it written by another bnctl version or edited?")


def capture_rng(data_generator: torch.Generator) -> dict[str, Any]:
    """Every RNG state a run draws from, in types the weights-only loader accepts."""
    return {**capture_process_rng(), "data": data_generator.get_state()}


def capture_process_rng() -> dict[str, Any]:
    """The process-wide RNG states (Python, NumPy, torch, CUDA): what dropout and noisy BN draw from."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], data_generator: torch.Generator) -> None:
    """Put every RNG back where capture_rng found it."""
    restore_process_rng(rng)
    data_generator.set_state(rng["data"])


def restore_process_rng(rng: dict[str, Any]) -> None:
    """Put the process-wide RNGs back where capture_process_rng (or capture_rng) found them."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
