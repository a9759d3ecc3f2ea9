"""The per-node task: start one node's engine, supervise it, end it. Every executor runs this.

``run_node(task)`` renders the node's command from the topology (under Slurm it learns its
node index and the primary's hostname from the job environment), starts the engine in a
process group of its own with its output in ``node<i>.log``, and returns when the engine
exits or when the deployment must end: the driver wrote ``stop``, the driver's ``lease``
went stale (the driver died), the primary finished (headless nodes), or a signal came
(Slurm cancel/timeout, Ctrl-C). Ending means SIGTERM to the engine's group, SIGKILL after
``grace_s``, then a scan for any straggler carrying the deployment's tag.

Files in the run folder (shared between nodes, as submitit's folder must be): ``node<i>.json``
(argv, pid, pgid, host; then returncode and reason), ``node<i>.log``, ``primary.done``.
A sidecar: once the driver writes ``sidecar.task.json`` (``{"name", "argv", "env"}``) in the run
folder, node 0's supervisor starts that process beside its engine (the router of a disaggregated
deployment on the decode side's node 0, :mod:`epkit.launch.disagg`), records it in ``<name>.json``
with its output in ``<name>.log``, and ends it with the engine. ``python -m epkit.launch.node --sidecar
RUN_DIR LEASE_S GRACE_S`` supervises a sidecar alone (the router on the driver), with the same stop file and lease.
Run locally as ``python -m epkit.launch.node TASK.json``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epkit.launch import procs

# Flags of the primary's HTTP server, outside the topology (render.py owns the topology's flags).
SERVER_FLAGS = {"host": "--host", "port": "--port"}
END_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR2")
SIDECAR_TASK = "sidecar.task.json"
# An environment value the node replaces with its own hostname (known only on the node, e.g. under Slurm).
NODE_HOSTNAME = "<node-hostname>"


@dataclass(frozen=True)
class NodeTask:
    """What one node needs to start its part of a deployment."""

    deployment_id: str
    run_dir: str
    topology: dict[str, Any]
    port: int
    node: int | None = None  # None: from the Slurm job environment
    address: str | None = None  # None: the first node's hostname from the Slurm job environment
    host: str = "127.0.0.1"  # where the primary's HTTP server listens
    env: dict[str, str] = field(default_factory=dict)
    grace_s: float = 10.0
    lease_timeout_s: float | None = None
    poll_s: float = 0.2
    preflight: bool = False
    vllm_bin: str | None = None  # engine vllm: the command that runs vLLM's CLI (epkit.launch.vllm_install)
    vllm: dict[str, Any] | None = None  # what that command said it is, when the executor asked it on this machine

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "NodeTask":
        return cls(**json.loads(text))


def node_file(run_dir: str | Path, node: int, suffix: str) -> Path:
    return Path(run_dir) / f"node{node}.{suffix}"


def read_json(path: str | Path) -> dict:
    """A JSON file's object, or {} when it is missing or torn."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _slurm_place(task: NodeTask) -> tuple[int, str]:
    """(node index, primary address) from the Slurm job environment."""
    import submitit

    env = submitit.JobEnvironment()
    return env.node, (task.address or env.hostnames[0])


def engine_argv(topo: Any, node: int, address: str | None, host: str, port: int) -> tuple[list[str], dict]:
    """The node's rendered argv (plus the primary's --host/--port) and its extra env."""
    from epkit.topology.render import render

    launch = render(topo, address=address)[node]
    argv = list(launch.argv)
    if launch.role == "primary":
        argv += [SERVER_FLAGS["host"], host, SERVER_FLAGS["port"], str(port)]
    return argv, dict(launch.env)


def _exec_argv(argv: list[str]) -> list[str]:
    """epkit's own commands (``epkit serve``, ``epkit proxy``) run with this interpreter, so a job uses the same
    environment."""
    if argv[:1] == ["epkit"]:
        return [sys.executable, "-m", "epkit.cli", *argv[1:]]
    return argv


def _node_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`NODE_HOSTNAME` values replaced by this node's hostname."""
    return {k: socket.gethostname() if v == NODE_HOSTNAME else v for k, v in env.items()}


