"""How much does `epkit bench` add to TTFT? Old client, new client and a raw-socket client, same server, same run.

The paced server (``epkit.bench.stream_server``, pinned to its own core) sends every stream's
first token ``--ttft-ms`` after it read the request and logs, on the shared CLOCK_MONOTONIC,
when it read each request (``recv_s``) and wrote each token (``token_s``). Three clients, each
one process pinned to another core, run the same closed-loop workload (``--max-concurrency N``,
``max(N × --rounds, --min-requests)`` requests, vLLM's random sampler):

- ``raw``: a few lines of non-blocking sockets and ``selectors``, no asyncio, no HTTP
  library; it stamps a request just before ``send`` and a chunk just after ``select``
  returns — the floor any Python client on this machine can reach;
- ``old``: ``epkit bench`` of ``--old REV`` (that commit's ``epkit`` package, extracted with
  ``git archive`` and put first on ``PYTHONPATH``; or a folder holding an ``epkit`` package);
- ``new``: ``epkit bench`` of this working tree.

Runs alternate (raw, old, new, then rotated) ``--reps`` times per concurrency, so load from
other jobs on a shared box hits all three alike; ``--nice -10`` runs them ahead of other jobs,
``--server-rt`` runs the server at real-time priority without spinning (it sleeps between
deadlines, so it holds no core), which keeps other jobs from delaying its reads and writes.
Per request, against the server's clock: ``overhead = client TTFT − (server first-token
write − server read)`` = send lag (client stamp → server read) + receive lag (server write →
client stamp): the client's own share, free of the server's lateness. Reported: median client
TTFT, its excess over the raw client's, and median overhead, send and receive lags (medians
over the requests of a run, then the median over its repetitions).

    .venv/bin/python benchmarks/client_ttft.py --nice -10 --server-rt --old bd5664e --out /tmp/client_ttft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the raw-socket client
def raw_client(url: str, concurrency: int, requests_file: str, out: str) -> None:
    """Closed loop over ``concurrency`` keep-alive sockets sending the bodies in ``requests_file``
    in order; writes {request_id: [send, first token chunk, end]} (perf_counter seconds)."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname, u.port
    bodies = [b.encode() for b in json.loads(Path(requests_file).read_text())]
    n = len(bodies)
    clock = time.perf_counter
    sel = selectors.DefaultSelector()
    times: dict[str, list[float]] = {}
    state: dict[socket.socket, dict] = {}
    next_i = 0

    def start(sock: socket.socket | None) -> None:
        nonlocal next_i
        rid, body = f"raw-{next_i}", bodies[next_i]
        next_i += 1
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"x-request-id: {rid}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        send_s = clock()
        if sock is None:  # connect inside the timed request, as HTTP clients do on first use
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head + body)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        else:
            sock.setblocking(True)
            sock.sendall(head + body)
            sock.setblocking(False)
        state[sock] = {"rid": rid, "buf": b"", "first": None}
        times[rid] = [send_s]

    for _ in range(min(concurrency, n)):
        start(None)
    while state:
        for key, _ in sel.select():
            now = clock()
            sock = key.fileobj
            st = state[sock]
            data = sock.recv(1 << 16)
            if not data:
                raise RuntimeError(f"server closed the connection during {st['rid']}")
            st["buf"] += data
            if st["first"] is None and b'"choices":[{' in st["buf"]:
                st["first"] = now
            if st["buf"].endswith(b"\r\n0\r\n\r\n"):
                times[st["rid"]] += [st["first"], now]
                del state[sock]
                if next_i < n:
                    start(sock)
                else:
                    sel.unregister(sock)
                    sock.close()
    Path(out).write_text(json.dumps(times))


# ---------------------------------------------------------------- the harness
def extract_old(rev: str, into: Path) -> Path:
    if (Path(rev) / "epkit" / "bench").is_dir():  # a tree to compare with, not a revision
        return Path(rev).resolve()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "epkit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


NICE: list[str] = []  # ["nice", "-n", "-10"] with --nice: other jobs on a shared box wait, not the measurement


