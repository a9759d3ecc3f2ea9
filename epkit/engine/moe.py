"""Expert placement and the grouped expert computation of one rank.

Weights of routed expert ``e`` in layer ``l`` are a function of (seed, l, e) alone (see
``model.init_tensor``), so moving an expert between ranks never changes its output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epkit.engine import batch_invariant

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests run the kernels with it


# Above this many bytes of expert buffers sized by every gathered (token, expert) pair, an eager step reads
# this rank's pair count on the host once per layer and sizes them by it: at DP=8 + EP an 8k-token prefill
# gathers 524k pairs, ~6.7 GB of buffers if every pair had a row, of which this rank computes ~1/8. Below it
# nothing waits: a host read per MoE layer stalls the GPU until the host catches up, every layer of the step.
EXACT_ROWS_MIN_BYTES = 2 * 2**30


def use_triton(x: torch.Tensor) -> bool:
    """Whether :mod:`epkit.engine.kernels` may serve ``x`` (CUDA, or the interpreter); each kernel still checks itself."""
    return x.device.type == "cuda" or TRITON_INTERPRET


@dataclass(frozen=True)
class ExpertRanges:
    """Which logical experts each EP rank holds: contiguous ranges, the first ``E % ep`` one larger.

    This is vLLM's default linear placement (no redundant experts); an EPLB placement
    would replace ``experts_of``.
    """

    num_experts: int
    ep_size: int
    ep_rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} must be in 0..{self.ep_size - 1}")
        if self.num_experts < self.ep_size:
            raise ValueError(f"num_experts={self.num_experts} is smaller than ep_size={self.ep_size}; every EP rank needs an expert")

    def experts_of(self, rank: int) -> list[int]:
        base, extra = divmod(self.num_experts, self.ep_size)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (1 if rank < extra else 0)))

    @property
    def local_experts(self) -> list[int]:
        return self.experts_of(self.ep_rank)

    def owner_table(self, device: torch.device) -> torch.Tensor:
        """``owner[e]`` = EP rank holding logical expert ``e``."""
        owner = torch.empty(self.num_experts, dtype=torch.long)
        for rank in range(self.ep_size):
            owner[self.experts_of(rank)] = rank
        return owner.to(device)

    def local_index_table(self, device: torch.device) -> torch.Tensor:
        """``local[e]`` = index of logical expert ``e`` among its owner's experts."""
        local = torch.empty(self.num_experts, dtype=torch.long)
        for rank in range(self.ep_size):
            experts = self.experts_of(rank)
            local[experts] = torch.arange(len(experts))
        return local.to(device)


class StaticExpertMap:
    """Where each logical expert of a layer lives under a fixed :class:`ExpertRanges` (no replicas)."""

    def __init__(self, placement: ExpertRanges, device: torch.device):
        self.owner = placement.owner_table(device)
        self.local = placement.local_index_table(device)
        # built here, not on first use (which could fall inside a CUDA-graph warm-up): this rank's common case
        mine = len(placement.local_experts)
        self._local_index_or_key: tuple[int, int] = (placement.ep_rank, mine)
        self._local_index_or = torch.where(self.owner == placement.ep_rank, self.local, mine)

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner EP rank, index among the owner's local experts) for every entry of ``ids``."""
        return self.owner[ids], self.local[ids]

    def local_index_or(self, ids: torch.Tensor, rank: int, other: int) -> torch.Tensor:
        """Index among ``rank``'s local experts for every entry of ``ids``, ``other`` where another rank owns it."""
        if self._local_index_or_key != (rank, other):  # one table lookup per call instead of locate's two and a compare
            self._local_index_or = torch.where(self.owner == rank, self.local, other)
            self._local_index_or_key = (rank, other)
        return self._local_index_or[ids]


