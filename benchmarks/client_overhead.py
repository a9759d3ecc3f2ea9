"""How many streamed tokens/s can one client process on one core take while its timestamps stay true?

A paced streaming server (``epkit.bench.stream_server``, pinned to its own core) sends every
stream's tokens ``--itl-ms`` apart (0: as fast as it can) and logs the CLOCK_MONOTONIC time
at which it wrote each token. Each client (``epkit bench`` and ``vllm bench serve``, pinned
to one other core, one process) runs the same random workload at rising numbers of parallel
streams; its per-token arrival times come from its saved per-request data (epkit's Parquet
table; vLLM's ``--save-detailed`` start_times + ttfts + itls, also CLOCK_MONOTONIC). The
timing error of a token is client arrival - server write. The answer is the highest
streamed tokens/s at which the median error stays under 1 ms (p99 shown too).

    .venv/bin/python benchmarks/client_overhead.py --out /tmp/client_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epkit.bench import load_result  # noqa: E402
from epkit.bench.stream_server import write_byte_tokenizer  # noqa: E402


def vllm_exe() -> Path | None:
    py = os.environ.get("EPKIT_VLLM_PYTHON")
    venv = Path(py).parent.parent if py else Path(os.environ.get("EPKIT_VLLM_VENV",
                                                                 Path.home() / ".cache/epkit/vllm-venv"))
    exe = venv / "bin" / "vllm"
    return exe if exe.exists() else None


NICE: list[str] = []  # ["nice", "-n", "-10"] with --nice: other jobs on a shared box wait, not the measurement


def start_server(itl_ms: float, core: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([*NICE, "taskset", "-c", str(core), sys.executable, "-m", "epkit.bench.stream_server",
                             "--port", "0", "--ttft-ms", "10", "--itl-ms", str(itl_ms), "--no-spin"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return proc, proc.stdout.readline().split()[-1]


def server_log(url: str) -> dict[str, list[float]]:
    req = urllib.request.Request(url + "/debug/requests", method="DELETE")
    return {e["request_id"]: e["token_s"] for e in json.load(urllib.request.urlopen(req))}


def errors_ms(arrivals: dict[str, np.ndarray], sent: dict[str, list[float]]) -> np.ndarray:
    out = []
    for rid, arr in arrivals.items():
        s = np.asarray(sent[rid])
        n = min(len(s), len(arr))
        out.append((arr[:n] - s[:n]) * 1e3)
    return np.concatenate(out)


def run_epkit(url: str, args, conc: int, n: int, d: Path) -> tuple[dict, dict]:
    out = d / "epkit.json"
    cmd = [*NICE, "taskset", "-c", str(args.client_core), str(ROOT / ".venv/bin/epkit"), "bench", "--base-url", url,
           "--model", "m", "--dataset-name", "random", "--random-input-len", "16", "--random-output-len",
           str(args.output_len), "--num-prompts", str(n), "--max-concurrency", str(conc), "--ignore-eos",
           "--save-result", "--result-dir", str(d), "--result-filename", out.name, "--disable-tqdm"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    res = load_result(out)
    t0 = res.meta["t0_perf_counter_s"]
    arrivals = {f"epkit-{r.index}": t0 + np.asarray(r.chunk_s) for r in res.requests.itertuples()}
    return res.metrics, arrivals


def run_vllm(url: str, args, conc: int, n: int, d: Path, tok: Path) -> tuple[dict, dict]:
    out = d / "vllm.json"
    cmd = [*NICE, "taskset", "-c", str(args.client_core), str(vllm_exe()), "bench", "serve", "--backend", "openai",
           "--base-url", url, "--endpoint", "/v1/completions", "--model", "m", "--tokenizer", str(tok),
           "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", str(args.output_len),
           "--num-prompts", str(n), "--max-concurrency", str(conc), "--ignore-eos", "--save-result",
           "--save-detailed", "--result-dir", str(d), "--result-filename", out.name, "--disable-tqdm",
           "--request-id-prefix", "vllm-"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"})
    m = json.loads(out.read_text())
    arrivals = {f"vllm-{i}": st + ttft + np.concatenate([[0.0], np.cumsum(itl)])
                for i, (st, ttft, itl, err) in enumerate(zip(m["start_times"], m["ttfts"], m["itls"], m["errors"]))
                if not err}
    return m, arrivals


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--itl-ms", type=float, nargs="+", default=[5.0, 0.0], help="server token gap; 0 = ASAP")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream slot")
    p.add_argument("--clients", nargs="+", default=["epkit", "vllm"])
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--out", default="client_overhead.json")
    p.add_argument("--nice", type=int, default=None, help="run server and clients at this niceness (e.g. -10, root)")
    args = p.parse_args()
    if args.nice is not None:
        NICE[:] = ["nice", "-n", str(args.nice)]
    if "vllm" in args.clients and vllm_exe() is None:
        sys.exit("no vLLM venv: run scripts/vllm_venv.sh or pass --clients epkit")
    load_before = os.getloadavg()
    d = Path(tempfile.mkdtemp(prefix="client-overhead-"))
    tok = write_byte_tokenizer(d / "tok")
    rows = []
    for itl in args.itl_ms:
        proc, url = start_server(itl, args.server_core)
        try:
            for conc in args.concurrency:
                for client in args.clients:
                    server_log(url)
                    n = conc * args.rounds
                    m, arr = run_epkit(url, args, conc, n, d) if client == "epkit" else run_vllm(url, args, conc, n, d, tok)
                    err = errors_ms(arr, server_log(url))
                    row = {"client": client, "itl_ms": itl, "concurrency": conc, "completed": m["completed"],
                           "tokens": int(m["total_output_tokens"]), "duration_s": m["duration"],
                           "tok_s": m["total_output_tokens"] / m["duration"],
                           "offered_tok_s": conc * 1e3 / itl if itl else None,
                           "err_p50_ms": float(np.median(err)), "err_p99_ms": float(np.percentile(err, 99)),
                           "err_max_ms": float(err.max()), "median_itl_ms": m["median_itl_ms"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait()
    machine = {"loadavg_before": load_before, "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M")}
    machine["loadavg_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps({"machine": machine, "argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nmachine: {machine}\n")
    print("| server ITL ms | streams | offered tok/s | client | tokens/s | err p50 ms | err p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        offered = f"{r['offered_tok_s']:.0f}" if r["offered_tok_s"] else "as fast as possible"
        print(f"| {r['itl_ms']:g} | {r['concurrency']} | {offered} | {r['client']} | {r['tok_s']:.0f} | "
              f"{r['err_p50_ms']:.2f} | {r['err_p99_ms']:.2f} |")
    for client in args.clients:
        good = [r for r in rows if r["client"] == client and r["err_p50_ms"] < 1.0]
        best = max(good, key=lambda r: r["tok_s"]) if good else None
        print(f"{client}: highest tokens/s with median timing error < 1 ms: "
              f"{best['tok_s']:.0f} (ITL {best['itl_ms']:g} ms, {best['concurrency']} streams)" if best else
              f"{client}: never under 1 ms")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
