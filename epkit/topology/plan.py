"""Memory plan per GPU: what the weights take, what EPLB adds, what is left for KV cache.

Pure arithmetic over a :class:`~epkit.topology.topology.Topology` and its
:class:`~epkit.topology.models.ModelSpec`. The one assumption that is not a public fact is
``runtime_reserve_bytes`` (activations, CUDA graphs, NCCL buffers), which vLLM
measures by profiling at start-up; it is a parameter with a stated default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology.topology import Topology
from epkit.vllm import versions as vllm_versions

GIB = 2**30
MIB = 2**20

# Total memory the driver reports (nvidia-smi "MiB" totals), which is what vLLM's
# --gpu-memory-utilization multiplies.
GPU_MEMORY_BYTES: dict[str, int] = {
    "H100": 81559 * MIB,  # H100 SXM 80 GB HBM3
    "H200": 143771 * MIB,  # H200 SXM 141 GB HBM3e
    "H20": 97871 * MIB,  # H20 96 GB HBM3
}

DEFAULT_RUNTIME_RESERVE_BYTES = 2 * GIB
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's --gpu-memory-utilization default


def _one_value(topology: Topology, name: str, given: Any) -> Any:
    """``given`` or the topology's value of ``name``; both set and different is an error."""
    mine = getattr(topology, name)
    if given is None or mine is None or given == mine:
        return mine if given is None else given
    raise TopologyError(
        f"{name}={given!r} disagrees with topology.{name}={mine!r} (the value its command renders); "
        "plan with the topology's value or change the topology"
    )


def gpu_memory_bytes(gpu: str | Mapping[str, Any]) -> tuple[str, int]:
    """Resolve ``"H200"``, ``"A100-40=40"`` (GiB) or ``{"name":…, "memory_gib":…}`` to (name, bytes)."""
    if isinstance(gpu, Mapping):
        name, gib = gpu.get("name"), gpu.get("memory_gib")
        if not isinstance(name, str) or isinstance(gib, bool) or not isinstance(gib, (int, float)) \
                or not math.isfinite(gib) or gib <= 0:
            raise TopologyError(f"gpu={dict(gpu)!r} must have a name and a positive memory_gib")
        return name, int(gib * GIB)
    if not isinstance(gpu, str):
        raise TopologyError(
            f"gpu={gpu!r} must be a GPU name ({', '.join(GPU_MEMORY_BYTES)}) or NAME=GiB, e.g. A100-40=40"
        )
    if "=" in gpu:
        name, _, gib = gpu.partition("=")
        try:
            size = float(gib)
        except ValueError:
            size = -1.0
        if not math.isfinite(size) or size <= 0 or not name:
            raise TopologyError(f"gpu={gpu!r} must look like NAME=GiB, e.g. A100-40=40")
        return name, int(size * GIB)
    if gpu not in GPU_MEMORY_BYTES:
        raise TopologyError(
            f"gpu={gpu!r} is not a known GPU; known: {', '.join(GPU_MEMORY_BYTES)} (or give NAME=GiB)"
        )
    return gpu, GPU_MEMORY_BYTES[gpu]


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's memory budget under one topology (all sizes in bytes)."""

    gpu: str
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    budget_bytes: float
    non_expert_weight_bytes: float
    expert_weight_bytes: float
    eplb_overhead_bytes: float
    runtime_reserve_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    kv_cache_tokens: int
    max_model_len: int
    fits: bool
    reason: str

    @property
    def weight_bytes(self) -> float:
        return self.non_expert_weight_bytes + self.expert_weight_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weight_bytes"] = self.weight_bytes
        return out