class ReplicatedExpertMap:
    """One layer of an EPLB placement: a logical expert has one or more physical slots.

    Slot ``s`` lives on EP rank ``s // slots_per_rank`` at local index ``s % slots_per_rank``.
    The i-th (token, expert) entry of a call uses replica ``i % replicas`` - a deterministic
    spread; the choice never changes a token's output, since replicas hold the same weights.

    The device tables are allocated once, ``log2phy`` ``[E, width]`` with a fixed ``width`` (the most replicas
    any placement can give an expert; entries past ``logcnt`` are -1 and never read), and :meth:`update`
    rewrites them in place, so CUDA graphs captured with this map stay valid across EPLB rearrangements.
    """

    def __init__(self, log2phy, logcnt, slots_per_rank: int, device: torch.device, width: int | None = None):
        log2phy = torch.as_tensor(log2phy, dtype=torch.long)
        width = log2phy.shape[1] if width is None else width
        self.log2phy = torch.full((log2phy.shape[0], width), -1, dtype=torch.long, device=device)
        self.logcnt = torch.zeros(log2phy.shape[0], dtype=torch.long, device=device)
        self.slots_per_rank = slots_per_rank
        self.update(log2phy, logcnt)

    def update(self, log2phy, logcnt) -> None:
        """Write another placement of this layer into the same device tensors (their storage never changes)."""
        log2phy = torch.as_tensor(log2phy, dtype=torch.long)
        if log2phy.shape[0] != self.log2phy.shape[0] or log2phy.shape[1] > self.log2phy.shape[1]:
            raise ValueError(f"log2phy of shape {tuple(log2phy.shape)} does not fit the map's {tuple(self.log2phy.shape)}")
        padded = torch.full(tuple(self.log2phy.shape), -1, dtype=torch.long)
        padded[:, : log2phy.shape[1]] = log2phy
        self.log2phy.copy_(padded)
        self.logcnt.copy_(torch.as_tensor(logcnt, dtype=torch.long))

    def locate(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spread = torch.arange(ids.numel(), device=ids.device).view(ids.shape) % self.logcnt[ids]
        slot = self.log2phy[ids, spread]
        return slot // self.slots_per_rank, slot % self.slots_per_rank

    def local_index_or(self, ids: torch.Tensor, rank: int, other: int) -> torch.Tensor:
        """Index among ``rank``'s local slots for every entry of ``ids``, ``other`` where a slot of another rank serves it."""
        owner, local = self.locate(ids)
        return torch.where(owner == rank, local, other)


def count_rows(expert_idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Rows per expert index (``[bins]``, int64) without a host sync.

    ``torch.bincount`` on CUDA reads ``min()``/``max()`` back to the host (two syncs per call);
    a scatter-add of ones gives the same counts for indices in ``0..bins-1`` and never waits.
    """
    return torch.zeros(bins, dtype=torch.long, device=expert_idx.device).scatter_add_(0, expert_idx, torch.ones_like(expert_idx))


def accumulation_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(product dtype, accumulation dtype) for combining top-k expert outputs.

    Each weighted expert output is rounded to the product dtype, then summed in a wider dtype
    (float32 -> float64; bf16 / float16 -> float32, and float64 on CPU: :func:`weighted_sum`), so
    that the sum of k such values is exact, and the combine the same whichever rank added which
    expert first, while the sum does not round: see :func:`weighted_sum` for when that holds.
    """
    if dtype in (torch.float32, torch.float64):
        return dtype, torch.float64
    return torch.float32, torch.float32


def _grouped_mm_probe(x: torch.Tensor, rows: int, group: int) -> bool:
    """Whether ``torch._grouped_mm`` on ``x``'s device and dtype computes group ``group`` of two 16-row groups right,
    with ``rows - 32`` trailing rows outside ``offs`` (the sentinel rows that sync-free dispatch leaves)."""
    try:
        a = torch.randn(rows, 64, device=x.device, dtype=x.dtype)
        b = torch.randn(2, 64, 32, device=x.device, dtype=x.dtype)
        out = torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=x.device, dtype=torch.int32))
        part = slice(16 * group, 16 * (group + 1))
        return bool(torch.allclose(out[part].float(), (a[part] @ b[group]).float(), atol=0.5, rtol=0.05))
    except RuntimeError:
        return False


