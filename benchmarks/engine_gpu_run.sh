#!/bin/bash
# One GPU benchmark of `epkit serve` on the lent machine (run from the repo root, wheels in .whl/):
# DP=4 + EP (allgather_reducescatter) on the 48-layer Qwen3-30B-A3B-shaped dummy model, 512 in / 128 out,
# ignore_eos: a warm-up, 400 prompts at rate inf, 256 prompts at concurrency 64. Results land in $OUT.
# Env: NAME (file prefix, default epkit_dp4ep), RUNS ("inf c64"), EXTRA_SERVE_ARGS (appended to the command).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"
NAME=${NAME:-epkit_dp4ep}; RUNS=${RUNS-inf c64}  # RUNS="" runs only the warm-up
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUTD/gpus.txt"
python3 -c "import torch; print('torch', torch.__version__, 'grouped_mm', hasattr(torch, '_grouped_mm'))"
T0=$(date +%s)
SERVE="python3 -m epkit.engine.cli epkit-qwen3-30b-a3b-shape --load-format dummy --data-parallel-size 4 --enable-expert-parallel --all2all-backend allgather_reducescatter --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 8192 --port 8000 ${EXTRA_SERVE_ARGS:-}"
echo "$SERVE" > "$OUTD/${NAME}_command.txt"
$SERVE > "$OUTD/${NAME}_server.log" 2>&1 &
SPID=$!
ok=0
for i in $(seq 1 "${HEALTH_WAIT:-240}"); do
  if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" 2>/dev/null; then ok=1; break; fi
  kill -0 $SPID 2>/dev/null || break
  sleep 1
done
BLOG="$OUTD/${NAME}_bench.log"
echo "ready=$ok after $(( $(date +%s) - T0 )) s" | tee "$BLOG"
if [ $ok = 1 ]; then
  B="python3 benchmarks/engine_bench.py --url http://127.0.0.1:8000 --input-len 512"
  timeout ${WARM_T:-120} $B --num-prompts 32 --output-len 16 >> "$BLOG" 2>&1
  for run in $RUNS; do
    echo "== $run ==" >> "$BLOG"
    case $run in
      inf) timeout ${BENCH_T:-200} $B --num-prompts 400 --output-len 128 --save "$OUTD/${NAME}_inf.json" >> "$BLOG" 2>&1 ;;
      c64) timeout ${BENCH_T:-200} $B --num-prompts 256 --output-len 128 --max-concurrency 64 --save "$OUTD/${NAME}_c64.json" >> "$BLOG" 2>&1 ;;
    esac
  done
fi
cat "$BLOG"
kill -TERM $SPID 2>/dev/null
for i in $(seq 1 30); do kill -0 $SPID 2>/dev/null || break; sleep 1; done
kill -KILL $SPID 2>/dev/null
grep -E "ERROR|Error|Traceback|grouped|DP rank 0|EPLB rebalance" "$OUTD/${NAME}_server.log" | head -20
tail -3 "$OUTD/${NAME}_server.log"
