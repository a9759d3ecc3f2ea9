"""The three numeric building blocks of every policy, vectorised over rows (layers).

* :func:`balanced_packing` - greedy "heaviest item to the lightest non-full pack",
  every pack taking exactly ``n / num_packs`` items (DeepSeek EPLB's packing);
* :func:`replicate_experts` - give spare slots one by one to the expert with the
  highest load per replica (DeepSeek EPLB's replication);
* :func:`refine_swaps` - epkit's local search: swap one item of the heaviest pack
  with one item of another pack while that lowers the heaviest pack.

Rows are independent, so each loop runs over items (or spare slots, or swaps)
while numpy works on all layers at once.
"""

from __future__ import annotations

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``weight[X, n]`` items into ``num_packs`` packs of ``n / num_packs`` items each.

    Items go heaviest first to the lightest pack that still has room; the first such
    pack wins a tie. Pack loads accumulate in ``weight``'s dtype (float32 reproduces
    DeepSeek's torch code bit for bit). Returns ``(pack_index[X, n], rank_in_pack[X, n])``.
    """
    rows_n, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    per_pack = n // num_packs
    if per_pack == 1:
        pack_index = np.tile(np.arange(n, dtype=np.int64), (rows_n, 1))
        return pack_index, np.zeros_like(pack_index)
    order = np.argsort(-weight, axis=1, kind="stable")
    rows = np.arange(rows_n)
    pack_index = np.empty((rows_n, n), dtype=np.int64)
    rank_in_pack = np.empty((rows_n, n), dtype=np.int64)
    pack_load = np.zeros((rows_n, num_packs), dtype=weight.dtype)
    pack_count = np.zeros((rows_n, num_packs), dtype=np.int64)
    full = np.zeros((rows_n, num_packs), dtype=bool)
    for j in range(n):
        item = order[:, j]
        pack = np.where(full, np.inf, pack_load).argmin(axis=1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_count[rows, pack]
        pack_load[rows, pack] += weight[rows, item]
        pack_count[rows, pack] += 1
        full[rows, pack] = pack_count[rows, pack] == per_pack
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Spread ``weight[X, n]`` over ``num_physical >= n`` replicas, minimising the max load per replica.

    Replica ``i < n`` is item ``i``; each spare replica goes to the item with the highest
    ``weight / count`` (first on ties). Returns ``(phy2item[X, num_physical], count[X, n])``.
    """
    rows_n, n = weight.shape
    if num_physical < n:
        raise ValueError(f"num_physical={num_physical} must be >= the {n} items")
    phy2item = np.tile(np.arange(num_physical, dtype=np.int64), (rows_n, 1))
    count = np.ones((rows_n, n), dtype=np.int64)
    rows = np.arange(rows_n)
    for slot in range(n, num_physical):
        hot = (weight / count.astype(weight.dtype)).argmax(axis=1)
        phy2item[:, slot] = hot
        count[rows, hot] += 1
    return phy2item, count


def refine_swaps(
    items: np.ndarray,
    item_load: np.ndarray,
    target: np.ndarray | None = None,
    max_swaps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower the heaviest pack of every row by pairwise swaps (local search).

    ``items[X, packs, per_pack]`` are item ids and ``item_load`` their loads. Each round,
    in every row still active, the swap between the heaviest pack and any other pack
    that gives the lowest max of the two new loads is applied if it lowers the heaviest
    pack. A row stops when no swap helps, when its heaviest pack is <= ``target[X]``,
    or after ``max_swaps`` swaps (default ``4 × packs × per_pack``). Returns the new
    ``(items, item_load)`` and leaves the inputs untouched.
    """
    items = items.copy()
    item_load = item_load.astype(np.float64, copy=True)
    rows_n, packs, per_pack = items.shape
    max_swaps = 4 * packs * per_pack if max_swaps is None else max_swaps
    active = np.arange(rows_n)
    for _ in range(max_swaps):
        if active.size == 0:
            break
        load = item_load[active]  # [A, packs, per_pack]
        pack_load = load.sum(-1)  # [A, packs]
        heavy = pack_load.argmax(-1)
        sel = np.arange(active.size)
        heavy_load = pack_load[sel, heavy]
        if target is not None:
            keep = heavy_load > target[active] * (1 + 1e-12)
            active, load, pack_load, heavy, heavy_load = active[keep], load[keep], pack_load[keep], heavy[keep], heavy_load[keep]
            sel = np.arange(active.size)
            if active.size == 0:
                break
        out = load[sel, heavy]  # [A, per_pack] candidates leaving the heavy pack
        delta = out[:, None, :, None] - load[:, :, None, :]  # [A, packs, out, in]
        pair_max = np.maximum(heavy_load[:, None, None, None] - delta, pack_load[:, :, None, None] + delta)
        pair_max[sel, heavy] = np.inf
        flat = pair_max.reshape(active.size, -1)
        best = flat.argmin(-1)
        gain = heavy_load - flat[sel, best]
        better = gain > 1e-9 * np.maximum(heavy_load, 1.0)
        if not better.any():
            break
        best, sel, heavy = best[better], sel[better], heavy[better]
        row = active[sel]
        other, i, j = np.unravel_index(best, (packs, per_pack, per_pack))
        a_id, b_id = items[row, heavy, i].copy(), items[row, other, j].copy()
        a_ld, b_ld = item_load[row, heavy, i].copy(), item_load[row, other, j].copy()
        items[row, heavy, i], items[row, other, j] = b_id, a_id
        item_load[row, heavy, i], item_load[row, other, j] = b_ld, a_ld
        active = row
    return items, item_load
