"""Disaggregated prefill/decode planning (issue 18, contract C3): KVTransferConfig checked field by field and
against the release table, rendered as --kv-transfer-config for both engines; DisaggTopology from Python and
YAML (count: repetition), its cross-instance checks, the router config, per-instance memory plans and warnings,
and `epkit plan` on a disaggregated spec. vLLM's own parser reading the flag back is in test_vllm_parser.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import epkit
from epkit.errors import TopologyError
from epkit.topology import DisaggTopology, KVTransferConfig, RouterConfig, Topology, render
from epkit.topology.disagg import block_size
from epkit.topology.spec import DisaggPlanSpec, load_spec
from epkit.vllm import versions

ROOT = Path(__file__).resolve().parents[1]
MODEL = "Qwen/Qwen3-30B-A3B"
SEED_KV = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
SEED_KV_BACKENDS = ('{"kv_connector":"NixlConnector","kv_role":"kv_both",'
                    '"kv_connector_extra_config":{"backends":["UCX","GDS"]}}')
SPEC = """
prefill:
  - {model: Qwen/Qwen3-30B-A3B, dp: 2, gpus_per_node: 2, enable_expert_parallel: true,
     all2all_backend: deepep_high_throughput}
decode:
  - {model: Qwen/Qwen3-30B-A3B, dp: 2, gpus_per_node: 2, enable_expert_parallel: true,
     all2all_backend: deepep_low_latency, count: 2}
