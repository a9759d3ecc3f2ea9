#!/usr/bin/env bash
# The main job: set up, then plan every seed deployment (per-node commands, sizes, memory).
# Becomes the local sweep on the built-in engine once `epkit sweep` lands.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
for spec in launchers/seed/*.yaml; do
  echo "=================== epkit plan $spec"
  epkit plan "$spec"
  echo
done
