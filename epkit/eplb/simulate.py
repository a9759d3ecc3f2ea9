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

Two balancedness figures describe a rearrangement, and they differ by design:

* **window** (predicted): the load the policy was given - the sum of the last
  ``window_size`` steps - under the old and the new placement. The built-in engine logs
  these two (``window balancedness 0.597 -> 1.000``). The new placement is fitted to this
  very load, so "after" is an in-sample figure and often 1.000 on small models.
* **next** (realised): the mean per-step balancedness over the steps until the next
  rearrangement, under the placement kept (no rearrangement) and under the new one -
  what vLLM's per-step ``EPLB step: … balancedness=…`` lines show. Each step is a fresh
  sample of the routing, so it sits below the window figure.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from epkit.eplb.config import resolve
from epkit.eplb.placement import Placement, balancedness, experts_moved
from epkit.eplb.policies import get_policy
from epkit.eplb.traces import Trace

COLUMNS = ["step", "balancedness", "no_eplb_balancedness", "mean_rank_load", "max_rank_load", "logged",
           "rearranged", "experts_moved", "bytes_moved", "rebalance_ms", "window_balancedness_before",
           "window_balancedness_after", "next_steps", "next_balancedness_kept", "next_balancedness_new"]
# The columns a rearrangement row fills (NaN elsewhere); see the module docstring for window vs next.
EVENT_COLUMNS = ["step", "window_balancedness_before", "window_balancedness_after", "next_steps",
                 "next_balancedness_kept", "next_balancedness_new", "experts_moved", "bytes_moved", "rebalance_ms"]


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


