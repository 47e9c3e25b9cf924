#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): the 4-bit bf16 demo, the bench at a ~1B Llama
# shape against the estimator, the GRPO demo, bench_vs_trl.py's grpo-long workload (lora_ppo's side,
# bf16); one JSON. About 8-9 minutes on one H100/H200.
#   benchmarks/gpu_check.sh [OUT.json]
# Without an NVIDIA GPU (or a torch that sees it) it refuses with one line and exit code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.json}
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); run it on a GPU machine" >&2
  exit 2
fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY has no CUDA-enabled torch; run scripts/setup.sh on the GPU machine first" >&2
  exit 2
fi
exec "$PY" benchmarks/gpu_check.py --out "$OUT"
