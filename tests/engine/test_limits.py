"""Scheduler limits over HTTP: chunked prefill, max-num-seqs queueing and KV-cache preemption."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

# 4 layers x 2 KV heads x 64 dims x float32 x (K and V) = 4 KiB per token: 2.5 MiB hold 640 tokens (40 blocks,
# one of them the graph steps' scratch block).
TIGHT = ["--kv-cache-memory-bytes", str(5 * 2**19), "--max-num-batched-tokens", "64", "--max-num-seqs", "4"]


def preemptions(deployment) -> list[float]:
    """The engine's preemption counter of each DP rank (/metrics; a rank appears once it has preempted)."""
    text = httpx.get(deployment.url + "/metrics").text
    counted = {line.split('dp_rank="')[1].split('"')[0]: float(line.split()[-1])
               for line in text.splitlines() if line.startswith("epkit:num_preemptions_total{")}
    return [counted.get(str(rank), 0.0) for rank in (0, 1)]


def test_long_prompt_chunked_queueing_and_preemption_all_complete(deploy):
    d = deploy(["-dp", "2", "--enable-expert-parallel", *TIGHT])
    long_prompt = list(range(1, 256)) * 1 + [7] * 45  # 300 tokens: five prefill chunks of <= 64
    result = d.complete(long_prompt, max_tokens=8)
    assert result["usage"] == {"prompt_tokens": 300, "completion_tokens": 8, "total_tokens": 308}

    # Five greedy requests pinned to DP rank 0: at most 4 run (the fifth queues), and 4 x (53 prompt + 150 output)
    # tokens need 52 KV blocks of the 39 the rank has, so the rank must preempt (free a running sequence's blocks
    # and recompute its prompt and the tokens it had generated when it is admitted again).
    prompts = [f"Request number {i} has a prompt of fifty bytes, roughly" for i in range(5)]
    pin = {"X-data-parallel-rank": "0"}

    def run(prompt: str) -> dict:
        r = httpx.post(d.url + "/v1/completions", headers={**d.headers, **pin}, timeout=300,
                       json={"model": "epkit-tiny-moe", "prompt": prompt, "max_tokens": 150, "ignore_eos": True,
                             "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200 and r.headers["x-data-parallel-rank"] == "0", r.text
        return r.json()

    alone = [run(p)["choices"][0]["token_ids"] for p in prompts]  # one at a time: never preempted
    assert preemptions(d) == [0, 0]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert all(r["usage"]["completion_tokens"] == 150 for r in together)
    counted = preemptions(d)
    assert counted[0] >= 1 and counted[1] == 0, f"the KV budget should have forced rank 0 to preempt: {counted}"
    # every request on rank 0 is one of these five, so each preempted one is among them: a recomputed sequence
    # continues with exactly the greedy tokens it would have produced alone
    assert [r["choices"][0]["token_ids"] for r in together] == alone
