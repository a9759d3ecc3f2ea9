"""all2all backends: how an MoE layer's tokens reach the ranks that hold their experts and come back.

``BACKENDS`` maps the word users pass to ``--all2all-backend`` to an implementation.
Implemented over ``torch.distributed`` (gloo on CPU, NCCL on GPU):

* ``allgather_reducescatter`` - all-gather every rank's tokens and routing (one packed buffer), run the local
  experts on every token routed to them, reduce-scatter the weighted partial sums.
* ``naive`` - every rank broadcasts its tokens and routing in turn, local experts run,
  one all-reduce of the partial sums; each rank keeps its own rows.
* ``all_to_all`` - true dispatch/combine: each (token, expert) pair is sent with
  ``all_to_all_single`` only to the rank owning the expert; outputs come back the same way
  and are combined on the token's home rank.

``pplx``, ``deepep_high_throughput``, ``deepep_low_latency``, ``flashinfer_all2allv`` and
``mori`` name vendor kernels. The engine never runs another algorithm under their names: at
startup it fails, naming the missing package and its install step. Which names are built in and
which package each vendor name needs is :mod:`epkit.topology.backends`, shared with the rest of epkit.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from epkit.topology.backends import BUILTIN_BACKENDS, VENDOR_PACKAGES
from epkit.errors import EngineError

if TYPE_CHECKING:
    import torch


class Communicator:
    """The collectives the engine uses, over one process group per DP deployment.

    ``group`` carries tensors on the compute device (NCCL on GPU, gloo on CPU);
    ``cpu_group`` (gloo) carries the small per-step control exchange.
    """

    def __init__(self, rank: int, world_size: int, group: Any = None, cpu_group: Any = None):
        self.rank, self.world_size = rank, world_size
        self.group, self.cpu_group = group, cpu_group if cpu_group is not None else group

    def exchange_step_info(self, values: list[int]) -> list[list[int]]:
        """All-gather a few integers from every rank (token counts, stop flags) on the CPU group."""
        import torch
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.int64)
        if self.world_size == 1:
            return [values]
        out = torch.empty(self.world_size * len(values), dtype=torch.int64)
        _all_gather(out, mine, self.cpu_group)
        return out.view(self.world_size, len(values)).tolist()

    def all_gather(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.distributed as dist

        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))
        _all_gather(out, t.contiguous(), self.group)
        return out

    def reduce_scatter(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as dist

        out = t.new_empty((t.shape[0] // self.world_size, *t.shape[1:]))
        if hasattr(dist, "reduce_scatter_single"):
            dist.reduce_scatter_single(out, t.contiguous(), group=self.group)
        else:
            dist.reduce_scatter_tensor(out, t.contiguous(), group=self.group)
        return out

    def all_reduce(self, t: "torch.Tensor") -> "torch.Tensor":
        import torch.distributed as dist

        dist.all_reduce(t, group=self.group)
        return t

    def broadcast(self, t: "torch.Tensor", src: int) -> "torch.Tensor":
        import torch.distributed as dist

        dist.broadcast(t, src=src, group=self.group)
        return t

    def all_to_all(self, out: "torch.Tensor", t: "torch.Tensor", out_splits: list[int], in_splits: list[int]) -> "torch.Tensor":
        import torch.distributed as dist

        dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=self.group)
        return out


def _all_gather(out, t, group) -> None:
    import torch.distributed as dist

    # torch >= 2.13 names it all_gather_single; older releases (still on GPU machines) all_gather_into_tensor.
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, t, group=group)
    else:
        dist.all_gather_into_tensor(out, t, group=group)


class All2AllBackend(Protocol):
    """An expert-parallel MoE exchange: ``backend(x, ids, weights, experts, counts) -> out``.

    ``x`` is this rank's ``[n, hidden]`` tokens, ``ids``/``weights`` their top-k logical
    experts and router weights, ``counts[r]`` the token count of every EP rank this step
    (all ranks call every collective even with ``n == 0``). Returns ``[n, hidden]``.
    """

    name: str

    def __call__(self, x, ids, weights, experts, counts: list[int]) -> "torch.Tensor": ...


SYNC_FREE_MAX_PAIRS = 16384  # gathered (token, slot) pairs up to which the sync-free GPU path is used


class _GatherBased:
    """Shared part of the two backends that replicate all tokens to every rank."""

    name = ""
    graph_safe = True  # no host reads inside a step (with the sync-free expert path): CUDA graphs can hold it

    def __init__(self, comm: Communicator, device: "torch.device"):
        self.comm = comm
        self._valid_key: tuple | None = None
        self._valid = None
        self.static_valid = None  # set by a padded (CUDA-graph) step: its fixed mask of real gathered rows

    @staticmethod
    def _split(hidden: int, dtype) -> int:
        """Bytes of a packed row before its routing: the tokens, padded to 8 bytes so every dtype view is aligned."""
        import torch

        return -(-hidden * torch.empty((), dtype=dtype).element_size() // 8) * 8

    def _pack(self, x, ids, weights, capacity: int):
        """One byte buffer ``[capacity, token bytes + 2k float32]`` per rank: tokens and their routing travel together.

        One collective per MoE layer instead of two (a small NCCL collective costs ~55-65 µs
        whatever its size: docs/benchmarks.md), with the router weights still exact float32.
        Written in place through dtype views of the buffer (three copies; rows past ``n`` zeroed)."""
        import torch

        n, k = ids.shape
        packed = torch.empty((capacity, self._split(x.shape[1], x.dtype) + 8 * k), dtype=torch.uint8, device=x.device)
        tokens, meta = self._unpack(packed, x.shape[1], x.dtype)
        tokens[:n] = x
        meta[:n, :k] = ids  # expert ids < 2**24 are exact in float32
        meta[:n, k:] = weights
        if capacity > n:
            packed[n:] = 0
        return packed

    @classmethod
    def _unpack(cls, packed, hidden: int, dtype):
        """(tokens ``[R, hidden]``, routing ``[R, 2k]`` float32): views of packed rows, no copy."""
        import torch

        split = cls._split(hidden, dtype)
        return packed[:, :split].view(dtype)[:, :hidden], packed[:, split:].view(torch.float32)

    def _valid_rows(self, counts: list[int], capacity: int, device) -> "torch.Tensor":
        """Mask of real (unpadded) gathered rows; built once per step, reused by every layer."""
        import torch

        if self.static_valid is not None:
            return self.static_valid
        key = (tuple(counts), capacity)
        if self._valid_key != key:
            rows = torch.arange(len(counts) * capacity)
            self._valid = ((rows % capacity) < torch.tensor(counts)[rows // capacity]).to(device)
            self._valid_key = key
        return self._valid

    def _local_partial(self, gx, gmeta, counts: list[int], capacity: int, experts):
        import torch

        from epkit.engine.moe import fused_rows_ok, weighted_sum

        k = gmeta.shape[1] // 2
        gids, gw = gmeta[:, :k].long(), gmeta[:, k:]
        valid = self._valid_rows(counts, capacity, gx.device).unsqueeze(1)
        if gx.shape[0] and fused_rows_ok(gx, experts):
            # only this rank's pairs are sorted, gathered, computed and combined (Triton row kernels): no host
            # sync and no work on other ranks' pairs, so no size limit either (large prefill steps too)
            local = experts.map.local_index_or(gids, self.comm.rank, experts.num_local)
            expert_idx = torch.where(valid, local, experts.num_local).reshape(-1)
            return experts.partial(gx, expert_idx, gw.reshape(-1), k, local_share=1 / self.comm.world_size)
        owner, local = experts.map.locate(gids)
        mine = (owner == self.comm.rank) & valid
        if experts.supports_sentinel(gx) and gids.numel() <= SYNC_FREE_MAX_PAIRS:
            # No host sync: every (row, slot) pair goes through the grouped GEMM, pairs routed
            # elsewhere sort to a trailing sentinel group that the GEMM skips and the mask zeroes.
            token_idx = torch.div(torch.arange(gx.shape[0] * k, device=gx.device), k, rounding_mode="floor")
            flat_mine = mine.reshape(-1)
            expert_idx = torch.where(flat_mine, local.reshape(-1), experts.num_local)
            y = experts.with_sentinel(gx[token_idx], expert_idx)
            return weighted_sum(y, gw.reshape(-1), token_idx, gx.shape[0], mask=flat_mine)
        token_idx, slot_idx = mine.nonzero(as_tuple=True)
        y = experts(gx[token_idx], local[token_idx, slot_idx])
        return weighted_sum(y, gw[token_idx, slot_idx], token_idx, gx.shape[0])


class AllGatherReduceScatter(_GatherBased):
    name = "allgather_reducescatter"

    def __call__(self, x, ids, weights, experts, counts):
        capacity = max(counts)
        gx, gmeta = self._unpack(self.comm.all_gather(self._pack(x, ids, weights, capacity)), x.shape[1], x.dtype)
        partial = self._local_partial(gx, gmeta, counts, capacity, experts)
        return self.comm.reduce_scatter(partial)[: x.shape[0]].to(x.dtype)


class NaiveBroadcast(_GatherBased):
    name = "naive"

    def __call__(self, x, ids, weights, experts, counts):
        import torch

        capacity = max(counts)
        packed = self._pack(x, ids, weights, capacity)
        parts = [self.comm.broadcast(packed if src == self.comm.rank else torch.empty_like(packed), src)
                 for src in range(self.comm.world_size)]
        gx, gmeta = self._unpack(torch.cat(parts), x.shape[1], x.dtype)
        partial = self.comm.all_reduce(self._local_partial(gx, gmeta, counts, capacity, experts))
        start = self.comm.rank * capacity
        return partial[start : start + x.shape[0]].to(x.dtype)


class AllToAll:
    """Dispatch each (token, expert) pair only to its owner; combine on the home rank."""

    name = "all_to_all"
    graph_safe = False  # split sizes are read on the host every layer

    def __init__(self, comm: Communicator, device: "torch.device"):
        self.comm = comm
        self.static_valid = None

    def __call__(self, x, ids, weights, experts, counts):
        import torch

        from epkit.engine.moe import weighted_sum

        n, k = ids.shape
        world = self.comm.world_size
        owner, local = experts.map.locate(ids)
        token_idx = torch.arange(n, device=x.device).repeat_interleave(k)
        dest = owner.reshape(-1)
        order = torch.argsort(dest, stable=True)
        send_counts_t = torch.bincount(dest, minlength=world)
        recv_counts_t = torch.empty_like(send_counts_t)
        self.comm.all_to_all(recv_counts_t, send_counts_t, [1] * world, [1] * world)
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        send_x = x[token_idx[order]]
        send_e = local.reshape(-1)[order]
        recv_x = x.new_empty((sum(recv_counts), x.shape[1]))
        recv_e = send_e.new_empty(sum(recv_counts))
        self.comm.all_to_all(recv_x, send_x, recv_counts, send_counts)
        self.comm.all_to_all(recv_e, send_e, recv_counts, send_counts)
        y = experts(recv_x, recv_e)
        back = x.new_empty((n * k, x.shape[1]))
        self.comm.all_to_all(back, y, send_counts, recv_counts)
        y_pairs = torch.empty_like(back)
        y_pairs[order] = back
        return weighted_sum(y_pairs, weights.reshape(-1), token_idx, n).to(x.dtype)


@dataclass(frozen=True)
class VendorBackend:
    """A backend that exists only as a vendor kernel library; refused unless integrated."""

    name: str
    module: str
    package: str
    install: str

    def check_available(self) -> None:
        if importlib.util.find_spec(self.module) is None:
            raise EngineError(
                f"--all2all-backend {self.name} needs the {self.package} package (Python module {self.module!r}), "
                f"which is not installed; install it with {self.install}, or choose one of the built-in "
                f"backends: {', '.join(BUILTIN)}"
            )
        raise EngineError(
            f"--all2all-backend {self.name}: {self.package} is installed, but the built-in engine has no "
            f"integration with it yet (it will not run another algorithm under this name); serve with vLLM "
            f"for this backend or choose one of: {', '.join(BUILTIN)}"
        )


_IMPLEMENTATIONS = {"allgather_reducescatter": AllGatherReduceScatter, "naive": NaiveBroadcast, "all_to_all": AllToAll}
BUILTIN = {name: _IMPLEMENTATIONS[name] for name in BUILTIN_BACKENDS}  # the names come from epkit.topology.backends
VENDOR = {name: VendorBackend(name, p.module, p.package, p.install) for name, p in VENDOR_PACKAGES.items()}
BACKENDS: dict[str, Any] = {**BUILTIN, **VENDOR}


def check_backend(name: str) -> None:
    """Raise :class:`EngineError` at startup unless ``name`` can run on this machine."""
    if name in VENDOR:
        VENDOR[name].check_available()
    elif name not in BUILTIN:
        raise EngineError(f"all2all_backend={name!r}; allowed: {', '.join(BACKENDS)}")


def make_backend(name: str, comm: Communicator, device: "torch.device") -> All2AllBackend:
    """Build the named built-in backend for this rank (expert locations come with each layer's experts)."""
    check_backend(name)
    return BUILTIN[name](comm, device)
