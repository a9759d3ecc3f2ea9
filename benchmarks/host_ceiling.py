"""The built-in engine's host ceiling: output tokens/s its Python side sustains when the model costs ~nothing.

Issue 8: once decode steps replay CUDA graphs, what is left per step is host work that no GPU
hides: the engine core's loop (schedule, the per-step exchange between DP ranks, postprocess,
pickling outputs to the API servers) and the API server (unpickle, route to the request, build
and stream one SSE event per token). This serves ``epkit-tiny-moe`` shrunk to one layer of width
64 (``--hf-overrides``), so a step's model time is small, drives it with ``epkit bench`` at a
concurrency ladder, and reads each process's CPU time from ``/proc`` before and after every run:
CPU microseconds per output token, per process kind. ``1e6 / (µs per token)`` is the tokens/s one
such process could carry if it had a core to itself.

    python benchmarks/host_ceiling.py --dp 1 --concurrency 16,64,256 --output-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MICRO = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2}
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--api-server-count", type=int, default=1)
    ap.add_argument("--concurrency", default="16,64,256")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompts-per-stream", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    port, rpc = free_port(), free_port()
    log_path = Path(tempfile.mkdtemp()) / "serve.log"
    cmd = [sys.executable, "-m", "epkit.engine.cli", "epkit-tiny-moe", "--hf-overrides", json.dumps(MICRO),
           "--port", str(port), "--data-parallel-rpc-port", str(rpc), "-dp", str(args.dp),
           "--api-server-count", str(args.api_server_count), "--max-num-seqs", "512", "--max-model-len", "1024",
           "--kv-cache-memory-bytes", str(256 * 2**20), "--device", "cpu"]
    if args.dp > 1:
        cmd.append("--enable-expert-parallel")
    server = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    rows = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        started = re.search(r"started (.*) \(pids (.*)\)", log_path.read_text())
        names, pids = started.group(1).split(", "), [int(p) for p in started.group(2).split(", ")]
        kinds = {pid: ("engine core" if n.startswith("EngineCore") else "API server") for n, pid in zip(names, pids)}
        from epkit.bench import load_result
        from epkit.bench.cli import main as bench_main

        out_dir = Path(tempfile.mkdtemp())
        for c in [int(x) for x in args.concurrency.split(",")]:
            before = {pid: cpu_s(pid) for pid in pids}
            t0 = time.perf_counter()
            name = f"c{c}.json"
            assert bench_main(["--base-url", f"http://127.0.0.1:{port}", "--model", "epkit-tiny-moe",
                               "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                               "--num-prompts", str(args.prompts_per_stream * c), "--max-concurrency", str(c),
                               "--ignore-eos", "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
                               "--disable-tqdm"]) == 0
            wall = time.perf_counter() - t0
            used = {pid: cpu_s(pid) - before[pid] for pid in pids}
            res = json.loads((out_dir / name).read_text())
            tokens = res["total_output_tokens"]
            row = {"dp": args.dp, "api_servers": args.api_server_count, "concurrency": c, "output_tok_s": res["output_throughput"],
                   "median_itl_ms": res["median_itl_ms"], "wall_s": round(wall, 1), "tokens": tokens}
            for kind in ("engine core", "API server"):
                cpu = sum(v for pid, v in used.items() if kinds[pid] == kind)
                row[f"{kind} cpu_us_per_token"] = round(cpu / tokens * 1e6, 1)
                row[f"{kind} cpu_share"] = round(cpu / wall, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del load_result
    finally:
        server.terminate()
        server.wait(60)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\n| DP | API servers | concurrency | output tok/s | median ITL ms | engine core µs/token (CPU share) | "
          f"API server µs/token (CPU share) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dp']} | {r['api_servers']} | {r['concurrency']} | {r['output_tok_s']:.0f} | {r['median_itl_ms']:.2f} | "
              f"{r['engine core cpu_us_per_token']} ({r['engine core cpu_share']}) | "
              f"{r['API server cpu_us_per_token']} ({r['API server cpu_share']}) |")


if __name__ == "__main__":
    main()