def start_server(ttft_ms: float, itl_ms: float, core: int, rt: bool) -> tuple[subprocess.Popen, str]:
    # --server-rt: real-time priority, sleeping between deadlines (no spin: it would hold the core):
    # other jobs on a shared box then delay neither its reads nor its writes.
    prio = ["chrt", "-f", "10"] if rt else NICE
    proc = subprocess.Popen([*prio, "taskset", "-c", str(core), sys.executable, "-m", "epkit.bench.stream_server",
                             "--port", "0", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms),
                             *(["--no-spin"] if rt else [])],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, proc.stdout.readline().split()[-1]


def server_log(url: str) -> dict[str, dict]:
    req = urllib.request.Request(url + "/debug/requests", method="DELETE")
    return {e["request_id"]: e for e in json.load(urllib.request.urlopen(req))}


def run_client(client: str, url: str, conc: int, args, d: Path, old_tree: Path | None) -> dict[str, list[float]]:
    """Run one client process; return {request_id: [send, first chunk, end]} in absolute perf_counter s."""
    n = max(conc * args.rounds, args.min_requests)
    pin = [*NICE, "taskset", "-c", str(args.client_core)]
    if client == "raw":
        # The very requests epkit sends: same sampler, same seed, request k is sample k.
        sys.path.insert(0, str(ROOT))
        from epkit.bench import RandomWorkload
        from epkit.bench.client import ClientConfig, encode_body

        cfg = ClientConfig(url, "m")
        samples = RandomWorkload(num_prompts=n, input_len=args.input_len, output_len=args.output_len,
                                 range_ratio=args.range_ratio, seed=0).sample()
        reqs, out = d / "raw-requests.json", d / "raw.json"
        reqs.write_text(json.dumps([encode_body(cfg, s).decode() for s in samples]))
        subprocess.run([*pin, sys.executable, __file__, "--raw-client", url, str(conc), str(reqs), str(out)],
                       check=True, cwd=ROOT)
        return json.loads(out.read_text())
    tree = old_tree if client == "old" else ROOT
    out = d / f"{client}.json"
    cmd = [*pin, sys.executable, "-c", "import sys; from epkit.bench.cli import main; sys.exit(main(sys.argv[1:]))",
           "--base-url", url, "--model", "m", "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio", str(args.range_ratio), "--num-prompts", str(n), "--max-concurrency", str(conc),
           "--ignore-eos", "--save-result", "--result-dir", str(d), "--result-filename", out.name,
           "--request-rate", str(args.request_rate)]
    if args.disable_tqdm:
        cmd.append("--disable-tqdm")
    # The progress bar stays on unless asked (what a user runs); it writes to a file here.
    with open(d / f"{client}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=log, cwd=d,
                       env={**os.environ, "PYTHONPATH": str(tree)})
    sys.path.insert(0, str(ROOT))
    from epkit.bench import load_result

    res = load_result(out)
    t0 = res.meta["t0_perf_counter_s"]
    return {f"epkit-{r.index}": [t0 + r.send_s, t0 + r.chunk_s[0], t0 + r.end_s, t0 + r.scheduled_s]
            for r in res.requests.itertuples() if r.success}


