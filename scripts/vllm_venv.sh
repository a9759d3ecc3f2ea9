#!/usr/bin/env bash
# Creates (once) the venv that holds the real vLLM whose argument parser checks epkit's
# rendered commands. Cached outside the checkout (~6 GB) so CI runs and later clones reuse it.
# Prints the venv's python on stdout.
set -euo pipefail
venv="${EPKIT_VLLM_VENV:-$HOME/.cache/epkit/vllm-venv}"
version="${EPKIT_VLLM_VERSION:-0.32.0}"
stamp="$venv/.epkit-vllm-$version"
if [ ! -f "$stamp" ]; then
  echo "epkit: installing vllm==$version into $venv (first time only, ~4 min, ~6 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # vllm 0.32.0 pins torch==2.13.0, whose CPU wheel lies on disk here.
  "$venv/bin/python" -m pip install -q "torch==2.13.0" "vllm==$version" >&2
  # Their CUDA wheels do not load beside the CPU torch; the parser needs none of them.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  touch "$stamp"
fi
echo "$venv/bin/python"
