"""Checkpoints: plain dicts with a format version, saved atomically, loaded safely.

A checkpoint holds everything needed to continue or evaluate a run without its
YAML: model and optimizer state, scheduler, epoch, metric history, every RNG
state and the resolved config. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnctl.errors import CheckpointError

FORMAT = "bnctl-checkpoint"
FORMAT_VERSION = 1


def save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, Any]:
    """Load a bnctl checkpoint with torch's weights-only unpickler; refuse anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower() or "unsupported global" in str(err).lower():
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects other than tensors and plain data, "
                "which could run code when unpickled; nothing in it was executed"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: truncated or not a torch file ({first[:120]})") from None
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
    return state


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
