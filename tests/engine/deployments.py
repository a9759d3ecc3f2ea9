"""Real `epkit serve` deployments (subprocesses, real ports) for the engine tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ["--max-model-len", "512", "--kv-cache-memory-bytes", str(64 * 2**20), "--startup-timeout", "120"]


def free_port() -> int:
    """A free port outside the ephemeral range (clients' connections cannot take it before the engine binds)."""
    from epkit.launch.local import free_port as pick

    return pick("127.0.0.1")


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its live descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    return tree


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Node:
    """One `epkit serve` process (a node) with its log file."""

    def __init__(self, args: list[str], log_path: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "epkit.engine.cli", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)


class Deployment:
    """A primary node (and optional headless nodes) serving on a free port."""

    def __init__(self, tmp: Path, args: list[str], headless: list[list[str]] = (), api_key: str | None = None,
                 api_servers: int | None = 1):
        """``api_servers``: ``--api-server-count`` unless ``args`` name one; None keeps the engine's default
        (one per DP rank, as vLLM). One by default: on 2 cores each extra server slows every deployment."""
        self.port, self.rpc_port = free_port(), free_port()
        if api_servers is not None and "--api-server-count" not in args:
            args = [*args, "--api-server-count", str(api_servers)]
        common = ["--data-parallel-rpc-port", str(self.rpc_port), *TINY_ARGS]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        key_args = ["--api-key", api_key] if api_key else []
        self.nodes = [Node(["epkit-tiny-moe", "--port", str(self.port), *common, *key_args, *args], tmp / f"node0-{self.port}.log")]
        for i, extra in enumerate(headless, 1):
            self.nodes.append(Node(["epkit-tiny-moe", "--headless", *common, *extra], tmp / f"node{i}-{self.port}.log"))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 180.0) -> "Deployment":
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise AssertionError(f"node exited with {node.proc.returncode} before ready:\n{node.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    for _ in range(50):  # the ready line is logged just after the socket starts answering
                        if "epkit serve ready" in self.nodes[0].log():
                            return self
                        time.sleep(0.1)
                    raise AssertionError("healthy but no 'epkit serve ready' line:\n" + self.nodes[0].log()[-2000:])
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout} s:\n" + "\n".join(n.log()[-2000:] for n in self.nodes))

    def pids(self) -> set[int]:
        return set().union(*(process_tree(n.proc.pid) for n in self.nodes))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> list[int]:
        for node in self.nodes:
            node.signal(sig)
        codes = []
        for node in self.nodes:
            try:
                codes.append(node.wait(timeout))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                codes.append(node.wait(10))
        return codes

    def complete(self, prompt, max_tokens: int = 16, **extra) -> dict:
        body = {"model": "epkit-tiny-moe", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}
        r = httpx.post(self.url + "/v1/completions", json=body, headers=self.headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until none of ``pids`` is alive; returns those still alive at the deadline."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return set()
        time.sleep(0.2)
    return {p for p in pids if alive(p)}


