#!/bin/bash
# Real vLLM 0.26.0 (default mode: torch.compile + CUDA graphs) and the built-in engine, one after the
# other on the same GPUs, same topology, same `vllm bench serve` client, prompts and seeds (issue 8).
# Run on the device from the repository root once benchmarks/vllm_stage/unpack.sh printed
# "staged: complete" (docs/vllm_compare.md has the calls).
#
#   bash benchmarks/vllm_vs_engine.sh [--dp N] [--no-ep] [--backend NAME] [--servers "vllm engine"]
#                                     [--vllm-args "..."] [--engine-args "..."] [-- ARGS FOR BOTH]
#
# Default: DP=4 + EP, allgather_reducescatter. Per server: start it (dummy weights, no prefix caching,
# max-model-len 2048), wait for /health, warm up (400 prompts x 32 tokens, rate inf, seed 101), measure
# 400 prompts at rate inf (seed 202) and 256 prompts at concurrency 64 (seed 303, after 64 warm-up
# requests), all 512 tokens in / 128 out with ignore_eos; stop it and wait until the GPUs are free.
# DEADLINE (epoch s, default now + 570) caps every phase; a server whose phase no longer fits is skipped
# and named at the end (run again with --servers NAME within 30 s: the machine keeps /tmp while warm).
# Results accumulate in $WORKDIR (default /tmp/vllm_vs_engine); $OUT gets this topology's JSONs,
# table.md (benchmarks/compare_vllm.py over everything in $WORKDIR) and logs.tar.gz.
# For a CPU dry run of the machinery (no vLLM server there): MODEL_DIR, ENGINE_MODEL (e.g. epkit-tiny-moe),
# CLIENT_PY / CLIENT_PYTHONPATH (a Python with some vllm), ENGINE_PYTHONPATH, STAGED (a file that exists),
# and an nvidia-smi stand-in on PATH.
set -uo pipefail
DP=4 EP=1 BACKEND=allgather_reducescatter SERVERS="vllm engine" VLLM_ARGS="" ENGINE_ARGS="" COMMON=()
while [ $# -gt 0 ]; do
  case $1 in
    --dp) DP=$2; shift 2 ;;
    --no-ep) EP=0; shift ;;
    --backend) BACKEND=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --vllm-args) VLLM_ARGS=$2; shift 2 ;;
    --engine-args) ENGINE_ARGS=$2; shift 2 ;;
    --) shift; COMMON=("$@"); break ;;
    *) echo "vllm_vs_engine: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
REPO=$(pwd)
DEADLINE=${DEADLINE:-$(( $(date +%s) + 570 ))}
WORKDIR=${WORKDIR:-/tmp/vllm_vs_engine}
OUTD=${OUT:-/tmp/vllm_vs_engine_out}
SERVED=epkit-qwen3-30b-a3b-shape
MODEL_DIR=${MODEL_DIR:-/tmp/model}
ENGINE_MODEL=${ENGINE_MODEL:-$SERVED}
CLIENT_PY=${CLIENT_PY:-python3}
CLIENT_PYTHONPATH=${CLIENT_PYTHONPATH-/tmp/site}
STAGED=${STAGED:-/tmp/epkit-stage/complete}
ENGINE_PYTHONPATH=${ENGINE_PYTHONPATH:-/tmp/site:$REPO}  # vLLM's dependency set holds fastapi, uvicorn, pydantic
VLLM_MIN_S=${VLLM_MIN_S:-330}      # start (~230 s in default mode) + benches + stop
ENGINE_MIN_S=${ENGINE_MIN_S:-240}  # start (~10 s) + 3 client runs (~60 s of imports) + load + stop
STOP_RESERVE_S=45                  # kept back from every bench for the stop and the GPU check
FINAL_RESERVE_S=15                 # kept back from everything for the table and the copy to $OUT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
mkdir -p "$WORKDIR" "$OUTD"
case $BACKEND in allgather_reducescatter) short=agrs ;; all_to_all) short=a2a ;; *) short=$BACKEND ;; esac
if [ "$EP" = 1 ]; then TOPO=dp${DP}ep_$short; TOPO_FLAGS=(--enable-expert-parallel --all2all-backend "$BACKEND")
else TOPO=dp${DP}; TOPO_FLAGS=(); fi
FLAGS=(--load-format dummy --no-enable-prefix-caching --max-model-len 2048 --data-parallel-size "$DP"
       "${TOPO_FLAGS[@]}" --served-model-name "$SERVED" "${COMMON[@]}")
