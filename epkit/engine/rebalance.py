"""EPLB inside the engine: record expert load, rebalance every ``step_interval`` steps.

Placement math comes from :mod:`epkit.eplb` (vLLM's policies and its ``phy2log`` /
``log2phy`` / ``logcnt`` triple). Every DP rank records the logical expert load of its
own tokens per MoE layer on the device (no host sync); the ring of the last
``window_size`` steps is summed over ranks with one all-reduce when a rebalance is due.
All ranks then compute the same new placement (same input, deterministic policy) and
each re-materializes the expert weights of its new slots from their source - the seed for
dummy weights, the checkpoint otherwise - since weights are a function of the logical
expert only. (vLLM instead copies weights between GPUs; the result is the same.)
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch

from epkit.engine.moe import LocalExperts, ReplicatedExpertMap
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

EPLB_DEFAULTS = {"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 0,
                 "log_balancedness": False, "use_async": False, "policy": "default"}


def resolve_eplb_config(config: dict[str, Any], num_experts: int, ep_size: int) -> dict[str, Any]:
    """vLLM's defaults filled in; raises :class:`EngineError` naming the key, value and what is allowed."""
    from epkit.eplb.policies import POLICIES

    values = {**EPLB_DEFAULTS, **config}
    for key in ("window_size", "step_interval"):
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 1:
            raise EngineError(f"eplb_config.{key}={values[key]!r} must be an integer >= 1")
    redundant = values["num_redundant_experts"]
    if isinstance(redundant, bool) or not isinstance(redundant, int) or redundant < 0:
        raise EngineError(f"eplb_config.num_redundant_experts={redundant!r} must be an integer >= 0")
    for key in ("log_balancedness", "use_async"):
        if not isinstance(values[key], bool):
            raise EngineError(f"eplb_config.{key}={values[key]!r} must be true or false")
    if values["policy"] not in POLICIES:
        raise EngineError(f"eplb_config.policy={values['policy']!r}; allowed: {', '.join(POLICIES)}")
    if (num_experts + redundant) % ep_size:
        valid = [r for r in range(0, 4 * ep_size) if (num_experts + r) % ep_size == 0][:4]
        raise EngineError(
            f"eplb_config.num_redundant_experts={redundant}: {num_experts} experts + {redundant} = {num_experts + redundant} "
            f"physical experts is not divisible by EP size {ep_size}; valid values: {', '.join(map(str, valid))} …"
        )
    return values


class Rebalancer:
    """One rank's EPLB state: the placement in force, the load window, the step counter."""

    def __init__(self, config: dict[str, Any], num_moe_layers: int, num_experts: int, ep_size: int, ep_rank: int,
                 num_nodes: int, device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        from epkit.eplb.placement import Placement

        self.config = config
        self.num_experts, self.ep_size, self.ep_rank, self.num_nodes = num_experts, ep_size, ep_rank, num_nodes
        self.num_physical = num_experts + config["num_redundant_experts"]
        self.slots_per_rank = self.num_physical // ep_size
        self.device, self.all_reduce = device, all_reduce
        self.placement = Placement.linear(num_moe_layers, num_experts, self.num_physical)
        self.window = torch.zeros((config["window_size"], num_moe_layers, num_experts), dtype=torch.float32, device=device)
        self.step_load = torch.zeros((num_moe_layers, num_experts), dtype=torch.float32, device=device)
        self.steps = 0
        self.num_rebalances = 0

    def local_experts(self, moe_pos: int) -> list[int]:
        """Logical ids of this rank's slots in MoE layer ``moe_pos``, in slot order."""
        start = self.ep_rank * self.slots_per_rank
        return self.placement.phy2log[moe_pos, start : start + self.slots_per_rank].tolist()

    def expert_map(self, moe_pos: int) -> ReplicatedExpertMap:
        return ReplicatedExpertMap(self.placement.log2phy[moe_pos], self.placement.logcnt[moe_pos], self.slots_per_rank,
                                   self.device)

    def record(self, moe_pos: int, ids: torch.Tensor) -> None:
        """Add this step's routing of one MoE layer (``ids`` is ``[tokens, top_k]`` logical experts)."""
        self.step_load[moe_pos] += torch.bincount(ids.reshape(-1), minlength=self.num_experts).float()

    def end_step(self, layers: list[dict[str, Any]], build: Callable[[int, list[int]], LocalExperts]) -> None:
        """Close a forward step; every ``step_interval`` steps, rebalance and rebuild changed layers."""
        self.window[self.steps % self.config["window_size"]] = self.step_load
        self.step_load.zero_()
        self.steps += 1
        if self.steps % self.config["step_interval"] == 0:
            self.rebalance(layers, build)

    def rebalance(self, layers: list[dict[str, Any]], build: Callable[[int, list[int]], LocalExperts]) -> None:
        from epkit.eplb.placement import balancedness
        from epkit.eplb.policies import get_policy

        start = time.perf_counter()
        load = self.all_reduce(self.window.sum(0)).double().cpu().numpy()
        old = self.placement
        new = get_policy(self.config["policy"])(load, self.num_physical, 1, self.num_nodes, self.ep_size, current=old)
        moe_layers = [layer for layer in layers if "experts" in layer]
        changed = 0
        self.placement = new
        for layer_index, layer in enumerate(layers):
            if "experts" not in layer:
                continue
            pos = layer["moe_pos"]
            ids = self.local_experts(pos)
            start_slot = self.ep_rank * self.slots_per_rank
            if not np.array_equal(old.phy2log[pos, start_slot : start_slot + self.slots_per_rank], ids):
                layer["experts"] = build(layer_index, ids)
                changed += 1
            layer["experts"].map = self.expert_map(pos)
        self.num_rebalances += 1
        message = "EPLB rebalance %d at step %d (policy %s): %d of %d MoE layers changed on this rank in %.2f s"
        args = [self.num_rebalances, self.steps, self.config["policy"], changed, len(moe_layers), time.perf_counter() - start]
        if self.config["log_balancedness"]:
            message += "; balancedness %.3f -> %.3f"
            args += [balancedness(old.rank_loads(load, self.ep_size)), balancedness(new.rank_loads(load, self.ep_size))]
        log.info(message, *args)
