"""The documentation stays true to the code: links resolve, every config key is documented with its real default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from bnctl import config as C

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    anchors, code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            code = not code
        if code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[str]:
    text, out = page.read_text(encoding="utf-8"), []
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code blocks are not links
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if not re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            out.append(target)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert dest.suffix == ".md" and anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading"


def test_the_readme_is_a_first_screen_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 100, "README.md is the first screen; the reference lives in docs/"
    linked = {Path(t.partition("#")[0]).name for t in _links(ROOT / "README.md")}
    index = {Path(t.partition("#")[0]).name for t in _links(ROOT / "docs" / "index.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= index, f"docs/index.md lacks {sorted(pages - index)}"
    assert "index.md" not in linked and {"install.md", "configuration.md", "studies.md"} <= linked


def _documented_keys() -> dict[str, str]:
    """The config reference's table: dotted key -> its documented default, as written."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", text, re.M)}


def _same(documented: str, actual) -> bool:
    value = yaml.safe_load(documented)
    if isinstance(actual, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if isinstance(actual, tuple):
        actual = list(actual)
    return value == actual


def test_every_config_key_is_documented_with_its_real_default():
    defaults = C.flatten(C.to_dict(C.load(None)))
    documented = _documented_keys()
    assert set(defaults) - set(documented) == set(), "docs/configuration.md lacks these keys"
    assert set(documented) - set(defaults) == set(), "docs/configuration.md documents keys that do not exist"
    wrong = {k: (documented[k], defaults[k]) for k in defaults if not _same(documented[k], defaults[k])}
    assert not wrong, f"documented default != the real one: {wrong}"


def test_the_default_check_catches_a_wrong_default():
    assert _same("1e-5", 1e-5) and _same("[0.5, 0.5, 0.5]", (0.5, 0.5, 0.5)) and _same("null", None)
    assert not _same("0.01", 0.001) and not _same("true", False) and not _same("batch", "none")


def test_the_layout_names_every_module_and_nothing_that_is_gone():
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    named = set(re.findall(r"^(bnctl/[\w/]+\.py)", layout, re.M))
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnctl").glob("*.py")} - {
        "bnctl/__init__.py", "bnctl/__main__.py"}
    assert modules - named == set(), "docs/development.md's layout lacks these modules"
    assert named - modules == set(), "docs/development.md's layout names modules that do not exist"
    commands = {p.stem for p in (ROOT / "bnctl" / "commands").glob("*.py")} - {"__init__"}
    line = next(line for line in layout.splitlines() if line.startswith("bnctl/commands/"))
    assert all(re.search(rf"\b{c}\b", line) for c in commands), f"the commands/ line lacks one of {commands}"
