"""The built package: an sdist and a wheel that hold the code, the configs, the license and the README, and a
wheel that, installed with the repository out of sight, runs the quickstart and a study's plan from an empty folder.

Offline and quick: `python -m build --no-isolation` uses the setuptools already installed (the test
extra pins one new enough), and the wheel goes into a bare venv that borrows this environment's
torch & co. through a .pth file instead of downloading them.
"""

from __future__ import annotations

import csv
import email
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from bnctl import configfiles

pytestmark = pytest.mark.slow  # builds the wheel and installs it into a new virtual environment

ROOT = Path(__file__).resolve().parents[1]
NAME, VERSION = "bnctl", metadata.version("bnctl")  # the version pyproject.toml gave this installation
SOURCE = ["pyproject.toml", "README.md", "LICENSE", "bnctl"]  # what the sdist is built from


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel built by `python -m build` from a copy of the source (the wheel from the sdist, as build does)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCE:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=src)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"{NAME}-{VERSION}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"{NAME}-{VERSION}.tar.gz"]
    return {"wheel": wheels[0], "sdist": sdists[0]}


def _package_files() -> set[str]:
    """Every file of the package's source folder (modules and data alike), as paths inside the wheel."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnctl").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _built_in_files() -> set[str]:
    return {f"bnctl/configs/{name}.yaml" for name in configfiles.names()}


def test_the_wheel_holds_every_module_and_config_the_license_and_the_readme(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"{NAME}-{VERSION}.dist-info"
        metadata_text = wheel.read(f"{info}/METADATA").decode("utf-8")
        meta = email.message_from_string(metadata_text)
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert _package_files() <= names and _built_in_files() <= names
    assert {n for n in names if n.startswith("bnctl/configs/")} == _built_in_files()  # nothing else slipped in
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    assert "MIT License" in license_text and meta["License-Expression"] == "MIT"
    assert meta["Name"] == NAME and meta["Version"] == VERSION
    assert meta["Description-Content-Type"] == "text/markdown"
    assert metadata_text.split("\n\n", 1)[1].strip() == (ROOT / "README.md").read_text(encoding="utf-8").strip()
    assert "bnctl = bnctl.cli:main" in entry_points


def test_the_sdist_holds_the_source_configs_license_and_readme(dist):
    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for needed in ["pyproject.toml", "README.md", "LICENSE", "PKG-INFO"]:
        assert needed in names
    assert _package_files() <= names and _built_in_files() <= names


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; torch, typer etc. come from this environment's site-packages."""
    home = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", home], cwd=home)
    python = home / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=home)
                   .stdout.strip())
    # Directories only: their own .pth files (among them this checkout's editable install) stay unread.
    # (The test environment may live inside the checkout, as CI's .venv does: its site-packages still counts.)
    borrowed = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (purelib / "borrowed_from_the_test_environment.pth").write_text("\n".join(borrowed) + "\n")
    # --ignore-installed: pip must not uninstall the test environment's bnctl, which it can see through the .pth.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-compile",
          "--disable-pip-version-check", dist["wheel"]], cwd=home)
    return home


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return env | {"PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def test_the_installed_wheel_runs_the_quickstart_and_a_study_plan_from_an_empty_folder(venv, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    bnctl = venv / "bin" / "bnctl"
    where = _run([venv / "bin" / "python", "-c", "import bnctl.configfiles as c; print(c.CONFIG_DIR)"],
                 cwd=work, env=_env()).stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)  # the wheel's copy, not ours

    _run([bnctl, "config", "list"], cwd=work, env=_env())
    train = _run([bnctl, "train", "--config", "quickstart", "device=cpu", "train.epochs=1", "data.train_size=256",
                  "data.test_size=128", "train.batch_size=64", "train.eval_batch_size=128"], cwd=work, env=_env())
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("quickstart"), train.stdout
    with open(runs[0] / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and 0 <= float(rows[0]["test_acc"]) <= 100
    assert (runs[0] / "checkpoints" / "last.pt").is_file()

    plan = _run([bnctl, "study", "claims", "--dry-run"], cwd=work, env=_env()).stdout
    assert "run(s) in 5 sweeps" in plan and "claims_small_batches" in plan
    sweep = _run([bnctl, "sweep", "--sweep", "studies/quick/lr", "--dry-run"], cwd=work, env=_env()).stdout
    assert "run(s)" in sweep
    _run([bnctl, "config", "copy", "sweeps/lr_tolerance"], cwd=work, env=_env())
    assert "run(s)" in _run([bnctl, "sweep", "--sweep", "lr_tolerance.yaml", "--dry-run"], cwd=work, env=_env()).stdout
    assert sorted(p.name for p in work.iterdir()) == ["lr_tolerance.yaml", "runs"]  # the dry runs created nothing
