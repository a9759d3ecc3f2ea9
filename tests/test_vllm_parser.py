"""Rendered commands parse with vLLM's own argument parser to the values the topology means."""

from pathlib import Path

from epkit.topology import Topology
from epkit.topology.render import NodeLaunch, render
from epkit.topology.spec import load_spec
from epkit.vllm.check import check_many, compare, parse_with_vllm

ROOT = Path(__file__).resolve().parents[1]

EXTRA_TOPOLOGIES = [
    dict(model="Qwen/Qwen3-235B-A22B", tp=2, dp=8, nodes=4, gpus_per_node=4, enable_expert_parallel=True,
         all2all_backend="deepep_high_throughput", data_parallel_address="node-0.cluster", data_parallel_rpc_port=29550,
         api_server_count=2, eplb={"num_redundant_experts": 16, "window_size": 100, "step_interval": 200,
                                   "log_balancedness": True, "log_balancedness_interval": 10, "use_async": False,
                                   "communicator": "torch_nccl"}, eplb_flag_style="dotted"),
    dict(model="Qwen/Qwen3-30B-A3B", tp=4, dp=1, enable_expert_parallel=True, all2all_backend="flashinfer_all2allv"),
    dict(model="mistralai/Mixtral-8x7B-v0.1", tp=8, dp=1),
    dict(model="openai/gpt-oss-120b", tp=1, dp=4, gpus_per_node=4, enable_expert_parallel=True,
         eplb={"num_redundant_experts": 4, "use_async": True, "communicator": "torch_gloo"},
         extra_args=["--max-model-len", "8192"]),
    # tensor parallelism across nodes: --nnodes/--node-rank/--master-addr[/--master-port], --headless on nodes > 0
    dict(model="Qwen/Qwen3-30B-A3B", tp=16, nodes=2, gpus_per_node=8, data_parallel_address="10.0.0.1"),
    dict(model="Qwen/Qwen3-30B-A3B", tp=2, nodes=2, gpus_per_node=1, data_parallel_address="10.199.0.1",
         master_port=29611, max_model_len=1024, gpu_memory_utilization=0.08),
    dict(model="Qwen/Qwen3-235B-A22B", tp=32, nodes=4, gpus_per_node=8, data_parallel_address="node-0.cluster",
         master_port=29555, enable_expert_parallel=True, api_server_count=1),
]


def test_every_seed_spec_and_more_parse_as_intended(vllm_python):
    items = []
    for path in sorted((ROOT / "launchers/seed").glob("*.yaml")):
        topology = load_spec(path).topology
        items.append((topology, render(topology)))
    for spec in EXTRA_TOPOLOGIES:
        topology = Topology.from_dict(spec)
        items.append((topology, render(topology)))
    version, problems = check_many(items, vllm_python)
    assert version in ("0.32.0", "0.32.0+cpu")  # the venv holds vLLM's CPU build (scripts/vllm_venv.sh)
    assert len(items) >= 13
    assert sum(t.tp_spans_nodes for t, _ in items) == 3
    for (topology, _), found in zip(items, problems):
        assert found == [], f"{topology.model}: {found}"


def test_the_oracle_catches_a_wrong_command(vllm_python):
    """The check is not vacuous: a command with a wrong flag or value is reported."""
    tp_nodes = Topology(model="Qwen/Qwen3-30B-A3B", tp=2, nodes=2, gpus_per_node=1, data_parallel_address="10.0.0.1",
                        master_port=29611)
    primary, headless = render(tp_nodes)
    argv = list(headless.argv)
    argv[argv.index("--node-rank") + 1] = "0"  # both nodes claim rank 0
    argv[argv.index("--master-port") + 1] = "29612"
    wrong = NodeLaunch(headless.node_index, headless.role, tuple(argv))
    parsed = parse_with_vllm([["vllm", "serve", "m", "--all2all-backend", "bogus"],
                              ["vllm", "serve", "m", "--eplb-config", '{"window": 1}'],
                              ["vllm", "serve", "m", "--data-parallel-size", "3"],
                              primary.argv, wrong.argv], vllm_python)
    bad_backend, bad_eplb, ok, *tp_results = parsed["results"]
    assert not bad_backend["ok"] and "bogus" in bad_backend["error"]
    assert not bad_eplb["ok"] and "window" in bad_eplb["error"]
    assert ok["ok"] and ok["values"]["data_parallel_size"] == 3
    assert compare(tp_nodes, [primary, wrong], tp_results, parsed["vllm_version"]) == [
        "node 1 (headless): node_rank parsed as 0, topology means 1",
        "node 1 (headless): master_port parsed as 29612, topology means 29611",
    ]


SEED_KV_FORMS = ('{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
                 '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_connector_extra_config":{"backends":["UCX","GDS"]}}')


def test_the_seeds_kv_transfer_configs_read_back_as_vllm_kv_transfer_config(vllm_python):
    """Issue 18: the seed's two --kv-transfer-config forms, rendered from a topology (one node and two), parse with
    vLLM 0.32.0's own parser to a KVTransferConfig with exactly the intended fields; a wrong one is reported."""
    topologies = [Topology(model="Qwen/Qwen3-30B-A3B", kv_transfer_config=text) for text in SEED_KV_FORMS]
    topologies.append(Topology(model="Qwen/Qwen3-30B-A3B", dp=2, nodes=2, gpus_per_node=1, enable_expert_parallel=True,
                               data_parallel_address="10.0.0.1", kv_transfer_config={
                                   "kv_connector": "NixlConnector", "kv_role": "kv_consumer", "kv_buffer_device": "cpu",
                                   "kv_connector_extra_config": {"backends": ["UCX"]}, "kv_load_failure_policy": "recompute"}))
    items = [(t, render(t)) for t in topologies]
    producer = Topology(model="Qwen/Qwen3-30B-A3B", kv_transfer_config={"kv_connector": "NixlConnector",
                                                                        "kv_role": "kv_producer"})
    argvs = [launch.argv for _, launches in items for launch in launches] + [render(producer)[0].argv]
    parsed = parse_with_vllm(argvs, vllm_python)
    results, version = parsed["results"], parsed["vllm_version"]
    assert all(r["ok"] for r in results), results
    kv = [r["values"]["kv_transfer_config"] for r in results]
    assert [(k["kv_connector"], k["kv_role"], k["kv_connector_extra_config"]) for k in kv[:2]] == [
        ("NixlConnector", "kv_both", {}), ("NixlConnector", "kv_both", {"backends": ["UCX", "GDS"]})]
    assert kv[0]["kv_buffer_device"] == "cpu"  # unset: the platform's device (the parser runs on vLLM's CpuPlatform)
    same = [{k: v for k, v in k_.items() if k != "engine_id"} for k_ in kv[2:4]]  # engine_id: a fresh uuid each
    assert same[0] == same[1] and same[0]["kv_load_failure_policy"] == "recompute"  # both nodes of the instance
    i = 0
    for topology, launches in items:
        assert compare(topology, launches, results[i : i + len(launches)], version) == []
        i += len(launches)
    # the oracle is not vacuous: a kv_both command is not what a kv_producer topology means
    assert compare(producer, render(topologies[0]), results[:1], version) == [
        "node 0 (primary): kv_transfer_config.kv_role parsed as 'kv_both', topology means 'kv_producer'"]
    assert compare(Topology(model="Qwen/Qwen3-30B-A3B"), render(producer), results[-1:], version) == [
        "node 0 (primary): kv_transfer_config parsed as " + repr(kv[-1]) + ", topology sets none"]
