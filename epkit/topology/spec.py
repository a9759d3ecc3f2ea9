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

A disaggregated prefill/decode deployment (:class:`~epkit.topology.disagg.DisaggTopology`) is a spec
with ``prefill:`` and ``decode:`` lists of topologies (``count: N`` repeats one), ``kv_transfer_config:``
and ``router:`` (:class:`DisaggPlanSpec`; ``epkit plan`` plans every instance):

```yaml
prefill:
  - {model: Qwen/Qwen3-30B-A3B, dp: 2, enable_expert_parallel: true, all2all_backend: deepep_high_throughput}
decode:
  - {model: Qwen/Qwen3-30B-A3B, dp: 2, enable_expert_parallel: true, all2all_backend: deepep_low_latency, count: 2}
kv_transfer_config: {kv_connector: NixlConnector, kv_role: kv_both}
router: {policy: round_robin}
plan: {gpus: [H100]}
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
from epkit.topology.disagg import KEYS as DISAGG_KEYS, DisaggTopology
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


def _check_plan_options(gpus: tuple[Any, ...], runtime_reserve_gib: Any) -> None:
    if not gpus:
        raise TopologyError("plan.gpus is empty; give at least one GPU, e.g. [H200]")
    for gpu in gpus:
        gpu_memory_bytes(gpu)
    if isinstance(runtime_reserve_gib, bool) or not isinstance(runtime_reserve_gib, (int, float)) \
            or not math.isfinite(runtime_reserve_gib) or runtime_reserve_gib < 0:
        raise TopologyError(f"plan.runtime_reserve_gib={runtime_reserve_gib!r} must be a number >= 0")


@dataclass(frozen=True)
class PlanSpec:
    """A topology and how to plan it (which GPUs, how much to reserve for the runtime)."""

    topology: Topology
    gpus: tuple[Any, ...] = DEFAULT_GPUS
    runtime_reserve_gib: float = DEFAULT_RUNTIME_RESERVE_BYTES / GIB

    def __post_init__(self) -> None:
        _check_plan_options(self.gpus, self.runtime_reserve_gib)

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


@dataclass(frozen=True)
class DisaggPlanSpec:
    """A disaggregated deployment and how to plan it: every instance on every GPU of ``gpus``."""

    disagg: DisaggTopology
    gpus: tuple[Any, ...] = DEFAULT_GPUS
    runtime_reserve_gib: float = DEFAULT_RUNTIME_RESERVE_BYTES / GIB

    def __post_init__(self) -> None:
        _check_plan_options(self.gpus, self.runtime_reserve_gib)

    def memory_plans(self) -> list[tuple[str, list[MemoryPlan]]]:
        """Per instance (``prefill0``, ``decode0``…), one memory plan per GPU."""
        per_gpu = [self.disagg.memory_plans(gpu, self.runtime_reserve_gib * GIB) for gpu in self.gpus]
        return [(label, [plans[i][1] for plans in per_gpu]) for i, label in enumerate(self.disagg.labels)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "spec") -> "DisaggPlanSpec":
        data = dict(data)
        options, fields = plan_block(data.pop("plan", None), source)
        if fields:
            raise TopologyError(f"{source}: plan.{next(iter(fields))} is a topology field; in a disaggregated spec "
                                "set it on the instances it belongs to (prefill: [...], decode: [...])")
        try:
            return cls(disagg=DisaggTopology.from_dict(data), **options)
        except TopologyError as exc:
            message = str(exc)
            raise TopologyError(message if message.startswith(f"{source}:") else f"{source}: {message}") from exc


def is_disaggregated(data: Any) -> bool:
    """Whether spec data describes a disaggregated deployment (it has ``prefill:`` or ``decode:``)."""
    return isinstance(data, Mapping) and any(key in data for key in ("prefill", "decode"))


def plan_spec(data: Any, source: str = "spec") -> "PlanSpec | DisaggPlanSpec":
    """The spec ``data`` describes: a :class:`DisaggPlanSpec` when it has ``prefill:``/``decode:``, else a
    :class:`PlanSpec`; a mix of both (topology fields beside ``prefill:``) lists the valid keys."""
    if not is_disaggregated(data):
        return PlanSpec.from_dict(data, source)
    stray = sorted(set(data) - set(DISAGG_KEYS) - {"plan"}, key=str)
    if stray:
        raise TopologyError(f"{source}: a disaggregated spec (prefill:, decode:) has unknown key(s) "
                            f"{', '.join(map(str, stray))}; valid keys: {', '.join(DISAGG_KEYS)}, plan "
                            "(topology fields go inside each prefill/decode instance)")
    return DisaggPlanSpec.from_dict(data, source)


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


def load_spec(path: str | Path) -> "PlanSpec | DisaggPlanSpec":
    """Read a YAML/JSON deployment spec (one topology, or prefill/decode instances); errors name the file and
    the field."""
    data, _ = read_spec_file(path)
    return plan_spec(data, source=str(path))
