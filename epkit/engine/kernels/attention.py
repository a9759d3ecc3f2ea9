"""Attention over the paged KV cache: the decode kernel, the prefill kernel and the one-launch K/V cache write.

``paged_decode_attention`` computes one query token per sequence against that sequence's
cached K/V, reading the cache in place through its block table (no gathered copy of the
context, no padding to a common length). One program per (sequence, KV head) handles the
query heads of that GQA group together (so each K/V tile is read once), walks the context in
tiles of ``BLOCK_N`` tokens with an online softmax in float32, and writes ``[B, heads, head_dim]``.
The loop bound is each sequence's own context length, read on the device, so one launch serves
any context and a CUDA graph can hold it. A small batch (fewer programs than SMs) cuts each context into up to 16
tile-aligned splits run by programs of their own, merged by a second kernel (flash-decoding). ``prefill_attention`` attends several sequences' new tokens
(whole prompts or chunked-prefill continuations) causally over their paged K/V, a GQA group's heads in one tile.
"""

from __future__ import annotations

import functools
import os

import torch

from epkit.engine.config import env_value
from epkit.engine.kernels.registry import fused_kernels_off, kernel_serves, mismatch, prefill_choice, tl, triton

BLOCK_N = 64  # context tokens per tile
# decode splits (flash-decoding): up to this many parts per context, aiming at this many programs per SM
MAX_DECODE_SPLITS, DECODE_PROGRAMS_PER_SM = 16, 2
CPU_SM_STAND_IN = 16  # what _sm_count says for the interpreter (tests)
PREFILL_ROWS, PREFILL_BLOCK_N = 128, 64  # query rows (tokens x GQA group) and keys per tile of the prefill kernel

