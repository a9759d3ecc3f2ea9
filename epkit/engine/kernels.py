"""Triton kernels of the GPU path: paged decode attention.

``paged_decode_attention`` computes one query token per sequence against that sequence's
cached K/V, reading the cache in place through its block table (no gathered copy of the
context, no padding to a common length). One program per (sequence, KV head) handles the
query heads of that GQA group together (so each K/V tile is read once), walks the context in
tiles of ``BLOCK_N`` tokens with an online softmax in float32, and writes ``[B, heads, head_dim]``.
The loop bound is each sequence's own context length, read on the device, so one launch serves
any context and a CUDA graph can hold it.

It is used only where it was checked: on first use :func:`decode_kernel_enabled` runs it on a
small random case against the plain PyTorch computation and logs the outcome; a missing Triton,
an unsupported shape or dtype, or a mismatch leaves attention on the PyTorch path (and says so).
``EPKIT_DECODE_ATTENTION=torch`` forces the PyTorch path (for A/B runs). On CPU the kernel runs
only under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how the tests check it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("epkit.engine")

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

BLOCK_N = 64  # context tokens per tile

if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, out_ptr,
                             stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
                             stride_ob, stride_oh, scale,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        ctx = tl.load(ctx_ptr + b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + g
        gmask = g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, ctx, TILE):
            pos = start + tl.arange(0, TILE)
            pmask = pos < ctx
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
        out = acc / den[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])


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


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           ctx_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """``q`` ``[B, heads, head_dim]``; caches ``[slots, kv_heads, head_dim]``; ``tables`` ``[B, W]`` block ids;
    ``ctx_lens`` ``[B]`` tokens to attend to (>= 1). Returns ``[B, heads, head_dim]`` in ``q``'s dtype."""
    B, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    if B == 0:
        return out
    _paged_decode_kernel[(B, kv_heads)](
        q, k_cache, v_cache, tables, ctx_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        tables.stride(0), out.stride(0), out.stride(1), dim ** -0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_SIZE=block_size, TILE=BLOCK_N,
    )
    return out


_checked: dict[tuple, bool] = {}


def decode_kernel_enabled(q: torch.Tensor, k_cache: torch.Tensor, block_size: int, reference) -> bool:
    """Whether :func:`paged_decode_attention` serves this (device, dtype, shape); checked once against ``reference``.

    ``reference(q, k_cache, v_cache, tables, ctx_lens, block_size)`` is the PyTorch computation."""
    if os.environ.get("EPKIT_DECODE_ATTENTION", "auto") == "torch":
        return False
    key = (q.device, q.dtype, q.shape[1], q.shape[2], k_cache.shape[1], block_size)
    if key in _checked:
        return _checked[key]
    why = unsupported_reason(q, k_cache)
    if why is None:
        try:
            why = _self_check(q, k_cache, block_size, reference)
        except Exception as exc:  # a compile or launch failure: stay on the PyTorch path, say why
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    _checked[key] = why is None
    log.info("decode attention: %s", "Triton paged kernel (checked against PyTorch)" if why is None
             else f"PyTorch gather + matmul ({why})")
    return why is None


def _self_check(q: torch.Tensor, k_cache: torch.Tensor, block_size: int, reference) -> str | None:
    gen = torch.Generator(device=q.device).manual_seed(0)
    heads, dim, kv_heads = q.shape[1], q.shape[2], k_cache.shape[1]
    blocks, B = 12, 3
    shape = (blocks * block_size, kv_heads, dim)
    kc = torch.randn(shape, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    vc = torch.randn(shape, generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    qq = torch.randn((B, heads, dim), generator=gen, device=q.device, dtype=torch.float32).to(q.dtype)
    tables = torch.tensor([[7, 2, 9, 0], [1, 0, 0, 0], [11, 4, 3, 5]], device=q.device)
    ctx = torch.tensor([3 * block_size - 5, 1, 4 * block_size], device=q.device)
    got = paged_decode_attention(qq, kc, vc, tables, ctx, block_size).float()
    want = reference(qq, kc, vc, tables, ctx, block_size).float()
    err = (got - want).abs().max().item()
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    return None if err <= tol else f"self-check max error {err:.3g} > {tol}"
