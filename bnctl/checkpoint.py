"""Checkpoints: plain dicts with a format version, saved atomically, loaded safely.

A checkpoint holds everything needed to continue or evaluate a run without its
YAML: model and optimizer state, scheduler, epoch, metric history, every RNG
state and the resolved config. Loading never unpickles arbitrary objects.
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
    missing = [k for k in ("model", "config", "epoch") if k not in state]
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
        with open(folder / "last.pt", "rb") as src, rundir.atomic_write(folder / "best.pt", "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError:
        pass


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
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any], data_generator: torch.Generator) -> None:
    """Put every RNG back where capture_rng found it."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    data_generator.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
