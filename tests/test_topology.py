import re
import subprocess
import sys

import pytest
import yaml

from epkit.errors import TopologyError
from epkit.topology import EPLBConfig, Topology, valid_redundant_experts
from epkit.topology.render import render
from epkit.topology.spec import PlanSpec

DS = "deepseek-ai/DeepSeek-V3-0324"
QWEN = "Qwen/Qwen3-30B-A3B"
BASE = dict(model=DS, tp=1, dp=8, enable_expert_parallel=True)
TWO_NODE = dict(BASE, dp=16, nodes=2, data_parallel_address="10.0.0.1")
TP_NODES = dict(model=QWEN, tp=16, nodes=2, gpus_per_node=8, data_parallel_address="10.0.0.1")  # TP across nodes

# (name, spec dict, the field the message must name, another piece the message must contain)
INVALID = [
    ("dp_not_divisible_by_nodes", dict(BASE, dp=12, nodes=8, data_parallel_address="a"), "dp=12", "nodes=8"),
    ("dp_local_times_nodes", dict(TWO_NODE, dp_local=4), "dp_local=4", "dp=16"),
    ("gpus_per_node_exceeded", dict(BASE, tp=2, dp=8), "gpus_per_node=8", "16 GPUs"),
    ("gpus_per_node_exceeded_dp_local", dict(TWO_NODE, gpus_per_node=4), "gpus_per_node=4", "8 GPUs"),
    ("ep_not_dividing_experts", dict(BASE, model="mistralai/Mixtral-8x7B-v0.1", dp=6, gpus_per_node=8), "ep_size=6", "8 physical"),
    ("ep_not_dividing_physical", dict(BASE, eplb={"num_redundant_experts": 2}), "num_redundant_experts=2", "0, 8, 16"),
    ("redundant_without_eplb_is_eplb_without_ep", dict(model=DS, dp=8, eplb={"num_redundant_experts": 8}), "enable_expert_parallel", "EPLB"),
    ("eplb_without_ep", dict(model=QWEN, dp=2, eplb={}), "enable_expert_parallel=False", "eplb"),
    ("eplb_with_ep_size_one", dict(model=QWEN, enable_expert_parallel=True, eplb={}), "ep_size=1", "tp × dp > 1"),
    ("unknown_backend", dict(BASE, all2all_backend="nccl_magic"), "all2all_backend", "'nccl_magic'"),
    ("replaced_backend_for_version", dict(BASE, all2all_backend="pplx", vllm_version="0.32.0"), "all2all_backend", "allow_replaced_backend"),
    ("naive_replaced", dict(BASE, all2all_backend="naive", vllm_version="0.26.0"), "all2all_backend", "'naive' but silently falls back to 'allgather_reducescatter'"),
    ("unknown_vllm_version", dict(BASE, vllm_version="0.0.1"), "vllm_version", "'0.0.1'"),
    ("malformed_eplb_json", dict(BASE, eplb='{"window_size": 10,'), "eplb_config=", "not valid JSON"),
    ("eplb_json_not_object", dict(BASE, eplb="[1, 2]"), "eplb_config=", "JSON object"),
    ("eplb_unknown_key", dict(BASE, eplb={"window": 10}), "window", "valid keys: window_size"),
    ("eplb_window_zero", dict(BASE, eplb={"window_size": 0}), "eplb_config.window_size=0", ">= 1"),
    ("eplb_interval_negative", dict(BASE, eplb={"step_interval": -5}), "eplb_config.step_interval=-5", ">= 1"),
    ("eplb_redundant_negative", dict(BASE, eplb={"num_redundant_experts": -8}), "num_redundant_experts=-8", ">= 0"),
    ("eplb_log_balancedness_not_bool", dict(BASE, eplb={"log_balancedness": "yes"}), "log_balancedness='yes'", "true or false"),
    ("eplb_interval_not_int", dict(BASE, eplb={"log_balancedness_interval": 1.5}), "log_balancedness_interval=1.5", "integer"),
    ("eplb_unknown_policy", dict(BASE, eplb={"policy": "magic"}), "policy='magic'", "default"),
    ("eplb_epkit_policy_on_vllm", dict(BASE, eplb={"policy": "sticky"}), "policy='sticky'", "engine 'vllm'"),
    ("eplb_unknown_communicator", dict(BASE, eplb={"communicator": "carrier_pigeon"}), "communicator='carrier_pigeon'", "torch_gloo"),
    ("eplb_async_with_nccl", dict(BASE, eplb={"use_async": True, "communicator": "pynccl"}), "communicator='pynccl'", "use_async"),
    ("eplb_key_unknown_to_release", dict(BASE, vllm_version="0.16.0", eplb={"communicator": "torch_gloo"}), "eplb_config.communicator", "0.16.0"),
    ("tp_zero", dict(BASE, tp=0), "tp=0", ">= 1"),
    ("dp_string", dict(BASE, dp="8"), "dp='8'", "integer"),
    ("nodes_negative", dict(BASE, nodes=-1), "nodes=-1", ">= 1"),
    ("api_server_count_zero", dict(BASE, api_server_count=0), "api_server_count=0", ">= 1"),
    ("rpc_port_out_of_range", dict(BASE, data_parallel_rpc_port=70000), "data_parallel_rpc_port=70000", "65535"),
    ("address_with_space", dict(BASE, data_parallel_address="10.0.0.1 --headless"), "data_parallel_address=", "host name"),
    ("bad_ifname", dict(BASE, gloo_socket_ifname="eth0; rm -rf /"), "gloo_socket_ifname=", "interface"),
    ("unknown_engine", dict(BASE, engine="sglang"), "engine='sglang'", "vllm, epkit"),
    ("unknown_model", dict(BASE, model="acme/Nope-1T"), "model='acme/Nope-1T'", "model_config"),
    ("unknown_topology_key", dict(BASE, tensor_parallel=2), "tensor_parallel", "valid keys"),
    ("enable_ep_not_bool", dict(BASE, enable_expert_parallel="yes"), "enable_expert_parallel='yes'", "true or false"),
    ("extra_args_string", dict(BASE, extra_args="--foo"), "extra_args", "list of strings"),
    ("eplb_flag_style", dict(BASE, eplb_flag_style="yaml"), "eplb_flag_style='yaml'", "json, dotted"),
    ("eplb_not_mapping", dict(BASE, eplb=5), "eplb=5", "mapping"),
    ("backend_not_in_old_release", dict(BASE, all2all_backend="deepep_v2", vllm_version="0.16.0"), "all2all_backend", "does not accept 'deepep_v2'"),
    ("master_port_out_of_range", dict(TP_NODES, master_port=70000), "master_port=70000", "65535"),
    # tensor parallelism across nodes (tp > gpus_per_node over nodes > 1): one rule each
    ("tp_nodes_built_in_engine", dict(TP_NODES, engine="epkit"), "engine='epkit'", "allowed: engine vllm"),
    ("tp_nodes_with_dp", dict(TP_NODES, dp=2), "dp=2", "allowed: dp=1"),
    ("tp_nodes_with_dp_local", dict(TP_NODES, dp_local=1), "dp_local=1", "allowed: unset"),
    ("tp_nodes_not_full_nodes", dict(TP_NODES, tp=12), "tp=12", "allowed: tp=16, or gpus_per_node=6"),
    ("tp_nodes_uneven", dict(TP_NODES, tp=10, nodes=3, gpus_per_node=3), "tp=10", "a node count that divides tp=10"),
    ("tp_nodes_old_vllm", dict(TP_NODES, vllm_version="0.11.0"), "vllm_version='0.11.0'", "vllm_version >= 0.11.1"),
    ("tp_over_one_node", dict(model=QWEN, tp=16), "gpus_per_node=8", "give nodes=2"),
    ("dp1_over_nodes_with_room", dict(TP_NODES, tp=8), "dp=1 is not divisible by nodes=2", "gpus_per_node=4"),
]

