"""Cross-check with a client nobody here wrote: `vllm bench serve` from the pinned vLLM venv.

Both clients drive the same server with the same workload, interleaved (vLLM, epkit, vLLM,
epkit); their headline numbers must agree within the run-to-run spread. The run also
proves the metric definitions identical: epkit's metrics recomputed from vLLM's own
per-request data (``--save-detailed``) equal the numbers vLLM printed.

Targets: "engine" (the built-in engine, ``epkit serve epkit-tiny-moe``) and "stream" (the
paced test server, set TTFT and ITL, whose send log also measures each client's send cost).
EPKIT_BENCH_TARGET=engine (or stream) runs one of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from epkit.bench import RandomWorkload, load_result, load_vllm_result
from epkit.bench.result import VLLM_DETAILED, epkit_only_keys
from epkit.bench.cli import main as bench_main

TARGETS = [t for t in os.environ.get("EPKIT_BENCH_TARGET", "engine,stream").split(",") if t]

WORKLOAD = ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "30",
            "--random-range-ratio", "0.5", "--num-prompts", "40", "--max-concurrency", "4", "--ignore-eos",
            "--seed", "0", "--metric-percentiles", "50,90,99"]
HEADLINE = {  # key -> absolute floor of the tolerance (ms or fraction for throughputs)
    "median_ttft_ms": 1.0, "median_tpot_ms": 0.3, "median_itl_ms": 0.3, "mean_e2el_ms": 2.0,
    "output_throughput": 0.03, "request_throughput": 0.03,
}
# Against the engine neither the send cost nor the client's CPU can be separated from the server:
# on a 2-core machine each client's CPU use slows the engine it shares the cores with, and
# vLLM's client is the heavier one (its TTFT ran 2-4 % and its TPOT up to 18 % above epkit's,
# in CI, on a busy box). There the two clients must agree within this fraction: an end-to-end
# sanity check; the paced server, which no client slows, checks the metrics to < 1 ms.
ENGINE_REL = 0.25


def vllm_executable() -> Path | None:
    py = os.environ.get("EPKIT_VLLM_PYTHON")
    venv = Path(py).parent.parent if py else Path(os.environ.get(
        "EPKIT_VLLM_VENV", Path.home() / ".cache/epkit/vllm-venv"))
    exe = venv / "bin" / "vllm"
    return exe if exe.exists() else None


VLLM = vllm_executable()
pytestmark = pytest.mark.skipif(VLLM is None, reason="no vLLM venv (scripts/vllm_venv.sh creates it)")


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def _free_port() -> int:
    from epkit.launch.local import free_port  # outside the ephemeral range: the clients' connections cannot take it

    return free_port("127.0.0.1")


@pytest.fixture(scope="module", params=TARGETS)
def target(request, module_stream_server, byte_tokenizer_dir):
    """(base_url, model, tokenizer, server with a send log or None) both clients measure."""
    if request.param == "stream":
        server = module_stream_server("--ttft-ms", "20", "--itl-ms", "5")
        yield server.url, "stream-test", byte_tokenizer_dir, server
        return
    epkit = str(Path(sys.executable).parent / "epkit")
    if not Path(epkit).exists():
        epkit = shutil.which("epkit")
    port = _free_port()
    # no prefix caching: both clients send the same prompts, so the second would find the first's blocks cached
    proc = subprocess.Popen([epkit, "serve", "epkit-tiny-moe", "--port", str(port), "--no-enable-prefix-caching"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", proc, 300)
        # The engine is byte-level as well (ids 0..255 are the bytes), so the byte tokenizer samples for it.
        yield f"http://127.0.0.1:{port}", "epkit-tiny-moe", byte_tokenizer_dir, None
    finally:
        proc.terminate()
        proc.wait(30)


def send_overhead_ms(server, sends_s: dict[str, float]) -> float:
    """Median time from a client's send stamp to the server's first byte of that request.

    Both processes read CLOCK_MONOTONIC, so this is each client's own cost of sending; it
    adds to its TTFT and E2EL and differs between clients by design, not by measurement."""
    if server is None:
        return 0.0
    recv = {e["request_id"]: e["recv_s"] for e in server.log()}
    return float(np.median([(recv[rid] - sent) * 1e3 for rid, sent in sends_s.items()]))


def run_vllm(url: str, model: str, tokenizer: str, out: Path) -> dict:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}  # the CPU wheel cannot infer a device otherwise
    cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", model, "--tokenizer", tokenizer, *WORKLOAD, "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--save-result", "--save-detailed", "--result-dir", str(out.parent), "--result-filename", out.name,
           "--disable-tqdm"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def run_epkit(url: str, model: str, tokenizer: str, out: Path) -> dict:
    assert bench_main(["--base-url", url, "--model", model, "--tokenizer", tokenizer, *WORKLOAD,
                       "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
                       "--disable-tqdm"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(target, tmp_path_factory):
    url, model, tok, server = target
    d = tmp_path_factory.mktemp("crosscheck")
    out = {"vllm": [], "epkit": []}
    if server is not None:
        server.log()  # clear
    for k in range(2):
        v = run_vllm(url, model, tok, d / f"vllm{k}.json")
        ids = {e["request_id"] for e in server.log(clear=False)} if server is not None else set()
        prefix = next(iter(ids)).rsplit("-", 1)[0] + "-" if ids else ""
        v["send_overhead_ms"] = send_overhead_ms(server, {f"{prefix}{i}": t for i, t in enumerate(v["start_times"])})
        out["vllm"].append(v)
        e = run_epkit(url, model, tok, d / f"epkit{k}.json")
        res = load_result(d / f"epkit{k}.json")
        t0 = res.meta["t0_perf_counter_s"]
        e["send_overhead_ms"] = send_overhead_ms(server, {f"epkit-{r.index}": t0 + r.send_s
                                                          for r in res.requests.itertuples()})
        out["epkit"].append(e)
    return d, out, server


def test_headline_numbers_agree_within_run_to_run_spread(runs):
    """TTFT and E2EL include each client's own send cost (measured against the server's log,
    reported, and allowed for); everything else must agree within 3x the run-to-run spread
    (against the engine, within ENGINE_REL: see there)."""
    d, out, server = runs
    over = {c: np.mean([r["send_overhead_ms"] for r in out[c]]) for c in out}
    rows = [f"send overhead (ms): vllm {over['vllm']:.3f}  epkit {over['epkit']:.3f}"]
    for key, floor in HEADLINE.items():
        v = np.array([r[key] for r in out["vllm"]])
        e = np.array([r[key] for r in out["epkit"]])
        spread = max(np.ptp(v), np.ptp(e))
        scale = abs(v.mean()) if "throughput" in key else 1.0
        tol = max(3 * spread, floor * scale)
        if key in ("median_ttft_ms", "mean_e2el_ms"):
            tol += abs(over["vllm"] - over["epkit"])
        if server is None:
            tol = max(tol, ENGINE_REL * abs(v.mean()))
        rows.append(f"{key:<20} vllm {v.round(3)}  epkit {e.round(3)}  |diff| {abs(v.mean() - e.mean()):.3f}  "
                    f"tol {tol:.3f}")
        assert abs(v.mean() - e.mean()) <= tol, "\n".join(rows)
    print("\n" + "\n".join(rows))
    if server is not None:  # net of each client's measured send cost, the two see the same first token
        net = [np.mean([r["median_ttft_ms"] for r in out[c]]) - over[c] for c in ("vllm", "epkit")]
        spread = max(np.ptp([r["median_ttft_ms"] for r in out[c]]) for c in out)
        assert abs(net[0] - net[1]) <= max(1.0, 3 * spread), (net, spread)
    (d / "comparison.txt").write_text("\n".join(rows))


def test_same_requests_and_token_counts(runs):
    _, out, _ = runs
    for v, e in zip(out["vllm"], out["epkit"]):
        assert v["completed"] == e["completed"] == 40
        assert v["total_output_tokens"] == e["total_output_tokens"]
        # Same sampler, same seed, same tokenizer: the same prompts, so the server counts the same.
        assert v["total_input_tokens"] == e["total_input_tokens"]
    samples = RandomWorkload(num_prompts=40, input_len=64, output_len=30, range_ratio=0.5).sample(
        load_vllm_tokenizer(runs))
    assert [s.prompt_len for s in samples] == out["vllm"][0]["input_lens"]
    assert [s.output_len for s in samples] == out["vllm"][0]["output_lens"]


def load_vllm_tokenizer(runs):
    from epkit.bench.datasets import load_tokenizer

    return load_tokenizer(runs[1]["vllm"][0]["tokenizer_id"])


def test_metrics_recomputed_from_vllms_raw_data_equal_vllms(runs):
    d, out, _ = runs
    for k in range(2):
        res = load_vllm_result(d / f"vllm{k}.json")
        assert len(res.requests) == 40
        mine = res.recompute(percentiles=(50, 90, 99))
        for key, value in out["vllm"][k].items():
            if key in mine and isinstance(value, (int, float)) and value is not None:
                assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


def _kind(value) -> str:
    return "null" if value is None else "list" if isinstance(value, list) else \
        "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def test_epkit_result_file_has_exactly_vllms_keys(runs):
    """The key set of `vllm bench serve --save-result` (vLLM 0.32: its file here, less the lists only
    --save-detailed adds) is the key set of epkit's file, less epkit's own named additions; values
    of the same kind; the per-request lists mean what vLLM's mean."""
    d, _, _ = runs
    vllm_doc = json.loads((d / "vllm0.json").read_text())
    epkit_doc = json.loads((d / "epkit0.json").read_text())
    vllm_keys = set(vllm_doc) - set(VLLM_DETAILED)
    epkit_keys = set(epkit_doc) - epkit_only_keys(epkit_doc)
    assert epkit_keys == vllm_keys, f"missing {sorted(vllm_keys - epkit_keys)}, extra {sorted(epkit_keys - vllm_keys)}"
    assert {k: _kind(epkit_doc[k]) for k in vllm_keys} == {k: _kind(vllm_doc[k]) for k in vllm_keys}
    for doc in (vllm_doc, epkit_doc):
        assert doc["rtfx"] == 0.0  # no audio input
        lat, queue = np.asarray(doc["latencies"]), np.asarray(doc["queue_times"])
        assert len(lat) == len(queue) == 40
        # E2EL statistics are over these latencies (s); queue times are waits for one of 4 slots (s):
        # from the fifth request on, each waited for an earlier one to finish
        assert np.mean(lat) * 1e3 == pytest.approx(doc["mean_e2el_ms"], rel=1e-9)
        assert (queue >= 0).all() and queue[4:].min() > 0.5 * lat.min()
    res = load_result(d / "epkit0.json")
    assert len(res.requests) == 40 and res.requests["success"].all()
    assert res.recompute(percentiles=(50, 90, 99))["median_ttft_ms"] == pytest.approx(epkit_doc["median_ttft_ms"])


