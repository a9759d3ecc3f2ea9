"""ITL of running decodes while long prompts prefill, with and without --long-prefill-token-threshold (issue 19).

`epkit serve epkit-tiny-moe` (DP=1, this machine's CPU, ``EPKIT_CPU_THREADS=1``) serves ``--decoders`` streams
(8-token prompts, ``--output-len`` tokens, ``ignore_eos``) while, every ``--gap`` s, a long prompt of
``--long-len`` random tokens (one output token) arrives. Per setting (none, then each threshold given) one
deployment, back to back; reported: the decoders' inter-token latencies (mean, p99, max) and the long prompts' TTFT.

    .venv/bin/python benchmarks/long_prefill_itl.py --thresholds 32,64 --out /tmp/long_prefill_itl.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "epkit-tiny-moe"


def stream(url: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Arrival times (perf_counter) of the streamed chunks; the request's start first."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}
    times = [time.perf_counter()]
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                times.append(time.perf_counter())
    return times


def one_setting(threshold: int, a: argparse.Namespace, tmp: Path) -> dict:
    from epkit.launch.local import free_port

    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    knobs = ["--long-prefill-token-threshold", str(threshold)] if threshold else []
    log = tmp / f"serve-{threshold}.log"
    env = dict(os.environ, EPKIT_CPU_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "epkit.engine.cli", MODEL, "--port", str(port), "--max-model-len",
                             "1024", "--kv-cache-memory-bytes", str(128 * 2**20), "--data-parallel-rpc-port",
                             str(free_port("127.0.0.1")), "--no-enable-prefix-caching", *knobs], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.3)
        stream(url, [5, 6, 7], 4)  # warm up
        rng = random.Random(0)
        decodes: list[list[float]] = []
        longs: list[list[float]] = []

        def decoder(j: int) -> None:
            decodes.append(stream(url, [9 + j] * 8, a.output_len))

        threads = [threading.Thread(target=decoder, args=(j,)) for j in range(a.decoders)]
        for t in threads:
            t.start()
        time.sleep(a.gap)
        while any(t.is_alive() for t in threads) and len(longs) < a.max_long:
            longs.append(stream(url, [rng.randrange(3, 250) for _ in range(a.long_len)], 1))
            time.sleep(a.gap)
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    itl = np.concatenate([np.diff(t[1:]) * 1e3 for t in decodes])
    ttft = np.array([(t[1] - t[0]) * 1e3 for t in longs])
    row = {"long_prefill_token_threshold": threshold, "long_prompts": len(longs), "itl_mean_ms": float(itl.mean()),
           "itl_p99_ms": float(np.percentile(itl, 99)), "itl_max_ms": float(itl.max()),
           "long_ttft_mean_ms": float(ttft.mean()) if len(ttft) else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--thresholds", type=lambda t: [int(x) for x in t.split(",")], default=[32, 64])
    p.add_argument("--decoders", type=int, default=6)
    p.add_argument("--output-len", type=int, default=600)
    p.add_argument("--long-len", type=int, default=800)
    p.add_argument("--gap", type=float, default=0.3, help="seconds between long prompts")
    p.add_argument("--max-long", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = [one_setting(t, a, Path(d)) for t in [0, *a.thresholds]]
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
