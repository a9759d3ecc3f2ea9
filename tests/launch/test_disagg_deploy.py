"""Disaggregated deployments (issue 18, contract C5): every instance a real built-in engine in its own run
folder, the real router (`epkit proxy`) in front, the real `openai` client through it; locally and on the real
2-node Slurm cluster. Teardown leaves no process and no job."""

from __future__ import annotations

import json
import subprocess

import openai
import pytest

from epkit.launch import DeploymentFailed, DisaggDeployment, SlurmExecutor, deploy
from epkit.launch.disagg import SIDE_CHANNEL_HOST, SIDE_CHANNEL_PORT
from epkit.launch.deployment import RECORD
from epkit.topology import DisaggTopology

from launch_helpers import TINY, end_leftovers, no_leftovers

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(autouse=True)
def _end_leftovers(tmp_path):
    """A failing test leaves nothing running: every deployment recorded under tmp_path is ended."""
    yield
    left = [r for r in end_leftovers(tmp_path) if r.get("left")]
    assert not left, f"teardown could not end: {left}"


def disagg(router: dict | None = None, prefill: dict | None = None, decodes: int = 1) -> DisaggTopology:
    return DisaggTopology.from_dict({"prefill": [{"model": TINY, "engine": "epkit", **(prefill or {})}],
                                     "decode": [{"model": TINY, "engine": "epkit", "count": decodes}],
                                     "router": router or {}})


def ids(d: DisaggDeployment) -> list[str]:
    return [d.id] + [inst.id for inst in d.instances.values()]


