"""The process table, read from /proc: find, and end, every process of a deployment.

Engines are tagged with ``EPKIT_DEPLOYMENT_ID`` in their environment, which every child
inherits, so a scan finds a deployment's processes even after they were re-parented
(a killed supervisor, a cancelled Slurm step). Zombies are not counted as alive: here
process 1 may reap them late.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

TAG = "EPKIT_DEPLOYMENT_ID"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str
    cmdline: str


def _stat(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return None
    rest = stat[stat.rindex(")") + 2:].split()
    return Proc(pid, int(rest[1]), int(rest[2]), rest[0], cmd)


def processes() -> list[Proc]:
    """Every live (non-zombie) process."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = _stat(int(name))
            if p is not None and p.state not in ("Z", "X"):
                out.append(p)
    return out


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _environ_has(pid: int, needle: bytes) -> bool:
    return needle in _environ(pid)


def by_deployment() -> dict[str, list[Proc]]:
    """Every live process that carries a deployment tag, grouped by deployment id."""
    prefix = f"{TAG}=".encode()
    me = os.getpid()
    out: dict[str, list[Proc]] = {}
    for p in processes():
        if p.pid == me:
            continue
        for item in _environ(p.pid):
            if item.startswith(prefix):
                out.setdefault(item[len(prefix):].decode(errors="replace"), []).append(p)
                break
    return out


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie does not count)."""
    p = _stat(pid)
    return p is not None and p.state not in ("Z", "X")


def tagged(deployment_id: str, node: int | None = None) -> list[Proc]:
    """Live processes whose environment carries this deployment's tag (and node, if given)."""
    needle = f"{TAG}={deployment_id}".encode()
    node_needle = f"EPKIT_NODE={node}".encode() if node is not None else None
    me = os.getpid()
    return [p for p in processes() if p.pid != me and _environ_has(p.pid, needle)
            and (node_needle is None or _environ_has(p.pid, node_needle))]


def group_alive(pgid: int) -> bool:
    return any(p.pgid == pgid for p in processes())


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def terminate(pgids: list[int], deployment_id: str | None = None, node: int | None = None,
              grace_s: float = 10.0, poll_s: float = 0.05) -> None:
    """SIGTERM the process groups (and tagged stragglers), then SIGKILL what is left after ``grace_s``."""
    def alive() -> list[Proc]:
        procs = processes()
        left = [p for p in procs if p.pgid in pgids and p.pid != os.getpid()]
        if deployment_id is not None:
            seen = {p.pid for p in left}
            left += [p for p in tagged(deployment_id, node) if p.pid not in seen]
        return left

    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    for p in alive():
        kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not alive():
            return
        time.sleep(poll_s)
    for pgid in pgids:
        _signal_group(pgid, signal.SIGKILL)
    for p in alive():
        kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while alive() and time.monotonic() < deadline:
        time.sleep(poll_s)


def kill(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it still exists."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
