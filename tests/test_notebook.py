"""The example notebook runs, every cell, on a fresh kernel of this Python, on the synthetic data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # a kernel that trains eight runs

NOTEBOOK = Path(__file__).parents[1] / "examples" / "bn_tutorial.ipynb"
KERNEL = "bnctl-test-python"  # a name no installed kernel has: the test's own, below


def _kernel_of_this_python(folder: Path) -> Path:
    """A kernelspec that starts this interpreter (the test environment's, with bnctl and ipykernel installed),
    whatever kernels the machine has installed under the usual names."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "bnctl tests", "language": "python"}))
    return folder


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", "") if o["output_type"] == "stream" else o.get("data", {}).get("text/plain", ""))
    return "".join(out)


def test_the_example_notebook_runs_every_cell(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_of_this_python(tmp_path / "jupyter")))
    # One thread, as the other tests' tiny tensors use: on a shared CI machine more only adds waiting.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "work"  # no data/cifar-10-batches-py here: the notebook takes the synthetic data
    work.mkdir()
    # A generous per-cell limit: a busy CI machine is slow, and a hung cell must still fail.
    NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(work)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o["output_type"] != "error" for c in code for o in c.outputs)
    assert "synthetic data, seed_cnn with norm=batch, adam lr 0.001, batch 32, 3 epochs" in _text(code[0])
    # Each training printed its epochs, and the runs are where the notebook's working directory keeps them.
    assert _text(code[1]).count("epoch 3/3") == 2 and len(list((work / "runs").glob("*-with_bn"))) == 1
    images = [c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert [code.index(c) for c in images] == [2, 5]  # the comparison's figure and the sweep's curves
    assert "norm=batch" in _text(code[2]) and "norm=none" in _text(code[2])
    evals = _text(code[3])
    assert "eval mode" in evals and "test batches of 4" in evals and "without BN" in evals
    report = next(o["data"] for o in code[4].outputs if o["output_type"] == "execute_result")
    assert report["text/markdown"].startswith("| model.norm |") and "| batch |" in report["text/markdown"]
    sweep_runs = list((work / "runs" / "sweeps").glob("*bn_or_not/runs/*"))
    assert sorted(p.name for p in sweep_runs) == [f"norm-{n}-seed{s}" for n in ("batch", "none") for s in (0, 1, 2)]