def ask(url: str) -> tuple[str, str, dict]:
    """A greedy completion through the router, whole and streamed (the real openai client)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    whole = client.completions.create(model=TINY, prompt="The capital of France", max_tokens=6, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=TINY, prompt="The capital of France", max_tokens=6, temperature=0, stream=True) if chunk.choices)
    return whole.choices[0].text, streamed, whole.model_extra["epkit_pd"]


def test_local_1p2d_router_on_driver(tmp_path):
    """1P2D on this machine, the router on the driver: both decodes serve, each instance has its own folder, API
    port and KV side channel; deployment.json and commands() name every part; stop() leaves nothing."""
    with deploy(disagg({"on": "driver", "policy": "round_robin"}, decodes=2), "local", run_dir=tmp_path,
                grace_s=3) as d:
        assert isinstance(d, DisaggDeployment)
        d.wait_ready(240)
        whole, streamed, _ = ask(d.url)
        client = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0, timeout=60)
        replies = [client.completions.create(model=TINY, prompt="The capital of France", max_tokens=6, temperature=0)
                   for _ in range(2)]  # round robin: one on each decode instance
        assert json.loads((tmp_path / RECORD).read_text())["state"] == "ready"
        commands = d.commands()
    record = json.loads((tmp_path / RECORD).read_text())
    assert whole == streamed == replies[0].choices[0].text == replies[1].choices[0].text != ""  # greedy
    pds = [r.model_extra["epkit_pd"] for r in replies]
    assert {pd["decode_url"] for pd in pds} == {d.instances["decode0"].url, d.instances["decode1"].url}
    assert all(pd["prefill_url"] == d.instances["prefill0"].url for pd in pds)
    assert sorted(record["instances"]) == ["decode0", "decode1", "prefill0"] and record["state"] == "stopped"
    assert record["router"]["on"] == "driver" and record["handle"]["supervisor_pids"]  # the router's supervisor
    router = json.loads((tmp_path / "router.json").read_text())
    assert router["argv"][:2] == ["epkit", "proxy"] and router["returncode"] is not None
    for name, inst in d.instances.items():
        assert inst.run_dir == tmp_path / name and (tmp_path / name / RECORD).exists()
        assert json.loads((tmp_path / name / RECORD).read_text())["state"] == "stopped"
    ports = [int(t.env[SIDE_CHANNEL_PORT]) for t in d.topologies.values()]
    assert len(set(ports)) == 3 and all(t.env[SIDE_CHANNEL_HOST] == "127.0.0.1" for t in d.topologies.values())
    assert len({inst.port for inst in d.instances.values()} | {d.router_port}) == 4
    assert [c.split("\n", 1)[0] for c in commands] == ["# prefill0 node 0", "# decode0 node 0", "# decode1 node 0",
                                                       "# router (on driver)"]
    assert "--kv-transfer-config" in commands[0] and f"--port {d.router_port}" in commands[-1]
    assert (tmp_path / "router.log").exists()
    assert no_leftovers(ids(d)) == []


def test_instance_failure_is_named_and_everything_stops(tmp_path):
    """A prefill instance that cannot start fails the whole deployment at once, naming it; the decode instance
    (which was fine) is stopped too and no router is started."""
    d = deploy(disagg(prefill={"extra_args": ["--no-such-flag"]}), "local", run_dir=tmp_path, grace_s=2)
    with pytest.raises(DeploymentFailed) as info:
        d.wait_ready(180)
    assert info.value.failure.message.startswith("prefill0: ")
    assert info.value.failure.kind in ("config", "exit")
    assert "--no-such-flag" in info.value.failure.log_tail
    assert any(c.startswith("# router") for c in info.value.commands)
    assert not (tmp_path / "decode0" / "sidecar.task.json").exists()
    assert json.loads((tmp_path / RECORD).read_text())["state"] == "stopped"
    assert no_leftovers(ids(d)) == []


def test_slurm_1p1d_router_on_decode0(slurm, tmp_path):
    """1P1D on the real Slurm cluster: each instance its own job (3 of a node's 4 CPUs each, so they land on
    different nodes), the KV side channel on each node's own hostname, the router beside the decode instance's
    engine on its node; the openai client through the router; stop() leaves no job and no process."""
    ex = SlurmExecutor(timeout_min=5, cpus_per_task=3, signal_delay_s=30)
    with deploy(disagg(), ex, run_dir=tmp_path, grace_s=3) as d:
        d.wait_ready(240)
        whole, streamed, pd = ask(d.url)
        hosts = {name: json.loads((inst.run_dir / "node0.json").read_text())["hostname"]
                 for name, inst in d.instances.items()}
        envs = {name: json.loads((inst.run_dir / "node0.json").read_text())["env"] for name, inst in d.instances.items()}
        jobs = [inst.handle.job_id for inst in d.instances.values()]
    router = json.loads((tmp_path / "decode0" / "router.json").read_text())  # ended with decode0's engine
    assert whole == streamed != ""
    assert sorted(hosts.values()) == ["n1", "n2"]
    assert all(envs[name][SIDE_CHANNEL_HOST] == hosts[name] for name in hosts)
    assert router["hostname"] == hosts["decode0"] and router["returncode"] is not None
    assert d.url == f"http://{hosts['decode0']}:{d.router_port}"
    assert pd["prefill_url"].startswith(f"http://{hosts['prefill0']}:") and pd["kv_transfer_bytes"] > 0
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert not set(jobs) & set(queued)
    assert no_leftovers(ids(d)) == []


def test_side_channel_ranges_leave_room_for_dp_ranks():
    """Each instance's side-channel range holds one port per DP rank (the engines listen on base + dp_rank); a
    topology that sets the variables keeps them."""
    from epkit.launch.disagg import instance_topologies

    d = DisaggTopology.from_dict({"prefill": [{"model": TINY, "engine": "epkit", "dp": 2, "count": 2}],
                                  "decode": [{"model": TINY, "engine": "epkit", "dp": 3},
                                             {"model": TINY, "engine": "epkit", "env": {SIDE_CHANNEL_PORT: "7000"}}]})
    topos = instance_topologies(d, 6000, "<node-hostname>")
    assert {n: t.env[SIDE_CHANNEL_PORT] for n, t in topos.items()} == {
        "prefill0": "6000", "prefill1": "6002", "decode0": "6004", "decode1": "7000"}
    assert {t.env[SIDE_CHANNEL_HOST] for t in topos.values()} == {"<node-hostname>"}


def test_ctrl_c_while_waiting_stops_every_part(tmp_path):
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        d = deploy(disagg(), "local", run_dir=tmp_path, grace_s=2)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            d.wait_ready(120)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert json.loads((tmp_path / RECORD).read_text())["state"] == "stopped"
    assert no_leftovers(ids(d)) == []


def test_host_share_splits_cores_and_memory_for_vllm_cpu_instances():
    """Instances of a local disaggregated deployment on vLLM's CPU build bind disjoint cores and size their
    KV caches from their share of the memory (EPKIT_HOST_SHARE, set per instance by DisaggDeployment)."""
    from epkit.launch import vllm_install as vi
    from epkit.topology import Topology

    host = vi.HostFacts(cores=(0, 1, 2, 3), mem_total_bytes=32 * 2**30, mem_available_bytes=16 * 2**30)
    cpu = vi.VllmInstall(command=("vllm",), version_full="0.32.0+cpu", device="cpu")
    topo = Topology(model=TINY, gpus_per_node=1)
    binds = []
    for i in range(2):
        _, env, notes = vi.platform_args(topo, cpu, host, {vi.HOST_SHARE_ENV: f"{i}/2"})
        binds.append(env[vi.CPU_BIND_ENV])
        assert any("share of the node" in n for n in notes)
    assert binds == ["0-1", "2-3"]
    _, env, _ = vi.platform_args(topo, cpu, host, {})
    assert vi.CPU_BIND_ENV not in env  # one instance, one TP rank: vLLM's own binding
    with pytest.raises(ValueError, match=r"EPKIT_HOST_SHARE='2/2'; allowed: i/n"):
        vi.platform_args(topo, cpu, host, {vi.HOST_SHARE_ENV: "2/2"})


def test_local_instances_get_their_own_gpus():
    """On a GPU machine a local split point runs each instance on its own GPUs (CUDA_VISIBLE_DEVICES), not all
    on GPU 0; more GPUs than the machine shows is refused naming share_gpus; none on a CPU machine."""
    from epkit.errors import LaunchError
    from epkit.launch.disagg import gpu_slices, instance_topologies

    topos = instance_topologies(disagg(prefill={"dp": 2, "gpus_per_node": 2}))
    placed = gpu_slices(topos, ["0", "1", "2", "3"])
    assert {n: t.env["CUDA_VISIBLE_DEVICES"] for n, t in placed.items()} == {"prefill0": "0,1", "decode0": "2"}
    assert gpu_slices(topos, []) == topos
    with pytest.raises(LaunchError, match=r"need 3 GPUs .* shows 2 .* share_gpus: true"):
        gpu_slices(topos, ["0", "1"])
