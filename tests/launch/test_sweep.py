"""Sweeps end to end: a Slurm sweep killed with kill -9 mid-way and resumed; failed points and
--retry-failed. Each topology is one deployment; results are the files of the results contract."""

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

from launch_helpers import no_leftovers

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]


def _sweep(spec: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epkit.cli", "sweep", str(spec), "--results", str(results),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _deployment_ids(results: Path) -> list[str]:
    ids = [json.loads(p.read_text())["deployment_id"] for p in results.glob("*/*/logs/*/node*.task.json")]
    return ids + [p.name for p in results.glob("*/*/logs/*/submitit/*")]


def test_slurm_sweep_killed_and_resumed(slurm, tmp_path):
    spec = {"name": "killed", "model": "epkit-tiny-moe", "engine": "epkit", "executor": "slurm",
            "slurm": {"timeout_min": 5, "cpus_per_task": 1, "signal_delay_s": 30},
            "defaults": {"enable_expert_parallel": True, "gpus_per_node": 2, "dp": 1},
            "topologies": {"grid": {"all2all_backend": ["allgather_reducescatter", "naive"]}},
            "workloads": [{"name": "w", "dataset": "random", "input_len": 16, "output_len": 4, "num_prompts": 6,
                           "request_rate": [8, 16]}],
            "run": {"startup_timeout_s": 120, "grace_s": 3, "lease_timeout_s": 8}}
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    first_topo = results / "killed" / "epkit_allgather_reducescatter_tp1_dp1_n1_ep"
    driver = subprocess.Popen([sys.executable, "-m", "epkit.cli", "sweep", str(path), "--results", str(results),
                               "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(first_topo.glob("*.json")) and time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.1)
    os.kill(driver.pid, signal.SIGKILL)  # mid-way: one point of the first topology is stored
    driver.wait()
    done = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in first_topo.glob("*.json")}
    assert len(done) == 1

    out = _sweep(path, results)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 already done" in out.stdout and "3 ok" in out.stdout and "2 deployments started" in out.stdout
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
    # nothing left of either run: the killed driver's deployment ended itself when its lease expired
    assert no_leftovers(_deployment_ids(results), timeout_s=30) == []

    again = _sweep(path, results)  # everything finished: no deployment starts
    assert again.returncode == 0 and "0 deployments started" in again.stdout


def test_failed_points_retried_only_on_request(tmp_path):
    spec = {"name": "bad", "model": "epkit-tiny-moe", "engine": "epkit",
            "topologies": {"extra_args": ["--no-such-flag"]},
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
    assert p["status"] == "failed" and p["failure"]["kind"] in ("config", "exit")
    assert "--no-such-flag" in p["failure"]["log_tail"] and "--no-such-flag" in p["commands"][0]
    assert "0 deployments started" in _sweep(path, results).stdout
    retry = _sweep(path, results, "--retry-failed")
    assert "1 deployments started" in retry.stdout and "1 failed" in retry.stdout
    assert no_leftovers(_deployment_ids(results)) == []
