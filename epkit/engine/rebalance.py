"""EPLB inside the engine: record expert load, rebalance on vLLM's schedule, log and dump loads.

Placement math comes from :mod:`epkit.eplb` (vLLM's policies and its ``phy2log`` /
``log2phy`` / ``logcnt`` triple). Every DP rank records the logical expert load of its
own tokens per MoE layer on the device (no host sync); the ring of the last
``window_size`` steps is summed over ranks with one all-reduce when a rebalance is due.
All ranks then compute the same new placement (same input, deterministic policy) and
each re-materializes the expert weights of its changed slots from their source - the seed for
dummy weights, the checkpoint otherwise - since weights are a function of the logical
expert only. (vLLM instead copies weights between GPUs; the result is the same.) Like vLLM's,
the rearrangement is in place: the new slots' weights are copied into the layer's existing expert
tensors (one layer's changed slots built at a time) and the routing map's device tables are
rewritten (fixed width, :class:`~epkit.engine.moe.ReplicatedExpertMap`), so no tensor a captured
CUDA graph reads changes its storage and the graphs stay valid (none is dropped or re-captured).

Schedule and logging follow vLLM's ``EplbState.step`` (see ``docs/eplb.md``): the step counter
starts at ``step_interval - step_interval // 4`` (first rearrangement early), the balancedness
line (``EPLB step: %d for model %s: avg_tokens=…``) is logged by rank 0 when the counter is a
multiple of ``log_balancedness_interval``, then the counter advances and a rearrangement runs
when it reaches ``step_interval``. Each rank also counts the (token, expert) pairs its own
physical slots computed each step (``LocalExperts.load``) into a device ring of the last
``TRACE_STEPS`` steps, which the API server's ``GET /eplb/loads`` stitches into a trace.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from epkit.engine.moe import LocalExperts, ReplicatedExpertMap
from epkit.engine.config import check_eplb_values
from epkit.errors import EngineError

if TYPE_CHECKING:
    from epkit.eplb.placement import Placement

log = logging.getLogger("epkit.engine")

TRACE_STEPS = 1024  # per-step physical loads kept on each rank for the dump endpoint


def resolve_eplb_config(config: dict[str, Any], num_experts: int, ep_size: int) -> dict[str, Any]:
    """vLLM's defaults filled in; raises :class:`EngineError` naming the key, value and what is allowed."""
    from epkit.eplb.config import EPLB_DEFAULTS
    from epkit.eplb.policies import POLICIES

    check_eplb_values(config)
    values = {**EPLB_DEFAULTS, **config}
    if values["policy"] not in POLICIES:
        raise EngineError(f"eplb_config.policy={values['policy']!r}; allowed: {', '.join(POLICIES)}")
    redundant = values["num_redundant_experts"]
    if (num_experts + redundant) % ep_size:
        valid = [r for r in range(0, 4 * ep_size) if (num_experts + r) % ep_size == 0][:4]
        raise EngineError(
            f"eplb_config.num_redundant_experts={redundant}: {num_experts} experts + {redundant} = {num_experts + redundant} "
            f"physical experts is not divisible by EP size {ep_size}; valid values: {', '.join(map(str, valid))} …"
        )
    return values


