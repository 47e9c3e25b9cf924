#!/usr/bin/env bash
# The three RLHF stages and the export on one base, one config, one output_dir:
#
#   scripts/rlhf.sh my.yaml [section.key=value ...]
#
#   1. lora-ppo sft           -> <output_dir>/adapter          (the SFT policy)
#   2. lora-ppo train-reward  -> <output_dir>/reward_adapter   (reward adapter + score head)
#   3. lora-ppo train         PPO from the SFT adapter (the reference is a frozen copy of it),
#                             scored by the reward adapter on the same base
#   4. lora-ppo merge         -> <output_dir>/merged           (plain transformers model)
#
# Each stage runs under scripts/launch.sh, so NUM_GPUS and HOSTFILE apply. The config needs
# the sections `sft` and `reward_model` (see docs/config.md); stages 1-3 read it as is, with
# model.init_adapter and reward.adapter pointed at what stages 1 and 2 wrote.
# Paths in the config and on the command line are relative to the directory this is run from.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: scripts/rlhf.sh CONFIG.yaml [section.key=value ...] (config file not found: ${1:-none})" >&2
  exit 2
fi
config=$1
shift
py=$root/.venv/bin/python
[ -x "$py" ] || py=python3
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out=$("$py" -c 'import sys; from lora_ppo.config.load import load_config; print(load_config(sys.argv[1], sys.argv[2:]).output_dir)' "$config" "$@")
"$root/scripts/launch.sh" sft --config "$config" "$@"
"$root/scripts/launch.sh" train-reward --config "$config" "$@"
"$root/scripts/launch.sh" train --config "$config" "$@" model.init_adapter="$out/adapter" \
  reward.source=adapter reward.adapter="$out/reward_adapter"
"$py" -m lora_ppo merge "$out" --out "$out/merged" --force
