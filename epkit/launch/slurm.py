"""Slurm executor through submitit: one job per deployment, one task per node.

Node 0 runs the primary with ``--data-parallel-address`` = its hostname (from the job
environment), the other nodes run headless with their start ranks; all run
:func:`epkit.launch.node.run_node`. submitit's defaults that hurt servers are overridden:
``timeout_min`` is always explicit, requeue is off (a preempted server is a failed point,
not a silent restart on new nodes), and the node task replaces submitit's SIGTERM bypass
and USR2 requeue handlers with a teardown of its engine.
"""

from __future__ import annotations

import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.launch.failure import Failure, classify_exit, tail
from epkit.launch.node import NodeTask, node_file, run_node

# topology/executor word -> submitit parameter (STYLE 4: one translation table per target).
SUBMITIT_PARAMS = {
    "partition": "slurm_partition",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "reservation": "slurm_additional_parameters:reservation",
    "exclusive": "slurm_exclusive",
    "mem": "slurm_mem",
    "cpus_per_task": "cpus_per_task",
    "timeout_min": "timeout_min",
    "setup": "slurm_setup",
    "srun_args": "slurm_srun_args",
    "signal_delay_s": "slurm_signal_delay_s",
    "job_name": "name",
}
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE")
STATE_KINDS = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "OUT_OF_MEMORY": "oom", "NODE_FAIL": "lost",
               "PREEMPTED": "cancelled", "BOOT_FAIL": "lost", "DEADLINE": "timeout", "FAILED": "exit",
               "COMPLETED": "exit"}


