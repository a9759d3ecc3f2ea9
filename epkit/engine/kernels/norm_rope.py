"""Fused RMSNorm and fused (q/k-norm +) RoPE: one launch each for chains of ~8 and ~16 small PyTorch kernels
(float cast, square, mean, rsqrt, products, casts; RoPE's halves, products and concatenation).

They round where the PyTorch code rounds (normalised value to the model dtype before the weight, the weighted
value to the model dtype before RoPE), so results match it to float32 rounding. A decode step launches
several thousand kernels; these are the most numerous.
"""

from __future__ import annotations

import torch

from epkit.engine.kernels.registry import fused_kernels_off, kernel_serves, mismatch, tl, triton

NORM_ROPE_ROWS = 16  # (token, head) rows per program of the q/k-norm + RoPE kernel

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, eps, D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        y = (xf * rstd).to(x.dtype) * w
        tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, stride_x, stride_r, eps, D: tl.constexpr,
                             BLOCK: tl.constexpr):
        # the residual add as PyTorch's (float32 sum, rounded to the dtype) written back, then _rms_norm_kernel's
        # arithmetic on the rounded sum
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < D
        x = tl.load(x_ptr + row * stride_x + cols, mask=cmask, other=0.0)
        r = tl.load(r_ptr + row * stride_r + cols, mask=cmask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * D + cols, s, mask=cmask)
        sf = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
        y = (sf * rstd).to(x.dtype) * w
        tl.store(out_ptr + row * D + cols, y.to(out_ptr.dtype.element_ty), mask=cmask)

    @triton.jit(do_not_specialize=["R"])  # rows change every step
    def _norm_rope_kernel(x_ptr, w_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, R, H, stride_t, stride_h, eps,
                          HALF: tl.constexpr, NORM: tl.constexpr, ROWS: tl.constexpr):
        # ROWS (token, head) rows per program: one row per program left a 9k-token prefill with ~300k tiny programs
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = row < R
        t = (row // H).to(tl.int64)
        h = row % H
        i = tl.arange(0, HALF)
        base = x_ptr + t[:, None] * stride_t + h[:, None] * stride_h + i[None, :]
        x1 = tl.load(base, mask=rmask[:, None], other=0.0)
        x2 = tl.load(base + HALF, mask=rmask[:, None], other=0.0)
        if NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)
            x1 = (f1 * rstd[:, None]).to(x1.dtype) * tl.load(w_ptr + i)[None, :]
            x2 = (f2 * rstd[:, None]).to(x2.dtype) * tl.load(w_ptr + HALF + i)[None, :]
            x1 = x1.to(out_ptr.dtype.element_ty)
            x2 = x2.to(out_ptr.dtype.element_ty)
        p = tl.load(pos_ptr + t, mask=rmask, other=0)
        c = tl.load(cos_ptr + p[:, None] * HALF + i[None, :], mask=rmask[:, None], other=0.0)
        s = tl.load(sin_ptr + p[:, None] * HALF + i[None, :], mask=rmask[:, None], other=0.0)
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        out = out_ptr + row[:, None].to(tl.int64) * (2 * HALF) + i[None, :]
        tl.store(out, (a * c - b * s).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(out + HALF, (b * c + a * s).to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` (``[..., D]``, last dim contiguous, rows evenly strided) in one launch."""
    D = x.shape[-1]
    rows = x.reshape(-1, D) if x.dim() != 2 else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), eps, D=D, BLOCK=triton.next_power_of_2(D))
    return out


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s))`` with ``s = x + r`` (the residual stream after a block) in one launch: ``x`` and ``r`` are
    ``[T, D]`` with contiguous rows; ``s`` is what ``x + r`` gives in PyTorch, bit for bit."""
    T, D = x.shape
    s = torch.empty((T, D), dtype=x.dtype, device=x.device)
    out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    if T:
        _add_rms_norm_kernel[(T,)](x, r, weight, s, out, x.stride(0), r.stride(0), eps, D=D, BLOCK=triton.next_power_of_2(D))
    return s, out


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, positions: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm (when ``weight`` is given) then rotate-half RoPE at ``positions``, in one launch.

    ``x`` is ``[T, heads, head_dim]`` (head_dim contiguous; any token and head strides, e.g. a slice
    of the fused QKV output); ``cos``/``sin`` are the ``[max_len, head_dim / 2]`` float32 tables."""
    T, H, D = x.shape
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _norm_rope_kernel[(triton.cdiv(T * H, NORM_ROPE_ROWS),)](
            x, weight if weight is not None else x, positions, cos, sin, out, T * H, H, x.stride(0), x.stride(1), eps,
            HALF=D // 2, NORM=weight is not None, ROWS=NORM_ROPE_ROWS)
    return out


def rms_norm_enabled(x: torch.Tensor, reference) -> bool:
    """Whether :func:`rms_norm` serves ``x``'s device, dtype and row length (checked once against ``reference(x, w, eps)``)."""
    if fused_kernels_off():
        return False
    D = x.shape[-1]

    def check() -> str | None:
        if D > 16384:
            return f"row length {D} > 16384"
        gen = torch.Generator(device=x.device).manual_seed(1)
        xx = (torch.randn((5, 3, D), generator=gen, device=x.device) * 3).to(x.dtype)[:, 1]  # strided rows
        w = (torch.rand(D, generator=gen, device=x.device) + 0.5).to(x.dtype)
        return mismatch(rms_norm(xx, w, 1e-6), reference(xx, w, 1e-6), x.dtype, 4.0)

    return kernel_serves("RMSNorm", ("rms_norm", x.device, x.dtype, D), x, check)


def add_rms_norm_enabled(x: torch.Tensor, r: torch.Tensor, reference) -> bool:
    """Whether :func:`add_rms_norm` serves ``x + r`` rows like these (checked once: the sum bit for bit against
    PyTorch's add, the norm against ``reference(s, w, eps)``)."""
    if fused_kernels_off() or x.dim() != 2 or x.shape != r.shape or x.dtype != r.dtype or x.stride(-1) != 1 or \
            r.stride(-1) != 1:
        return False  # the kernel's form: [T, D] rows with a contiguous last dimension, one dtype
    D = x.shape[-1]

    def check() -> str | None:
        if D > 16384:
            return f"row length {D} > 16384"
        gen = torch.Generator(device=x.device).manual_seed(8)
        xx = (torch.randn((5, D), generator=gen, device=x.device) * 3).to(x.dtype)
        rr = (torch.randn((5, 2 * D), generator=gen, device=x.device) * 3).to(x.dtype)[:, D:]  # strided rows
        w = (torch.rand(D, generator=gen, device=x.device) + 0.5).to(x.dtype)
        s, got = add_rms_norm(xx, rr, w, 1e-6)
        if not torch.equal(s, xx + rr):
            return "self-check: the residual sum differs from PyTorch's add"
        return mismatch(got, reference(s, w, 1e-6), x.dtype, 4.0)

    return kernel_serves("residual add + RMSNorm", ("add_rms_norm", x.device, x.dtype, D), x, check)


def norm_rope_enabled(x: torch.Tensor, head_dim: int, with_norm: bool, reference) -> bool:
    """Whether :func:`norm_rope` serves heads of ``head_dim`` on ``x``'s device and dtype (q/k slices of the fused
    QKV output: head_dim contiguous); ``reference(x, w, eps, pos, cos, sin)`` is PyTorch's."""
    if fused_kernels_off():
        return False
    D = head_dim

    def check() -> str | None:
        if D < 2 or (D // 2) & (D // 2 - 1) or D % 2:
            return f"head_dim={D} is not twice a power of two"
        gen = torch.Generator(device=x.device).manual_seed(2)
        qkv = torch.randn((4, 7 * D), generator=gen, device=x.device).to(x.dtype)
        xx = qkv[:, D : 4 * D].reshape(4, 3, D)  # a strided slice, like q or k of the fused QKV output
        w = (torch.rand(D, generator=gen, device=x.device) + 0.5).to(x.dtype) if with_norm else None
        ang = torch.rand((64, D // 2), generator=gen, device=x.device) * 6
        cos, sin = ang.cos(), ang.sin()
        pos = torch.tensor([0, 5, 63, 17], device=x.device)
        return mismatch(norm_rope(xx, w, 1e-6, pos, cos, sin), reference(xx, w, 1e-6, pos, cos, sin), x.dtype, 4.0)

    key = ("norm_rope", x.device, x.dtype, D, with_norm)
    return kernel_serves("q/k-norm + RoPE" if with_norm else "RoPE", key, x, check)
