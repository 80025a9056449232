#!/usr/bin/env bash
# Creates .venv in the repository with moe_plugin (editable), vLLM and the test tools.
# Usage: bash scripts/install.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
# vLLM 0.32.0 pins torch 2.13.0; installing it first keeps pip from fetching another build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[vllm,test]"
if ! .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # vLLM's CUDA builds of these fail to import against a CPU torch; nothing here uses them.
  .venv/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import moe_plugin, torch; print('moe_plugin', moe_plugin.__version__, 'torch', torch.__version__)"
