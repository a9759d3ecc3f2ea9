"""Deployment spec files: a YAML (or JSON) topology plus the planning options around it.

```yaml
model: deepseek-ai/DeepSeek-V3-0324
tp: 1
dp: 8
enable_expert_parallel: true
all2all_backend: pplx
plan:                      # optional
  gpus: [H100, H200]
  gpu_memory_utilization: 0.9
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from epkit.errors import TopologyError
from epkit.plan import DEFAULT_RUNTIME_RESERVE_BYTES, GIB, MemoryPlan, gpu_memory_bytes, memory_plan
from epkit.topology import Topology

PLAN_KEYS = ("gpus", "gpu_memory_utilization", "max_model_len", "runtime_reserve_gib")
DEFAULT_GPUS = ("H100", "H200", "H20")


@dataclass(frozen=True)
class PlanSpec:
    """A topology and how to plan it (which GPUs, what utilization)."""

    topology: Topology
    gpus: tuple[Any, ...] = DEFAULT_GPUS
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    runtime_reserve_gib: float = DEFAULT_RUNTIME_RESERVE_BYTES / GIB

    def __post_init__(self) -> None:
        if not self.gpus:
            raise TopologyError("plan.gpus is empty; give at least one GPU, e.g. [H200]")
        for gpu in self.gpus:
            gpu_memory_bytes(gpu)
        if isinstance(self.runtime_reserve_gib, bool) or not isinstance(self.runtime_reserve_gib, (int, float)) \
                or self.runtime_reserve_gib < 0:
            raise TopologyError(f"plan.runtime_reserve_gib={self.runtime_reserve_gib!r} must be a number >= 0")

    def memory_plans(self) -> list[MemoryPlan]:
        return [
            memory_plan(
                self.topology,
                gpu,
                gpu_memory_utilization=self.gpu_memory_utilization,
                max_model_len=self.max_model_len,
                runtime_reserve_bytes=self.runtime_reserve_gib * GIB,
            )
            for gpu in self.gpus
        ]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec") -> "PlanSpec":
        if not isinstance(data, Mapping):
            raise TopologyError(f"{source}: the top level must be a mapping of topology fields")
        data = dict(data)
        plan = data.pop("plan", None) or {}
        if not isinstance(plan, Mapping):
            raise TopologyError(f"{source}: plan={plan!r} must be a mapping with keys {', '.join(PLAN_KEYS)}")
        unknown = sorted(set(plan) - set(PLAN_KEYS))
        if unknown:
            raise TopologyError(f"{source}: plan has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(PLAN_KEYS)}")
        try:
            topology = Topology.from_dict(data)
        except TopologyError as exc:
            raise TopologyError(f"{source}: {exc}") from exc
        options = dict(plan)
        if "gpus" in options:
            gpus = options["gpus"]
            if isinstance(gpus, (str, Mapping)):
                gpus = [gpus]
            if not isinstance(gpus, (list, tuple)):
                raise TopologyError(f"{source}: plan.gpus={gpus!r} must be a list such as [H100, H200]")
            options["gpus"] = tuple(gpus)
        try:
            return cls(topology=topology, **options)
        except TopologyError as exc:
            raise TopologyError(f"{source}: {exc}") from exc


def load_spec(path: str | Path) -> PlanSpec:
    """Read a YAML/JSON deployment spec; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise TopologyError(f"spec file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from exc
    return PlanSpec.from_dict(data, source=str(path))
