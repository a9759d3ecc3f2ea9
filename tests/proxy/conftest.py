"""Fixtures: real `epkit serve` instances of the tiny bundled model on CPU (one prefill, two decode; shared by the
whole package, since each start costs seconds on 2 cores) and real `epkit proxy` processes in front of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from deployments import ROOT, Deployment, free_port, wait_gone  # noqa: E402

API_KEY = "sk-proxy-test"  # the instances require it: every test shows the router passes Authorization on
MODEL = "epkit-tiny-moe"
# the instances' --kv-transfer-config: vLLM's NixlConnector protocol, as the seed sets it (kv_both on every instance)
# (a long lease, so that in the tests only the router's release frees a prefill's held blocks, not the timeout)
KV_CONFIG = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
                        "kv_connector_extra_config": {"kv_lease_duration": 600}})


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a Prometheus exposition whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        head, _, rest = series.partition("{")
        if head != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def scrape(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=30).text


@contextlib.contextmanager
def side_channel_port(port: int):
    """VLLM_NIXL_SIDE_CHANNEL_PORT for the processes started inside (the engine helper passes os.environ on)."""
    old = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
    try:
        yield
    finally:
        if old is None:
            del os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"]
        else:
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = old


class Proxy:
    """``python -m epkit.cli proxy …`` on a free port, with its log; ready when its /metrics answers."""

    def __init__(self, tmp: Path, prefill: list[str], decode: list[str], *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"proxy-{self.port}.log"
        self._log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "epkit.cli", "proxy", "--prefill", *prefill, "--decode", *decode,
                "--host", "127.0.0.1", "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"epkit proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/metrics", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("epkit proxy not ready in 60 s:\n" + self.log())

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> str:
        return scrape(self.url)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="package")
def engines(tmp_path_factory):
    """{"p0", "d0", "d1"}: three instances started together (P0 prefills; D0, D1 decode)."""
    tmp = tmp_path_factory.mktemp("engines")
    started = {}
    for name in ("p0", "d0", "d1"):
        with side_channel_port(free_port()):  # each instance's KV side channel (vLLM's env name) on a port of its own
            started[name] = Deployment(tmp, ["--kv-transfer-config", KV_CONFIG], api_key=API_KEY)
    try:
        for d in started.values():
            d.wait_ready()
        yield started
    finally:
        pids = set().union(*(d.pids() for d in started.values()))
        for d in started.values():
            d.stop()
        assert not wait_gone(pids), "engine processes left behind"


@pytest.fixture
def proxy(tmp_path):
    """Start routers: ``proxy([prefill urls], [decode urls], *flags)``; each is stopped at teardown."""
    started: list[Proxy] = []

    def start(prefill: list[str], decode: list[str], *extra: str) -> Proxy:
        p = Proxy(tmp_path, prefill, decode, *extra)
        started.append(p)
        return p

    yield start
    for p in started:
        assert p.stop() == 0, p.log()


def dead_url() -> str:
    """A URL nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"
