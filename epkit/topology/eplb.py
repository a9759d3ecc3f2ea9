"""EPLBConfig: vLLM's ``--eplb-config`` keys, typed and self-checking — the one list of EPLB keys.

The built-in engine takes the same keys (``epkit.eplb.config`` hands them to it), and vLLM's
defaults per release come from :mod:`epkit.vllm.versions`. What ties a config to a model and an
EP size (``E + R`` divisible by the EP size) is :func:`valid_redundant_experts` here and
:func:`epkit.eplb.config.resolve`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology.checks import check_bool, check_int, json_object
from epkit.vllm import versions as vllm_versions

EPLB_COMMUNICATORS = ("torch_nccl", "torch_gloo", "torch_xccl", "nixl", "pynccl")


@dataclass(frozen=True)
class EPLBConfig:
    """vLLM's ``--eplb-config``. ``None`` means "vLLM's default" and is not rendered,
    so a config renders exactly the keys its author set (as in the seed's examples)."""

    window_size: int | None = None
    step_interval: int | None = None
    num_redundant_experts: int | None = None
    log_balancedness: bool | None = None
    log_balancedness_interval: int | None = None
    use_async: bool | None = None
    policy: str | None = None
    communicator: str | None = None
    enable_migration_batching: bool | None = None

    # The defaults of epkit's default target release (epkit.vllm.versions has every release's).
    DEFAULTS = dict(vllm_versions.release(vllm_versions.DEFAULT_VLLM_VERSION).eplb_keys)

    def __post_init__(self) -> None:
        owner = "eplb_config"
        for name in ("window_size", "step_interval", "log_balancedness_interval"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), 1)
        if self.num_redundant_experts is not None:
            check_int(owner, "num_redundant_experts", self.num_redundant_experts, 0)
        for name in ("log_balancedness", "use_async", "enable_migration_batching"):
            if getattr(self, name) is not None:
                check_bool(owner, name, getattr(self, name))
        if self.policy is not None and (not isinstance(self.policy, str) or not self.policy):
            raise TopologyError(f"{owner}.policy={self.policy!r} must be a policy name such as 'default'")
        if self.communicator is not None and self.communicator not in EPLB_COMMUNICATORS:
            raise TopologyError(
                f"{owner}.communicator={self.communicator!r}; allowed: {', '.join(EPLB_COMMUNICATORS)}"
            )

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "EPLBConfig":
        """Build from a mapping with vLLM's keys; unknown keys list every valid one."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise TopologyError(
                f"eplb_config has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(cls.keys())}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "EPLBConfig":
        """Parse the ``--eplb-config '{…}'`` JSON string."""
        data = json_object("eplb_config", text, "'{\"window_size\": 1000}'")
        return cls.from_dict(data)

    def explicit(self) -> dict[str, Any]:
        """The keys set by the user, in vLLM's documented order."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def resolved(self, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every key with the user's value or the (given release's) default."""
        base = dict(self.DEFAULTS if defaults is None else defaults)
        base.update(self.explicit())
        return base

    @property
    def redundant(self) -> int:
        return self.num_redundant_experts or 0

    def to_json(self) -> str:
        return json.dumps(self.explicit(), separators=(",", ":"))


EPLB_KEYS = tuple(EPLBConfig.keys())


def valid_redundant_experts(num_experts: int, ep_size: int, limit: int = 8) -> list[int]:
    """The first ``limit`` values of ``num_redundant_experts`` that make ``E + R`` divisible by ``ep_size``."""
    check_int("valid_redundant_experts", "ep_size", ep_size, 1)
    first = (-num_experts) % ep_size
    return [first + i * ep_size for i in range(limit)]
