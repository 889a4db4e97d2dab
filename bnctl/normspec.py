"""What bnctl knows about each choice of norm, optimizer and schedule, without torch.

One row per ``model.norm``: whether it normalizes with batch statistics (and keeps running
estimates for eval), whether data-parallel training may synchronize it over processes, and
which ``model.*`` keys it reads. Beside it, the keys each optimizer and schedule reads.
config (validation), plotting (which keys make runs differ) and norms/distributed (which
layers are synchronized) read these tables; norms.py's registry is checked against them.
Adding a norm: a row here, its builder in norms.py (tests/test_norms.py says if they disagree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormSpec:
    batch_stats: bool  # normalizes with the batch's statistics in training, running estimates in eval
    synchronizable: bool  # under torchrun with train.sync_bn, replaced by BN over the global batch
    keys: frozenset[str]  # the model.* keys its layers read (besides the ones every model reads)


# model.* keys read by the layers of some norms only.
_AFFINE = frozenset({"bn_eps", "bn_affine"})  # every norm that normalizes: epsilon, learned scale/shift
_RUNNING = frozenset({"bn_momentum", "bn_track_running_stats"})  # running estimates for eval mode

NORMS: dict[str, NormSpec] = {
    "batch": NormSpec(batch_stats=True, synchronizable=True, keys=_AFFINE | _RUNNING),
    "batch_manual": NormSpec(batch_stats=True, synchronizable=True, keys=_AFFINE | _RUNNING),
    # Ghost BN's point is per-virtual-batch statistics: synchronizing would make them global.
    "ghost": NormSpec(batch_stats=True, synchronizable=False, keys=_AFFINE | _RUNNING | {"virtual_batch_size"}),
    # BN plus a fresh per-channel shift each step; synchronized BN would drop the noise.
    "noisy_batch": NormSpec(batch_stats=True, synchronizable=False,
                            keys=_AFFINE | _RUNNING | {"bn_noise_mean", "bn_noise_std"}),
    "group": NormSpec(batch_stats=False, synchronizable=False, keys=_AFFINE | {"groups"}),
    "layer": NormSpec(batch_stats=False, synchronizable=False, keys=_AFFINE),
    "instance": NormSpec(batch_stats=False, synchronizable=False, keys=_AFFINE),
    "none": NormSpec(batch_stats=False, synchronizable=False, keys=frozenset()),
}

# Norms that normalize with batch statistics: they cannot train on one sample.
BATCH_STAT_NORMS = frozenset(name for name, spec in NORMS.items() if spec.batch_stats)

# optimizer.* keys read by some optimizers only (lr and the weight decays apply to all).
OPTIMIZER_KEYS: dict[str, frozenset[str]] = {
    "adam": frozenset({"betas"}),
    "adamw": frozenset({"betas"}),
    "sgd": frozenset({"momentum", "nesterov"}),
}

# scheduler.* keys read by some schedules only.
SCHEDULER_KEYS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "cosine": frozenset({"min_lr"}),
    "step": frozenset({"step_size", "gamma"}),
    "onecycle": frozenset({"warmup_pct"}),
}

# model.* keys read by some weight initializations only.
INIT_KEYS: dict[str, frozenset[str]] = {
    "default": frozenset(),
    "kaiming": frozenset(),
    "xavier": frozenset(),
    "normal": frozenset({"init_std"}),
}


def _applies_to(section: str, choice: str, table: dict[str, frozenset[str]]) -> dict[str, tuple[str, frozenset[str]]]:
    keys = set().union(*table.values())
    return {f"{section}.{key}": (choice, frozenset(name for name, read in table.items() if key in read))
            for key in sorted(keys)}


# dotted key -> (the key whose value decides, the values for which it is read). A key not listed
# applies to every run. config adds the model-specific keys (model.depth ...) to this.
KEY_APPLIES: dict[str, tuple[str, frozenset[str]]] = {
    **_applies_to("model", "model.norm", {name: spec.keys for name, spec in NORMS.items()}),
    **_applies_to("model", "model.init", INIT_KEYS),
    **_applies_to("optimizer", "optimizer.name", OPTIMIZER_KEYS),
    **_applies_to("scheduler", "scheduler.name", SCHEDULER_KEYS),
}
