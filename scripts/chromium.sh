#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (used by tests/analysis to load `epkit report`
# pages and check console errors and rendered plots). Idempotent: prints the binary's path.
set -euo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
done
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium
