"""Failure classification on real vLLM (vLLM's CPU build 0.32.0, the venv scripts/test.sh builds), through
epkit's own launch path: a bad flag (``config``), the API port already taken (``address_in_use``), a KV cache
vLLM refuses to size (``kv_cache``, with what to change) and the engine killed in the middle of a sweep's point
(``killed``: the point and the points after it fail with that cause). Each ends with the log tail that shows
the cause and nothing of the deployment left running.

The unit tests at the end check the patterns on the lines vLLM 0.32.0 printed in those runs (and in runs of
``vllm serve`` with ``--gpu-memory-utilization 0.99`` and ``--kv-cache-memory-bytes`` 0 / 1048576 / 100000000000)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from epkit.launch import DeploymentFailed, LocalExecutor, deploy, procs
from epkit.launch.failure import KINDS, classify_exit, match_log
from epkit.launch.local import free_port
from epkit.sweep.runner import run_sweep
from epkit.sweep.spec import parse_sweep
from epkit.topology import Topology
from launch_helpers import end_leftovers, no_leftovers, served, vllm_processes

pytestmark = pytest.mark.timeout(420)
ENGINE_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--enforce-eager"]


def _fields(model_dir: Path, **changes) -> dict:
    return {"model": str(model_dir), "model_config": str(model_dir / "config.json"), "engine": "vllm", "dp": 1,
            "max_model_len": 1024, "gpu_memory_utilization": 0.08, "extra_args": list(ENGINE_ARGS), **changes}


@pytest.fixture(autouse=True)
def _end_leftovers(tmp_path):
    """A test that fails half-way leaves nothing running: every deployment recorded under tmp_path is ended."""
    yield
    left = [r for r in end_leftovers(tmp_path) if r.get("left")]
    assert not left, f"teardown could not end: {left}"


def _vllm_serving(port: int) -> list[procs.Proc]:
    """`vllm serve` processes started for this API port (the command line carries it)."""
    return [p for p in procs.processes() if "vllm" in p.cmdline and " serve " in p.cmdline
            and f"--port {port}" in p.cmdline]


def _fails_to_start(topology: Topology, executor: LocalExecutor, run_dir: Path):
    d = deploy(topology, executor, run_dir=run_dir, grace_s=3)
    with pytest.raises(DeploymentFailed) as info:
        d.wait_ready(300)
    assert no_leftovers([d.id]) == [] and _vllm_serving(d.port) == []
    assert vllm_processes(str(executor.vllm_bin)) == []  # nothing of the vLLM venv runs (ps)
    return info.value.failure, d


def test_bad_flag_is_config(vllm_cli, vllm_model_dir, tmp_path):
    topology = Topology.from_dict(_fields(vllm_model_dir, extra_args=[*ENGINE_ARGS, "--no-such-flag"]))
    failure, _ = _fails_to_start(topology, LocalExecutor(vllm_bin=vllm_cli), tmp_path)
    assert failure.kind == "config", failure
    assert "unrecognized arguments: --no-such-flag" in failure.message
    assert "vllm: error: unrecognized arguments: --no-such-flag" in failure.log_tail


@dataclass(frozen=True)
class _TakenPort(LocalExecutor):
    """A local executor whose deployment gets ``api_port`` for its API (a port the test holds)."""

    api_port: int = 0

    def pick_ports(self) -> tuple[int, int]:
        return self.api_port, free_port(self.host)


def test_port_in_use_is_address_in_use(vllm_cli, vllm_model_dir, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        port = held.getsockname()[1]
        failure, d = _fails_to_start(Topology.from_dict(_fields(vllm_model_dir)),
                                     _TakenPort(vllm_bin=vllm_cli, api_port=port), tmp_path)
    assert d.port == port
    assert failure.kind == "address_in_use", failure
    assert "Address already in use" in failure.message and "Address already in use" in failure.log_tail
    assert f"--port {port}" in (tmp_path / "node0.log").read_text()  # vLLM itself was told the taken port


def test_kv_cache_refusal_says_what_to_raise(vllm_cli, vllm_model_dir, tmp_path):
    topology = Topology.from_dict(_fields(vllm_model_dir, gpu_memory_utilization=0.0001))
    failure, _ = _fails_to_start(topology, LocalExecutor(vllm_bin=vllm_cli), tmp_path)
    assert failure.kind == "kv_cache", failure
    # vLLM 0.32.0's CPU worker: 0.0001 of host memory is less than what the worker already holds
    assert "on kv cache allocation is less than requested memory for kv" in failure.message
    assert "raise gpu_memory_utilization" in failure.message
    assert "(Worker pid=" not in failure.message  # vLLM's logger prefix is not part of the message
    cause = next(line for line in failure.log_tail.splitlines() if "requested memory for kv" in line)
    assert cause in (tmp_path / "node0.log").read_text()  # the tail shows the cause, however long the traceback after


def _kill_mid_point(results: Path, done: threading.Event, killed: dict) -> None:
    """Once the first point's requests are being served, SIGKILL the engine's process group (node0.json)."""
    while not done.wait(0.2):
        records = [json.loads(p.read_text()) for p in results.glob("*/*/logs/*/deployment.json")]
        record = next((r for r in records if r.get("handle")), None)
        node0 = Path(record["run_dir"]) / "node0.json" if record else None
        if node0 is None or not node0.exists() or served(f"http://127.0.0.1:{record['port']}") < 1:
            continue
        info = json.loads(node0.read_text())
        killed.update(record=record, pgid=info["pgid"])
        os.killpg(info["pgid"], signal.SIGKILL)
        return


def test_engine_killed_mid_point_fails_the_point_and_the_rest(vllm_cli, vllm_model_dir, tmp_path):
    # the first point's schedule lasts 200 s (400 requests at 2 req/s): the kill lands inside it
    long = {"name": "long", "dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 400,
            "request_rate": 2}
    short = {"name": "short", "dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 2}
    fields = _fields(vllm_model_dir)
    data = {"name": "vkill", "model": fields.pop("model"), "engine": fields.pop("engine"), "vllm_bin": vllm_cli,
            "topologies": fields, "workloads": [long, short], "run": {"startup_timeout_s": 300, "grace_s": 3}}
    spec = parse_sweep(data, "vkill", yaml.safe_dump(data))
    results = tmp_path / "results"
    done, killed, said = threading.Event(), {}, []
    killer = threading.Thread(target=_kill_mid_point, args=(results, done, killed), daemon=True)
    killer.start()
    try:
        summary = run_sweep(spec, results, progress=False, say=said.append)
    finally:
        done.set()
        killer.join()
    assert killed, f"the sweep ended before its first point was served: {said}"
    assert summary["points_ok"] == 0 and summary["points_failed"] == 2, summary

    def point(name):
        (path,) = results.glob(f"vkill/*/{name}.json")
        return json.loads(path.read_text())["epkit"]["point"]

    first, after = point("long_rate2"), point("short")
    assert first["status"] == "failed" and first["failure"]["kind"] == "killed", first["failure"]
    assert "SIGKILL" in first["failure"]["message"] and "the point's load was stopped" in first["failure"]["message"]
    assert first["engine_version"] == "0.32.0"
    log = (Path(killed["record"]["run_dir"]) / "node0.log").read_text()
    tail = first["failure"]["log_tail"].splitlines()
    assert tail and all(line in log for line in tail[-3:])  # the engine log's own last lines
    assert after["status"] == "failed" and after["failure"]["kind"] == "killed"  # same cause, not run
    assert first["failure"]["message"].startswith(after["failure"]["message"])
    assert any("FAILED" in line and "[killed]" in line for line in said)
    assert no_leftovers([killed["record"]["deployment_id"]]) == []
    assert _vllm_serving(killed["record"]["port"]) == [] and vllm_processes(vllm_cli) == []
    assert not [p for p in procs.processes() if p.pgid == killed["pgid"]]


# ---- the patterns, on the lines vLLM 0.32.0 printed -----------------------------------------------------------
VLLM_LINES = {
    "bad_flag": ("vllm: error: unrecognized arguments: --no-such-flag", "config", None),
    "port": ("OSError: [Errno 98] Address already in use", "address_in_use", None),
    # --gpu-memory-utilization 0.0001 on vLLM's CPU build (the worker, after loading the model)
    "share_below_worker": (
        "(Worker pid=4036) ERROR 12-06 03:38:53 [multiproc_executor.py:1063] ValueError: Available memory on node 0 "
        "(14.72/23.59 GiB) on kv cache allocation is less than requested memory for kv (-0.76/0.0 GiB). Reduce CPU "
        "memory used by other processes.", "kv_cache", "raise gpu_memory_utilization"),
    # the same message, restated by the engine core
    "restated": (
        "RuntimeError: Worker failed with error 'Available memory on node 0 (14.72/23.59 GiB) on kv cache allocation "
        "is less than requested memory for kv (-0.76/0.0 GiB). Reduce CPU memory used by other processes.', please "
        "check the stack trace above for the root cause", "kv_cache", "raise gpu_memory_utilization"),
    # --gpu-memory-utilization 0.99 on vLLM's CPU build (at worker start-up)
    "share_above_free": (
        "(VllmWorker-0 pid=5886) ERROR 12-06 03:40:49 [multiproc_executor.py:953] ValueError: Available memory on "
        "node 0 (20.89/23.59 GiB) on startup is less than desired CPU memory utilization (0.99, 23.35 GiB). On the "
        "CPU backend, the `--gpu-memory-utilization` flag controls the fraction of CPU memory reserved (despite its "
        "name). To resolve: decrease `--gpu-memory-utilization` (e.g. `--gpu-memory-utilization 0.5`) or reduce CPU "
        "memory used by other processes.", "kv_cache", "lower it"),
    # --kv-cache-memory-bytes 100000000000 on vLLM's CPU build (more than the host has free)
    "explicit_above_free": (
        "(Worker pid=12874) ERROR 12-06 03:47:59 [multiproc_executor.py:1063] ValueError: Available memory on node 0 "
        "(20.53/23.59 GiB) on kv cache allocation is less than requested memory for kv (93.13 GiB). Decrease "
        "--kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.", "kv_cache",
        "(93.13 GiB) is more than the free host memory: lower --kv-cache-memory-bytes"),
    # --kv-cache-memory-bytes 0 (or 4096): the check vLLM runs on every platform
    "no_blocks": (
        "(EngineCore pid=7232) ERROR 12-06 03:42:25 [core.py:1510] ValueError: No available memory for the cache "
        "blocks. Try increasing `gpu_memory_utilization` when initializing the engine (this flag also controls CPU "
        "memory reservation on the CPU backend, despite its name). See "
        "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.", "kv_cache",
        "raise gpu_memory_utilization"),
    # --kv-cache-memory-bytes 1048576 with --max-model-len 1024 (2 MiB needed)
    "one_request": (
        "ValueError: To serve at least one request with the model's max seq len (1024), (0.0 GiB KV cache is needed, "
        "which is larger than the available KV cache memory (0.0 GiB). Based on the available memory, the estimated "
        "maximum model length is 384. Try increasing `gpu_memory_utilization` (which also controls CPU memory on the "
        "CPU backend) or decreasing `max_model_len` when initializing the engine. See "
        "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.", "kv_cache",
        "lower max_model_len (vLLM's estimate of the longest that fits: 384)"),
}


@pytest.mark.parametrize("case", sorted(VLLM_LINES))
def test_vllm_lines_are_classified(case):
    line, kind, advice = VLLM_LINES[case]
    assert kind in KINDS
    assert match_log(f"INFO starting\n{line}\nRuntimeError: Engine core initialization failed.\n")[0] == kind
    failure = classify_exit(1, f"x\n{line}\n", node=0)
    assert failure.kind == kind
    if advice is not None:
        assert advice in failure.message
    assert " pid=" not in failure.message and "[multiproc_executor.py" not in failure.message


def test_kv_cache_is_checked_before_config():
    """vLLM raises the KV refusal as a ValueError; a config-looking ValueError earlier in the log does not win."""
    log = ("ValueError: max_num_seqs must be positive, not allowed here\n"
           + VLLM_LINES["no_blocks"][0] + "\n")
    assert classify_exit(1, log).kind == "kv_cache"


def test_log_tail_keeps_the_cause_above_a_long_traceback():
    cause = VLLM_LINES["share_below_worker"][0]
    log = "\n".join(["INFO start", "  raise ValueError(", cause] + [f"  File x.py, line {i}" for i in range(100)]
                    + ["RuntimeError: Engine core initialization failed. See root cause above."])
    failure = classify_exit(1, log)
    tail = failure.log_tail.splitlines()
    assert tail[:3] == ["INFO start", "  raise ValueError(", cause]
    assert tail[3] == "[... 61 lines ...]" and len(tail) == 3 + 1 + 40
    assert tail[-1].startswith("RuntimeError: Engine core initialization failed")
