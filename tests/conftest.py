"""Shared test helpers: tiny configs on the synthetic data, and the CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
import torch
from typer.testing import CliRunner

from bnctl.cli import app

# Small enough that a full train -> eval -> plot takes a few seconds on 2 CPU cores.
TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "synthetic", "train_size": 512, "test_size": 256},
    "model": {"name": "seed_cnn", "norm": "batch"},
    "optimizer": {"name": "adam", "lr": 0.003},
    "train": {"epochs": 2, "batch_size": 32, "eval_batch_size": 128},
}


def tiny_raw(**sections) -> dict:
    """TINY with some sections' keys replaced, e.g. tiny_raw(model={"norm": "none"})."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """A YAML file holding TINY."""
    return write_config(tmp_path / "tiny.yaml", tiny_raw())


@pytest.fixture
def cli():
    """Invoke bnctl in-process: cli("train", "--config", ...) -> click Result."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds waiting, badly so on a busy machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Module fixtures that train whole runs for a file's tests: a test using one is end-to-end, and so slow.
# With the multi-process and subprocess tests (marked @pytest.mark.slow, or a whole module with
# pytestmark) they are left out of the quick loop, `python -m pytest -q -m "not slow"` (docs/development.md).
SLOW_FIXTURES = {"run_copy", "trained", "trained_run", "runs", "layer_runs", "killed_and_resumed", "bn_run",
                 "diagnostics_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def busy_machine_threads(monkeypatch):
    """Training at batch < 16 chooses its threads from the 1-minute load average (experiment.choose_threads),
    which drifts while the suite runs; the thread count changes a run's last bits. Tests see a busy machine,
    so small batches train on one thread in every test, as a sweep's workers do. Tests of the choice itself
    patch os.getloadavg again."""
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """A child process's output once it ends; past timeout, kill its whole session (start_new_session=True)
    and fail with what it printed, so that a stuck child cannot hang the suite."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} still running after {timeout}s:\n{out}\n{err}") from None
