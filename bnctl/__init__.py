"""bnctl: an experiment runner for studying Batch Normalization in convolutional networks.

The public Python API (docs/api.md) is what ``__all__`` lists; it is imported on first use, so that
``import bnctl`` (and the command line) stays quick. Every other module is internal and may change.
A public name never equals a submodule's name (bnctl.sweep, bnctl.report are modules): importing a
submodule sets the package attribute of its name, which would hide a function of that name.
"""

from bnctl.errors import BnctlError, CheckpointError, ConfigError, DataError, DivergedError, InterruptedRun

__version__ = "0.1.0"

_API = ("train", "load_run", "load_config", "evaluate", "compare", "run_sweep", "load_sweep", "sweep_report", "study_claims",
        "Run", "Evaluation", "Comparison", "Sweep", "Report", "StudyResult")

__all__ = [*_API, "BnctlError", "ConfigError", "DataError", "CheckpointError", "DivergedError", "InterruptedRun",
           "__version__"]


def __getattr__(name: str):
    if name in _API:
        from bnctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'bnctl' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
