"""Replay a load trace through vLLM's EPLB schedule and a policy: one DataFrame row per step.

The schedule follows vLLM's ``EplbState`` (``vllm/distributed/eplb/eplb_state.py``):

* the step counter starts at ``step_interval - step_interval // 4`` ("initial
  progress of rearrangement to 3/4"), so the first rearrangement comes after
  ``step_interval // 4`` steps (at least one), then every ``step_interval`` steps;
* each step's load enters a ring buffer of ``window_size`` steps (zeros at first);
  a rearrangement rebalances the buffer's sum and takes effect from the next step;
* a step is logged (``log_balancedness``) when the counter, before it is advanced,
  is a multiple of ``log_balancedness_interval``;
* ranks start from vLLM's linear placement with ``num_redundant_experts`` extra slots.

Loads are split evenly over an expert's replicas (vLLM spreads tokens by position
modulo the replica count). ``use_async`` is not modelled: the new placement is in
force from the next step in both modes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from epkit.eplb.config import resolve
from epkit.eplb.placement import Placement, experts_moved
from epkit.eplb.policies import get_policy
from epkit.eplb.traces import Trace

COLUMNS = ["step", "balancedness", "mean_rank_load", "max_rank_load", "logged", "rearranged",
           "experts_moved", "bytes_moved", "rebalance_ms"]


def schedule(num_steps: int, step_interval: int, log_interval: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(rearranged[T], logged[T])``: vLLM's counter logic over ``num_steps`` steps."""
    counter = max(0, step_interval - step_interval // 4)
    rearranged = np.zeros(num_steps, dtype=bool)
    logged = np.zeros(num_steps, dtype=bool)
    for t in range(num_steps):
        logged[t] = counter % log_interval == 0
        counter += 1
        if counter >= step_interval:
            counter = 0
            rearranged[t] = True
    return rearranged, logged


def simulate(
    trace: Trace | np.ndarray,
    config: Any = None,
    policy: str | None = None,
    *,
    num_ranks: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    bytes_per_expert: float | None = None,
    initial: Placement | None = None,
) -> pd.DataFrame:
    """Replay ``trace`` (``Trace`` or ``[T, L, E]`` logical loads) under ``config`` (an ``EPLBConfig``,
    its keys as a mapping, or the ``--eplb-config`` JSON) with ``policy`` (a key of
    :data:`~epkit.eplb.policies.POLICIES`; default: ``config.policy``).

    Returns one row per step: ``balancedness`` (vLLM's: Σ_layers mean ÷ Σ_layers max
    rank load of that step), ``mean_rank_load`` and ``max_rank_load`` (vLLM's
    ``avg_tokens``/``max_tokens``), ``logged`` (vLLM would log this step when
    ``log_balancedness`` is on), ``rearranged`` (a rearrangement ran after this step),
    ``experts_moved``, ``bytes_moved`` (NaN without ``bytes_per_expert``) and
    ``rebalance_ms`` (policy compute time). ``df.attrs`` holds the settings and the
    final placement.
    """
    load = trace.load if isinstance(trace, Trace) else np.asarray(trace)
    if load.ndim != 3:
        raise ValueError(f"trace must have shape [steps, layers, experts]; got shape {load.shape}")
    steps_n, layers, num_logical = load.shape
    values = resolve(config, num_logical, num_ranks, num_nodes)
    policy_name = policy if policy is not None else values["policy"]
    rebalance = get_policy(policy_name)
    num_physical = num_logical + values["num_redundant_experts"]
    window, interval = values["window_size"], values["step_interval"]
    placement = initial if initial is not None else Placement.linear(layers, num_logical, num_physical)
    if placement.phy2log.shape != (layers, num_physical):
        raise ValueError(f"initial placement has shape {placement.phy2log.shape}; expected ({layers}, {num_physical})")

    rearranged, logged = schedule(steps_n, interval, values["log_balancedness_interval"])
    mean_load = np.empty(steps_n)
    max_load = np.empty(steps_n)
    moved = np.zeros(steps_n, dtype=np.int64)
    compute_ms = np.full(steps_n, np.nan)
    bounds = np.unique(np.concatenate([[0], np.nonzero(rearranged)[0] + 1, [steps_n]]))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            per_replica = load[start:stop] / placement.logcnt[None]
            slot = np.take_along_axis(per_replica, placement.phy2log[None], axis=2)
            rank = slot.reshape(stop - start, layers, num_ranks, -1).sum(-1)
            mean_load[start:stop] = rank.mean(-1).sum(-1)
            max_load[start:stop] = rank.max(-1).sum(-1)
        if stop < steps_n or rearranged[stop - 1]:
            t = stop - 1
            window_load = load[max(0, t + 1 - window): t + 1].sum(0)
            began = time.perf_counter()
            new = rebalance(window_load, num_physical, num_groups, num_nodes, num_ranks, current=placement)
            compute_ms[t] = (time.perf_counter() - began) * 1e3
            moved[t] = experts_moved(placement, new, num_ranks).sum()
            placement = new
    with np.errstate(invalid="ignore", divide="ignore"):
        balance = np.where(max_load > 0, mean_load / np.where(max_load > 0, max_load, 1), 0.0)
    frame = pd.DataFrame({
        "step": trace.step if isinstance(trace, Trace) else np.arange(steps_n),
        "balancedness": balance,
        "mean_rank_load": mean_load,
        "max_rank_load": max_load,
        "logged": logged & bool(values["log_balancedness"]),
        "rearranged": rearranged,
        "experts_moved": moved,
        "bytes_moved": moved * float(bytes_per_expert) if bytes_per_expert is not None else np.nan,
        "rebalance_ms": compute_ms,
    }, columns=COLUMNS)
    frame.attrs.update(policy=policy_name, num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                       num_physical=num_physical, eplb_config=values, final_placement=placement)
    return frame
