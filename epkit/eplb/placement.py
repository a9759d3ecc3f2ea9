"""Placement: where every physical expert slot lives, plus the measures over it.

A placement is the triple vLLM keeps per MoE layer:

* ``phy2log[L, P]`` - the logical expert held by physical slot ``p``; slot ``p``
  lives on EP rank ``p // (P // num_ranks)``;
* ``log2phy[L, E, max_replicas]`` - the slots holding logical expert ``e``,
  padded with ``-1``;
* ``logcnt[L, E]`` - how many replicas logical expert ``e`` has.

Everything here is pure numpy over ``[layers, …]`` arrays. Inputs may be numpy
arrays or CPU torch tensors (anything ``np.asarray`` accepts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_2d(name: str, value, dtype=None) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [layers, n]; got shape {arr.shape}")
    return arr


@dataclass(frozen=True, eq=False)
class Placement:
    """One expert placement for every MoE layer (see the module docstring)."""

    phy2log: np.ndarray
    log2phy: np.ndarray
    logcnt: np.ndarray

    @classmethod
    def from_phy2log(cls, phy2log, num_logical: int | None = None) -> "Placement":
        """Build the full triple from ``phy2log[L, P]`` (slots of one expert listed in slot order)."""
        phy2log = _as_2d("phy2log", phy2log).astype(np.int64)
        layers, num_physical = phy2log.shape
        num_logical = int(phy2log.max()) + 1 if num_logical is None else int(num_logical)
        if phy2log.min() < 0 or phy2log.max() >= num_logical:
            raise ValueError(f"phy2log holds expert ids outside [0, {num_logical - 1}]")
        rows = np.arange(layers)[:, None]
        logcnt = np.zeros((layers, num_logical), dtype=np.int64)
        np.add.at(logcnt, (np.broadcast_to(rows, phy2log.shape), phy2log), 1)
        if (logcnt == 0).any():
            layer, expert = np.argwhere(logcnt == 0)[0]
            raise ValueError(f"logical expert {expert} has no physical slot in layer {layer}")
        order = np.argsort(phy2log, axis=1, kind="stable")  # slots grouped by expert, in slot order
        sorted_log = np.take_along_axis(phy2log, order, axis=1)
        first = np.cumsum(logcnt, axis=1) - logcnt  # first sorted position of each expert
        replica = np.arange(num_physical)[None, :] - np.take_along_axis(first, sorted_log, axis=1)
        log2phy = np.full((layers, num_logical, int(logcnt.max())), -1, dtype=np.int64)
        log2phy[np.broadcast_to(rows, order.shape), sorted_log, replica] = order
        return cls(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt)

    @classmethod
    def linear(cls, num_layers: int, num_logical: int, num_physical: int) -> "Placement":
        """vLLM's start-up placement: slots ``0..E-1`` hold experts ``0..E-1``, redundant slot ``E+i`` holds ``i % E``."""
        if num_physical < num_logical:
            raise ValueError(f"num_physical={num_physical} must be >= num_logical={num_logical}")
        row = np.arange(num_physical, dtype=np.int64) % num_logical
        return cls.from_phy2log(np.tile(row, (num_layers, 1)), num_logical)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    def slot_loads(self, load) -> np.ndarray:
        """``[L, P]`` tokens per slot when each expert's ``load[L, E]`` splits evenly over its replicas."""
        load = _as_2d("load", load, np.float64)
        per_replica = load / self.logcnt
        return np.take_along_axis(per_replica, self.phy2log, axis=1)

    def rank_loads(self, load, num_ranks: int) -> np.ndarray:
        """``[L, num_ranks]`` tokens per EP rank: Σ over the rank's slots of load / replica count."""
        return rank_loads(self.slot_loads(load), num_ranks)

    def rank_experts(self, num_ranks: int) -> np.ndarray:
        """``[L, num_ranks, slots_per_rank]`` logical expert ids held by each rank."""
        return self.phy2log.reshape(self.num_layers, num_ranks, -1)

    def to_dict(self) -> dict:
        return {"phy2log": self.phy2log.tolist(), "logcnt": self.logcnt.tolist()}


def rank_loads(slot_loads, num_ranks: int) -> np.ndarray:
    """Sum ``[…, P]`` per-slot loads into ``[…, num_ranks]`` (slots are laid out rank by rank)."""
    slot_loads = np.asarray(slot_loads, dtype=np.float64)
    if slot_loads.shape[-1] % num_ranks:
        raise ValueError(f"{slot_loads.shape[-1]} slots do not split over num_ranks={num_ranks}")
    return slot_loads.reshape(*slot_loads.shape[:-1], num_ranks, -1).sum(-1)


def balancedness(rank_load) -> float:
    """vLLM's balancedness: Σ over layers of mean rank load ÷ Σ over layers of max rank load (1.0 = even)."""
    rank_load = np.asarray(rank_load, dtype=np.float64)
    peak = rank_load.max(-1).sum()
    return float(rank_load.mean(-1).sum() / peak) if peak > 0 else 0.0


def experts_moved(old: Placement, new: Placement, num_ranks: int) -> np.ndarray:
    """``[L]`` expert weights each layer must copy: replicas a rank holds in ``new`` but not in ``old``.

    Counted per (rank, logical expert) with multiplicity, so reordering slots on a rank
    costs nothing (vLLM keeps those in place) and a copy is needed only for an expert the
    rank did not already hold.
    """
    if old.phy2log.shape != new.phy2log.shape:
        raise ValueError(f"placements differ in shape: {old.phy2log.shape} vs {new.phy2log.shape}")
    num_logical = max(old.num_logical, new.num_logical)
    layers = old.num_layers

    def counts(p: Placement) -> np.ndarray:
        ranks = np.arange(p.num_physical) // (p.num_physical // num_ranks)
        key = (np.arange(layers)[:, None] * num_ranks + ranks[None, :]) * num_logical + p.phy2log
        return np.bincount(key.ravel(), minlength=layers * num_ranks * num_logical).reshape(layers, -1)

    return np.maximum(counts(new) - counts(old), 0).sum(-1)


def bytes_moved(old: Placement, new: Placement, num_ranks: int, bytes_per_expert: float) -> float:
    """Bytes sent between ranks to go from ``old`` to ``new`` (one copy per moved expert)."""
    return float(experts_moved(old, new, num_ranks).sum()) * float(bytes_per_expert)


def node_of_slot(num_physical: int, num_ranks: int, num_nodes: int) -> np.ndarray:
    """``[P]`` node index of every slot (ranks fill nodes in order, as EP ranks do)."""
    slots_per_rank = num_physical // num_ranks
    ranks_per_node = num_ranks // num_nodes
    return np.arange(num_physical) // slots_per_rank // ranks_per_node
