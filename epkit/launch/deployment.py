"""``deploy(topology, executor) -> Deployment``: a running engine you can wait for, query and stop.

    with deploy(topology, "local") as d:
        d.wait_ready(timeout=300)
        result = epkit.bench.run(d.url, topology.model, workload)

Readiness is the primary's ``/health`` answering and ``/v1/models`` listing the model.
While waiting, every node's process and log are watched: an engine that exits, an
out-of-memory, an NCCL/Gloo error, or no log progress for ``hang_timeout_s`` ends the wait
at once with a :class:`~epkit.launch.failure.Failure` (kind, message, log tail), raised as
:class:`DeploymentFailed`. ``stop()`` (also on leaving the ``with`` block, on Ctrl-C and
at interpreter exit) ends every process on every node and the Slurm job.

Before anything starts, the driver writes ``deployment.json`` in the run folder (its pid and
host, the executor, then the supervisor pids or the Slurm job id, and the state ``starting`` →
``ready`` → ``stopped``), so that a later driver can find and end what a killed one left running
(:mod:`epkit.launch.orphans`).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from epkit.errors import LaunchError
from epkit.launch import vllm_install
from epkit.launch.failure import Failure, classify_exit, fatal, tail
from epkit.launch.node import NodeTask, node_file, write_json
from epkit.topology import Topology
from epkit.topology.render import render

# Start-up timeouts per engine: vLLM with DeepGEMM warm-up and CUDA graphs can take many minutes.
STARTUP_TIMEOUT_S = {"vllm": 1800.0, "epkit": 300.0}
HANG_TIMEOUT_S = {"vllm": 600.0, "epkit": 120.0}
FAIL_FAST_KINDS = ("oom", "kv_cache", "nccl", "gloo")
RECORD = "deployment.json"
# Why a node supervisor gets each ending signal (node.END_SIGNALS), when no Slurm job state says more.
SIGNAL_CAUSES = {"SIGTERM": ("cancelled", "scancel, a kill, or the Slurm time limit"),
                 "SIGINT": ("cancelled", "Ctrl-C"), "SIGHUP": ("cancelled", "its terminal or session ended"),
                 "SIGUSR2": ("timeout", "submitit's warning that the Slurm time limit is near")}
_LIVE: "weakref.WeakSet[Deployment]" = weakref.WeakSet()
# What deploy() takes besides a Topology: its type -> the class that deploys it (epkit.launch.disagg adds
# DisaggTopology -> DisaggDeployment).
DEPLOYMENT_KINDS: dict[type, Any] = {}


class DeploymentFailed(LaunchError):
    """A deployment did not become ready (or stopped serving); ``failure`` says why."""

    def __init__(self, failure: Failure, commands: list[str] | None = None):
        self.failure = failure
        self.commands = commands or []
        msg = str(failure)
        if failure.log_tail:
            msg += "\n--- log tail ---\n" + "\n".join(failure.log_tail.splitlines()[-15:])
        super().__init__(msg)


def _executor(executor: Any) -> Any:
    if isinstance(executor, str):
        from epkit.launch import EXECUTORS

        if executor not in EXECUTORS:
            raise LaunchError(f"executor={executor!r}; choose from {', '.join(EXECUTORS)} (or pass an executor object)")
        if executor == "slurm":
            raise LaunchError("executor 'slurm' needs options (timeout_min at least): pass SlurmExecutor(timeout_min=…)")
        return EXECUTORS[executor]()
    return executor


class Deployment:
    """One started topology. Use :func:`deploy` to make one."""

    def __init__(self, topology: Topology, executor: Any = "local", run_dir: str | Path | None = None,
                 startup_timeout_s: float | None = None, hang_timeout_s: float | None = None,
                 grace_s: float = 10.0, lease_timeout_s: float | None = 120.0, env: dict | None = None,
                 preflight: bool | None = None):
        self.executor = _executor(executor)
        self.id = uuid.uuid4().hex[:12]
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"epkit-{self.id}-")).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        topology = with_absolute_paths(topology)
        port, rpc_port = self.executor.pick_ports()
        if topology.tp_spans_nodes:
            if topology.master_port is None:  # where the nodes' TP workers meet
                topology = replace(topology, master_port=rpc_port)
        elif topology.data_parallel_rpc_port is None:
            topology = replace(topology, data_parallel_rpc_port=rpc_port)
        self.topology = topology
        self.port = port
        self.startup_timeout_s = startup_timeout_s or STARTUP_TIMEOUT_S[topology.engine]
        self.hang_timeout_s = hang_timeout_s or HANG_TIMEOUT_S[topology.engine]
        self.grace_s = grace_s
        self.lease_timeout_s = lease_timeout_s
        self.failure: Failure | None = None
        self.ready = False
        self.timing: dict[str, float] = {}
        self._stopped = False
        self._lease_stop = threading.Event()
        is_slurm = getattr(self.executor, "name", "") == "slurm"
        self.task = NodeTask(
            deployment_id=self.id, run_dir=str(self.run_dir), topology=topology.to_dict(), port=port,
            host="0.0.0.0" if is_slurm else "127.0.0.1", env=dict(env or {}), grace_s=grace_s,
            lease_timeout_s=lease_timeout_s, preflight=is_slurm if preflight is None else preflight,
            vllm_bin=vllm_install.vllm_bin(getattr(self.executor, "vllm_bin", None)) if topology.engine == "vllm" else None)
        touch_lease(self.run_dir)
        self.handle = None
        self._write_record("starting")
        t0 = time.monotonic()
        try:
            if is_slurm:
                self.handle = self.executor.launch(self.task, topology.nodes, topology.gpus_on_node)
            else:
                self.handle = self.executor.launch(self.task, topology.nodes)
        except BaseException:
            self._write_record("stopped", error="launch failed")
            raise
        self._write_record("starting")
        self.timing["launch_s"] = time.monotonic() - t0
        self._t_start = t0
        self._lease_thread = renew_lease(self.run_dir, self.lease_timeout_s, self._lease_stop, self.id)
        _LIVE.add(self)

    # ---- what users look at --------------------------------------------------------------
    @property
    def url(self) -> str | None:
        """``http://host:port`` of the primary's API (None until the primary's host is known)."""
        host = self.handle.primary_host()
        return f"http://{host}:{self.port}" if host else None

    @property
    def model(self) -> str:
        return self.topology.model

    @property
    def logs(self) -> dict[int, Path]:
        """Each node's engine log."""
        return {n: node_file(self.run_dir, n, "log") for n in range(self.topology.nodes)}

    def log_tail(self, node: int = 0, lines: int = 40) -> str:
        return tail(self.logs[node], lines)

    def commands(self) -> list[str]:
        """The shell line each node runs (Slurm: node 0's hostname is filled in once known)."""
        out = []
        for n in range(self.topology.nodes):
            info = _read(node_file(self.run_dir, n, "json"))
            if info.get("argv"):
                from epkit.topology.render import NodeLaunch

                out.append(NodeLaunch(n, info["role"], tuple(info["argv"]), info.get("env", {})).shell(False))
        if len(out) == self.topology.nodes:
            return out
        address = self.executor.address() or "$PRIMARY_HOSTNAME"
        return [launch.shell(False) for launch in render(self.topology, address=address)]

    def describe(self) -> dict:
        return {"deployment_id": self.id, "run_dir": str(self.run_dir), "port": self.port, **self.handle.describe()}

    # ---- readiness ------------------------------------------------------------------------
    def check(self) -> Failure | None:
        """A failure if any node has ended or logged a fatal error, or the job has ended, else None."""
        for n in range(self.topology.nodes):
            info = _read(node_file(self.run_dir, n, "json"))
            if "returncode" in info:
                return self.node_ended(n, info)
            found = fatal(tail(self.logs[n], 200), n, FAIL_FAST_KINDS)
            if found is not None:
                return found
        return self.handle.problem()

    def node_ended(self, node: int, info: dict) -> Failure:
        """Why node ``node`` ended, from its record (``node<i>.json``), its log and the job's state.

        A supervisor that got an ending signal was told to end by someone (``scancel``, the time
        limit, Ctrl-C): the kind is ``cancelled`` or ``timeout`` (the Slurm job's final state decides
        when there is one), never ``exit``, even though the engine then exits with a non-zero code."""
        reason = str(info.get("reason") or "unknown")
        returncode = info.get("returncode")
        log40 = tail(self.logs[node], 40)
        if reason.startswith("signal "):
            sig = reason.split()[1]
            kind, cause = SIGNAL_CAUSES.get(sig, ("cancelled", "an ending signal"))
            job = self.handle.final_problem(wait_s=10.0)
            if job is not None and job.kind not in ("exit", "lost"):
                return Failure(job.kind, f"{job.message}; node {node}'s engine was ended on {sig}", log40, node)
            return Failure(kind, f"node {node} got {sig} ({cause}); its engine was ended (code {returncode})",
                           log40, node)
        if reason.startswith("refused: "):
            return Failure("config", f"node {node} did not start vLLM: {reason.removeprefix('refused: ')}", log40, node)
        if reason == "stop requested":
            return Failure("cancelled", f"node {node} ended on a stop request in {self.run_dir} (another driver "
                                        "ended this deployment)", log40, node)
        if reason.startswith("driver lease expired"):
            return Failure("lost", f"node {node} ended itself: {reason} (this driver stalled for longer than "
                                   f"lease_timeout_s={self.lease_timeout_s})", log40, node)
        if reason == "primary done" and node > 0:
            primary = _read(node_file(self.run_dir, 0, "json"))
            if "returncode" in primary:
                return self.node_ended(0, primary)
        return classify_exit(returncode, tail(self.logs[node], 200), node, what=f"node {node}'s engine ({reason})")

    def wait_ready(self, timeout: float | None = None, poll_s: float = 0.25) -> "Deployment":
        """Block until the API serves the model; raise :class:`DeploymentFailed` (after stopping) if not."""
        timeout = timeout or self.startup_timeout_s
        start = time.monotonic()
        last_size, last_progress = -1, time.monotonic()
        try:
            while True:
                failure = self.check()
                if failure is None:
                    size = sum(_size(p) for p in self.logs.values())
                    if size != last_size:
                        last_size, last_progress = size, time.monotonic()
                    elif time.monotonic() - last_progress > self.hang_timeout_s and self._started():
                        failure = Failure("hang", f"no log progress on any node for {self.hang_timeout_s:.0f} s "
                                                  "while starting", self.log_tail(0))
                    elif time.monotonic() - start > timeout:
                        failure = Failure("timeout", f"not ready after {timeout:.0f} s", self.log_tail(0))
                if failure is not None:
                    self.failure = failure
                    self.stop()
                    raise DeploymentFailed(failure, self.commands())
                if self.url and self._serves():
                    self.ready = True
                    self.timing["ready_s"] = time.monotonic() - self._t_start
                    self._write_record("ready")
                    return self
                time.sleep(poll_s)
        except KeyboardInterrupt:
            self.stop()
            raise

    def _started(self) -> bool:
        return all(node_file(self.run_dir, n, "json").exists() for n in range(self.topology.nodes))

    def _serves(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                data = json.loads(r.read())
            return any(m.get("id") == self.model for m in data.get("data", []))
        except (OSError, ValueError, urllib.error.URLError):
            return False

    # ---- teardown ---------------------------------------------------------------------------
    def _write_record(self, state: str, **extra: Any) -> None:
        """``deployment.json``: what a later driver needs to find and end this deployment if this one dies."""
        record = {"deployment_id": self.id, "state": state, "run_dir": str(self.run_dir),
                  "executor": getattr(self.executor, "name", type(self.executor).__name__),
                  "nodes": self.topology.nodes, "port": self.port, "grace_s": self.grace_s,
                  "lease_timeout_s": self.lease_timeout_s,
                  "driver": {"pid": os.getpid(), "host": socket.gethostname()},
                  "handle": self.handle.describe() if self.handle is not None else None,
                  "updated_at": time.time(), **extra}
        write_json(self.run_dir / RECORD, record)

    def stop(self) -> None:
        """End every process of every node (SIGTERM, SIGKILL after the grace period) and the job."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        (self.run_dir / "stop").write_text("stop")
        self._write_record("stopping")
        try:
            self.handle.stop(self.grace_s)
            self._write_record("stopped")
        finally:
            self._lease_stop.set()
            _LIVE.discard(self)
            self.timing["stop_s"] = time.monotonic() - t0

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("ready" if self.ready else "starting")
        return f"Deployment({self.topology.model!r}, nodes={self.topology.nodes}, url={self.url!r}, {state})"


def touch_lease(run_dir: Path) -> None:
    """Write ``run_dir/lease`` now: the node supervisors (and a driver-side router's) end their processes when
    it is older than their lease timeout, so a dead driver's deployment ends itself."""
    (run_dir / "lease").write_text(str(time.time()))


def renew_lease(run_dir: Path, lease_timeout_s: float | None, stop: threading.Event, owner: str) -> threading.Thread:
    """A daemon thread that renews ``run_dir/lease`` every quarter of the timeout (1–10 s) until ``stop`` is set."""
    def loop() -> None:
        interval = max(1.0, min(10.0, (lease_timeout_s or 30.0) / 4))
        while not stop.wait(interval):
            try:
                touch_lease(run_dir)
            except OSError:
                pass

    thread = threading.Thread(target=loop, daemon=True, name=f"epkit-lease-{owner}")
    thread.start()
    return thread


def with_absolute_paths(topology: Topology) -> Topology:
    """``topology`` with a relative ``model_config``, and a ``model`` that is a local folder, made absolute: every
    node runs in its own run folder (on Slurm, on another machine), where a path relative to the driver's
    working directory names nothing."""
    changes = {}
    if topology.model_config and not os.path.isabs(topology.model_config) and os.path.exists(topology.model_config):
        changes["model_config"] = os.path.abspath(topology.model_config)
    if not os.path.isabs(topology.model) and os.path.isdir(topology.model):
        changes["model"] = os.path.abspath(topology.model)
    return replace(topology, **changes) if changes else topology


def deploy(topology: Topology, executor: Any = "local", **options: Any) -> Deployment:
    """Start ``topology`` on ``executor`` (``"local"``, a :class:`LocalExecutor` or a
    :class:`SlurmExecutor`) and return the :class:`Deployment`; call ``wait_ready()`` next.
    Options: ``run_dir``, ``startup_timeout_s``, ``hang_timeout_s``, ``grace_s``,
    ``lease_timeout_s`` (nodes end themselves when the driver stops renewing its lease),
    ``env``, ``preflight``. A :class:`~epkit.topology.DisaggTopology` gives a
    :class:`~epkit.launch.disagg.DisaggDeployment` (every instance, then the router)."""
    for kind, make in DEPLOYMENT_KINDS.items():
        if isinstance(topology, kind):
            return make(topology, executor, **options)
    return Deployment(topology, executor, **options)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@atexit.register
def _stop_all() -> None:
    for d in list(_LIVE):
        try:
            d.stop()
        except Exception:
            pass