def memory_plan(
    topology: Topology,
    gpu: str | Mapping[str, Any],
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    runtime_reserve_bytes: float = DEFAULT_RUNTIME_RESERVE_BYTES,
    kv_dtype_bytes: float | None = None,
) -> MemoryPlan:
    """Plan one GPU of ``topology`` on ``gpu``.

    Replicated (attention, dense, shared-expert, embedding) weights are split by TP;
    routed experts follow the seed's ``(E + R) ÷ EP`` per rank (or E ÷ TP without EP).
    What the utilization budget leaves after weights and the runtime reserve is KV
    cache. It fits when that cache holds at least one ``max_model_len`` sequence
    (vLLM refuses to start otherwise).

    ``gpu_memory_utilization`` and ``max_model_len`` are the topology's (the values its
    command renders), else vLLM's defaults (0.9, the model's length). Passing one here
    plans a topology that does not set it; one that disagrees with the topology's is refused,
    so the plan never assumes what the command does not say.
    """
    gpu_memory_utilization = _one_value(topology, "gpu_memory_utilization", gpu_memory_utilization)
    max_model_len = _one_value(topology, "max_model_len", max_model_len)
    if gpu_memory_utilization is None:
        gpu_memory_utilization = DEFAULT_GPU_MEMORY_UTILIZATION
    if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
            or not 0 < gpu_memory_utilization <= 1:
        raise TopologyError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be a number in (0, 1]")
    name, total = gpu_memory_bytes(gpu)
    spec = topology.spec
    max_len = max_model_len if max_model_len is not None else spec.max_position_embeddings
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise TopologyError(f"max_model_len={max_len!r} must be a positive integer")
    budget = gpu_memory_utilization * total
    non_expert = spec.non_expert_bytes / topology.tp
    experts = topology.expert_bytes_per_rank
    kv_bytes = budget - non_expert - experts - runtime_reserve_bytes
    per_token = spec.kv_bytes_per_token(topology.tp, kv_dtype_bytes)
    tokens = int(kv_bytes // per_token) if kv_bytes > 0 else 0
    if kv_bytes <= 0:
        reason = (
            f"weights {(non_expert + experts) / GIB:.1f} GiB + reserve {runtime_reserve_bytes / GIB:.1f} GiB exceed "
            f"the {budget / GIB:.1f} GiB budget ({gpu_memory_utilization:.2f} × {total / GIB:.1f} GiB)"
        )
    elif tokens < max_len:
        reason = f"KV cache holds {tokens} tokens, fewer than max_model_len={max_len}"
    else:
        reason = f"KV cache holds {tokens} tokens ({tokens / max_len:.1f} × max_model_len={max_len})"
    return MemoryPlan(
        gpu=name,
        gpu_memory_bytes=total,
        gpu_memory_utilization=gpu_memory_utilization,
        budget_bytes=budget,
        non_expert_weight_bytes=non_expert,
        expert_weight_bytes=experts,
        eplb_overhead_bytes=topology.eplb_overhead_bytes_per_rank,
        runtime_reserve_bytes=runtime_reserve_bytes,
        kv_cache_bytes=max(kv_bytes, 0.0),
        kv_bytes_per_token=per_token,
        kv_cache_tokens=tokens,
        max_model_len=max_len,
        fits=tokens >= max_len,
        reason=reason,
    )


def backend_advice(topology: Topology) -> str:
    """The seed's backend selection guide applied to this topology and its target vLLM release
    (a backend that release lacks, or silently replaces, is never advised)."""
    if not topology.enable_expert_parallel:
        return "no expert parallelism: MoE layers are tensor-parallel; all2all backend unused"
    if topology.engine != "vllm":
        return "built-in engine: every backend runs the same MoE; compare them in a sweep"
    if not topology.all2all_in_effect:
        return (f"dp=1: vLLM runs no all2all (tensor-parallel MoE over tp={topology.tp}"
                + (f" across {topology.nodes} nodes" if topology.tp_spans_nodes else "")
                + "); the backend is unused")
    release = vllm_versions.release(topology.vllm_version)
    real = {b for b in release.backends if b not in release.replaced}

    def have(*names: str) -> list[str]:
        return [n for n in names if n in real]

    if topology.nodes == 1:
        advice = f"single node (vLLM {release.version}): {release.default_backend} (default)"
        if have("pplx"):
            return advice + " or pplx"
        if "pplx" in release.replaced:
            advice += f"; not pplx, which this release replaces with {release.replaced['pplx']}"
        return advice
    parts = []
    if have("deepep_low_latency", "deepep_high_throughput"):
        parts.append("deepep_low_latency for decode-dominated, deepep_high_throughput for prefill-dominated workloads")
    if have("flashinfer_all2allv"):
        parts.append("flashinfer_all2allv on multi-node NVLink (MNNVL) systems")
    return f"multi-node (vLLM {release.version}): " + ("; ".join(parts) or release.default_backend)


def derived_sizes(topology: Topology) -> dict[str, Any]:
    """The numbers users otherwise compute by hand, as a flat dict."""
    spec = topology.spec
    return {
        "model": topology.model,
        "engine": topology.engine,
        "vllm_version": topology.vllm_version if topology.engine == "vllm" else None,
        "tp": topology.tp,
        "dp": topology.dp,
        "nodes": topology.nodes,
        "tp_spans_nodes": topology.tp_spans_nodes,
        "tp_per_node": topology.tp_per_node,
        "dp_per_node": topology.dp_per_node,
        "gpus_per_node_used": topology.gpus_on_node,
        "world_size": topology.world_size,
        "ep_size": topology.ep_size,
        "node_start_ranks": [topology.node_start_rank(n) for n in range(topology.nodes)],
        "num_moe_layers": spec.num_moe_layers,
        "num_logical_experts": spec.num_experts,
        "num_redundant_experts": topology.redundant_experts,
        "num_physical_experts": topology.num_physical_experts,
        "experts_per_rank": topology.experts_per_rank if topology.enable_expert_parallel else None,
        "bytes_per_expert": spec.bytes_per_expert,
        "expert_bytes_per_rank": topology.expert_bytes_per_rank,
        "eplb_overhead_bytes_per_rank": topology.eplb_overhead_bytes_per_rank,
        "backend_advice": backend_advice(topology),
    }
