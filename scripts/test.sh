#!/usr/bin/env bash
# Set up everything the tests need (epkit's venv, the vLLM parser venv), then run the suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
export EPKIT_VLLM_PYTHON="$(bash "$root/scripts/vllm_venv.sh")"
export EPKIT_REQUIRE_VLLM=1  # the real-vLLM tests fail, never skip, when that venv has no vllm
bash "$root/scripts/chromium.sh" >/dev/null  # headless Chromium for tests/analysis (the report check)
cd "$root"
# A real 2-node Slurm cluster (slurmd per network namespace) for tests/launch, which submit
# deployments through submitit. Idempotent and fast when already up; needs root.
if [ "${EPKIT_SLURM:-1}" = 1 ] && [ "$(id -u)" = 0 ]; then
  bash "$root/scripts/slurm_up.sh" > /tmp/epkit-slurm-up.log 2>&1 || { tail -30 /tmp/epkit-slurm-up.log; exit 1; }
  export EPKIT_SLURM_BRIDGE_ADDR="$(sed -n 's/^SLURM_BRIDGE_ADDR=//p' /tmp/epkit-slurm-up.log | tail -1)"
fi
exec "$EPKIT_PY" -m pytest --durations=15 "$@"
