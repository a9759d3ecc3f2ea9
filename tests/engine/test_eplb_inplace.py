"""EPLB rearrangements rewrite expert weights and routing maps in place (issue 19): every tensor a captured CUDA
graph reads keeps its storage, so the graphs stay valid and nothing is dropped or re-captured while serving.

The first test runs ``Rebalancer.rebalance`` in-process on the tiny model's layers (CPU); the second checks that greedy
tokens with EPLB rearranging during generation are those without EPLB, every step a padded graph step
(``EPKIT_CUDA_GRAPHS=emulate``: the graph-step path without the capture, on CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from test_eplb import EPLB, SKEW, generate


def _tensors(layer) -> dict[str, torch.Tensor]:
    """Every expert / routing-map / load tensor of one MoE layer that a captured step reads."""
    experts = layer["experts"]
    return {"w13": experts.w13, "w2": experts.w2, "log2phy": experts.map.log2phy, "logcnt": experts.map.logcnt,
            "load": experts.load}


def _skewed_load(rebalancer, seed: int) -> None:
    """A window whose load is concentrated on a few (per layer different) experts: the policy must move them."""
    gen = torch.Generator().manual_seed(seed)
    for pos in range(rebalancer.num_layers):
        load = torch.rand(rebalancer.num_experts, generator=gen)
        hot = torch.randperm(rebalancer.num_experts, generator=gen)[:3]
        load[hot] += 50.0
        rebalancer.window[:, pos] = load


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_rearrangement_rewrites_weights_and_maps_in_place(ep_rank):
    from epkit.engine.model import ModelConfig, Weights, read_model_config
    from epkit.engine.moe import ExpertRanges, LocalExperts, ReplicatedExpertMap
    from epkit.engine.rebalance import Rebalancer, resolve_eplb_config

    cfg = ModelConfig.from_dict(read_model_config("epkit-tiny-moe")[0])
    cpu, ep = torch.device("cpu"), 2
    eplb = resolve_eplb_config({"num_redundant_experts": 4, "window_size": 4, "step_interval": 8}, cfg.num_experts, ep)
    rebalancer = Rebalancer(eplb, len(cfg.moe_layers), cfg.num_experts, ep, ep_rank, 1, cpu, lambda t: t)
    weights = Weights(cfg, ExpertRanges(cfg.num_experts, ep, ep_rank), 0, cpu, torch.float32, None,
                      rebalancer.local_experts)
    indices = [i for i, layer in enumerate(weights.layers) if "experts" in layer]
    layers = [weights.layers[i] for i in indices]
    for layer in layers:
        rebalancer.attach(layer["experts"], layer["moe_pos"])
    objects = [(layer["experts"], layer["experts"].map) for layer in layers]
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    slots = torch.arange(16) % rebalancer.slots_per_rank
    for layer in layers:  # run once: the CPU path caches each weight's fixed-point copy, which must not go stale
        layer["experts"](x, slots)
    ptrs = [{k: t.data_ptr() for k, t in _tensors(layer).items()} for layer in layers]
    width = cfg.num_experts + 4 - cfg.num_experts + 1  # num_physical - num_logical + 1
    built: list[int] = []  # how many slots each build call made (only the changed ones)

    def build(i: int, ids: list[int]) -> LocalExperts:
        built.append(len(ids))
        return weights.build_experts(i, ids)

    for seed in (1, 2):  # two rearrangements with different loads: replica counts and log2phy's used width change
        before = [rebalancer.local_experts(pos) for pos in range(rebalancer.num_layers)]
        _skewed_load(rebalancer, seed)
        built.clear()
        rebalancer.rebalance(weights.layers, build)
        after = [rebalancer.local_experts(pos) for pos in range(rebalancer.num_layers)]
        changed = sum(a != b for old, new in zip(before, after) for a, b in zip(old, new))
        assert changed > 0 and sum(built) == changed  # this rank's experts changed; only those slots were built
        assert int(rebalancer.placement.logcnt.max()) > 1  # hot experts got replicas
        for i, layer, (experts, emap), ptr in zip(indices, layers, objects, ptrs):
            assert layer["experts"] is experts and experts.map is emap
            assert {k: t.data_ptr() for k, t in _tensors(layer).items()} == ptr  # same storage: graphs stay valid
            pos = layer["moe_pos"]
            fresh = weights.build_experts(i, rebalancer.local_experts(pos))
            assert torch.equal(experts.w13, fresh.w13) and torch.equal(experts.w2, fresh.w2)  # exact: copies
            assert torch.equal(experts(x, slots), fresh(x, slots))  # nothing derived from the old weights is used
            want = ReplicatedExpertMap(rebalancer.placement.log2phy[pos], rebalancer.placement.logcnt[pos],
                                       rebalancer.slots_per_rank, cpu)
            assert tuple(emap.log2phy.shape) == (cfg.num_experts, width)
            assert torch.equal(emap.logcnt, want.logcnt)
            used = want.log2phy.shape[1]
            assert torch.equal(emap.log2phy[:, :used], want.log2phy) and bool((emap.log2phy[:, used:] == -1).all())
            ids = torch.arange(cfg.num_experts).repeat(5).view(-1, 4)  # every expert, every replica
            for got, expected in zip(emap.locate(ids), want.locate(ids)):
                assert torch.equal(got, expected)
    assert rebalancer.num_rebalances == 2
    assert np.array_equal(rebalancer.maps[-1][1], rebalancer.placement.phy2log)


def test_greedy_tokens_with_eplb_on_graph_steps_match_without(deploy, monkeypatch):
    """Greedy output with EPLB rearranging while generating equals the output without EPLB, with every step a padded
    graph step: the steps read the experts' weights and maps after each in-place rearrangement."""
    monkeypatch.setenv("EPKIT_CUDA_GRAPHS", "emulate")
    plain = deploy(["-dp", "2", "--enable-expert-parallel", *SKEW])
    expected = generate(plain)
    eplb = deploy(["-dp", "2", "--enable-expert-parallel", *SKEW, *EPLB])
    assert generate(eplb) == expected
    eplb.stop()
    log = eplb.nodes[0].log()
    assert "EPLB rebalance 3 at step" in log  # the placement changed several times during generation
    padded, total = map(int, re.search(r"DP rank 0: (\d+) of (\d+) forward steps ran as emulated graph steps", log).groups())
    assert padded == total and padded >= 24, (padded, total)
    assert "dropping" not in log and "EPLB rearranged" not in log
