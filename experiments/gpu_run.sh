#!/usr/bin/env bash
# On a GPU machine, in one go: the cold and warm build of the CUDA module, the whole test suite (GPU tests
# included), and a benchmark. Full logs go to $OUT (default experiments/results/gpu); a short table prints last.
#   bash experiments/gpu_run.sh [sweep arguments, default: --preset smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$(mktemp -d)"  # a cold build, whatever the machine has cached

python -m experiments.environment | tee "$out/environment.txt"
python - <<'PY' 2>&1 | tee "$out/build.txt"
import time
t0 = time.perf_counter()
from kernels import cuda_kernels
cuda_kernels.build()
t1 = time.perf_counter()
cuda_kernels.build()
print(f"cold build: {t1 - t0:.1f} s, warm load: {time.perf_counter() - t1:.2f} s")
PY
python -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--preset smoke)
python -m experiments.sweep "${args[@]}" --out "$out/sweep.csv" > "$out/sweep.log" 2>&1
sweep=$?
echo "== $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$out/gpu-tests.log" | tail -1)"
cat "$out/build.txt"
grep -A200 "% of copy" "$out/sweep.log" || tail -30 "$out/sweep.log"
exit $(( tests || sweep ))
