"""`epkit bench --profile` against real vLLM (vLLM's CPU build) through `epkit sweep`: a workload with
``profile: true`` calls vLLM's /start_profile and /stop_profile, vLLM's worker writes its torch-profiler trace, and
`epkit profile` reads vLLM's own step annotations back to the tokens epkit's client sent."""

from __future__ import annotations

import json

import pytest

from epkit.analysis import results
from epkit.analysis.step_profile import summarize
from epkit.sweep.runner import run_sweep
from epkit.sweep.spec import parse_sweep

from launch_helpers import vllm_processes

pytestmark = pytest.mark.timeout(600)


def test_a_profiled_workload_on_vllm_cpu_writes_a_trace_epkit_profile_reads(vllm_cli, vllm_model_dir, tmp_path):
    prof = tmp_path / "prof"
    config = {"profiler": "torch", "torch_profiler_dir": str(prof), "torch_profiler_with_stack": False,
              "ignore_frontend": True}
    spec = parse_sweep({
        "name": "vllm-profile", "model": str(vllm_model_dir), "engine": "vllm", "vllm_bin": vllm_cli,
        "executor": "local",
        "defaults": {"gpus_per_node": 2, "max_model_len": 1024,
                     "extra_args": ["--load-format", "dummy", "--dtype", "bfloat16", "--enforce-eager",
                                    "--profiler-config", json.dumps(config)]},
        "topologies": [{"tp": 1}],
        "workloads": [{"name": "profiled", "dataset": "random", "input_len": 24, "output_len": 5, "num_prompts": 4,
                       "ignore_eos": True, "max_concurrency": 2, "profile": True}],
        "run": {"startup_timeout_s": 400, "hang_timeout_s": 240, "grace_s": 5, "lease_timeout_s": 120}})
    summary = run_sweep(spec, results_root=tmp_path / "results", progress=False)
    assert summary["failures"] == [] and summary["points_ok"] == 1, summary["failures"]
    assert vllm_processes(vllm_cli) == []
    (row,) = results.load(tmp_path / "results" / "vllm-profile").to_dict("records")
    traces = [p for p in prof.rglob("*.pt.trace.json*")]
    assert traces, f"vLLM wrote no trace into {prof}: {sorted(prof.rglob('*'))}"
    kinds = [summarize(p)["kinds"] for p in traces]
    steps = [k for k in kinds if k]  # the worker's trace (a front-end trace, if any, has no steps)
    assert len(steps) == 1, kinds
    ctx = sum(k["ctx_tokens_per_step"] * k["steps"] for k in steps[0].values())
    gen = sum(k["gen_tokens_per_step"] * k["steps"] for k in steps[0].values())
    # every prompt token the client sent was prefilled inside the profiled range (epkit's client sends nothing
    # before /start_profile), and each request's tokens after its first were decoded there
    assert round(ctx) == row["total_input_tokens"], (ctx, row["total_input_tokens"])
    assert round(gen) == row["total_output_tokens"] - 4, (gen, row["total_output_tokens"])
