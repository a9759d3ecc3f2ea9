"""Checks that tie an :class:`~epkit.topology.eplb.EPLBConfig` to a model and an EP size, and the
EPLB keys and defaults the built-in engine reads (the key list itself is ``EPLBConfig``'s fields).
"""

from __future__ import annotations

from typing import Any

from epkit.errors import TopologyError
from epkit.topology.eplb import EPLB_COMMUNICATORS, EPLB_KEYS, EPLBConfig, valid_redundant_experts

__all__ = ["EPLB_COMMUNICATORS", "EPLB_DEFAULTS", "EPLB_KEYS", "EPLBConfig", "redundant_hint", "resolve",
           "valid_redundant"]

# The built-in engine's defaults: vLLM's (epkit's default target release), except that the engine
# rebalances synchronously between steps.
EPLB_DEFAULTS = {**EPLBConfig.DEFAULTS, "use_async": False}


def redundant_hint(num_experts: int, num_ranks: int, limit: int = 6) -> str:
    """'valid num_redundant_experts for EP=…: a, b, c …' for error messages."""
    values = ", ".join(map(str, valid_redundant_experts(num_experts, num_ranks, limit=limit)))
    return f"valid num_redundant_experts for {num_experts} experts on EP={num_ranks}: {values} …"


def valid_redundant(num_experts: int, num_ranks: int, limit: int = 8) -> list[int]:
    """The first ``limit`` ``num_redundant_experts`` values that make ``E + R`` divisible by ``num_ranks``."""
    return valid_redundant_experts(num_experts, num_ranks, limit=limit)


def resolve(config: Any, num_experts: int, num_ranks: int, num_nodes: int) -> dict[str, Any]:
    """Resolved EPLB settings (vLLM defaults filled in) after checking them against the deployment.

    ``config`` is an ``EPLBConfig``, a mapping of vLLM's keys, a JSON string or None.
    Raises :class:`~epkit.errors.TopologyError` naming the field, the value and what is allowed.
    """
    if config is None:
        config = EPLBConfig()
    elif isinstance(config, str):
        config = EPLBConfig.from_json(config)
    elif isinstance(config, dict):
        config = EPLBConfig.from_dict(config)
    elif not isinstance(config, EPLBConfig):
        raise TopologyError(f"config={config!r} must be an EPLBConfig, a mapping of its keys or a JSON string")
    for name, value in (("num_ranks", num_ranks), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TopologyError(f"{name}={value!r} must be a positive integer")
    if num_ranks % num_nodes:
        raise TopologyError(f"num_ranks={num_ranks} is not divisible by num_nodes={num_nodes}; every node holds the same number of EP ranks")
    values = config.resolved()
    redundant = values["num_redundant_experts"]
    if (num_experts + redundant) % num_ranks:
        raise TopologyError(
            f"eplb_config.num_redundant_experts={redundant}: {num_experts} experts + {redundant} = "
            f"{num_experts + redundant} physical experts is not divisible by EP size {num_ranks}; "
            f"{redundant_hint(num_experts, num_ranks)}"
        )
    return values
