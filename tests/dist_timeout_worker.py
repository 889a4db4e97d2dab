"""Run under torchrun by tests/test_distributed.py: rank 1 never joins rank 0's collective.

Rank 0 must give up after BNCTL_DIST_TIMEOUT seconds with bnctl's own error, not hang
and not report an internal error. Each rank writes what it raised to OUT/rankN.txt.
"""

import sys
import time
from pathlib import Path

import torch

from bnctl.distributed import process_group
from bnctl.errors import BnctlError


def main(out: str) -> None:
    outcome = "finished"
    try:
        with process_group("cpu") as dist:
            rank = dist.rank
            if rank == 0:
                dist.sum(torch.ones(1))
            else:
                time.sleep(float(sys.argv[2]))  # stuck long past the timeout, then leaves
    except BnctlError as err:
        outcome = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.txt").write_text(outcome)


if __name__ == "__main__":
    main(sys.argv[1])
