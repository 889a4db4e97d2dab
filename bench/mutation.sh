#!/usr/bin/env bash
# Mutation testing of bnctl's science-critical code. Not part of CI. Needs the dev extra:
# pip install -e '.[dev]'. See docs/mutation.md for what it mutates, the last run's score and
# why each survivor is equivalent.
#
#   bench/mutation.sh                 # every module below, in one mutmut run (one start-up)
#   bench/mutation.sh norms stats     # just these
#   JOBS=1 bench/mutation.sh          # one worker (default: 2, one per core)
#
# Three steps, each timed on stdout:
#   1. mutmut generates every mutant and runs those of the modules' light functions against the
#      focused tests selected in pyproject.toml; bench/run_mutants.py runs the heavy ones (whose
#      tests train models: mutmut's forked workers are several times slower on them here);
#   2. the decorated functions mutmut skips (bench/mutate_decorated.py), against their tests;
#   3. every survivor of step 1 re-run against the end-to-end test files of its module, which
#      are too slow to run for every mutant (bench/run_mutants.py --survivors / --from).
# mutmut keeps its results under mutants/ (`mutmut results`, `mutmut show NAME`); run_mutants.py
# writes its own to bench/out/mutants-*.json.
set -euo pipefail
set -f  # the mutant patterns below are mutmut globs, not file names
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # tiny tensors: a second thread only waits
mkdir -p bench/out

# Per module: the functions mutmut runs itself, and (HEAVY) those bench/run_mutants.py runs.
declare -A PATTERNS=(
  [stats]='bnctl.stats.*'
  [verdicts]='bnctl.verdicts.*'
  [optim]='bnctl.optim.x__cosine* bnctl.optim.x__onecycle*'
  [evaluate]=''
  [evaluation]='bnctl.evaluation.x__has_running_stats* bnctl.evaluation.x__one_image_batch*'
  [data]='bnctl.data.x_crop_flip* bnctl.data.x_limit_indices*'
  [norms]='bnctl.norms.*'
  [diagnostics]='bnctl.diagnostics.*'
)
declare -A HEAVY=(
  [optim]='bnctl.optim.x_make_scheduler* bnctl.optim.x__param_groups* bnctl.optim.x_make_optimizer*'
  [evaluate]='bnctl.engine.x_evaluate__*'
  [evaluation]='bnctl.evaluation.x_evaluate_checkpoint* bnctl.evaluation.x__recorded_data_root*'
  [data]='bnctl.data.xǁBatchesǁ* bnctl.data.x_load_dataset*'
)
# Step 3: the end-to-end files that exercise each module (beyond the focused selection).
declare -A END_TO_END=(
  [stats]='tests/test_report.py tests/test_study.py'
  [verdicts]='tests/test_study.py tests/test_report.py'
  [optim]='tests/test_config.py tests/test_core.py'
  [evaluate]='tests/test_hardening.py tests/test_core.py'
  [evaluation]='tests/test_hardening.py tests/test_usability.py tests/test_core.py'
  [data]='tests/test_data.py tests/test_hardening.py tests/test_core.py'
  [norms]='tests/test_config.py tests/test_core.py'
  [diagnostics]='tests/test_usability.py tests/test_core.py'
)
# Step 2: decorated functions, with the tests that cover them.
decorated_norms() {
  python bench/mutate_decorated.py bnctl/norms.py _update_running_stats \
    tests/test_norms.py tests/test_properties.py -k "manual or recalibration"
}
decorated_evaluation() {
  python bench/mutate_decorated.py bnctl/evaluation.py recalibrate_bn \
    tests/test_norms.py tests/test_semantics.py tests/test_lab.py -k recalib
}
decorated_stats() {
  python bench/mutate_decorated.py bnctl/stats.py half_width tests/test_stats.py  # a @property
}
ORDER=(stats verdicts optim evaluate evaluation data norms diagnostics)

modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")
light=() heavy=()
for module in "${modules[@]}"; do
  [ -n "${END_TO_END[$module]:-}" ] || { echo "unknown module '$module'; choose from: ${!END_TO_END[*]}"; exit 2; }
  # shellcheck disable=SC2206  # the patterns are meant to split into separate arguments
  light+=(${PATTERNS[$module]}) heavy+=(${HEAVY[$module]:-})
done

start=$(date +%s)
# mutmut needs at least one pattern to generate the mutants and record which tests call what.
mutmut run --max-children "${JOBS:-2}" "${light[@]:-bnctl.stats.x__finite*}"
echo "== step 1, mutmut (${modules[*]}): $(( $(date +%s) - start )) s"
if [ ${#heavy[@]} -gt 0 ]; then
  start=$(date +%s)
  python bench/run_mutants.py "${heavy[@]}" --jobs "${JOBS:-2}" | tee bench/out/heavy.txt
  echo "== step 1, run_mutants.py (${heavy[*]}): $(( $(date +%s) - start )) s"
fi
for module in "${modules[@]}"; do
  if declare -F "decorated_$module" >/dev/null; then
    start=$(date +%s)
    "decorated_$module"
    echo "== step 2, $module (decorated functions): $(( $(date +%s) - start )) s"
  fi
done
heavy_results=$(sed -n 's/^results: //p' bench/out/heavy.txt 2>/dev/null || true)
for module in "${modules[@]}"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  [ -n "${PATTERNS[$module]}" ] && python bench/run_mutants.py ${PATTERNS[$module]} --survivors --jobs "${JOBS:-2}" -- ${END_TO_END[$module]}
  # shellcheck disable=SC2086
  [ -n "${HEAVY[$module]:-}" ] && [ -n "$heavy_results" ] && \
    python bench/run_mutants.py ${HEAVY[$module]} --from "$heavy_results" --jobs "${JOBS:-2}" -- ${END_TO_END[$module]}
  echo "== step 3, $module (survivors against ${END_TO_END[$module]}): $(( $(date +%s) - start )) s"
done
mutmut results
