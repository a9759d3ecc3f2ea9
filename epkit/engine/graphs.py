"""CUDA graphs for engine steps: capture a step's forward once per shape, then replay it.

Eager steps on a GPU are bound by the host: a 48-layer step launches ~3,000-6,000 kernels and
the GPU idles most of the step (docs/benchmarks.md has the profile). A graph step pads every DP rank's
rows to one capture size ``T`` (the smallest that holds the largest rank's token count, from the
counts all ranks exchange each step), so all ranks replay the same graph and the MoE collectives
inside it line up. Rows are tokens: a decode row is a sequence's one new token, and a prefill
(or chunked-prefill) sequence gives one row per new token. Every row attends like a decode query
through the Triton paged kernel: to the cached tokens of its own sequence up to its own position
(``ctx = position + 1``), through its sequence's block table, after the step's K/V are written -
so a prompt's tokens see each other causally, and a step that mixes a new prompt with running
decodes is one graph (vLLM reaches the same with piecewise or full graphs of mixed batches).
Capture sizes are vLLM's decode sizes (1, 2, 4, 8 ... 256) and then every 64 up to
``MAX_GRAPH_TOKENS``; steps with more tokens (a large prefill, GPU-bound anyway) run eager.
``EPKIT_GRAPH_STEPS=decode`` keeps graphs to all-decode steps (every row a sampled one-token
decode), the behaviour before mixed steps; so does a machine without the paged kernel, where the
PyTorch attention path pads each row's context to a multiple of 256 tokens.

Inputs live in fixed device buffers that every graph reads (views of the largest size):
token ids, positions, the KV slot of each new token, block tables, context lengths, and
the mask of real rows across ranks. Padding rows read and write one scratch KV block that
no sequence owns, attend to that one slot, and are masked out of the MoE exchange (they
contribute nothing to any real row and are not counted as expert load), so a padded step
computes the same real rows as an eager one. Graphs are captured lazily, the first time a
(T, C) shape occurs, on every rank at the same step, except where one context bucket serves every
step (the paged kernel): then every size is captured at start (:meth:`StepGraphs.capture_all`, largest
first), as vLLM does, and no capture happens while serving. An EPLB rearrangement keeps every graph: it
rewrites the expert weights and routing maps in place (same tensors, same storage; see
:mod:`epkit.engine.rebalance`), so the captured graphs read the new placement and serving never stalls
on a re-capture.

``EPKIT_CUDA_GRAPHS=emulate`` (formerly ``EPKIT_DECODE_GRAPHS``) runs exactly this padded, fixed-buffer
step without capturing it (on CPU too), so the padding and masking are tested where no GPU is;
``EPKIT_CUDA_GRAPHS=off`` runs every step eager, as ``--enforce-eager`` does.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from epkit.engine.attention import AttentionMeta
from epkit.engine.config import env_value

if TYPE_CHECKING:
    from epkit.engine.all2all import Communicator
    from epkit.engine.config import EngineConfig
    from epkit.engine.model import ModelConfig, MoEModel
    from epkit.engine.rebalance import Rebalancer
    from epkit.engine.sequence import Sequence

log = logging.getLogger("epkit.engine")

CTX_BUCKET = 256  # context lengths are padded up to a multiple of this (and of the block size)
MAX_CAPTURE_SIZE = 256  # vLLM's classic default largest decode graph
# largest mixed (prefill + decode) step run as a graph; larger ones run eager. An eager step of ~1,500 tokens spent
# 85 ms for 47 ms of GPU work on an H100 (docs/benchmarks.md, class (b)'s profile): its ~1,600 launches are issued
# from Python, and the GPU waits for them. MAX_ROW_CONTEXT keeps the long prompts eager.
MAX_GRAPH_TOKENS = 2048
MIXED_STEP = 64  # capture sizes above MAX_CAPTURE_SIZE grow by this many tokens
# Each prompt row of a graph step reads its whole context through the paged kernel (no K/V reuse across
# rows): a step is graphed only while its multi-token rows read at most this many (row, context token)
# pairs in all - a 512-token prompt reads ~131k, a 1k-token turn after a 30k-token prefix ~31M (eager then).
MAX_ROW_CONTEXT = 1 << 21


def capture_sizes(max_num_seqs: int, largest: int = MAX_CAPTURE_SIZE) -> list[int]:
    """vLLM's decode capture sizes: 1, 2, 4, then multiples of 8, up to ``min(max_num_seqs, largest)``."""
    top = max(1, min(max_num_seqs, largest))
    sizes = [s for s in [1, 2, 4, *range(8, top + 8, 8)] if s < top] + [top]
    return sorted(set(sizes))


