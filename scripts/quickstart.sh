#!/usr/bin/env bash
# The main job: set up, then run the local sweep on the built-in engine (CPU, a few minutes):
# DP=1 reference, DP=2 EP=2 under each all2all backend, DP=2 EP=2 with EPLB; a short rate ladder each.
# Results land in results/quickstart/ (re-running resumes: finished points are skipped).
# Then the HTML report of those results, then a plan of every seed deployment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
echo "=================== epkit sweep launchers/local/quickstart.yaml"
epkit sweep launchers/local/quickstart.yaml
echo "=================== epkit report results/quickstart"
epkit report results/quickstart -o results/quickstart/report.html
for spec in launchers/seed/*.yaml; do
  echo "=================== epkit plan $spec"
  epkit plan "$spec"
  echo
done