class Sidecar:
    """The process the driver asks node 0 to run beside its engine (``sidecar.task.json``); started at the first
    poll that finds the task, recorded in ``<name>.json`` (pid, pgid, hostname; then its returncode)."""

    def __init__(self, run_dir: Path, env: dict[str, str]):
        self.run_dir, self.env = run_dir, env
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def poll(self) -> None:
        if self.proc is None:
            spec = read_json(self.run_dir / SIDECAR_TASK)
            if spec:
                self._start(spec)
        elif "returncode" not in self.info and self.proc.poll() is not None:
            self._record(returncode=self.proc.returncode, finished_at=time.time())

    def _start(self, spec: dict) -> None:
        name = str(spec.get("name") or "sidecar")
        argv = [str(a) for a in spec["argv"]]
        with open(self.run_dir / f"{name}.log", "ab", buffering=0) as log:
            log.write(f"[epkit sidecar] {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(_exec_argv(argv), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.run_dir,
                                         env={**self.env, **_node_env(spec.get("env") or {})})
        self.info = {"name": name, "argv": argv, "pid": self.proc.pid, "pgid": self.proc.pid,
                     "hostname": socket.gethostname(), "started_at": time.time()}
        self._record()

    def _record(self, **extra: Any) -> None:
        self.info.update(extra)
        write_json(self.run_dir / f"{self.info['name']}.json", self.info)

    def pgids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def finish(self) -> None:
        if self.proc is not None and "returncode" not in self.info:
            self._record(returncode=self.proc.poll(), finished_at=time.time())


def prepare_vllm(task: NodeTask, topology: Any, argv: list[str], env: dict[str, str],
                 address: str | None) -> tuple[list[str], dict, dict, str | None]:
    """For ``vllm serve``: (argv with the node's vLLM command and its platform's flags, env to add, what the
    node's vLLM is, why it must not start or None). The refusal comes before anything starts."""
    from epkit.launch import vllm_install

    try:
        cmd = vllm_install.command(task.vllm_bin)
        if task.vllm is not None and tuple(task.vllm["command"]) == cmd:  # asked already, on this machine
            install = vllm_install.VllmInstall(cmd, task.vllm["version_full"], task.vllm["device"])
        else:
            install = vllm_install.probe(cmd, env)
    except (ValueError, RuntimeError) as exc:
        return argv, {}, {"command": task.vllm_bin}, str(exc)
    facts = install.to_dict()
    problems = vllm_install.problems(topology, install)
    if problems:
        return argv, {}, facts, "; ".join(problems)
    try:
        host = vllm_install.HostFacts.here(address if topology.nodes > 1 else None)
        extra, add_env, notes = vllm_install.platform_args(topology, install, host, env)
    except ValueError as exc:
        return argv, {}, facts, str(exc)
    facts["platform_notes"] = notes
    return [*cmd, *argv[1:], *extra], add_env, facts, None


def _end_on_signals(stop: threading.Event, reason: list[str]) -> None:
    """An ending signal sets ``stop`` and says which it was (replaces submitit's handlers: it bypasses SIGTERM
    and requeues on USR2)."""
    def on_signal(signum, _frame):
        reason.append(f"signal {signal.Signals(signum).name}")
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for name in END_SIGNALS:
            signal.signal(getattr(signal, name), on_signal)


def _finish(run_dir: Path, node: int, info: dict, started: bool = True, **ended: Any) -> dict:
    """Record how the node ended (``node<i>.json``); the end of a primary that got as far as starting (or
    refusing) its engine also ends the headless nodes (``primary.done``)."""
    info.update(**ended, finished_at=time.time())
    write_json(node_file(run_dir, node, "json"), info)
    if node == 0 and started:
        (run_dir / "primary.done").write_text(info["reason"])
    return info


def _supervise(task: NodeTask, proc: subprocess.Popen, node: int, stop: threading.Event,
               reason: list[str], sidecar: Sidecar | None = None) -> int | None:
    """Wait until the engine exits or the deployment must end (stop file, primary done, stale lease, signal);
    return the engine's exit code if it exited by itself. Node 0 also starts and watches its sidecar."""
    run_dir = Path(task.run_dir)
    while True:
        if sidecar is not None:
            sidecar.poll()
        returncode = proc.poll()
        if returncode is not None:
            reason.append("engine exited")
            return returncode
        if stop.wait(task.poll_s):
            return None
        if (run_dir / "stop").exists():
            reason.append("stop requested")
            return None
        if node > 0 and (run_dir / "primary.done").exists():
            reason.append("primary done")
            return None
        if task.lease_timeout_s is not None:
            try:
                age = time.time() - (run_dir / "lease").stat().st_mtime
            except OSError:
                age = 0.0
            if age > task.lease_timeout_s:
                reason.append(f"driver lease expired ({age:.0f} s old)")
                return None


