"""Simulated study results: worlds whose truth is known, as result rows the verdict rules read.

Each world gives every cell a true mean accuracy; a run's accuracy is that plus seed noise,
rounded to the test set's quantum (500 images: steps of 0.2 points) and clipped to [0, 100].
A run may diverge (its row says so and carries no accuracy). Everything is drawn from a
numpy Generator seeded by the caller, so every simulation is deterministic.
"""

from __future__ import annotations

import numpy as np

QUANTUM = 0.2  # 500 test images
CHANCE = 10.0
CHANCE_SD = 1.0


def quantize(x: float, quantum: float = QUANTUM) -> float:
    return float(np.clip(np.round(x / quantum) * quantum, 0.0, 100.0).round(6))


def runs(rng, keys: tuple[str, ...], means: dict[tuple, float | None], seeds: int, sd: float = 4.0,
         p_diverge: float = 0.0, quantum: float = QUANTUM, extra=None) -> list[dict]:
    """One row per (cell, seed): final_test_acc ~ N(mean, sd) quantized; None as a mean: the cell always diverges."""
    rows = []
    for values, mean in means.items():
        for seed in range(seeds):
            row = {**dict(zip(keys, values)), "seed": seed, "run": f"{values}-{seed}"}
            if mean is None or rng.random() < p_diverge:
                row |= {"status": "diverged", "final_test_acc": None}
            else:
                spread = CHANCE_SD if mean <= CHANCE else sd  # a network that learned nothing sits near chance
                row |= {"status": "completed", "final_test_acc": quantize(rng.normal(mean, spread), quantum)}
            if extra is not None and row["status"] == "completed":
                row |= extra(rng, values, row)
            rows.append(row)
    return rows


LR = ("model.norm", "optimizer.lr")
LRS = (1e-4, 1e-3, 1e-2, 1e-1)


def lr_world(rng, seeds: int, limits: dict[str, float], level: dict[str, float], sd: float = 4.0,
             p_diverge: float = 0.0) -> list[dict]:
    """Each norm trains (at its level, with noise) up to and including its limit lr, and sits at chance above it."""
    means = {}
    for norm, limit in limits.items():
        for lr in LRS:
            means[(norm, lr)] = level[norm] if lr <= limit * 1.0001 else CHANCE
    return runs(rng, LR, means, seeds, sd, p_diverge)


def lr_null(rng, seeds: int, p_diverge: float = 0.05) -> list[dict]:
    """Both norms alike: each seed's limit is random (index 1, 2 or 3 of the grid); above it, runs diverge."""
    rows = []
    for norm in ("batch", "none"):
        for seed in range(seeds):
            limit = rng.choice(3, p=[0.25, 0.5, 0.25]) + 1  # the seed's true limit: index 1..3 of the grid
            for i, lr in enumerate(LRS):
                row = {"model.norm": norm, "optimizer.lr": lr, "seed": seed, "run": f"{norm}-{lr}-{seed}"}
                if i > limit or rng.random() < p_diverge:
                    row |= {"status": "diverged", "final_test_acc": None}
                else:
                    mean = 60.0 if i <= limit else CHANCE
                    row |= {"status": "completed", "final_test_acc": quantize(rng.normal(mean, 4.0 if i <= limit else 1.0))}
                rows.append(row)
    return rows


INIT = ("model.norm", "model.init_scale")
SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)


def init_world(rng, seeds: int, profile: dict[str, tuple[float, ...]], sd: float = 4.0,
               p_diverge: float = 0.0) -> list[dict]:
    means = {(norm, s): m for norm, ms in profile.items() for s, m in zip(SCALES, ms)}
    return runs(rng, INIT, means, seeds, sd, p_diverge)


REG = ("model.norm", "model.dropout")


def reg_world(rng, seeds: int, train: dict[tuple, float], test: dict[tuple, float], sd: float = 3.0,
              train_sd: float = 1.0) -> list[dict]:
    """Each arm's eval-mode train and test accuracy; the gap is their difference, as report.load computes it."""
    def extra(rng, values, row):
        clean = quantize(min(100.0, rng.normal(train[values], train_sd)), 0.1)  # 1,000 training images
        return {"final_clean_train_acc": clean, "gap": clean - row["final_test_acc"]}
    return runs(rng, REG, test, seeds, sd, extra=extra)


