#!/usr/bin/env bash
# The two peer venvs that benchmarks/bench_vs_trl.py runs TRL in, each apart from the project's
# venv because each needs its own versions:
#   trl011  TRL 0.11.4, the last release with the classic PPOTrainer; it needs transformers 4.46
#   trl116  TRL 1.16.0's GRPOTrainer, on the project's transformers, peft, accelerate, datasets
#           and tokenizers (constraints.txt), so that only the trainer differs
# Both take the CPU build of torch 2.13.0, installed first so that nothing pulls a CUDA build.
#
#   bash benchmarks/peers/setup.sh [trl011|trl116|all] [--force]
#
# Idempotent: a venv that already holds exactly the pinned versions is kept (--force rebuilds).
# The venvs live in $LORA_PPO_PEERS (default /tmp/lora_ppo_peers); the last lines printed are
# one per venv: its name, its python and its versions.
set -euo pipefail
ROOT=${LORA_PPO_PEERS:-/tmp/lora_ppo_peers}
WHICH=all FORCE=0
for arg in "$@"; do
  case $arg in
    trl011|trl116|all) WHICH=$arg ;;
    --force) FORCE=1 ;;
    *) echo "usage: bash benchmarks/peers/setup.sh [trl011|trl116|all] [--force]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
TORCH="torch==2.13.0"
# trl 0.11.4 imports rich without declaring it
PINS_trl011="trl==0.11.4 transformers==4.46.3 peft==0.13.2 accelerate==1.0.1 tokenizers==0.20.3 rich==14.2.0"
PINS_trl116="trl==1.16.0 transformers==5.25.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0 tokenizers==0.23.3"

# exit 0 when the venv's python has every pinned version (torch's local tag "+cpu" allowed)
has_pins() {
  "$1" - "${@:2}" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, _, want = pin.partition("==")
    if md.version(name).split("+")[0] != want:
        sys.exit(1)
PY
}

make_venv() {
  local name=$1 pins=$2 dir=$ROOT/$1
  local py=$dir/bin/python
  if [[ $FORCE == 1 ]] || [[ ! -x $py ]] || ! has_pins "$py" $TORCH $pins; then
    echo "building the $name peer venv in $dir (a few minutes, once)" >&2
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$py" -m pip install -q "$TORCH"
    "$py" -m pip install -q $pins
    "$py" -m pip check >&2
    has_pins "$py" $TORCH $pins || { echo "$dir does not hold the pinned versions ($pins)" >&2; exit 1; }
  fi
  echo "$name $py $("$py" -c 'import torch, trl, transformers, peft, accelerate, tokenizers as t
print(f"torch {torch.__version__} trl {trl.__version__} transformers {transformers.__version__} peft {peft.__version__} accelerate {accelerate.__version__} tokenizers {t.__version__}")' 2>/dev/null)"
}

mkdir -p "$ROOT"
[[ $WHICH == trl116 ]] || make_venv trl011 "$PINS_trl011"
[[ $WHICH == trl011 ]] || make_venv trl116 "$PINS_trl116"