def run_node(task: NodeTask) -> dict:
    """Run one node of a deployment to its end; return what happened (also in ``node<i>.json``)."""
    stop, reason = threading.Event(), []
    _end_on_signals(stop, reason)
    if task.node is None or (task.address is None and task.topology.get("nodes", 1) > 1):
        node, address = _slurm_place(task)
    else:
        node, address = task.node, task.address
    run_dir = Path(task.run_dir)
    info: dict[str, Any] = {"node": node, "role": "primary" if node == 0 else "headless",
                            "hostname": socket.gethostname(), "address": address, "port": task.port,
                            "supervisor_pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    preflight = None
    if task.preflight:
        from epkit.launch import doctor

        preflight = doctor.collect(ports=[task.port, task.topology.get("data_parallel_rpc_port")
                                          or task.topology.get("master_port") or 0])
        write_json(node_file(run_dir, node, "preflight.json"), preflight)
    if (run_dir / "stop").exists():  # ended before it started (a queued job of a dead driver)
        return _finish(run_dir, node, info, started=False, returncode=None, reason="stop requested")
    from epkit.topology import Topology

    topology = Topology.from_dict(task.topology)
    argv, env_add = engine_argv(topology, node, address, task.host, task.port)
    env_add = _node_env(env_add)
    env = {**os.environ, **env_add, **_node_env(task.env), procs.TAG: task.deployment_id, "EPKIT_NODE": str(node),
           "PYTHONUNBUFFERED": "1"}
    log_path = node_file(run_dir, node, "log")
    if topology.engine == "vllm":
        argv, platform_env, info["vllm"], refused = prepare_vllm(task, topology, argv, env, address)
        env_add.update(platform_env)
        env.update(platform_env)
        if refused is not None:  # the node's vLLM cannot run this topology: say why, start nothing
            with open(log_path, "ab", buffering=0) as log:
                log.write(f"[epkit node {node}] refused to start vLLM: {refused}\n".encode())
            return _finish(run_dir, node, info, returncode=None, reason=f"refused: {refused}")
    info.update(argv=argv, env=env_add, started_at=time.time())
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"[epkit node {node}] {' '.join(argv)}\n".encode())
        proc = subprocess.Popen(_exec_argv(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=run_dir)
    info.update(pid=proc.pid, pgid=proc.pid)
    write_json(node_file(run_dir, node, "json"), info)
    sidecar = Sidecar(run_dir, {k: v for k, v in env.items() if k not in env_add}) if node == 0 else None
    returncode = _supervise(task, proc, node, stop, reason, sidecar)
    procs.terminate([proc.pid] + (sidecar.pgids() if sidecar else []), task.deployment_id, node,
                    grace_s=task.grace_s)
    if sidecar is not None:
        sidecar.finish()
    if returncode is None:
        returncode = proc.poll()
    _finish(run_dir, node, info, returncode=returncode, reason=reason[0] if reason else "unknown")
    info["preflight"] = preflight
    return info


def run_sidecar(run_dir: Path, lease_timeout_s: float | None, grace_s: float = 10.0, poll_s: float = 0.2) -> int:
    """Supervise the sidecar of ``run_dir`` alone, without an engine (the router of a disaggregated deployment on
    the driver): start it from ``sidecar.task.json``, end it on the stop file, a stale driver lease or an ending
    signal; return when it has ended (or exited by itself)."""
    stop, reason = threading.Event(), []
    _end_on_signals(stop, reason)
    sidecar = Sidecar(run_dir, {**os.environ, "PYTHONUNBUFFERED": "1"})
    while not stop.wait(poll_s):
        sidecar.poll()
        if "returncode" in sidecar.info or (run_dir / "stop").exists():
            break
        if lease_timeout_s is not None:
            try:
                if time.time() - (run_dir / "lease").stat().st_mtime > lease_timeout_s:
                    break
            except OSError:
                pass
    procs.terminate(sidecar.pgids(), grace_s=grace_s)
    sidecar.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sidecar"]:  # --sidecar RUN_DIR LEASE_TIMEOUT_S|none GRACE_S
        lease = None if argv[2] == "none" else float(argv[2])
        return run_sidecar(Path(argv[1]), lease, float(argv[3]))
    task = NodeTask.from_json(Path(argv[0]).read_text())
    info = run_node(task)
    return 0 if info["returncode"] in (0, None, -15) or info["reason"] != "engine exited" else 1


if __name__ == "__main__":
    sys.exit(main())
