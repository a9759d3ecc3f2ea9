"""Local executor: every "node" is a supervisor process (``python -m epkit.launch.node``) in a
session of its own, which starts that node's engine in a process group of its own.

Several nodes on one machine use exactly the multi-node code path (primary + headless
nodes with their start ranks, reaching the primary at 127.0.0.1).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from epkit.launch import procs
from epkit.launch.failure import Failure, tail
from epkit.launch.node import NodeTask, node_file


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalExecutor:
    """Run every node of a deployment as processes on this machine."""

    name: str = "local"
    host: str = "127.0.0.1"

    def address(self) -> str:
        return self.host

    def pick_ports(self) -> tuple[int, int]:
        return free_port(self.host), free_port(self.host)

    def launch(self, task: NodeTask, nodes: int) -> "LocalHandle":
        run_dir = Path(task.run_dir)
        sups = []
        for node in range(nodes):
            t = replace(task, node=node, address=self.host, host=self.host)
            path = node_file(run_dir, node, "task.json")
            path.write_text(t.to_json())
            out = open(node_file(run_dir, node, "supervisor.log"), "ab")
            sups.append(subprocess.Popen([sys.executable, "-m", "epkit.launch.node", str(path)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=run_dir))
            out.close()
        return LocalHandle(task.deployment_id, run_dir, sups)


class LocalHandle:
    """The supervisors of one local deployment."""

    def __init__(self, deployment_id: str, run_dir: Path, supervisors: list[subprocess.Popen]):
        self.deployment_id = deployment_id
        self.run_dir = run_dir
        self.supervisors = supervisors

    def primary_host(self) -> str | None:
        return "127.0.0.1"

    def problem(self) -> Failure | None:
        """A supervisor that died without recording its engine's end."""
        for node, sup in enumerate(self.supervisors):
            rc = sup.poll()
            if rc is None:
                continue
            info = _read(node_file(self.run_dir, node, "json"))
            if "returncode" not in info:
                return Failure("lost", f"node {node}'s supervisor exited with code {rc} before its engine ended",
                               tail(node_file(self.run_dir, node, "supervisor.log")), node)
        return None

    def describe(self) -> dict:
        return {"executor": "local", "supervisor_pids": [s.pid for s in self.supervisors]}

    def stop(self, grace_s: float) -> None:
        """Supervisors end their engines on the stop file; anything left after the grace period is killed."""
        for sup in self.supervisors:
            if sup.poll() is None:
                try:
                    sup.terminate()
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s + 5.0
        for sup in self.supervisors:
            try:
                sup.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sup.kill()
                sup.wait()
        pgids = [_read(node_file(self.run_dir, n, "json")).get("pgid") for n in range(len(self.supervisors))]
        procs.terminate([p for p in pgids if p], self.deployment_id, grace_s=grace_s)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
