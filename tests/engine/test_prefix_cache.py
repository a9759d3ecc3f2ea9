"""Prefix caching (``--enable-prefix-caching``, on by default as in vLLM): the block manager's bookkeeping, the
scheduler's admission with cached blocks, and real `epkit serve` deployments through the `openai` client -
same greedy tokens and logprobs as without the cache, vLLM's hit counters, LRU eviction under a small KV cache."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from epkit.engine.block_manager import BlockManager
from epkit.engine.scheduler import Scheduler, SchedulerConfig
from epkit.engine.sequence import EngineRequest, SamplingParams, Sequence

BS = 4  # block size of the bookkeeping tests


def _seq(tokens, rid="r", **params) -> Sequence:
    return Sequence(EngineRequest(rid, tuple(tokens), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, **params)))


def _computed(blocks: BlockManager, seq: Sequence) -> Sequence:
    """Admit ``seq`` whole (sharing what is cached), then mark every prompt token computed."""
    cached = blocks.cached_prefix(seq)
    blocks.allocate(seq, seq.num_tokens, cached)
    seq.num_computed_tokens = seq.num_tokens
    return seq


def test_flags_as_vllm_on_by_default():
    from epkit.engine.cli import config_from_args
    from epkit.errors import EngineError

    assert config_from_args(["m"])[0].enable_prefix_caching  # vLLM 0.32's default for generative models
    assert not config_from_args(["m", "--no-enable-prefix-caching"])[0].enable_prefix_caching
    cfg = config_from_args(["m", "--enable-prefix-caching", "--prefix-caching-hash-algo", "sha256_cbor"])[0]
    assert cfg.enable_prefix_caching and cfg.prefix_caching_hash_algo == "sha256_cbor"
    with pytest.raises(EngineError, match=r"prefix_caching_hash_algo='md5'; allowed: sha256, sha256_cbor, xxhash"):
        config_from_args(["m", "--prefix-caching-hash-algo", "md5"])


def test_hashes_chain_over_the_whole_prefix():
    blocks = BlockManager(8, BS, enable_caching=True)
    a = blocks.block_hashes(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), 2)
    assert a == blocks.block_hashes(_seq([1, 2, 3, 4, 5, 6, 7, 8]), 2) and a[0] != a[1]
    other_first = blocks.block_hashes(_seq([0, 2, 3, 4, 5, 6, 7, 8]), 2)
    assert other_first[0] != a[0] and other_first[1] != a[1]  # equal tokens after a different parent: another block


def test_shared_blocks_are_reference_counted_and_freed_blocks_stay_cached():
    blocks = BlockManager(8, BS, enable_caching=True)
    a = _computed(blocks, _seq(range(10), "a"))
    assert blocks.cached_prefix(_seq(range(10))) == []  # computed but not yet in the cache (next allocation / free)
    blocks.free(a)
    assert blocks.num_cached_blocks == 2 and blocks.num_free_blocks == 8  # 2 full blocks kept, the partial one not
    b = _seq([*range(8), 50, 51, 52], "b")
    cached = blocks.cached_prefix(b)
    assert len(cached) == 2
    assert blocks.blocks_needed(b, b.num_tokens, cached) == 3  # 2 cached blocks leave the free pool + 1 fresh
    blocks.allocate(b, b.num_tokens, cached)
    c = _seq(range(9), "c")
    blocks.allocate(c, c.num_tokens, blocks.cached_prefix(c))
    assert b.block_table[:2] == c.block_table[:2] == cached and [blocks.ref_count(x) for x in cached] == [2, 2]
    assert (b.num_cached_tokens, c.num_cached_tokens) == (8, 8)
    assert (blocks.queries, blocks.hits) == (10 + 11 + 9, 16)  # a's lookup found nothing
    assert blocks.num_free_blocks == 8 - 3 - 1
    blocks.free(b)
    assert [blocks.ref_count(x) for x in cached] == [1, 1] and blocks.num_free_blocks == 8 - 3
    blocks.free(c)
    assert blocks.num_free_blocks == 8 and blocks.num_cached_blocks == 2


def test_a_whole_cached_prompt_recomputes_its_last_block():
    blocks = BlockManager(8, BS, enable_caching=True)
    blocks.free(_computed(blocks, _seq(range(8), "a")))
    assert blocks.num_cached_blocks == 2
    again = _seq(range(8), "b")
    assert len(blocks.cached_prefix(again)) == 1  # at least the last token is computed: vLLM's rule
    blocks.free(_computed(blocks, again))  # its recomputed last block duplicates a cached one: freed uncached
    assert blocks.num_cached_blocks == 2 and blocks.num_free_blocks == 8


def test_lru_eviction_takes_never_cached_blocks_first_then_the_least_recently_freed():
    blocks = BlockManager(6, BS, enable_caching=True)
    x = _computed(blocks, _seq(range(8), "x"))
    y = _computed(blocks, _seq(range(100, 108), "y"))
    x_table, y_table = list(x.block_table), list(y.block_table)
    blocks.free(x)
    blocks.free(y)
    z = _seq(range(200, 208), "z")
    blocks.allocate(z, 8, blocks.cached_prefix(z))
    assert blocks.evictions == 0 and blocks.num_cached_blocks == 4  # the 2 never-cached blocks went first
    w = _seq(range(300, 312), "w")
    blocks.allocate(w, 12, blocks.cached_prefix(w))
    assert w.block_table[:2] == [x_table[1], x_table[0]]  # x was freed first, its last block before its first
    assert w.block_table[2] == y_table[1] and blocks.evictions == 3
    assert len(blocks.cached_prefix(_seq(range(100, 109)))) == 1 and blocks.cached_prefix(_seq(range(9))) == []


def test_no_lookup_when_caching_is_off_or_prompt_logprobs_are_asked():
    off = BlockManager(8, BS)
    off.free(_computed(off, _seq(range(10))))
    assert off.cached_prefix(_seq(range(10))) is None and off.num_cached_blocks == 0
    on = BlockManager(8, BS, enable_caching=True)
    on.free(_computed(on, _seq(range(10))))
    assert on.cached_prefix(_seq(range(10), prompt_logprobs=1)) is None  # every prompt position must be computed


def _scheduler(num_blocks: int, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(8, budget, 256, eos_token_id=2), BlockManager(num_blocks, BS, enable_caching=True))


def _run(s: Scheduler) -> list:
    outs = []
    while s.has_work:
        batch = s.schedule()
        outs += s.postprocess(batch, {q.request_id: 7 for q, n in batch if q.num_computed_tokens + n == q.num_tokens})
    return outs


def _request(rid: str, tokens, max_tokens: int = 2) -> EngineRequest:
    return EngineRequest(rid, tuple(tokens), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def test_scheduler_admits_a_cached_prefix_as_computed_and_reports_it_once():
    s = _scheduler(16)
    s.add(_request("a", range(10)))
    assert [o.num_cached_tokens for o in _run(s)] == [0, None]
    b = s.add(_request("b", [*range(8), 40, 41, 42]))
    batch = s.schedule()
    assert batch == [(b, 3)] and b.num_computed_tokens == 8  # the 2 cached blocks are not recomputed
    outs = s.postprocess(batch, {"b": 7})
    assert outs[0].num_cached_tokens == 8
    _run(s)
    assert s.blocks.num_free_blocks == 16 and (s.blocks.queries, s.blocks.hits) == (21, 8)


def test_preemption_and_release_drop_references_and_keep_the_blocks_cached():
    s = _scheduler(16)
    a = s.add(_request("a", range(12), max_tokens=4))
    s.postprocess(s.schedule(), {"a": 7})
    s._preempt(s.running.pop())  # as the scheduler does when blocks run out
    assert a.block_table == [] and s.blocks.num_free_blocks == 16 and s.blocks.num_cached_blocks == 3
    batch = s.schedule()  # 13 tokens now: 3 cached blocks, the last token recomputed
    assert batch == [(a, 1)] and a.num_computed_tokens == 12 and a.num_cached_tokens == 0  # hits count once
    _run(s)
    held = s.add(_request("h", range(12), max_tokens=1))
    s.on_hold = lambda seq: {"held": seq.request_id}
    held.kv_transfer_params = {"do_remote_decode": True}
    _run(s)
    assert s.holding and all(s.blocks.ref_count(b) == 1 for b in held.block_table)
    other = s.add(_request("o", range(12)))
    s.schedule()
    assert other.block_table[:2] == held.block_table[:2] and s.blocks.ref_count(held.block_table[0]) == 2
    assert s.release_held("h") == 3 and s.blocks.ref_count(other.block_table[0]) == 1


# ---- through `epkit serve` -----------------------------------------------------------------------------
SYSTEM = [(7 * i) % 240 + 3 for i in range(100)]  # a long shared "system prompt" (token ids)
PROMPTS = [
    SYSTEM + list(range(11, 31)),  # 120 tokens
    SYSTEM + [30, 31, 32, 33, 34],  # shares SYSTEM's 6 full blocks (96 tokens) with the first
    SYSTEM + list(range(11, 31)),  # identical to the first: its 7 full blocks (the rest computed, to sample)
    list(range(40, 104)),  # 64 tokens: 4 whole blocks ...
    list(range(40, 104)),  # ... sent again: 3 blocks reused, the last one recomputed to sample
]
HITS = [0, 96, 112, 0, 48]


def counters(d, name: str, engine: str = "") -> float:
    """The sum of counter ``name`` over the DP ranks (or of DP rank ``engine``)."""
    text = httpx.get(d.url + "/metrics", timeout=10).text
    lines = re.findall(rf'^{re.escape(name)}_total{{([^}}]*)}} (\S+)$', text, re.M)
    return sum(float(v) for labels, v in lines if not engine or f'engine="{engine}"' in labels)


def greedy(d, prompt, max_tokens: int = 8, rank: int | None = None):
    client = openai.OpenAI(base_url=d.url + "/v1", api_key="EMPTY", max_retries=0)
    headers = {"X-data-parallel-rank": str(rank)} if rank is not None else None
    choice = client.completions.create(model="epkit-tiny-moe", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True}, extra_headers=headers).choices[0]
    return choice.logprobs.tokens, choice.logprobs.token_logprobs


@pytest.mark.parametrize("steps", ["eager", "graph-emulated"])
def test_same_greedy_tokens_and_logprobs_with_and_without_prefix_caching(steps, deploy, monkeypatch):
    """``graph-emulated``: every step runs as a padded CUDA-graph step (EPKIT_CUDA_GRAPHS=emulate, on CPU), where a
    continuation after cached blocks is rows attending to their sequence's cache like decode queries."""
    if steps == "graph-emulated":
        monkeypatch.setenv("EPKIT_CUDA_GRAPHS", "emulate")
    cached, plain = deploy([]), deploy(["--no-enable-prefix-caching"])
    hits = []
    for prompt in PROMPTS:
        before = counters(cached, "vllm:prefix_cache_hits")
        tokens, logprobs = greedy(cached, prompt)
        hits.append(counters(cached, "vllm:prefix_cache_hits") - before)
        want_tokens, want_logprobs = greedy(plain, prompt)
        assert tokens == want_tokens
        assert all(abs(a - b) <= 1e-4 for a, b in zip(logprobs, want_logprobs)), (logprobs, want_logprobs)
    assert hits == HITS
    assert counters(cached, "vllm:prefix_cache_queries") == sum(len(p) for p in PROMPTS)
    assert counters(plain, "vllm:prefix_cache_queries") == counters(plain, "vllm:prefix_cache_hits") == 0


