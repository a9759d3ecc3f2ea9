"""The MoE kernels: the fused router (softmax, top-k, renormalisation) and the row kernels (a counting sort of
the (token, expert) pairs, the row gather, SiLU * up, the per-token weighted combine) that touch only the pairs a
rank computes, sized on the device (no host sync). The expert-grouped GEMMs: :mod:`.moe_gemm`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epkit.engine.kernels.moe_gemm import moe_tiles
from epkit.engine.kernels.registry import fused_kernels_off, kernel_serves, mismatch, tl, triton

PAIR_BLOCK = 1024  # (token, expert) pairs per program of the counting sort
SORT_ONE_PROGRAM_PAIRS = 16384  # up to this many pairs (2,048 tokens at top-8) the sort runs as one program

if triton is not None:

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, stride_l, E, K: tl.constexpr, KPAD: tl.constexpr,
                      BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr):
        t = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        emask = e < E
        logit = tl.load(logits_ptr + t * stride_l + e, mask=emask, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            logit = logit + tl.load(bias_ptr + e, mask=emask, other=0.0)
        z = tl.exp(logit - tl.max(logit, 0))
        p = z / tl.sum(z, 0)
        p = tl.where(emask, p, -1.0)
        kk = tl.arange(0, KPAD)
        top_w = tl.zeros([KPAD], tl.float32)
        top_i = tl.zeros([KPAD], tl.int64)
        for j in tl.static_range(K):
            best = tl.max(p, 0)
            idx = tl.min(tl.where(p == best, e, BLOCK_E), 0)  # the lowest expert id among equal weights
            top_w = tl.where(kk == j, best, top_w)
            top_i = tl.where(kk == j, idx.to(tl.int64), top_i)
            p = tl.where(e == idx, -1.0, p)
        if RENORM:
            top_w = top_w / tl.sum(top_w, 0)
        kmask = kk < K
        tl.store(ids_ptr + t * K + kk, top_i, mask=kmask)
        tl.store(w_ptr + t * K + kk, top_w, mask=kmask)

    @triton.jit
    def _gather_rows_kernel(x_ptr, src_ptr, n_ptr, out_ptr, stride_x, H, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # int64 offsets: pairs x hidden can pass 2**31
        if r < tl.load(n_ptr):
            s = tl.load(src_ptr + r)
            for c in range(0, H, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                m = cols < H
                tl.store(out_ptr + r * H + cols, tl.load(x_ptr + s * stride_x + cols, mask=m), mask=m)

    @triton.jit
    def _count_pairs_kernel(e_ptr, counts_ptr, P, NUM_LOCAL, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(e_ptr + i, mask=i < P, other=NUM_LOCAL)
        m = e < NUM_LOCAL  # other ranks' pairs are not counted (no contention on one sentinel counter)
        tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=m, sem="relaxed")

    @triton.jit
    def _place_pairs_kernel(e_ptr, cursor_ptr, pos_ptr, src_ptr, P, K, NUM_LOCAL, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(e_ptr + i, mask=i < P, other=NUM_LOCAL)
        m = e < NUM_LOCAL
        p = tl.atomic_add(cursor_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=m, sem="relaxed")  # its row in its group
        tl.store(pos_ptr + i, p, mask=m)
        tl.store(src_ptr + p.to(tl.int64), (i // K).to(tl.int64), mask=m)

    @triton.jit(do_not_specialize=["P", "BLOCK_M"])  # pair counts and tile rows change every step
    def _sort_pairs_kernel(e_ptr, cursor_ptr, pos_ptr, src_ptr, counts_ptr, offs_ptr, tiles_ptr, P, K, NUM_LOCAL,
                           BLOCK_M, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
        # One program does what _count_pairs_kernel, two cumsums, _place_pairs_kernel and moe_tiles' five small
        # kernels do (a decode step's ~15 launches a layer): count the pairs per expert (the sentinel bin
        # NUM_LOCAL and above takes other ranks' pairs and the padding), prefix-sum the counts and the tiles,
        # then give each local pair its row through atomics on the groups' cursors
        ev = tl.arange(0, E_PAD)
        emask = ev < NUM_LOCAL
        counts = tl.zeros([E_PAD], tl.int32)
        for start in range(0, P, BLOCK):
            i = start + tl.arange(0, BLOCK)
            e = tl.minimum(tl.load(e_ptr + i, mask=i < P, other=NUM_LOCAL), NUM_LOCAL).to(tl.int32)
            counts += tl.histogram(e, E_PAD)
        counts = tl.where(emask, counts, 0)
        offs = tl.cumsum(counts, 0)
        tiles = tl.cumsum((counts + BLOCK_M - 1) // BLOCK_M, 0)
        tl.store(counts_ptr + ev, counts.to(tl.int64), mask=emask)
        tl.store(offs_ptr + ev, offs, mask=emask)
        tl.store(tiles_ptr + ev, tiles, mask=emask)
        tl.store(cursor_ptr + ev, offs - counts, mask=emask)
        tl.debug_barrier()  # the cursors are in memory before any thread's atomics read them
        for start in range(0, P, BLOCK):
            i = start + tl.arange(0, BLOCK)
            e = tl.load(e_ptr + i, mask=i < P, other=NUM_LOCAL)
            m = e < NUM_LOCAL
            p = tl.atomic_add(cursor_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=m, sem="relaxed")
            tl.store(pos_ptr + i, p, mask=m)
            tl.store(src_ptr + p.to(tl.int64), (i // K).to(tl.int64), mask=m)

    @triton.jit
    def _silu_mul_kernel(h_ptr, n_ptr, out_ptr, stride_h, INTER, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        if r < tl.load(n_ptr):
            for c in range(0, INTER, BLOCK):
                cols = c + tl.arange(0, BLOCK)
                m = cols < INTER
                gate = tl.load(h_ptr + r * stride_h + cols, mask=m, other=0.0).to(tl.float32)
                up = tl.load(h_ptr + r * stride_h + INTER + cols, mask=m, other=0.0)
                # rounded to the input dtype like F.silu, then the product (exp/division may differ from
                # PyTorch's by one unit in the last place: the self-check allows that)
                act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
                tl.store(out_ptr + r * INTER + cols, act * up, mask=m)

    @triton.jit
    def _combine_rows_kernel(y_ptr, pos_ptr, e_ptr, w_ptr, out_ptr, stride_y, H, NUM_LOCAL,
                             K: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        # the sums in ACC (the accumulation dtype), written as out's dtype (the model's, where no other rank adds
        # to them: one cast here instead of a kernel after)
        t = tl.program_id(0).to(tl.int64)
        for c in range(0, H, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            m = cols < H
            acc = tl.zeros([BLOCK], dtype=ACC)
            for j in tl.static_range(K):
                i = t * K + j
                width = tl.where(tl.load(e_ptr + i) < NUM_LOCAL, H, 0)  # another rank's pair reads nothing
                p = tl.load(pos_ptr + i).to(tl.int64)
                w = tl.load(w_ptr + i).to(tl.float32)
                prod = tl.load(y_ptr + p * stride_y + cols, mask=cols < width, other=0.0).to(tl.float32) * w
                acc += prod.to(ACC)
            tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=m)

def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax router of :func:`epkit.engine.moe.route` in one launch: (ids ``[T, k]`` int64, float32 weights)."""
    T, E = router_logits.shape
    ids = torch.empty((T, top_k), dtype=torch.long, device=router_logits.device)
    weights = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    if T:
        _route_kernel[(T,)](router_logits, bias if bias is not None else router_logits, ids, weights, router_logits.stride(0), E,
                            K=top_k, KPAD=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(E),
                            HAS_BIAS=bias is not None, RENORM=norm_topk_prob)
    return ids, weights


