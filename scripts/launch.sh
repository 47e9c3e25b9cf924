#!/usr/bin/env bash
# Launch any lora-ppo stage under the DeepSpeed launcher: one GPU, several, or several nodes.
#
#   scripts/launch.sh train --config my.yaml [section.key=value ...]
#   NUM_GPUS=4 scripts/launch.sh train --config my.yaml              # 4 GPUs on this node
#   HOSTFILE=hostfile scripts/launch.sh train --config my.yaml       # every slot in the hostfile
#
# Stages: train, sft, train-reward, bench (benchmarks/bench.py). Environment:
#   NUM_GPUS     GPUs on this node (default: all that nvidia-smi lists, else 1)
#   HOSTFILE     DeepSpeed hostfile ("node1 slots=8" per line) for multi-node runs; the launcher
#                starts the other nodes over passwordless ssh (pdsh), so run this on the first node
#   MASTER_ADDR  address of the first node (multi-node; default: the first host in HOSTFILE)
#   MASTER_PORT  rendezvous port (default 29500)
#   DEEPSPEED    the launcher (default: the one next to .venv/bin/python, else `deepspeed`)
# On a machine without a GPU the launcher runs CPU ranks (DS_ACCELERATOR=cpu, gloo).
# Paths are the user's: the config, output_dir and data are relative to the directory this is
# run from, as with `lora-ppo` itself (the launcher starts every rank there, and on other nodes
# it cds to the same path); only the launcher and bench.py are found through the repository.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
stage=$1
shift
launcher=${DEEPSPEED:-}
if [ -z "$launcher" ]; then
  if [ -x "$root/.venv/bin/deepspeed" ]; then launcher=$root/.venv/bin/deepspeed; else launcher=deepspeed; fi
fi
# lora_ppo imports from the checkout even where it is not installed into the launcher's python
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
args=(--master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "HOSTFILE=$HOSTFILE does not exist; write one line per node: 'host slots=N'" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}")
else
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${NUM_GPUS:-0}" -ge 1 ] || NUM_GPUS=1
  fi
  args+=(--num_gpus "$NUM_GPUS")
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
case "$stage" in
  train|sft|train-reward) exec "$launcher" "${args[@]}" --module lora_ppo "$stage" "$@" ;;
  bench) exec "$launcher" "${args[@]}" "$root/benchmarks/bench.py" "$@" ;;
  *) echo "unknown stage '$stage'; use train, sft, train-reward or bench" >&2; exit 2 ;;
esac
