"""epkit's own policies against the default, and placement invariants, at DeepSeek-V3 scale."""

import numpy as np
import pytest

from epkit.eplb import (POLICIES, Placement, balancedness, experts_moved, get_policy, node_locality, popularity,
                        rebalance, routing_load, synthetic_routing)
from epkit.errors import TopologyError

LAYERS, EXPERTS, RANKS, NODES, GROUPS, SLOTS = 58, 256, 32, 4, 8, 288


@pytest.fixture(scope="module")
def dsv3_load():
    prob = popularity(LAYERS, EXPERTS, "zipf", 1.0, np.random.default_rng(7))
    return prob * 8192 * 8


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_returns_a_valid_placement(name, dsv3_load):
    p = POLICIES[name](dsv3_load, SLOTS, GROUPS, NODES, RANKS)
    assert p.phy2log.shape == (LAYERS, SLOTS)
    assert (p.logcnt >= 1).all() and (p.logcnt.sum(1) == SLOTS).all()
    # log2phy is the exact inverse of phy2log
    for layer in (0, LAYERS - 1):
        for e in range(EXPERTS):
            slots = p.log2phy[layer, e, : p.logcnt[layer, e]]
            assert (p.phy2log[layer, slots] == e).all()
            assert (p.log2phy[layer, e, p.logcnt[layer, e]:] == -1).all()
    # total load is conserved
    np.testing.assert_allclose(p.rank_loads(dsv3_load, RANKS).sum(1), dsv3_load.sum(1))


def test_default_is_a_pure_function_at_dsv3_scale(dsv3_load):
    """Same loads, same placement (its speed, < 100 ms here, is a benchmark: benchmarks/timing_targets.py)."""
    a = rebalance(dsv3_load, SLOTS, GROUPS, NODES, RANKS)
    b = rebalance(dsv3_load.copy(), SLOTS, GROUPS, NODES, RANKS)
    np.testing.assert_array_equal(a.phy2log, b.phy2log)
    np.testing.assert_array_equal(a.logcnt, b.logcnt)


def test_balanced_beats_hierarchical_and_reports_locality_cost():
    prob = popularity(LAYERS, EXPERTS, "zipf", 1.0, np.random.default_rng(3))
    routing = synthetic_routing(prob, 1024, 8, GROUPS, 4, seed=1)
    load = routing_load(routing, EXPERTS)
    default = rebalance(load, SLOTS, GROUPS, NODES, RANKS)
    balanced = POLICIES["balanced"](load, SLOTS, GROUPS, NODES, RANKS)
    b_default = balancedness(default.rank_loads(load, RANKS))
    b_balanced = balancedness(balanced.rank_loads(load, RANKS))
    assert b_balanced > b_default + 0.05  # node packing of groups caps the hierarchical policy
    loc_default = node_locality(default, routing, RANKS, NODES)
    loc_balanced = node_locality(balanced, routing, RANKS, NODES)
    # scattering groups over nodes means more nodes per token: the measured price
    assert loc_balanced["nodes_per_token"] > loc_default["nodes_per_token"]
    assert 0 < loc_default["remote_copy_fraction"] < 1


def test_refined_keeps_node_locality_and_never_loses(dsv3_load):
    default = rebalance(dsv3_load, SLOTS, GROUPS, NODES, RANKS)
    refined = POLICIES["refined"](dsv3_load, SLOTS, GROUPS, NODES, RANKS)
    node = np.arange(SLOTS) // (SLOTS // NODES)
    for layer in range(LAYERS):
        for n in range(NODES):
            assert sorted(default.phy2log[layer, node == n]) == sorted(refined.phy2log[layer, node == n])
    assert (refined.rank_loads(dsv3_load, RANKS).max(1) <= default.rank_loads(dsv3_load, RANKS).max(1) + 1e-9).all()


def test_sticky_moves_far_fewer_experts_for_near_same_balance(dsv3_load):
    rng = np.random.default_rng(0)
    current = rebalance(dsv3_load, SLOTS, GROUPS, NODES, RANKS)
    drifted = dsv3_load.copy()
    for layer in range(LAYERS):  # 5% of experts swap popularity
        idx = rng.choice(EXPERTS, 13, replace=False)
        drifted[layer, idx] = drifted[layer, rng.permutation(idx)]
    fresh = rebalance(drifted, SLOTS, GROUPS, NODES, RANKS, current=current)
    sticky = POLICIES["sticky"](drifted, SLOTS, GROUPS, NODES, RANKS, current=current)
    moved_fresh = experts_moved(current, fresh, RANKS).sum()
    moved_sticky = experts_moved(current, sticky, RANKS).sum()
    assert moved_sticky * 5 < moved_fresh
    target = fresh.rank_loads(drifted, RANKS).max(1)
    got = sticky.rank_loads(drifted, RANKS).max(1)
    assert (got <= target * 1.01 + 1e-9).mean() > 0.9  # within 1% of default on (nearly) every layer
    assert balancedness(sticky.rank_loads(drifted, RANKS)) > balancedness(current.rank_loads(drifted, RANKS))


def test_experts_moved_ignores_reordering_inside_a_rank():
    a = Placement.from_phy2log([[0, 1, 2, 3]])
    b = Placement.from_phy2log([[1, 0, 3, 2]])
    c = Placement.from_phy2log([[0, 2, 1, 3]])
    assert experts_moved(a, b, 2).tolist() == [0]
    assert experts_moved(a, c, 2).tolist() == [2]


def test_invalid_inputs_name_the_field_and_allowed_values():
    with pytest.raises(TopologyError, match=r"num_physical=259.*num_ranks=32.*valid num_redundant_experts.*0, 32, 64"):
        rebalance(np.ones((1, 256)), 259, 8, 4, 32)
    with pytest.raises(TopologyError, match=r"policy='nope'.*allowed: default, global, refined, balanced, sticky"):
        get_policy("nope")
    with pytest.raises(TopologyError, match="num_groups=3"):
        rebalance(np.ones((1, 256)), 256, 3, 1, 32)
    with pytest.raises(TopologyError, match="non-negative"):
        rebalance(-np.ones((1, 8)), 8, 1, 1, 2)


def test_accepts_cpu_torch_tensors():
    torch = pytest.importorskip("torch")
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]], dtype=torch.int64)
    p = rebalance(weight, 16, 4, 2, 8)
    assert p.rank_loads(weight, 8).max() == 156.0
