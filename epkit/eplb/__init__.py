"""EPLB: placement policies with vLLM's inputs and outputs, balancedness, and a what-if simulator.

Pure functions over numpy arrays (CPU torch tensors are accepted wherever an array is):
the built-in engine calls :func:`rebalance` (or any entry of :data:`POLICIES`) with the
window's ``load[layers, experts]`` and applies the returned :class:`Placement`.
"""

from epkit.eplb.locality import node_locality, routing_load, synthetic_routing
from epkit.eplb.placement import Placement, balancedness, bytes_moved, experts_moved, rank_loads
from epkit.eplb.policies import POLICIES, Policy, get_policy, rebalance
from epkit.eplb.readers import read_trace, read_vllm_log, write_trace
from epkit.eplb.reference import load_reference_cases
from epkit.eplb.simulate import simulate
from epkit.eplb.traces import Trace, popularity, synthetic_trace

__all__ = [
    "POLICIES", "Placement", "Policy", "Trace", "balancedness", "bytes_moved", "experts_moved", "get_policy",
    "load_reference_cases", "node_locality", "popularity", "rank_loads", "read_trace", "read_vllm_log",
    "rebalance", "routing_load", "simulate", "synthetic_routing", "synthetic_trace", "write_trace",
]