class Rebalancer:
    """One rank's EPLB state: the placement in force, the load window, vLLM's step counter, the load trace."""

    def __init__(self, config: dict[str, Any], num_moe_layers: int, num_experts: int, ep_size: int, ep_rank: int,
                 num_nodes: int, device: torch.device, all_reduce: Callable[[torch.Tensor], torch.Tensor],
                 all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None, model_name: str = "model",
                 trace_steps: int = TRACE_STEPS):
        from epkit.eplb.placement import Placement

        self.config = config
        self.num_experts, self.ep_size, self.ep_rank, self.num_nodes = num_experts, ep_size, ep_rank, num_nodes
        self.num_layers = num_moe_layers
        self.num_physical = num_experts + config["num_redundant_experts"]
        self.slots_per_rank = self.num_physical // ep_size
        self.max_replicas = self.num_physical - num_experts + 1  # log2phy's fixed width: the most any placement gives
        self.device, self.all_reduce, self.all_gather = device, all_reduce, all_gather
        self.model_name = model_name
        self.placement = Placement.linear(num_moe_layers, num_experts, self.num_physical)
        self.window = torch.zeros((config["window_size"], num_moe_layers, num_experts), dtype=torch.float32, device=device)
        self.step_load = torch.zeros((num_moe_layers, num_experts), dtype=torch.float32, device=device)
        # (token, expert) pairs computed by this rank's slots in the current step; LocalExperts.load are its rows
        self.slot_load = torch.zeros((num_moe_layers, self.slots_per_rank), dtype=torch.float32, device=device)
        self.trace_steps = trace_steps
        self.trace = torch.zeros((trace_steps, num_moe_layers, self.slots_per_rank), dtype=torch.float32, device=device)
        self.maps: list[tuple[int, np.ndarray]] = [(0, self.placement.phy2log.copy())]  # (first step, phy2log)
        interval = config["step_interval"]
        self.counter = max(0, interval - interval // 4)  # vLLM: "initial progress of rearrangement to 3/4"
        self.steps = 0  # forward steps recorded (engine steps with tokens on any rank)
        self.num_rebalances = 0
        self.step_times: list[float] = []  # this rank's step durations since the last rearrangement
        self.stats: dict[str, Any] = {"rearrangements": 0}
        self.stats_version = 0

    def local_experts(self, moe_pos: int) -> list[int]:
        """Logical ids of this rank's slots in MoE layer ``moe_pos``, in slot order."""
        start = self.ep_rank * self.slots_per_rank
        return self.placement.phy2log[moe_pos, start : start + self.slots_per_rank].tolist()

    def expert_map(self, moe_pos: int) -> ReplicatedExpertMap:
        return ReplicatedExpertMap(self.placement.log2phy[moe_pos], self.placement.logcnt[moe_pos], self.slots_per_rank,
                                   self.device, width=self.max_replicas)

    def attach(self, experts: LocalExperts, moe_pos: int) -> None:
        """Point a layer's experts at this rank's routing map and slot-load row (once: :meth:`rebalance` then
        rewrites both in place)."""
        experts.map = self.expert_map(moe_pos)
        experts.load = self.slot_load[moe_pos]

    def record(self, moe_pos: int, ids: torch.Tensor, row_mask: torch.Tensor | None = None) -> None:
        """Add this step's routing of one MoE layer (``ids`` is ``[tokens, top_k]`` logical experts); no host sync.

        ``row_mask`` (``[tokens]``) marks the real rows of a padded step; padding rows count nothing."""
        flat = ids.reshape(-1)
        if row_mask is None:
            ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
        else:
            ones = row_mask.unsqueeze(1).expand(ids.shape).reshape(-1).to(torch.float32)
        self.step_load[moe_pos].index_add_(0, flat, ones)

    def load_buffers(self) -> list[torch.Tensor]:
        """The device tensors a forward step adds load to (saved and restored around a graph's warm-up run)."""
        return [self.step_load, self.slot_load]

    def end_step(self, layers: list[dict[str, Any]], build: Callable[[int, list[int]], LocalExperts],
                 step_time: float | None = None) -> None:
        """Close a forward step (vLLM's ``EplbState.step``): log, record, advance, maybe rearrange."""
        cfg = self.config
        if step_time is not None:
            self.step_times.append(step_time)
        if cfg["log_balancedness"] and self.counter % cfg["log_balancedness_interval"] == 0:
            self._log_step()
        self.window[self.steps % cfg["window_size"]] = self.step_load
        self.step_load.zero_()
        self.trace[self.steps % self.trace_steps] = self.slot_load
        self.slot_load.zero_()
        self.steps += 1
        self.counter += 1
        if self.counter >= cfg["step_interval"]:
            self.counter = 0
            self.rebalance(layers, build)

    def _rank_tokens(self) -> torch.Tensor:
        """``[ranks, layers]`` tokens computed by each rank's slots this step (one all-gather)."""
        mine = self.slot_load.sum(-1, keepdim=True).T.contiguous()  # [1, L]
        if self.all_gather is None or self.ep_size == 1:
            return mine
        return self.all_gather(mine)

    def _log_step(self) -> None:
        per_rank = self._rank_tokens().double()  # [ranks, L]
        avg = float(per_rank.mean(0).sum())
        peak = float(per_rank.max(0).values.sum())
        value = avg / peak if peak > 0 else 0.0
        self._set_stats(balancedness=value, avg_tokens=avg, max_tokens=peak, eplb_step=self.counter,
                        rank_tokens=per_rank.sum(1).tolist())
        if self.ep_rank == 0:
            log.info("EPLB step: %d for model %s: avg_tokens=%.2f, max_tokens=%d, balancedness=%.4f, "
                     "steps until the next rearrangement: %d", self.counter, self.model_name, avg, peak, value,
                     self.config["step_interval"] - self.counter)

    def _set_stats(self, **values: Any) -> None:
        self.stats.update(values)
        self.stats_version += 1

    def rebalance(self, layers: list[dict[str, Any]], build: Callable[[int, list[int]], LocalExperts]) -> None:
        from epkit.eplb.placement import balancedness
        from epkit.eplb.policies import get_policy

        start = time.perf_counter()
        load = self.all_reduce(self.window.sum(0)).double().cpu().numpy()
        old = self.placement
        new = get_policy(self.config["policy"])(load, self.num_physical, 1, self.num_nodes, self.ep_size, current=old)
        moe_layers = [layer for layer in layers if "experts" in layer]
        self.placement = new
        changed = sum(self._rewrite_layer(layer_index, layer, old, build)
                      for layer_index, layer in enumerate(layers) if "experts" in layer)
        self.maps.append((self.steps, new.phy2log.copy()))
        self.maps = [m for i, m in enumerate(self.maps) if i + 1 == len(self.maps) or self.maps[i + 1][0] > self.steps - self.trace_steps]
        self.num_rebalances += 1
        elapsed = time.perf_counter() - start
        before = balancedness(old.rank_loads(load, self.ep_size))
        after = balancedness(new.rank_loads(load, self.ep_size))
        times = self.step_times
        median_ms = statistics.median(times) * 1e3 if times else float("nan")
        self._set_stats(rearrangements=self.num_rebalances, window_balancedness_before=before,
                        window_balancedness_after=after, median_step_ms=median_ms)
        message = ("EPLB rebalance %d at step %d (policy %s): %d of %d MoE layers changed on this rank in %.2f s; "
                   "median step %.2f ms over the %d steps since the last rearrangement")
        args = [self.num_rebalances, self.steps, self.config["policy"], changed, len(moe_layers), elapsed, median_ms, len(times)]
        self.step_times = []
        if self.config["log_balancedness"]:
            message += "; window balancedness %.3f -> %.3f"
            args += [before, after]
        log.info(message, *args)
        if self.ep_rank == 0:
            log.info("Rearranged experts %s in %.2f s.", " ", elapsed)

    def _rewrite_layer(self, layer_index: int, layer: dict[str, Any], old: "Placement",
                       build: Callable[[int, list[int]], LocalExperts]) -> bool:
        """Bring one MoE layer to the placement in force, in place; whether this rank's slots changed.

        Only the slots whose logical expert changed are built (one layer's worth at most) and copied into the
        existing expert tensors; the routing map's device tables are rewritten whether or not this rank's slots
        changed (other ranks' slots may have)."""
        pos = layer["moe_pos"]
        experts: LocalExperts = layer["experts"]
        ids = self.local_experts(pos)
        start_slot = self.ep_rank * self.slots_per_rank
        before = old.phy2log[pos, start_slot : start_slot + self.slots_per_rank].tolist()
        slots = [s for s, (a, b) in enumerate(zip(before, ids)) if a != b]
        if slots:
            experts.replace_slots(slots, build(layer_index, [ids[s] for s in slots]))
        if isinstance(experts.map, ReplicatedExpertMap):
            experts.map.update(self.placement.log2phy[pos], self.placement.logcnt[pos])
        else:  # not attached yet (a caller that built its layers by hand)
            self.attach(experts, pos)
        return bool(slots)

    def dump(self) -> dict[str, Any]:
        """This rank's slot loads of the last recorded steps (oldest first) and the maps in force."""
        count = min(self.steps, self.trace_steps)
        first = self.steps - count
        rows = [(first + i) % self.trace_steps for i in range(count)]
        load = self.trace[rows].cpu().numpy() if count else np.zeros((0, self.num_layers, self.slots_per_rank), np.float32)
        return {"rank": self.ep_rank, "steps": list(range(first, self.steps)), "load": load,
                "maps": [(step, m.tolist()) for step, m in self.maps], "num_logical_experts": self.num_experts,
                "num_physical_experts": self.num_physical, "slots_per_rank": self.slots_per_rank,
                "config": {k: v for k, v in self.config.items()}}
