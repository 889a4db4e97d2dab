"""BN diagnostics: what the normalization layers see and do during training.

Every conv/linear layer is paired with the normalization layer that follows it
(or its place, when model.norm=none, so runs with and without BN are comparable).
Every ``train.diagnostics_every`` steps, hooks record for each pair:

- input_mean, input_std        the activations entering the norm (the conv/linear output)
- output_mean, output_std      the activations leaving it (train mode, so batch-normalized)
- running_mean_avg, running_var_avg   channel averages of BN's population estimates
- gamma_mean, gamma_std, beta_mean    the learned scale and shift
- weight_norm, grad_norm       L2 norms of the conv/linear weight and its (unscaled) gradient
- dead_frac                     share of the layer's units (conv channels, fc neurons) whose ReLU output is
                               zero for every sample (and position) of the sampled batch: dead ReLUs.
                               Recorded where a ReLU module directly follows the norm (seed_cnn, vgg);
                               resnet20's ReLUs are functional and partly act on the residual sum, so not there.

Hooks are attached only for the sampled steps, so the steps between cost nothing;
a sample costs about a sixth of one step (seed_cnn, batch 32, CPU), under 1% at every=50.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnctl import rundir
from bnctl.norms import is_norm

COLUMNS = ["step", "epoch", "layer", "stat", "value"]


def layer_pairs(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(friendly name, conv/linear layer, the norm right after it or None) in model order."""
    modules = list(model.modules())
    pairs, counts = [], {"conv": 0, "fc": 0}
    for i, m in enumerate(modules):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        kind = "conv" if isinstance(m, nn.Conv2d) else "fc"
        counts[kind] += 1
        nxt = modules[i + 1] if i + 1 < len(modules) else None
        if nxt is None or not (is_norm(nxt) or isinstance(nxt, nn.Identity)):
            continue  # the classifier's last layer, which nothing normalizes
        pairs.append((f"{kind}{counts[kind]}", m, nxt if is_norm(nxt) else None))
    return pairs


def _followed_by_relu(model: nn.Module, pairs: list[tuple[str, nn.Module, nn.Module | None]]) -> set[str]:
    """Names of the pairs whose norm (or, without one, its Identity placeholder) feeds an nn.ReLU directly."""
    modules = list(model.modules())
    position = {id(m): i for i, m in enumerate(modules)}
    found = set()
    for name, layer, norm in pairs:
        i = position[id(norm if norm is not None else layer)] + (0 if norm is not None else 1)  # skip the Identity
        if i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU):
            found.add(name)
    return found


def dead_fraction(pre_relu: torch.Tensor) -> torch.Tensor:
    """Share of channels (dim 1) that are <= 0 for every sample and position: their ReLU output is all zero."""
    dims = [d for d in range(pre_relu.dim()) if d != 1]
    alive = (pre_relu > 0).amax(dim=dims)
    return 1.0 - alive.float().mean()


class BNProbe:
    """Forward/backward hooks that sample BN statistics every few steps into diagnostics.csv."""

    def __init__(self, model: nn.Module, path: Path, every: int, keep_before_epoch: int = 1, scaler: Any = None):
        self.every, self.active = every, False
        self.scaler = scaler  # fp16's GradScaler: gradients are seen scaled by it, before the optimizer unscales
        self.step, self.epoch = 0, 0
        self.pairs = layer_pairs(model)
        self.relu_after = _followed_by_relu(model, self.pairs)
        self.rows: list[tuple] = []
        self._pending: list[tuple[str, str, torch.Tensor]] = []
        self._handles: list = []
        self.path, self.writer = path, None
        self._kept: list[tuple] = []
        if keep_before_epoch > 1 and path.is_file():  # a resumed run keeps the samples of its finished epochs
            self._kept = [tuple(r[c] for c in COLUMNS) for r in rundir.read_csv(path)
                          if isinstance(r["epoch"], int) and r["epoch"] < keep_before_epoch]

    def open(self) -> None:
        """Start diagnostics.csv afresh with the kept samples (separate from reading, which may fail)."""
        self.writer = rundir.CsvAppender(self.path, COLUMNS)
        self.writer.extend(self._kept)
        self._kept = []

    @classmethod
    def for_experiment(cls, exp: Any, run_dir: Path, start_epoch: int) -> "BNProbe":
        return cls(exp.model, run_dir / rundir.DIAGNOSTICS_FILE, exp.cfg.train.diagnostics_every, start_epoch,
                   scaler=exp.precision.scaler)

    # -- hooks, attached only for the steps that are sampled
    def _attach(self) -> None:
        for name, layer, norm in self.pairs:
            self._handles.append(layer.register_forward_hook(self._input_hook(name, dead=norm is None)))
            if norm is not None:
                self._handles.append(norm.register_forward_hook(self._output_hook(name, norm)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _input_hook(self, name: str, dead: bool):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.active and module.training:
                x = output.detach().float()
                self._pending += [(name, "input_mean", x.mean()), (name, "input_std", x.std())]
                if dead and name in self.relu_after:  # no norm: the ReLU acts on this output itself
                    self._pending.append((name, "dead_frac", dead_fraction(x)))
        return hook

    def _output_hook(self, name: str, norm: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (self.active and module.training):
                return
            y = output.detach().float()
            found = [(name, "output_mean", y.mean()), (name, "output_std", y.std())]
            if name in self.relu_after:
                found.append((name, "dead_frac", dead_fraction(y)))
            if getattr(norm, "running_mean", None) is not None:
                found += [(name, "running_mean_avg", norm.running_mean.mean()),
                          (name, "running_var_avg", norm.running_var.mean())]
            if getattr(norm, "weight", None) is not None:
                found += [(name, "gamma_mean", norm.weight.detach().mean()),
                          (name, "gamma_std", norm.weight.detach().std(correction=0)),  # one channel: 0, not NaN
                          (name, "beta_mean", norm.bias.detach().mean())]
            self._pending += found
        return hook

    # -- called by the training loop
    def start_step(self, step: int, epoch: int) -> None:
        self.step, self.epoch = step, epoch
        self.active = step % self.every == 0
        # A module without hooks keeps torch's fast call path, so unsampled steps cost nothing.
        if self.active and not self._handles:
            self._attach()
        elif not self.active and self._handles:
            self._detach()

    def after_backward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        if not self.active:
            return
        unscale = 1.0 / self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else 1.0
        for name, layer, _ in self.pairs:
            self._pending.append((name, "weight_norm", layer.weight.detach().norm()))
            if layer.weight.grad is not None:
                self._pending.append((name, "grad_norm", layer.weight.grad.detach().float().norm() * unscale))
        values = torch.stack([v.float() for _, _, v in self._pending]).tolist()  # one device sync per sample
        self.rows += [(self.step, self.epoch, n, s, v) for (n, s, _), v in zip(self._pending, values)]
        self._pending.clear()
        self.active = False
        self._detach()

    def flush(self) -> None:
        if self.writer is None:  # never opened: the run stopped before it began
            return
        self.writer.extend(self.rows)
        self.rows.clear()

    def close(self) -> None:
        """Detach the hooks and write what is left: a diverged run's last samples are the telling ones."""
        self._pending.clear()
        self._detach()
        self.flush()  # samples of an unfinished epoch; a resumed run drops them (keep_before_epoch)
