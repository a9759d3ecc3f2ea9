#!/bin/bash
# On the device, from the repository root: unpack whatever vLLM chunks this call carried (benchmarks/vllm_stage),
# then run (or resume) one epkit sweep against the staged vLLM (/tmp/site) and the built-in engine (without a
# staged vLLM: engine-only points, with epkit's cp312 wheels carried in .whl/), stopped the
# way Ctrl-C stops it before the call's limit, and hand back its log and results as $OUT/<name>.tgz.
#   bash benchmarks/device_sweep.sh SPEC RESULTS_DIR SECONDS [sweep args, e.g. --only TOPOLOGY_ID]
set -uo pipefail
spec=$1 results=$2 secs=$3; shift 3
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".stage[0-9]*" > /dev/null; then bash benchmarks/vllm_stage/unpack.sh | tail -2 || exit 1; fi
if [ -f /tmp/epkit-stage/complete ]; then
  site=/tmp/site  # vLLM and its dependencies (fastapi, uvicorn, ...) serve the built-in engine and epkit too
elif compgen -G ".whl/*.whl" > /dev/null; then  # no vLLM: engine-only points (--only), epkit's wheels carried
  if [ ! -f /tmp/epkit-site/.installed ]; then
    pip install -q --no-index --no-deps --target /tmp/epkit-site .whl/*.whl && touch /tmp/epkit-site/.installed || exit 1
  fi
  site=/tmp/epkit-site
else
  echo "device_sweep: vLLM is not fully staged and no .whl/ was carried" >&2; exit 1
fi
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
# the specs serve /tmp/model: the staged payload brings it; without it, write the engine's model folder
[ -f /tmp/model/config.json ] || PYTHONPATH=$site:$PWD python3 -m epkit.cli serve epkit-qwen3-30b-a3b-shape \
    --write-model-dir /tmp/model > /dev/null || exit 1
name=$(basename "$results")
PYTHONPATH=$site:$PWD timeout -s INT -k 45 "$secs" python3 -m epkit.cli sweep "$spec" --results "$results" \
    --no-progress --vllm-bin "python3 -m vllm.entrypoints.cli.main" "$@" >> "/tmp/$name.log" 2>&1
echo "sweep exit $?"
tail -60 "/tmp/$name.log"
cp "/tmp/$name.log" "$OUT/" 2>/dev/null
# torch-profiler traces of a workload with profile: true (the spec's --profiler-config dir, /tmp/prof): too large to
# come back, so summed here by `epkit profile`; each file named after the engine that wrote it
if compgen -G "/tmp/prof/*.pt.trace.json*" > /dev/null; then
  for f in /tmp/prof/*.pt.trace.json*; do
    case $(basename "$f") in epkit_*|vllm_*) ;; *) mv "$f" "/tmp/prof/vllm_$(basename "$f")" ;; esac  # the engine's: epkit_dp*
  done
  PYTHONPATH=$site:$PWD python3 -m epkit.cli profile /tmp/prof --markdown "$OUT/$name-profile.md" \
      --json "$OUT/$name-profile.json" > "$OUT/$name-profile.txt" 2>&1; echo "epkit profile exit $?"
  grep -A14 "side by side" "$OUT/$name-profile.txt" | head -60
  # the traces that fit what comes back (16 MiB a file; at most 3, beside the 5 files below), for a closer look here
  find /tmp/prof -name "*.pt.trace.json.gz" -size -15M -printf "%s %p\n" | sort -n | head -3 | cut -d' ' -f2 |
    xargs -r cp -t "$OUT/"
fi
tar -czf "$OUT/$name.tgz" --exclude="*.pt.trace.json*" -C "$results" . 2>/dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
