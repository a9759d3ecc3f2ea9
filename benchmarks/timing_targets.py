"""Absolute-time targets that used to be test assertions, measured here (issue 15, section 6).

On a shared 2-core box such numbers pass or fail with the machine's load, so the tests now assert
only relations that hold under any load (tests/bench/test_accuracy.py, test_load.py,
tests/eplb/test_policies.py, tests/engine/test_lifecycle.py); the targets themselves live here:

- client accuracy against the paced server (TTFT 40 ms, ITL 8 ms, 40 requests, 2 at a time):
  |median − set| < 1 ms for TTFT (net of the send-to-read transit in the server's log), ITL and
  TPOT, both endpoints; median chunk-arrival error (client stamp − server write) < 1 ms;
- arrival schedule: 20 requests at 40 req/s, constant gaps: median gap 25 ± 2 ms, last send at
  0.5 s ± 5 ms; a 1 s duration limit at 2 slots of ≥ 50 ms requests: 25–45 requests, every send
  before 1 s, duration < 1.2 s;
- the default EPLB policy at DeepSeek-V3 scale (58 × 256 experts, 288 slots, 32 ranks in 4
  nodes): best of 3 < 100 ms;
- ``epkit serve`` rejects a bad flag (exit 2) in < 30 s.

    .venv/bin/python benchmarks/timing_targets.py [--nice -10] [--out /tmp/timing_targets.json]

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epkit.bench import RandomWorkload, run  # noqa: E402
from epkit.bench.stream_server import write_byte_tokenizer  # noqa: E402
from client_ttft import cpu_model  # noqa: E402  (this folder is on sys.path when a benchmark runs as a script)

ROWS: list[dict] = []


def record(target: str, value: float, low: float, high: float, unit: str) -> None:
    value = float(value)
    row = {"target": target, "value": value, "low": low, "high": high, "unit": unit, "met": bool(low <= value <= high)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "epkit.bench.stream_server", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.url = self.proc.stdout.readline().split()[-1]

    def log(self) -> list[dict]:
        return json.load(urllib.request.urlopen(urllib.request.Request(self.url + "/debug/requests", method="DELETE")))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def client_accuracy(tok_dir: str) -> None:
    ttft, itl, out, n = 40.0, 8.0, 16, 40
    server = Server("--ttft-ms", str(ttft), "--itl-ms", str(itl))
    try:
        for endpoint in ("/v1/completions", "/v1/chat/completions"):
            server.log()
            r = run(server.url, "m", RandomWorkload(num_prompts=n, input_len=64, output_len=out), endpoint=endpoint,
                    tokenizer=tok_dir if "chat" in endpoint else None, max_concurrency=2, progress=False)
            log = {e["request_id"]: e for e in server.log()}
            t0, m = r.meta["t0_perf_counter_s"], r.metrics
            transit = np.median([(log[f"epkit-{q.index}"]["recv_s"] - t0 - q.send_s) * 1e3
                                 for q in r.requests.itertuples()])
            err = np.concatenate([(t0 + np.asarray(q.chunk_s) - np.asarray(log[f"epkit-{q.index}"]["token_s"])) * 1e3
                                  for q in r.requests.itertuples()])
            name = "chat" if "chat" in endpoint else "completions"
            record(f"{name}: median TTFT − transit − {ttft:g} ms", m["median_ttft_ms"] - transit - ttft, -1, 1, "ms")
            record(f"{name}: median ITL − {itl:g} ms", m["median_itl_ms"] - itl, -1, 1, "ms")
            record(f"{name}: median TPOT − {itl:g} ms", m["median_tpot_ms"] - itl, -1, 1, "ms")
            record(f"{name}: median chunk arrival − server write", float(np.median(err)), 0, 1, "ms")
    finally:
        server.stop()


def arrival_schedule() -> None:
    server = Server("--ttft-ms", "5", "--itl-ms", "1")
    try:
        r = run(server.url, "m", RandomWorkload(num_prompts=20, input_len=8, output_len=4), request_rate=40.0,
                burstiness=math.inf, progress=False)
        sends = np.sort(r.requests["send_s"].to_numpy())
        record("rate 40 req/s: median gap between sends", float(np.median(np.diff(sends))) * 1e3, 23, 27, "ms")
        record("rate 40 req/s: last of 20 sent at", sends[-1] * 1e3, 495, 505, "ms")
    finally:
        server.stop()
    server = Server("--ttft-ms", "5", "--itl-ms", "5")
    try:
        r = run(server.url, "m", RandomWorkload(num_prompts=5, input_len=8, output_len=10), max_concurrency=2,
                duration_s=1.0, progress=False)
        record("duration 1 s, 2 slots, 50 ms requests: completed", r["completed"], 25, 45, "requests")
        record("duration 1 s: last send", r.requests["send_s"].max() * 1e3, 0, 1000, "ms")
        record("duration 1 s: run duration", r["duration"] * 1e3, 1000, 1200, "ms")
    finally:
        server.stop()


def eplb_default_policy() -> None:
    from epkit.eplb import popularity, rebalance

    load = popularity(58, 256, "zipf", 1.0, np.random.default_rng(7)) * 8192 * 8
    rebalance(load, 288, 8, 4, 32)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        rebalance(load, 288, 8, 4, 32)
        times.append(time.perf_counter() - start)
    record("EPLB default policy, 58 x 256 experts, 32 ranks: best of 3", min(times) * 1e3, 0, 100, "ms")


def serve_rejects_bad_flags() -> None:
    for args in (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config", '{"window_size": 0}'],
                 ["--hf-overrides", "[1]"], ["no-such-model"]):
        start = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "epkit.engine.cli", *args], cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - start
        record(f"epkit serve {' '.join(args)[:40]}: exit {p.returncode} (2 expected) after", took if p.returncode == 2
               else math.inf, 0, 30, "s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nice", type=int, default=None, help="run at this niceness (e.g. -10, root)")
    p.add_argument("--out", default="timing_targets.json")
    args = p.parse_args()
    if args.nice is not None:
        os.nice(args.nice)  # children (servers, epkit serve) inherit it
    load_before = os.getloadavg()
    import tempfile

    tok_dir = str(write_byte_tokenizer(Path(tempfile.mkdtemp(prefix="timing-targets-")) / "tok"))
    client_accuracy(tok_dir)
    arrival_schedule()
    eplb_default_policy()
    serve_rejects_bad_flags()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"machine": machine, "argv": sys.argv, "rows": ROWS}, indent=1))
    print(f"\nmachine: {machine}\n\n| target | measured | allowed | met |\n|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['target']} | {r['value']:.3g} {r['unit']} | [{r['low']:g}, {r['high']:g}] | "
              f"{'yes' if r['met'] else 'NO'} |")
    return 0 if all(r["met"] for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
