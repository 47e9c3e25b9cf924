#!/usr/bin/env bash
# Create .venv and install lora_ppo with its test tools, at the versions in constraints.txt (the
# ones the tests last passed with; LORA_PPO_UNPINNED=1 takes the newest that pyproject.toml
# allows instead). On a machine without a GPU the CPU build of torch is installed first, so pip
# does not pull a multi-GB CUDA build. Ends with one line naming the versions installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIN=(-c constraints.txt)
[ "${LORA_PPO_UNPINNED:-0}" = 1 ] && PIN=()
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q "${PIN[@]}" "torch>=2.4"
  else
    # The CPU wheel (on this project's machines it lies on local disk; elsewhere PyTorch's CPU index).
    .venv/bin/pip install -q torch==2.13.0 2>/dev/null \
      || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/pip install -q "${PIN[@]}" -e ".[dev]"
.venv/bin/python scripts/versions.py
