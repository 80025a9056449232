#!/usr/bin/env bash
# One call on a multi-GPU host: build the kernels, run the GPU tests, run the benchmark
# (deepseek-v3, decode + prefill, every transport), and print a short summary last.
#
# Usage: bash scripts/gpu_check.sh [--sanitize] [--no-tests] [--sweep] [-- BENCH_ARGS...]
#   --sanitize   also run compute-sanitizer (memcheck) on a small bundled case
#   --no-tests   skip `pytest -m gpu`
#   --sweep      benchmark the T and SM sweeps too (longer)
#   BENCH_ARGS   passed on to `python -m moe_plugin.bench`
# Logs, bench.json and bench.png go to $OUT (default ./gpu_out). A failed stage does not
# stop the later ones; the exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

sanitize=0 tests=1 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize) sanitize=1 ;;
    --no-tests) tests=0 ;;
    --sweep) bench_args+=(--sweep) ;;
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
python=${PYTHON:-python}

declare -A status
stages=()
stage() {  # stage NAME LOG CMD...: run CMD, tee its output to $OUT/LOG, record its status
  local name=$1 log=$2
  shift 2
  echo "=== $name: $*" | tee "$OUT/$log"
  "$@" 2>&1 | tee -a "$OUT/$log"
  status[$name]=$?
  stages+=("$name")
  echo "=== $name: exit ${status[$name]}" | tee -a "$OUT/$log"
}

{ nvidia-smi -L; nvidia-smi topo -m; "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  > "$OUT/machine.log" 2>&1
stage build build.log "$python" -m moe_plugin.kernels.build
if [ "$tests" = 1 ]; then
  stage tests gpu_tests.log "$python" -m pytest -m gpu -x -q
fi
stage bench bench.log "$python" -m moe_plugin.bench --preset deepseek-v3 --mode all \
  --out "$OUT/bench" "${bench_args[@]}"
if [ "$sanitize" = 1 ]; then
  stage sanitize sanitizer.log compute-sanitizer --tool memcheck --target-processes all \
    --error-exitcode 9 "$python" -m moe_plugin.bench --nprocs 2 --transports bundled \
    --hidden 512 --num-experts 16 --topk 4 --decode-tokens 8 --prefill-tokens 64 \
    --iters 2 --warmup 0 --no-graphs --out "$OUT/sanitize"
fi

echo
echo "================ summary ================"
head -n 1 "$OUT/machine.log"
[ "$tests" = 1 ] && echo "gpu tests: $(grep -E '(passed|failed|error|skipped)' "$OUT/gpu_tests.log" | tail -n 1)"
if [ -f "$OUT/bench/bench.json" ]; then
  "$python" -m moe_plugin.bench --summary-from "$OUT/bench/bench.json"
fi
rc=0
for name in "${stages[@]}"; do
  echo "stage $name: exit ${status[$name]}"
  [ "${status[$name]}" = 0 ] || rc=1
done
exit $rc
