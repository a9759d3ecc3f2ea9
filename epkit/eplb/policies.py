"""EPLB policies: ``load[L, E]`` in, :class:`~epkit.eplb.placement.Placement` out.

Every policy has vLLM's signature ``policy(load, num_physical, num_groups, num_nodes,
num_ranks, current=None) -> Placement``; ``current`` is the placement in force (vLLM
passes it as ``old_global_expert_indices``), used by policies that care what moves.
The dict :data:`POLICIES` maps the words users type to policies:

``default``
    DeepSeek's / vLLM's algorithm: hierarchical when ``num_groups % num_nodes == 0``
    (pack expert groups onto nodes, replicate the heaviest experts inside each node,
    pack a node's replicas onto its GPUs), otherwise the same with one node and one
    group ("global").
``global``
    The default's global mode whatever the groups (what vLLM does when groups don't divide).
``refined``
    ``default`` then swap local search inside each node: same node locality, lower max GPU load.
``balanced``
    Global replication and packing then swap local search across all GPUs: the best
    balance, at the price of node locality (expert groups no longer stay on one node).
``sticky``
    Minimal migration: start from ``current``, move only the replicas whose counts
    change, then swap until the max GPU load is within ``tolerance`` of ``default``'s.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from epkit.errors import TopologyError
from epkit.eplb.packing import balanced_packing, refine_swaps, replicate_experts
from epkit.eplb.placement import Placement


class Policy(Protocol):
    def __call__(
        self,
        load,
        num_physical: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        current: Placement | None = None,
    ) -> Placement: ...


def check_shape(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> np.ndarray:
    """Validate a rebalance call; return ``load`` as a float64 ``[L, E]`` array."""
    weight = np.asarray(load, dtype=np.float64)
    if weight.ndim == 1:
        weight = weight[None, :]
    if weight.ndim != 2:
        raise TopologyError(f"load must have shape [layers, experts]; got shape {weight.shape}")
    num_logical = weight.shape[1]
    for name, value in (("num_physical", num_physical), ("num_groups", num_groups),
                        ("num_nodes", num_nodes), ("num_ranks", num_ranks)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TopologyError(f"{name}={value!r} must be a positive integer")
    if num_physical < num_logical:
        raise TopologyError(f"num_physical={num_physical} must be >= the {num_logical} logical experts")
    if num_physical % num_ranks:
        from epkit.eplb.config import redundant_hint

        raise TopologyError(
            f"num_physical={num_physical} ({num_logical} experts + {num_physical - num_logical} redundant) is not "
            f"divisible by num_ranks={num_ranks}; {redundant_hint(num_logical, num_ranks)}"
        )
    if num_logical % num_groups:
        raise TopologyError(f"num_groups={num_groups} must divide the {num_logical} logical experts")
    if not np.isfinite(weight).all() or (weight < 0).any():
        raise TopologyError("load must hold finite, non-negative token counts")
    return weight


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1])[None, :].repeat(perm.shape[0], 0), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> np.ndarray:
    """DeepSeek's three steps; returns ``phy2log[L, P]``. ``weight`` is float32 like the reference."""
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_rank = num_physical // num_ranks

    # 1. expert groups onto nodes; lay experts out node-major
    group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
    node_of_group, pos_in_node = balanced_packing(group_load, num_nodes)
    group_slot = node_of_group * groups_per_node + pos_in_node
    position = (group_slot[:, :, None] * group_size + np.arange(group_size)).reshape(layers, num_logical)
    expert_at = _inverse(position)  # logical expert at each node-major position

    # 2. replicate the heaviest experts inside each node (rows = (layer, node))
    local_load = np.take_along_axis(weight, expert_at, axis=1).reshape(layers * num_nodes, experts_per_node)
    slot2local, local_count = replicate_experts(local_load, slots_per_node)

    # 3. pack each node's replicas onto its GPUs
    replica_load = np.take_along_axis(local_load / local_count.astype(weight.dtype), slot2local, axis=1)
    rank_of_slot, pos_in_rank = balanced_packing(replica_load, num_ranks // num_nodes)
    final = rank_of_slot * slots_per_rank + pos_in_rank
    local_at_final = np.empty_like(slot2local)
    np.put_along_axis(local_at_final, final, slot2local, axis=1)
    node_base = (np.arange(layers * num_nodes) % num_nodes)[:, None] * experts_per_node
    node_major = (local_at_final + node_base).reshape(layers, num_physical)
    return np.take_along_axis(expert_at, node_major, axis=1)


def _nodes_for(num_ranks: int, num_nodes: int) -> int:
    # vLLM (EplbState.rearrange) drops to one node when the ranks don't split evenly over nodes
    return num_nodes if num_ranks % num_nodes == 0 else 1


def rebalance(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
              current: Placement | None = None) -> Placement:
    """The default policy (DeepSeek EPLB / vLLM ``DefaultEplbPolicy``): hierarchical or global.

    Computes in float32 as the reference does, so near-ties break the same way.
    ``current`` is accepted for the common signature and ignored (the expert set per
    GPU does not depend on it; vLLM only reorders slots inside a GPU).
    """
    weight = check_shape(load, num_physical, num_groups, num_nodes, num_ranks).astype(np.float32)
    num_nodes = _nodes_for(num_ranks, num_nodes)
    if num_groups % num_nodes == 0:
        phy2log = _hierarchical(weight, num_physical, num_groups, num_nodes, num_ranks)
    else:
        phy2log = _hierarchical(weight, num_physical, 1, 1, num_ranks)
    return Placement.from_phy2log(phy2log, weight.shape[1])


def rebalance_global(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
                     current: Placement | None = None) -> Placement:
    """The default policy's global mode (one group, one node), whatever ``num_groups``."""
    weight = check_shape(load, num_physical, num_groups, num_nodes, num_ranks).astype(np.float32)
    return Placement.from_phy2log(_hierarchical(weight, num_physical, 1, 1, num_ranks), weight.shape[1])


def _refine(phy2log: np.ndarray, weight: np.ndarray, count: np.ndarray, packs: int,
            target: np.ndarray | None = None) -> np.ndarray:
    """Swap-refine ``phy2log[L, P]`` with ``packs`` packs per row; returns the new ``phy2log``."""
    layers, num_physical = phy2log.shape
    replica_load = np.take_along_axis(weight / count, phy2log, axis=1)
    items, _ = refine_swaps(phy2log.reshape(layers, packs, -1), replica_load.reshape(layers, packs, -1), target)
    return items.reshape(layers, num_physical)


def rebalance_refined(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
                      current: Placement | None = None) -> Placement:
    """``default``, then swaps between GPUs of the same node only (node locality unchanged)."""
    weight = check_shape(load, num_physical, num_groups, num_nodes, num_ranks)
    base = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks)
    nodes = _nodes_for(num_ranks, num_nodes) if num_groups % _nodes_for(num_ranks, num_nodes) == 0 else 1
    layers = weight.shape[0]
    per_node = base.phy2log.reshape(layers * nodes, num_physical // nodes)
    weight_rows = np.repeat(weight, nodes, axis=0)
    count_rows = np.repeat(base.logcnt, nodes, axis=0)
    refined = _refine(per_node, weight_rows, count_rows, num_ranks // nodes)
    return Placement.from_phy2log(refined.reshape(layers, num_physical), weight.shape[1])


def rebalance_balanced(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
                       current: Placement | None = None) -> Placement:
    """Global replication and greedy packing, then swaps across all GPUs (ignores node locality)."""
    weight = check_shape(load, num_physical, num_groups, num_nodes, num_ranks)
    slot2log, count = replicate_experts(weight, num_physical)
    replica_load = np.take_along_axis(weight / count, slot2log, axis=1)
    rank_of_slot, pos_in_rank = balanced_packing(replica_load, num_ranks)
    phy2log = np.empty_like(slot2log)
    np.put_along_axis(phy2log, rank_of_slot * (num_physical // num_ranks) + pos_in_rank, slot2log, axis=1)
    return Placement.from_phy2log(_refine(phy2log, weight, count, num_ranks), weight.shape[1])


def _shift_counts(weight: np.ndarray, count: np.ndarray, tolerance: float) -> np.ndarray:
    """Move replicas from cold to hot experts while that lowers the max load per replica by > ``tolerance``."""
    count = count.copy()
    rows = np.arange(weight.shape[0])
    for _ in range(int(count.sum(1).max())):
        per_replica = weight / count
        hot = per_replica.argmax(1)
        drop = np.where(count > 1, weight / np.maximum(count - 1, 1), np.inf)
        cold = drop.argmin(1)
        improve = drop[rows, cold] < per_replica[rows, hot] * (1 - tolerance)
        if not improve.any():
            break
        r = rows[improve]
        count[r, hot[improve]] += 1
        count[r, cold[improve]] -= 1
    return count


def rebalance_sticky(load, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
                     current: Placement | None = None, tolerance: float = 0.01) -> Placement:
    """Minimal migration: reach ``default``'s max GPU load (within ``tolerance``) moving few experts.

    From ``current`` (vLLM's start-up placement when None): replica counts move from
    cold to hot experts only where that lowers the max load per replica; dropped
    replicas leave the heaviest GPUs; new replicas land on the lightest GPUs with a free
    slot; then swaps between the heaviest GPU and another run only until the max GPU
    load is within ``tolerance`` of what ``default`` reaches.
    """
    weight = check_shape(load, num_physical, num_groups, num_nodes, num_ranks)
    layers, num_logical = weight.shape
    if current is None:
        current = Placement.linear(layers, num_logical, num_physical)
    if current.phy2log.shape != (layers, num_physical) or current.num_logical != num_logical:
        raise TopologyError(
            f"current placement has shape {current.phy2log.shape} for {current.num_logical} experts; "
            f"expected ({layers}, {num_physical}) for {num_logical}"
        )
    target = rebalance(weight, num_physical, num_groups, num_nodes, num_ranks).rank_loads(weight, num_ranks).max(1)
    count = _shift_counts(weight, current.logcnt, tolerance)
    items = current.rank_experts(num_ranks).copy()
    per_replica = weight / count
    for layer in np.nonzero((count != current.logcnt).any(1))[0]:
        _move_replicas(items[layer], current.logcnt[layer], count[layer], per_replica[layer])
    phy2log = items.reshape(layers, num_physical)
    return Placement.from_phy2log(_refine(phy2log, weight, count, num_ranks, target * (1 + tolerance)), num_logical)


def _move_replicas(items: np.ndarray, old_count: np.ndarray, new_count: np.ndarray, per_replica: np.ndarray) -> None:
    """In place on one layer's ``items[ranks, slots]``: drop surplus replicas, place missing ones."""
    slot_load = per_replica[items]
    rank_load = slot_load.sum(1)
    for expert in np.nonzero(old_count > new_count)[0]:
        ranks, slots = np.nonzero(items == expert)
        for k in np.argsort(-rank_load[ranks], kind="stable")[: old_count[expert] - new_count[expert]]:
            items[ranks[k], slots[k]] = -1
            rank_load[ranks[k]] -= per_replica[expert]
    missing = np.repeat(np.arange(new_count.size), (new_count - old_count).clip(0))
    for expert in missing[np.argsort(-per_replica[missing], kind="stable")]:
        free_ranks, free_slots = np.nonzero(items == -1)
        k = rank_load[free_ranks].argmin()
        items[free_ranks[k], free_slots[k]] = expert
        rank_load[free_ranks[k]] += per_replica[expert]


POLICIES: dict[str, Policy] = {
    "default": rebalance,
    "global": rebalance_global,
    "refined": rebalance_refined,
    "balanced": rebalance_balanced,
    "sticky": rebalance_sticky,
}


def get_policy(name: str) -> Policy:
    """The policy registered under ``name``; a clear error lists the others."""
    if name not in POLICIES:
        raise TopologyError(f"policy={name!r} is not an EPLB policy; allowed: {', '.join(POLICIES)}")
    return POLICIES[name]
