"""MoE with data parallelism and without expert parallelism: experts tensor-parallel across the DP ranks, as vLLM.

vLLM without ``--enable-expert-parallel`` does not replicate the experts over DP ranks: its FusedMoE flattens TP
across DP, so each of the ``dp`` ranks holds every expert's 1/dp slice of the intermediate dimension (w13's gate
and up columns ``[r*I/dp, (r+1)*I/dp)``, w2's matching rows). Each MoE layer gathers the tokens of all DP ranks
(with their routing), computes its slice's partial output for every gathered token, and a reduce-scatter sums
the partials and hands each rank its own tokens back.

Invariance (DESIGN.md): greedy tokens do not depend on the DP size. On CPU every GEMM is exact
(:mod:`epkit.engine.batch_invariant`): a row's product is an exact float64 value rounded once. A slice's partial
down-projection keeps that property when it uses the whole problem's fixed point: the activation row quantised by
the largest magnitude of the whole row (one all-gather of the slices' row maxima), w2's columns by the whole
column (taken from the full weights when they are built), both with the whole intermediate size's bits. Each
partial is then an integer times the row's and column's shared power of two, below 2**53, and so is their sum:
the float64 reduce-scatter is exact in any order, and its one rounding gives DP=1's value bit for bit. Per-pair
outputs are reduced before the router weights apply (DP=1 rounds each expert's output, then combines), so the
CPU path reduces ``[tokens * k, hidden]`` rows. GPUs reduce the combined rows instead, as vLLM does, but in float32
(vLLM reduces in the model dtype; the non-fused path rounds each slice's per-expert output to the model dtype
first): a tolerance, not exactness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from epkit.engine import batch_invariant
from epkit.engine.all2all import Communicator, _GatherBased
from epkit.engine.moe import LocalExperts, fused_rows_ok, weighted_sum
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")


@dataclass(frozen=True)
class ExpertShards:
    """This rank's slice ``[lo, hi)`` of every expert's intermediate dimension: rank ``rank`` of ``size``."""

    rank: int
    size: int
    intermediate: int  # the whole moe_intermediate_size

    @property
    def width(self) -> int:
        return self.intermediate // self.size

    @property
    def lo(self) -> int:
        return self.rank * self.width

    def w13(self, a: torch.Tensor) -> torch.Tensor:
        """This slice of ``[..., hidden, 2 * I]`` (gate then up): its gate columns, then its up columns."""
        full, lo, hi = self.intermediate, self.lo, self.lo + self.width
        return torch.cat([a[..., lo:hi], a[..., full + lo : full + hi]], -1).contiguous()

    def w2(self, b: torch.Tensor) -> torch.Tensor:
        """This slice of ``[..., I, hidden]``: its rows."""
        return b[..., self.lo : self.lo + self.width, :].contiguous()

    def describe(self) -> str:
        return (f"experts tensor-parallel across {self.size} DP ranks (intermediate {self.width} of "
                f"{self.intermediate} each), as vLLM without expert parallelism")


def expert_shards(data_parallel_size: int, expert_parallel: bool, dp_rank: int, intermediate: int) -> ExpertShards | None:
    """The slices of a DP deployment without EP (None with EP or at DP=1); :class:`EngineError` unless the
    intermediate size divides by the DP size."""
    if expert_parallel or data_parallel_size == 1:
        return None
    if intermediate % data_parallel_size:
        raise EngineError(
            f"moe_intermediate_size={intermediate} is not divisible by data_parallel_size={data_parallel_size}: without "
            f"--enable-expert-parallel every DP rank holds a 1/{data_parallel_size} slice of each expert's intermediate "
            "dimension (experts tensor-parallel across the DP ranks), and vLLM needs the same divisibility; pass "
            "--enable-expert-parallel or a DP size that divides it")
    return ExpertShards(dp_rank, data_parallel_size, intermediate)


class SlicedExperts(LocalExperts):
    """Every expert of a layer, this rank's slice of each (``w13`` ``[E, hidden, 2 * I/dp]``, ``w2`` ``[E, I/dp,
    hidden]``). On CPU ``w2_fixed`` holds w2's fixed-point values quantised per whole column (over all ``I``
    rows, with ``I``'s bits), so a partial down-projection is part of DP=1's exact product."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, shards: ExpertShards,
                 w2_fixed: batch_invariant.FixedWeight | None = None):
        super().__init__(w13, w2)
        self.shards, self.w2_fixed = shards, w2_fixed

    @classmethod
    def of(cls, w13: torch.Tensor, w2: torch.Tensor, shards: ExpertShards) -> "SlicedExperts":
        """From stacked weights: the whole experts (sliced here; on CPU with the whole columns' fixed point) or,
        on a GPU, slices already (only a slice per expert is ever held there)."""
        if w2.shape[-2] != shards.intermediate:
            return cls(w13, w2, shards)
        fixed = None
        if w2.device.type == "cpu":
            fixed = batch_invariant.FixedWeight(w2)
            fixed.values = shards.w2(fixed.values)
        return cls(shards.w13(w13), shards.w2(w2), shards, fixed)

    def exact_partial(self, x: torch.Tensor, expert_idx: torch.Tensor, comm: Communicator) -> torch.Tensor:
        """This slice's share of every row's expert output (row ``i`` through expert ``expert_idx[i]``), exact and
        unrounded (float64), on CPU. Every rank calls it with the same rows (one all-gather of row maxima)."""
        counts = torch.bincount(expert_idx, minlength=self.num_local)
        order = torch.argsort(expert_idx, stable=True)
        groups = counts.tolist()
        h = batch_invariant.grouped_mm(x[order], self.w13, groups)  # whole columns: DP=1's values
        act = batch_invariant.silu_mul(h, self.intermediate)
        amax = act.abs().amax(-1)
        amax = comm.all_gather(amax).view(comm.world_size, -1).amax(0)  # the whole row's largest magnitude
        values = batch_invariant.to_fixed(act, self.w2_fixed.bits, -1, amax=amax.unsqueeze(1))
        y = batch_invariant.grouped_products(values, self.w2_fixed.values, groups)
        out = torch.empty_like(y)
        out[order] = y
        return out


