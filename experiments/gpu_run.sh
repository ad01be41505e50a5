#!/usr/bin/env bash
# On a GPU machine, the steps asked for, in order, in one go: each writes its family's CSV (or the test log)
# to $OUT (default experiments/results/gpu), named for the GPU; the log of everything goes to $OUT/run.log; a
# short table prints last. A step rerun with the same $OUT resumes (the sweeps skip rows they hold).
#   bash experiments/gpu_run.sh [STEP ...]      (default: env tests build host kernelbench eval train backward models)
# Steps:
#   env         the GPU, driver, clocks and versions
#   tests       the whole test suite, GPU tests included            -> gpu-tests.log
#   build       the CUDA module's cold build and warm load, Triton's JIT   -> build_<gpu>.csv
#   host        host time per call                                  -> host_<gpu>.csv
#   kernelbench KernelBench problem 33's local check                -> kernelbench_<gpu>.csv
#   eval, train the quick eval / training-forward sweep             -> eval_<gpu>.csv, train_<gpu>.csv
#   backward    fwd+bwd with autograd over ResNet-50's BatchNorm shapes -> train_<gpu>.csv
#   models      torchvision ResNet-50 end to end                    -> models_<gpu>.csv
#   base        the quick eval and training sweeps at another revision, variant "base": its kernels/ package
#               extracted to .base/bn2d (git archive REV kernels); .base/ is git-ignored, so a copy of the tree
#               for a GPU machine must carry it explicitly
# At most 8 files come back from a lent GPU machine's $OUT: the default steps write 8 (run.log, gpu-tests.log and
# six CSVs); a command that adds logs of its own sends them into run.log, or runs fewer steps.
# Variables: VARIANT (the sweeps' variant column, default "default"), SWEEP_ARGS (more sweep arguments, e.g.
# --part 1/2), BACKWARD_ARGS, MODELS_ARGS, BASE_MODES (default "eval train"), TESTS (default: all of tests/),
# TESTS_ARGS, TESTS_TIMEOUT (seconds; 0: none).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-experiments/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(mktemp -d)}"
gpu=$(python -c "from experiments.environment import gpu_tag; import torch; print(gpu_tag(torch.cuda.get_device_name(0)))")
variant="${VARIANT:-default}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests build host kernelbench eval train backward models)
failed=()
log="$out/run.log"

run() {  # run NAME COMMAND...: the command's output to the log, its failure remembered
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" >>"$log" 2>&1 || failed+=("$name")
  echo "   $name: $((SECONDS - start)) s" | tee -a "$log"
}

for step in "${steps[@]}"; do
  case $step in
    env) run env python -m experiments.environment ;;
    tests) run tests bash -c "timeout ${TESTS_TIMEOUT:-0} python -m pytest ${TESTS:-tests} -rs -p no:cacheprovider ${TESTS_ARGS:-} 2>&1 | tee $out/gpu-tests.log >/dev/null; exit \${PIPESTATUS[0]}" ;;
    build) run build python -m experiments.build_cost --extensions-dir "$(mktemp -d)" --out "$out/build_$gpu.csv" ;;
    host) run host python -m experiments.host_overhead --out "$out/host_$gpu.csv" ;;
    kernelbench) run kernelbench python -m experiments.kernelbench check --out "$out/kernelbench_$gpu.csv" ;;
    eval) run eval python -m experiments.sweep --preset quick --modes eval --variant "$variant" ${SWEEP_ARGS:-} --out "$out/eval_$gpu.csv" ;;
    train) run train python -m experiments.sweep --preset quick --modes train --variant "$variant" ${SWEEP_ARGS:-} --out "$out/train_$gpu.csv" ;;
    backward) run backward python -m experiments.sweep --preset resnet50 --modes train_backward --variant "$variant" ${BACKWARD_ARGS:-} --out "$out/train_$gpu.csv" ;;
    models) run models python -m experiments.models ${MODELS_ARGS:-} --out "$out/models_$gpu.csv" ;;
    base)
      [ -f .base/bn2d/__init__.py ] || { echo "base: no .base/bn2d here (extract it, and carry .base/)" | tee -a "$log"
                                           failed+=(base); continue; }
      for mode in ${BASE_MODES:-eval train}; do
        run "base $mode" env PYTHONPATH="$PWD/.base:$PWD" TORCH_EXTENSIONS_DIR="$(mktemp -d)" python -m experiments.sweep \
          --preset quick --modes $mode --variant base ${SWEEP_ARGS:-} --out "$out/${mode}_$gpu.csv"
      done ;;
    *) echo "unknown step $step" | tee -a "$log"; failed+=("$step") ;;
  esac
done

[ -f "$out/gpu-tests.log" ] && echo "tests: $(grep -E '[0-9]+ (passed|failed)' "$out/gpu-tests.log" | tail -1)"
grep -E "FAILED|Error" "$out/gpu-tests.log" 2>/dev/null | head -20
python - "$out" "$gpu" <<'PY'  # the short table: median % of copy per family, mode, variant and backend
import sys, pathlib, pandas as pd
out, gpu = sys.argv[1:]
for family in ("eval", "train"):
    path = pathlib.Path(out, f"{family}_{gpu}.csv")
    if path.exists():
        df = pd.read_csv(path)
        print(df.groupby(["mode", "variant", "dtype", "backend"])["pct_of_copy"].median().unstack().round(0))
path = pathlib.Path(out, f"models_{gpu}.csv")
if path.exists():
    print(pd.read_csv(path).pivot_table(index=["model", "task", "dtype", "layout", "batch"], columns="backend",
                                        values="median_ms").round(2))
PY
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]} (see run.log)"; tail -30 "$log"; exit 1; }
