#!/bin/bash
# One device call for issues 6 and 9 (run from the repo root, wheels in .whl/, 2 GPUs); results in $OUT.
# (a) Issue 6: skewed router (--hf-overrides router_skew 3.0) on the 48-layer Qwen3-30B-A3B-shaped dummy
#     model, DP=2 + EP, EPLB with 2 redundant experts, step_interval 100 (first rearrangement after step 25,
#     vLLM's schedule), balancedness logged every 5 steps. Load: prefill-bound (1024-token prompts, 1 output
#     token, 8192 batched tokens per rank per step), so every step is the same size and the MoE GEMMs dominate.
#     The engine logs the median step time of each epoch between rearrangements; /eplb/loads is saved.
# (b) Issue 9 (reduced): `epkit sweep launchers/device/single_node_2gpu.yaml` with the local executor.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUTD/gpus.txt"
if [ "${SKIP_A:-0}" != 1 ]; then
SERVE=(python3 -m epkit.engine.cli epkit-qwen3-30b-a3b-shape --load-format dummy --data-parallel-size 2
  --enable-expert-parallel --all2all-backend allgather_reducescatter --max-model-len 2048 --max-num-seqs 256
  --max-num-batched-tokens 8192 --port 8000 --hf-overrides '{"router_skew": 3.0}' --enable-eplb
  --eplb-config.num_redundant_experts 2 --eplb-config.window_size 100 --eplb-config.step_interval 100
  --eplb-config.log_balancedness true --eplb-config.log_balancedness_interval 5)
echo "${SERVE[@]}" > "$OUTD/eplb_command.txt"
"${SERVE[@]}" > "$OUTD/eplb_server.log" 2>&1 &
SPID=$!
for i in $(seq 1 180); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null && break
  kill -0 $SPID 2>/dev/null || break; sleep 1
done
B="python3 benchmarks/engine_bench.py --url http://127.0.0.1:8000 --input-len 1024"
{ timeout 60 $B --num-prompts 32 --output-len 4; echo "== main =="; timeout ${A_T:-150} $B --num-prompts ${A_N:-2560} --output-len 1 --max-concurrency 512; } > "$OUTD/eplb_bench.log" 2>&1
python3 -c "import urllib.request; open('$OUTD/eplb_loads.npz','wb').write(urllib.request.urlopen('http://127.0.0.1:8000/eplb/loads?format=npz', timeout=60).read())"
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics', timeout=10).read().decode())" | grep "^epkit:eplb" > "$OUTD/eplb_metrics.txt"
kill -TERM $SPID; for i in $(seq 1 20); do kill -0 $SPID 2>/dev/null || break; sleep 1; done; kill -KILL $SPID 2>/dev/null
grep -E "EPLB rebalance|Rearranged|Traceback|ERROR" "$OUTD/eplb_server.log" | grep -v EngineCore_DP1 | head -20
grep -c "EPLB step" "$OUTD/eplb_server.log"; tail -4 "$OUTD/eplb_bench.log"
fi
if [ "${SKIP_B:-0}" != 1 ]; then
  T0=$(date +%s)
  timeout ${B_T:-330} python3 -m epkit.cli sweep launchers/device/single_node_2gpu.yaml --results /tmp/results --no-progress > "$OUTD/sweep.log" 2>&1
  echo "sweep rc=$? in $(( $(date +%s) - T0 )) s"; tail -15 "$OUTD/sweep.log"
  tar czf "$OUTD/sweep_results.tgz" -C /tmp/results .
fi
