"""The default policy against the reference outputs, and against an independent loop implementation."""

import numpy as np
import pytest

from epkit.eplb import POLICIES, Placement, balancedness, load_reference_cases, rebalance
from epkit.eplb.reference import score

CASES = load_reference_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_default_matches_reference(case):
    placement = rebalance(case["weight"], case["num_replicas"], case["num_groups"], case["num_nodes"], case["num_gpus"])
    got = score(case, placement)
    ref = case["reference"]
    np.testing.assert_allclose(got["max_gpu_load_per_layer"], ref["max_gpu_load_per_layer"], rtol=1e-9)
    assert got["balancedness"] == pytest.approx(ref["balancedness"], rel=1e-12)
    # replica counts are tie-free here, so they match exactly
    np.testing.assert_array_equal(placement.logcnt, ref["logcnt"])


@pytest.mark.parametrize("case", [c for c in CASES if c["linear_no_eplb"]], ids=lambda c: c["name"])
def test_no_eplb_baseline_matches_reference(case):
    weight = case["weight"]
    linear = Placement.linear(weight.shape[0], weight.shape[1], weight.shape[1])
    loads = linear.rank_loads(weight, case["num_gpus"])
    np.testing.assert_allclose(loads.max(1), case["linear_no_eplb"]["max_gpu_load_per_layer"])
    assert balancedness(loads) == pytest.approx(case["linear_no_eplb"]["balancedness"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_own_policies_never_lose_to_reference(case):
    ref = case["reference"]["balancedness"]
    args = (case["weight"], case["num_replicas"], case["num_groups"], case["num_nodes"], case["num_gpus"])
    assert score(case, POLICIES["balanced"](*args))["balancedness"] >= ref - 1e-12
    assert score(case, POLICIES["refined"](*args))["balancedness"] >= ref - 1e-12


# --- an independent, deliberately naive implementation of DeepSeek's algorithm -------------

def _pack(weights, packs):
    """Greedy: heaviest first to the lightest pack with room (first on ties); float32 sums."""
    per = len(weights) // packs
    load, items, out = [np.float32(0)] * packs, [[] for _ in range(packs)], [None] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        p = min((p for p in range(packs) if len(items[p]) < per), key=lambda p: load[p])
        load[p] = np.float32(load[p] + weights[i])
        out[i] = (p, len(items[p]))
        items[p].append(i)
    return out


def _naive_layer(w, physical, groups, nodes, gpus):
    w = np.asarray(w, dtype=np.float32)
    if groups % nodes:
        groups, nodes = 1, 1
    experts = len(w)
    gsize = experts // groups
    gload = [np.float32(w[g * gsize:(g + 1) * gsize].sum()) for g in range(groups)]
    node_groups = [[] for _ in range(nodes)]
    for g, (node, _) in sorted(enumerate(_pack(gload, nodes)), key=lambda x: x[1]):
        node_groups[node].append(g)
    gpu_loads = []
    for node in range(nodes):
        members = [g * gsize + j for g in node_groups[node] for j in range(gsize)]
        count = {e: 1 for e in members}
        replicas = list(members)
        for _ in range(physical // nodes - len(members)):
            hot = max(members, key=lambda e: (w[e] / np.float32(count[e]), -members.index(e)))
            count[hot] += 1
            replicas.append(hot)
        rload = [np.float32(w[e] / np.float32(count[e])) for e in replicas]
        per_gpu = [0.0] * (gpus // nodes)
        for r, (gpu, _) in enumerate(_pack(rload, gpus // nodes)):
            per_gpu[gpu] += float(w[replicas[r]]) / count[replicas[r]]
        gpu_loads += per_gpu
    return max(gpu_loads)


@pytest.mark.parametrize("seed,experts,physical,groups,nodes,gpus", [
    (0, 16, 16, 4, 2, 4), (1, 32, 40, 4, 2, 8), (2, 24, 30, 3, 2, 6), (3, 64, 72, 8, 4, 8),
    (4, 48, 64, 1, 1, 8), (5, 32, 48, 8, 2, 8), (6, 60, 66, 6, 4, 6),
])
def test_default_matches_naive_implementation_on_unseen_cases(seed, experts, physical, groups, nodes, gpus):
    rng = np.random.default_rng(seed)
    # integer loads with many ties, plus a few hot experts
    weight = rng.integers(0, 50, size=(3, experts)) * rng.choice([1, 1, 1, 20], size=(3, experts))
    placement = rebalance(weight, physical, groups, nodes, gpus)
    got = placement.rank_loads(weight, gpus).max(1)
    want = [_naive_layer(row, physical, groups, nodes, gpus) for row in weight]
    np.testing.assert_allclose(got, want, rtol=1e-9)