LOG=$WORKDIR/${TOPO}_run.log
T0=$(date +%s)
left() { echo $(( DEADLINE - FINAL_RESERVE_S - $(date +%s) )); }
say() { echo "[vllm_vs_engine +$(( $(date +%s) - T0 ))s, $(left)s left] $*" | tee -a "$LOG"; }
cap() { local want=$1 room=$(( $(left) - STOP_RESERVE_S )); [ "$room" -lt "$want" ] && want=$room; echo $(( want > 1 ? want : 1 )); }

[ -f "$STAGED" ] || { say "not staged: run benchmarks/vllm_stage/unpack.sh with every .stageN/ first"; exit 1; }
GPUS=$(nvidia-smi -L | grep -c '^GPU')
[ "$GPUS" -ge "$DP" ] || { say "DP=$DP needs $DP GPUs; this machine has $GPUS"; exit 1; }
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader > "$WORKDIR/gpus.txt"
say "topology $TOPO on $GPUS GPU(s) ($(head -1 "$WORKDIR/gpus.txt" | cut -d, -f2 | xargs)); servers: $SERVERS"

descendants() {  # every process below $1, from /proc (children of children too)
  python3 - "$1" <<'EOF'
import os, sys
kids = {}
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    kids.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(p))
todo, out = [int(sys.argv[1])], []
while todo:
    for c in kids.get(todo.pop(), []):
        out.append(c)
        todo.append(c)
print(*out)
EOF
}
alive() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" != Z ]; }
gpu_used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | sort -n | tail -1; }

SPID=""
stop_server() {  # SIGTERM the server, SIGKILL its process group and every descendant after the grace
  [ -n "$SPID" ] || return 0
  local pids t
  t=$(date +%s)
  pids=$(descendants "$SPID")
  kill -TERM "$SPID" 2>/dev/null
  for _ in $(seq 1 "${STOP_GRACE_S:-25}"); do alive "$SPID" || break; sleep 1; done
  kill -KILL -- "-$SPID" 2>/dev/null
  for p in $pids; do kill -KILL "$p" 2>/dev/null; done
  wait "$SPID" 2>/dev/null
  local left_over
  for _ in $(seq 1 30); do
    left_over=""; for p in $pids; do alive "$p" && left_over+=" $p:$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" | cut -c1-60)"; done
    [ -z "$left_over" ] && [ "$(gpu_used_mib)" -lt 2048 ] && break
    sleep 1
  done
  say "stopped $NAME in $(( $(date +%s) - t )) s; left running:${left_over:- none};" \
      "GPU memory used (MiB): $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | xargs)"
  SPID=""
}
trap 'stop_server' EXIT
trap 'stop_server; exit 130' INT TERM
set -m  # each server in its own process group, so the stop reaches all of it

bench() {  # bench LOAD SEED PROMPTS OUTPUT_LEN CAP_S [more vllm bench serve args]: one client run
  local load=$1 seed=$2 n=$3 out_len=$4 t; t=$(cap "$5"); shift 5
  local save=()
  [ "$load" != warmup ] && save=(--save-result --save-detailed --result-dir "$WORKDIR" --result-filename "${NAME}_${load}.json"
                                 --metadata "bench_server=$SERVER" "bench_topology=$TOPO" "bench_load=$load" "gpus=$DP")
  echo "== $load (seed $seed, $n prompts, 512 in / $out_len out, cap ${t}s) $*" >> "$BLOG"
  PYTHONPATH=$CLIENT_PYTHONPATH timeout "$t" "$CLIENT_PY" -m vllm.entrypoints.cli.main bench serve --backend vllm \
    --host 127.0.0.1 --port "$PORT" --model "$SERVED" --tokenizer "$MODEL_DIR" --dataset-name random \
    --random-input-len 512 --random-output-len "$out_len" --ignore-eos --num-prompts "$n" --seed "$seed" \
    --request-rate inf --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --disable-tqdm \
    "${save[@]}" "$@" > "$BLOG.run" 2>&1
  local rc=$?
  cat "$BLOG.run" >> "$BLOG"
  say "$SERVER $load: rc=$rc $(grep -hE 'Output token throughput|Failed requests' "$BLOG.run" | tr -s ' ' | paste -sd';')"
  rm -f "$BLOG.run"
  [ $rc = 0 ] || [ "$load" = warmup ] || FAILED+=("$SERVER $load (rc $rc)")
}

