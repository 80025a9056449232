#!/usr/bin/env bash
# One call on a GPU host, one GPU or several: build the kernels; run the GPU tests at R = 2,
# 4 and 8 (ranks round-robin on the visible GPUs, sharing them where there are fewer); run
# the bundled kernels under compute-sanitizer (memcheck, racecheck, synccheck, initcheck; 2
# ranks); a seeded random soak (R = 4 and 8, sized by time); and, only when every rank has a
# GPU of its own (2 or more GPUs), the benchmark (deepseek-v3, decode T=128 + prefill
# T=4096, every transport, bf16 and fp8, bundled prefill at 24 SMs and at all SMs) and its
# sweeps (bf16: decode T=1..256, prefill SM budgets 8..all at T=4096). Prints a table last.
#
# Usage: bash scripts/gpu_check.sh [--no-tests] [--no-sanitize] [--no-soak] [--no-sweep]
#                                  [-- BENCH_ARGS...]
#   BENCH_ARGS   passed on to both `python -m moe_plugin.bench` runs (after their own)
# Environment: GPU_CHECK_BUDGET_S (seconds for all stages; default 480 on one GPU, 570 with
# a GPU per rank, where the benchmark runs too), GPU_CHECK_WORLDS (group sizes of the GPU
# tests, default 2,4,8), GPU_CHECK_SOAK ("WORLDS SECONDS"; default "4,8 60,30" on one GPU,
# "4,8 30,20" with more, where calls are much faster). Every stage runs under a time limit: at most its own cap and what is left of
# the budget, so the table is always printed; a stage with under 20 s left is skipped. Logs
# go to $OUT (default ./gpu_out). A failed stage does not stop the later ones; the exit
# status is non-zero if any stage failed, timed out or was skipped for the budget.
set -uo pipefail
cd "$(dirname "$0")/.."

tests=1 sanitize=1 soak=1 sweep=1 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-tests) tests=0 ;;
    --no-sanitize) sanitize=0 ;;
    --no-soak) soak=0 ;;
    --no-sweep) sweep=0 ;;
    --) shift; bench_args+=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done

# NVLink multicast stays off: NCCL, torch symmetric memory and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/gpu_out}
export MOE_PLUGIN_TEST_WORLDS=${GPU_CHECK_WORLDS:-2,4,8}
mkdir -p "$OUT"
rm -rf "$OUT/bench" "$OUT/sweep" "$OUT/sanitize"  # the digest reads whatever bench.json it finds
python=${PYTHON:-$(command -v python3 || command -v python)}
gpus=$("$python" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ]; then
  budget=${GPU_CHECK_BUDGET_S:-570} soak_default="4,8 30,20"
else
  budget=${GPU_CHECK_BUDGET_S:-480} soak_default="4,8 60,30"
fi
read -r soak_worlds soak_seconds <<< "${GPU_CHECK_SOAK:-$soak_default}"

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
not_run() {  # not_run NAME REASON: a stage that does not apply here (not a failure)
  stages+=("$1")
  status[$1]="not run: $2" seconds[$1]=0
}

SECONDS=0
{ nvidia-smi -L; nvidia-smi topo -m; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" --version | tail -n 1; } \
  > "$OUT/machine.log" 2>&1
stage build 120 build.log "$python" -m moe_plugin.kernels.build
if [ "$tests" = 1 ]; then
  stage tests 300 gpu_tests.log "$python" -m pytest -m gpu -q tests/gpu
fi
if [ "$sanitize" = 1 ]; then
  stage sanitize 170 sanitize.log "$python" -m tests.gpu.sanitize --out "$OUT/sanitize" \
    --timeout 150
fi
if [ "$soak" = 1 ]; then
  stage soak 130 soak.log "$python" -m tests.gpu.soak --worlds "$soak_worlds" \
    --seconds "$soak_seconds"
fi
if [ "$gpus" -ge 2 ]; then
  stage bench 120 bench.log "$python" -m moe_plugin.bench --preset deepseek-v3 --mode all \
    --num-sms 24,all --out "$OUT/bench" "${bench_args[@]}"
  if [ "$sweep" = 1 ]; then
    stage sweep 90 sweep.log "$python" -m moe_plugin.bench --preset deepseek-v3 --mode all \
      --dtypes bf16 --decode-tokens 1,2,4,8,16,32,64,128,256 --prefill-tokens 4096 \
      --num-sms 8,16,24,32,64,all --iters 50 --warmup 5 --out "$OUT/sweep" "${bench_args[@]}"
  fi
else
  not_run bench "$gpus GPU(s) visible: it times only a GPU per rank, never shared GPUs"
fi

counts() {  # counts NAME: "cases calls errors" of a stage, from its log
  local log
  case "$1" in
    tests) log=$OUT/gpu_tests.log ;;
    sanitize|soak) log=$OUT/$1.log ;;
    *) echo "- - -"; return ;;
  esac
  if [ "$1" = tests ]; then
    local line passed failed errors
    line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$log" | tail -n 1)
    passed=$(grep -oE '[0-9]+ passed' <<< "$line" | grep -oE '[0-9]+' || echo 0)
    failed=$(grep -oE '[0-9]+ failed' <<< "$line" | grep -oE '[0-9]+' || echo 0)
    errors=$(grep -oE '[0-9]+ errors?' <<< "$line" | grep -oE '[0-9]+' || echo 0)
    echo "$((passed + failed + errors)) - $((failed + errors))"
    return
  fi
  local summary
  summary=$(grep -E '^summary:' "$log" | tail -n 1)
  [ -n "$summary" ] || { echo "- - -"; return; }
  sed -E 's/.*cases=([0-9]+) calls=([0-9]+) errors=([0-9]+).*/\1 \2 \3/' <<< "$summary"
}

rc=0
if [ -f "$OUT/bench/bench.json" ] || [ -f "$OUT/sweep/bench.json" ]; then
  reports=()
  for f in "$OUT/bench/bench.json" "$OUT/sweep/bench.json"; do
    [ -f "$f" ] && reports+=("$f")
  done
  "$python" -m moe_plugin.bench --summary-from "${reports[@]}" --digest \
    --tests-summary "$(grep -E '[0-9]+ (passed|failed)' "$OUT/gpu_tests.log" 2>/dev/null | tail -n 1)" \
    || rc=1
fi
echo
echo "================ summary ================"
head -n 1 "$OUT/machine.log"
{
  printf '%-9s %-10s %8s %6s %7s %7s\n' stage exit seconds cases calls errors
  for name in "${stages[@]}"; do
    read -r cases calls errors <<< "$(counts "$name")"
    printf '%-9s %-10s %8s %6s %7s %7s\n' "$name" "${status[$name]%%:*}" "${seconds[$name]}" \
      "$cases" "$calls" "$errors"
    case "${status[$name]}" in 0|not\ run*) ;; *) rc=1 ;; esac
  done
  for name in "${stages[@]}"; do
    case "${status[$name]}" in not\ run*) echo "$name ${status[$name]}" ;; esac
  done
  [ -f "$OUT/sanitize.log" ] && grep -E '^(tool|memcheck|racecheck|synccheck|initcheck) ' "$OUT/sanitize.log"
  [ -f "$OUT/soak.log" ] && grep -E '^soak R=' "$OUT/soak.log"
} | tee "$OUT/summary.txt"
exit $rc
