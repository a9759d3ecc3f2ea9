"""Pure parts: sweep expansion and checks, dry runs of the cluster specs, failure classes, the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epkit.cli.sweep import main as sweep_main
from epkit.errors import TopologyError
from epkit.launch.failure import classify_exit, match_log
from epkit.launch.slurm import SlurmExecutor
from epkit.sweep.spec import load_sweep, parse_sweep, plan_sweep
from epkit.sweep.store import ResultStore

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SPECS = sorted((ROOT / "launchers/cluster").glob("*.yaml"))


def test_quickstart_expands_to_one_deployment_per_topology():
    spec = load_sweep(ROOT / "launchers/local/quickstart.yaml")
    plan = plan_sweep(spec)
    # 2 backends × DP ∈ {1, 2} with EPLB off, plus DP=2 with EPLB on
    assert plan["deployments"] == len(spec.topologies) == 5
    assert plan["points"] == 5 * sum(w.repeats for w in spec.workloads)
    assert len({t.id for t in spec.topologies}) == 5
    assert sum(t.topology.eplb is not None for t in spec.topologies) == 1


@pytest.mark.parametrize("path", CLUSTER_SPECS, ids=lambda p: p.stem)
def test_cluster_spec_dry_run_without_slurm(path, capsys):
    assert sweep_main([str(path), "--dry-run", "--results", "/nonexistent-epkit-results"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "deployments" in out
    spec = load_sweep(path)
    for tp in spec.topologies:
        assert tp.topology.gpus_per_node == 8


def test_two_node_dry_run_commands(capsys):
    sweep_main([str(ROOT / "launchers/cluster/deepseek_v3_two_node_deepep_ll.yaml"), "--dry-run", "--json"])
    plan = json.loads(capsys.readouterr().out)
    (topo,) = plan["topologies"]
    primary, headless = topo["commands"]
    for cmd in (primary, headless):
        flat = " ".join(cmd.replace("\\\n", " ").split())
        assert "--data-parallel-size 16 --data-parallel-size-local 8" in flat
        assert "--all2all-backend deepep_low_latency" in flat and "--enable-expert-parallel" in flat
        assert "export GLOO_SOCKET_IFNAME=eth0" in cmd
    assert "--headless" in headless and "--data-parallel-start-rank 8" in headless
    assert "--headless" not in primary and "--api-server-count 8" in primary
    assert topo["gpus"] == 16


def _spec(**over):
    data = {"name": "t", "model": "epkit-tiny-moe", "engine": "epkit", "defaults": {"enable_expert_parallel": True,
            "gpus_per_node": 2}, "topologies": {"grid": {"dp": [1, 2]}},
            "workloads": [{"dataset": "random", "input_len": 8, "output_len": 4, "num_prompts": 4}]}
    data.update(over)
    return data


def test_invalid_point_is_named_before_anything_starts():
    with pytest.raises(TopologyError, match=r"dp.: 3.*gpus_per_node=2|dp=3"):
        parse_sweep(_spec(topologies={"grid": {"dp": [1, 3]}}))
    with pytest.raises(TopologyError, match="workloads\\[0\\].*request_rate"):
        parse_sweep(_spec(workloads=[{"dataset": "random", "num_prompts": 4, "request_rate": [-1]}]))
    with pytest.raises(TopologyError, match=r"workloads\[0\]\.profile='yes' must be true or false"):
        parse_sweep(_spec(workloads=[{"dataset": "random", "num_prompts": 4, "profile": "yes"}]))
    profiled = parse_sweep(_spec(workloads=[{"dataset": "random", "num_prompts": 4, "profile": True}]))
    assert profiled.workloads[0].load["profile"] is True  # passed to the client as epkit.bench.arun(profile=True)
    with pytest.raises(TopologyError, match="unknown key.*colour"):
        parse_sweep(_spec(colour="red"))
    with pytest.raises(TopologyError, match="timeout_min is required"):
        parse_sweep(_spec(executor="slurm", slurm={"partition": "gpu"}))
    with pytest.raises(TopologyError, match="does not fit on H100"):
        parse_sweep({"model": "deepseek-ai/DeepSeek-V3-0324", "topologies": {"dp": 2, "enable_expert_parallel": True},
                     "workloads": [{"num_prompts": 4}], "plan": {"gpus": ["H100"]}})


def test_slurm_parameters_always_set_timeout_and_no_requeue():
    ex = SlurmExecutor(timeout_min=30, partition="gpu", reservation="r1", container={"image": "vllm.sqsh"})
    params = ex.parameters(nodes=2, gpus_per_node=8)
    assert params["timeout_min"] == 30 and params["nodes"] == 2 and params["tasks_per_node"] == 1
    assert params["slurm_gpus_per_node"] == 8 and params["slurm_partition"] == "gpu"
    assert params["slurm_additional_parameters"] == {"no_requeue": True, "reservation": "r1"}
    assert "--container-image=vllm.sqsh" in params["slurm_srun_args"]
    with pytest.raises(TopologyError):
        SlurmExecutor(timeout_min=0)


@pytest.mark.parametrize("line,kind", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("RuntimeError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp, unhandled system error", "nccl"),
    ("RuntimeError: [enforce fail at ../third_party/gloo/gloo/transport/tcp/pair.cc:446] op.preamble.length", "gloo"),
    ("OSError: [Errno 98] Address already in use", "address_in_use"),
    ("epkit.errors.EngineError: enable_eplb=True: EPLB is not yet supported", "config"),
])
def test_failure_classification(line, kind):
    assert match_log(f"INFO starting\n{line}\n")[0] == kind
    assert classify_exit(1, f"x\n{line}\n", node=1).kind == kind
    assert classify_exit(-9, "no clue").kind == "killed"
    assert classify_exit(3, "no clue").kind == "exit"


def test_store_atomic_write_and_status(tmp_path):
    import pandas as pd

    store = ResultStore(tmp_path, "s")
    p = store.point_path("topo", "wl", 1, 3)
    assert p.name == "wl__r1.json" and store.status(p) is None
    store.write_point(p, {"completed": 1, "epkit": {"point": {"status": "ok"}}}, pd.DataFrame({"a": [1]}))
    assert store.status(p) == "ok" and store.requests_path(p).exists()
    store.write_point(p, {"epkit": {"point": {"status": "failed"}}})
    assert store.status(p) == "failed" and not store.requests_path(p).exists()
    assert not [x for x in p.parent.iterdir() if ".tmp" in x.name]
    p.write_text('{"trunc')  # a torn file is not a finished point
    assert store.status(p) is None