kv_transfer_config: {kv_connector: NixlConnector, kv_role: kv_both, kv_connector_extra_config: {backends: [UCX, GDS]}}
router: {policy: least_outstanding, port: 8100}
"""


def side(**kw):
    return {"model": MODEL, "dp": 2, "gpus_per_node": 2, "enable_expert_parallel": True, **kw}


def test_the_seeds_two_forms_render_exactly_for_both_engines():
    assert KVTransferConfig.from_json(SEED_KV).to_json() == SEED_KV
    assert KVTransferConfig.from_json(SEED_KV_BACKENDS).to_json() == SEED_KV_BACKENDS
    for engine in ("vllm", "epkit"):
        for text in (SEED_KV, SEED_KV_BACKENDS):
            (launch,) = render(Topology(model=MODEL, engine=engine, kv_transfer_config=text))
            i = launch.argv.index("--kv-transfer-config")
            assert launch.argv[i + 1] == text
            assert f"--kv-transfer-config '{text}'" in launch.shell()


def test_every_node_of_a_multi_node_instance_gets_the_flag():
    t = Topology(model=MODEL, dp=4, nodes=2, gpus_per_node=2, data_parallel_address="10.0.0.1",
                 kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})
    assert [l.argv.count("--kv-transfer-config") for l in render(t)] == [1, 1]
    assert Topology.from_dict(t.to_dict()) == t
    assert t.to_dict()["kv_transfer_config"] == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer"}


@pytest.mark.parametrize("config, words", [
    ({"kv_connector": "NixlConnector", "kv_role": "kv_sender"}, ["kv_role", "'kv_sender'", "kv_producer, kv_consumer"]),
    ({"kv_connector": "NixlConnector"}, ["kv_role", "None", "kv_both"]),
    ({"kv_role": "kv_both"}, ["kv_connector is missing", "NixlConnector"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "tpu"},
     ["kv_buffer_device", "'tpu'", "cuda, cpu, xpu"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": ["UCX", "RDMA"]}},
     ["kv_connector_extra_config.backends", "'RDMA'", "UCX, GDS, GDS_MT, POSIX", "LIBFABRIC"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": "UCX"}},
     ["backends", "'UCX'", "non-empty list"]),
    ({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": ["UCX"]}},
     ["backends", "LMCacheConnectorV1", "NixlConnector, NixlPullConnector, NixlPushConnector"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_port": 70000}, ["kv_port", "70000", "[1, 65535]"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_load_failure_policy": "retry"},
     ["kv_load_failure_policy", "'retry'", "recompute, fail"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_rank": 2, "kv_parallel_size": 2},
     ["kv_rank=2", "kv_parallel_size=2"]),
    ({"kv_connector": "NixlConnector", "kv_role": "kv_both", "role": "x"}, ["unknown key(s) role", "valid keys", "kv_rank"]),
])
def test_bad_fields_name_field_value_and_what_is_allowed(config, words):
    with pytest.raises(TopologyError) as err:
        KVTransferConfig.from_dict(config)
    for word in words:
        assert word in str(err.value)


def test_bad_json_and_non_objects():
    with pytest.raises(TopologyError, match="not valid JSON"):
        Topology(model=MODEL, kv_transfer_config='{"kv_connector": NixlConnector}')
    with pytest.raises(TopologyError, match="must be a JSON object"):
        KVTransferConfig.from_json('["NixlConnector"]')


def test_the_release_table_decides_connectors_and_fields():
    p2p = {"kv_connector": "P2pNcclConnector", "kv_role": "kv_producer", "kv_rank": 0, "kv_parallel_size": 2}
    assert Topology(model=MODEL, vllm_version="0.23.0", kv_transfer_config=p2p).kv_transfer_config.kv_rank == 0
    with pytest.raises(TopologyError) as err:
        Topology(model=MODEL, vllm_version="0.32.0", kv_transfer_config={**p2p, "kv_rank": None, "kv_parallel_size": None})
    assert "P2pNcclConnector" in str(err.value) and "vLLM 0.32.0" in str(err.value)
    assert "0.11.1..0.23.0" in str(err.value) and "NixlConnector" in str(err.value)
    with pytest.raises(TopologyError) as err:  # kv_rank left KVTransferConfig in 0.32.0
        Topology(model=MODEL, vllm_version="0.32.0",
                 kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_rank": 0})
    assert "kv_transfer_config.kv_rank" in str(err.value) and "0.11.1..0.31.0" in str(err.value)
    with pytest.raises(TopologyError, match="kv_load_failure_policy.*0.13.0"):
        Topology(model=MODEL, vllm_version="0.12.0",
                 kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_load_failure_policy": "fail"})
    with pytest.raises(TopologyError, match="NixlPullConnector.*vLLM 0.23.0"):
        Topology(model=MODEL, vllm_version="0.23.0", kv_transfer_config={"kv_connector": "NixlPullConnector",
                                                                         "kv_role": "kv_consumer"})
    # a connector of one's own, loaded from a module path, is not in any table
    own = {"kv_connector": "MyConnector", "kv_role": "kv_both", "kv_connector_module_path": "my_pkg.connector"}
    assert Topology(model=MODEL, kv_transfer_config=own).kv_transfer_config.kv_connector == "MyConnector"
    for row in versions.RELEASES.values():
        assert "NixlConnector" in row.kv_connectors and "kv_buffer_device" in row.kv_transfer_keys
    assert [v for v, r in versions.RELEASES.items() if r.kv_both_deprecated][0] == versions.KV_BOTH_DEPRECATED_FROM


def test_the_built_in_engine_speaks_nixl_only():
    with pytest.raises(TopologyError) as err:
        Topology(model=MODEL, engine="epkit", kv_transfer_config={"kv_connector": "LMCacheConnectorV1",
                                                                  "kv_role": "kv_both"})
    assert "LMCacheConnectorV1" in str(err.value) and "allowed: NixlConnector" in str(err.value)


def test_the_flag_in_extra_args_is_refused():
    for args in (["--kv-transfer-config", SEED_KV], ["--kv_transfer_config=" + SEED_KV],
                 ["--kv-transfer-config.kv_role", "kv_both"]):
        with pytest.raises(TopologyError, match=r"set the topology field \(kv_transfer_config\)"):
            render(Topology(model=MODEL, extra_args=args))


def test_kv_both_with_nixl_warns_from_0_23_0_and_stays_valid():
    def notes(version, role="kv_both", engine="vllm"):
        t = Topology(model=MODEL, vllm_version=version, engine=engine,
                     kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": role})
        return [w for w in t.warnings() if "kv_both" in w]

    (note,) = notes("0.32.0")
    assert "deprecated" in note and "kv_producer" in note and "kv_consumer" in note and "0.32.0" in note
    assert notes("0.23.0") and not notes("0.22.1")
    assert notes("0.32.0", role="kv_producer") == [] and notes("0.32.0", engine="epkit") == []
    old = Topology(model=MODEL, vllm_version="0.17.1", kv_transfer_config=SEED_KV).warnings()
    assert any("kv_buffer_device is unset" in w and "'cuda'" in w for w in old)
    assert not any("kv_buffer_device" in w for w in Topology(model=MODEL, kv_transfer_config=SEED_KV).warnings())


def test_from_dict_repeats_counts_and_fills_each_instance():
    d = DisaggTopology.from_dict(yaml.safe_load(SPEC))
    assert d.labels == ["prefill0", "decode0", "decode1"] and d.pd == "1P2D" and d.gpus == 6
    assert [(role, i) for role, i, _ in d.instances] == [("prefill", 0), ("decode", 0), ("decode", 1)]
    assert {t.kv_transfer_config.to_json() for _, _, t in d.instances} == {SEED_KV_BACKENDS}
    assert [t.all2all_backend for _, _, t in d.instances] == ["deepep_high_throughput"] + ["deepep_low_latency"] * 2
    assert d.router == RouterConfig(policy="least_outstanding", port=8100, on="decode0")
    assert DisaggTopology.from_dict(d.to_dict()) == d
    assert epkit.DisaggTopology is DisaggTopology and epkit.KVTransferConfig is KVTransferConfig


def test_python_form_defaults_to_the_seeds_connector_and_an_instance_may_set_its_role():
    d = DisaggTopology(prefill=(Topology(**side(kv_transfer_config={"kv_connector": "NixlConnector",
                                                                       "kv_role": "kv_producer"})),),
                       decode=[Topology(**side(kv_transfer_config={"kv_connector": "NixlConnector",
                                                                     "kv_role": "kv_consumer"}))])
    assert d.kv_transfer_config.to_json() == SEED_KV and d.router == RouterConfig()
    assert [t.kv_transfer_config.kv_role for _, _, t in d.instances] == ["kv_producer", "kv_consumer"]
    assert d.warnings() == []  # no kv_both anywhere: nothing deprecated


@pytest.mark.parametrize("change, words", [
    (dict(decode=[side(model="deepseek-ai/DeepSeek-V3-0324")]), ["decode0.model='deepseek-ai/DeepSeek-V3-0324'",
                                                                  "prefill0.model='Qwen/Qwen3-30B-A3B'", "same model"]),
    (dict(decode=[side(extra_args=["--block-size", "32"])]), ["decode0 block size 32", "prefill0 block size 16",
                                                              "same block size"]),
    (dict(decode=[side(engine="epkit")]), ["decode0.engine='epkit'", "same engine"]),
    (dict(decode=[side(kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_producer"})]),
     ["decode0.kv_transfer_config.kv_role='kv_producer'", "kv_consumer, kv_both"]),
    (dict(prefill=[side(kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})]),
     ["prefill0.kv_transfer_config.kv_role='kv_consumer'", "kv_producer, kv_both"]),
    (dict(decode=[side(count=0)]), ["decode[0].count=0", ">= 1"]),
    (dict(decode=[side(dp=3)]), ["decode[0]: topology", "dp_local=3", "gpus_per_node=2"]),
    (dict(decode=[]), ["decode=[]", "non-empty list"]),
    (dict(decode=None), ["decode is missing"]),
    (dict(prefil=[side()]), ["unknown key(s) prefil", "valid keys: prefill, decode, kv_transfer_config, router"]),
    (dict(router={"policy": "random"}), ["router.policy='random'", "round_robin, least_outstanding"]),
    (dict(router={"port": 0}), ["router.port=0", "[1, 65535]"]),
    (dict(router={"on": "prefill0"}), ["router.on='prefill0'", "decode0, driver"]),
    (dict(router={"host": "x"}), ["router has unknown key(s) host", "policy, port, on"]),
    (dict(kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "gpu"}),
     ["kv_buffer_device='gpu'", "cuda, cpu, xpu"]),
])
def test_bad_disaggregated_specs_name_the_instance_field_and_allowed(change, words):
    data = {"prefill": [side()], "decode": [side()], **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(TopologyError) as err:
        DisaggTopology.from_dict(data)
    for word in words:
        assert word in str(err.value)


def test_block_size_is_read_from_extra_args():
    assert block_size(Topology(model=MODEL)) == 16
    assert block_size(Topology(model=MODEL, extra_args=["--block-size=32"])) == 32
    assert block_size(Topology(model=MODEL, extra_args=["--block_size", "64"])) == 64
    d = DisaggTopology.from_dict({"prefill": [side(extra_args=["--block-size", "16"])], "decode": [side()]})
    assert d.block_size == 16  # written or the default: the same 16
    with pytest.raises(TopologyError, match="--block-size 'x'"):
        block_size(Topology(model=MODEL, extra_args=["--block-size", "x"]))


def test_memory_plan_per_instance():
    d = DisaggTopology.from_dict({"prefill": [side(dp=1, gpus_per_node=1, enable_expert_parallel=False)],
                                  "decode": [side(dp=4, gpus_per_node=4)]})
    plans = dict(d.memory_plans("A100-40=40"))
    assert list(plans) == ["prefill0", "decode0"]
    assert not plans["prefill0"].fits and plans["decode0"].fits  # all 30B experts on one GPU vs split over 4
    spec = DisaggPlanSpec(d, gpus=("H100", "H200"))
    assert [(label, [p.gpu for p in ps]) for label, ps in spec.memory_plans()] == \
        [("prefill0", ["H100", "H200"]), ("decode0", ["H100", "H200"])]


def plan(*args):
    return subprocess.run([sys.executable, "-m", "epkit.cli", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_epkit_plan_renders_every_instance(tmp_path):
    spec = tmp_path / "pd.yaml"
    spec.write_text(SPEC + "plan: {gpus: [H100]}\n")
    assert isinstance(load_spec(spec), DisaggPlanSpec)
    text = plan(str(spec))
    assert text.returncode == 0, text.stderr
    for label in ("## prefill0: prefill instance 1", "## decode0: decode instance 1", "## decode1: decode instance 2"):
        assert label in text.stdout
    assert text.stdout.count(f"--kv-transfer-config '{SEED_KV_BACKENDS}'") == 3
    assert "router: epkit proxy --policy least_outstanding on decode0, port 8100" in text.stdout
    assert "1P2D: 3 instances, 6 GPUs" in text.stdout and "kv_role='kv_both'" in text.stdout
    report = json.loads(plan(str(spec), "--format", "json", "--gpu", "H200").stdout)
    assert report["kind"] == "disagg" and [i["label"] for i in report["instances"]] == ["prefill0", "decode0", "decode1"]
    assert [m["gpu"] for i in report["instances"] for m in i["memory"]] == ["H200"] * 3
    refused = plan(str(spec), "--dp", "4")
    assert refused.returncode == 2 and "--data-parallel-size would not say which instance" in refused.stderr
    spec.write_text(SPEC + "dp: 4\n")
    bad = plan(str(spec))
    assert bad.returncode == 2 and "unknown key(s) dp" in bad.stderr and "inside each prefill/decode" in bad.stderr


def test_the_0_32_0_row_is_what_the_installed_vllm_registers(vllm_python):
    """The release table's 0.32.0 KV connectors and KVTransferConfig fields against the real vLLM 0.32.0."""
    code = ("import dataclasses, json\n"
            "from vllm.config.kv_transfer import KVTransferConfig\n"
            "from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory\n"
            "print(json.dumps({'connectors': sorted(KVConnectorFactory._registry),\n"
            "                  'fields': [f.name for f in dataclasses.fields(KVTransferConfig)]}))")
    proc = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    row = versions.release("0.32.0")
    assert real["connectors"] == sorted(row.kv_connectors)
    assert tuple(real["fields"]) == row.kv_transfer_keys
    assert set(real["fields"]) <= set(KVTransferConfig.keys())


def test_router_on_key_written_bare_in_yaml():
    """`on:` unquoted is YAML 1.1's boolean true (PyYAML): the router still reads it as the `on` key."""
    import yaml

    from epkit.topology.disagg import RouterConfig

    data = yaml.safe_load("router: {policy: least_outstanding, on: driver}")["router"]
    assert True in data
    assert RouterConfig.from_dict(data) == RouterConfig(policy="least_outstanding", on="driver")
