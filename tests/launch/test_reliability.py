"""Sweeps that survive what happens to them: a driver killed with kill -9 and resumed at once (never two
deployments of the sweep at the same moment), a deployment that dies in the middle of a point (an engine
crash locally, a scancel of a 2-node Slurm job: the point ends within seconds with the right kind and the
load stops), failures printed with kind, message and log, points refused before anything starts when the
engine cannot run them, and the traceback of an exception kept in its "lost" record.

Real engine processes and the real Slurm cluster; no timing assertion tighter than a wide margin against a
schedule many times longer."""

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

from epkit.cli.sweep import main as sweep_main
from epkit.sweep.store import ResultStore
from launch_helpers import TINY, DeploymentSampler, end_leftovers, no_leftovers, served

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
# A point whose load schedule lasts 200 s (400 requests at 2 req/s): a watched point ends long before.
LONG = {"name": "long", "dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 400, "request_rate": 2}
SHORT = {"name": "short", "dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 2}
SCHEDULE_S = 200.0


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


_DRIVERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_drivers(tmp_path):
    """A test that fails while its sweep runs leaves nothing behind: Ctrl-C (the driver stops its deployment),
    then every deployment recorded under tmp_path that is not stopped is ended (the orphan of a killed driver
    would otherwise live until its lease runs out: 10 minutes here)."""
    yield
    while _DRIVERS:
        driver = _DRIVERS.pop()
        if driver.poll() is None:
            driver.send_signal(signal.SIGINT)
            try:
                driver.wait(60)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
    left = [r for r in end_leftovers(tmp_path) if r.get("left")]
    assert not left, f"teardown could not end: {left}"


def _driver(spec: Path, results: Path, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "epkit.cli", "sweep", str(spec), "--results", str(results),
                                   "--no-progress", *extra], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    _DRIVERS.append(driver)
    return driver


def _wait(what: str, cond, timeout_s: float = 240.0, driver: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the sweep ended (code {driver.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _record(results: Path) -> dict | None:
    """The newest deployment record (deployment.json) under the results, once its port is known."""
    records = [json.loads(p.read_text()) for p in results.glob("*/*/logs/*/deployment.json")]
    records = [r for r in records if r.get("handle")]
    return max(records, key=lambda r: r["run_dir"]) if records else None


def _point(results: Path, name: str) -> dict:
    (path,) = results.glob(f"*/*/{name}.json")
    return json.loads(path.read_text())["epkit"]["point"]


def _deployment_ids(results: Path) -> list[str]:
    return [json.loads(p.read_text())["deployment_id"] for p in results.glob("*/*/logs/*/deployment.json")]


def test_kill9_then_immediate_resume_never_runs_two_deployments(tmp_path):
    """kill -9 of the driver in the middle of a point, resumed at once: the resumed driver ends the orphan
    (whose lease would keep it alive for 10 minutes) before it starts its own deployment."""
    spec = _write(tmp_path, {
        "name": "k9", "model": TINY, "engine": "epkit", "topologies": {"dp": 1},
        "workloads": [SHORT, {**LONG, "name": "rest", "num_prompts": 24, "request_rate": 4}],
        "run": {"startup_timeout_s": 180, "grace_s": 2, "lease_timeout_s": 600}})
    results = tmp_path / "results"
    with DeploymentSampler() as sampler:
        first = _driver(spec, results, tmp_path / "first.log")
        record = _wait("the first point", lambda: list(results.glob("k9/*/short.json")) and _record(results),
                       driver=first)
        url = f"http://127.0.0.1:{record['port']}"
        _wait("requests of the second point", lambda: served(url) > SHORT["num_prompts"], driver=first)
        os.kill(first.pid, signal.SIGKILL)  # mid-point: the second point's load is running
        first.wait()
        killed_at = time.monotonic()
        short = next(results.glob("k9/*/short.json"))
        kept = (short.read_bytes(), short.stat().st_mtime_ns)
        resumed = _driver(spec, results, tmp_path / "resumed.log")  # at once
        assert resumed.wait(300) == 0, (tmp_path / "resumed.log").read_text()
    out = (tmp_path / "resumed.log").read_text()
    orphan = record["deployment_id"]
    assert f"deployment {orphan} of a driver that is gone (pid {first.pid}" in out and "ending it before" in out
    assert f"deployment {orphan} ended (stop file)" in out
    assert "1 ok, 0 failed, 1 already done; 1 deployments started" in out
    assert (short.read_bytes(), short.stat().st_mtime_ns) == kept  # the finished point was not rerun
    ids = _deployment_ids(results)
    assert len(ids) == 2 and orphan in ids
    timeline = sampler.running(ids)
    assert max(len(seen) for _, seen in timeline) == 1, [s for s in timeline if len(s[1]) > 1][:3]
    after_kill = [seen for t, seen in timeline if t > killed_at]
    assert any(orphan in seen for seen in after_kill)  # the orphan was alive when the resumed driver started
    (new,) = set(ids) - {orphan}
    assert any(new in seen for seen in after_kill)
    assert json.loads((Path(record["run_dir"]) / "deployment.json").read_text())["state"] == "stopped"
    events = [json.loads(line) for p in results.glob("k9/*/deployments.jsonl") for line in p.read_text().splitlines()]
    (lost,) = [e for e in events if e.get("deployment_id") == orphan]
    assert lost["failure"]["kind"] == "lost" and lost["orphan"]["found_running"]
    assert no_leftovers(ids) == []


def test_engine_crash_mid_point_ends_the_point_at_once(tmp_path):
    spec = _write(tmp_path, {"name": "crash", "model": TINY, "engine": "epkit", "topologies": {"dp": 1},
                             "workloads": [LONG, SHORT], "run": {"startup_timeout_s": 180, "grace_s": 2}})
    results = tmp_path / "results"
    driver = _driver(spec, results, tmp_path / "driver.log")
    record = _wait("the deployment", lambda: _record(results), driver=driver)
    _wait("requests being served", lambda: served(f"http://127.0.0.1:{record['port']}") > 0, driver=driver)
    node0 = json.loads((Path(record["run_dir"]) / "node0.json").read_text())
    os.killpg(node0["pgid"], signal.SIGKILL)  # the engine crashes in the middle of the 200 s schedule
    assert driver.wait(120) == 1
    out = (tmp_path / "driver.log").read_text()
    point = _point(results, "long_rate2")
    assert point["status"] == "failed" and point["failure"]["kind"] == "killed"
    assert "the point's load was stopped" in point["failure"]["message"]
    assert point["timing"]["bench_wall_s"] < SCHEDULE_S / 2  # the watch ended it, not the schedule
    after = _point(results, "short")  # the next point does not run against a dead deployment
    assert after["status"] == "failed" and after["failure"]["kind"] == "killed"
    log = Path(record["run_dir"]) / "node0.log"
    assert f"FAILED {point['topology_id']}: long_rate2: [killed]" in out and f"log: {log}" in out
    assert "FAILED" in out.split("0 ok, 2 failed")[1]  # printed again under the summary
    assert no_leftovers([record["deployment_id"]]) == []


def test_scancel_of_two_node_slurm_job_mid_point_is_cancelled(slurm, tmp_path):
    spec = _write(tmp_path, {
        "name": "scancel", "model": TINY, "engine": "epkit", "executor": "slurm",
        "slurm": {"timeout_min": 5, "cpus_per_task": 2, "signal_delay_s": 30},
        "defaults": {"gpus_per_node": 2, "enable_expert_parallel": True, "all2all_backend": "allgather_reducescatter"},
        "topologies": {"dp": 2, "nodes": 2}, "workloads": [LONG, SHORT], "run": {"startup_timeout_s": 180, "grace_s": 3}})
    results = tmp_path / "results"
    driver = _driver(spec, results, tmp_path / "driver.log")
    record = _wait("the Slurm job", lambda: _record(results), driver=driver)
    job = record["handle"]["slurm_job_id"]
    _wait("the primary on n1", lambda: (Path(record["run_dir"]) / "node0.json").exists(), driver=driver)
    _wait("requests being served", lambda: served(f"http://n1:{record['port']}") > 0, driver=driver)
    subprocess.run(["scancel", job], check=True)
    assert driver.wait(180) == 1
    out = (tmp_path / "driver.log").read_text()
    point = _point(results, "long_rate2")
    assert point["status"] == "failed" and point["failure"]["kind"] == "cancelled", point["failure"]
    assert f"Slurm job {job}" in point["failure"]["message"] and "load was stopped" in point["failure"]["message"]
    assert point["timing"]["bench_wall_s"] < SCHEDULE_S / 2
    assert _point(results, "short")["failure"]["kind"] == "cancelled"
    assert f"long_rate2: [cancelled] Slurm job {job}" in out
    assert no_leftovers([record["deployment_id"]]) == []


def test_dry_run_refuses_points_the_engine_cannot_run(tmp_path, capsys, monkeypatch, vllm_python):
    base = {"name": "r", "engine": "epkit", "model": TINY, "defaults": {"enable_expert_parallel": True,
            "gpus_per_node": 2}, "workloads": [SHORT]}
    cases = [  # (spec, what the refusal must name)
        ({**base, "topologies": {"dp": 2, "all2all_backend": "deepep_low_latency"}},
         ["epkit_deepep_low_latency_tp1_dp2_n1_ep cannot run", "DeepEP", "deep_ep", "allgather_reducescatter"]),
        ({**base, "topologies": {"dp": 1, "tp": 2}}, ["cannot run", "tensor_parallel_size=2"]),
        ({**base, "engine": "vllm", "vllm_version": "0.32.0", "model": "Qwen/Qwen3-30B-A3B",
          "topologies": {"dp": 2, "all2all_backend": "pplx"}}, ["pplx", "falls back to 'allgather_reducescatter'"]),
        ({**base, "engine": "vllm", "model": "Qwen/Qwen3-30B-A3B",
          "topologies": {"dp": 2, "all2all_backend": "deepep_high_throughput"}},
         ["cannot run", "DeepEP", f"{vllm_python.parent}/vllm"]),
    ]
    monkeypatch.setenv("PATH", f"{vllm_python.parent}{os.pathsep}{os.environ['PATH']}")
    for i, (spec, words) in enumerate(cases):
        path = tmp_path / f"refuse{i}.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert sweep_main([str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(w in err for w in words), (words, err)


def test_lost_point_keeps_the_traceback_and_prints_it(slurm, tmp_path):
    """An executor error (sbatch refuses a partition that does not exist) becomes a lost point whose record
    keeps the traceback; the failure is printed with its kind and message."""
    spec = _write(tmp_path, {"name": "lost", "model": TINY, "engine": "epkit", "executor": "slurm",
                             "slurm": {"timeout_min": 5, "partition": "no-such-partition"},
                             "topologies": {"dp": 1}, "workloads": [SHORT]})
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, "-m", "epkit.cli", "sweep", str(spec), "--results", str(results),
                          "--no-progress"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    failure = _point(results, "short")["failure"]
    assert failure["kind"] == "lost" and "no-such-partition" in failure["message"].lower() + failure["traceback"]
    assert "Traceback (most recent call last)" in failure["traceback"] and "submitit" in failure["traceback"]
    assert "short: [lost]" in out.stdout and "(with the traceback)" in out.stdout


def test_second_driver_of_a_sweep_is_refused(tmp_path):
    spec = _write(tmp_path, {"name": "locked", "model": TINY, "engine": "epkit", "topologies": {"dp": 1},
                             "workloads": [SHORT]})
    store = ResultStore(tmp_path / "results", "locked")
    with store.driver_lock():
        out = subprocess.run([sys.executable, "-m", "epkit.cli", "sweep", str(spec), "--results",
                              str(tmp_path / "results"), "--no-progress"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "another epkit sweep driver runs sweep 'locked'" in out.stderr and f"pid {os.getpid()}" in out.stderr
    assert not list(store.dir.glob("*/*.json"))  # nothing ran
