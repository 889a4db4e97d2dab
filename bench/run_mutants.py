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
    python bench/run_mutants.py '*' --survivors --stats broad-stats.json -- tests/test_hardening.py

By default it runs the mutants mutmut has not checked yet, each against the tests mutmut
recorded as calling the mutated function (fastest first). `--survivors` re-runs mutmut's
survivors, `--from FILE` the survivors of an earlier run of this script; tests after `--`
replace the recorded ones (e.g. the end-to-end files mutmut's selection leaves out).

One process runs many mutants, so state left behind by one mutant could change the next one's
result. Guards: bnctl's in-process dataset cache is emptied before every mutant; every worker
runs its tests with no mutant active first, again every 20 mutants and at the end, and a failing
check stops the worker and marks the results since the last passing check "unconfirmed"; a
worker that dies leaves its remaining mutants "not run"; a file mutmut mutated before the
checkout last changed it is refused. Only the verdicts "killed" and "survived" count.
Results go to stdout (one line per mutant, the diff of each survivor) and to
bench/out/mutants-<time>.json; `mutmut results` does not see them. See docs/mutation.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
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

    from bnctl import workers as bnctl_workers

    class FirstFailure:
        def __init__(self) -> None:
            self.nodeid = ""

        def pytest_runtest_logreport(self, report) -> None:
            if report.failed and not self.nodeid:
                self.nodeid = report.nodeid

    def run(mutant: str, tests: list[str]) -> tuple[int, str]:
        os.environ["MUTANT_UNDER_TEST"] = mutant
        bnctl_workers._DATA.clear()  # a dataset cached under one mutant must not serve the next
        spy = FirstFailure()
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests], plugins=[spy])
        return int(code), spy.nodeid

    def clean(tests: list[str]) -> bool:
        code, failed = run("", tests)
        if code != 0:
            print(f"tests fail with no mutant active ({failed or f'pytest exit code {code}'}): {' '.join(tests)}",
                  file=sys.stderr)
        return code == 0

    jobs = json.loads(Path(jobs_file).read_text())
    pending: list[dict] = []  # results since the last passing check, written once it passes again

    def confirm(tests_seen: set[tuple[str, ...]], out) -> bool:
        if not all(clean(list(t)) for t in tests_seen):
            for r in pending:
                r["result"] = "unconfirmed"
                out.write(json.dumps(r) + "\n")
            return False
        for r in pending:
            out.write(json.dumps(r) + "\n")
        out.flush()
        pending.clear()
        return True

    with open(results_file, "a", encoding="utf-8") as out:
        seen: set[tuple[str, ...]] = set()
        for i, (name, tests) in enumerate(jobs):
            if tuple(tests) not in seen:
                if not clean(tests):
                    return 2
                seen.add(tuple(tests))
            start = time.time()
            code, failed = run(name, tests)
            # 1: a test failed; 2: the mutant broke collection (an import error; Ctrl-C never reaches a
            # worker, which runs in its own session); 3: an internal error, as mutmut counts it. Else unusable.
            result = {0: "survived", 1: "killed", 2: "killed", 3: "killed"}.get(code, "error")
            pending.append({"name": name, "result": result, "by": failed, "exit_code": code,
                            "seconds": round(time.time() - start, 1)})
            print(f"{name}: {result}" + (f" by {failed}" if failed else ""), file=sys.stderr, flush=True)
            if (i + 1) % 20 == 0 and not confirm(seen, out):
                return 3
        if not confirm(seen, out):
            return 3
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
    parser.add_argument("--stats", type=Path, default=Path("mutants/mutmut-stats.json"),
                        help="mutmut's record of which test calls which function (default: this run's); with test "
                             "files after --, each mutant gets only their tests that call its function")
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
    stale = sorted({f"bnctl/{n.split('.')[1]}.py" for n in names
                    if Path(f"bnctl/{n.split('.')[1]}.py").stat().st_mtime > Path(f"mutants/bnctl/{n.split('.')[1]}.py").stat().st_mtime})
    if stale:
        print(f"{', '.join(stale)} changed after mutmut mutated them; run `mutmut run` on them first")
        return 2
    stats = json.loads(args.stats.read_text())
    if given_tests and args.stats != parser.get_default("stats"):  # those files' tests that call the function
        jobs = [(name, [t for t in recorded_tests(name, stats) if t.split("::")[0] in given_tests]) for name in names]
    else:
        jobs = [(name, given_tests or recorded_tests(name, stats)) for name in names]
    untested = [name for name, tests in jobs if not tests]
    jobs = [(name, tests) for name, tests in jobs if tests]
    out_dir = Path("bench/out")
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"{len(jobs)} mutants, {args.jobs} workers" + (f"; {len(untested)} have no tests" if untested else ""), flush=True)
    # The mutated sources come first on the path; the tests are this checkout's.
    path = [str(Path("mutants").resolve())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: a second thread per worker only waits
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
                                       env=env, stdout=subprocess.DEVNULL, start_new_session=True), results_file))
    def stop(signum, frame):  # a kill of this process must not leave its workers running
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        codes = [p.wait() for p, _ in procs]
    except KeyboardInterrupt:
        for p, _ in procs:
            p.kill()
        print("stopped; nothing recorded")
        return 130
    results = [json.loads(line) for _, f in procs for line in f.read_text().splitlines()]
    for f in files:
        f.unlink()
    done = {r["name"] for r in results}
    results += [{"name": name, "result": "not run"} for name, _ in jobs if name not in done]
    results += [{"name": name, "result": "no tests"} for name in untested]
    for code in codes:
        if code != 0:
            print(f"a worker stopped early (exit code {code}): its remaining mutants are 'not run'"
                  + (", its results since its last clean check 'unconfirmed'" if code == 3 else ""))
    for r in results:
        if r["result"] == "survived":
            r["diff"] = diff_of(r["name"])
            print(f"{r['name']}: SURVIVED\n{r['diff']}")
    counts = {k: sum(1 for r in results if r["result"] == k)
              for k in ("killed", "survived", "error", "unconfirmed", "not run", "no tests")}
    decided = counts["killed"] + counts["survived"]
    print(f"{counts['killed']}/{decided} killed, {counts['survived']} survived"
          + "".join(f", {v} {k}" for k, v in counts.items() if k not in ("killed", "survived") and v)
          + f" ({time.time() - start:.0f} s)")
    out = out_dir / f"mutants-{stamp}.json"
    out.write_text(json.dumps({"patterns": args.patterns, "tests": given_tests or "recorded", "results": results},
                              indent=1) + "\n")
    print(f"results: {out}")
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
