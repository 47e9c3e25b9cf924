#!/usr/bin/env bash
# Refresh constraints.txt: install the newest releases that pyproject.toml allows into a fresh
# venv, run the test suite there, and write their versions to constraints.txt only if it passes.
#   scripts/update_constraints.sh                 # the whole suite (as CI runs it)
#   PYTEST_ARGS='-m "not slow"' scripts/update_constraints.sh   # the quick tier only
# LOCK_VENV (default /tmp/lora_ppo-lock-venv) is rebuilt from scratch each time.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${LOCK_VENV:-/tmp/lora_ppo-lock-venv}
rm -rf "$V"
"${PYTHON:-python3}" -m venv "$V"
if command -v nvidia-smi >/dev/null 2>&1; then
  "$V/bin/pip" install -q "torch>=2.4"
else
  "$V/bin/pip" install -q torch==2.13.0 2>/dev/null \
    || "$V/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
"$V/bin/pip" install -q --upgrade -e ".[dev]"
"$V/bin/python" scripts/versions.py
eval "\"$V/bin/python\" -m pytest -q ${PYTEST_ARGS:-}"
py=$("$V/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
{
  echo "# The versions lora_ppo's tests last passed with (Python $py, CPU). scripts/setup.sh installs"
  echo "# these, so a new upstream release cannot break main silently; pyproject.toml keeps the ranges"
  echo "# users install from. Refresh with scripts/update_constraints.sh (see README, \"Tested versions\")."
  "$V/bin/pip" freeze --exclude-editable | sed 's/+cpu$//'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt updated; run scripts/setup.sh to install these versions into .venv"
