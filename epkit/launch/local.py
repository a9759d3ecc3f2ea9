"""Local executor: every "node" is a supervisor process (``python -m epkit.launch.node``) in a
session of its own, which starts that node's engine in a process group of its own.

Several nodes on one machine use exactly the multi-node code path (primary + headless
nodes with their start ranks, reaching the primary at 127.0.0.1).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from epkit.launch import procs, vllm_install
from epkit.launch.failure import Failure, error_line, tail
from epkit.launch.node import NodeTask, node_file


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, outside the kernel's ephemeral range.

    Between this check and the server's own bind, any outgoing connection on the machine (a load
    generator's, a test client's) takes an ephemeral port; a port the kernel handed out from that
    range (``bind(0)``) can be taken that way, one below or above it cannot."""
    lo, hi = _ephemeral_range()
    pool = range(10000, lo) if lo > 11000 else range(hi + 1, 65536)
    for port in random.sample(pool, min(200, len(pool))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalExecutor:
    """Run every node of a deployment as processes on this machine. ``vllm_bin``: the command that runs
    vLLM's CLI for ``engine: vllm`` (default ``$EPKIT_VLLM_BIN``, else ``vllm`` on PATH)."""

    name: str = "local"
    host: str = "127.0.0.1"
    vllm_bin: str | None = None

    def address(self) -> str:
        return self.host

    def pick_ports(self) -> tuple[int, int]:
        return free_port(self.host), free_port(self.host)

    def problems(self, topology: Any) -> list[str]:
        """What this machine lacks to run ``topology`` with vLLM: a vLLM that runs (``<vllm_bin> --version``)
        and can run the topology (its release, its platform: :mod:`epkit.launch.vllm_install`), and the kernel
        package of a vendor all2all backend in vLLM's interpreter (the built-in engine is checked by the sweep)."""
        if topology.engine != "vllm":
            return []
        try:
            cmd = vllm_install.command(self.vllm_bin)
        except ValueError as exc:
            return [str(exc)]
        install = vllm_install.probe_here(cmd, {**os.environ, **topology.env})
        if isinstance(install, str):
            return [f"the local executor runs vLLM, but {install}; or use engine: epkit"]
        found = vllm_install.problems(topology, install)
        from epkit.topology.backends import VENDOR_PACKAGES

        vendor = VENDOR_PACKAGES.get(topology.all2all_backend or "") if topology.enable_expert_parallel else None
        exe = shutil.which(cmd[0]) or cmd[0]
        python = exe if "python" in os.path.basename(exe) else _interpreter(exe)
        if vendor is not None and not _importable(python, vendor.module):
            found.append(f"all2all_backend={topology.all2all_backend!r} needs {vendor.package} (Python module "
                         f"{vendor.module!r}) in the Python of {shlex.join((exe, *cmd[1:]))}, which does not have it; "
                         f"install it with {vendor.install}")
        return found

    def engine_notes(self, topology: Any) -> list[str]:
        """For a dry run: which vLLM runs ``topology`` here and what epkit adds to its command on this platform."""
        if topology.engine != "vllm":
            return []
        cmd = vllm_install.command(self.vllm_bin)
        env = {**os.environ, **topology.env}
        install = vllm_install.probe_here(cmd, env)
        if isinstance(install, str):
            return [install]
        try:
            _, _, notes = vllm_install.platform_args(topology, install, vllm_install.HostFacts.here(), env)
        except ValueError as exc:
            notes = [str(exc)]
        return [f"runs `{shlex.join(cmd)}` = vLLM {install.version_full} ({install.device})"] + \
            [f"adds {note}" for note in notes]

    def launch(self, task: NodeTask, nodes: int) -> "LocalHandle":
        run_dir = Path(task.run_dir)
        if task.vllm_bin is not None:  # the nodes run here: what the vLLM here is was asked when the sweep was checked
            found = vllm_install.probe_here(vllm_install.command(task.vllm_bin),
                                            {**os.environ, **task.topology.get("env", {}), **task.env})
            task = replace(task, vllm=found.to_dict() if not isinstance(found, str) else None)
        # supervisors carry the deployment's tag too: a resumed sweep finds them after a kill -9 of the driver
        env = {**os.environ, procs.TAG: task.deployment_id}
        sups = []
        for node in range(nodes):
            t = replace(task, node=node, address=self.host, host=self.host)
            path = node_file(run_dir, node, "task.json")
            path.write_text(t.to_json())
            out = open(node_file(run_dir, node, "supervisor.log"), "ab")
            sups.append(subprocess.Popen([sys.executable, "-m", "epkit.launch.node", str(path)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=run_dir, env=env))
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
                log = tail(node_file(self.run_dir, node, "supervisor.log"))
                said = error_line(log)
                return Failure("lost", f"node {node}'s supervisor exited with code {rc} before its engine ended"
                               + (f": {said}" if said else "") + f" (its log: {node_file(self.run_dir, node, 'supervisor.log')})",
                               log, node)
        return None

    def describe(self) -> dict:
        return {"executor": "local", "supervisor_pids": [s.pid for s in self.supervisors]}

    def final_problem(self, wait_s: float = 0.0) -> Failure | None:
        """Local processes have no job state beyond their own records."""
        return None

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


def _interpreter(script: str) -> str:
    """The Python that runs a console script (its shebang), else this one."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace")
    except OSError:
        return sys.executable
    parts = first[2:].split() if first.startswith("#!") else []
    if parts and os.path.basename(parts[0]) == "env" and len(parts) > 1:
        return shutil.which(parts[1]) or sys.executable
    return parts[0] if parts and "python" in os.path.basename(parts[0]) else sys.executable


@functools.lru_cache(maxsize=None)
def _importable(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
