#!/usr/bin/env bash
# Compile every bundled CUDA source for sm_90 with plain nvcc (no GPU needed) into a
# temporary folder, and fail on the first error. Usage: scripts/compile_check.sh [arch]
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d /tmp/moe_plugin_compile_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
python -m moe_plugin.kernels.build --arch "${1:-90}" --out-dir "$out"