def token_sizes(largest: int) -> list[int]:
    """Capture sizes of mixed steps: the decode sizes, then every ``MIXED_STEP`` tokens up to ``largest``."""
    small = capture_sizes(min(largest, MAX_CAPTURE_SIZE))
    big = list(range(small[-1] + MIXED_STEP, largest, MIXED_STEP))
    return small + big + ([largest] if largest > small[-1] else [])


class StepRunner(Protocol):
    """What graph steps read of their rank's model runner (:class:`epkit.engine.runner.ModelRunner`, which builds
    them): the runner imports this module, never the other way round."""

    cfg: EngineConfig
    mcfg: ModelConfig
    model: MoEModel
    comm: Communicator
    device: torch.device
    dtype: torch.dtype
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int
    num_blocks: int  # blocks the block manager hands out; the KV cache holds one more (the scratch block)
    max_model_len: int
    max_num_seqs: int  # the scheduler's limits (EngineConfig.batch_limits: the flags, else vLLM's device defaults)
    max_num_batched_tokens: int
    rebalancer: Rebalancer | None


def graph_mode(runner: StepRunner) -> tuple[str, str]:
    """("cuda" | "emulate" | "off", why) for this runner."""
    want = env_value("EPKIT_CUDA_GRAPHS")  # checked at start (EnvVarError names the value and the choices)
    if runner.cfg.enforce_eager or want == "off":
        return "off", "--enforce-eager" if runner.cfg.enforce_eager else "EPKIT_CUDA_GRAPHS=off"
    if not getattr(runner.model.moe, "graph_safe", False):
        return "off", (f"the {runner.model.moe.name} backend reads its split sizes on the host every layer, "
                       "which a CUDA graph cannot hold; every step runs eager")
    if want == "emulate":
        return "emulate", "EPKIT_CUDA_GRAPHS=emulate (padded fixed-buffer steps, not captured)"
    if runner.device.type != "cuda":
        return "off", "no CUDA device"
    probe = torch.zeros((1, 1), device=runner.device, dtype=runner.dtype)
    experts = next(layer["experts"] for layer in runner.model.w.layers if "experts" in layer)
    ok = experts.supports_sentinel(probe) if runner.cfg.ep_size > 1 else experts._use_grouped_mm(probe)
    if not ok:
        return "off", (f"sync-free expert GEMMs (torch._grouped_mm, bf16) are unavailable for dtype "
                       f"{str(runner.dtype).replace('torch.', '')}; every step runs eager")
    return "cuda", "CUDA graphs"


