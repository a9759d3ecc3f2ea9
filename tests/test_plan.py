import json
import subprocess
import sys
from pathlib import Path

import pytest

from epkit.topology import Topology
from epkit.topology.plan import GIB, memory_plan
from epkit.topology.spec import load_spec

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


def test_plan_reads_the_engine_flags_the_command_renders(tmp_path):
    """--max-model-len / --gpu-memory-utilization in extra_args are the values the memory verdict uses."""
    base = dict(model="deepseek-ai/DeepSeek-V3-0324", dp=8, enable_expert_parallel=True)
    at_072 = Topology.from_dict(dict(base, extra_args=["--gpu-memory-utilization", "0.72"]))
    short = Topology.from_dict(dict(base, extra_args=["--gpu-memory-utilization", "0.72", "--max-model-len", "32768"]))
    long_plan, short_plan = memory_plan(at_072, "H200"), memory_plan(short, "H200")
    assert long_plan.gpu_memory_utilization == short_plan.gpu_memory_utilization == 0.72
    assert long_plan.max_model_len == 163840 and not long_plan.fits  # the model's length: ~79k tokens of KV
    assert short_plan.max_model_len == 32768 and short_plan.fits
    assert short_plan.kv_cache_tokens == long_plan.kv_cache_tokens
    with pytest.raises(Exception, match="max_model_len=4096 disagrees with topology.max_model_len=32768"):
        memory_plan(short, "H200", max_model_len=4096)

    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(dict(base, extra_args=["--max-model-len", "32768", "--gpu-memory-utilization", "0.72"],
                                    plan={"gpus": ["H200"]})))
    out = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", str(spec), "--format", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    argv = report["nodes"][0]["argv"]
    assert argv[argv.index("--max-model-len") + 1] == "32768" and argv.count("--max-model-len") == 1
    assert report["memory"][0]["max_model_len"] == 32768 and report["memory"][0]["fits"]
    # the same flags on the command line mean the same thing
    flags = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", "--model", base["model"], "--dp", "8",
                            "--enable-expert-parallel", "--max-model-len", "32768", "--gpu-memory-utilization",
                            "0.72", "--gpu", "H200", "--format", "json"], capture_output=True, text=True)
    assert json.loads(flags.stdout)["nodes"][0]["argv"] == argv


def test_backend_advice_follows_the_target_release():
    from epkit.topology.plan import backend_advice

    old = Topology(model="deepseek-ai/DeepSeek-V3-0324", dp=8, enable_expert_parallel=True, vllm_version="0.16.0")
    new = Topology(model="deepseek-ai/DeepSeek-V3-0324", dp=8, enable_expert_parallel=True, vllm_version="0.32.0")
    assert backend_advice(old).endswith("or pplx")
    assert "not pplx" in backend_advice(new) and "or pplx" not in backend_advice(new)


def test_cli_accepts_vllm_dotted_eplb_flags():
    """`--eplb-config.num_redundant_experts 32` as `vllm serve` takes it; rendered back in the same form."""
    out = subprocess.run([sys.executable, "-m", "epkit.cli", "plan", "--model", "deepseek-ai/DeepSeek-V3-0324",
                          "--dp", "8", "--enable-expert-parallel", "--eplb-config.num_redundant_experts", "32",
                          "--eplb-config.log_balancedness=true", "--gpu", "H200", "--format", "json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["topology"]["eplb"] == {"num_redundant_experts": 32, "log_balancedness": True}
    assert report["derived"]["experts_per_rank"] == 36
    argv = report["nodes"][0]["argv"]
    assert argv[argv.index("--eplb-config.num_redundant_experts") + 1] == "32"
