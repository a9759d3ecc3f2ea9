"""GPU KV cache sizing from a profiled dummy step, as vLLM does (issue 19; epkit/engine/profile.py).

The dummy step's forward and sampler run here on CPU (peaks are measured on a GPU only, 0 here): the runner's KV
cache, EPLB's load buffers, the sampling generator and the model come out unchanged, so a generation after a profile
run gives the same tokens. The budget arithmetic is a pure function, checked with made-up GPU numbers. On a GPU the
sizing runs in ``ModelRunner.__init__`` (tests/engine/test_gpu.py starts engines there)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

GiB, MiB = 2**30, 2**20


def _runner(monkeypatch, **kwargs):
    from epkit.engine.all2all import Communicator
    from epkit.engine.config import EngineConfig
    from epkit.engine.model import model_config_of
    from epkit.engine.runner import ModelRunner

    monkeypatch.setenv("EPKIT_CUDA_GRAPHS", "off")
    values = dict(model="epkit-tiny-moe", device="cpu", load_format="dummy", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=256, kv_cache_memory_bytes=8 * MiB)
    values.update(kwargs)
    cfg = EngineConfig(**values)
    model_config, model_dir = model_config_of(cfg)
    return ModelRunner(cfg, model_config, model_dir, 0, torch.device("cpu"), Communicator(0, 1))


def _generate(runner, prompts: list[list[int]], steps: int, greedy: bool = True) -> list[list[int]]:
    """Tokens of a short generation of every prompt at once (one prefill step, then decode steps), straight on the
    runner: blocks handed out in order, each sequence's table its own range."""
    params = SimpleNamespace(greedy=greedy, temperature=1.0, top_k=0, top_p=1.0, seed=None, logprobs=None,
                             prompt_logprobs=None)
    seqs, first, bs = [], 0, runner.block_size
    for i, prompt in enumerate(prompts):
        blocks = -(-(len(prompt) + steps) // bs)
        seq = SimpleNamespace(request_id=f"r{i}", token_ids=list(prompt), num_computed_tokens=0,
                              block_table=list(range(first, first + blocks)), params=params, prompt_logprobs=None)
        seq.num_tokens = len(prompt)
        seqs.append(seq)
        first += blocks
    assert first <= runner.num_blocks  # stand-ins for Sequence: the runner reads only these fields
    out = [[] for _ in prompts]
    for _ in range(steps):
        batch = [(s, s.num_tokens - s.num_computed_tokens) for s in seqs]
        sampled = runner.execute(batch, [sum(new for _, new in batch)])
        for i, (s, new) in enumerate(batch):
            s.num_computed_tokens += new
            s.token_ids.append(sampled[s.request_id])
            s.num_tokens += 1
            out[i].append(sampled[s.request_id])
    return out


PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [11, 4, 6], [2] * 20]


def test_profile_step_runs_on_cpu_and_leaves_runner_unchanged(monkeypatch):
    from epkit.engine.profile import profile_step

    runner = _runner(monkeypatch)
    before_greedy = _generate(runner, PROMPTS, 6)
    before_sampled = _generate(runner, PROMPTS, 6, greedy=False)

    runner2 = _runner(monkeypatch)
    for k, v in runner2.kv_caches:
        k.normal_()
        v.normal_()
    caches = [(k.clone(), v.clone()) for k, v in runner2.kv_caches]
    weights = [t.clone() for t in runner2.model.w.layers[0].values() if isinstance(t, torch.Tensor)]
    rng = runner2._unseeded.get_state()
    profile = profile_step(runner2)
    # 256 tokens in prompts of at most max_model_len=128: two dummy sequences; no peaks measured on CPU
    assert (profile.tokens, profile.seqs, profile.peak, profile.forward_peak, profile.sampler_peak) == (256, 2, 0, 0, 0)
    for (k, v), (k0, v0) in zip(runner2.kv_caches, caches):
        assert torch.equal(k, k0) and torch.equal(v, v0)  # the real cache was not touched
    assert all(torch.equal(a, b) for a, b in zip(weights, (t for t in runner2.model.w.layers[0].values()
                                                          if isinstance(t, torch.Tensor))))
    assert torch.equal(runner2._unseeded.get_state(), rng)  # the sampler's draw did not advance the generator
    # a generation after the profile run: the same tokens, greedy and sampled from the unseeded generator
    assert _generate(runner2, PROMPTS, 6) == before_greedy
    assert _generate(runner2, PROMPTS, 6, greedy=False) == before_sampled