class StepGraphs:
    """The fixed step buffers of one rank and its captured graphs of whole steps (all-decode, or mixed prefill +
    decode where the paged kernel serves), keyed by (rows, context bucket)."""

    def __init__(self, runner: StepRunner, mode: str):
        self.runner, self.mode = runner, mode
        cfg, dev = runner.cfg, runner.device
        self.world, self.rank = runner.comm.world_size, runner.comm.rank
        # The paged kernel reads each row's own context length: one context bucket (the longest) serves all.
        from epkit.engine.attention import torch_decode
        from epkit.engine.kernels import decode_kernel_enabled

        probe = torch.zeros((1, runner.mcfg.num_heads, runner.mcfg.head_dim), device=dev, dtype=runner.dtype)
        paged = decode_kernel_enabled(probe, runner.kv_caches[0][0], runner.block_size, torch_decode)
        want = env_value("EPKIT_GRAPH_STEPS")
        # mixed steps need the paged kernel (the PyTorch path would gather every row's whole context);
        # emulation on CPU runs them with the PyTorch path to test the padding
        mixed = want != "decode" and (paged or mode == "emulate")
        # Every rank must capture the same shapes: the paged kernel (one context bucket), mixed steps and the
        # MoE row kernels (no pair limit) count only if every rank has them - one exchange of the three flags.
        flags = [paged, mixed, self._fused_rows()]
        paged, mixed, fused = (all(col) for col in zip(*runner.comm.exchange_step_info([int(f) for f in flags])))
        self.paged_kernel = self.paged_kernel_checked = paged
        self.mixed = mixed
        largest = MAX_GRAPH_TOKENS if mixed else min(runner.max_num_seqs, MAX_CAPTURE_SIZE)
        largest = min(largest, runner.max_num_batched_tokens)
        gathered = cfg.ep_size > 1 or (self.world > 1 and not cfg.enable_expert_parallel)  # EP, or experts split TP
        if gathered and not fused:
            # without the row kernels every (row, expert) pair of every rank goes through one grouped GEMM (EP's
            # sync-free one, or the TP experts' over all pairs): keep it under that path's limit
            from epkit.engine.all2all import SYNC_FREE_MAX_PAIRS

            largest = min(largest, max(1, SYNC_FREE_MAX_PAIRS // (self.world * runner.mcfg.top_k)))
        self.sizes = token_sizes(largest) if self.mixed else capture_sizes(largest)
        self.max_batch = self.sizes[-1]
        bs = runner.block_size
        self.ctx_step = bs * -(-CTX_BUCKET // bs)
        self.max_ctx = self.ctx_step * -(-runner.max_model_len // self.ctx_step)
        self.width = self.max_ctx // bs
        self.scratch_block = runner.num_blocks  # the KV cache has one block more than the block manager hands out
        B = self.max_batch
        pin = dev.type == "cuda"
        host = dict(ids=(B,), pos=(B,), slot=(B,), ctx=(B,), tables=(B, self.width), valid=(self.world * B,))
        self.host = {k: torch.zeros(shape, dtype=torch.long, pin_memory=pin) for k, shape in host.items()}
        # the host buffers are rewritten next step: wait until the previous step's copies out of them are done
        # (a step that samples waits anyway; a mixed step in which no rank samples does not)
        self.copied = torch.cuda.Event() if pin else None
        self.dev = {k: torch.zeros(shape, dtype=torch.long, device=dev) for k, shape in host.items()}
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if mode == "cuda" else None
        # one warm-up stream for every capture: each new stream would get (and keep) its own cuBLAS workspace
        self.warmup_stream = torch.cuda.Stream(dev) if mode == "cuda" else None
        self.steps = 0  # padded steps run (replays, or emulated steps)
        self.captures = 0
        self.capture_s = 0.0

    def _fused_rows(self) -> bool:
        """Whether the MoE row kernels serve this model (then a step's cost follows this rank's own pairs)."""
        from epkit.engine.moe import fused_rows_ok

        runner = self.runner
        experts = next(layer["experts"] for layer in runner.model.w.layers if "experts" in layer)
        return fused_rows_ok(torch.zeros((1, runner.mcfg.hidden_size), device=runner.device, dtype=runner.dtype), experts)

    # ---- shapes -----------------------------------------------------------------------
    def plan(self, counts: list[int], max_ctx: int) -> tuple[int, int] | None:
        """The (rows, context bucket) every rank uses this step, or None when it runs eager."""
        n = max(counts)
        if n > self.max_batch or max_ctx > self.max_ctx:
            return None
        rows = next(s for s in self.sizes if s >= n)
        if self.paged_kernel:
            return rows, self.max_ctx
        return rows, max(self.ctx_step, self.ctx_step * -(-max_ctx // self.ctx_step))

    # ---- one step ---------------------------------------------------------------------
    def run(self, batch: list[tuple["Sequence", int]], counts: list[int], key: tuple[int, int]) -> torch.Tensor:
        """Final hidden states of ``batch``'s rows (one per new token, in batch order), through the graph for ``key``."""
        size, ctx = key
        tokens = self._fill(batch, counts, size, ctx)  # EPLB rearrangements write in place: the graphs stay valid
        if self.mode == "emulate":
            out = self._forward(size, ctx)
        else:
            entry = self.graphs.get(key) or self._capture(key)
            entry[0].replay()
            out = entry[1]
        self.steps += 1
        return out[:tokens]

    def _fill(self, batch: list[tuple["Sequence", int]], counts: list[int], size: int, ctx: int) -> int:
        """Write the step's rows into the pinned host buffers and copy them to the device; returns the real rows."""
        if self.copied is not None:
            self.copied.synchronize()
        h = {k: v.numpy() for k, v in self.host.items()}
        bs = self.runner.block_size
        h["ids"][:size] = 0
        h["pos"][:size] = 0
        h["slot"][:size] = self.scratch_block * bs  # padding rows write and read the scratch block only
        h["ctx"][:size] = 1
        # a row reads only the first ceil(ctx / block size) entries of its table: entries past its own
        # table may hold an earlier step's blocks, never read; padding rows read entry 0 (the scratch block)
        h["tables"][:size, 0] = self.scratch_block
        used = 1
        row = 0
        for seq, new in batch:
            p = seq.num_computed_tokens
            table = seq.block_table
            end = row + new
            if new == 1:  # the common case, without numpy's per-call overhead
                h["ids"][row] = seq.token_ids[p]
                h["pos"][row] = p
                h["ctx"][row] = p + 1
                h["slot"][row] = table[p // bs] * bs + p % bs
                h["tables"][row, : len(table)] = table
            else:
                pos = np.arange(p, p + new)
                h["ids"][row:end] = seq.token_ids[p : p + new]
                h["pos"][row:end] = pos
                h["ctx"][row:end] = pos + 1
                h["slot"][row:end] = np.asarray(table)[pos // bs] * bs + pos % bs
                h["tables"][row:end, : len(table)] = table
            used = max(used, len(table))
            row = end
        valid = h["valid"][: self.world * size].reshape(self.world, size)
        valid[:] = np.arange(size)[None, :] < np.asarray(counts)[:, None]
        for k in ("ids", "pos", "slot", "ctx"):
            self.dev[k][:size].copy_(self.host[k][:size], non_blocking=True)
        self.dev["tables"][:size, :used].copy_(self.host["tables"][:size, :used], non_blocking=True)
        self.dev["valid"][: self.world * size].copy_(self.host["valid"][: self.world * size], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        return row

    def _forward(self, size: int, ctx: int) -> torch.Tensor:
        """The padded step on the fixed buffers: what a graph captures and replays."""
        runner = self.runner
        model, bs, d = runner.model, runner.block_size, self.dev
        width = ctx // bs
        meta = AttentionMeta(d["slot"][:size], [], decode_tables=d["tables"][:size, :width], decode_ctx=d["ctx"][:size],
                             decode_len=ctx, block_size=bs, every_row_as_decode=True)
        valid = d["valid"][: self.world * size].bool()
        model.moe.static_valid = valid
        model.row_mask = valid.view(self.world, size)[self.rank]
        try:
            return model.forward(d["ids"][:size], d["pos"][:size], meta, runner.kv_caches, [size] * self.world)
        finally:
            model.moe.static_valid = None
            model.row_mask = None

    def capture_all(self) -> None:
        """Capture every size now, largest first (the smaller graphs reuse its pool), as vLLM does at start: no
        step while serving waits for a capture (one took 70-80 ms on an H100, a stall of every running request).
        Only where one context bucket serves every step (the paged kernel); otherwise graphs are captured when a
        (rows, context) shape first occurs. Every rank calls this at the same point (the steps' collectives)."""
        if self.mode != "cuda" or not self.paged_kernel:
            return
        started = time.perf_counter()
        for size in reversed(self.sizes):
            self.fill_padding(size)
            self._capture((size, self.max_ctx), quiet=True)
        log.info("DP rank %d: captured %d CUDA graphs (%d..%d rows, context %d) at start in %.1f s", self.rank,
                 len(self.graphs), self.sizes[0], self.sizes[-1], self.max_ctx, time.perf_counter() - started)

    def fill_padding(self, size: int) -> None:
        """Fixed buffers of a ``size``-row step in which every row is a padding row of every rank (the scratch
        block only; no sequence's KV is read or written), except that row 0 of each rank counts as real so that
        the MoE exchange carries a row: what the start-up captures run once before capturing."""
        bs = self.runner.block_size
        for k, value in (("ids", 0), ("pos", 0), ("slot", self.scratch_block * bs), ("ctx", 1)):
            self.dev[k][:size].fill_(value)
        self.dev["tables"][:size, 0] = self.scratch_block
        valid = self.dev["valid"][: self.world * size].view(self.world, size)
        valid.zero_()
        valid[:, 0] = 1

    def _capture(self, key: tuple[int, int], quiet: bool = False) -> tuple[Any, torch.Tensor]:
        """Warm up once (lazy initialisation; rewrites the same K/V), then capture; every rank does this at the same step."""
        size, ctx = key
        started = time.perf_counter()
        loads = self.runner.rebalancer.load_buffers() if self.runner.rebalancer is not None else []
        saved = [t.clone() for t in loads]
        stream = self.warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(size, ctx)
        torch.cuda.current_stream().wait_stream(stream)
        for t, s in zip(loads, saved):  # the warm-up must not count as expert load
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture forbids unsafe CUDA calls of the capturing thread only - not those of the threads
        # that serve KV to decode instances (UCX synchronises its own streams; global mode made that fatal)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._forward(size, ctx)
        elapsed = time.perf_counter() - started
        self.capture_s += elapsed
        self.captures += 1
        self.graphs[key] = (graph, out)
        if not quiet:
            log.info("DP rank %d: captured the CUDA graph for %d rows, context %d in %.2f s (%d graphs)",
                     self.rank, size, ctx, elapsed, len(self.graphs))
        return self.graphs[key]

    def summary(self, total_steps: int) -> str:
        what = "replayed from CUDA graphs" if self.mode == "cuda" else "ran as emulated graph steps"
        return (f"{self.steps} of {total_steps} forward steps {what}; {self.captures} captures "
                f"({self.capture_s:.1f} s), {len(self.graphs)} graphs held")

    def drop(self, why: str) -> None:
        if self.graphs:
            log.info("DP rank %d: dropping %d CUDA graphs (%s)", self.rank, len(self.graphs), why)
        self.graphs.clear()
        if self.mode == "cuda":  # a fresh pool: re-using the id of a pool whose graphs are gone can trip the allocator
            self.pool = torch.cuda.graph_pool_handle()