def step_balancedness(load: np.ndarray, placement: Placement, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean[T], max[T])``: Σ over layers of the mean and the max rank load of each step of
    ``load[T, L, E]`` under ``placement`` (replicas share their expert's load evenly)."""
    steps_n, layers, _ = load.shape
    per_replica = load / placement.logcnt[None]
    slot = np.take_along_axis(per_replica, placement.phy2log[None], axis=2)
    rank = slot.reshape(steps_n, layers, num_ranks, -1).sum(-1)
    return rank.mean(-1).sum(-1), rank.max(-1).sum(-1)


def no_eplb_balancedness(load: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[T]`` per-step balancedness without EPLB: the ``E`` logical experts split over the
    ranks in contiguous blocks, no redundant slots (vLLM's expert map; the first ``E % ranks``
    ranks hold one expert more)."""
    blocks = np.array_split(np.asarray(load, dtype=np.float64), num_ranks, axis=2)
    rank = np.stack([b.sum(-1) for b in blocks], axis=-1)  # [T, L, ranks]
    return _ratio(rank.mean(-1).sum(-1), rank.max(-1).sum(-1))


def _ratio(mean: np.ndarray, peak: np.ndarray) -> np.ndarray:
    return np.where(peak > 0, mean / np.where(peak > 0, peak, 1), 0.0)


def _replay(load: np.ndarray, placement: Placement, rearranged: np.ndarray, rebalance, window: int,
            num_physical: int, num_groups: int, num_nodes: int, num_ranks: int) -> tuple[dict, Placement]:
    """Step through ``load`` segment by segment (a rearrangement ends a segment): per-step mean/max rank load
    under the placement of the time, and at each rearrangement what the policy saw, did and later realised.
    Returns the per-step arrays and the final placement."""
    steps_n = load.shape[0]
    out = {"mean": np.empty(steps_n), "max": np.empty(steps_n), "moved": np.zeros(steps_n, dtype=np.int64),
           **{k: np.full(steps_n, np.nan) for k in ("compute_ms", "window_before", "window_after", "next_steps",
                                                    "next_kept", "next_new")}}
    previous: Placement | None = None  # the placement before the last rearrangement
    bounds = np.unique(np.concatenate([[0], np.nonzero(rearranged)[0] + 1, [steps_n]]))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop > start:
            out["mean"][start:stop], out["max"][start:stop] = step_balancedness(load[start:stop], placement, num_ranks)
            if previous is not None:  # the realised effect of the rearrangement after step start - 1
                kept = _ratio(*step_balancedness(load[start:stop], previous, num_ranks))
                out["next_steps"][start - 1] = stop - start
                out["next_kept"][start - 1] = kept.mean()
                out["next_new"][start - 1] = _ratio(out["mean"][start:stop], out["max"][start:stop]).mean()
        if stop < steps_n or rearranged[stop - 1]:
            t = stop - 1
            window_load = load[max(0, t + 1 - window): t + 1].sum(0)
            began = time.perf_counter()
            new = rebalance(window_load, num_physical, num_groups, num_nodes, num_ranks, current=placement)
            out["compute_ms"][t] = (time.perf_counter() - began) * 1e3
            out["moved"][t] = experts_moved(placement, new, num_ranks).sum()
            out["window_before"][t] = balancedness(placement.rank_loads(window_load, num_ranks))
            out["window_after"][t] = balancedness(new.rank_loads(window_load, num_ranks))
            if t == steps_n - 1:
                out["next_steps"][t] = 0
            previous, placement = placement, new
    return out, placement


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
    rank load of that step), ``no_eplb_balancedness`` (the same step without EPLB, see
    :func:`no_eplb_balancedness`), ``mean_rank_load`` and ``max_rank_load`` (vLLM's
    ``avg_tokens``/``max_tokens``), ``logged`` (vLLM would log this step when
    ``log_balancedness`` is on), ``rearranged`` (a rearrangement ran after this step),
    ``experts_moved``, ``bytes_moved`` (NaN without ``bytes_per_expert``) and
    ``rebalance_ms`` (policy compute time). Rows where ``rearranged`` is true also hold
    ``window_balancedness_before``/``_after`` (the window the policy saw, under the old / new
    placement: predicted) and, over the ``next_steps`` steps until the next rearrangement,
    ``next_balancedness_kept``/``_new`` (mean per-step balancedness had the old placement
    stayed / under the new one: realised); NaN on other rows. ``df.attrs`` holds the
    settings and the final placement.
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
    steps, placement = _replay(load, placement, rearranged, rebalance, window, num_physical, num_groups, num_nodes,
                               num_ranks)
    mean_load, max_load, moved, compute_ms = steps["mean"], steps["max"], steps["moved"], steps["compute_ms"]
    window_before, window_after = steps["window_before"], steps["window_after"]
    next_steps, next_kept, next_new = steps["next_steps"], steps["next_kept"], steps["next_new"]
    frame = pd.DataFrame({
        "step": trace.step if isinstance(trace, Trace) else np.arange(steps_n),
        "balancedness": _ratio(mean_load, max_load),
        "no_eplb_balancedness": no_eplb_balancedness(load, num_ranks),
        "mean_rank_load": mean_load,
        "max_rank_load": max_load,
        "logged": logged & bool(values["log_balancedness"]),
        "rearranged": rearranged,
        "experts_moved": moved,
        "bytes_moved": moved * float(bytes_per_expert) if bytes_per_expert is not None else np.nan,
        "rebalance_ms": compute_ms,
        "window_balancedness_before": window_before,
        "window_balancedness_after": window_after,
        "next_steps": next_steps,
        "next_balancedness_kept": next_kept,
        "next_balancedness_new": next_new,
    }, columns=COLUMNS)
    frame.attrs.update(policy=policy_name, num_ranks=num_ranks, num_nodes=num_nodes, num_groups=num_groups,
                       num_physical=num_physical, eplb_config=values, final_placement=placement)
    return frame


def rearrangements(frame: pd.DataFrame) -> pd.DataFrame:
    """The rearrangement rows of a :func:`simulate` frame, with the columns that describe them."""
    return frame.loc[frame["rearranged"], EVENT_COLUMNS].reset_index(drop=True)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Two rows - no EPLB, then the simulated policy - over the whole trace: mean and min
    per-step balancedness, rearrangements, experts and bytes moved."""
    bytes_total = frame["bytes_moved"].sum(min_count=1)
    rows = [
        {"run": "no EPLB", "mean_balancedness": frame["no_eplb_balancedness"].mean(),
         "min_balancedness": frame["no_eplb_balancedness"].min(), "rearrangements": 0, "experts_moved": 0,
         "bytes_moved": 0.0 if pd.notna(bytes_total) else np.nan},
        {"run": f"EPLB {frame.attrs.get('policy', '?')}", "mean_balancedness": frame["balancedness"].mean(),
         "min_balancedness": frame["balancedness"].min(), "rearrangements": int(frame["rearranged"].sum()),
         "experts_moved": int(frame["experts_moved"].sum()), "bytes_moved": bytes_total},
    ]
    return pd.DataFrame(rows)