class LocalExperts:
    """The routed experts one rank holds for one layer, run as grouped GEMMs.

    ``w13`` is ``[E_local, hidden, 2 * intermediate]`` (gate then up), ``w2`` is
    ``[E_local, intermediate, hidden]``. On CUDA with bf16 the rows are sorted by expert and
    run through ``torch._grouped_mm``; on other GPUs the rows are packed into a zero-padded
    ``[E_local, capacity, hidden]`` block and run through ``torch.bmm``. On CPU the rows sorted
    by expert go through exact fixed-point GEMMs (:mod:`epkit.engine.batch_invariant`), so a row's
    result never depends on how many rows share its expert or the step.
    """

    grouped_mm_ok: bool | None = None  # probed once per process on CUDA

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.intermediate = w2.shape[1]
        self.num_local = w13.shape[0]
        self.map: StaticExpertMap | ReplicatedExpertMap | None = None  # set by the runner
        # EPLB: ``[E_local]`` float tensor (a row of the rebalancer's per-step slot load) that every
        # call adds its (token, expert) pairs per local slot to, on the device; None when EPLB is off.
        self.load: torch.Tensor | None = None

    def replace_slots(self, slots: list[int], source: "LocalExperts") -> None:
        """Copy ``source``'s experts (one per entry of ``slots``, in that order) into these slots, in place.

        ``w13`` / ``w2`` keep their storage (CUDA graphs captured with them stay valid). What was derived from the
        old values is forgotten: the CPU path's fixed-point copies (:func:`batch_invariant.prepared`, cached per
        weight tensor) are made again on next use; ``num_local`` / ``intermediate`` and the kernels' first-use
        checks depend on shapes only, which do not change."""
        if source.w13.shape[1:] != self.w13.shape[1:] or source.w2.shape[1:] != self.w2.shape[1:] or \
                len(slots) != source.num_local:
            raise ValueError(f"{source.num_local} experts of shapes {tuple(source.w13.shape[1:])}/{tuple(source.w2.shape[1:])} "
                             f"do not fit slots {slots} of {tuple(self.w13.shape)}/{tuple(self.w2.shape)}")
        index = torch.tensor(slots, dtype=torch.long, device=self.w13.device)
        self.w13.index_copy_(0, index, source.w13.to(self.w13.device, self.w13.dtype))
        self.w2.index_copy_(0, index, source.w2.to(self.w2.device, self.w2.dtype))
        for w in (self.w13, self.w2):
            batch_invariant._prepared.pop(id(w), None)  # its weakref goes with the entry: no callback left behind

    def _count(self, counts: torch.Tensor) -> None:
        if self.load is not None:
            self.load += counts[: self.num_local].to(self.load.dtype)

    sentinel_ok: bool | None = None  # probed once per process: trailing rows outside ``offs`` accepted

    def supports_sentinel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`with_sentinel` runs here (grouped GEMMs on CUDA that accept skipped trailing rows)."""
        if not self._use_grouped_mm(x):
            return False
        if LocalExperts.sentinel_ok is None:
            LocalExperts.sentinel_ok = _grouped_mm_probe(x, rows=48, group=1)
            import logging

            logging.getLogger("epkit.engine").info("sync-free MoE dispatch (sentinel rows): %s", LocalExperts.sentinel_ok)
        return LocalExperts.sentinel_ok

    def with_sentinel(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """Like ``__call__``, but rows whose index is ``num_local`` are skipped (their output is garbage).

        Shapes stay fixed, so nothing waits for the GPU (no ``nonzero``, no ``.item()``).
        """
        return self._grouped_by(x, expert_idx, count_rows(expert_idx, self.num_local + 1)[: self.num_local])

    def __call__(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros((0, self.w2.shape[2]))
        if self._use_grouped_mm(x):
            return self._grouped(x, expert_idx)
        if x.device.type == "cpu":
            return self._exact(x, expert_idx)
        return self._padded_bmm(x, expert_idx)

    def partial(self, x: torch.Tensor, expert_idx: torch.Tensor, pair_weights: torch.Tensor, k: int,
                local_share: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Weighted expert outputs summed per row of ``x``: ``[rows, hidden]`` in the accumulation dtype (or
        ``out_dtype``).

        Pair ``i`` is (row ``i // k``, local expert ``expert_idx[i]``, weight ``pair_weights[i]``);
        pairs with ``expert_idx == num_local`` belong to other ranks and are skipped. Only this rank's
        pairs are counting-sorted by expert, run through the expert GEMMs and combined per row (Triton
        kernels that read the pair count on the device: no host sync, no work on other ranks' pairs, each
        output row written once). Same products and sums as ``weighted_sum`` over ``__call__``'s output.
        ``local_share``: the expected fraction of the pairs that are this rank's (1 / EP size), which picks
        the GEMM: the Triton tile of that band of group sizes where it beat ``torch._grouped_mm`` at first use,
        else ``torch._grouped_mm``.
        ``out_dtype``: the dtype the sums are written as (default the accumulation dtype; the model's where no
        other rank adds to them)."""
        from epkit.engine import kernels

        tile = None
        if x.device.type == "cuda":
            tile = kernels.moe_tile(expert_idx.shape[0] * local_share / self.num_local)
            if tile and not kernels.moe_gemm_enabled(x, self.w13, self.w2, tile, self._grouped_rows):
                tile = None
        offs = tiles = None
        if tile and kernels.sort_pairs_enabled(expert_idx, self.num_local):  # one launch: sort and tile sums
            pos, src, counts, offs, tiles = kernels.sort_pairs(expert_idx, self.num_local, k, tile.block_m)
        else:
            pos, src, counts = kernels.group_pairs(expert_idx, self.num_local, k)
        self._count(counts)
        rows = expert_idx.shape[0]  # buffers sized by every pair of every rank; fine up to graph-step sizes
        # gathered row, gate/up, act and output of the torch._grouped_mm path (the Triton GEMMs need less: no
        # gathered copy, no gate/up buffer), so the bound errs on the safe side
        row_bytes = x.element_size() * (2 * x.shape[1] + 3 * self.intermediate)
        if local_share < 1.0 and rows * row_bytes > EXACT_ROWS_MIN_BYTES and x.device.type == "cuda" and \
                not torch.cuda.is_current_stream_capturing():
            # EP, a large eager prefill: buffers of this rank's pairs only, for one host read per layer. Without EP
            # every pair is this rank's: ``rows`` is exact already and no read is needed
            rows = int(counts.sum())
        if x.device.type == "cuda":
            if tile:
                if offs is None:
                    offs, tiles = kernels.moe_tiles(counts, tile.block_m)
                # the gather rides in the first GEMM's loads, SiLU * up in its epilogue
                y = kernels.moe_gemms(x, self.w13, self.w2, offs, tiles, tile, rows, src)
            else:
                y = self._grouped_rows(x, src, counts, rows)
        else:  # the interpreter on CPU: the same rows through the CPU path's exact GEMMs (host reads are fine here)
            n = counts.sum().reshape(1)
            valid = int(n)
            xs = kernels.gather_rows(x, src, n, rows)
            y = xs.new_empty((xs.shape[0], self.w2.shape[2]))
            if valid:
                own = expert_idx < self.num_local
                sorted_e = torch.empty_like(expert_idx)
                sorted_e[pos[own].long()] = expert_idx[own]
                y[:valid] = self._exact(xs[:valid], sorted_e[:valid], count=False)
        return kernels.combine_rows(y, pos, expert_idx, pair_weights, k, self.num_local, x.shape[0],
                                    accumulation_dtypes(x.dtype)[1], out_dtype)

    def _grouped_rows(self, x: torch.Tensor, src: torch.Tensor, counts: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """Expert-sorted rows ``x[src[r]]`` (groups of ``counts``) through ``torch._grouped_mm``: ``[rows, hidden]``."""
        from epkit.engine import kernels

        offs = torch.cumsum(counts, 0)
        n = offs[-1:]
        xs = kernels.gather_rows(x, src, n, rows)
        offs32 = offs.to(torch.int32)
        h = torch._grouped_mm(xs, self.w13, offs=offs32)
        del xs
        if kernels.silu_mul_enabled(h):  # one kernel over this rank's rows only
            act = kernels.silu_mul(h, n)
        else:
            act = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate :]
        del h
        return torch._grouped_mm(act, self.w2, offs=offs32)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
            return False
        if LocalExperts.grouped_mm_ok is None:
            LocalExperts.grouped_mm_ok = _grouped_mm_probe(x, rows=32, group=0)
            import logging

            logging.getLogger("epkit.engine").info(
                "grouped expert GEMMs: %s", "torch._grouped_mm" if LocalExperts.grouped_mm_ok else "padded torch.bmm (fallback)")
        return LocalExperts.grouped_mm_ok

    def _grouped(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        return self._grouped_by(x, expert_idx, count_rows(expert_idx, self.w13.shape[0]))

    def _grouped_by(self, x: torch.Tensor, expert_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM pair over rows sorted by expert; rows past ``counts``' total are skipped."""
        order = torch.argsort(expert_idx, stable=True)
        self._count(counts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x[order], self.w13, offs=offs)
        act = F.silu(h[:, : self.intermediate]) * h[:, self.intermediate :]
        y = torch._grouped_mm(act, self.w2, offs=offs)
        out = torch.empty_like(y)
        out[order] = y
        return out

    def _exact(self, x: torch.Tensor, expert_idx: torch.Tensor, count: bool = True) -> torch.Tensor:
        """The CPU path: rows sorted by expert through exact fixed-point GEMMs (:mod:`epkit.engine.batch_invariant`),
        so a row's result depends on that row and its expert alone."""
        counts = torch.bincount(expert_idx, minlength=self.num_local)
        if count:
            self._count(counts)
        order = torch.argsort(expert_idx, stable=True)
        groups = counts.tolist()
        h = batch_invariant.grouped_mm(x[order], self.w13, groups)
        y = batch_invariant.grouped_mm(batch_invariant.silu_mul(h, self.intermediate), self.w2, groups)
        out = torch.empty_like(y)
        out[order] = y
        return out

    def _padded_bmm(self, x: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        num_local = self.w13.shape[0]
        order = torch.argsort(expert_idx, stable=True)
        sorted_e = expert_idx[order]
        counts = torch.bincount(expert_idx, minlength=num_local)
        self._count(counts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(x.shape[0], device=x.device) - starts[sorted_e]
        capacity = max(2, int(counts.max()))
        packed = x.new_zeros((num_local, capacity, x.shape[1]))
        packed[sorted_e, slot] = x[order]
        h = torch.bmm(packed, self.w13)
        act = F.silu(h[..., : self.intermediate]) * h[..., self.intermediate :]
        y = torch.bmm(act, self.w2)[sorted_e, slot]
        out = torch.empty_like(y)
        out[order] = y
        return out


def fused_rows_ok(x: torch.Tensor, experts: "LocalExperts") -> bool:
    """Whether :meth:`LocalExperts.partial` runs here: Triton row kernels that passed their check, and on
    CUDA sync-free grouped GEMMs (elsewhere, i.e. the interpreter on CPU, the GEMMs are the CPU path's exact ones)."""
    if not use_triton(x) or (x.device.type == "cuda" and not experts.supports_sentinel(x)):
        return False
    from epkit.engine import kernels

    return kernels.moe_rows_enabled(x, accumulation_dtypes(x.dtype)[1])


def weighted_sum(y: torch.Tensor, weights: torch.Tensor, token_idx: torch.Tensor, num_tokens: int,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum ``weights[i] * y[i]`` into row ``token_idx[i]`` of a ``[num_tokens, hidden]`` tensor.

    Products are rounded to the product dtype and added in the accumulation dtype (see
    :func:`accumulation_dtypes`); the result stays in the accumulation dtype so partial
    sums from several ranks can be reduced before the final cast. Rows where ``mask`` is False
    contribute exactly zero, whatever ``y`` holds there. On CPU the sums are float64 for every
    dtype (bfloat16 too) and the products float32 (24 significant bits; a float64 model's float64
    products have no such margin), so every partial and whole sum of a token's k products is
    exact, in any order and split over any ranks, while the k rounded products are within about
    2**29 of each other in magnitude (2**(29 - log2 k), leaving room for the carries: their bits
    then fit float64's 53), i.e. while their float64 sum does not round. A product further below
    the largest (an expert weight or output 2**-29 times another's) can make the sum round in its
    last bit, and then which rank added which expert may change that bit (rarely the value after
    the cast to the dtype).
    """
    prod, acc = accumulation_dtypes(y.dtype)
    if y.device.type == "cpu":
        acc = torch.float64
    products = (y.to(prod) * weights.to(prod).unsqueeze(1)).to(acc)
    if mask is not None:
        products = torch.where(mask.unsqueeze(1), products, torch.zeros((), dtype=acc, device=y.device))
    out = torch.zeros((num_tokens, y.shape[1]), dtype=acc, device=y.device)
    return out.index_add_(0, token_idx, products)


def router_bias(num_experts: int, skew: float, device: torch.device) -> torch.Tensor | None:
    """The skewed router's float32 logit bias: ``-skew * e / (E - 1)`` for expert ``e`` (None if ``skew`` is 0).

    Expert 0 gets the largest boost and expert ``E - 1`` none, so low-numbered experts (the
    first EP ranks under the linear placement) are hot: a deterministic imbalance for EPLB.
    """
    if not skew:
        return None
    return (-float(skew) * torch.arange(num_experts, dtype=torch.float32) / max(1, num_experts - 1)).to(device)


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router: (top-k expert ids ``[T, k]``, their float32 weights ``[T, k]``); ``bias`` is added to the logits."""
    logits = router_logits.float()
    if bias is not None:
        logits = logits + bias
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


class ReplicatedMoE:
    """MoE without expert parallelism: every rank holds every expert, no collective at all."""

    name = "replicated"
    graph_safe = True
    static_valid = None  # every row is computed locally: padding rows only cost compute

    def __call__(self, x, ids, weights, experts: LocalExperts, counts: list[int]) -> torch.Tensor:
        n, k = ids.shape
        if n and fused_rows_ok(x, experts):
            return experts.partial(x, ids.reshape(-1), weights.reshape(-1), k, out_dtype=x.dtype)
        token_idx = torch.div(torch.arange(n * k, device=x.device), k, rounding_mode="floor")  # no host sync
        y = experts(x[token_idx], ids.reshape(-1))
        return weighted_sum(y, weights.reshape(-1), token_idx, n).to(x.dtype)
