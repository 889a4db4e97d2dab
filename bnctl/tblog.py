"""TensorBoard event files in the run directory (train.tensorboard: true), for users who look there.

metrics.csv stays the source of truth; this is a second view of the same numbers. Every
event sits on the training-step axis (epoch metrics at each epoch's last step), so that a
resumed run can tell TensorBoard to drop what its killed predecessor wrote past the checkpoint.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from bnctl.diagnostics import layer_pairs
from bnctl.errors import ConfigError
from bnctl.norms import is_norm

INSTALL_HINT = "pip install -e '.[tensorboard]' (or pip install tensorboard)"


def check_available() -> None:
    """Raise a ConfigError naming the fix when the tensorboard package is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"train.tensorboard=true needs the tensorboard package, which is not installed: "
                          f"{INSTALL_HINT}; or set train.tensorboard=false")


class TensorBoardLog:
    """Per-step train loss and lr, per-epoch metrics, BN scalars and histograms of gamma, beta, running stats."""

    def __init__(self, run_dir: Path, steps_per_epoch: int, start_epoch: int = 1):
        check_available()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # installed but unusable (e.g. a protobuf clash)
            raise ConfigError(f"train.tensorboard=true: cannot import TensorBoard's writer ({err}); "
                              f"reinstall it with {INSTALL_HINT}") from None
        self.steps_per_epoch = steps_per_epoch
        # A resumed run restarts at its checkpoint: TensorBoard drops older events from that step on.
        purge = (start_epoch - 1) * steps_per_epoch if start_epoch > 1 else None
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge)
        self._steps: list[tuple[int, torch.Tensor, float]] = []

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """One training step's loss (a device tensor: read back once per epoch, not per step) and lr."""
        self._steps.append((step, loss.detach(), lr))

    def epoch(self, epoch: int, row: dict[str, Any], model: nn.Module,
              diagnostics: Iterable[tuple] = ()) -> None:
        """Write the epoch's buffered steps, its metrics row, BN scalars and histograms."""
        w = self.writer
        if self._steps:
            losses = torch.stack([loss.float() for _, loss, _ in self._steps]).tolist()
            for (step, _, lr), loss in zip(self._steps, losses):
                w.add_scalar("train/loss_step", loss, step)
                w.add_scalar("train/lr", lr, step)
            self._steps.clear()
        at = epoch * self.steps_per_epoch - 1  # the epoch's last step
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                w.add_scalar(f"epoch/{key}", value, at)
        for step, _, layer, stat, value in diagnostics:  # train.diagnostics samples, as diagnostics.csv has them
            if value is not None and math.isfinite(value):
                w.add_scalar(f"bn_diagnostics/{stat}/{layer}", value, step)
        friendly = {id(norm): name for name, _, norm in layer_pairs(model) if norm is not None}  # as diagnostics.csv
        for name, module in model.named_modules():
            if not is_norm(module):
                continue
            name = friendly.get(id(module), name)
            for attr, label in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "running_mean"),
                                ("running_var", "running_var")):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor) and tensor.numel():
                    values = tensor.detach().float().cpu()
                    w.add_histogram(f"{label}/{name}", values, at)
                    w.add_scalar(f"bn/{label}_mean/{name}", values.mean().item(), at)
        w.flush()

    def close(self) -> None:
        self._steps.clear()  # an unfinished epoch's steps: a resumed run repeats them
        self.writer.close()
