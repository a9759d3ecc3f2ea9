"""Node locality of a placement, measured on routing traces (which experts each token picked).

A token lives on the DP rank that serves it (token ``t`` on rank ``t % num_ranks``
unless told otherwise); each of its ``top_k`` expert copies goes to one replica of
the expert, chosen as vLLM spreads them: replica ``t % replica_count``. A copy whose
replica sits on another node crosses the inter-node network; with DeepEP-style
dispatch a token is sent once per remote node, so the distinct remote nodes per
token is the inter-node message count.
"""

from __future__ import annotations

import numpy as np

from epkit.eplb.placement import Placement, node_of_slot


def synthetic_routing(prob: np.ndarray, num_tokens: int, top_k: int, num_groups: int = 1,
                      topk_group: int | None = None, seed: int = 0) -> np.ndarray:
    """``[T, L, top_k]`` expert ids per token and layer, sampled from ``prob[L, E]``.

    Gumbel-top-k sampling without replacement; with ``topk_group`` set, routing is
    group-limited as in DeepSeek-V3: a token ranks groups by the sum of their two best
    expert scores and picks experts only inside its ``topk_group`` best groups.
    """
    prob = np.asarray(prob, dtype=np.float64)
    layers, num_experts = prob.shape
    if num_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide {num_experts} experts")
    rng = np.random.default_rng(seed)
    out = np.empty((num_tokens, layers, top_k), dtype=np.int64)
    log_p = np.log(np.maximum(prob, 1e-30)).astype(np.float32)
    for layer in range(layers):
        score = log_p[layer] + rng.gumbel(size=(num_tokens, num_experts)).astype(np.float32)
        if topk_group is not None and num_groups > 1 and topk_group < num_groups:
            grouped = score.reshape(num_tokens, num_groups, -1)
            best_two = -np.partition(-grouped, 1, axis=-1)[..., :2].sum(-1)
            dropped = np.argpartition(-best_two, topk_group, axis=-1)[:, topk_group:]
            np.put_along_axis(grouped, dropped[..., None], -np.inf, axis=1)
            score = grouped.reshape(num_tokens, num_experts)
        out[:, layer] = np.argpartition(-score, top_k - 1, axis=-1)[:, :top_k]
    return out


def routing_load(routing: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` token counts per expert from a ``[T, L, k]`` routing trace."""
    tokens, layers, k = routing.shape
    key = np.arange(layers)[None, :, None] * num_experts + routing
    return np.bincount(key.ravel(), minlength=layers * num_experts).reshape(layers, num_experts).astype(np.float64)


def node_locality(placement: Placement, routing: np.ndarray, num_ranks: int, num_nodes: int,
                  token_rank: np.ndarray | None = None) -> dict[str, float]:
    """Locality of ``placement`` under ``routing[T, L, k]``.

    Returns ``remote_copy_fraction`` (share of token→expert copies that leave the
    token's node), ``remote_nodes_per_token`` (distinct other nodes a token is sent to,
    per layer) and ``nodes_per_token`` (distinct nodes including its own when used).
    """
    routing = np.asarray(routing, dtype=np.int64)
    tokens, layers, _ = routing.shape
    if layers != placement.num_layers:
        raise ValueError(f"routing has {layers} layers, placement {placement.num_layers}")
    token_rank = np.arange(tokens) % num_ranks if token_rank is None else np.asarray(token_rank)
    token_node = token_rank // (num_ranks // num_nodes)
    layer = np.arange(layers)[None, :, None]
    replica = np.arange(tokens)[:, None, None] % placement.logcnt[layer, routing]
    slot = placement.log2phy[layer, routing, replica]
    node = node_of_slot(placement.num_physical, num_ranks, num_nodes)[slot]
    remote = node != token_node[:, None, None]
    hit = np.zeros((tokens, layers, num_nodes), dtype=bool)
    np.put_along_axis(hit, node, True, axis=2)
    used = hit.sum(-1)
    home = np.take_along_axis(hit, np.broadcast_to(token_node[:, None, None], (tokens, layers, 1)), axis=2)[..., 0]
    return {
        "remote_copy_fraction": float(remote.mean()),
        "remote_nodes_per_token": float((used - home).mean()),
        "nodes_per_token": float(used.mean()),
    }