def gather_rows(x: torch.Tensor, src: torch.Tensor, n: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``out[r] = x[src[r]]`` for ``r < n`` (``n`` a 1-element device tensor); later rows are left unwritten.

    ``out`` has ``rows`` rows (default: as many as ``src``; a caller that knows ``n`` passes it)."""
    P, H = (src.shape[0] if rows is None else rows), x.shape[1]
    out = torch.empty((P, H), dtype=x.dtype, device=x.device)
    if P:
        _gather_rows_kernel[(P,)](x, src, n, out, x.stride(0), H, BLOCK=min(2048, triton.next_power_of_2(H)))
    return out


def group_pairs(expert_idx: torch.Tensor, num_local: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A counting sort of this rank's (token, slot) pairs by expert, without a host sync: (``pos``, ``src``, ``counts``).

    Pair ``i`` is (row ``i // k``, expert ``expert_idx[i]``); experts ``>= num_local`` are other
    ranks' and skipped. ``counts[e]`` is the number of pairs of local expert ``e`` (int64), ``pos[i]``
    the row local pair ``i`` takes in the expert-sorted order (groups in expert order; within a group
    in any order - each row's GEMM result does not depend on its neighbours; undefined for skipped
    pairs), and ``src[pos[i]] = i // k``: the token row each sorted row copies."""
    P = expert_idx.shape[0]
    counts = torch.zeros(num_local, dtype=torch.int32, device=expert_idx.device)
    pos = torch.empty(P, dtype=torch.int32, device=expert_idx.device)
    src = torch.empty(P, dtype=torch.long, device=expert_idx.device)
    if P:
        grid = (triton.cdiv(P, PAIR_BLOCK),)
        _count_pairs_kernel[grid](expert_idx, counts, P, num_local, BLOCK=PAIR_BLOCK)
        cursor = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # each group's first row
        _place_pairs_kernel[grid](expert_idx, cursor, pos, src, P, k, num_local, BLOCK=PAIR_BLOCK)
    return pos, src, counts.long()


def sort_pairs(expert_idx: torch.Tensor, num_local: int, k: int, block_m: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_pairs` and :func:`moe_tiles` at ``block_m``-row tiles together: ``(pos, src, counts, offs,
    tiles)``. Up to ``SORT_ONE_PROGRAM_PAIRS`` pairs (every CUDA-graph step) in one launch of one program, which
    :func:`sort_pairs_enabled` checked; more pairs (a large eager prefill, where a single program would be slow)
    through the multi-program kernels."""
    P = expert_idx.shape[0]
    if P > SORT_ONE_PROGRAM_PAIRS or not P:
        pos, src, counts = group_pairs(expert_idx, num_local, k)
        return (pos, src, counts, *moe_tiles(counts, block_m))
    dev = expert_idx.device
    cursor = torch.empty(num_local, dtype=torch.int32, device=dev)
    pos = torch.empty(P, dtype=torch.int32, device=dev)
    src = torch.empty(P, dtype=torch.long, device=dev)
    counts = torch.empty(num_local, dtype=torch.long, device=dev)
    offs = torch.empty(num_local, dtype=torch.int32, device=dev)
    tiles = torch.empty(num_local, dtype=torch.int32, device=dev)
    _sort_pairs_kernel[(1,)](expert_idx, cursor, pos, src, counts, offs, tiles, P, k, num_local, block_m,
                             E_PAD=triton.next_power_of_2(num_local + 1), BLOCK=min(PAIR_BLOCK, triton.next_power_of_2(P)),
                             num_warps=8)
    return pos, src, counts, offs, tiles


def sort_pairs_enabled(expert_idx: torch.Tensor, num_local: int) -> bool:
    """Whether :func:`sort_pairs`'s one-program kernel serves ``num_local`` experts here (checked once against
    :func:`group_pairs` + :func:`moe_tiles`: the same counts, prefix sums and a grouping of the same pairs)."""
    if fused_kernels_off():
        return False

    def check() -> str | None:
        gen = torch.Generator(device=expert_idx.device).manual_seed(7)
        for pairs, block_m in ((8, 16), (2 * PAIR_BLOCK + 37, 16), (300, 1)):
            e = torch.randint(0, num_local + 1, (pairs,), generator=gen, device=expert_idx.device)  # + other ranks'
            pos, src, counts, offs, tiles = sort_pairs(e, num_local, 2, block_m)
            _, _, want = group_pairs(e, num_local, 2)
            want_offs, want_tiles = moe_tiles(want, block_m)
            if not (torch.equal(counts, want) and torch.equal(offs, want_offs) and torch.equal(tiles, want_tiles)):
                return f"self-check: counts or prefix sums differ ({pairs} pairs)"
            own = (e < num_local).nonzero().flatten()
            rows = pos[own].long()
            n = int(counts.sum())
            if sorted(rows.tolist()) != list(range(n)):
                return f"self-check: the local pairs' rows are not 0..{n - 1} ({pairs} pairs)"
            sorted_e = torch.empty(n, dtype=torch.long, device=e.device)
            sorted_e[rows] = e[own]
            if sorted_e.tolist() != sorted(e[own].tolist()) or not torch.equal(src[rows], own // 2):
                return f"self-check: rows are not grouped by expert or point at other tokens ({pairs} pairs)"
        return None

    key = ("sort_pairs", expert_idx.device, num_local)
    return kernel_serves("MoE pair sort + tile sums (one program)", key, expert_idx, check,
                         fallback="three sort kernels + PyTorch cumsums")


def combine_rows(y: torch.Tensor, pos: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, k: int,
                 num_local: int, num_rows: int, acc_dtype: torch.dtype, out_dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """``out[t] = sum_j acc(float32(y[pos[t*k+j]]) * weights[t*k+j])`` over the slots ``j`` whose expert is local.

    One program per output row adds its own pairs in slot order and writes the row once: no zero-fill,
    no atomics; rows without a local pair are written as zeros. Products are rounded to ``acc_dtype``
    before the sum, as :func:`epkit.engine.moe.weighted_sum` does; the sums are written as ``out_dtype``
    (default ``acc_dtype``), the same values as ``.to(out_dtype)`` after."""
    H = y.shape[1]
    out = torch.empty((num_rows, H), dtype=out_dtype or acc_dtype, device=y.device)
    if num_rows:
        # no fused multiply-add: each product is rounded before the sum, as in weighted_sum
        _combine_rows_kernel[(num_rows,)](y, pos, expert_idx, weights, out, y.stride(0), H, num_local, K=k,
                                          BLOCK=min(2048, triton.next_power_of_2(H)),
                                          ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
                                          enable_fp_fusion=False)
    return out


def silu_mul(h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :I]) * h[:, I:]`` for the first ``n`` rows (``n`` a 1-element device tensor); later rows unwritten."""
    P, inter = h.shape[0], h.shape[1] // 2
    out = torch.empty((P, inter), dtype=h.dtype, device=h.device)
    if P:
        _silu_mul_kernel[(P,)](h, n, out, h.stride(0), inter, BLOCK=min(1024, triton.next_power_of_2(inter)))
    return out


def route_enabled(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, bias: torch.Tensor | None, reference) -> bool:
    """Whether :func:`route` serves these router logits (checked once against ``reference``: ids and weights)."""
    if fused_kernels_off():
        return False
    E = logits.shape[-1]

    def check() -> str | None:
        if E > 4096 or logits.stride(-1) != 1:
            return f"{E} experts (at most 4096, contiguous)"
        gen = torch.Generator(device=logits.device).manual_seed(3)
        ll = (torch.randn((33, E), generator=gen, device=logits.device) * 2).to(logits.dtype)
        bb = bias if bias is None else torch.linspace(0, -3, E, device=logits.device)
        got_i, got_w = route(ll, top_k, norm_topk_prob, bb)
        want_i, want_w = reference(ll, top_k, norm_topk_prob, bb)
        # bf16 logits tie often and top-k may order tied experts either way: compare the chosen experts' probabilities
        probs = torch.softmax(ll.float() + (bb if bb is not None else 0), dim=-1)
        if (probs.gather(1, got_i) - probs.gather(1, want_i)).abs().max().item() > 1e-6:
            return "self-check: different experts chosen"
        return mismatch(got_w, want_w, torch.float32)

    key = ("route", logits.device, logits.dtype, E, top_k, norm_topk_prob, bias is not None)
    return kernel_serves("router softmax + top-k", key, logits, check)


def moe_rows_enabled(x: torch.Tensor, acc_dtype: torch.dtype) -> bool:
    """Whether :func:`gather_rows`, :func:`group_pairs` and :func:`combine_rows` serve rows like ``x`` into
    ``acc_dtype`` sums (checked once)."""
    if fused_kernels_off():
        return False

    def check() -> str | None:
        gen = torch.Generator(device=x.device).manual_seed(4)
        H = x.shape[1]
        xx = torch.randn((9, H), generator=gen, device=x.device).to(x.dtype)
        src = torch.tensor([4, 0, 4, 8, 1, 2], device=x.device)
        n = torch.tensor([4], device=x.device)
        got = gather_rows(xx, src, n)[:4]
        if not torch.equal(got, xx[src[:4]]):
            return "self-check: gathered rows differ"
        w = torch.rand(6, generator=gen, device=x.device)
        # the counting sort and the per-row combine: 3 rows x 2 slots, experts 0..2 local, 3 = another rank's
        e = torch.tensor([2, 0, 3, 2, 0, 1], device=x.device)
        own = e < 3
        pos, src2, counts = group_pairs(e, 3, 2)
        rows = pos[own].long()
        if counts.tolist() != [2, 1, 2] or sorted(rows.tolist()) != list(range(5)):
            return f"self-check: counting sort gave counts {counts.tolist()}, rows {rows.tolist()}"
        order = torch.empty(5, dtype=torch.long, device=x.device)
        order[rows] = own.nonzero().flatten()  # sorted row -> pair
        if e[order].tolist() != sorted(e[own].tolist()) or not torch.equal(src2[:5], order // 2):
            return "self-check: counting sort rows are not grouped by expert"
        y = torch.zeros((6, H), dtype=x.dtype, device=x.device)
        y[rows] = xx[:6][own]  # y[pos[i]] = xx[i] for local pairs; row 5 holds garbage the combine must skip
        y[5] = float("nan")
        out = combine_rows(y, pos, e, w, 2, 3, 3, acc_dtype)
        want = torch.zeros((3, H), dtype=acc_dtype, device=x.device).index_add_(
            0, torch.arange(6, device=x.device) // 2,
            torch.where(own.unsqueeze(1), (xx[:6].float() * w.unsqueeze(1)).to(acc_dtype), 0))
        if not torch.equal(combine_rows(y, pos, e, w, 2, 3, 3, acc_dtype, x.dtype), out.to(x.dtype)):
            return "self-check: the combine written as the model dtype differs from its sums cast after"
        return mismatch(out, want, torch.float32)

    key = ("moe_rows", x.device, x.dtype, acc_dtype, x.shape[1])
    return kernel_serves("MoE row sort / gather / combine", key, x, check)


def silu_mul_enabled(h: torch.Tensor) -> bool:
    """Whether :func:`silu_mul` serves ``[rows, 2 * intermediate]`` tensors like ``h`` (checked once against PyTorch)."""
    if fused_kernels_off():
        return False

    def check() -> str | None:
        gen = torch.Generator(device=h.device).manual_seed(5)
        hh = (3 * torch.randn((5, h.shape[1]), generator=gen, device=h.device)).to(h.dtype)
        got = silu_mul(hh, torch.tensor([3], device=h.device))[:3]
        inter = h.shape[1] // 2
        want = F.silu(hh[:3, :inter]) * hh[:3, inter:]
        return mismatch(got, want, h.dtype, want.float().abs().max().item())

    key = ("silu_mul", h.device, h.dtype, h.shape[1])
    return kernel_serves("SiLU * up (this rank's expert rows)", key, h, check)
