"""Run directories: atomic creation, recorded provenance, the metrics writer, summaries.

Deliberately free of torch so that plotting and comparison stay light.

Over 350 lines: every file of a run directory is named and written here (atomic writes, locks,
provenance, metrics.csv, the listing of runs), so no other module spells a run's file names.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from bnctl.errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
RUN_INFO_FILE = "run.json"
DIAGNOSTICS_FILE = "diagnostics.csv"
LANDSCAPE_FILE = "landscape.csv"  # train.landscape: loss-landscape and ICS probes
CHECKPOINT_DIR = "checkpoints"
# RUN/checkpoints/: the newest kept epoch (what resume trusts) and the best one (bnctl/checkpoint.py writes them)
LAST_CHECKPOINT, BEST_CHECKPOINT = "last.pt", "best.pt"
LOCK_FILE = ".lock"


def last_checkpoint(run_dir: Path) -> Path:
    """RUN/checkpoints/last.pt: the newest epoch kept, the one a resume continues from."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write a file atomically: yield a temp file in the same folder, then fsync and os.replace it.

    Readers (and a process killed mid-write) see either the old file or the new one, never a part.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a shared run directory needs what the umask gives (0644 under 022).
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide, harmless here)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def epochs_completed(run_dir: Path) -> int:
    """Complete epochs a run recorded in its summary (0 when the summary is missing or damaged)."""
    try:
        return int(read_json(Path(run_dir) / SUMMARY_FILE).get("epochs_completed", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def run_dir_of(checkpoint_path: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN/checkpoints/x.pt -> RUN), else the folder holding it."""
    checkpoint_path = Path(checkpoint_path)
    parent = checkpoint_path.parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


EVAL_DIR = "eval"


def holds_run(path: Path) -> bool:
    """True when a folder already contains a bnctl run (or anything at all)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def make_folder(path: Path, what: str) -> None:
    """mkdir -p that explains an unusable path instead of raising OSError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{what} {path} is a file, not a folder; choose another path") from None
    except OSError as err:
        raise ConfigError(f"cannot create {what} {path}: {err.strerror or err}") from None


def create(runs_root: Path, name: str, exact: Path | None = None) -> Path:
    """Create a new, never-reused run directory.

    os.mkdir is atomic: of two processes racing for the same name, one gets it and
    the other moves on to the next suffix, so simultaneous runs never share a folder.
    The checkpoints/ subfolder is the claim on an exact --run-dir, for the same reason.
    """
    if exact is not None:
        exact = Path(exact)
        taken = ConfigError(f"--run-dir {exact} already exists and is not empty; choose a new folder "
                            "(or continue that run with: bnctl train --resume DIR)")
        if exact.exists() and not exact.is_dir():
            raise ConfigError(f"--run-dir {exact} is a file; choose a new folder")
        if holds_run(exact):
            raise taken
        make_folder(exact, "--run-dir")
        try:
            (exact / CHECKPOINT_DIR).mkdir()
        except FileExistsError:
            raise taken from None
        return exact
    path = new_stamped_folder(runs_root, name, "--runs-root", "run directory")
    (path / CHECKPOINT_DIR).mkdir()
    return path


def new_stamped_folder(root: Path, name: str, root_label: str, what: str) -> Path:
    """Create root/<YYYYmmdd-HHMMSS>-<name>[-k]/, a folder no other process can also get.

    os.mkdir is atomic: of two processes racing for the same name, one gets it and the
    other moves on to the next suffix.
    """
    root = Path(root)
    make_folder(root, root_label)
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
    for attempt in range(1, 10_000):
        path = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise ConfigError(f"cannot create a {what} under {root}: {err.strerror or err}") from None
        return path
    raise ConfigError(f"could not create a new {what} under {root}")


def take_flock(path: Path) -> tuple[bool, IO | None]:
    """Try to hold path's exclusive flock, without waiting, and write this process's pid into it.

    (True, file): held until file is closed; (False, None): another process holds it (its pid is in the
    file); (True, None): this system has no flock (Windows), so nothing is held. flock locks vanish with
    their process, so a killed holder never leaves the lock behind.
    """
    try:
        import fcntl
    except ImportError:
        return True, None
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False, None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return True, f


class RunLock:
    """An exclusive advisory lock on a run directory, held while one process trains in it.

    flock locks vanish with their process, so a killed run never leaves its directory locked.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self._file = Path(run_dir), None

    def __enter__(self) -> "RunLock":
        held, self._file = take_flock(self.run_dir / LOCK_FILE)  # no flock (Windows): one writer is up to the user
        if not held:
            try:
                holder = (self.run_dir / LOCK_FILE).read_text(encoding="utf-8").strip() or "?"
            except OSError:
                holder = "?"
            raise ConfigError(f"{self.run_dir} is in use by another bnctl process (pid {holder}); "
                              "wait for it to finish or stop it before resuming") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            # Unlink while still holding the lock, so no one can take a lock on a file about to vanish;
            # a missing .lock then simply means no process is training here.
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            self._file.close()  # closing releases the flock
            self._file = None


def lock_held(run_dir: Path) -> bool | None:
    """Whether some process holds the run's lock now (None where advisory locks do not exist).

    A non-blocking shared-lock probe: it fails only while a trainer holds its exclusive lock,
    and never blocks or disturbs that trainer.
    """
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(Path(run_dir) / LOCK_FILE, "r", encoding="utf-8")
    except OSError:  # no lock file: removed at the end of a run, or never made
        return False
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def effective_status(run_dir: Path, summary: dict[str, Any] | None = None) -> str:
    """A run's status as readers should show it: summary.json's, but "stale" for a "running" run no process holds.

    A SIGKILL (or a lost machine) leaves summary.json saying "running" for good; the lock says
    whether a trainer is really there. "unknown" when the summary is missing or unreadable.
    """
    if summary is None:
        try:
            summary = read_json(Path(run_dir) / SUMMARY_FILE)
        except (OSError, ValueError):
            return "unknown"
    status = str(summary.get("status", "unknown")) if isinstance(summary, dict) else "unknown"
    if status == "running" and lock_held(run_dir) is False:
        return "stale"
    return status


def _status_without_summary(run_dir: Path) -> str:
    """A run that never wrote summary.json: still in its first epoch, killed in it, or never started."""
    if lock_held(run_dir):
        return "running"
    return "stale" if (run_dir / METRICS_FILE).is_file() else "empty"


def summary_row(summary: Any) -> dict[str, Any]:
    """What the listings of runs (bnctl runs, a sweep's results.csv) show of a run's summary.json: its epochs,
    final and best metrics and wall time, None where the summary lacks them (or is not a summary)."""
    summary = summary if isinstance(summary, dict) else {}
    final, best = summary.get("final") or {}, summary.get("best") or {}
    return {"epochs_completed": summary.get("epochs_completed"), "epochs_planned": summary.get("epochs_planned"),
            "final_test_acc": final.get("test_acc"), "final_test_loss": final.get("test_loss"),
            "final_train_acc": final.get("train_acc"), "final_clean_train_acc": final.get("clean_train_acc"),
            "best_test_acc": best.get("test_acc"), "best_epoch": best.get("epoch"),
            "wall_time_s": summary.get("wall_time_s")}


def list_runs(root: Path) -> list[dict[str, Any]]:
    """One record per run directory under root (a run directory itself, or folders nested in it), by name.

    Each record: dir, name, status (effective_status), epochs_completed, epochs_planned,
    best_test_acc, best_epoch, final_test_acc, wall_time_s. Folders without config.yaml are not runs.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder; give a folder of runs (e.g. runs) or one run directory")
    if not root.is_dir():
        raise ConfigError(f"runs folder not found: {root}")
    if (root / CONFIG_FILE).is_file():
        candidates = [root]
    else:
        candidates = sorted({p.parent for p in root.rglob(CONFIG_FILE)
                             if not any(part.startswith(".") for part in p.relative_to(root).parts)})
    runs = []
    for d in candidates:
        try:
            summary = read_json(d / SUMMARY_FILE)
            if not isinstance(summary, dict):
                summary = {}
        except (OSError, ValueError):
            summary = {}
        shown = summary_row(summary)
        runs.append({
            "dir": str(d), "name": str(d.relative_to(root)) if d != root else d.name,
            "status": effective_status(d, summary) if summary else _status_without_summary(d),
            "epochs_completed": summary.get("epochs_completed", 0), "epochs_planned": shown["epochs_planned"],
            **{k: shown[k] for k in ("best_test_acc", "best_epoch", "final_test_acc", "wall_time_s")},
        })
    return runs


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files an atomic write leaves when its process is killed mid-write."""
    stale = [p for folder in (run_dir, run_dir / CHECKPOINT_DIR) if folder.is_dir()
             for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _git(*args: str) -> str | None:
    """Output of a git command run in bnctl's own source folder (None outside a checkout)."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_state() -> dict[str, Any]:
    """The commit bnctl's source is at, and whether it has uncommitted changes (then the commit is not enough)."""
    commit = _git("rev-parse", "HEAD") or None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str]:
    """Versions of Python, bnctl and the packages that shape a run's numbers."""
    found = {"python": platform.python_version()}
    for pkg in ("bnctl", "torch", "torchvision", "numpy"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return found


def record_provenance(run_dir: Path, config_yaml: str, info: dict[str, Any]) -> None:
    """Write the resolved config and how the run was started (command, versions, commit, device)."""
    atomic_write_text(run_dir / CONFIG_FILE, config_yaml)
    write_json(run_dir / RUN_INFO_FILE, {
        "command": sys.argv, "cwd": os.getcwd(), "started": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "versions": versions(),
        **_git_state(), **info,
    })


def record_resume(run_dir: Path, info: dict[str, Any]) -> None:
    """Append how a run was resumed (command, time, device...) to run.json's "resumes" list."""
    path = run_dir / RUN_INFO_FILE
    try:
        record = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):  # damaged: keep the resume records at least
        record = {}
    record.setdefault("resumes", []).append({
        "command": sys.argv, "started": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
        "versions": versions(), **_git_state(), **info})
    write_json(path, record)


class MetricsWriter:
    """metrics.csv: fixed columns chosen at the start, one row per epoch, appended and flushed."""

    def __init__(self, path: Path, columns: list[str], history: Iterable[dict[str, Any]] = ()):
        self.path, self.columns = Path(path), list(columns)
        # (Re)write header and known history atomically: a resumed run drops any row past its checkpoint.
        lines = [",".join(self.columns)] + [self._line(row) for row in history]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def _line(self, row: dict[str, Any]) -> str:
        return ",".join(_fmt(row.get(c)) for c in self.columns)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(self._line(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact form: a resumed run can be compared value for value
    return str(value)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a bnctl CSV with numbers parsed (empty cells become None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; is this a bnctl run directory?")
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        # Rows are appended whole, each ending in a newline: an unterminated last line was cut off
        # by a kill mid-append and is not a row.
        text = text[: text.rfind("\n") + 1]
    return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text, newline=""))]


def _parse(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class CsvAppender:
    """A long-format CSV (diagnostics) written in appended, flushed chunks."""

    def __init__(self, path: Path, columns: list[str], truncate: bool = True):
        self.path, self.columns = Path(path), columns
        if truncate or not self.path.exists():
            atomic_write_text(self.path, ",".join(columns) + "\n")

    def extend(self, rows: list[tuple]) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(",".join(_fmt(v) for v in row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
