"""Deployment spec files: a YAML (or JSON) topology plus the planning options around it.

```yaml
model: deepseek-ai/DeepSeek-V3-0324
tp: 1
dp: 8
enable_expert_parallel: true
all2all_backend: pplx
max_model_len: 32768       # topology fields: rendered as --max-model-len, and what the plan assumes
plan:                      # optional
  gpus: [H100, H200]
```

The ``plan:`` block reads the same in deployment specs and sweep specs (:func:`plan_block`):
``gpus`` is one GPU or a list. Older spellings are still read, with a deprecation warning:
``gpu`` (sweeps) for ``gpus``, and ``plan.gpu_memory_utilization`` / ``plan.max_model_len``,
which are topology fields now so that the plan and the rendered command cannot disagree.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from epkit.errors import EpkitDeprecationWarning, TopologyError
from epkit.topology.plan import DEFAULT_RUNTIME_RESERVE_BYTES, GIB, MemoryPlan, gpu_memory_bytes, memory_plan
from epkit.topology.topology import Topology

PLAN_KEYS = ("gpus", "runtime_reserve_gib")
DEFAULT_GPUS = ("H100", "H200", "H20")
# old plan-block key -> the key that replaced it
RENAMED_PLAN_KEYS = {"gpu": "gpus"}
# plan-block keys that are topology fields now (rendered as engine flags)
TOPOLOGY_PLAN_KEYS = ("gpu_memory_utilization", "max_model_len")


def plan_block(plan: Any, source: str, allowed: tuple[str, ...] = PLAN_KEYS) -> tuple[dict, dict]:
    """Check and normalise a spec's ``plan:`` block; returns (plan options, topology fields it set).

    ``gpus`` comes back as a tuple of GPUs (each checked). Deprecated spellings are read with an
    :class:`~epkit.errors.EpkitDeprecationWarning`; unknown keys list the valid ones.
    """
    if plan is None:
        return {}, {}
    if not isinstance(plan, Mapping):
        raise TopologyError(f"{source}: plan={plan!r} must be a mapping with keys {', '.join(allowed)}")
    options = dict(plan)
    unknown = sorted((str(k) for k in set(options) - set(allowed) - set(RENAMED_PLAN_KEYS) - set(TOPOLOGY_PLAN_KEYS)))
    if unknown:
        raise TopologyError(f"{source}: plan has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(allowed)}")
    for old, new in RENAMED_PLAN_KEYS.items():
        if old not in options:
            continue
        if new in options:
            raise TopologyError(f"{source}: plan has both {old} and {new}; give only {new} (a GPU or a list of GPUs)")
        warnings.warn(f"{source}: plan.{old} is deprecated; write plan.{new} (a GPU or a list, "
                      f"e.g. {new}: [{options[old]}])", EpkitDeprecationWarning, stacklevel=2)
        options[new] = options.pop(old)
    topology_fields = {}
    for key in TOPOLOGY_PLAN_KEYS:
        if key in options:
            value = options.pop(key)
            warnings.warn(f"{source}: plan.{key} is deprecated; it is the topology field {key} now (rendered "
                          f"as the engine flag, so the command and the memory plan agree): write `{key}: {value}` "
                          "at the top level", EpkitDeprecationWarning, stacklevel=2)
            topology_fields[key] = value
    if "gpus" in options:
        gpus = options["gpus"]
        if isinstance(gpus, (str, Mapping)):
            gpus = [gpus]
        if not isinstance(gpus, (list, tuple)):
            raise TopologyError(f"{source}: plan.gpus={gpus!r} must be a GPU or a list such as [H100, H200]")
        if not gpus:
            raise TopologyError(f"{source}: plan.gpus is empty; give at least one GPU, e.g. [H200]")
        for gpu in gpus:
            try:
                gpu_memory_bytes(gpu)
            except TopologyError as exc:
                raise TopologyError(f"{source}: plan.gpus: {exc}") from exc
        options["gpus"] = tuple(gpus)
    reserve = options.get("runtime_reserve_gib")
    if "runtime_reserve_gib" in options and (isinstance(reserve, bool) or not isinstance(reserve, (int, float))
                                             or not math.isfinite(reserve) or reserve < 0):
        raise TopologyError(f"{source}: plan.runtime_reserve_gib={reserve!r} must be a number >= 0")
    allow_unfit = options.get("allow_unfit")
    if "allow_unfit" in options and not isinstance(allow_unfit, bool):
        raise TopologyError(f"{source}: plan.allow_unfit={allow_unfit!r} must be true or false")
    return options, topology_fields


def merge_topology_fields(data: Mapping[str, Any], fields: Mapping[str, Any], source: str) -> dict:
    """``data`` with the topology ``fields`` a plan block set; a different value already there is an error."""
    out = dict(data)
    for key, value in fields.items():
        if out.get(key) is not None and out[key] != value:
            raise TopologyError(f"{source}: plan.{key}={value!r} disagrees with {key}={out[key]!r}; "
                                f"give it once, as the topology field {key}")
        out[key] = value
    return out


@dataclass(frozen=True)
class PlanSpec:
    """A topology and how to plan it (which GPUs, how much to reserve for the runtime)."""

    topology: Topology
    gpus: tuple[Any, ...] = DEFAULT_GPUS
    runtime_reserve_gib: float = DEFAULT_RUNTIME_RESERVE_BYTES / GIB

    def __post_init__(self) -> None:
        if not self.gpus:
            raise TopologyError("plan.gpus is empty; give at least one GPU, e.g. [H200]")
        for gpu in self.gpus:
            gpu_memory_bytes(gpu)
        if isinstance(self.runtime_reserve_gib, bool) or not isinstance(self.runtime_reserve_gib, (int, float)) \
                or not math.isfinite(self.runtime_reserve_gib) or self.runtime_reserve_gib < 0:
            raise TopologyError(f"plan.runtime_reserve_gib={self.runtime_reserve_gib!r} must be a number >= 0")

    def memory_plans(self) -> list[MemoryPlan]:
        """One memory plan per GPU, with the topology's max_model_len and gpu_memory_utilization."""
        return [memory_plan(self.topology, gpu, runtime_reserve_bytes=self.runtime_reserve_gib * GIB)
                for gpu in self.gpus]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec") -> "PlanSpec":
        if not isinstance(data, Mapping):
            raise TopologyError(
                f"{source}: the top level must be a mapping of topology fields (model: …, tp: …), "
                f"got {type(data).__name__}"
            )
        data = dict(data)
        options, fields = plan_block(data.pop("plan", None), source)
        try:
            topology = Topology.from_dict(merge_topology_fields(data, fields, source))
            return cls(topology=topology, **options)
        except TopologyError as exc:
            message = str(exc)
            raise TopologyError(message if message.startswith(f"{source}:") else f"{source}: {message}") from exc


def read_spec_file(path: str | Path, what: str = "spec file") -> tuple[Any, str]:
    """Parse a YAML/JSON file; errors name the file (missing, a folder, unreadable, not YAML)."""
    path = Path(path)
    if not path.exists():
        raise TopologyError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise TopologyError(f"{what} {str(path)!r} is not a file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: not a text file ({exc.reason} at byte {exc.start}); give a YAML or JSON spec") \
            from exc
    except OSError as exc:
        raise TopologyError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise TopologyError(f"{path}: not valid YAML{where}: {problem or ' '.join(str(exc).split())}") from exc


def load_spec(path: str | Path) -> PlanSpec:
    """Read a YAML/JSON deployment spec; errors name the file and the field."""
    data, _ = read_spec_file(path)
    return PlanSpec.from_dict(data, source=str(path))
