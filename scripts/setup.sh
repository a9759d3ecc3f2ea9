#!/usr/bin/env bash
# Creates ./.venv with epkit and everything its jobs and tests need. Idempotent: a second run
# only checks. Source it or run it; EPKIT_PY then names the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EPKIT_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.epkit-setup-$(sha1sum "$root/pyproject.toml" "$root/scripts/setup.sh" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # The CPU wheel of torch 2.13.0 lies on disk on our machines; any other spec pulls GBs of CUDA wheels.
  "$venv/bin/python" -m pip install -q "torch==${EPKIT_TORCH_VERSION:-2.13.0}"
  "$venv/bin/python" -m pip install -q -e "$root[engine,bench,proxy,dev,analysis]"
  rm -f "$venv"/.epkit-setup-*
  touch "$stamp"
fi
export EPKIT_PY="$venv/bin/python"
export PATH="$venv/bin:$PATH"