# Valid topologies that must still be refused at render time.
INVALID_AT_RENDER = [
    ("multinode_without_address", dict(BASE, dp=16, nodes=2), "data_parallel_address", "nodes=2"),
    ("extra_args_override_owned_flag", dict(BASE, extra_args=["--data-parallel-size", "4"]), "extra_args", "dp"),
    ("extra_args_override_eplb", dict(BASE, extra_args=["--eplb-config.window_size=5"]), "extra_args", "eplb"),
    ("tp_nodes_without_address", dict(TP_NODES, data_parallel_address=None), "data_parallel_address", "--master-addr"),
    ("extra_args_nnodes", dict(BASE, extra_args=["--nnodes", "2"]), "'--nnodes'", "(nodes)"),
    ("extra_args_node_rank_short", dict(TP_NODES, extra_args=["-r", "1"]), "'-r'", "(nodes)"),
    ("extra_args_master_addr", dict(TP_NODES, extra_args=["--master-addr=10.0.0.2"]), "'--master-addr=10.0.0.2'",
     "(data_parallel_address)"),
    ("extra_args_master_port", dict(TP_NODES, extra_args=["--master_port", "29500"]), "'--master_port'", "(master_port)"),
    ("extra_args_short_tp", dict(BASE, extra_args=["-tp", "2"]), "'-tp'", "(tp)"),
]


