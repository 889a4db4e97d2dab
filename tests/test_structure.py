"""The package's shape: no module importing another's private names, the CLI assembled from command
modules, light modules free of torch, and a cycle finder for the import graph."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bnctl"
LONG = 350  # lines; a longer module says why at its top ("Over 350 lines: ...")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], list[tuple[str, str]]]:
    """The bnctl modules `name` imports (at the top or inside functions: a cycle either way) and the
    private names (module, _name) it takes from them, by `from m import _x` or `m._x`."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    targets: set[str] = set()
    private: list[tuple[str, str]] = []
    bound: dict[str, str] = {}  # local name -> bnctl module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    targets.add(alias.name)
                    bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("bnctl"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in MODULES:
                    targets.add(child)
                    bound[alias.asname or alias.name] = child
                else:
                    targets.add(node.module)
                    if alias.name.startswith("_"):
                        private.append((node.module, alias.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.append((bound[node.value.id], node.attr))
    targets.discard(name)
    return {t for t in targets if t in MODULES}, private


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_outside_the_figure_modules():
    # plotting.plot_run draws landscape.png with landscape_plot, which takes plotting's style and run labels:
    # the one cycle left (lazy imports both ways). Every other module is checked.
    rest = {k: v - {"bnctl.plotting", "bnctl.landscape_plot"} for k, v in GRAPH.items()
            if k not in ("bnctl.plotting", "bnctl.landscape_plot")}
    assert _cycle(rest) is None
    assert "bnctl.sweep" not in GRAPH["bnctl.workers"]  # workers and report take the sweep folder from sweepdir


def test_no_module_imports_another_modules_private_names():
    found = {name: private for name in MODULES if (private := _imports(name)[1])}
    assert found == {}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"bnctl.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name):
    importlib.import_module(name)


def test_nothing_imports_the_cli_and_the_light_modules_stay_torch_free():
    assert [name for name, targets in GRAPH.items() if "bnctl.cli" in targets] == ["bnctl.__main__"]  # python -m bnctl
    heavy = {"torch", "torchvision", "matplotlib"}
    for name in ("bnctl.config", "bnctl.normspec", "bnctl.plan", "bnctl.stats", "bnctl.verdicts", "bnctl.rundir",
                 "bnctl.sweepdir", "bnctl.plotting", "bnctl.report"):
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        assert not top & heavy, name


def test_the_cli_only_assembles_commands():
    tree = ast.parse(MODULES["bnctl.cli"].read_text(encoding="utf-8"))
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert functions == ["_print_version", "_main", "main"]  # the app's options and entry point, no command