def test_profile_step_restores_eplb_load_buffers(monkeypatch):
    from epkit.engine.profile import profile_step
    from epkit.engine.rebalance import Rebalancer, resolve_eplb_config

    runner = _runner(monkeypatch)
    mcfg = runner.mcfg
    eplb = resolve_eplb_config({"num_redundant_experts": 4, "window_size": 4, "step_interval": 8}, mcfg.num_experts, 2)
    rebalancer = Rebalancer(eplb, len(mcfg.moe_layers), mcfg.num_experts, 2, 0, 1, torch.device("cpu"), lambda t: t)
    calls = []

    def record(*args):
        calls.append(1)
        rebalancer.record(*args)

    runner.rebalancer, runner.model.record_routing = rebalancer, record  # not attached to the experts: only the load
    rebalancer.step_load.fill_(3.0)
    saved = [t.clone() for t in rebalancer.load_buffers()]
    profile_step(runner)
    assert len(calls) == len(mcfg.moe_layers)  # the dummy step's routing was recorded ...
    assert all(torch.equal(t, s) for t, s in zip(rebalancer.load_buffers(), saved))  # ... and taken back


def test_dummy_lengths_and_graph_reserve():
    from epkit.engine.profile import dummy_lengths, graph_reserve

    assert dummy_lengths(8192, 10240, 1024) == [8192]
    assert dummy_lengths(8192, 3000, 1024) == [3000, 3000, 2192]
    assert dummy_lengths(8192, 100, 4) == [100] * 4  # at most max_num_seqs sequences
    assert graph_reserve(GiB, 8192, True) == GiB // 2  # 1 GiB * 2048 (MAX_GRAPH_TOKENS) / 8192 * 2
    assert graph_reserve(GiB, 512, True) == 2 * GiB  # a step of <= 2,048 tokens: the whole peak, twice
    assert graph_reserve(GiB, 8192, False) == 0  # no graphs captured (--enforce-eager)


def test_kv_budget_arithmetic():
    from epkit.engine.profile import GPU_ACTIVATION_RESERVE_BYTES, KV_MARGIN_BYTES, kv_budget

    total, used = 80 * GiB, 60 * GiB  # the second argument: bytes in use after the profile (weights)
    # 0.9 * 80 = 72 GiB; - 60 in use - 2 GiB peak - 2 GiB * 2048 / 8192 * 2 graphs - 0.5 GiB margin
    assert kv_budget(total, used, 0.9, 2 * GiB, 8192) == int(72 * GiB) - 60 * GiB - 2 * GiB - GiB - KV_MARGIN_BYTES
    assert kv_budget(total, used, 0.9, 2 * GiB, 8192) == int(8.5 * GiB)
    assert kv_budget(total, used, 0.9, 2 * GiB, 8192, graphs=False) == int(9.5 * GiB)
    # the graph reserve follows the forward's peak, the activation reserve the larger (sampler) one
    assert kv_budget(total, used, 0.9, 3 * GiB, 8192, forward_peak=GiB) == int(72 * GiB) - 63 * GiB - GiB // 2 - KV_MARGIN_BYTES
    # the fallback (profile off or failed): the fixed 6 GiB reserve, as before
    assert GPU_ACTIVATION_RESERVE_BYTES == 6 * GiB
    assert kv_budget(total, used, 0.9, None, 8192) == int(72 * GiB) - 60 * GiB - 6 * GiB


def test_kv_blocks_and_the_too_small_error():
    from epkit.engine.profile import kv_blocks, kv_budget
    from epkit.errors import EngineError

    block_bytes = 16 * 96 * 1024  # 16 tokens of 96 KiB (48 layers x 4 KV heads x 128 x K+V x bf16)
    assert kv_blocks(9 * GiB, block_bytes, 16, 10240) == 9 * GiB // block_bytes - 1  # one block: the scratch block
    budget = kv_budget(80 * GiB, 71 * GiB, 0.9, GiB, 8192)  # 71 GiB in use: little left
    assert budget < 0
    with pytest.raises(EngineError, match=r"KV cache budget of 0\.0 MiB holds 0 blocks of 16 tokens, fewer than one "
                                          r"sequence of max_model_len=10240 needs \(640\); raise --kv-cache-memory-bytes"):
        kv_blocks(budget, block_bytes, 16, 10240)
    with pytest.raises(EngineError, match="holds 639 blocks"):
        kv_blocks(640 * block_bytes, block_bytes, 16, 10240)
    assert kv_blocks(641 * block_bytes, block_bytes, 16, 10240) == 640