def test_at_least_thirty_invalid_cases():
    assert len(INVALID) + len(INVALID_AT_RENDER) >= 30


@pytest.mark.parametrize("name,spec,field,also", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_topology_rejected(name, spec, field, also):
    with pytest.raises(TopologyError) as info:
        render(Topology.from_dict(spec))
    message = str(info.value)
    assert field in message, message
    assert also in message, message


@pytest.mark.parametrize("name,spec,field,also", INVALID_AT_RENDER, ids=[c[0] for c in INVALID_AT_RENDER])
def test_invalid_at_render(name, spec, field, also):
    topology = Topology.from_dict(spec)
    with pytest.raises(TopologyError) as info:
        render(topology)
    assert field in str(info.value) and also in str(info.value), str(info.value)


@pytest.mark.parametrize("name,spec,field,also", INVALID[:12] + INVALID_AT_RENDER[:1], ids=lambda x: x if isinstance(x, str) else "")
def test_cli_prints_error_and_no_command(tmp_path, name, spec, field, also):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "vllm serve" not in proc.stdout and proc.stdout == ""
    assert field in proc.stderr and str(path) in proc.stderr


def test_plan_options_validated():
    with pytest.raises(TopologyError, match="plan has unknown key.*gpu_count.*valid keys: gpus"):
        PlanSpec.from_dict(dict(BASE, plan={"gpu_count": 8}))
    with pytest.raises(TopologyError, match="gpu='B300'"):
        PlanSpec.from_dict(dict(BASE, plan={"gpus": ["B300"]}))
    with pytest.raises(TopologyError, match="both gpu and gpus"):
        PlanSpec.from_dict(dict(BASE, plan={"gpu": "H100", "gpus": ["H200"]}))


def test_plan_gpu_key_is_one_spelling_for_plan_and_sweep_specs():
    """`gpus` in both; the sweep's old `gpu` (and a single string) still reads, with a deprecation warning."""
    from epkit.errors import EpkitDeprecationWarning
    from epkit.sweep.spec import parse_sweep

    with pytest.warns(EpkitDeprecationWarning, match="plan.gpu is deprecated; write plan.gpus"):
        old = PlanSpec.from_dict(dict(BASE, plan={"gpu": "H200"}))
    assert old.gpus == ("H200",) == PlanSpec.from_dict(dict(BASE, plan={"gpus": "H200"})).gpus
    sweep = {"model": "epkit-tiny-moe", "engine": "epkit", "topologies": {"dp": 1},
             "workloads": [{"num_prompts": 4}]}
    assert parse_sweep(dict(sweep, plan={"gpus": ["H100", "H200"]})).plan["gpus"] == ("H100", "H200")
    with pytest.warns(EpkitDeprecationWarning, match="plan.gpu is deprecated"):
        assert parse_sweep(dict(sweep, plan={"gpu": "H100"})).plan["gpus"] == ("H100",)


def test_plan_block_utilization_and_length_are_topology_fields():
    """plan.max_model_len / plan.gpu_memory_utilization move into the topology: the command renders them."""
    from epkit.errors import EpkitDeprecationWarning

    with pytest.warns(EpkitDeprecationWarning, match="plan.max_model_len is deprecated"):
        spec = PlanSpec.from_dict(dict(BASE, plan={"gpus": ["H200"], "max_model_len": 32768}))
    assert spec.topology.max_model_len == 32768
    argv = render(spec.topology)[0].argv
    assert argv[argv.index("--max-model-len") + 1] == "32768"
    assert spec.memory_plans()[0].max_model_len == 32768
    with pytest.raises(TopologyError, match="plan.max_model_len=4096 disagrees with max_model_len=32768"), \
            pytest.warns(EpkitDeprecationWarning):
        PlanSpec.from_dict(dict(BASE, max_model_len=32768, plan={"max_model_len": 4096}))


def test_engine_flags_in_extra_args_are_the_topology_fields():
    """--max-model-len / --gpu-memory-utilization written in extra_args are what the plan uses (one value)."""
    t = Topology.from_dict(dict(BASE, extra_args=["--load-format", "dummy", "--max-model-len", "32768",
                                                  "--gpu-memory-utilization=0.95"]))
    assert (t.max_model_len, t.gpu_memory_utilization) == (32768, 0.95)
    assert t.extra_args == ("--load-format", "dummy")
    argv = render(t)[0].argv
    assert argv[argv.index("--max-model-len") + 1] == "32768"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.95"
    assert argv.count("--max-model-len") == 1 and argv[-2:] == ("--load-format", "dummy")
    assert Topology.from_dict(dict(BASE, extra_args=["--max_model_len", "32K"])).max_model_len == 32 * 1024
    # the same value twice is one value; two values are refused
    assert Topology.from_dict(dict(BASE, max_model_len=8, extra_args=["--max-model-len", "8"])).extra_args == ()
    with pytest.raises(TopologyError, match="max_model_len=4096 but extra_args says --max-model-len 8192"):
        Topology.from_dict(dict(BASE, max_model_len=4096, extra_args=["--max-model-len", "8192"]))
    with pytest.raises(TopologyError, match="--max-model-len has no value"):
        Topology.from_dict(dict(BASE, extra_args=["--max-model-len", "--enforce-eager"]))
    with pytest.raises(TopologyError, match="--gpu-memory-utilization 'most' is not a number"):
        Topology.from_dict(dict(BASE, extra_args=["--gpu-memory-utilization", "most"]))
    with pytest.raises(TopologyError, match=r"gpu_memory_utilization=1.5 must be a number in \(0, 1\]"):
        Topology.from_dict(dict(BASE, extra_args=["--gpu-memory-utilization", "1.5"]))


def test_missing_model_is_named():
    with pytest.raises(TopologyError, match="topology.model is missing"):
        Topology.from_dict({"tp": 1, "dp": 2})
    with pytest.raises(TopologyError, match="spec.yaml: topology.model is missing"):
        PlanSpec.from_dict({"dp": 2}, source="spec.yaml")


def test_derived_sizes_and_start_ranks():
    t = Topology.from_dict(dict(TWO_NODE, dp_local=8))
    assert t.ep_size == 16 and t.dp_per_node == 8
    assert [t.node_start_rank(n) for n in range(2)] == [0, 8]
    t3 = Topology(model=QWEN, tp=2, dp=6, nodes=3, gpus_per_node=4, data_parallel_address="h0")
    assert t3.ep_size == 1 and t3.world_size == 12 and [t3.node_start_rank(n) for n in range(3)] == [0, 2, 4]
    argvs = [l.argv for l in render(t3)]
    assert [a[a.index("--data-parallel-start-rank") + 1] for a in argvs[1:]] == ["2", "4"]


def test_experts_per_rank_formula():
    t = Topology.from_dict(dict(BASE, eplb={"num_redundant_experts": 8}))
    assert t.num_physical_experts == 264 and t.experts_per_rank == 33


def test_valid_redundant_experts():
    assert valid_redundant_experts(256, 8, limit=4) == [0, 8, 16, 24]
    assert valid_redundant_experts(128, 48, limit=3) == [16, 64, 112]
    assert all((256 + r) % 32 == 0 for r in valid_redundant_experts(256, 32))


def test_eplb_json_and_dotted_render_same_keys():
    eplb = EPLBConfig(window_size=1000, step_interval=3000, num_redundant_experts=2, log_balancedness=True)
    base = dict(model=QWEN, dp=2, enable_expert_parallel=True, eplb=eplb)
    js = render(Topology(**base))[0].argv
    dotted = render(Topology(**base, eplb_flag_style="dotted"))[0].argv
    assert js[js.index("--eplb-config") + 1] == '{"window_size":1000,"step_interval":3000,"num_redundant_experts":2,"log_balancedness":true}'
    i = dotted.index("--eplb-config.log_balancedness")
    assert dotted[i + 1] == "true" and "--eplb-config.window_size" in dotted


def test_backend_replaced_opt_in_warns():
    t = Topology.from_dict(dict(BASE, all2all_backend="pplx", vllm_version="0.32.0", allow_replaced_backend=True))
    assert any("allgather_reducescatter" in w for w in t.warnings())


def test_shell_line_is_pasteable():
    t = Topology.from_dict(dict(model=QWEN, dp=2, enable_expert_parallel=True, eplb={"window_size": 10}))
    line = render(t)[0].shell(multiline=False)
    assert re.search(r"--eplb-config '\{\"window_size\":10\}'", line)


def test_epkit_engine_accepts_epkit_policies():
    t = Topology.from_dict(dict(model="epkit-tiny-moe", dp=2, enable_expert_parallel=True, engine="epkit",
                                eplb={"policy": "sticky", "num_redundant_experts": 2}))
    argv = render(t)[0].argv
    assert argv[:2] == ("epkit", "serve") and '"policy":"sticky"' in argv[argv.index("--eplb-config") + 1]


def test_epkit_engine_backends():
    t = Topology(model="epkit-tiny-moe", dp=2, enable_expert_parallel=True, engine="epkit", all2all_backend="all_to_all")
    assert ("--all2all-backend", "all_to_all") == render(t)[0].argv[-2:]
    with pytest.raises(TopologyError, match="all_to_all"):
        Topology(model="epkit-tiny-moe", dp=2, enable_expert_parallel=True, all2all_backend="all_to_all")  # vllm


def test_sweep_only_checks_the_points_it_runs():
    """``--only``: the other points are not checked (an engine axis whose vLLM is not on this machine, the device's
    engine-only calls); an id the spec does not make is an error naming the ones it does."""
    from epkit.sweep.spec import parse_sweep

    data = {"name": "only", "model": "epkit-tiny-moe", "vllm_bin": "false", "topologies": {"grid": {"engine": ["vllm", "epkit"]}},
            "workloads": [{"dataset": "random", "input_len": 8, "output_len": 4, "num_prompts": 2}]}
    with pytest.raises(TopologyError, match="did not print a vLLM version"):
        parse_sweep(data, "only")
    ids = [tp.id for tp in parse_sweep(data, "only", only=["epkit_default_tp1_dp1_n1_noep"]).topologies]
    assert ids == ["vllm_default_tp1_dp1_n1_noep", "epkit_default_tp1_dp1_n1_noep"]
    with pytest.raises(TopologyError, match="--only nope: no such topology; the spec makes vllm_default"):
        parse_sweep(data, "only", only=["nope"])
