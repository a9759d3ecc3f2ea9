#!/bin/bash
# On the device, from the repository root: one torch-profiler trace per engine of the same workload, class (b) of
# issue 19's matrix (launchers/device/matrix_1gpu.yaml: ~1,024-token prompts, range ratio 0.5, Poisson 5 req/s),
# then `epkit profile` over them (where each step kind's time goes, side by side).
#   bash benchmarks/profile_engines.sh OUT_DIR LABEL=ROOT [LABEL=ROOT ...]
# ROOT is the epkit source tree that serves as the built-in engine (`.` = this checkout, `.before` = an older one
# carried in); LABEL `vllm` serves vLLM instead (ROOT ignored; needs the staged /tmp/site). Each server gets the
# matrix's flags plus --profiler-config; the client is this checkout's `epkit bench`: the matrix's warm-up, then b-r5
# with --profile (POST /start_profile after the warm-ups, /stop_profile at the end). The profiler skips the first
# DELAY steps and records MAX (env, default 100 / 400) so the trace stays small. Results under OUT_DIR/<label>/.
# MODEL / VOCAB / PROMPTS / LEN (env) change the model, the vocabulary of the random prompts, b-r5's request count
# and prompt length (a CPU smoke run: MODEL=epkit-tiny-moe VOCAB=256 PROMPTS=12 LEN=64 MAXLEN=512 PY=.venv/bin/python SITE=...).
set -uo pipefail
out=$1; shift
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    VLLM_ALLREDUCE_USE_SYMM_MEM=0 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
if [ -n "${SITE:-}" ]; then site=$SITE  # a local run: SITE=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
elif [ -f /tmp/epkit-stage/complete ]; then site=/tmp/site
else
  if [ ! -f /tmp/epkit-site/.installed ]; then
    pip install -q --no-index --no-deps --target /tmp/epkit-site .whl/*.whl && touch /tmp/epkit-site/.installed || exit 1
  fi
  site=/tmp/epkit-site
fi
model=${MODEL:-/tmp/model}
[ "$model" != /tmp/model ] || [ -f /tmp/model/config.json ] || PYTHONPATH=$site:$PWD ${PY:-python3} -m epkit.cli serve epkit-qwen3-30b-a3b-shape \
    --write-model-dir /tmp/model > /dev/null || exit 1
port=8765
bench() {  # this checkout's client
  PYTHONPATH=$site:$PWD ${PY:-python3} -m epkit.cli bench --port $port --model "$model" --vocab-size ${VOCAB:-151936} --ignore-eos \
      --disable-tqdm "$@"
}
traces=()
for item in "$@"; do
  label=${item%%=*} root=${item#*=}
  dir=$(realpath -m "$out/$label"); mkdir -p "$dir"
  prof="{\"profiler\":\"torch\",\"torch_profiler_dir\":\"$dir/trace\",\"torch_profiler_with_stack\":false,\"ignore_frontend\":true,\"delay_iterations\":${DELAY:-100},\"max_iterations\":${MAX:-400}}"
  flags=("$model" --port $port --max-model-len ${MAXLEN:-10240} --load-format dummy --profiler-config "$prof")
  if [ "$label" = vllm ]; then
    PYTHONPATH=$site ${PY:-python3} -m vllm.entrypoints.cli.main serve "${flags[@]}" > "$dir/server.log" 2>&1 &
  else
    # from inside ROOT: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    (cd "$root" && echo "serving epkit from $(PYTHONPATH=$site:$PWD ${PY:-python3} -c 'import epkit; print(epkit.__file__)')" \
        && PYTHONPATH=$site:$PWD exec ${PY:-python3} -m epkit.cli serve "${flags[@]}") > "$dir/server.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 420); do curl -sf localhost:$port/health > /dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
  if curl -sf localhost:$port/health > /dev/null; then
    bench --dataset-name random --random-input-len 512 --random-output-len 32 --num-prompts $(( ${PROMPTS:-120} * 5 / 3 )) --seed 1901 > "$dir/warmup.txt" 2>&1
    bench --dataset-name random --random-input-len ${LEN:-1024} --random-output-len 128 --random-range-ratio 0.5 \
        --num-prompts ${PROMPTS:-120} --seed 1905 --request-rate 5 --profile --save-result --result-dir "$dir" \
        --result-filename b-r5-profiled.json > "$dir/b-r5.txt" 2>&1
    echo "$label: $(grep -E 'Output token throughput|P99 ITL|Mean TTFT' "$dir/b-r5.txt" | tr -s ' ' | paste -sd';')"
  else
    echo "$label: the server did not come up"; tail -30 "$dir/server.log"
  fi
  kill -TERM $pid 2>/dev/null; for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 1; done; kill -KILL $pid 2>/dev/null
  pkill -f "port $port" 2>/dev/null; sleep 2
  grep -iE "KV cache size|GPU KV|graphs? captured|profiler stopped|error" "$dir/server.log" | tail -8
  for f in "$dir"/trace/*.pt.trace.json*; do [ -e "$f" ] && mv "$f" "$dir/trace/${label}_$(basename "$f")"; done
  traces+=("$dir/trace")
done
PYTHONPATH=$site:$PWD ${PY:-python3} -m epkit.cli profile "${traces[@]}" --markdown "$out/profile.md" --json "$out/profile.json" \
    > "$out/profile.txt" 2>&1; echo "epkit profile exit $?"; cat "$out/profile.md" 2>/dev/null | head -80