if triton is not None:

    @triton.jit(do_not_specialize=["stride_tb"])  # eager steps' block tables change width: no recompiles
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
                             stride_ob, stride_oh, scale,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr):
        # Program (b, kvh, s): split s of sequence b's context for KV head kvh's GQA group. SPLITS == 1: the whole
        # context, the normalised output stored; else a tile-aligned 1/SPLITS of it, its running max, denominator
        # and unnormalised sum stored for _decode_combine_kernel (an empty split stores -inf, 0, 0).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx = tl.load(ctx_ptr + b)
        if SPLITS == 1:
            lo = 0
            hi = ctx
        else:
            chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), TILE) * TILE
            lo = tl.program_id(2) * chunk
            hi = tl.minimum(ctx, lo + chunk)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(lo, hi, TILE):
            pos = start + tl.arange(0, TILE)
            pmask = pos < hi
            block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=pmask, other=0)
            slot = block * BLOCK_SIZE + pos % BLOCK_SIZE
            k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=pmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(pmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=pmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if SPLITS == 1:
            out = acc / den[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        else:
            part = (b * tl.num_programs(1) + kvh) * SPLITS + tl.program_id(2)
            tl.store(part_m_ptr + part * GROUP_PAD + g, m)
            tl.store(part_l_ptr + part * GROUP_PAD + g, den)
            tl.store(part_acc_ptr + (part * GROUP_PAD + g[:, None]) * HEAD_DIM + d[None, :], acc)

    @triton.jit
    def _decode_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_ob, stride_oh,
                               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                               SPLITS: tl.constexpr):
        # Program (b, kvh): the splits' partial softmaxes of one GQA group merged in split order (log-sum-exp).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        base = (b * tl.num_programs(1) + kvh) * SPLITS
        top = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            top = tl.maximum(top, tl.load(part_m_ptr + (base + s) * GROUP_PAD + g))
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.exp(tl.load(part_m_ptr + (base + s) * GROUP_PAD + g) - top)  # an empty split: exp(-inf) = 0
            den += tl.load(part_l_ptr + (base + s) * GROUP_PAD + g) * w
            acc += tl.load(part_acc_ptr + ((base + s) * GROUP_PAD + g[:, None]) * HEAD_DIM + d[None, :]) * w[:, None]
        heads = kvh * GROUP + g
        out = acc / den[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None])

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, slot_ptr, kc_ptr, vc_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_cs, stride_ch, KVH, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM)
        m = (h < KVH)[:, None]
        slot = tl.load(slot_ptr + t).to(tl.int64)
        dst = slot * stride_cs + h[:, None] * stride_ch + d[None, :]
        tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m), mask=m)
        tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m), mask=m)

    @triton.jit(do_not_specialize=["stride_tb"])  # the block-table width changes every step: no recompiles
    def _prefill_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_ptr, first_ptr, start_ptr, new_ptr,
                                  ctx_ptr, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
                                  stride_ot, stride_oh, stride_tb, scale_log2, GROUP: tl.constexpr,
                                  BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                                  BLOCK_N: tl.constexpr):
        # Program (b, kvh): new tokens first[b] .. first[b] + BLOCK_T - 1 of sequence seq[b], all GROUP query heads
        # of KV head kvh as the BLOCK_T * GROUP rows of one tile (each K/V tile is read once for the group). Token t
        # of n new ones, after ctx - n cached, sees keys 0 .. ctx - n + t (causal, bottom-right aligned).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.load(seq_ptr + b)
        m0 = tl.load(first_ptr + b)
        row0 = tl.load(start_ptr + s)
        new = tl.load(new_ptr + s)
        ctx = tl.load(ctx_ptr + s)
        r = tl.arange(0, BLOCK_T * GROUP)
        t = m0 + r // GROUP
        head = kvh * GROUP + r % GROUP
        rmask = t < new
        d = tl.arange(0, HEAD_DIM)
        qrow = (row0 + t).to(tl.int64)
        q = tl.load(q_ptr + qrow[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=rmask[:, None],
                    other=0.0)
        limit = ctx - new + t  # the last key each row sees (padding rows past `new` see every loaded key: no NaN)
        hi = tl.minimum(ctx, ctx - new + m0 + BLOCK_T)  # no row of the block sees a key past this
        m_i = tl.full([BLOCK_T * GROUP], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_T * GROUP], tl.float32)
        acc = tl.zeros([BLOCK_T * GROUP, HEAD_DIM], tl.float32)
        for j0 in range(0, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            jmask = j < hi
            block = tl.load(tables_ptr + s * stride_tb + j // BLOCK_SIZE, mask=jmask, other=0)
            slot = (block * BLOCK_SIZE + j % BLOCK_SIZE).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=jmask[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * scale_log2
            sc = tl.where((j[None, :] <= limit[:, None]) & jmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=jmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + qrow[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot serve these shapes (None when it can)."""
    if triton is None:
        return "Triton is not installed"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {q.device.type} (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} KV heads"
    if dim < 16 or dim & (dim - 1):
        return f"head_dim={dim} is not a power of two >= 16"
    if q.stride(2) != 1 or k_cache.stride(2) != 1:
        return "head_dim is not the innermost dimension"
    return None


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head) for a decode batch: 1 when ``batch * kv_heads`` programs fill the GPU's
    SMs, else the smallest power of two (at most ``MAX_DECODE_SPLITS``) giving about two programs per SM. A function of
    the batch size only, so a CUDA graph captured for a size keeps its split for any context."""
    programs, sms = batch * kv_heads, _sm_count(device)
    splits = 1
    while programs * splits < DECODE_PROGRAMS_PER_SM * sms and splits < MAX_DECODE_SPLITS and programs < sms:
        splits *= 2
    return splits


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_STAND_IN  # Triton's interpreter: splits are exercised as on a GPU of this many SMs
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           ctx_lens: torch.Tensor, block_size: int, splits: int | None = None) -> torch.Tensor:
    """``q`` ``[B, heads, head_dim]``; caches ``[slots, kv_heads, head_dim]``; ``tables`` ``[B, W]`` block ids;
    ``ctx_lens`` ``[B]`` tokens to attend to (>= 1). Returns ``[B, heads, head_dim]`` in ``q``'s dtype.
    ``splits`` (default :func:`decode_splits`): with more than 1, each context is cut into that many tile-aligned
    parts run by programs of their own and merged by a second kernel (flash-decoding), so a few sequences still
    occupy every SM."""
    B, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if B == 0:
        return out
    splits = splits or decode_splits(B, kv_heads, q.device)
    pad = max(16, triton.next_power_of_2(group))
    consts = dict(GROUP=group, GROUP_PAD=pad, HEAD_DIM=dim)
    if splits > 1:
        part_m = torch.empty((B * kv_heads * splits, pad), device=q.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((B * kv_heads * splits, pad, dim), device=q.device, dtype=torch.float32)
    else:
        part_m = part_l = part_acc = out  # not read
    _paged_decode_kernel[(B, kv_heads, splits)](
        q, k_cache, v_cache, tables, ctx_lens, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        tables.stride(0), out.stride(0), out.stride(1), dim ** -0.5,
        BLOCK_SIZE=block_size, TILE=BLOCK_N, SPLITS=splits, **consts,
    )
    if splits > 1:
        _decode_combine_kernel[(B, kv_heads)](part_m, part_l, part_acc, out, out.stride(0), out.stride(1),
                                              SPLITS=splits, **consts)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """``k_cache[slots] = k`` and ``v_cache[slots] = v`` in one launch (``k``/``v`` ``[T, kv_heads, head_dim]``, any
    token and head strides with head_dim contiguous, e.g. slices of the fused QKV output; the two caches alike)."""
    assert k_cache.stride() == v_cache.stride(), "write_kv: the K and V caches must have the same layout"
    T, kvh, dim = k.shape
    if T:
        _write_kv_kernel[(T,)](k, v, slots, k_cache, v_cache, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               k_cache.stride(0), k_cache.stride(1), kvh, HEADS_PAD=triton.next_power_of_2(kvh),
                               HEAD_DIM=dim)


def prefill_block_tokens(heads: int, kv_heads: int) -> int:
    """New tokens per program of :func:`prefill_attention` (its tile holds them times the GQA group's heads)."""
    return max(1, PREFILL_ROWS // (heads // kv_heads))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      tables: torch.Tensor, starts: torch.Tensor, news: torch.Tensor, ctxs: torch.Tensor,
                      programs: tuple[torch.Tensor, torch.Tensor], block_size: int, block_n: int = 0,
                      num_warps: int = 0, num_stages: int = 0) -> None:
    """Causal attention of several sequences' new tokens over their paged K/V (already in the cache), into ``out``.

    Sequence ``s`` has ``news[s]`` new tokens at rows ``starts[s]..`` of ``q`` / ``out`` (``[T, heads, head_dim]``)
    after ``ctxs[s] - news[s]`` cached ones, its blocks in row ``s`` of ``tables``. ``programs`` = (sequence,
    first new token) of every query block of :func:`prefill_block_tokens` tokens. Rows of ``out`` that belong to
    no sequence are left as they are. ``block_n`` / ``num_warps`` / ``num_stages``: tile overrides for
    ``benchmarks/prefill_attention_bench.py`` (0 = the engine's choice)."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    seq, first = programs
    if seq.shape[0] == 0:
        return
    group = heads // kv_heads
    _prefill_attention_kernel[(seq.shape[0], kv_heads)](
        q, k_cache, v_cache, out, tables, seq, first, starts, news, ctxs, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        dim ** -0.5 * 1.4426950408889634, GROUP=group, BLOCK_T=prefill_block_tokens(heads, kv_heads), HEAD_DIM=dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n or PREFILL_BLOCK_N, num_warps=num_warps or (8 if group * dim >= 512 else 4),
        num_stages=num_stages or 2)


def prefill_programs(news: list[int], block_tokens: int, device: torch.device,
                     skip: range = range(0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first new token) of every ``block_tokens``-token query block of the sequences (with ``news`` new
    tokens each) outside ``skip``. Built from Python lists: a CPU ``repeat_interleave`` costs milliseconds per call
    in a busy GPU server process, once per step but on the step's critical path."""
    seqs = [s for s in range(len(news)) if s not in skip]
    seq = [s for s in seqs for _ in range(-(-news[s] // block_tokens))]
    first = [i * block_tokens for s in seqs for i in range(-(-news[s] // block_tokens))]
    both = torch.tensor([seq, first], dtype=torch.long).to(device)
    return both[0], both[1]


def decode_kernel_enabled(q: torch.Tensor, k_cache: torch.Tensor, block_size: int, reference) -> bool:
    """Whether :func:`paged_decode_attention` serves this (device, dtype, shape); checked once against ``reference``.

    ``reference(q, k_cache, v_cache, tables, ctx_lens, block_size)`` is the PyTorch computation."""
    if env_value("EPKIT_DECODE_ATTENTION") == "torch":
        return False
    key = ("decode", q.device, q.dtype, q.shape[1], q.shape[2], k_cache.shape[1], block_size)
    return kernel_serves("decode attention", key, q,
                         lambda: unsupported_reason(q, k_cache) or _decode_self_check(q, k_cache, block_size, reference),
                         used="Triton paged kernel", fallback="PyTorch gather + matmul")


def _decode_self_check(q: torch.Tensor, k_cache: torch.Tensor, block_size: int, reference) -> str | None:
    gen = torch.Generator(device=q.device).manual_seed(0)
    heads, dim, kv_heads = q.shape[1], q.shape[2], k_cache.shape[1]
    blocks, B, W = 40, 3, 12
    shape = (blocks * block_size, kv_heads, dim)
    kc = torch.randn(shape, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    vc = torch.randn(shape, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    qq = torch.randn((B, heads, dim), generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    tables = torch.randperm(blocks, generator=torch.Generator().manual_seed(1))[: B * W].view(B, W).to(q.device)
    ctx = torch.tensor([3 * block_size - 5, 1, W * block_size], device=q.device)
    want = reference(qq, kc, vc, tables, ctx, block_size).float()
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    for splits in (1, 4):  # one program per context, and contexts cut in parts (some of them empty) merged
        err = (paged_decode_attention(qq, kc, vc, tables, ctx, block_size, splits).float() - want).abs().max().item()
        if err > tol:
            return f"self-check ({splits} split{'s' if splits > 1 else ''}) max error {err:.3g} > {tol}"
    return None


def write_kv_enabled(k: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`write_kv` writes K/V like ``k`` into caches like ``k_cache`` (checked once against indexing;
    ``EPKIT_FUSED_KERNELS=torch``, which turns off the engine's small fused kernels, turns it off too)."""
    if fused_kernels_off():
        return False
    kvh, dim = k.shape[1], k.shape[2]

    def check() -> str | None:
        if dim & (dim - 1) or k.stride(2) != 1 or k_cache.stride(2) != 1:
            return f"head_dim={dim} is not a contiguous power of two"
        gen = torch.Generator(device=k.device).manual_seed(7)
        kv = torch.randn((5, 3 * kvh, dim), generator=gen, device=k.device).to(k.dtype)
        kk, vv = kv[:, :kvh], kv[:, 2 * kvh :]  # strided slices, like K and V of the fused QKV output
        slots = torch.tensor([9, 2, 30, 0, 17], device=k.device)
        caches = [torch.zeros((32, kvh, dim), dtype=k.dtype, device=k.device) for _ in range(4)]
        write_kv(kk, vv, slots, caches[0], caches[1])
        caches[2][slots], caches[3][slots] = kk, vv
        same = torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        return None if same else "self-check: cache contents differ from indexed writes"

    return kernel_serves("K/V cache write", ("write_kv", k.device, k.dtype, kvh, dim), k, check)


def prefill_kernel_enabled(q: torch.Tensor, k_cache: torch.Tensor, block_size: int, reference) -> bool:
    """Whether :func:`prefill_attention` serves this (device, dtype, shape); checked once against ``reference``.

    ``reference(q, k_cache, v_cache, out, seqs)`` attends ``seqs`` = (first row, new tokens, context slots) into
    ``out`` with PyTorch. ``EPKIT_PREFILL_ATTENTION=torch`` keeps the PyTorch (SDPA) path."""
    if prefill_choice() == "torch":
        return False
    heads, dim, kv_heads = q.shape[1], q.shape[2], k_cache.shape[1]

    def check() -> str | None:
        why = unsupported_reason(q, k_cache)
        group = heads // kv_heads
        if why is None and (group & (group - 1) or group > PREFILL_ROWS):
            why = f"GQA group of {group} heads is not a power of two <= {PREFILL_ROWS}"
        if why is not None:
            return why
        gen = torch.Generator(device=q.device).manual_seed(8)
        # (cached, new): a whole prompt longer than one query block and one key tile, a chunked-prefill
        # continuation, a short prompt; block tables out of order
        spec = [(0, 2 * prefill_block_tokens(heads, kv_heads) + 3), (3 * block_size + 5, 7), (0, 2)]
        blocks = sum(-(-(cached + new) // block_size) for cached, new in spec)
        shape = (blocks * block_size, kv_heads, dim)
        kc, vc = (torch.randn(shape, generator=gen, device=q.device).to(q.dtype) for _ in range(2))
        tables, seqs, row, used = [], [], 0, torch.randperm(blocks, generator=torch.Generator().manual_seed(8))
        for cached, new in spec:
            n_blocks = -(-(cached + new) // block_size)
            table, used = used[:n_blocks], used[n_blocks:]
            tables.append(table.tolist())
            slots = (table.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()[: cached + new]
            seqs.append((row, new, slots.to(q.device)))
            row += new
        qq = torch.randn((row + 1, heads, dim), generator=gen, device=q.device).to(q.dtype)
        width = max(len(t) for t in tables)
        tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=q.device)
        news = [new for _, new in spec]
        starts = torch.tensor([r for r, _, _ in seqs], device=q.device)
        got, want = torch.zeros_like(qq), torch.zeros_like(qq)
        programs = prefill_programs(news, prefill_block_tokens(heads, kv_heads), q.device)
        prefill_attention(qq, kc, vc, got, tab, starts, torch.tensor(news, device=q.device),
                          torch.tensor([c + n for c, n in spec], device=q.device), programs, block_size)
        reference(qq, kc, vc, want, seqs)
        return mismatch(got, want, q.dtype, 1.5)

    key = ("prefill", q.device, q.dtype, heads, dim, kv_heads, block_size)
    return kernel_serves("prefill attention", key, q, check, used="Triton paged kernel", fallback="PyTorch SDPA")