class TensorParallelMoE(_GatherBased):
    """All-gather every DP rank's tokens and routing, run this rank's slice of every expert on all of them,
    reduce-scatter the partial outputs (see the module's docstring for the CPU path's exact sums)."""

    name = "allgather_reducescatter (experts tensor-parallel)"
    graph_safe = True  # on GPU: no host reads inside a step (the row kernels, or grouped GEMMs over every pair)

    def __call__(self, x, ids, weights, experts: SlicedExperts, counts: list[int]) -> torch.Tensor:
        n, k = ids.shape
        capacity = max(counts)
        if capacity == 0:  # the same on every rank: no collective skipped by one rank only
            return x.new_zeros((0, x.shape[1]))
        gx, gmeta = self._unpack(self.comm.all_gather(self._pack(x, ids, weights, capacity)), x.shape[1], x.dtype)
        valid = self._valid_rows(counts, capacity, gx.device)
        if x.device.type == "cpu":
            return self._exact(x, weights, gx, gmeta, valid, experts, capacity)
        gids, gw = gmeta[:, :k].long(), gmeta[:, k:]
        if fused_rows_ok(gx, experts):  # every pair is this rank's: only padding rows are skipped
            expert_idx = torch.where(valid.unsqueeze(1), gids, experts.num_local).reshape(-1)
            partial = experts.partial(gx, expert_idx, gw.reshape(-1), k)
        else:  # padding rows run too (zero tokens) and are masked out of the sum: no host sync
            token_idx = torch.div(torch.arange(gx.shape[0] * k, device=gx.device), k, rounding_mode="floor")
            y = experts(gx[token_idx], gids.reshape(-1))
            partial = weighted_sum(y, gw.reshape(-1), token_idx, gx.shape[0], mask=valid[token_idx])
        return self.comm.reduce_scatter(partial)[:n].to(x.dtype)

    def _exact(self, x, weights, gx, gmeta, valid, experts: SlicedExperts, capacity: int) -> torch.Tensor:
        """CPU: exact float64 partials of every real (token, expert) pair, summed across ranks, rounded once, then
        combined with this rank's router weights as DP=1 combines (:func:`epkit.engine.moe.weighted_sum`)."""
        n, k = weights.shape
        gids = gmeta[:, :k].long().reshape(-1)
        pairs = valid.unsqueeze(1).expand(-1, k).reshape(-1).nonzero().squeeze(1)  # the same on every rank
        partial = torch.zeros((gx.shape[0] * k, x.shape[1]), dtype=torch.float64)
        if pairs.numel():
            partial[pairs] = experts.exact_partial(gx[pairs // k], gids[pairs], self.comm)
        y = self.comm.reduce_scatter(partial)[: n * k].to(x.dtype)  # exact sums, one rounding: DP=1's values
        token_idx = torch.div(torch.arange(n * k), k, rounding_mode="floor")
        return weighted_sum(y, weights.reshape(-1), token_idx, n).to(x.dtype)


def make_moe(shards: ExpertShards | None, comm: Communicator, device: torch.device) -> TensorParallelMoE | None:
    """The backend of a DP deployment without EP (None when ``shards`` is None); logs what each rank holds."""
    if shards is None:
        return None
    log.info("DP rank %d: %s", comm.rank, shards.describe())
    return TensorParallelMoE(comm, device)
