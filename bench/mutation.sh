#!/usr/bin/env bash
# Mutation testing of bnctl's science-critical code, one module at a time, one worker.
# Not part of CI. Needs the dev extra: pip install -e '.[dev]'. See docs/mutation.md.
#
#   bench/mutation.sh                 # every module below, smallest first
#   bench/mutation.sh norms data      # just these
#
# Each module's time goes to stdout; mutmut keeps its results under mutants/ (re-running
# skips mutants that already have a result unless their function changed). `mutmut results`
# lists the survivors, `mutmut show NAME` shows one.
set -euo pipefail
set -f  # the mutant patterns below are mutmut globs, not file names
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # tiny tensors: a second thread only waits

declare -A PATTERNS=(
  [optim]='bnctl.optim.x__cosine* bnctl.optim.x__onecycle* bnctl.optim.x_make_scheduler*'
  [evaluate]='bnctl.engine.x_evaluate__*'
  [evaluation]='bnctl.evaluation.*'
  [data]='bnctl.data.x_crop_flip* bnctl.data.xǁBatchesǁ* bnctl.data.x_load_dataset*'
  [norms]='bnctl.norms.*'
  [diagnostics]='bnctl.diagnostics.*'
  [stats]='bnctl.stats.*'
)
# Decorated functions mutmut skips, with the tests that cover them (fast ones first: -x stops at the first failure).
decorated_norms() {
  python bench/mutate_decorated.py bnctl/norms.py _update_running_stats \
    tests/test_norms.py tests/test_properties.py -k "manual or recalibration"
}
decorated_evaluation() {
  python bench/mutate_decorated.py bnctl/evaluation.py recalibrate_bn \
    tests/test_norms.py tests/test_semantics.py tests/test_lab.py -k recalib
}
ORDER=(optim evaluate evaluation data norms diagnostics)  # smallest first; stats once bnctl/stats.py exists

modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")
for module in "${modules[@]}"; do
  [ -n "${PATTERNS[$module]:-}" ] || { echo "unknown module '$module'; choose from: ${!PATTERNS[*]}"; exit 2; }
  start=$(date +%s)
  # shellcheck disable=SC2086  # the patterns are meant to split into separate arguments
  mutmut run --max-children 1 ${PATTERNS[$module]}
  echo "== $module (mutmut): $(( $(date +%s) - start )) s"
  if declare -F "decorated_$module" >/dev/null; then
    start=$(date +%s)
    "decorated_$module"
    echo "== $module (decorated functions): $(( $(date +%s) - start )) s"
  fi
done
mutmut results
