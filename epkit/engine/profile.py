"""Sizing the GPU KV cache from a profiled step, as vLLM does (issue 19).

Before the KV cache exists, each rank runs one eager forward of a dummy step of ``max_num_batched_tokens``
tokens (one prompt, or several of at most ``max_model_len`` tokens) into a temporary KV cache just large enough
for it, then the logits of each dummy sequence's last row; then, as vLLM's ``_dummy_sampler_run``, the logits and
a top-k + top-p draw of ``max_num_seqs`` rows (the sampling step of a full decode batch). The peak memory above the
baseline is what a step may need on top of the weights; the KV budget is

    total * gpu_memory_utilization - in use - peak - CUDA-graph reserve - margin

where "in use" is, as vLLM counts it, the live tensors after the profile (weights, buffers) plus the memory outside
torch's allocator taken since the runner started (the CUDA context and NCCL before it are not charged, nor blocks
torch's allocator keeps cached),

where the CUDA-graph reserve covers the graphs captured after the KV cache (their private pool, up to
``MAX_GRAPH_TOKENS`` rows: the forward's peak scaled to that many rows, times 2) and the margin covers allocator
fragmentation and workspaces. ``EPKIT_KV_PROFILE=off``, or a profile run that fails, keeps the former fixed
reserve (``GPU_ACTIVATION_RESERVE_BYTES``). The dummy step leaves no trace: the temporary cache is freed, EPLB's
load buffers and the sampling generator are restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from epkit.engine.attention import build_meta
from epkit.engine.graphs import MAX_GRAPH_TOKENS
from epkit.errors import EngineError

GPU_ACTIVATION_RESERVE_BYTES = 6 * 2**30  # the fixed reserve: EPKIT_KV_PROFILE=off, or when the profile run fails
KV_MARGIN_BYTES = 512 * 2**20  # allocator fragmentation, library workspaces
GRAPH_RESERVE_FACTOR = 2  # the graphs' pool, relative to the forward peak scaled to MAX_GRAPH_TOKENS rows


@dataclass(frozen=True)
class StepProfile:
    """What the dummy step measured (bytes above the baseline once the temporary cache exists; 0 on CPU)."""

    tokens: int  # token rows of the dummy step
    seqs: int  # dummy sequences it held
    forward_peak: int  # the forward and the last rows' logits
    sampler_peak: int  # logits and a top-k + top-p draw of max_num_seqs rows

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.sampler_peak)


def dummy_lengths(tokens: int, max_model_len: int, max_num_seqs: int) -> list[int]:
    """Prompt lengths of the dummy step: ``tokens`` in prompts of at most ``max_model_len``, at most ``max_num_seqs``."""
    lengths: list[int] = []
    left = tokens
    while left > 0 and len(lengths) < max_num_seqs:
        lengths.append(min(left, max_model_len))
        left -= lengths[-1]
    return lengths


def graph_reserve(forward_peak: int, tokens: int, graphs: bool) -> int:
    """Memory kept for the CUDA graphs captured after the KV cache: ``forward_peak * min(1, MAX_GRAPH_TOKENS / tokens)
    * 2``."""
    if not graphs or tokens <= 0:
        return 0
    return int(forward_peak * min(1.0, MAX_GRAPH_TOKENS / tokens) * GRAPH_RESERVE_FACTOR)


def kv_budget(total: int, used: int, util: float, peak: int | None, tokens: int, graphs: bool = True,
              forward_peak: int | None = None) -> int:
    """Bytes for the KV cache on a GPU of ``total`` bytes with ``used`` bytes in use (after the profile run).

    ``peak`` is the profiled step's peak (None: the profile did not run, the fixed reserve applies);
    ``forward_peak`` (default ``peak``) sizes the CUDA-graph reserve, ``graphs`` says whether graphs are captured."""
    if peak is None:
        return int(total * util) - used - GPU_ACTIVATION_RESERVE_BYTES
    reserve = graph_reserve(peak if forward_peak is None else forward_peak, tokens, graphs)
    return int(total * util) - used - peak - reserve - KV_MARGIN_BYTES


def kv_blocks(budget: int, block_bytes: int, block_size: int, max_model_len: int) -> int:
    """Blocks the block manager may hand out from ``budget`` bytes (one block of it is the graph steps' scratch
    block); :class:`EngineError` naming the flags to change when that is fewer than one max_model_len sequence needs."""
    num_blocks = budget // block_bytes - 1
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise EngineError(
            f"KV cache budget of {max(budget, 0) / 2**20:.1f} MiB holds {max(num_blocks, 0)} blocks of {block_size} "
            f"tokens, fewer than one sequence of max_model_len={max_model_len} needs ({needed}); raise "
            "--kv-cache-memory-bytes / --gpu-memory-utilization or lower --max-model-len"
        )
    return int(num_blocks)


def _mark(cuda: bool) -> int:
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak(cuda: bool, base: int) -> int:
    if not cuda:
        return 0
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)


@torch.inference_mode()
def profile_step(runner: Any) -> StepProfile:
    """Run the dummy step on ``runner`` (a :class:`~epkit.engine.runner.ModelRunner`, during or after its start) and
    return what it measured. Every DP rank calls this at the same point with the same token count (the MoE
    exchange inside the forward is a collective). Leaves the runner as it was: its KV cache is not touched."""
    dev, bs, mcfg = runner.device, runner.block_size, runner.mcfg
    cuda = dev.type == "cuda"
    lengths = dummy_lengths(runner.max_num_batched_tokens, runner.max_model_len, runner.max_num_seqs)
    n = sum(lengths)
    seqs, first = [], 0  # (cached, new, block table) of each dummy prompt, as runner.step_inputs gives build_meta
    for length in lengths:
        blocks = -(-length // bs)
        seqs.append((0, length, list(range(first, first + blocks))))
        first += blocks
    loads = runner.rebalancer.load_buffers() if runner.rebalancer is not None else []
    saved_loads = [t.clone() for t in loads]
    generator = getattr(runner, "_unseeded", None)
    saved_rng = generator.get_state() if generator is not None else None
    shape = ((first + 1) * bs, mcfg.num_kv_heads, mcfg.head_dim)
    caches = [(torch.zeros(shape, dtype=runner.dtype, device=dev), torch.zeros(shape, dtype=runner.dtype, device=dev))
              for _ in range(mcfg.num_layers)]
    try:
        base = _mark(cuda)
        # varied token ids (fixed seed): one id throughout would route every token to the same experts, which
        # sizes some MoE buffers for the worst skew and others for none
        ids = torch.randint(0, mcfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).to(dev)
        positions = torch.cat([torch.arange(length) for length in lengths]).to(dev)
        meta = build_meta(seqs, bs, dev, batch_decode=cuda)
        hidden = runner.model.forward(ids, positions, meta, caches, [n] * runner.comm.world_size)
        last = torch.tensor([sum(lengths[: i + 1]) - 1 for i in range(len(lengths))], device=dev)
        runner.model.logits(hidden[last])
        del ids, positions, meta, last
        forward_peak = _peak(cuda, base)
        _mark(cuda)
        sampler_peak = _sampler_peak(runner, hidden, cuda, base) if generator is not None else 0
    finally:
        for t, s in zip(loads, saved_loads):  # the dummy step is no expert load
            t.copy_(s)
        if saved_rng is not None:  # nor a draw from the generator of requests without a seed
            generator.set_state(saved_rng)
        del caches
        if cuda:
            torch.cuda.empty_cache()
    return StepProfile(n, len(lengths), forward_peak, sampler_peak)


def _sampler_peak(runner: Any, hidden: torch.Tensor, cuda: bool, base: int) -> int:
    """Peak of a full decode batch's sampling: logits of ``max_num_seqs`` rows (at most the step's), then the draw
    with top-k = vocab - 1, top-p = 0.9, temperature 0.5, as vLLM's dummy sampler run."""
    rows = min(runner.max_num_seqs, hidden.shape[0])
    logits = runner.model.logits(hidden[:rows])
    params = SimpleNamespace(greedy=False, temperature=0.5, top_k=max(1, logits.shape[-1] - 1), top_p=0.9, seed=None)
    runner._sample(logits, [SimpleNamespace(params=params, request_id=f"profile-{i}") for i in range(rows)])
    return _peak(cuda, base)