run_server() {  # run_server vllm|engine
  SERVER=$1 NAME=${TOPO}_$1
  local need=$VLLM_MIN_S; [ "$SERVER" = engine ] && need=$ENGINE_MIN_S
  if [ "$(left)" -lt "$need" ]; then
    say "SKIPPED $SERVER: $(left) s left < $need s; run again with --servers $SERVER"; SKIPPED+=("$SERVER"); return
  fi
  local used; used=$(gpu_used_mib)
  [ "$used" -lt 2048 ] || say "warning: a GPU already holds $used MiB before $SERVER starts"
  SLOG=$WORKDIR/${NAME}_server.log BLOG=$WORKDIR/${NAME}_bench.log
  : > "$BLOG"
  rm -f "$WORKDIR/${NAME}_inf.json" "$WORKDIR/${NAME}_c64.json"  # never report an earlier call's run as this one's
  local cmd
  if [ "$SERVER" = vllm ]; then
    PORT=8000; export PYTHONPATH=/tmp/site
    # shellcheck disable=SC2206  # --vllm-args is split on purpose
    cmd=(python3 -m vllm.entrypoints.cli.main serve "$MODEL_DIR" "${FLAGS[@]}" --port "$PORT" $VLLM_ARGS)
  else
    PORT=8001; export PYTHONPATH=$ENGINE_PYTHONPATH
    # shellcheck disable=SC2206
    # vLLM runs one API server per DP rank by default (serve.py: api_server_count defaults to the DP size);
    # the engine's default is 1, so it is given the same count here
    cmd=(python3 -m epkit.engine.cli "$ENGINE_MODEL" "${FLAGS[@]}" --port "$PORT" --data-parallel-rpc-port 29650
         --api-server-count "$DP" $ENGINE_ARGS)
  fi
  echo "${cmd[*]}" > "$WORKDIR/${NAME}_command.txt"
  local t
  t=$(date +%s)
  "${cmd[@]}" > "$SLOG" 2>&1 &
  SPID=$!
  unset PYTHONPATH
  say "$SERVER starting (pid $SPID): ${cmd[*]}"
  local ok=0
  while [ "$(left)" -gt $(( STOP_RESERVE_S + 60 )) ]; do
    if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
      ok=1; break
    fi
    alive "$SPID" || break
    sleep 2
  done
  if [ $ok = 1 ]; then
    say "$SERVER healthy after $(( $(date +%s) - t )) s"
    bench warmup 101 400 32 "${WARM_T:-150}"
    bench inf 202 400 128 "${BENCH_T:-200}"
    bench c64 303 256 128 "${BENCH_T:-200}" --max-concurrency 64 --num-warmups 64
  else
    say "$SERVER NOT healthy after $(( $(date +%s) - t )) s (alive: $(alive "$SPID" && echo yes || echo no)); log tail:"
    tail -25 "$SLOG" | cut -c1-300 | tee -a "$LOG"
    FAILED+=("$SERVER")
  fi
  stop_server
  grep -hE "Traceback|Error|ERROR" "$SLOG" | head -5 | cut -c1-300 | tee -a "$LOG"
}

SKIPPED=() FAILED=()
for s in $SERVERS; do
  case $s in vllm|engine) run_server "$s" ;; *) say "unknown server $s (vllm, engine)"; FAILED+=("$s") ;; esac
done
trap - EXIT

PYTHONPATH=$REPO python3 "$REPO/benchmarks/compare_vllm.py" "$WORKDIR" > "$WORKDIR/table.md" 2>> "$LOG"
cat "$WORKDIR/table.md"
cp "$WORKDIR"/"${TOPO}"_*_inf.json "$WORKDIR"/"${TOPO}"_*_c64.json "$WORKDIR/table.md" "$OUTD"/ 2>/dev/null
tar -czf "$OUTD/logs.tar.gz" -C "$WORKDIR" --exclude '*.json' . 2>/dev/null
say "done; skipped: ${SKIPPED[*]:-none}; failed: ${FAILED[*]:-none}; files in $OUTD: $(cd "$OUTD" && echo *)"
[ ${#FAILED[@]} -eq 0 ]
