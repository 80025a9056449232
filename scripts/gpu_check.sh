#!/usr/bin/env bash
# One call on a multi-GPU host: build the kernels, run the GPU tests, run the benchmark
# (deepseek-v3, decode T=128 + prefill T=4096, every transport, bf16 and fp8; bundled prefill
# at 24 SMs and at all SMs), then the sweeps (bf16: decode T=1..256, bundled prefill SM
# budgets 8..all at T=4096, fewer iterations), and print a compact table last.
#
# Usage: bash scripts/gpu_check.sh [--sanitize] [--no-tests] [--no-sweep] [-- BENCH_ARGS...]
#   --sanitize   also run compute-sanitizer (memcheck) on a small bundled case
#   --no-tests   skip `pytest -m gpu`
#   --no-sweep   skip the sweeps
#   BENCH_ARGS   passed on to both `python -m moe_plugin.bench` runs (after their own)
# Every stage runs under a time limit: at most its own cap and what is left of
# GPU_CHECK_BUDGET_S (default 350 s for all stages), so the summary is always printed; a
# stage with under 20 s left is skipped. Logs, bench.json and bench.png go to $OUT (default
# ./gpu_out). A failed stage does not stop the later ones; the exit status is non-zero if
# any stage failed, timed out or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

sanitize=0 tests=1 sweep=1 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --no-tests) tests=0 ;;
    --no-sweep) sweep=0 ;;
    --) shift; bench_args+=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# NVLink multicast stays off: NCCL, torch symmetric memory and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
rm -rf "$OUT/bench" "$OUT/sweep"  # the digest reads whatever bench.json it finds there
python=${PYTHON:-python}
budget=${GPU_CHECK_BUDGET_S:-350}

declare -A status seconds
stages=()
stage() {  # stage NAME CAP_S LOG CMD...: run CMD under a time limit, tee to $OUT/LOG
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((budget - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  stages+=("$name")
  if [ "$limit" -lt 20 ]; then
    status[$name]=skipped seconds[$name]=0
    echo "=== $name: skipped, ${left}s of the ${budget}s budget left" | tee "$OUT/$log"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee "$OUT/$log"
  local start=$SECONDS
  # SIGINT first: pytest then still prints its counts; the whole process group goes.
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
  status[$name]=${PIPESTATUS[0]}
  seconds[$name]=$((SECONDS - start))
  echo "=== $name: exit ${status[$name]} after ${seconds[$name]}s" | tee -a "$OUT/$log"
}

SECONDS=0
{ nvidia-smi -L; nvidia-smi topo -m; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$OUT/machine.log" 2>&1
stage build 240 build.log "$python" -m moe_plugin.kernels.build
if [ "$tests" = 1 ]; then
  stage tests 210 gpu_tests.log "$python" -m pytest -m gpu -x -q
fi
stage bench 120 bench.log "$python" -m moe_plugin.bench --preset deepseek-v3 --mode all \
  --num-sms 24,all --out "$OUT/bench" "${bench_args[@]}"
if [ "$sweep" = 1 ]; then
  stage sweep 120 sweep.log "$python" -m moe_plugin.bench --preset deepseek-v3 --mode all \
    --dtypes bf16 --decode-tokens 1,2,4,8,16,32,64,128,256 --prefill-tokens 4096 \
    --num-sms 8,16,24,32,64,all --iters 50 --warmup 5 --out "$OUT/sweep" "${bench_args[@]}"
fi
if [ "$sanitize" = 1 ]; then
  stage sanitize 120 sanitizer.log compute-sanitizer --tool memcheck --target-processes all \
    --error-exitcode 9 "$python" -m moe_plugin.bench --nprocs 2 --transports bundled \
    --hidden 512 --num-experts 16 --topk 4 --decode-tokens 8 --prefill-tokens 64 \
    --iters 2 --warmup 0 --no-graphs --out "$OUT/sanitize"
fi

echo
echo "================ summary ================"
head -n 1 "$OUT/machine.log"
rc=0
for name in "${stages[@]}"; do
  echo "stage $name: exit ${status[$name]} after ${seconds[$name]}s"
  [ "${status[$name]}" = 0 ] || rc=1
done
tests_line=""
if [ "$tests" = 1 ]; then
  tests_line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$OUT/gpu_tests.log" \
               | tail -n 1)
  [ "${status[tests]}" = 0 ] || tests_line="${tests_line:-no pytest summary} [stage exit ${status[tests]}]"
fi
reports=()
for f in "$OUT/bench/bench.json" "$OUT/sweep/bench.json"; do
  [ -f "$f" ] && reports+=("$f")
done
if [ ${#reports[@]} -gt 0 ]; then
  "$python" -m moe_plugin.bench --summary-from "${reports[@]}" --digest \
    --tests-summary "$tests_line" || rc=1
else
  echo "no benchmark results; GPU tests: ${tests_line:-not run}"
fi
exit $rc
