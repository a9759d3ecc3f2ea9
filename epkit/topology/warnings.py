"""What a valid topology's choices change, and warnings for the ones that are legal but probably not meant.

A :class:`~epkit.topology.topology.Topology` checks that its fields are allowed; this module says whether a
choice has any effect where it is made (an all2all backend at dp=1 runs the same code as any other)
and lists what is worth a line to the user. Pure functions of the topology, read through
``Topology.all2all_in_effect`` and ``Topology.warnings()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from epkit.vllm import versions as vllm_versions

if TYPE_CHECKING:
    from epkit.topology.topology import Topology

PREFILL_CONTEXT_PARALLEL_FLAGS = ("--prefill-context-parallel-size", "--prefill_context_parallel_size", "-pcp")


def prefill_context_parallel(extra_args: tuple[str, ...]) -> int:
    """``--prefill-context-parallel-size`` / ``-pcp`` as given in ``extra_args`` (1 when absent)."""
    for i, arg in enumerate(extra_args):
        flag, eq, value = arg.partition("=")
        if flag in PREFILL_CONTEXT_PARALLEL_FLAGS:
            text = value if eq else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            return int(text) if text.isdigit() else 1
    return 1


def all2all_in_effect(t: Topology) -> bool:
    """Whether ``all2all_backend`` changes what runs. Tokens move between ranks only with expert
    parallelism over several DP ranks: vLLM runs its all2all kernels only when EP is on and
    dp > 1 (or prefill context parallelism is on: ``FusedMoEParallelConfig.use_all2all_kernels``),
    the built-in engine only when ep_size > 1 (it runs TP=1). Elsewhere every backend runs the
    same code."""
    if not t.enable_expert_parallel:
        return False
    if t.dp > 1:
        return True
    return t.engine == "vllm" and prefill_context_parallel(t.extra_args) > 1


def _backend_without_effect(t: Topology) -> str:
    if not t.enable_expert_parallel:
        why = "without enable_expert_parallel every rank holds all experts (TP-sharded) and no all2all runs"
    elif t.engine == "vllm":
        why = (f"at dp=1 vLLM runs no all2all (tp={t.tp} × dp=1 takes the tensor-parallel MoE path; "
               "its all2all kernels need dp > 1)")
    else:
        why = f"at dp=1 (ep_size={t.ep_size}) the built-in engine moves no tokens between ranks"
    return (f"all2all_backend={t.all2all_backend!r} has no effect: {why}; every backend runs the "
            "same code here, so compare backends only where dp > 1 with enable_expert_parallel")


def warnings(t: Topology) -> list[str]:
    """Things that are legal but probably not what the author meant."""
    notes: list[str] = []
    if t.all2all_backend and not all2all_in_effect(t):
        notes.append(_backend_without_effect(t))
    if t.engine == "vllm" and t.all2all_backend and t.enable_expert_parallel:
        notes += vllm_versions.check_backend(t.vllm_version, t.all2all_backend, t.allow_replaced_backend)
    if t.nodes > 1 and t.all2all_backend in ("pplx", "naive"):
        notes.append(f"all2all_backend={t.all2all_backend!r} is meant for single-node deployments (seed)")
    if t.nodes > 1 and not t.gloo_socket_ifname:
        notes.append("multi-node on InfiniBand clusters: set gloo_socket_ifname (e.g. eth0) to avoid start-up hangs")
    if t.api_server_count and t.api_server_count > t.dp:
        notes.append(f"api_server_count={t.api_server_count} exceeds dp={t.dp}")
    notes += _tp_across_nodes(t)
    return notes


def _tp_across_nodes(t: Topology) -> list[str]:
    if not t.tp_spans_nodes:
        if t.master_port is not None:
            return [f"master_port={t.master_port} has no effect: it is the torch.distributed port of tensor "
                    f"parallelism across nodes (tp > gpus_per_node over nodes > 1), and tp={t.tp} fits one node"]
        return []
    notes = ["tensor parallelism across nodes: started by hand, every node needs VLLM_HOST_IP=<that node's "
             "address> where its default route does not give one, and a hostname that resolves to that address "
             "(else vLLM announces 0.0.0.0 or gloo dials 127.0.0.1 and start-up hangs); epkit's launcher sets "
             "VLLM_HOST_IP itself"]
    row = vllm_versions.release(t.vllm_version).version
    if row not in vllm_versions.NNODES_RUN_ON:
        notes.append(f"tensor parallelism across nodes: vLLM {row} has the flags (from "
                     f"{vllm_versions.FIRST_NNODES_RELEASE}), but epkit has run it on vLLM "
                     f"{', '.join(vllm_versions.NNODES_RUN_ON)} only")
    return notes