def test_lru_eviction_under_a_small_kv_cache_keeps_serving(deploy):
    """12 blocks of 16 tokens: four 48-token prompts fill the cache, a fifth evicts the oldest (A), A again evicts
    the next oldest (B); C, freed after them, is still there. Every answer equals the first one for its prompt."""
    d = deploy(["--max-model-len", "128", "--kv-cache-memory-bytes", str(13 * 16 * 4096)])
    assert "KV cache 12 blocks x 16 tokens" in d.nodes[0].log()
    prompts = {name: [first + i for i in range(48)] for name, first in zip("ABCDE", (3, 53, 103, 153, 203))}
    first = {name: greedy(d, prompt, max_tokens=1) for name, prompt in prompts.items()}
    assert counters(d, "vllm:prefix_cache_hits") == 0
    for name, hits in (("A", 0), ("C", 32), ("B", 0)):
        before = counters(d, "vllm:prefix_cache_hits")
        tokens, logprobs = greedy(d, prompts[name], max_tokens=1)
        assert counters(d, "vllm:prefix_cache_hits") - before == hits, name
        assert tokens == first[name][0] and abs(logprobs[0] - first[name][1][0]) <= 1e-4


def test_a_continuation_after_cached_blocks_never_takes_the_whole_prompt_burst():
    """The GPU's attention plan (built here on CPU): SDPA over views of the step's own q/k/v serves only a run of
    whole prompts of one length; prompts that start after cached blocks read those from the cache."""
    import torch

    from epkit.engine.attention import _prefill_batch, build_meta

    cpu = torch.device("cpu")
    whole = build_meta([(0, 32, [0, 1]), (0, 32, [2, 3])], 16, cpu, batch_decode=True)
    assert whole.paged.fresh == (0, 2, 32)
    after_cache = build_meta([(16, 32, [0, 1, 2]), (16, 32, [0, 4, 5])], 16, cpu, batch_decode=True)
    assert after_cache.paged.fresh is None and list(after_cache.paged.ctx) == [48, 48]
    assert not _prefill_batch(after_cache.prefill_host, cpu).fresh
    mixed = build_meta([(0, 32, [0, 1]), (16, 16, [0, 2])], 16, cpu, batch_decode=True)
    assert mixed.paged.fresh == (0, 1, 32) and list(mixed.paged.fresh_seqs) == [0]  # the whole prompt alone


def test_each_dp_rank_has_its_own_cache(deploy):
    """DP=2 with EP: a prompt cached on rank 0 is not found on rank 1 until rank 1 has computed it itself."""
    d = deploy(["-dp", "2", "--enable-expert-parallel"])
    want = greedy(d, PROMPTS[0], rank=0)
    assert greedy(d, PROMPTS[0], rank=1)[0] == want[0]
    assert counters(d, "vllm:prefix_cache_hits") == 0
    tokens, logprobs = greedy(d, PROMPTS[0], rank=1)
    assert counters(d, "vllm:prefix_cache_hits", engine="1") == 112 and counters(d, "vllm:prefix_cache_hits") == 112
    assert tokens == want[0] and all(abs(a - b) <= 1e-4 for a, b in zip(logprobs, want[1]))
    assert counters(d, "vllm:prefix_cache_queries", engine="0") == len(PROMPTS[0])
