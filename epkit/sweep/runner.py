"""Run a sweep: one deployment per topology, every pending point of it, results stored as they finish.

Points of a topology run in order against one deployment; topologies run one at a time,
or ``max_parallel`` at once on Slurm (each its own job). A deployment that fails makes every
pending point of its topology a failed point with the deployment's failure. While a point's
load runs, the deployment is watched (:class:`~epkit.launch.watch.DeploymentWatch`: node exits,
fatal log lines, the Slurm job, ``/health``): when it dies the load is cancelled at once and the
point fails with the cause's kind (``cancelled`` for a scancel, ``killed``/``exit``/``oom``… for an
engine crash), then the rest of the topology's points with it.

Before starting anything the driver takes the sweep's lock (one live driver per results folder)
and ends every deployment a killed driver left running (:mod:`epkit.launch.orphans`), so two
deployments of a sweep never run at once. Every failure is printed with its kind, message and
log as it happens and collected in ``summary["failures"]``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from epkit.errors import LaunchError
from epkit.launch import orphans
from epkit.launch.deployment import Deployment, DeploymentFailed
from epkit.launch.failure import Failure
from epkit.launch.watch import DeploymentWatch
from epkit.sweep import pd as pd_axis
from epkit.sweep.spec import SweepSpec, TopologyPoint, WorkloadPoint
from epkit.sweep.store import ResultStore


# How long a cancelled point's load thread may take to end before the driver goes on without it.
CANCEL_JOIN_S = 30.0


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _engine_log(deployment: Deployment) -> dict:
    from epkit.vllm import logs as vllm_logs

    return vllm_logs.read_engine_logs([deployment.logs[n] for n in sorted(deployment.logs)],
                                      startup=deployment.topology.engine == "vllm")


def disagg_dict(tp: TopologyPoint) -> dict:
    """A split point's parts as stored: its pd, each side's instances, the KV connector, the router."""
    return {"pd": tp.pd, **tp.disagg.to_dict()}


def hardware(deployment: Any, parts: dict | None = None) -> dict:
    """Where the engine ran: the driver's host, and each node's preflight when there was one (of a split point,
    every instance's nodes, keyed ``prefill0/0``…)."""
    from epkit.launch import doctor

    info: dict[str, Any] = {"driver_host": socket.gethostname(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    pre = {}
    for name, d in (parts or ({"": deployment} if deployment is not None else {})).items():
        for n in range(d.topology.nodes):
            p = d.run_dir / f"node{n}.preflight.json"
            if p.exists():
                try:
                    pre[f"{name}/{n}" if name else str(n)] = json.loads(p.read_text())
                except ValueError:
                    pass
    if pre:
        info["nodes"] = [{"node": int(n) if n.isdigit() else n, "host": d.get("host"),
                          "gpus": d.get("gpus", {}).get("gpus", [])} for n, d in pre.items()]
        info["preflight"] = pre
    else:
        info["gpus"] = doctor.check_gpus().get("gpus", [])
    return info


def engine_version(tp: TopologyPoint, deployment: Deployment | None) -> str | None:
    """The engine release that served: epkit's own version, or what node 0's ``<vllm_bin> --version`` said
    (recorded in ``node0.json`` before vLLM started)."""
    if tp.topology.engine == "epkit":
        from epkit import __version__

        return __version__
    if deployment is None:
        return None
    try:
        return json.loads((deployment.run_dir / "node0.json").read_text()).get("vllm", {}).get("version")
    except (OSError, ValueError):
        return None


class SweepRunner:
    """Runs the pending points of a :class:`SweepSpec` into a :class:`ResultStore`."""

    def __init__(self, spec: SweepSpec, results_root: str | Path | None = None, retry_failed: bool = False,
                 executor: Any = None, progress: bool = True, only: list[str] | None = None,
                 say: Callable[[str], None] | None = None, watch_interval_s: float = 1.0):
        self.spec = spec
        self.store = ResultStore(results_root or spec.results_dir, spec.name)
        self.retry_failed = retry_failed
        self.executor = executor or spec.make_executor()
        self.progress = progress
        self.only = set(only or [])
        self.commit = git_commit()
        self.watch_interval_s = watch_interval_s
        self._say = say
        self._lock = threading.Lock()
        self.bar = None
        self.summary: dict[str, Any] = {"deployments_started": 0, "points_ok": 0, "points_failed": 0,
                                        "points_skipped": 0, "orphans_ended": [], "failures": []}

    def say(self, message: str) -> None:
        """One line for the user (stderr, above the progress bar)."""
        line = f"sweep {self.spec.name}: {message}"
        if self._say is not None:
            self._say(line)
        elif self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

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
        """Run every pending point; raise :class:`~epkit.errors.LaunchError` if another driver runs this sweep."""
        with self.store.driver_lock():
            self.end_orphans()
            return self._run()

    def end_orphans(self) -> None:
        """End what a killed driver of this sweep left running, before anything starts."""
        for record in orphans.records(self.store.run_dirs()):
            report = orphans.end(record, say=self.say)
            if report.get("left"):
                raise LaunchError(f"deployment {record['deployment_id']} of a dead driver still runs "
                                  f"({'; '.join(report['left'])}) and could not be ended; end it by hand "
                                  "(scancel / kill), then run the sweep again")
            if report["found_running"]:
                self.summary["orphans_ended"].append(report)
            run_dir = Path(record["run_dir"])
            self.store.append_event(self.store.topology_of(run_dir), {
                **{k: record.get(k) for k in ("deployment_id", "run_dir", "executor", "handle", "driver")},
                "topology_id": self.store.topology_of(run_dir), "finished_at": _now(),
                "failure": Failure("lost", "the driver died while this deployment ran; " + (
                    f"a later driver ended it ({'; '.join(report['found_running'])})" if report["found_running"]
                    else "it had ended by itself (its lease expired)")).to_dict(), "orphan": report})

    def _run(self) -> dict:
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

    def _deploy(self, tp: TopologyPoint, run_dir: Path) -> Any:
        """The point's deployment: a :class:`Deployment`, or for a split point (pd: <p>P<d>D) a
        :class:`~epkit.launch.disagg.DisaggDeployment` whose URL is its router's."""
        if tp.disagg is not None:
            from epkit.launch.disagg import DisaggDeployment

            return DisaggDeployment(tp.disagg, self.executor, run_dir=run_dir, share_gpus=tp.share_gpus,
                                    **self._deploy_options())
        return Deployment(tp.topology, self.executor, run_dir=run_dir, **self._deploy_options())

    def run_topology(self, tp: TopologyPoint, points: list[tuple[WorkloadPoint, int]]) -> None:
        # each deployment its own folder under logs/: an orphan of a killed driver never shares one
        logs = self.store.logs_dir(tp.id) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        logs.mkdir(parents=True, exist_ok=True)
        started_at = _now()
        t0 = time.monotonic()
        deployment = None
        next_point = 0  # points before it are stored
        event: dict[str, Any] = {"started_at": started_at, "topology_id": tp.id}
        ended: Failure | None = None  # the deployment's end, which fails every point not yet run
        try:
            deployment = self._deploy(tp, logs)
            with self._lock:
                self.summary["deployments_started"] += 1
            event.update(deployment.describe())
            deployment.wait_ready()
            event["ready_s"] = time.monotonic() - t0
            while next_point < len(points) and ended is None:
                ended = deployment.check()
                if ended is None:
                    w, r = points[next_point]
                    ended = self.run_point(tp, w, r, deployment, event.get("ready_s"))
                    next_point += 1
            if ended is not None:
                event["failure"] = ended.to_dict()
                self._fail(tp, points[next_point:], ended, deployment, started_at)
        except DeploymentFailed as exc:
            event["failure"] = exc.failure.to_dict()
            self._fail(tp, points, exc.failure, deployment, started_at, exc.commands)
        except Exception as exc:  # a bug or an executor error: record it (traceback too), go on with the next topology
            failure = Failure("lost", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            event["failure"] = failure.to_dict()
            self._fail(tp, points[next_point:], failure, deployment, started_at)
        finally:
            if deployment is not None:
                deployment.stop()
                event.update(timing=deployment.timing)
            event["finished_at"] = _now()
            event["wall_s"] = time.monotonic() - t0
            self.store.append_event(tp.id, event)

    def run_point(self, tp: TopologyPoint, w: WorkloadPoint, repeat: int, deployment: Deployment,
                  ready_s: float | None) -> Failure | None:
        """Run one point against the deployment and store it; return the deployment's failure if it died
        during the point (None when it still serves, whether the point went well or not)."""
        started_at = _now()
        result, failure, bench_wall, stopped = self._watched_bench(tp, w, repeat, deployment)
        dead = failure if stopped else None
        if result is not None and result.metrics.get("completed", 0) == 0:
            errors = [e for e in result.requests.get("error", []) if e]
            failure = Failure("http", f"no request succeeded ({result.metrics.get('failed')} failed): "
                                      f"{errors[0] if errors else 'unknown error'}")
        if dead is None and (failure is None or failure.kind == "http"):
            dead = deployment.check()  # the engine died during the point: its numbers are not a result
            failure = dead or failure
        if failure is not None and failure.kind in ("http", "bench"):
            failure = replace(failure, log_tail=deployment.log_tail())
        if stopped:
            failure = replace(failure, message=f"{failure.message}; the point's load was stopped {bench_wall:.1f} s "
                                               "into it")
        status = "ok" if failure is None else "failed"
        doc = result.to_vllm_json() if (result is not None and failure is None) else {"epkit": {}}
        point = self.point_dict(tp, w, repeat, status, failure, deployment, started_at)
        point["timing"] = {"deployment_ready_s": ready_s, "bench_wall_s": bench_wall,
                           "bench_duration_s": (result.metrics.get("duration") if result is not None else None)}
        doc["epkit"]["point"] = point
        path = self.store.point_path(tp.id, w.id, repeat, w.repeats)
        self.store.write_point(path, doc, result.requests if status == "ok" else None)
        with self._lock:
            self.summary["points_ok" if status == "ok" else "points_failed"] += 1
        if failure is not None:
            self._report(tp, [(w, repeat)], failure, deployment)
        self.bar.update(1)
        return dead

    def _watched_bench(self, tp: TopologyPoint, w: WorkloadPoint, repeat: int, deployment: Deployment):
        """(result, failure, wall seconds, stopped) of the point's load, run in a thread of its own while this
        one watches the deployment; when it dies, the load is cancelled (``stopped``) within about
        ``watch_interval_s`` and the failure is the deployment's."""
        from epkit import bench

        load = {k: v for k, v in w.load.items() if v is not None or k == "max_concurrency"}
        out: dict[str, Any] = {}
        loop_known = threading.Event()

        async def load_point():
            out["loop"], out["task"] = asyncio.get_running_loop(), asyncio.current_task()
            loop_known.set()
            return await bench.arun(deployment.url, deployment.model, w.workload(), endpoint=w.endpoint,
                                    label=f"{tp.id}/{w.id}", progress=False, seed=repeat,
                                    timeout_s=self.spec.run.get("request_timeout_s", 3600.0), **load)

        def work():
            try:
                out["result"] = asyncio.run(load_point())
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                out["failure"] = Failure("bench", f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            finally:
                loop_known.set()

        def cancel():
            loop_known.wait()
            try:
                out["loop"].call_soon_threadsafe(out["task"].cancel)
            except (KeyError, RuntimeError):  # never started, or already finished
                pass
            thread.join(CANCEL_JOIN_S)
            if thread.is_alive():  # a daemon thread: it ends with the driver, but say that it is still there
                self.say(f"{tp.id}/{w.id}: the point's load did not stop within {CANCEL_JOIN_S:.0f} s of being "
                         f"cancelled; its thread {thread.name} is left running in the background (requests to "
                         "the dead deployment may still be in flight)")

        t0 = time.monotonic()
        thread = threading.Thread(target=work, name=f"epkit-load-{tp.id}-{w.id}", daemon=True)
        thread.start()
        watch = deployment.watch() if tp.disagg is not None else DeploymentWatch(deployment)
        try:
            while True:
                thread.join(self.watch_interval_s)
                if not thread.is_alive():
                    break
                dead = watch.poll()
                if dead is not None:
                    cancel()
                    return None, dead, time.monotonic() - t0, True
        except BaseException:  # Ctrl-C: stop the load too
            cancel()
            raise
        return out.get("result"), out.get("failure"), time.monotonic() - t0, False

    def _report(self, tp: TopologyPoint, points: list[tuple[WorkloadPoint, int]], failure: Failure,
                deployment: Deployment | None) -> None:
        """Say why points failed (kind, message, where the log is) and keep it for the summary."""
        log = None
        if tp.disagg is not None and deployment is not None:  # the failing instance's log (named first), else the router's
            name = failure.message.split(":", 1)[0]
            log = str(deployment.log_files().get(f"{name}/node{failure.node or 0}", deployment.log_files()["router"]))
        elif deployment is not None:
            node = failure.node if failure.node is not None else 0
            log = str(deployment.logs.get(node, deployment.logs[0]))
        paths = [str(self.store.point_path(tp.id, w.id, r, w.repeats)) for w, r in points]
        entry = {"topology_id": tp.id, "points": [self.store.stem(w.id, r, w.repeats) for w, r in points],
                 "kind": failure.kind, "message": failure.message, "log": log, "results": paths,
                 "traceback": bool(failure.traceback)}
        with self._lock:
            self.summary["failures"].append(entry)
        self.say(format_failure(entry))

    def point_dict(self, tp: TopologyPoint, w: WorkloadPoint, repeat: int, status: str, failure: Failure | None,
                   deployment: Deployment | None, started_at: str, commands: list[str] | None = None) -> dict:
        t = tp.topology
        split = tp.disagg is not None
        parts = dict(deployment.instances) if split and deployment is not None else {}
        return {
            "sweep": self.spec.name, "topology_id": tp.id, "topology": t.to_dict(),
            "derived": {"ep_size": t.ep_size, "world_size": t.world_size, "nodes": t.nodes,
                        "gpus_per_node_used": t.gpus_on_node, **pd_axis.columns(tp.pd, tp.disagg, tp.share_gpus)},
            **({"disagg": disagg_dict(tp)} if split else {}),
            "workload_id": w.id, "workload": w.to_dict(), "repeat": repeat, "status": status,
            "failure": failure.to_dict() if failure is not None else None,
            "commands": commands or (deployment.commands() if deployment is not None else []),
            "engine": t.engine, "engine_version": engine_version(tp, next(iter(parts.values()), deployment)),
            "hardware": hardware(deployment, parts), "git_commit": self.commit, "started_at": started_at,
            "finished_at": _now(), "deployment": deployment.describe() if deployment is not None else None,
            # what the engine's log says: vLLM's start-up facts (node 0), EPLB balancedness (every node); of a
            # split point, per instance
            "engine_log": ({name: _engine_log(d) for name, d in parts.items()} if split else
                           _engine_log(deployment) if deployment is not None else None),
        }

    def _fail(self, tp: TopologyPoint, points: list[tuple[WorkloadPoint, int]], failure: Failure,
              deployment: Deployment | None, started_at: str, commands: list[str] | None = None) -> None:
        for w, r in points:
            point = self.point_dict(tp, w, r, "failed", failure, deployment, started_at, commands)
            self.store.write_point(self.store.point_path(tp.id, w.id, r, w.repeats), {"epkit": {"point": point}})
            with self._lock:
                self.summary["points_failed"] += 1
            self.bar.update(1)
        if points:
            self._report(tp, points, failure, deployment)


def format_failure(entry: dict) -> str:
    """``FAILED topology: points [kind] message`` and where to look (the node log, the result files)."""
    points = entry["points"]
    shown = ", ".join(points[:4]) + (f" (+{len(points) - 4} more)" if len(points) > 4 else "")
    lines = [f"FAILED {entry['topology_id']}: {shown}: [{entry['kind']}] {entry['message']}"]
    if entry.get("log"):
        lines.append(f"    log: {entry['log']}")
    where = entry["results"][0] + (f" (+{len(entry['results']) - 1} more)" if len(entry["results"]) > 1 else "")
    lines.append(f"    result{' (with the traceback)' if entry.get('traceback') else ''}: {where}")
    return "\n".join(lines)


def run_sweep(spec: SweepSpec, results_root: str | Path | None = None, retry_failed: bool = False,
              executor: Any = None, progress: bool = True, only: list[str] | None = None,
              say: Callable[[str], None] | None = None) -> dict:
    """Run every pending point of ``spec`` (resuming from what ``results_root/<name>`` holds).

    Before anything starts, deployments that a killed driver of this sweep left running are ended;
    a second live driver of the same results folder raises :class:`~epkit.errors.LaunchError`.
    The summary counts points and deployments and lists every failure (``summary["failures"]``)."""
    return SweepRunner(spec, results_root, retry_failed, executor, progress, only, say).run()
