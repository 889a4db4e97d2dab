"""Stop requests: how the program around the engine asks a data-parallel run to stop cleanly.

One process can stop wherever a signal lands (Ctrl-C raises KeyboardInterrupt at once). A rank of
a data-parallel group cannot: if it leaves while the others wait for it in a collective, they fail
with a connection error (gloo) or hang until the timeout (nccl), and rank 0 may never record the
stop. So under torchrun the CLI's signal handler only calls request(); the training loop reads
the requests of all ranks in the all-reduce that already checks the loss for divergence, and every
rank stops at the same step, down the same path as Ctrl-C.
"""

from __future__ import annotations

REASONS = ("SIGINT", "SIGTERM")  # what may ask; a stop caused by SIGTERM exits with 143, otherwise 130

_requested: dict[str, bool] = {}


def request(reason: str) -> None:
    """Ask the running training loop to stop at its next checked step (reason: one of REASONS)."""
    if reason not in REASONS:
        raise ValueError(f"unknown stop reason {reason!r}; one of {REASONS}")
    _requested[reason] = True


def flags() -> list[float]:
    """One number per reason, 1.0 where requested: summed over ranks, nonzero means stop."""
    return [1.0 if _requested.get(r) else 0.0 for r in REASONS]


def reason(summed: list[float]) -> str | None:
    """The reason a stop was agreed on, from flags() summed over ranks (SIGTERM first); None: go on."""
    for r, v in sorted(zip(REASONS, summed), key=lambda p: p[0] != "SIGTERM"):
        if v > 0:
            return r
    return None


def clear() -> None:
    _requested.clear()
