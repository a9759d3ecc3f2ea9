"""Helpers for the launch tests: process-table checks, greedy completions."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from epkit.launch import procs

TINY = "epkit-tiny-moe"


def no_leftovers(deployment_ids, timeout_s: float = 20.0) -> list:
    """Wait until no process carries any of these deployments' tags; return what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for d in deployment_ids for p in procs.tagged(d)]
        left += [p for p in procs.processes() if any(d in p.cmdline for d in deployment_ids)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def served(url: str) -> float:
    """Requests the engine has finished (its request-success counter, vLLM's name, which the built-in engine
    shares; 0 while unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return max([sum(s.value for s in fam.samples if s.name.endswith("_total"))
                for fam in text_string_to_metric_families(text) if fam.name.endswith("request_success")] or [0.0])


def vllm_processes(vllm_cli: str, timeout_s: float = 30.0) -> list:
    """Wait until no process runs from the real vLLM venv (``vllm serve``, its EngineCore and workers: every
    one's command line names the venv's python or bin/); return what is left."""
    venv = str(Path(vllm_cli).parents[1])
    me = os.getpid()
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in procs.processes() if p.pid != me and venv in p.cmdline]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def end_leftovers(root: Path, grace_s: float = 30.0) -> list[dict]:
    """End what a failed test left running under ``root`` (its tmp_path): first every sweep driver whose
    command names ``root`` (Ctrl-C, so it stops its own deployment; SIGKILL after ``grace_s``), then every
    deployment recorded there (``deployment.json``) and not marked stopped, as a resumed sweep ends a killed
    driver's (:func:`epkit.launch.orphans.end`: the stop file, then SIGKILL by tag or scancel). Returns
    :func:`~epkit.launch.orphans.end`'s reports."""
    from epkit.launch import orphans
    from epkit.launch.deployment import RECORD

    me, where = os.getpid(), str(root)
    drivers = [p.pid for p in procs.processes()
               if p.pid != me and "epkit.cli sweep" in p.cmdline and where in p.cmdline]
    for pid in drivers:
        procs.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while any(procs.pid_alive(pid) for pid in drivers) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in drivers:
        if procs.pid_alive(pid):
            procs.kill(pid, signal.SIGKILL)
    run_dirs = sorted({path.parent for path in Path(root).rglob(RECORD)})
    return [orphans.end(record, say=lambda line: print(f"teardown: {line}")) for record in orphans.records(run_dirs)]


def greedy(url: str, prompts: list[list[int]], max_tokens: int = 8) -> list[str]:
    """Greedy completions of token-id prompts (temperature 0)."""
    out = []
    for prompt in prompts:
        body = json.dumps({"model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        out.append(data["choices"][0]["text"])
    return out


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [100, 50, 25, 12, 6, 3], list(range(40, 72))]


class DeploymentSampler:
    """Samples, in a thread, which deployments have live processes (their ``EPKIT_DEPLOYMENT_ID`` tag) and,
    with ``slurm=True``, which Slurm jobs are queued, from start to stop of the ``with`` block."""

    def __init__(self, interval_s: float = 0.05, slurm: bool = False):
        import threading

        self.interval_s = interval_s
        self.slurm = slurm
        self.samples: list[tuple[float, dict[str, list[int]], set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import subprocess

        while not self._stop.is_set():
            live = {d: [p.pid for p in ps] for d, ps in procs.by_deployment().items()}
            jobs: set[str] = set()
            if self.slurm:
                out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
                jobs = set(out.stdout.split())
            self.samples.append((time.monotonic(), live, jobs))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "DeploymentSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def running(self, deployment_ids, job_to_deployment: dict[str, str] | None = None) -> list[tuple[float, set]]:
        """Per sample: the set of these deployments that had a live process or a queued job."""
        ids = set(deployment_ids)
        job_to_deployment = job_to_deployment or {}
        out = []
        for t, live, jobs in self.samples:
            seen = {d for d in live if d in ids} | {job_to_deployment[j] for j in jobs if j in job_to_deployment}
            out.append((t, seen))
        return out