@dataclass(frozen=True)
class SlurmExecutor:
    """Where and how to submit. ``timeout_min`` is required (submitit's default is 5 minutes).

    ``gpus_per_node`` defaults to the GPUs the topology uses per node (tp × dp_local);
    ``additional`` passes any other sbatch option; ``container`` options go to srun
    (``{"image": …, "mounts": …}`` → ``--container-image`` … with pyxis).
    """

    timeout_min: int
    folder: str | None = None  # submitit's folder; default: <run_dir>/submitit
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    exclusive: bool | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    setup: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    container: Mapping[str, str] = field(default_factory=dict)
    additional: Mapping[str, Any] = field(default_factory=dict)
    signal_delay_s: int = 60
    job_name: str = "epkit"
    url_host: str | None = None  # how the driver reaches node 0 (default: its hostname)
    vllm_bin: str | None = None  # engine vllm: the command that runs vLLM's CLI on the nodes (default: vllm)
    name: str = "slurm"

    def __post_init__(self) -> None:
        if isinstance(self.timeout_min, bool) or not isinstance(self.timeout_min, int) or self.timeout_min < 1:
            raise TopologyError(f"slurm.timeout_min={self.timeout_min!r} must be an integer >= 1 (minutes); "
                                "epkit never relies on submitit's 5-minute default")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SlurmExecutor":
        keys = [k for k in cls.__dataclass_fields__ if k not in ("name", "vllm_bin")]  # vllm_bin: the spec's own key
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise TopologyError(f"slurm has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
        if "timeout_min" not in data:
            raise TopologyError("slurm.timeout_min is required (minutes per deployment job)")
        data = dict(data)
        for k in ("setup", "srun_args"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)

    def address(self) -> None:
        return None  # node 0's hostname, known inside the job

    def problems(self, topology: Any) -> list[str]:
        """Nothing is known of the nodes before the job runs: each node's preflight (``epkit doctor``), its
        vLLM (release and platform, :mod:`epkit.launch.vllm_install`) and the engine check them at start."""
        return []

    def engine_notes(self, topology: Any) -> list[str]:
        if topology.engine != "vllm":
            return []
        from epkit.launch import vllm_install

        return [f"runs `{vllm_install.vllm_bin(self.vllm_bin)}` on each node; its release and platform are "
                "checked there before it starts (platform flags are added there too)"]

    def pick_ports(self) -> tuple[int, int]:
        port = random.Random().randrange(20000, 45000, 2)
        return port, port + 1

    def parameters(self, nodes: int, gpus_per_node: int) -> dict[str, Any]:
        """The submitit parameters of a deployment over ``nodes`` nodes."""
        params: dict[str, Any] = {"nodes": nodes, "tasks_per_node": 1, "slurm_signal_delay_s": self.signal_delay_s}
        additional: dict[str, Any] = {"no_requeue": True, **self.additional}
        for word, target in SUBMITIT_PARAMS.items():
            value = getattr(self, word)
            if value in (None, (), {}):
                continue
            if target.startswith("slurm_additional_parameters:"):
                additional[target.split(":", 1)[1]] = value
            else:
                params[target] = list(value) if isinstance(value, tuple) else value
        gpus = self.gpus_per_node if self.gpus_per_node is not None else gpus_per_node
        if gpus:
            params["slurm_gpus_per_node"] = gpus
        srun = list(self.srun_args)
        for key, value in self.container.items():
            srun.append(f"--container-{key.replace('_', '-')}={value}")
        if srun:
            params["slurm_srun_args"] = srun
        params["slurm_additional_parameters"] = additional
        return params

    def launch(self, task: NodeTask, nodes: int, gpus_per_node: int = 0) -> "SlurmHandle":
        import submitit

        # A fresh folder per deployment: job ids restart after a controller reset, and submitit would
        # take an old <folder>/<id>_0_result.pkl for this job's result.
        folder = Path(self.folder or Path(task.run_dir) / "submitit") / task.deployment_id
        ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")
        ex.update_parameters(**self.parameters(nodes, gpus_per_node))
        job = ex.submit(run_node, task)
        return SlurmHandle(job, Path(task.run_dir), nodes, self.url_host)


class SlurmHandle:
    """A submitted deployment job."""

    def __init__(self, job, run_dir: Path, nodes: int, url_host: str | None):
        self.job = job
        self.run_dir = run_dir
        self.nodes = nodes
        self.url_host = url_host
        self._state = "PENDING"
        self._checked = 0.0

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def primary_host(self) -> str | None:
        from epkit.launch.local import _read

        info = _read(node_file(self.run_dir, 0, "json"))
        if not info:
            return None
        return self.url_host or info.get("hostname")

    def state(self, max_age_s: float = 2.0) -> str:
        """The job's Slurm state (sacct), refreshed at most every ``max_age_s``."""
        if time.monotonic() - self._checked > max_age_s:
            self._checked = time.monotonic()
            try:
                self._state = str(self.job.get_info(mode="force").get("State", self._state))
            except Exception:  # sacct hiccup: keep the last state
                pass
        return self._state

    def problem(self) -> Failure | None:
        state = self.state()
        base = state.split()[0]
        if base not in FINAL_STATES:
            return None
        logs = "\n".join(tail(p, 20) for p in sorted(Path(self.job.paths.folder).glob(f"{self.job_id}_*_log.*")))
        kind = STATE_KINDS.get(base, "exit")
        if kind == "exit":
            return classify_exit(None, logs, what=f"Slurm job {self.job_id} ended ({state}); engine")
        return Failure(kind, f"Slurm job {self.job_id} ended: {state}", logs)

    def final_problem(self, wait_s: float = 0.0) -> Failure | None:
        """How the job ended, waiting up to ``wait_s`` for sacct to show a final state (None if it has not)."""
        deadline = time.monotonic() + wait_s
        while True:
            problem = self.problem()
            if problem is not None or time.monotonic() >= deadline:
                return problem
            time.sleep(0.5)

    def describe(self) -> dict:
        return {"executor": "slurm", "slurm_job_id": self.job_id, "submitit_folder": str(self.job.paths.folder)}

    def stop(self, grace_s: float) -> None:
        """The node tasks end on the stop file; cancel the job if it has not ended after the grace period."""
        deadline = time.monotonic() + grace_s + 15.0
        while time.monotonic() < deadline:
            if self.state(0.5).split()[0] in FINAL_STATES:  # every task ended (sacct, not task 0's result file)
                return
            time.sleep(0.25)
        self.job.cancel(check=False)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and self.state(1.0).split()[0] not in FINAL_STATES:
            time.sleep(0.5)


def queued_state(job_id: str) -> str | None:
    """The job's state while slurmctld still lists it (``squeue``: PENDING, RUNNING, COMPLETING…), None once
    it has left the queue, ``"UNKNOWN"`` when squeue cannot answer."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "UNKNOWN"
    if out.returncode != 0:
        return None if "Invalid job id" in out.stderr else "UNKNOWN"
    return out.stdout.strip() or None


def scancel(job_id: str) -> None:
    """Cancel the job (its node tasks tear their engines down on the SIGTERM)."""
    try:
        subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass
