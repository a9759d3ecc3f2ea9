"""Start-up failures, shutdown on SIGTERM/SIGINT and a crashing rank: no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from deployments import ROOT, Deployment, process_tree, wait_gone


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epkit.engine.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("sig, api_servers", [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_signal_stops_every_process(tmp_path, sig, api_servers):
    d = Deployment(tmp_path, ["-dp", "2", "--enable-expert-parallel", "--api-server-count", str(api_servers)]).wait_ready()
    for _ in range(4):  # with two API servers sharing the port, requests reach both
        d.complete("warm up", max_tokens=2)
    pids = d.pids()
    assert len(pids) >= 4 + api_servers, pids  # launcher, fork server, 2 engine cores, API servers
    assert d.nodes[0].log().count("epkit serve ready") == api_servers
    codes = d.stop(sig)
    assert codes == [0], d.nodes[0].log()[-2000:]
    assert not wait_gone(pids), "orphans after " + sig.name
    assert f"received {sig.name}" in d.nodes[0].log()


def test_crashed_rank_stops_both_nodes(tmp_path):
    """SIGKILL one engine core of the headless node: every rank and both nodes exit with an error."""
    common = ["-dp", "4", "--data-parallel-size-local", "2", "--enable-expert-parallel"]
    d = Deployment(tmp_path, common, headless=[[*common, "--data-parallel-start-rank", "2"]]).wait_ready()
    d.complete("warm up", max_tokens=2)
    pids = d.pids()
    node2 = d.nodes[1]
    cores = [p for p in process_tree(node2.proc.pid) if "EngineCore" in _cmdline(p) or _is_core(p, node2.proc.pid)]
    victim = sorted(cores)[-1]
    os.kill(victim, signal.SIGKILL)
    codes = [n.wait(60) for n in d.nodes]
    assert codes == [1, 1], [n.log()[-1500:] for n in d.nodes]
    assert not wait_gone(pids), "orphans after a rank crash"
    assert "exited with code -9" in node2.log()
    assert "stopping this node" in d.nodes[0].log()


def test_primary_killed_hard_takes_children_along(tmp_path):
    d = Deployment(tmp_path, ["-dp", "2", "--enable-expert-parallel"]).wait_ready()
    pids = d.pids()
    d.nodes[0].proc.kill()  # SIGKILL: no cleanup code runs in the launcher
    d.nodes[0].proc.wait()
    assert not wait_gone(pids, timeout=30), "children outlived a SIGKILLed launcher"


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


def _is_core(pid: int, launcher: int) -> bool:
    """Engine cores are the grandchildren of the launcher (launcher -> fork server -> core) on a headless node."""
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return False
    return ppid != launcher and pid != launcher


def test_vendor_backend_fails_at_startup_naming_the_package():
    r = serve("-dp", "2", "--enable-expert-parallel", "--all2all-backend", "deepep_low_latency")
    assert r.returncode == 2
    assert "DeepEP" in r.stderr and "tools/ep_kernels" in r.stderr and "allgather_reducescatter" in r.stderr
    r = serve("-dp", "2", "--enable-expert-parallel", "--all2all-backend", "pplx")
    assert r.returncode == 2 and "pplx-kernels" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--enable-eplb"], "enable_eplb=True needs expert parallelism"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config", '{"num_redundant_experts": 1}'],
         "valid values: 0, 2"),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size=2"),
        (["--all2all-backend", "magic"], "all2all_backend='magic'"),
        (["--data-parallel-start-rank", "1", "-dp", "2", "--data-parallel-size-local", "1"], "needs --headless"),
        (["--eplb-config", '{"window": 3}'], "valid keys: window_size"),
        (["--eplb-config", '{"window": 3}'], "log_balancedness_interval, use_async, policy, communicator, enable_migration_batching"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config", '{"window_size": 0}'],
         "eplb_config.window_size=0 must be an integer >= 1"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config.step_interval", "-3"],
         "eplb_config.step_interval=-3 must be an integer >= 1"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config.log_balancedness_interval", "0"],
         "eplb_config.log_balancedness_interval=0 must be an integer >= 1"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config", '{"communicator": "mpi"}'],
         "eplb_config.communicator='mpi'; allowed: torch_nccl"),
        (["-dp", "2", "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
          '{"log_balancedness_interval": 4, "communicator": "torch_gloo", "enable_migration_batching": true, '
          '"num_redundant_experts": 3}'], "valid values: 0, 2, 4"),
        (["--hf-overrides", '{"router_skew": -1}'], "router_skew=-1"),
        (["--hf-overrides", "[1]"], "--hf-overrides must be a JSON object"),
        (["no-such-model"], "bundled"),
    ],
)
def test_bad_flags_are_rejected_before_anything_starts(args, needle):
    # "Before anything starts": a process start ends the run with its own message and exit 1 (how fast
    # the rejection comes, < 30 s here, is a benchmark: benchmarks/timing_targets.py).
    refuse_starts = ("import sys, multiprocessing.process as p\n"
                     "p.BaseProcess.start = lambda self: sys.exit(f'started {self.name} before rejecting')\n"
                     "from epkit.engine.cli import main\nsys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", refuse_starts, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_write_model_dir_loads_with_transformers(tmp_path):
    r = serve("epkit-qwen3-30b-a3b-shape", "--write-model-dir", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.encode("héllo") == list("héllo".encode()) and len(tok) == 151936
    assert tok.eos_token_id == 151645 and tok.decode([104, 105]) == "hi"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
