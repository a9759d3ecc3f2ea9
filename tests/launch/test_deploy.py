"""Real deployments of the built-in engine: locally (process groups as nodes) and on the real
Slurm cluster through submitit (2 slurmd nodes in network namespaces). No mocks."""

from __future__ import annotations

import time

import pytest

from epkit.bench import RandomWorkload, run
from epkit.launch import DeploymentFailed, SlurmExecutor, deploy
from epkit.topology import Topology

from launch_helpers import PROMPTS, TINY, greedy, no_leftovers

pytestmark = pytest.mark.timeout(300)


def two_node_topology() -> Topology:
    return Topology(model=TINY, engine="epkit", dp=2, nodes=2, gpus_per_node=2, enable_expert_parallel=True,
                    all2all_backend="allgather_reducescatter")


@pytest.fixture(scope="module")
def local_two_node(tmp_path_factory):
    """The 2-"node" topology run locally: primary + headless process groups, DP=2, EP=2."""
    topo = two_node_topology()
    with deploy(topo, "local", run_dir=tmp_path_factory.mktemp("local2"), grace_s=3) as d:
        d.wait_ready(180)
        outputs = greedy(d.url, PROMPTS)
        roles = [(d.run_dir / f"node{n}.json").read_text() for n in range(2)]
    assert '"headless"' in roles[1] and "--data-parallel-start-rank" in roles[1]
    assert no_leftovers([d.id]) == []
    return outputs


def test_local_bad_flag_fails_fast_with_log_tail(tmp_path):
    topo = Topology(model=TINY, engine="epkit", extra_args=("--no-such-flag",))
    t0 = time.monotonic()
    d = deploy(topo, "local", run_dir=tmp_path, grace_s=2)
    with pytest.raises(DeploymentFailed) as info:
        d.wait_ready(120)
    assert time.monotonic() - t0 < 60
    assert info.value.failure.kind in ("config", "exit")
    assert "--no-such-flag" in info.value.failure.log_tail
    assert no_leftovers([d.id]) == []


def test_local_two_node_serves_and_stops(local_two_node):
    assert len(local_two_node) == len(PROMPTS) and all(local_two_node)


def test_slurm_two_node_matches_local(slurm, local_two_node, tmp_path):
    topo = two_node_topology()
    ex = SlurmExecutor(timeout_min=5, cpus_per_task=2, signal_delay_s=30)
    with deploy(topo, ex, run_dir=tmp_path, grace_s=3) as d:
        d.wait_ready(180)
        hosts = [(d.run_dir / f"node{n}.json").read_text() for n in range(2)]
        assert '"hostname": "n1"' in hosts[0] and '"hostname": "n2"' in hosts[1]
        assert d.url.startswith("http://n1:")
        outputs = greedy(d.url, PROMPTS)
        result = run(d.url, TINY, RandomWorkload(num_prompts=6, input_len=16, output_len=4), request_rate=8,
                     progress=False)
        preflight = (d.run_dir / "node1.preflight.json").read_text()
    assert outputs == local_two_node  # same greedy tokens: primary + headless on Slurm == local process groups
    assert result["completed"] == 6 and result["total_output_tokens"] == 24
    assert '"prerequisites"' in preflight
    assert d.handle.state(0).startswith("COMPLETED")  # the job ended with the deployment
    assert no_leftovers([d.id]) == []


def test_hang_is_detected_and_torn_down(tmp_path):
    import json
    import os
    import signal

    topo = Topology(model=TINY, engine="epkit")
    d = deploy(topo, "local", run_dir=tmp_path, grace_s=2, hang_timeout_s=3.0)
    deadline = time.monotonic() + 30
    while not (tmp_path / "node0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(json.loads((tmp_path / "node0.json").read_text())["pgid"], signal.SIGSTOP)  # a real hang
    with pytest.raises(DeploymentFailed) as info:
        d.wait_ready(120)
    assert info.value.failure.kind == "hang"
    assert no_leftovers([d.id]) == []  # stopped processes too: SIGKILL after the grace period


def test_ctrl_c_while_waiting_stops_everything(tmp_path):
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    topo = Topology(model=TINY, engine="epkit")
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        d = deploy(topo, "local", run_dir=tmp_path, grace_s=2)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            d.wait_ready(120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert no_leftovers([d.id]) == []
