"""The real bench through the real router: ``python -m epkit.cli proxy`` in front of two real ``epkit serve``
instances speaking NixlConnector's protocol (1P1D). Every request's record carries what the router measured
(prefill time, KV transfer time and bytes, which instances served it); the same bench straight against one
engine (no router) records nothing of it and fails nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from epkit.bench import RandomWorkload, run
from epkit.bench.result import load_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from deployments import Deployment, free_port, wait_gone  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
KV = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"})
MODEL = "epkit-tiny-moe"
WORKLOAD = RandomWorkload(num_prompts=6, input_len=24, output_len=8, seed=1)


class Router:
    """``python -m epkit.cli proxy`` on a free port, its log in ``tmp``."""

    def __init__(self, tmp: Path, prefill: str, decode: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "proxy.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "epkit.cli", "proxy", "--prefill", prefill, "--decode",
                                      decode, "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> "Router":
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"proxy exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"proxy not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def one_p_one_d(tmp_path_factory):
    """(router, prefill, decode): two engines with their own KV side-channel ports, the router in front."""
    tmp = tmp_path_factory.mktemp("pd")
    started: list[Deployment] = []
    router = None
    mp = pytest.MonkeyPatch()
    try:
        for _ in ("prefill", "decode"):
            mp.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
            mp.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", str(free_port()))  # read when the engine starts
            started.append(Deployment(tmp, ["--kv-transfer-config", KV]))
        for d in started:
            d.wait_ready()
        router = Router(tmp, started[0].url, started[1].url).wait_ready()
        yield router, started[0], started[1]
    finally:
        mp.undo()
        if router is not None:
            router.stop()
        for d in started:
            pids = d.pids()
            d.stop()
            assert not wait_gone(pids), "engine processes left behind"


def test_bench_through_the_router_records_prefill_and_kv_transfer(one_p_one_d, tmp_path):
    router, prefill, decode = one_p_one_d
    result = run(router.url, MODEL, WORKLOAD, max_concurrency=2, progress=False, goodput_slos_ms={"ttft": 60_000})
    reqs = result.requests
    assert reqs["success"].all(), reqs["error"].tolist()
    assert (reqs["prefill_url"] == prefill.url).all() and (reqs["decode_url"] == decode.url).all()
    assert (reqs["prefill_ms"] > 0).all()
    assert (reqs["kv_transfer_ms"] >= 0).all() and (reqs["kv_transfer_bytes"] > 0).all()  # the decode pulled KV
    m = result.metrics
    for key in ("mean_prefill_ms", "median_prefill_ms", "p99_prefill_ms", "mean_kv_transfer_ms",
                "median_kv_transfer_ms", "p99_kv_transfer_ms"):
        assert m[key] > 0 or key.endswith("kv_transfer_ms") and m[key] >= 0, key
    assert m["mean_prefill_ms"] == pytest.approx(reqs["prefill_ms"].mean())
    assert m["completed"] == WORKLOAD.num_prompts and m["request_goodput"] == pytest.approx(m["request_throughput"])
    back = load_result(result.save(tmp_path / "pd.json"))
    assert back.requests["prefill_ms"].tolist() == reqs["prefill_ms"].tolist()
    assert back.requests["decode_url"].tolist() == reqs["decode_url"].tolist()


def test_bench_straight_at_an_engine_records_no_pd_fields(one_p_one_d):
    _, _, decode = one_p_one_d
    result = run(decode.url, MODEL, WORKLOAD, max_concurrency=2, progress=False)
    reqs = result.requests
    assert reqs["success"].all(), reqs["error"].tolist()
    assert reqs[["prefill_ms", "kv_transfer_ms", "kv_transfer_bytes", "prefill_url", "decode_url"]].isna().all().all()
    assert not [k for k in result.metrics if "prefill" in k or "kv_transfer" in k]
