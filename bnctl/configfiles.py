"""Config files: the built-in ones shipped in bnctl/configs/, found by name, and users' files, found by path.

A built-in name is the file's path under bnctl/configs/ without ".yaml": quickstart, seed,
sweeps/lr_tolerance, studies/quick/lr. Wherever bnctl takes a config or sweep file (train
--config, sweep --config/--sweep, a sweep file's base), an existing file wins and a built-in
name is the fallback, so a user's copy next to their sweep file is always the one used.
Torch-free and cheap to import.
"""

from __future__ import annotations

import re
from pathlib import Path

from bnctl.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel (pyproject's package-data)
STUDIES_DIR = CONFIG_DIR / "studies"  # one folder per study profile, one sweep file per section
SUFFIX = ".yaml"


def names() -> list[str]:
    """Every built-in config and sweep file's name, top-level configs first, then sweeps/ and studies/."""
    found = [p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob(f"*{SUFFIX}")]
    return sorted(found, key=lambda n: (n.count("/"), n))


def kind(name: str) -> str:
    """What a built-in file is: "config" (for train --config), "sweep" (sweep --sweep) or "study" (one study section)."""
    first = name.split("/", 1)[0] if "/" in name else ""
    return {"sweeps": "sweep", "studies": "study"}.get(first, "config")


def summary(path: Path) -> str:
    """The first sentence of a config file's opening comment: what it is for, as its author wrote it."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    return re.split(r"(?<=[.?!])\s", text, maxsplit=1)[0] if text else ""


def builtin(name: str | Path) -> Path | None:
    """The packaged file of a built-in name (with or without .yaml), or None if there is none."""
    text = Path(name).as_posix()
    stem = text[: -len(SUFFIX)] if text.endswith(SUFFIX) else text
    if stem.startswith(("/", "../")) or "/../" in stem or stem in ("", "."):
        return None
    path = CONFIG_DIR / f"{stem}{SUFFIX}"
    return path if path.is_file() else None


def get(name: str | Path) -> Path:
    """The packaged file of a built-in name; an unknown name's error lists the valid ones."""
    path = builtin(name)
    if path is None:
        raise ConfigError(f"no built-in config named '{name}'; built-in: {', '.join(names())}")
    return path


def resolve(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A config or sweep file given by path (next to ``relative_to``, else from the working directory) or by built-in name.

    An existing file wins over a built-in of the same name. The error of a reference that is
    neither names both places looked in and lists the built-in names.
    """
    path = Path(ref)
    candidates = ([relative_to / path] if relative_to is not None and not path.is_absolute() else []) + [path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    packaged = builtin(ref)
    if packaged is not None:
        return packaged  # a folder named like a built-in (runs/quickstart/) does not hide it
    for candidate in candidates:
        if candidate.exists():
            return candidate  # a folder or special file: reading it gives the precise error
    where = f" (looked next to {relative_to} and in the working directory)" if relative_to is not None else ""
    raise ConfigError(f"config file not found: {ref}{where}; nor is it a built-in config "
                      f"(bnctl config list: {', '.join(names())})")


def copy(name: str | Path, dest: Path | None = None, force: bool = False) -> Path:
    """Copy a built-in file, comments and all, to ``dest`` (a file, or a folder to put it in) to edit; returns the path.

    The default destination is the name's last part in the working directory (quickstart.yaml).
    An existing file is kept unless ``force``: a copy never overwrites edits silently.
    """
    from bnctl import rundir

    source = get(name)
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; choose another destination or pass --force to overwrite it")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot copy to {target}: folder {target.parent} does not exist")
    rundir.atomic_write_text(target, source.read_text(encoding="utf-8"))
    return target