def test_vllm_bench_serve_profile_drives_the_engines_profiler(byte_tokenizer_dir, tmp_path):
    """`vllm bench serve --profile` (vLLM's own client) against `epkit serve --profiler-config`: the client's
    /start_profile and /stop_profile reach every rank, the trace is written, and `epkit profile` reads its steps,
    named as vLLM's worker names them, back to the prompt tokens the client sent."""
    from epkit.analysis.step_profile import summarize

    epkit = str(Path(sys.executable).parent / "epkit")
    if not Path(epkit).exists():
        epkit = shutil.which("epkit")
    port, prof = _free_port(), tmp_path / "prof"
    config = json.dumps({"profiler": "torch", "torch_profiler_dir": str(prof), "torch_profiler_with_stack": False})
    proc = subprocess.Popen([epkit, "serve", "epkit-tiny-moe", "--port", str(port), "--no-enable-prefix-caching",
                             "--profiler-config", config], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, 300)
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
        out = tmp_path / "vllm.json"
        cmd = [str(VLLM), "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
               "--model", "epkit-tiny-moe", "--tokenizer", byte_tokenizer_dir, "--dataset-name", "random",
               "--random-input-len", "32", "--random-output-len", "6", "--num-prompts", "6", "--ignore-eos",
               "--seed", "0", "--profile", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
               "--result-filename", out.name, "--disable-tqdm"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "Profiler started" in p.stdout and "Profiler stopped" in p.stdout, p.stdout[-2000:]
    finally:
        proc.terminate()
        proc.wait(30)
    traces = sorted(prof.glob("epkit_dp0_*.pt.trace.json.gz"))
    assert len(traces) == 1
    kinds = summarize(traces[0])["kinds"]
    result = json.loads(out.read_text())
    # vLLM's client sends its own test prompt first (before /start_profile): the recorded steps hold exactly the
    # measured prompts' tokens (and one decode token per request per step after its first)
    ctx = sum(k["ctx_tokens_per_step"] * k["steps"] for k in kinds.values())
    assert round(ctx) == sum(result["input_lens"])
    gen = sum(k["gen_tokens_per_step"] * k["steps"] for k in kinds.values())
    assert round(gen) == sum(n - 1 for n in result["output_lens"])
