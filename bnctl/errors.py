"""The one exception type bnctl shows to users, and its few flavours.

Library code raises these with a message a person can act on; the CLI turns
them into that message and an exit code, without a traceback.
"""

from __future__ import annotations


class BnctlError(Exception):
    """A known failure: the message names the problem and, where possible, the fix."""

    exit_code = 1


class ConfigError(BnctlError):
    """Bad usage or configuration: nothing has run and nothing was written."""

    exit_code = 2


class DataError(BnctlError):
    """The dataset is missing, malformed, or does not fit the model."""

    exit_code = 2

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what  # for data not found: what was missing, without the fix (eval names its own)


class CheckpointError(BnctlError):
    """A checkpoint that cannot be loaded safely or is not bnctl's."""

    exit_code = 1


class DivergedError(BnctlError):
    """Training produced a non-finite loss; the run is kept and marked diverged."""

    exit_code = 3

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class InterruptedRun(BnctlError):
    """The user stopped training (Ctrl-C), or the system did (SIGTERM); the last complete epoch is kept."""

    exit_code = 130

    def __init__(self, message: str, signal: str | None = None):
        super().__init__(message)
        self.signal = signal  # "SIGTERM" when a scheduler stopped the run: then the shell's code for it, 143
        if signal == "SIGTERM":
            self.exit_code = 143
