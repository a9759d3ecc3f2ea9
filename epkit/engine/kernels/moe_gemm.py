"""The expert-grouped GEMMs of the MoE layer: Triton tiles over expert-sorted rows (the row gather in the first GEMM's
loads, SiLU * up in its epilogue), chosen per band of group size where they beat ``torch._grouped_mm``."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from epkit.engine.kernels.registry import fused_kernels_off, kernel_choice, kernel_serves, mismatch, tl, triton
from epkit.engine.kernels.timing import graph_ms

log = logging.getLogger("epkit.engine")


class MoeTile(NamedTuple):
    """A tile of :func:`moe_gemm` and the band of group sizes it is meant for."""

    block_m: int  # rows per tile (a tile never spans two experts)
    block_n: int  # output columns per tile (the gated GEMM: this many gate and as many up columns)
    block_k: int
    num_warps: int
    num_stages: int
    most: float  # up to this many rows per expert on average (inf: any number)
    timed: int  # rows per expert of the first-use timing against torch._grouped_mm (moe_gemm_enabled)


# Bands of rows per expert, each used only where its tile beat torch._grouped_mm at first use (timed at ``timed``
# rows per expert, as CUDA graph replays). Decode-sized groups only: with 16-row tiles each expert's weights are read
# about once. Larger tiles for mixed and prefill steps (the Triton path also saves the gathered copy of the rows,
# the gate/up buffer and the SiLU pass) lost on an H100 (benchmarks/moe_gemm_bench.py, docs/benchmarks.md): a
# 64-row tile 0.554 against 0.516 ms at 64 rows per expert, the best 128-row tile 1.61 against 1.38 ms at 512; a
# 128-row tile won only about 128 rows per expert (1.08x), too narrow a band to add.
MOE_TILES = (MoeTile(16, 64, 128, 4, 4, most=16, timed=8),)
MOE_BLOCK_N, MOE_BLOCK_K = 64, 128

if triton is not None:

    @triton.jit
    def _moe_gemm_kernel(a_ptr, src_ptr, w_ptr, out_ptr, offs_ptr, tiles_ptr, stride_a, stride_we, stride_wk,
                         stride_out, N, K, E: tl.constexpr, E_PAD: tl.constexpr, GATHER: tl.constexpr,
                         GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (t, nb): tile t of the expert-sorted rows (tiles never straddle two experts) times
        # columns nb * BLOCK_N.. of that expert's weight. offs / tiles: inclusive prefix sums per expert
        # of rows and of BLOCK_M-row tiles, on the device, so the grid is an upper bound and extra
        # programs return at once.
        t = tl.program_id(0)
        nb = tl.program_id(1)
        if t >= tl.load(tiles_ptr + E - 1):  # past the last tile (the grid counts other ranks' pairs and padding)
            return
        ev = tl.arange(0, E_PAD)
        tile_cum = tl.load(tiles_ptr + ev, mask=ev < E, other=2**30)
        e = tl.minimum(tl.sum((tile_cum <= t).to(tl.int32), axis=0), E - 1)
        tiles_before = tl.load(tiles_ptr + e - 1, mask=e > 0, other=0)
        rows_before = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        r = rows_before + (t - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = r < tl.load(offs_ptr + e)
        if GATHER:  # row r of the sorted order copies token row src[r]: no gathered copy in memory
            arow = tl.load(src_ptr + r, mask=rmask, other=0).to(tl.int64)
        else:
            arow = r.to(tl.int64)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + arow[:, None] * stride_a + kk[None, :]
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + kk[:, None] * stride_wk + n[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused (and compiled away) unless GATED
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            acc = tl.dot(a, tl.load(w_ptrs, mask=wmask, other=0.0), acc)
            if GATED:  # the up projection: the same rows times columns N + n
                acc_up = tl.dot(a, tl.load(w_ptrs + N, mask=wmask, other=0.0), acc_up)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        dtype = out_ptr.dtype.element_ty
        if GATED:  # silu(gate) * up, rounded where the PyTorch path rounds (GEMM output, silu, product)
            gate = acc.to(dtype).to(tl.float32)
            res = (gate / (1.0 + tl.exp(-gate))).to(dtype) * acc_up.to(dtype)
        else:
            res = acc.to(dtype)
        tl.store(out_ptr + r[:, None].to(tl.int64) * stride_out + n[None, :], res,
                 mask=rmask[:, None] & nmask[None, :])


def moe_tile(rows_per_expert: float) -> MoeTile | None:
    """The tile of :func:`moe_gemm` for about ``rows_per_expert`` rows of each expert (None: no rows, or more than
    any band holds: ``torch._grouped_mm`` serves them)."""
    if rows_per_expert <= 0:
        return None
    return next((tile for tile in MOE_TILES if rows_per_expert <= tile.most), None)


def moe_tiles(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums per expert of the rows (``counts``) and of their ``block_m``-row tiles (int32, on the device)."""
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tiles = torch.cumsum(torch.div(counts + (block_m - 1), block_m, rounding_mode="floor"), 0, dtype=torch.int32)
    return offs, tiles


