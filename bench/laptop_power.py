"""The power calculation behind a study profile's seed counts (docs/studies.md, "Seeds from a power calculation").

    python bench/laptop_power.py                 # the laptop profile, seed s.d. 2 and 4 points
    python bench/laptop_power.py --profile quick --sd 3

For each section: the smallest effect detectable with 80% power at Holm's strictest level
(two-sided alpha = 0.05/7, all seven sections tested) and at its last step (0.05), for the profile's seeds per cell and an
assumed seed-to-seed standard deviation. MDE = (t(1-a/2, df) + t(0.8, df)) * sd * sqrt(sum c^2 / n)
with df ~ cells x (n - 1); section 1's rank test instead needs enough seeds per norm for its
smallest attainable p-value, 2 / C(2n, n), to fall below the level.
"""

from __future__ import annotations

import argparse
from math import comb, sqrt

from scipy import stats

from bnctl import study

SECTIONS = 7  # the tested sections Holm runs over: five about accuracy, the landscape and ICS sections
POWER = 0.8
# section -> (sum of squared contrast weights over cell means, cells the contrast uses)
CONTRASTS = {"init": (2 * (1 + 4 * 0.25 ** 2), 10),  # (reference - mean of the 4 others), none minus BN
             "regularization": (2.0, 2),  # gap without dropout, none minus BN
             "small_batches": (4.0, 4),  # (BN - GN at the reference batch) - (BN - GN at the smallest)
             "notebook_eval": (1.0, 1)}  # paired by checkpoint: sd is that of the paired difference


def mde(sd: float, n: int, c2: float, cells: int, alpha: float) -> float:
    df = max(1, cells * (n - 1))
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(POWER, df)) * sd * sqrt(c2 / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="laptop")
    parser.add_argument("--sd", type=float, nargs="+", default=[2.0, 4.0], help="seed-to-seed s.d., points")
    args = parser.parse_args()
    plans = study.plan(args.profile, [])
    seeds = {key: len(p.seeds) for key, p in plans.items()} | {"notebook_eval": len(plans["small_batches"].seeds)}
    strict, last = 0.05 / SECTIONS, 0.05
    n = seeds["lr"]
    print(f"{args.profile} profile; 80% power; alpha {strict:g} (Holm's first step) / {last:g} (its last)")
    print(f"lr: rank test of {n} vs {n} seeds: smallest two-sided p = {2 / comb(2 * n, n):.4f} "
          f"({'can' if 2 / comb(2 * n, n) < strict else 'cannot'} pass {strict:g})")
    for key, (c2, cells) in CONTRASTS.items():
        n = seeds[key]
        print(f"{key}: {n} seeds, sum c^2 {c2:g}: " + "; ".join(
            f"sd {sd:g}: MDE {mde(sd, n, c2, cells, strict):.1f} / {mde(sd, n, c2, cells, last):.1f} points"
            for sd in args.sd))


if __name__ == "__main__":
    main()
