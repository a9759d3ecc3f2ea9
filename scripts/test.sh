#!/usr/bin/env bash
# Set up everything the tests need (epkit's venv, the vLLM parser venv), then run the suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
export EPKIT_VLLM_PYTHON="$(bash "$root/scripts/vllm_venv.sh")"
cd "$root"
exec "$EPKIT_PY" -m pytest "$@"
