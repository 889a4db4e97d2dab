"""Optimizers and learning-rate schedules, built from the config.

Schedules are pure functions of the step, so a resumed (or extended) run gets exactly
the learning rate an uninterrupted run of that length would have used.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from bnctl import config as config_mod
from bnctl.config import Config
from bnctl.norms import is_norm


def _param_groups(model: nn.Module, cfg: config_mod.OptimizerConfig) -> list[dict]:
    """Norm scales/shifts get their own weight decay (usually none)."""
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    norm = [p for p in model.parameters() if id(p) in norm_params]
    rest = [p for p in model.parameters() if id(p) not in norm_params]
    groups = [{"params": rest, "weight_decay": cfg.weight_decay}]
    if norm:
        groups.append({"params": norm, "weight_decay": cfg.norm_weight_decay})
    return groups


def _fast_impl(device: torch.device) -> dict[str, bool]:
    # Fused kernels exist for CPU and CUDA optimizers and are markedly faster on small models.
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


OPTIMIZERS: dict[str, Callable[[list[dict], config_mod.OptimizerConfig, torch.device], torch.optim.Optimizer]] = {
    "adam": lambda g, c, d: torch.optim.Adam(g, lr=c.lr, betas=c.betas, **_fast_impl(d)),
    "adamw": lambda g, c, d: torch.optim.AdamW(g, lr=c.lr, betas=c.betas, **_fast_impl(d)),
    "sgd": lambda g, c, d: torch.optim.SGD(g, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, **_fast_impl(d)),
}


def make_optimizer(model: nn.Module, cfg: config_mod.OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](_param_groups(model, cfg), cfg, device)


# Learning-rate multipliers as functions of (step, total_steps, steps_per_epoch, cfg).
# Being pure functions of the step, they stay correct when a resumed run is extended.
def _cosine(t: int, total: int, spe: int, c: Config) -> float:
    floor = c.scheduler.min_lr / c.optimizer.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def _onecycle(t: int, total: int, spe: int, c: Config) -> float:
    # Warm up linearly from lr/25 to lr, then anneal with a cosine to lr/1e4 (Smith & Topin).
    warm = max(1, int(c.scheduler.warmup_pct * total))
    if t < warm:
        return 1 / 25 + (1 - 1 / 25) * t / warm
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(t - warm, total - warm) / max(1, total - warm)))


SCHEDULERS: dict[str, Callable[[int, int, int, Config], float]] = {
    "none": lambda t, total, spe, c: 1.0,
    "cosine": _cosine,
    "step": lambda t, total, spe, c: c.scheduler.gamma ** (t // (c.scheduler.step_size * spe)),
    "onecycle": _onecycle,
}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    total = cfg.train.epochs * steps_per_epoch
    rule = SCHEDULERS[cfg.scheduler.name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: rule(t, total, steps_per_epoch, cfg))

