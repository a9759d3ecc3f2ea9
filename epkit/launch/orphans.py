"""Deployments that a dead driver left running: find them from their records and end them.

A driver writes ``deployment.json`` in each deployment's run folder before it starts anything
and marks it ``stopped`` once it has ended it (:class:`~epkit.launch.deployment.Deployment`).
After a ``kill -9`` of the driver, the node supervisors keep the engines up until the driver's
lease runs out (``lease_timeout_s``); a sweep resumed at once would start a second deployment
beside it — on GPUs a double allocation, an OOM, or skewed numbers. So a resumed sweep calls
:func:`end` on every record not ``stopped`` (it holds the sweep's driver lock, so no live driver
owns one) before it starts anything:

1. the ``stop`` file (every node supervisor ends its engine within ``grace_s``);
2. after ``grace_s`` + a margin, SIGKILL of every process carrying the deployment's tag
   (``EPKIT_DEPLOYMENT_ID``: supervisors, engines and their children), or ``scancel`` of its
   Slurm job (its id from the record, else from the submitit folder);
3. wait until nothing of it runs: no tagged process here, the job gone from ``squeue``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from epkit.launch import procs
from epkit.launch.deployment import RECORD
from epkit.launch.node import node_file, read_json, write_json
from epkit.launch.slurm import queued_state, scancel


def records(run_dirs: Iterable[Path]) -> list[dict]:
    """The records of deployments not marked stopped (oldest first)."""
    out = []
    for run_dir in run_dirs:
        record = read_json(Path(run_dir) / RECORD)
        if record and record.get("state") != "stopped":
            out.append(record)
    return sorted(out, key=lambda r: r.get("updated_at", 0.0))


def job_ids(record: dict) -> list[str]:
    """The Slurm job ids of a deployment: the recorded one, else the submitit job folders."""
    handle = record.get("handle") or {}
    if handle.get("slurm_job_id"):
        return [str(handle["slurm_job_id"])]
    folder = Path(record["run_dir"]) / "submitit" / record["deployment_id"]
    return sorted(p.name for p in folder.glob("*") if p.is_dir() and p.name.isdigit())


def _supervisors(record: dict) -> list[int]:
    """Recorded supervisor pids that still run a node task of this run folder (not a reused pid)."""
    out = []
    for pid in (record.get("handle") or {}).get("supervisor_pids", []):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "epkit.launch.node" in cmd and record["run_dir"] in cmd and procs.pid_alive(pid):
            out.append(pid)
    return out


def running(record: dict) -> list[str]:
    """What of the deployment still runs, in words (empty: nothing)."""
    out = []
    pids = sorted({p.pid for p in procs.tagged(record["deployment_id"])} | set(_supervisors(record)))
    if pids:
        out.append(f"{len(pids)} process(es) here (pids {' '.join(map(str, pids[:12]))}"
                   f"{' …' if len(pids) > 12 else ''})")
    if record.get("executor") == "slurm":
        for job in job_ids(record):
            state = queued_state(job)
            if state is not None:
                out.append(f"Slurm job {job} ({state})")
    return out


def _kill_local(record: dict) -> None:
    pgids = [read_json(node_file(record["run_dir"], n, "json")).get("pgid") for n in range(record.get("nodes", 1))]
    for pid in _supervisors(record):
        procs.kill(pid, signal.SIGKILL)
    procs.terminate([p for p in pgids if p], record["deployment_id"], grace_s=0.0)


def end(record: dict, say: Callable[[str], None] = print, margin_s: float = 10.0) -> dict:
    """End the deployment of ``record`` and wait until nothing of it runs; return what was done."""
    t0 = time.monotonic()
    run_dir = Path(record["run_dir"])
    alive = running(record)
    report = {"deployment_id": record["deployment_id"], "run_dir": str(run_dir), "found_running": alive,
              "driver": record.get("driver"), "how": None}
    if alive:
        driver = record.get("driver") or {}
        say(f"deployment {record['deployment_id']} of a driver that is gone (pid {driver.get('pid')} on "
            f"{driver.get('host')}) still runs: {'; '.join(alive)}; ending it before starting anything")
        try:
            (run_dir / "stop").write_text("stop")
            report["how"] = "stop file"
        except OSError:
            pass
        slurm_jobs = job_ids(record) if record.get("executor") == "slurm" else []
        for job in slurm_jobs:
            if queued_state(job) == "PENDING":  # its tasks have not started: nothing to end gracefully
                scancel(job)
                report["how"] = "scancel"
        grace = float(record.get("grace_s") or 10.0)
        deadline = time.monotonic() + grace + margin_s
        while running(record) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running(record):
            report["how"] = "scancel" if slurm_jobs else "SIGKILL"
            for job in slurm_jobs:
                scancel(job)
            _kill_local(record)
            deadline = time.monotonic() + 60.0
            while running(record) and time.monotonic() < deadline:
                time.sleep(0.5)
        left = running(record)
        report["left"] = left
        if left:
            say(f"deployment {record['deployment_id']}: could not end {'; '.join(left)}")
        else:
            say(f"deployment {record['deployment_id']} ended ({report['how']}) in {time.monotonic() - t0:.1f} s")
    report["ended_s"] = time.monotonic() - t0
    if not report.get("left"):
        updated = {**read_json(run_dir / RECORD), "state": "stopped", "ended_by": "a later driver (orphan)",
                   "ended_at": time.time()}
        write_json(run_dir / RECORD, updated)
    return report

