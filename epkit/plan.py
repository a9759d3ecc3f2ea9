"""Memory plan per GPU: what the weights take, what EPLB adds, what is left for KV cache.

Pure arithmetic over a :class:`~epkit.topology.Topology` and its
:class:`~epkit.models.ModelSpec`. The one assumption that is not a public fact is
``runtime_reserve_bytes`` (activations, CUDA graphs, NCCL buffers), which vLLM
measures by profiling at start-up; it is a parameter with a stated default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology import Topology

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


def gpu_memory_bytes(gpu: str | Mapping[str, Any]) -> tuple[str, int]:
    """Resolve ``"H200"``, ``"A100-40=40"`` (GiB) or ``{"name":…, "memory_gib":…}`` to (name, bytes)."""
    if isinstance(gpu, Mapping):
        name, gib = gpu.get("name"), gpu.get("memory_gib")
        if not isinstance(name, str) or not isinstance(gib, (int, float)) or gib <= 0:
            raise TopologyError(f"gpu={dict(gpu)!r} must have a name and a positive memory_gib")
        return name, int(gib * GIB)
    if "=" in gpu:
        name, _, gib = gpu.partition("=")
        try:
            size = float(gib)
        except ValueError:
            size = -1.0
        if size <= 0 or not name:
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
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    runtime_reserve_bytes: float = DEFAULT_RUNTIME_RESERVE_BYTES,
    kv_dtype_bytes: float | None = None,
) -> MemoryPlan:
    """Plan one GPU of ``topology`` on ``gpu``.

    Replicated (attention, dense, shared-expert, embedding) weights are split by TP;
    routed experts follow the seed's ``(E + R) ÷ EP`` per rank (or E ÷ TP without EP).
    What the utilization budget leaves after weights and the runtime reserve is KV
    cache. It fits when that cache holds at least one ``max_model_len`` sequence
    (vLLM refuses to start otherwise); ``max_model_len`` defaults to the model's.
    """
    if isinstance(gpu_memory_utilization, bool) or not 0 < gpu_memory_utilization <= 1:
        raise TopologyError(f"gpu_memory_utilization={gpu_memory_utilization!r} must be in (0, 1]")
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
    """The seed's backend selection guide applied to this topology."""
    if not topology.enable_expert_parallel:
        return "no expert parallelism: MoE layers are tensor-parallel; all2all backend unused"
    if topology.nodes == 1:
        return "single node: allgather_reducescatter (default) or pplx where the release still has it"
    return (
        "multi-node: deepep_low_latency for decode-dominated, deepep_high_throughput for prefill-dominated "
        "workloads; flashinfer_all2allv on multi-node NVLink (MNNVL) systems"
    )


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
