#!/bin/bash
# Build, on this CPU machine, the chunks that stage real vLLM 0.26.0 (built for torch 2.11 + CUDA 13,
# the device image's torch) and the benchmark's model folder on a device machine:
#   1. vllm==0.26.0 and the 85 dependency wheels the image lacks (wheels_cp312.lock; RESOLVE=1 re-walks
#      vLLM's requirements instead, resolve_wheels.py), installed flat into site/ for CPython 3.12;
#   2. vLLM's unpacked wheel, stripped of what Hopper in the default mode never loads (FlashAttention 2,
#      the Blackwell FMHA sources, the Rust frontend, DeepGEMM builds for other Pythons);
#   3. model/: config.json + the built-in engine's byte-level tokenizer (`epkit serve --write-model-dir`)
#      for the 48-layer Qwen3-30B-A3B-shaped model, checked by check_model_dir.py;
#   4. xz chunks in the ignored folders .stage1/, .stage2/, ... of this repository, each small enough to
#      travel with the working tree in one `run` call's carry (pack_chunks.py; unpack.sh extracts them).
# Env: WORK (scratch, default /tmp/epkit-vllm-stage), PY (a Python with pip, packaging and epkit's engine
# extra; default .venv/bin/python), VLLM_PY (a Python with some vllm, for the random-dataset check; default
# the test suite's ~/.cache/epkit/vllm-venv; skipped when absent), RESOLVE=1, CHUNK_MAX_MIB (default: what
# 61 MiB leaves after the working tree, less 1.5, at most 59).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$REPO/benchmarks/vllm_stage
WORK=${WORK:-/tmp/epkit-vllm-stage}
PY=${PY:-$REPO/.venv/bin/python}
VLLM_PY=${VLLM_PY:-$HOME/.cache/epkit/vllm-venv/bin/python}
VLLM_VERSION=0.26.0
T0=$(date +%s)
step() { echo "[build_payload +$(( $(date +%s) - T0 ))s] $*"; }

exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude=$REPO/$exclude ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.stage[0-9]*/' "$exclude" 2>/dev/null || echo '/.stage[0-9]*/' >> "$exclude"
mkdir -p "$REPO/.stage1"
git -C "$REPO" check-ignore -q .stage1/ || { echo "error: .stage1/ is not ignored by git; see $exclude" >&2; exit 1; }
rmdir "$REPO/.stage1" 2>/dev/null || true

step "vllm==$VLLM_VERSION and its dependency wheels -> $WORK"
if [ "${RESOLVE:-0}" = 1 ]; then
  rm -rf "$WORK/wheels"
  "$PY" "$HERE/resolve_wheels.py" "$VLLM_VERSION" "$WORK" --lock-out "$WORK/resolved.lock"
  echo "resolved set written to $WORK/resolved.lock (copy it over $HERE/wheels_cp312.lock once it ran on the device)"
else
  "$PY" "$HERE/resolve_wheels.py" "$VLLM_VERSION" "$WORK" --lock "$HERE/wheels_cp312.lock"
fi

step "install into a flat site dir for CPython 3.12"
PAYLOAD=$WORK/payload
rm -rf "$PAYLOAD" && mkdir -p "$PAYLOAD"
# shellcheck disable=SC2046  # the platform flags are meant to split
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$PAYLOAD/site" \
  $("$PY" "$HERE/resolve_wheels.py" --platform-args) "$WORK"/wheels/*.whl
rm -rf "$PAYLOAD/site/bin"
"$PY" -m zipfile -e "$WORK"/vllm/vllm-$VLLM_VERSION-*.whl "$PAYLOAD/site"
V=$PAYLOAD/site/vllm
rm -f "$V/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$V/vllm-rs" "$V"/third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so
rm -rf "$V/third_party/fmha_sm100"
find "$PAYLOAD/site" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "site: $(du -sm "$PAYLOAD/site" | cut -f1) MiB, $(find "$PAYLOAD/site" -type f | wc -l) files"

step "model folder (epkit serve --write-model-dir) and its tokenizer checks"
(cd "$REPO" && "$PY" -m epkit.engine.cli epkit-qwen3-30b-a3b-shape --write-model-dir "$PAYLOAD/model")
"$PY" "$HERE/check_model_dir.py" "$PAYLOAD/model"
if [ -x "$VLLM_PY" ]; then
  "$VLLM_PY" "$HERE/check_model_dir.py" "$PAYLOAD/model" --random-dataset
else
  echo "random-dataset check skipped: no $VLLM_PY (bash scripts/vllm_venv.sh makes it)"
fi

TREE_MIB=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, sys
paths = [p for p in sys.stdin.read().split("\0") if p and os.path.isfile(p)]
print(f"{sum(os.path.getsize(p) for p in paths) / 2**20:.1f}")')
# the carry limit behaves like 64 MB (61 MiB): a 47.7 MiB chunk beside a 16.0 MiB tree was refused (2026-11-30)
MAX_MIB=${CHUNK_MAX_MIB:-$("$PY" -c "print(round(min(59.0, 61 - $TREE_MIB - 1.5), 1))")}
step "pack chunks of at most $MAX_MIB MiB (the working tree that travels with each is $TREE_MIB MiB)"
"$PY" "$HERE/pack_chunks.py" "$PAYLOAD" "$REPO" --max-mib "$MAX_MIB"
CARRY=$(cd "$REPO" && printf '%s\n' .stage[0-9]* | sort -V | tr '\n' ' ')
du -sm "$REPO"/.stage[0-9]* | sed 's|'"$REPO"'/||'
step "done: carry one of [$CARRY] per call, each followed by: bash benchmarks/vllm_stage/unpack.sh"