BATCH = ("model.norm", "train.batch_size")
BATCHES = (2, 4, 16, 64)


def batch_world(rng, seeds: int, acc: dict[str, tuple[float, ...]], sd: float = 4.0,
                p_diverge: float = 0.0) -> list[dict]:
    means = {(norm, b): m for norm, ms in acc.items() for b, m in zip(BATCHES, ms)}
    return runs(rng, BATCH, means, seeds, sd, p_diverge)


def eval_world(rng, n: int, effect: float, sd_ckpt: float = 4.0, sd_pair: float = 3.0):
    """Section 5: n checkpoints, each evaluated in eval mode and with test-batch statistics (paired)."""
    running = [quantize(rng.normal(50.0, sd_ckpt)) for _ in range(n)]
    batch = [quantize(r - effect + rng.normal(0.0, sd_pair)) for r in running]
    recal = [quantize(r + rng.normal(1.0, 1.0)) for r in running]
    return running, batch, recal


# ------------------------------------------------------------------ the landscape sections (landscape.csv as series)

LANDSCAPE_STEPS = tuple(range(0, 320, 20))  # 16 probes, every 20 steps
LAYERS = ("conv2", "conv3", "fc1")


def landscape_run(rng, beta: float, ics: float, tau: float | None, run_sd: float = 0.3, probe_sd: float = 0.3,
                  grad_norm: float = 1.0) -> dict:
    """One run's landscape.csv as bnctl.landscape_plot.read gives it.

    The training loss falls from 2.3 towards 0.8 with time constant tau steps (None: it stays on its plateau);
    beta_max is ``beta`` times (1 + loss) (the landscape is rougher where the loss is higher, the same in both
    arms) times a run effect and probe noise (log-normal); relative ICS per layer is ``ics`` the same way.
    """
    run_effect, ics_effect = rng.normal(0, run_sd), rng.normal(0, run_sd)
    summary = {"loss_here": {}, "beta_max": {}, "loss_range": {}, "grad_change_max": {}}
    l2, norms = {n: {} for n in LAYERS}, {n: {} for n in LAYERS}
    for t in LANDSCAPE_STEPS:
        loss = 2.3 + rng.normal(0, 0.01) if tau is None else 0.8 + 1.5 * np.exp(-t / tau) + rng.normal(0, 0.03)
        summary["loss_here"][t] = float(loss)
        b = beta * (1 + loss) * np.exp(run_effect + rng.normal(0, probe_sd))
        summary["beta_max"][t] = summary["grad_change_max"][t] = float(b)
        summary["loss_range"][t] = float(b / 20)
        for n in LAYERS:
            g = grad_norm * np.exp(rng.normal(0, 0.2))
            norms[n][t] = float(g)
            l2[n][t] = float(g * ics * (1 + loss) * np.exp(ics_effect + rng.normal(0, probe_sd)))
    return {"summary": summary, "per_scale": {}, "ics": {"ics_l2": l2, "grad_norm": norms}, "layers": list(LAYERS)}


def landscape_world(rng, seeds: int, beta: dict[str, float], ics: dict[str, float],
                    tau: dict[str, float | None], grad_norm: dict[str, float] | None = None,
                    p_diverge: float = 0.0) -> tuple[list[dict], dict[str, dict | None]]:
    """Result rows and run name -> landscape series for a BN-vs-none sweep; a diverged run has no landscape."""
    rows, found = [], {}
    for norm in beta:
        for seed in range(seeds):
            name = f"norm-{norm}-seed{seed}"
            row = {"run": name, "seed": seed, "model.norm": norm}
            if rng.random() < p_diverge:
                rows.append(row | {"status": "diverged", "final_test_acc": None})
                found[name] = None
                continue
            rows.append(row | {"status": "completed", "final_test_acc": 60.0})
            found[name] = landscape_run(rng, beta[norm], ics[norm], tau[norm],
                                        grad_norm=(grad_norm or {}).get(norm, 1.0))
    return rows, found
