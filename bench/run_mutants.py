"""Run mutmut's mutants in long-lived pytest workers: for the functions whose tests train models.

mutmut forks a process per mutant from a long-lived one. For tests that train a model
(evaluation, batching, schedules) that is several times slower on this machine than running
them in a plain interpreter, and a fresh interpreter per mutant spends most of its time
importing torch. This script uses the mutated sources mutmut wrote under mutants/ (each
function carries all its mutants, and the environment variable MUTANT_UNDER_TEST picks one at
call time), so a worker imports everything once and then calls pytest.main once per mutant.

    python bench/run_mutants.py 'bnctl.evaluation.*'               # unchecked, against recorded tests
    python bench/run_mutants.py 'bnctl.evaluation.*' --survivors -- tests/test_hardening.py
    python bench/run_mutants.py '*' --from bench/out/mutants-X.json -- tests/test_data.py

By default it runs the mutants mutmut has not checked yet, each against the tests mutmut
recorded as calling the mutated function (fastest first). `--survivors` re-runs mutmut's
survivors, `--from FILE` the survivors of an earlier run of this script; tests after `--`
replace the recorded ones (e.g. the end-to-end files mutmut's selection leaves out). Each
worker first runs its tests with no mutant active: they must pass, or nothing is reported.
Results go to stdout (one line per mutant, the diff of each survivor) and to
bench/out/mutants-<time>.json; `mutmut results` does not see them. See docs/mutation.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SURVIVED = 0  # mutmut's exit code for a mutant every test passed with


def mutant_names(patterns: list[str], survivors: bool) -> list[str]:
    """Mutants matching a pattern: the unchecked ones, or with survivors=True the surviving ones."""
    names = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        names += [name for name, code in codes.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)
                  and ((code == SURVIVED) if survivors else code is None)]
    return names


def recorded_tests(name: str, stats: dict) -> list[str]:
    """The tests mutmut saw calling the mutated function, fastest first."""
    function = name.rsplit("__mutmut_", 1)[0]
    duration = stats["duration_by_test"]
    return sorted(stats["tests_by_mangled_function_name"].get(function, []), key=lambda t: duration.get(t, 0.0))


def worker(jobs_file: str, results_file: str) -> int:
    """Run each (mutant, tests) job with pytest.main in this one process; one JSON line per result."""
    import pytest

    class FirstFailure:
        def __init__(self) -> None:
            self.nodeid = ""

        def pytest_runtest_logreport(self, report) -> None:
            if report.failed and not self.nodeid:
                self.nodeid = report.nodeid

    def run(tests: list[str]) -> tuple[int, str]:
        spy = FirstFailure()
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests], plugins=[spy])
        return int(code), spy.nodeid

    jobs = json.loads(Path(jobs_file).read_text())
    with open(results_file, "a", encoding="utf-8") as out:
        checked: set[tuple[str, ...]] = set()
        for name, tests in jobs:
            if tuple(tests) not in checked:  # the same tests must pass with no mutant active
                os.environ["MUTANT_UNDER_TEST"] = ""
                code, failed = run(tests)
                if code != 0:
                    print(f"tests fail with no mutant active ({failed or code}): {' '.join(tests)}", file=sys.stderr)
                    return 2
                checked.add(tuple(tests))
            os.environ["MUTANT_UNDER_TEST"] = name
            start = time.time()
            code, failed = run(tests)
            # 1: a test failed; 2: the mutant broke collection (an import error). 5: no test ran.
            result = {0: "survived", 5: "error"}.get(code, "killed")
            out.write(json.dumps({"name": name, "result": result, "by": failed, "exit_code": code,
                                  "seconds": round(time.time() - start, 1)}) + "\n")
            out.flush()
            print(f"{name}: {result}" + (f" by {failed}" if failed else ""), file=sys.stderr, flush=True)
    return 0


def diff_of(name: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout
    return "".join(line + "\n" for line in shown.splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---")))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[2])
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="+", help="mutmut mutant-name globs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--survivors", action="store_true", help="re-run mutmut's survivors, not its unchecked mutants")
    parser.add_argument("--from", dest="earlier", type=Path, help="re-run the survivors of an earlier results file")
    args = parser.parse_args(argv[:cut])
    given_tests = argv[cut + 1:]
    if args.earlier:
        names = [r["name"] for r in json.loads(args.earlier.read_text())["results"] if r["result"] == "survived"
                 and any(fnmatch.fnmatchcase(r["name"], p) for p in args.patterns)]
    else:
        names = mutant_names(args.patterns, args.survivors)
    if not names:
        print("no mutants match (run `mutmut run` first: it generates them under mutants/)")
        return 0
    stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
    jobs = [(name, given_tests or recorded_tests(name, stats)) for name in names]
    out_dir = Path("bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"{len(jobs)} mutants, {args.jobs} workers", flush=True)
    # The mutated sources come first on the path; the tests are this checkout's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path("mutants").resolve()), os.environ.get("PYTHONPATH", "")])}
    start, procs, files = time.time(), [], []
    for i in range(args.jobs):
        share = jobs[i::args.jobs]
        if not share:
            continue
        jobs_file, results_file = out_dir / f".jobs-{stamp}-{i}.json", out_dir / f".results-{stamp}-{i}.jsonl"
        jobs_file.write_text(json.dumps(share))
        results_file.write_text("")
        files += [jobs_file, results_file]
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(jobs_file), str(results_file)],
                                       env=env, stdout=subprocess.DEVNULL), results_file))
    failed_workers = sum(1 for p, _ in procs if p.wait() != 0)
    results = [json.loads(line) for _, f in procs for line in f.read_text().splitlines()]
    for f in files:
        f.unlink()
    for r in results:
        if r["result"] != "killed":
            r["diff"] = diff_of(r["name"])
            print(f"{r['name']}: {r['result'].upper()}\n{r['diff']}")
    counts = {k: sum(1 for r in results if r["result"] == k) for k in ("killed", "survived", "error")}
    print(f"{counts['killed']}/{len(results)} killed, {counts['survived']} survived, {counts['error']} errors "
          f"of {len(jobs)} mutants ({time.time() - start:.0f} s)")
    out = out_dir / f"mutants-{stamp}.json"
    out.write_text(json.dumps({"patterns": args.patterns, "tests": given_tests or "recorded", "results": results},
                              indent=1) + "\n")
    print(f"results: {out}")
    return 1 if failed_workers else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
