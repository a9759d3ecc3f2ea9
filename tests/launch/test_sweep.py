"""Sweeps end to end: a Slurm sweep killed with kill -9 mid-way and resumed at once (the orphaned job is
ended first: never two deployments at a time); failed points and --retry-failed. Each topology is one
deployment; results are the files of the results contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch_helpers import DeploymentSampler, end_leftovers, no_leftovers

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _end_leftovers(tmp_path):
    """A test that fails mid-sweep leaves nothing running: its drivers get Ctrl-C, then every deployment recorded
    under tmp_path that is not stopped is ended (a killed driver's Slurm job would otherwise run until its lease,
    5 minutes, runs out)."""
    yield
    left = [r for r in end_leftovers(tmp_path) if r.get("left")]
    assert not left, f"teardown could not end: {left}"


def _sweep(spec: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epkit.cli", "sweep", str(spec), "--results", str(results),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _deployment_ids(results: Path) -> list[str]:
    ids = [json.loads(p.read_text())["deployment_id"] for p in results.glob("*/*/logs/*/node*.task.json")]
    return ids + [p.name for p in results.glob("*/*/logs/*/submitit/*")]


def test_slurm_sweep_killed_and_resumed(slurm, tmp_path):
    spec = {"name": "killed", "model": "epkit-tiny-moe", "engine": "epkit", "executor": "slurm",
            "slurm": {"timeout_min": 5, "cpus_per_task": 1, "signal_delay_s": 30},
            "defaults": {"enable_expert_parallel": True, "gpus_per_node": 2, "dp": 1,
                         "all2all_backend": "allgather_reducescatter"},
            "topologies": {"grid": {"extra_args": [[], ["--max-num-seqs", "16"]]}},  # two deployments
            "workloads": [{"name": "w", "dataset": "random", "input_len": 16, "output_len": 4, "num_prompts": 6,
                           "request_rate": [8, 16]}],
            "run": {"startup_timeout_s": 120, "grace_s": 3, "lease_timeout_s": 300}}  # the orphan would outlive the test
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    first_topo = results / "killed" / "epkit_allgather_reducescatter_tp1_dp1_n1_ep"
    with DeploymentSampler(interval_s=0.2, slurm=True) as sampler:
        driver = subprocess.Popen([sys.executable, "-m", "epkit.cli", "sweep", str(path), "--results", str(results),
                                   "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 180
        while not list(first_topo.glob("*.json")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)  # mid-way: one point of the first topology is stored
        driver.wait()
        (orphan_job,) = [p.name for p in first_topo.glob("logs/*/submitit/*/*") if p.name.isdigit()]
        done = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first_topo.glob("*.json")}
        assert len(done) == 1

        out = _sweep(path, results)  # at once
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 already done" in out.stdout and "3 ok" in out.stdout and "2 deployments started" in out.stdout
    assert f"Slurm job {orphan_job} (RUNNING)" in out.stderr and "ending it before starting anything" in out.stderr
    jobs = {p.name: p.parent.name for p in results.glob("killed/*/logs/*/submitit/*/*") if p.name.isdigit()}
    assert len(jobs) == 3  # the orphan and one job per topology of the resumed run
    timeline = sampler.running(set(jobs.values()), jobs)  # tagged engine processes and queued jobs
    assert max(len(seen) for _, seen in timeline) == 1, [s for s in timeline if len(s[1]) > 1][:3]
    assert sum(jobs[orphan_job] in seen for _, seen in timeline) > 0
    for name, (data, mtime) in done.items():  # the finished point was neither rerun nor rewritten
        p = first_topo / name
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime
    points = sorted(results.glob("killed/*/*.json"))
    assert len(points) == 4
    for p in points:
        doc = json.loads(p.read_text())
        point = doc["epkit"]["point"]
        assert point["status"] == "ok" and doc["completed"] == 6
        assert point["derived"]["ep_size"] == 1 and point["engine"] == "epkit"
        assert point["hardware"]["preflight"]["0"]["host"] == "n1" or point["hardware"]["nodes"]
        assert Path(str(p).replace(".json", ".requests.parquet")).exists()
    assert (results / "killed" / "sweep.yaml").exists()
    # nothing left of either run: the resumed driver ended the killed one's job before starting its own
    assert no_leftovers(_deployment_ids(results), timeout_s=30) == []

    again = _sweep(path, results)  # everything finished: no deployment starts
    assert again.returncode == 0 and "0 deployments started" in again.stdout


def test_failed_points_retried_only_on_request(tmp_path):
    # the engine's parser accepts the flag (so the sweep starts), the engine fails at start: no KV cache
    spec = {"name": "bad", "model": "epkit-tiny-moe", "engine": "epkit",
            "topologies": {"extra_args": ["--kv-cache-memory-bytes", "1"]},
            "workloads": [{"dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 2}],
            "run": {"startup_timeout_s": 60, "grace_s": 2}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    out = _sweep(path, results)
    assert out.returncode == 1 and "1 failed" in out.stdout
    (point,) = results.glob("bad/*/*.json")
    doc = json.loads(point.read_text())
    assert set(doc) == {"epkit"}  # no metrics in a failed point
    p = doc["epkit"]["point"]
    assert p["status"] == "failed" and p["failure"]["kind"] == "exit"
    assert "KV cache" in p["failure"]["log_tail"] and "--kv-cache-memory-bytes 1" in p["commands"][0]
    # each failure printed with its kind, message and where the log is
    (log,) = results.glob("bad/*/logs/*/node0.log")
    assert f"{point.stem}: [exit] node 0's engine" in out.stdout and f"log: {log}" in out.stdout
    assert "0 deployments started" in _sweep(path, results).stdout
    retry = _sweep(path, results, "--retry-failed")
    assert "1 deployments started" in retry.stdout and "1 failed" in retry.stdout
    assert no_leftovers(_deployment_ids(results)) == []
