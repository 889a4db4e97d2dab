"""Two runs' landscape and ICS measures side by side, per band of the training loss (from landscape.csv only).

    python bench/landscape_bands.py BN_RUN NO_BN_RUN [--edges 2.45 2.25 1.6 1.2 0.8]

For each band [lo, hi) of the loss at the probed weights (loss_here): the number of probes of each
run in it, the medians of loss_range, grad_change_max and beta_max, and per layer the median
relative ICS ||G - G'|| / ||G|| and cos(G, G'). This is the table in docs/landscape.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bnctl.landscape_plot import read


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def band(data: dict, lo: float, hi: float) -> dict:
    steps = [t for t, v in data["summary"].get("loss_here", {}).items() if lo <= v < hi]
    out = {"n": len(steps)}
    for m in ("loss_range", "grad_change_max", "beta_max"):
        out[m] = _median([data["summary"][m][t] for t in steps])
    ics = data["ics"]
    out["rel_ics"] = [_median([ics["ics_l2"][layer][t] / ics["grad_norm"][layer][t] for t in steps
                               if t in ics.get("ics_l2", {}).get(layer, {})]) for layer in data["layers"]]
    out["cos"] = [_median([ics["ics_cos"][layer][t] for t in steps if t in ics.get("ics_cos", {}).get(layer, {})])
                  for layer in data["layers"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs=2, type=Path)
    ap.add_argument("--edges", type=float, nargs="+", default=[2.45, 2.25, 1.6, 1.2, 0.8],
                    help="band edges of the training loss, high to low")
    args = ap.parse_args()
    a, b = (read(r) for r in args.runs)
    if a is None or b is None:
        raise SystemExit("both runs need a landscape.csv")
    print(f"A = {args.runs[0]}\nB = {args.runs[1]}\nlayers: {', '.join(a['layers'])}")
    edges = sorted(args.edges, reverse=True)
    for hi, lo in zip(edges, edges[1:]):
        ra, rb = band(a, lo, hi), band(b, lo, hi)
        print(f"\nloss [{lo:g}, {hi:g}): probes {ra['n']} / {rb['n']}")
        for m in ("loss_range", "grad_change_max", "beta_max"):
            print(f"  {m:16s} {ra[m]:8.3f} / {rb[m]:8.3f}")
        print("  relative ICS     " + " ".join(f"{v:.2f}" for v in ra["rel_ics"]) + " / "
              + " ".join(f"{v:.2f}" for v in rb["rel_ics"]))
        print("  cos(G, G')       " + " ".join(f"{v:.3f}" for v in ra["cos"]) + " / "
              + " ".join(f"{v:.3f}" for v in rb["cos"]))


if __name__ == "__main__":
    main()
