import json
import subprocess
import sys
from pathlib import Path

import pytest

from epkit.plan import GIB, memory_plan
from epkit.spec import load_spec
from epkit.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
SEED_SPECS = sorted((ROOT / "launchers/seed").glob("*.yaml"))


def test_deepseek_eplb_overhead_one_redundant_per_rank():
    t = Topology(model="deepseek-ai/DeepSeek-V3-0324", dp=8, enable_expert_parallel=True,
                 eplb=__import__("epkit.topology", fromlist=["EPLBConfig"]).EPLBConfig(num_redundant_experts=8))
    # The seed: "approximately 2.4 GB for one redundant expert per EP rank" (58 layers × 44 MB)
    assert t.eplb_overhead_bytes_per_rank / GIB == pytest.approx(2.4, abs=0.05)
    assert t.eplb_overhead_bytes_per_rank / 1e9 == pytest.approx(2.55, abs=0.01)
    # the seed's formula: all experts a rank holds, (E + R) / EP per layer
    assert t.expert_bytes_per_rank == pytest.approx(58 * t.spec.bytes_per_expert * 33)


def test_deepseek_dp8_fits_h200_not_h100():
    t = load_spec(ROOT / "launchers/seed/single_node_dp8_pplx.yaml").topology
    h200 = memory_plan(t, "H200")
    h100 = memory_plan(t, "H100")
    assert h200.fits and h200.kv_cache_tokens > 163840
    assert not h100.fits and h100.kv_cache_bytes == 0
    assert 90 < h200.weight_bytes / GIB < 100  # ~17.8 GiB replicated + 76 GiB experts


def test_tp_splits_dense_weights_and_kv():
    one = memory_plan(Topology(model="Qwen/Qwen3-235B-A22B", tp=1, dp=8, enable_expert_parallel=True), "H200")
    four = memory_plan(Topology(model="Qwen/Qwen3-235B-A22B", tp=4, dp=2, enable_expert_parallel=True), "H200")
    assert four.non_expert_weight_bytes == pytest.approx(one.non_expert_weight_bytes / 4)
    assert four.expert_weight_bytes == pytest.approx(one.expert_weight_bytes)  # EP = 8 either way
    assert four.kv_bytes_per_token == one.kv_bytes_per_token / 4


def test_user_gpu_and_utilization():
    t = Topology(model="Qwen/Qwen3-30B-A3B", dp=2, enable_expert_parallel=True)
    small = memory_plan(t, "L4=24", gpu_memory_utilization=0.9, max_model_len=4096)
    assert small.gpu == "L4" and small.gpu_memory_bytes == 24 * GIB
    assert not small.fits  # ~33 GiB of weights per GPU


@pytest.mark.parametrize("spec", SEED_SPECS, ids=lambda p: p.stem)
def test_cli_plan_each_seed_spec(spec):
    text = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(spec)], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "vllm serve" in text.stdout and "# memory per GPU" in text.stdout
    js = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(spec), "--format", "json"],
                        capture_output=True, text=True)
    report = json.loads(js.stdout)
    assert report["nodes"][0]["argv"][:2] == ["vllm", "serve"]
    assert report["derived"]["ep_size"] == report["topology"]["tp"] * report["topology"]["dp"]


def test_cli_flags_form():
    out = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", "--model", "Qwen/Qwen3-30B-A3B", "--tp", "1",
                          "--dp", "4", "--enable-expert-parallel", "--enable-eplb", "--eplb-config",
                          '{"num_redundant_experts":4}', "--gpu", "H100", "--format", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    argv = report["nodes"][0]["argv"]
    assert argv[argv.index("--eplb-config") + 1] == '{"num_redundant_experts":4}'
    assert report["derived"]["experts_per_rank"] == 33
    assert [m["gpu"] for m in report["memory"]] == ["H100"]
