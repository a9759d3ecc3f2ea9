"""The sweep's pd axis (issue 18, contract C6): colocated vs <p>P<d>D at equal GPU count. The expansion is pure
and checked here directly; one small real sweep (built-in engine, tiny model) runs colocated and 1P1D at dp=2
through the router and stores the pd columns; a second run resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from epkit.errors import TopologyError
from epkit.sweep.spec import expand_topologies, parse_sweep

from launch_helpers import TINY, end_leftovers

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": TINY, "engine": "epkit", "defaults": {"enable_expert_parallel": True, "gpus_per_node": 4}}


def points(block: dict) -> list:
    return expand_topologies({**BASE, "topologies": block})


def test_split_at_equal_gpu_count():
    pts = points({"dp": 4, "grid": {"pd": ["colocated", "1P1D", "1p3d", "3P1D"]}})
    assert [p.pd for p in pts] == ["colocated", "1P1D", "1P3D", "3P1D"]
    assert [p.id.rsplit("_", 1)[1] for p in pts] == ["colocated", "1P1D", "1P3D", "3P1D"]
    assert pts[0].disagg is None and pts[0].parts() == [("", pts[0].topology)]
    assert [(n, t.dp) for n, t in pts[1].parts()] == [("prefill0", 2), ("decode0", 2)]
    assert [n for n, _ in pts[2].parts()] == ["prefill0", "decode0", "decode1", "decode2"]
    for p in pts[1:]:
        assert p.disagg.gpus == p.topology.world_size == 4  # the colocated point's GPUs, split
        kv = p.disagg.kv_transfer_config  # the default connector: the seed's
        assert (kv.kv_connector, kv.kv_role) == ("NixlConnector", "kv_both")
        assert all(t.kv_transfer_config == kv and t.enable_expert_parallel for _, t in p.parts())


def test_share_gpus_runs_every_instance_on_the_points_gpus():
    colocated, shared = points({"dp": 1, "gpu_memory_utilization": 0.8,
                                "grid": {"pd": ["colocated", "1P1D"]}, "share_gpus": True})
    assert colocated.disagg is None and not colocated.share_gpus
    assert shared.share_gpus and shared.gpus == colocated.gpus == 1
    assert [(n, t.dp, t.gpu_memory_utilization) for n, t in shared.parts()] == [("prefill0", 1, 0.4), ("decode0", 1, 0.4)]
    assert "share_gpus" in shared.notes[0]
    from epkit.sweep import pd as pd_axis
    cols = pd_axis.columns(shared.pd, shared.disagg, shared.share_gpus)
    assert (cols["world_size"], cols["prefill_gpus"], cols["decode_gpus"]) == (1, 1, 1)
    with pytest.raises(TopologyError, match=r"share_gpus='yes'; allowed: true"):
        points({"dp": 1, "pd": "1P1D", "share_gpus": "yes"})


def test_split_errors_name_pd_and_dp():
    with pytest.raises(TopologyError, match=r"pd=1P2D splits dp=2 over 3 instances: dp must be a multiple of"):
        points({"dp": 2, "grid": {"pd": ["colocated", "1P2D"]}})
    with pytest.raises(TopologyError, match=r"pd='2x2'; allowed: colocated or <p>P<d>D"):
        points({"dp": 2, "grid": {"pd": ["2x2"]}})
    with pytest.raises(TopologyError, match=r"prefill has unknown key\(s\) backend; valid keys: model, tp"):
        points({"dp": 2, "pd": "1P1D", "prefill": {"backend": "naive"}})
    with pytest.raises(TopologyError, match=r"prefill describe\(s\) a split point: give pd too"):
        points({"dp": 2, "prefill": {"all2all_backend": "naive"}})
    with pytest.raises(TopologyError, match=r"pd=1P1D: nodes=3 do not split over 2 instances"):
        expand_topologies({**BASE, "defaults": {"gpus_per_node": 2}, "topologies": {"dp": 6, "nodes": 3, "pd": "1P1D"}})


def test_overrides_connector_and_router():
    (p,) = points({"dp": 2, "pd": "1P1D", "all2all_backend": "naive",
                   "prefill": {"extra_args": ["--max-num-seqs", "8"]}, "decode": {"max_model_len": 256},
                   "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                                          "kv_buffer_device": "cpu"},
                   "router": {"policy": "least_outstanding", "on": "driver"}})
    (_, prefill), (_, decode) = p.parts()
    assert "--max-num-seqs" in prefill.extra_args and decode.extra_args == ()
    assert decode.max_model_len == 256 and prefill.max_model_len is None
    assert prefill.all2all_backend == decode.all2all_backend == "naive"  # same backend unless overridden
    assert prefill.kv_transfer_config.kv_buffer_device == "cpu"
    assert (p.disagg.router.policy, p.disagg.router.on) == ("least_outstanding", "driver")


def test_split_points_are_kept_apart_and_deduplicated():
    """A 1P1D point never merges with its colocated twin; two 1P1D points whose backends have no effect on their
    dp=1 instances run the same code, so one is kept (the colocated dp=2 ones differ)."""
    pts = points({"dp": 2, "grid": {"pd": ["colocated", "1P1D"], "all2all_backend": ["naive", "allgather_reducescatter"]}})
    assert sorted(p.pd for p in pts) == ["1P1D", "colocated", "colocated"]
    (split,) = [p for p in pts if p.pd == "1P1D"]
    assert any("runs the same code" in n for n in split.notes)


def test_dry_run_prints_every_instance(tmp_path):
    spec = {**BASE, "name": "pddry", "topologies": {"dp": 2, "grid": {"pd": ["colocated", "1P1D"]}},
            "workloads": [{"dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 2}]}
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "epkit.cli", "sweep", str(path), "--dry-run", "--results",
                          str(tmp_path / "results")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    split = out.stdout.split("_1P1D")[1]
    for line in ("# prefill0 node 0", "# decode0 node 0", "export VLLM_NIXL_SIDE_CHANNEL_PORT=5600",
                 "export VLLM_NIXL_SIDE_CHANNEL_PORT=5601", "--kv-transfer-config",
                 "# router (epkit proxy, on decode0)", "epkit proxy --prefill '<prefill0-url>' --decode '<decode0-url>'"):
        assert line in split, line
    assert "--kv-transfer-config" not in out.stdout.split("_1P1D")[0]  # the colocated reference has no connector
    assert not (tmp_path / "results").exists()


@pytest.fixture
def _end_leftovers(tmp_path):
    yield
    left = [r for r in end_leftovers(tmp_path) if r.get("left")]
    assert not left, f"teardown could not end: {left}"


def test_local_sweep_colocated_vs_1p1d(tmp_path, _end_leftovers):
    from epkit.analysis import results

    spec = {**BASE, "name": "pd", "defaults": {"enable_expert_parallel": True, "gpus_per_node": 2,
                                               "all2all_backend": "allgather_reducescatter"},
            "topologies": {"dp": 2, "grid": {"pd": ["colocated", "1P1D"]}},
            "workloads": [{"name": "w", "dataset": "random", "input_len": 16, "output_len": 4, "num_prompts": 4}],
            "run": {"startup_timeout_s": 180, "grace_s": 3}}
    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "epkit.cli", "sweep", str(path), "--results", str(tmp_path / "results"),
           "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=360, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 ok, 0 failed" in out.stdout
    df = results.load(tmp_path / "results" / "pd").set_index("pd")
    assert sorted(df.index) == ["1P1D", "colocated"] and (df["status"] == "ok").all()
    assert (df.loc["1P1D", "pd_prefill_instances"], df.loc["1P1D", "pd_decode_instances"]) == (1, 1)
    assert df["gpus"].tolist() == [2, 2] and (df["completed"] == 4).all()
    assert df.loc["1P1D", "median_prefill_ms"] > 0  # measured through the router (epkit_pd per request)
    reqs = results.requests(tmp_path / "results" / "pd")
    assert reqs.loc[reqs["pd"] == "1P1D", "kv_transfer_ms"].notna().all()
    point = parse_sweep(spec).topologies
    run_dirs = list((tmp_path / "results" / "pd" / next(p.id for p in point if p.pd == "1P1D") / "logs").glob("*"))
    assert sorted(p.name for p in run_dirs[0].iterdir() if p.is_dir()) == ["decode0", "prefill0"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)  # resume: nothing to run
    assert again.returncode == 0 and "0 ok, 0 failed, 2 already done; 0 deployments started" in again.stdout


def test_killed_driver_leaves_nothing_after_resume(tmp_path, _end_leftovers):
    """kill -9 of the driver mid-point of a 1P1D point with the router on the driver: a resumed sweep ends the
    router (by its tag) and both instances (their records) before it starts anything."""
    import json
    import os
    import signal
    import time

    from epkit.launch import procs
    from epkit.sweep.runner import SweepRunner
    from launch_helpers import no_leftovers

    spec = {**BASE, "name": "k9", "topologies": {"pd": "1P1D", "dp": 2, "router": {"on": "driver"}},
            "workloads": [{"name": "slow", "dataset": "random", "input_len": 8, "output_len": 2, "num_prompts": 400,
                           "request_rate": 2}],
            "run": {"grace_s": 2, "lease_timeout_s": 300}}  # the orphan would outlive the test without the resume
    path = tmp_path / "k9.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    driver = subprocess.Popen([sys.executable, "-m", "epkit.cli", "sweep", str(path), "--results", str(results),
                               "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 180
    records = []
    while time.monotonic() < deadline:
        records = [json.loads(p.read_text()) for p in results.glob("k9/*/logs/*/deployment.json")]
        if records and records[0]["state"] == "ready":
            break
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    (top,) = records
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    router_pid = json.loads((Path(top["run_dir"]) / "router.json").read_text())["pid"]
    ids = [top["deployment_id"]] + [i["deployment_id"] for i in top["instances"].values()]
    assert procs.pid_alive(router_pid) and all(procs.tagged(i) for i in ids)  # all three outlive the driver
    said: list[str] = []
    runner = SweepRunner(parse_sweep(spec, str(path)), results, progress=False, say=said.append)
    runner.end_orphans()
    assert no_leftovers(ids, timeout_s=5) == [] and not procs.pid_alive(router_pid)
    assert sum("ending it before starting anything" in line for line in said) == 3, said
    # every part ended on its stop file (the router's own supervisor too): none needed the SIGKILL fallback
    assert [r["how"] for r in runner.summary["orphans_ended"]] == ["stop file"] * 3
    states = [json.loads(p.read_text())["state"] for p in results.glob("k9/*/logs/**/deployment.json")]
    assert states == ["stopped"] * 3


def test_the_one_gpu_pd_launcher_expands():
    """launchers/device/pd_1gpu.yaml (the GPU run of docs/disaggregated.md): for vLLM and the built-in engine,
    colocated and a 1P1D whose two instances share the one GPU with half the KV cache each. (vLLM is not on this
    machine's PATH: a stand-in prints the staged release, as docs/vllm_compare.md's dry run does.)"""
    data = yaml.safe_load((ROOT / "launchers/device/pd_1gpu.yaml").read_text())
    spec = parse_sweep(data, vllm_bin="printf '%s\\n' 0.26.0")
    assert [(tp.topology.engine, tp.pd) for tp in spec.topologies] == [
        ("vllm", "colocated"), ("vllm", "1P1D"), ("epkit", "colocated"), ("epkit", "1P1D")]
    for split in (tp for tp in spec.topologies if tp.pd == "1P1D"):
        assert split.share_gpus and split.gpus == 1
        for _, topo in split.parts():
            args = list(topo.extra_args)
            assert args[args.index("--kv-cache-memory-bytes") + 1] == "8000000000" and topo.gpu_memory_utilization == 0.46
