#!/usr/bin/env bash
# On a GPU machine, in one go: build and JIT costs (the CUDA module's cold build is then reused), host
# overhead per call, the whole test suite (GPU tests included; TESTS=0 skips it), the KernelBench check, a
# sweep, and its figures (PLOT=0 skips them).
# Everything goes to $OUT (default experiments/results/gpu; with PLOT=0, seven files); the environment and
# build costs print first, a short table last. Rerunning with the same $OUT resumes the sweep.
#   bash experiments/gpu_run.sh [sweep arguments, default: --preset smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$(mktemp -d)"  # empty: the first build is cold, whatever the machine has cached

python -m experiments.environment
python -m experiments.build_cost --extensions-dir "$TORCH_EXTENSIONS_DIR" --out "$out/build_cost.csv" 2>&1
python -m experiments.host_overhead --out "$out/host_overhead.csv"
tests=0
if [ "${TESTS:-1}" = 1 ]; then
  python -m pytest tests -rs -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"  # not -q: the header names the environment
  tests=${PIPESTATUS[0]}
fi
python -m experiments.kernelbench check --out "$out/kernelbench.csv" > "$out/kernelbench.log" 2>&1
kernelbench=$?
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--preset smoke)
python -m experiments.sweep "${args[@]}" --out "$out/sweep.csv" > "$out/sweep.log" 2>&1
sweep=$?
if [ "${PLOT:-1}" = 1 ]; then
  python -m experiments.plot --sweep "$out/sweep.csv" --grids --build "$out/build_cost.csv" --out "$out/figures" > "$out/plot.log" 2>&1
fi
[ -f "$out/gpu-tests.log" ] && echo "== $(grep -E 'passed|failed' "$out/gpu-tests.log" | tail -1)"
tail -8 "$out/kernelbench.log"
grep -A200 "% of copy" "$out/sweep.log" || tail -30 "$out/sweep.log"
exit $(( tests || kernelbench || sweep ))
