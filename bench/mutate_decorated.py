"""Mutation testing of the decorated functions mutmut skips (e.g. ``@torch.no_grad()``).

mutmut 3 never mutates a decorated function (its trampolines cannot wrap one safely), so
``ManualBatchNorm._update_running_stats`` and ``evaluation.recalibrate_bn``, two of the most
science-critical functions, would go untested. This script makes the same mutants with
mutmut's own operators, writes each into a scratch copy of the repository, and runs the
given tests there (stopping at the first failure). Usage, from the repository root:

    python bench/mutate_decorated.py bnctl/norms.py _update_running_stats tests/test_norms.py
    python bench/mutate_decorated.py bnctl/evaluation.py recalibrate_bn tests/test_lab.py -k recalib

It prints one line per mutant (killed / SURVIVED) with the diff of each survivor, then the
score. ``MUTATE_ONLY=REGEX`` keeps only the mutants of source lines matching REGEX (to spend a
short budget on the lines that matter). Not part of the test suite; see docs/mutation.md.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libcst as cst
from mutmut.mutation import file_mutation as fm

COPY = ["bnctl", "tests", "README.md", "pyproject.toml"]


def mutants(source: str, filename: str, function: str) -> list[str]:
    """Every mutant mutmut's operators make inside `function`, as whole-file sources."""
    skip = fm.MutationVisitor._skip_node_and_children

    def skip_but_enter(self, node):  # mutmut skips decorated functions; enter ours, keep its decorator
        if isinstance(node, cst.FunctionDef) and node.name.value == function:
            return False
        return skip(self, node)

    fm.MutationVisitor._skip_node_and_children = skip_but_enter
    try:
        module, mutations, _, _ = fm.create_mutations(filename, source)
    finally:
        fm.MutationVisitor._skip_node_and_children = skip
    inside = [m for m in mutations
              if getattr(getattr(m.contained_by_top_level_function, "name", None), "value", None) == function]
    inside = [m for m in inside if not isinstance(m.original_node, cst.Decorator)]
    out = []
    for m in inside:
        code = fm.deep_replace(module, m.original_node, m.mutated_node).code
        if code != source:
            out.append(code)
    return out


def main(argv: list[str]) -> int:
    path, function, pytest_args = argv[0], argv[1], argv[2:]
    source = Path(path).read_text()
    variants = mutants(source, path, function)
    only = os.environ.get("MUTATE_ONLY")
    if only:
        variants = [v for v in variants if any(re.search(only, line) for line in
                                               difflib.unified_diff(source.splitlines(), v.splitlines(), n=0)
                                               if line.startswith("-") and not line.startswith("---"))]
    if not variants:
        print(f"no mutants for {function} in {path}")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bnctl-mutate-"))
    try:
        for name in COPY:
            src = Path(name)
            if src.is_dir():
                shutil.copytree(src, scratch / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, scratch / name)
        env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args]
        clean = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
        if clean.returncode != 0:
            print(clean.stdout[-3000:])
            print("the tests fail without any mutant; fix that first")
            return 2
        killed, survivors, start = 0, [], time.time()
        for i, code in enumerate(variants, 1):
            (scratch / path).write_text(code)
            result = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True)
            diff = "".join(line for line in difflib.unified_diff(source.splitlines(True), code.splitlines(True), n=0)
                           if line[:1] in "+-" and not line.startswith(("+++", "---")))
            if result.returncode == 0:
                survivors.append(diff)
                print(f"{function}__{i}: SURVIVED\n{diff}", flush=True)
            else:
                killed += 1
                print(f"{function}__{i}: killed ({diff.strip().splitlines()[-1].strip()[:90]})", flush=True)
        (scratch / path).write_text(source)
        total = len(variants)
        print(f"{path}::{function}: {killed}/{total} killed ({100 * killed / total:.1f}%), "
              f"{len(survivors)} survived, {time.time() - start:.0f} s")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