def measure(times: dict[str, list[float]], log: dict[str, dict], conc: int) -> dict:
    ttft, send_lag, recv_lag, server_ttft, first_round, late = [], [], [], [], [], []
    for rid, (send, first, _end, *scheduled) in times.items():
        late += [(send - scheduled[0]) * 1e3] if scheduled else []
        e = log[rid]
        ttft.append((first - send) * 1e3)
        send_lag.append((e["recv_s"] - send) * 1e3)
        recv_lag.append((first - e["token_s"][0]) * 1e3)
        server_ttft.append((e["token_s"][0] - e["recv_s"]) * 1e3)
        if int(rid.rsplit("-", 1)[1]) < conc:  # the opening burst: conc requests due at once
            first_round.append(ttft[-1] - server_ttft[-1])
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"requests": len(ttft), "ttft_ms": med(ttft), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "server_ttft_ms": med(server_ttft), "overhead_ms": med(np.subtract(ttft, server_ttft)),
            "send_lag_ms": med(send_lag), "recv_lag_ms": med(recv_lag), "first_round_overhead_ms": med(first_round),
            "send_after_due_ms": med(late) if late else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", default=None, help="git revision (or a folder holding an epkit package) that is the 'old' client")
    p.add_argument("--clients", nargs="+", default=["raw", "old", "new"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--ttft-ms", type=float, default=80.0)
    p.add_argument("--itl-ms", type=float, default=5.0)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len × (1 − r), len × (1 + r)] (vLLM's random dataset)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals at this rate (req/s) under the concurrency cap; the raw client is closed-loop "
                        "only and is left out then")
    p.add_argument("--rounds", type=int, default=10, help="requests per concurrency slot")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per concurrency")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--nice", type=int, default=None, help="run server and clients at this niceness (e.g. -10, root)")
    p.add_argument("--server-rt", action="store_true", help="server at SCHED_FIFO priority 10, no spin (root)")
    p.add_argument("--min-requests", type=int, default=64, help="at least this many requests per run")
    p.add_argument("--out", default="client_ttft.json")
    p.add_argument("--raw-client", nargs=4, metavar=("URL", "CONC", "REQUESTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw_client:
        url, conc, reqs, out = args.raw_client
        raw_client(url, int(conc), reqs, out)
        return 0
    if args.nice is not None:
        NICE[:] = ["nice", "-n", str(args.nice)]
    if args.request_rate != float("inf"):
        args.clients = [c for c in args.clients if c != "raw"]
    if "old" in args.clients and not args.old:
        sys.exit("--old REV is needed for the 'old' client")
    d = Path(tempfile.mkdtemp(prefix="client-ttft-"))
    old_tree = extract_old(args.old, d / "old") if "old" in args.clients else None
    load_before = os.getloadavg()
    proc, url = start_server(args.ttft_ms, args.itl_ms, args.server_core, args.server_rt)
    rows = []
    try:
        for conc in args.concurrency:
            for rep in range(args.reps):
                k = rep % len(args.clients)
                for client in args.clients[k:] + args.clients[:k]:
                    server_log(url)  # clear
                    times = run_client(client, url, conc, args, d, old_tree)
                    row = {"client": client, "concurrency": conc, "rep": rep,
                           **measure(times, server_log(url), conc)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "commit": _git("rev-parse", "--short", "HEAD"),
               "old": args.old}
    Path(args.out).write_text(json.dumps({"machine": machine, "argv": sys.argv, "rows": rows}, indent=1))
    print(f"\nmachine: {machine}\n")
    print(table(rows, args.clients))
    return 0


def table(rows: list[dict], clients: list[str]) -> str:
    """Medians over the repetitions, per concurrency and client."""
    lines = ["| concurrency | client | TTFT ms | − raw ms | overhead vs server log ms | send lag ms | "
             "receive lag ms | opening burst: overhead ms | sent after due ms | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for conc in sorted({r["concurrency"] for r in rows}):
        def agg(client, key):
            v = [r[key] for r in rows if r["client"] == client and r["concurrency"] == conc and r.get(key) is not None]
            return float(np.median(v)) if v else float("nan")
        raw = agg("raw", "ttft_ms") if "raw" in clients else float("nan")
        for c in clients:
            n = sum(1 for r in rows if r["client"] == c and r["concurrency"] == conc)
            lines.append(f"| {conc} | {c} | {agg(c, 'ttft_ms'):.2f} | {agg(c, 'ttft_ms') - raw:+.2f} | "
                         f"{agg(c, 'overhead_ms'):.2f} | {agg(c, 'send_lag_ms'):.2f} | {agg(c, 'recv_lag_ms'):.2f} | "
                         f"{agg(c, 'first_round_overhead_ms'):.2f} | {agg(c, 'send_after_due_ms'):.2f} | {n} |")
    return "\n".join(lines)


def _git(*a: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a benchmark's results."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