def test_gpu_budget_profiles_logs_and_falls_back(monkeypatch, caplog):
    """ModelRunner._gpu_budget with the CUDA calls stubbed: the INFO line with the profiled numbers; a profile run that
    raises gives a WARNING and the fixed reserve; EPKIT_KV_PROFILE=off does not profile."""
    from epkit.engine import runner as runner_mod
    from epkit.engine.profile import StepProfile

    runner = _runner(monkeypatch, gpu_memory_utilization=0.9)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    # 61 GiB in use on the device: 0.5 GiB before the runner started (CUDA context), 60.5 GiB reserved by torch's
    # allocator of which 60 GiB are live tensors: only those 60 GiB count, as in vLLM
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (19 * GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 60 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: int(60.5 * GiB))
    runner._used_at_start = GiB // 2
    monkeypatch.setattr(runner_mod, "graph_mode", lambda r: ("cuda", "CUDA graphs"))
    runs = []

    def profiled(r):
        runs.append(r)
        return StepProfile(8192, 1, 2 * GiB, GiB)

    monkeypatch.setattr(runner_mod, "profile_step", profiled)
    block_bytes = 16 * 96 * 1024
    caplog.set_level(logging.INFO, logger="epkit.engine")
    assert runner._gpu_budget(block_bytes) == int(8.5 * GiB) and runs == [runner]
    assert ("60.00 GiB in use = 60.00 GiB of tensors (weights, buffers) + 0.00 GiB non-torch since start (not counted: "
            "0.50 GiB in use at start, 0.50 GiB cached by the allocator)" in caplog.text)
    assert ("activation peak 2.00 GiB (forward 2.00, sampler 1.00), CUDA-graph reserve 1.00 GiB, margin 0.50 GiB. "
            f"Available KV cache memory: 8.50 GiB; GPU KV cache size: {(int(8.5 * GiB) // block_bytes - 1) * 16} tokens"
            in caplog.text)

    def oom(r):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(runner_mod, "profile_step", oom)
    caplog.clear()
    assert runner._gpu_budget(block_bytes) == 6 * GiB  # 72 - 60 - 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the profile run failed (OutOfMemoryError: CUDA out of memory" in warnings[0].getMessage()
    assert "falling back to the fixed 6.0 GiB activation reserve" in warnings[0].getMessage()

    monkeypatch.setenv("EPKIT_KV_PROFILE", "off")
    monkeypatch.setattr(runner_mod, "profile_step", profiled)
    runs.clear()
    caplog.clear()
    assert runner._gpu_budget(block_bytes) == 6 * GiB and runs == []
    assert "fixed activation reserve 6.00 GiB (EPKIT_KV_PROFILE=off)" in caplog.text

    # with several DP ranks a failed profile step is an error naming the ways out (no per-rank fallback)
    monkeypatch.setenv("EPKIT_KV_PROFILE", "auto")
    monkeypatch.setattr(runner_mod, "profile_step", oom)
    monkeypatch.setattr(runner.comm, "world_size", 2)
    from epkit.errors import EngineError

    with pytest.raises(EngineError, match="profile step failed \\(OutOfMemoryError.*--kv-cache-memory-bytes.*"
                                          "EPKIT_KV_PROFILE=off"):
        runner._gpu_budget(block_bytes)


def test_draw_in_row_chunks_gives_each_seeded_row_the_same_token(monkeypatch):
    """The sampler draws at most SAMPLE_CHUNK_ROWS rows at a time (its full-vocabulary sorts of 1,024 rows would hold
    GiBs at once): a seeded row's token depends on its logits and seed only, so it is the same whatever the chunking
    (exact: every operation is per row)."""
    from epkit.engine import runner as runner_mod

    runner = _runner(monkeypatch)
    torch.manual_seed(1)
    logits = torch.randn(7, 512) * 3
    mixes = [dict(temperature=0.7, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=20, top_p=1.0),
             dict(temperature=0.9, top_k=0, top_p=0.8), dict(temperature=0.5, top_k=50, top_p=0.9)]
    seqs = [SimpleNamespace(request_id=f"r{i}", params=SimpleNamespace(greedy=False, seed=100 + i, **mixes[i % 4]))
            for i in range(7)]

    def draw(chunk: int) -> list[int]:
        monkeypatch.setattr(runner_mod, "SAMPLE_CHUNK_ROWS", chunk)
        runner._generators.clear()  # each request's seeded generator starts again
        return runner._draw(logits, seqs).tolist()

    whole = draw(256)
    assert draw(2) == whole and draw(3) == whole and len(whole) == 7
