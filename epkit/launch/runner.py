"""Run a sweep: one deployment per topology, every pending point of it, results stored as they finish.

Points of a topology run in order against one deployment; topologies run one at a time,
or ``max_parallel`` at once on Slurm (each its own job). A deployment that fails makes every
pending point of its topology a failed point with the deployment's failure; an engine that
dies mid-way fails the point it was serving and the rest.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from epkit.launch.deployment import Deployment, DeploymentFailed
from epkit.launch.failure import Failure
from epkit.store import ResultStore
from epkit.sweep import SweepSpec, TopologyPoint, WorkloadPoint


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def hardware(deployment: Deployment | None) -> dict:
    """Where the engine ran: the driver's host, and each node's preflight when there was one."""
    from epkit.launch import doctor

    info: dict[str, Any] = {"driver_host": socket.gethostname(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    pre = {}
    if deployment is not None:
        for n in range(deployment.topology.nodes):
            p = deployment.run_dir / f"node{n}.preflight.json"
            if p.exists():
                try:
                    pre[str(n)] = json.loads(p.read_text())
                except ValueError:
                    pass
    if pre:
        info["nodes"] = [{"node": int(n), "host": d.get("host"), "gpus": d.get("gpus", {}).get("gpus", [])}
                         for n, d in pre.items()]
        info["preflight"] = pre
    else:
        info["gpus"] = doctor.check_gpus().get("gpus", [])
    return info


def engine_version(tp: TopologyPoint, deployment: Deployment | None) -> str | None:
    if tp.topology.engine == "epkit":
        from epkit import __version__

        return __version__
    if deployment is not None:
        p = deployment.run_dir / "node0.preflight.json"
        if p.exists():
            return json.loads(p.read_text()).get("vllm", {}).get("version")
    return None


class SweepRunner:
    """Runs the pending points of a :class:`SweepSpec` into a :class:`ResultStore`."""

    def __init__(self, spec: SweepSpec, results_root: str | Path | None = None, retry_failed: bool = False,
                 executor: Any = None, progress: bool = True, only: list[str] | None = None):
        self.spec = spec
        self.store = ResultStore(results_root or spec.results_dir, spec.name)
        self.retry_failed = retry_failed
        self.executor = executor or spec.make_executor()
        self.progress = progress
        self.only = set(only or [])
        self.commit = git_commit()
        self._lock = threading.Lock()
        self.summary = {"deployments_started": 0, "points_ok": 0, "points_failed": 0, "points_skipped": 0}

    # ---- what is left --------------------------------------------------------------------
    def done(self) -> dict[tuple[str, str, int], str]:
        out = {}
        for tp in self.spec.topologies:
            for w in self.spec.workloads:
                for r in range(w.repeats):
                    st = self.store.status(self.store.point_path(tp.id, w.id, r, w.repeats))
                    if st is not None:
                        out[(tp.id, w.id, r)] = st
        return out

    def pending(self, tp: TopologyPoint, done: dict) -> list[tuple[WorkloadPoint, int]]:
        skip = ("ok", "failed") if not self.retry_failed else ("ok",)
        return [(w, r) for w in self.spec.workloads for r in range(w.repeats) if done.get((tp.id, w.id, r)) not in skip]

    # ---- running -------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm.auto import tqdm

        self.store.write_spec(self.spec.source_text or json.dumps({"name": self.spec.name}))
        done = self.done()
        todo = [(tp, self.pending(tp, done)) for tp in self.spec.topologies if not self.only or tp.id in self.only]
        total = sum(len(p) for _, p in todo)
        self.summary["points_skipped"] = sum(w.repeats for w in self.spec.workloads) * len(todo) - total
        self.bar = tqdm(total=total, desc=f"sweep {self.spec.name}", unit="point", disable=not self.progress,
                        file=sys.stderr)
        todo = [(tp, p) for tp, p in todo if p]
        t0 = time.monotonic()
        if self.spec.max_parallel > 1 and len(todo) > 1:
            with concurrent.futures.ThreadPoolExecutor(self.spec.max_parallel) as pool:
                for f in [pool.submit(self.run_topology, tp, p) for tp, p in todo]:
                    f.result()
        else:
            for tp, points in todo:
                self.run_topology(tp, points)
        self.bar.close()
        self.summary["wall_s"] = time.monotonic() - t0
        return self.summary

    def _deploy_options(self) -> dict:
        run = self.spec.run
        opts = {k: run[k] for k in ("startup_timeout_s", "hang_timeout_s", "grace_s", "lease_timeout_s") if k in run}
        return opts

    def run_topology(self, tp: TopologyPoint, points: list[tuple[WorkloadPoint, int]]) -> None:
        # each deployment its own folder under logs/: an orphan of a killed driver never shares one
        logs = self.store.logs_dir(tp.id) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        logs.mkdir(parents=True, exist_ok=True)
        started_at = _now()
        t0 = time.monotonic()
        deployment = None
        event: dict[str, Any] = {"started_at": started_at, "topology_id": tp.id}
        try:
            deployment = Deployment(tp.topology, self.executor, run_dir=logs, **self._deploy_options())
            with self._lock:
                self.summary["deployments_started"] += 1
            event.update(deployment.describe())
            deployment.wait_ready()
            event["ready_s"] = time.monotonic() - t0
            for i, (w, r) in enumerate(points):
                failure = deployment.check()
                if failure is not None:
                    self._fail(tp, points[i:], failure, deployment, started_at)
                    event["failure"] = failure.to_dict()
                    break
                self.run_point(tp, w, r, deployment, event.get("ready_s"))
        except DeploymentFailed as exc:
            event["failure"] = exc.failure.to_dict()
            self._fail(tp, points, exc.failure, deployment, started_at, exc.commands)
        except Exception as exc:  # a bug or an executor error: record it, go on with the next topology
            failure = Failure("lost", f"{type(exc).__name__}: {exc}")
            event["failure"] = failure.to_dict()
            self._fail(tp, points, failure, deployment, started_at)
        finally:
            if deployment is not None:
                deployment.stop()
                event.update(timing=deployment.timing)
            event["finished_at"] = _now()
            event["wall_s"] = time.monotonic() - t0
            self.store.append_event(tp.id, event)

    def run_point(self, tp: TopologyPoint, w: WorkloadPoint, repeat: int, deployment: Deployment,
                  ready_s: float | None) -> None:
        from epkit import bench

        started_at, t0 = _now(), time.monotonic()
        load = {k: v for k, v in w.load.items() if v is not None or k == "max_concurrency"}
        failure, result = None, None
        try:
            result = bench.run(deployment.url, tp.topology.model, w.workload(), endpoint=w.endpoint,
                               label=f"{tp.id}/{w.id}", progress=False, seed=repeat,
                               timeout_s=self.spec.run.get("request_timeout_s", 3600.0), **load)
        except Exception as exc:
            failure = Failure("bench", f"{type(exc).__name__}: {exc}")
        bench_wall = time.monotonic() - t0
        if result is not None and result.metrics.get("completed", 0) == 0:
            errors = [e for e in result.requests.get("error", []) if e]
            failure = Failure("http", f"no request succeeded ({result.metrics.get('failed')} failed): "
                                      f"{errors[0] if errors else 'unknown error'}")
        if failure is None:
            dead = deployment.check()  # the engine died during the point: its numbers are not a result
            if dead is not None:
                failure = dead
        status = "ok" if failure is None else "failed"
        if failure is not None and failure.kind in ("http", "bench"):
            failure = Failure(failure.kind, failure.message, deployment.log_tail(0), failure.node)
        doc = result.to_vllm_json() if (result is not None and failure is None) else {"epkit": {}}
        point = self.point_dict(tp, w, repeat, status, failure, deployment, started_at)
        point["timing"] = {"deployment_ready_s": ready_s, "bench_wall_s": bench_wall,
                           "bench_duration_s": (result.metrics.get("duration") if result is not None else None)}
        doc["epkit"]["point"] = point
        path = self.store.point_path(tp.id, w.id, repeat, w.repeats)
        self.store.write_point(path, doc, result.requests if status == "ok" else None)
        with self._lock:
            self.summary["points_ok" if status == "ok" else "points_failed"] += 1
        self.bar.update(1)

    def point_dict(self, tp: TopologyPoint, w: WorkloadPoint, repeat: int, status: str, failure: Failure | None,
                   deployment: Deployment | None, started_at: str, commands: list[str] | None = None) -> dict:
        t = tp.topology
        return {
            "sweep": self.spec.name, "topology_id": tp.id, "topology": t.to_dict(),
            "derived": {"ep_size": t.ep_size, "world_size": t.world_size, "nodes": t.nodes,
                        "gpus_per_node_used": t.gpus_on_node},
            "workload_id": w.id, "workload": w.to_dict(), "repeat": repeat, "status": status,
            "failure": failure.to_dict() if failure is not None else None,
            "commands": commands or (deployment.commands() if deployment is not None else []),
            "engine": t.engine, "engine_version": engine_version(tp, deployment),
            "hardware": hardware(deployment), "git_commit": self.commit, "started_at": started_at,
            "finished_at": _now(), "deployment": deployment.describe() if deployment is not None else None,
        }

    def _fail(self, tp: TopologyPoint, points: list[tuple[WorkloadPoint, int]], failure: Failure,
              deployment: Deployment | None, started_at: str, commands: list[str] | None = None) -> None:
        for w, r in points:
            point = self.point_dict(tp, w, r, "failed", failure, deployment, started_at, commands)
            self.store.write_point(self.store.point_path(tp.id, w.id, r, w.repeats), {"epkit": {"point": point}})
            with self._lock:
                self.summary["points_failed"] += 1
            self.bar.update(1)


def run_sweep(spec: SweepSpec, results_root: str | Path | None = None, retry_failed: bool = False,
              executor: Any = None, progress: bool = True, only: list[str] | None = None) -> dict:
    """Run every pending point of ``spec`` (resuming from what ``results_root/<name>`` holds)."""
    return SweepRunner(spec, results_root, retry_failed, executor, progress, only).run()