def moe_gemm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, tiles: torch.Tensor, block_m: int, rows: int,
             src: torch.Tensor | None = None, gated: bool = False, block_n: int = MOE_BLOCK_N,
             block_k: int = MOE_BLOCK_K, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """Expert-grouped GEMM over expert-sorted rows, sized on the device (no host sync): ``[rows, N]``.

    Row ``r`` of expert ``e`` (rows ``offs[e-1] <= r < offs[e]``) is ``a[src[r]] @ w[e]`` (``a[r]`` without
    ``src``). ``gated``: ``w`` is ``[E, K, 2N]`` (gate then up) and the row is ``silu(gate) * up``. Rows past
    ``offs[-1]`` are left unwritten. ``rows`` bounds the sorted rows (the grid is sized by it). ``block_n``,
    ``block_k``, ``num_warps``, ``num_stages``: the tile (benchmarks/moe_gemm_bench.py compares them)."""
    E, K = w.shape[0], w.shape[1]
    N = w.shape[2] // 2 if gated else w.shape[2]
    assert a.stride(1) == 1 and w.stride(2) == 1, "moe_gemm reads rows and weight rows with unit stride"
    out = torch.empty((rows, N), dtype=a.dtype, device=a.device)
    if rows:
        grid = (triton.cdiv(rows, block_m) + E, triton.cdiv(N, block_n))
        _moe_gemm_kernel[grid](a, a if src is None else src, w, out, offs, tiles, a.stride(0), w.stride(0),
                               w.stride(1), out.stride(0), N, K, E=E, E_PAD=triton.next_power_of_2(E),
                               GATHER=src is not None, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n,
                               BLOCK_K=block_k, num_warps=num_warps,
                               num_stages=num_stages or (4 if block_m <= 32 else 3))
    return out


def moe_gemms(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, tiles: torch.Tensor,
              tile: MoeTile, rows: int, src: torch.Tensor) -> torch.Tensor:
    """Both expert GEMMs of the sorted rows ``x[src[r]]`` at ``tile``: ``silu(gate) * up``, then the down
    projection (``offs`` / ``tiles``: :func:`moe_tiles` at ``tile.block_m``): ``[rows, hidden]``."""
    kw = dict(block_n=tile.block_n, block_k=tile.block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
    act = moe_gemm(x, w13, offs, tiles, tile.block_m, rows, src=src, gated=True, **kw)
    return moe_gemm(act, w2, offs, tiles, tile.block_m, rows, **kw)


def moe_gemm_enabled(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tile: MoeTile, reference) -> bool:
    """Whether :func:`moe_gemms` serves these experts' GEMMs in ``tile``'s band (decided once per shape family).

    ``reference(x, src, counts)`` is the PyTorch path (gather, grouped GEMM, SiLU * up, grouped GEMM). On first
    use outside a CUDA graph capture both run on the layer's own weights: the kernel must match, and on CUDA it
    must also be the faster of the two at ``tile.timed`` rows per expert (both timings are logged).
    ``EPKIT_MOE_GEMM=triton`` skips the timing, ``=torch`` keeps PyTorch's grouped GEMM."""
    mode = kernel_choice("EPKIT_MOE_GEMM")
    if mode == "torch" or fused_kernels_off():
        return False
    key = ("moe_gemm", x.device, x.dtype, tuple(w13.shape), tuple(w2.shape), tile, mode)
    block_m = tile.block_m

    def check() -> str | None:
        E = w13.shape[0]
        counts = torch.tensor([(0, 1, block_m, block_m + 3, 2 * block_m + 5)[e % 5] for e in range(E)],
                              device=x.device)
        total = int(counts.sum())
        gen = torch.Generator(device=x.device).manual_seed(6)
        xx = torch.randn((total // 2 + 1, x.shape[1]), generator=gen, device=x.device).to(x.dtype)
        src = torch.randint(0, xx.shape[0], (total,), generator=gen, device=x.device)

        def ours(xx: torch.Tensor, src: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            offs, tiles = moe_tiles(counts, block_m)
            return moe_gemms(xx, w13, w2, offs, tiles, tile, src.shape[0], src)

        want = reference(xx, src, counts)
        why = mismatch(ours(xx, src, counts), want, x.dtype, want.float().abs().max().item())
        if why is not None or x.device.type != "cuda" or mode == "triton":
            return why
        # the timing: random routing, ``tile.timed`` rows per expert on average, as CUDA graph replays (steps up
        # to 2,048 tokens run as graphs; eager timing would mostly measure launch costs)
        pairs = E * tile.timed
        counts = torch.bincount(torch.randint(0, E, (pairs,), generator=gen, device=x.device), minlength=E)
        xx = torch.randn((pairs // 8 + 1, x.shape[1]), generator=gen, device=x.device).to(x.dtype)
        src = torch.randint(0, xx.shape[0], (pairs,), generator=gen, device=x.device)
        t_ours, t_torch = graph_ms(lambda: ours(xx, src, counts)), graph_ms(lambda: reference(xx, src, counts))
        log.info("MoE GEMMs, %d experts x %.0f rows on average: Triton %s %.3f ms, torch._grouped_mm path %.3f ms "
                 "(CUDA graph replays)", E, pairs / E, tile[:5], t_ours, t_torch)
        return None if t_ours < t_torch else f"slower: {t_ours:.3f} ms against {t_torch:.3f} ms"

    return kernel_serves(f"MoE expert GEMMs ({block_m}-row tiles, up to {tile.most:g} rows per expert)", key, x,
                         check, fallback="torch._grouped_mm")
