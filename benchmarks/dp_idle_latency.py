"""Latency of a DP=2 engine at a low Poisson rate, and the CPU its idle engine cores burn (issue 19).

At low load most of the time no rank has work. Each variant is `epkit serve epkit-tiny-moe -dp 2
--enable-expert-parallel` on this machine's CPU (one API server, ``EPKIT_CPU_THREADS=1``), driven by
`epkit bench`'s API at ``--rate`` req/s (Poisson), short random prompts and outputs (``ignore_eos``). Two
variants run back to back, alternating over ``--reps``: ``before`` is the engine of ``--before REV``
(``git archive`` of that commit, put first on ``PYTHONPATH``), ``after`` this working tree. Before
each bench run, the engine has sat idle for ``--settle`` s; then the CPU time of its engine-core
processes (utime + stime from /proc/<pid>/stat) is read over ``--idle-window`` s: the cost of idling.

    .venv/bin/python benchmarks/dp_idle_latency.py --before cd5acc7 --reps 2 --out /tmp/dp_idle.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLK_TCK = os.sysconf("SC_CLK_TCK")


def extract(rev: str, into: Path) -> Path:
    """The ``epkit`` package of commit ``rev``, extracted under ``into``; the folder to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "epkit"], check=True, capture_output=True).stdout
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into / "src")
    return into / "src"


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry))
    return out


def engine_cores(launcher: int, dp_local: int = 2) -> list[int]:
    """The engine-core processes under ``launcher``: the fork server's first ``dp_local`` children (the launcher
    starts the cores before the API servers)."""
    for p in children(launcher):
        try:
            text = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "forkserver" in text:
            return sorted(children(p))[:dp_local]
    raise RuntimeError(f"no fork server under pid {launcher}")


def cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def serve(pythonpath: Path, port: int, rpc_port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), PYTHONUNBUFFERED="1", EPKIT_CPU_THREADS="1")
    args = [sys.executable, "-m", "epkit.engine.cli", "epkit-tiny-moe", "-dp", "2", "--enable-expert-parallel",
            "--api-server-count", "1", "--port", str(port), "--data-parallel-rpc-port", str(rpc_port),
            "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20), "--startup-timeout", "120"]
    where = subprocess.run([sys.executable, "-c", "import epkit; print(epkit.__file__)"], cwd=pythonpath, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).is_relative_to(pythonpath):  # the variant must run its own engine, not the venv's
        raise RuntimeError(f"epkit imports from {where}, not from {pythonpath}")
    return subprocess.Popen(args, cwd=pythonpath, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200 and "epkit serve ready" in log.read_text():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("not ready:\n" + log.read_text()[-2000:])


def one_run(name: str, pythonpath: Path, a: argparse.Namespace, tmp: Path) -> list[dict]:
    from epkit.bench.datasets import make_workload
    from epkit.bench.runner import run
    from epkit.launch.local import free_port

    port, rpc = free_port("127.0.0.1"), free_port("127.0.0.1")
    log = tmp / f"{name}-{port}.log"
    proc = serve(pythonpath, port, rpc, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        httpx.post(url + "/v1/completions", json={"model": "epkit-tiny-moe", "prompt": "warm up", "max_tokens": 4},
                   timeout=60)
        time.sleep(a.settle)
        cores = engine_cores(proc.pid)
        c0 = cpu_s(cores)
        time.sleep(a.idle_window)
        idle_cpu = (cpu_s(cores) - c0) / a.idle_window
        workload = make_workload("random", num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
                                 range_ratio=0.0, prefix_len=0, vocab_size=256, seed=a.seed)
        results = {rate: run(url, "epkit-tiny-moe", workload, request_rate=rate, ignore_eos=True, seed=a.seed,
                             progress=False).metrics for rate in a.rate}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    keys = ("completed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
            "mean_e2el_ms")
    rows = [{"variant": name, "rate": rate, "engine_cores": len(cores), "idle_core_cpu_frac": idle_cpu,
             **{k: m.get(k) for k in keys}} for rate, m in results.items()]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision of the engine before the change")
    p.add_argument("--rate", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 2.0],
                   help="Poisson rates in req/s, comma list, each on the same deployment (default 0.5,2)")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--settle", type=float, default=3.0, help="idle seconds before the CPU window")
    p.add_argument("--idle-window", type=float, default=5.0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        variants = {"before": extract(a.before, tmp), "after": ROOT}
        order = list(variants)
        rows = []
        for rep in range(a.reps):
            for name in order if rep % 2 == 0 else order[::-1]:
                rows.extend({"rep": rep, **row} for row in one_run(name, variants[name], a, tmp))
    summary = {}
    for name in variants:
        for rate in a.rate:
            mine = [r for r in rows if r["variant"] == name and r["rate"] == rate]
            summary[f"{name} rate={rate:g}"] = {k: float(np.median([r[k] for r in mine])) for k in mine[0]
                                                if k not in ("variant", "rep", "rate")}
    print(json.dumps({"median_over_reps": summary}, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows, "median_over_reps": summary}, indent=1))


if __name__ == "__main__":
    main()
