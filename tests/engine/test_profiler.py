"""vLLM's --profiler-config on the built-in engine: /start_profile and /stop_profile around a real load, traces whose
steps are named as vLLM's worker names them, delay/max iterations, and clear errors for bad configs."""

from __future__ import annotations

import gzip
import json
import re

import httpx
import pytest

from epkit import bench
from epkit.engine.cli import config_from_args
from epkit.errors import EngineError

STEP = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")


def steps_of(path) -> list[tuple[int, int, int, int]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]
    return [tuple(map(int, STEP.fullmatch(e["name"]).groups())) for e in events
            if e.get("cat") == "user_annotation" and STEP.fullmatch(e["name"])]


def test_bench_profile_writes_one_trace_whose_steps_add_up_to_the_prompts_and_outputs(deploy, tmp_path):
    out = tmp_path / "prof"
    d = deploy(["--profiler-config", json.dumps({"profiler": "torch", "torch_profiler_dir": str(out),
                                                 "torch_profiler_with_stack": False}),
                "--no-enable-prefix-caching"])  # the warm-ups repeat measured prompts: no cached prefix
    workload = bench.make_workload("random", input_len=24, output_len=6, num_prompts=8, range_ratio=0.5,
                                   vocab_size=200, seed=3)
    result = bench.run(d.url, "epkit-tiny-moe", workload, request_rate=40.0, num_warmups=2, progress=False,
                       profile=True)
    assert result["completed"] == 8
    traces = sorted(out.glob("epkit_dp0_*.pt.trace.json.gz"))
    assert len(traces) == 1 and (out / "profiler_out_0.txt").read_text().strip()
    steps = steps_of(traces[0])
    # the profiler ran from after the warm-ups to after the last request: every measured prompt token was
    # prefilled in a recorded step, and each request's tokens after its first were decoded in one
    measured = result.requests[~result.requests["warmup"].astype(bool)]
    assert sum(ctx for _, ctx, _, _ in steps) == int(measured["prompt_len"].sum())
    assert sum(gen for _, _, _, gen in steps) == int((measured["output_len_requested"] - 1).sum())
    assert all(n_gen == gen for _, _, n_gen, gen in steps)  # one token per decoding request

    # stop without a session; a bad override is a 400 naming it; max_iterations stops (and writes) by itself
    assert httpx.post(d.url + "/stop_profile", timeout=30).json() == {"ranks": ["not profiling"]}
    bad = httpx.post(d.url + "/start_profile", json={"max_iterations": -2}, timeout=30)
    assert bad.status_code == 400 and "max_iterations=-2" in bad.json()["error"]["message"]
    assert httpx.post(d.url + "/start_profile", json={"max_iterations": 3, "profile_prefix": "short_"},
                      timeout=30).status_code == 200
    d.complete([5, 6, 7], max_tokens=8)
    short = sorted(out.glob("short_epkit_dp0_*.pt.trace.json*"))
    assert len(short) == 1 and len(steps_of(short[0])) == 3


def test_without_profiler_config_the_routes_are_absent_and_bench_profile_says_how_to_start_it(deploy):
    d = deploy([])
    assert httpx.post(d.url + "/start_profile", timeout=30).status_code == 404
    workload = bench.make_workload("random", input_len=8, output_len=2, num_prompts=2, vocab_size=200)
    with pytest.raises(ValueError, match=r"start_profile answered 404 .*--profiler-config"):
        bench.run(d.url, "epkit-tiny-moe", workload, progress=False, profile=True)


@pytest.mark.parametrize("config, message", [
    ({"profiler": "cuda"}, "profiler='cuda': the built-in engine has the torch profiler only"),
    ({"profiler": "torch"}, "torch_profiler_dir must be set"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "proton_mode": "x"}, "proton_mode"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "max_iterations": -1}, "max_iterations=-1"),
    ({"profiler": "torch", "torch_profiler_dir": "/tmp/x", "torch_profiler_activities": ["GPU"]},
     "torch_profiler_activities"),
])
def test_bad_profiler_configs_name_the_field_and_what_is_allowed(config, message):
    with pytest.raises(EngineError, match=re.escape(message)):
        config_from_args(["epkit-tiny-moe", "--profiler-config", json.dumps(config)])


def test_dotted_profiler_flags_as_vllm_spells_them():
    cfg, _ = config_from_args(["epkit-tiny-moe", "--profiler-config.profiler", "torch",
                               "--profiler-config.torch_profiler_dir=rel/dir", "--profiler-config.max_iterations", "5"])
    assert cfg.profiler_config["profiler"] == "torch" and cfg.profiler_config["max_iterations"] == 5
    assert cfg.profiler_config["torch_profiler_dir"].endswith("/rel/dir")  # made absolute, as vLLM
