"""Scheduler limits over HTTP: chunked prefill, max-num-seqs queueing and KV-cache preemption."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

# 4 layers x 2 KV heads x 64 dims x float32 x (K and V) = 4 KiB per token: 2.5 MiB hold 640 tokens (40 blocks).
TIGHT = ["--kv-cache-memory-bytes", str(5 * 2**19), "--max-num-batched-tokens", "64", "--max-num-seqs", "4"]


def preemptions(deployment) -> float:
    text = httpx.get(deployment.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("epkit:num_preemptions_total{"))


def test_long_prompt_chunked_queueing_and_preemption_all_complete(deploy):
    d = deploy(["-dp", "2", "--enable-expert-parallel", *TIGHT])
    long_prompt = list(range(1, 256)) * 1 + [7] * 45  # 300 tokens: five prefill chunks of <= 64
    result = d.complete(long_prompt, max_tokens=8)
    assert result["usage"] == {"prompt_tokens": 300, "completion_tokens": 8, "total_tokens": 308}
    reference = d.complete("A prompt that will be preempted", max_tokens=150, ignore_eos=True)["choices"][0]["token_ids"]
    # 12 sequences of ~180 tokens on 2 ranks x 4 running x 640 KV slots: queueing and preemption both happen.
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: d.complete(f"Prompt {i} that fills the cache", max_tokens=150, ignore_eos=True,
                                                       temperature=0), range(12)))
    assert all(r["usage"]["completion_tokens"] == 150 for r in results)
    assert preemptions(d) > 0, "the KV budget should have forced preemptions"
    again = d.complete("A prompt that will be preempted", max_tokens=150, ignore_eos=True)["choices"][0]["token_ids"]
    assert again == reference  # the server is healthy and deterministic after preemptions
