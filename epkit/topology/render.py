"""Render a :class:`~epkit.topology.topology.Topology` into one exact launch command per node.

The flag spellings live in one table, :data:`VLLM_FLAGS`; the built-in engine
takes the same flags (``epkit serve``), so both engines render through it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Mapping

from epkit.errors import TopologyError
from epkit.topology.topology import ENGINE_FLAG_FIELDS, Topology

# topology word -> vLLM flag. No flag string is spelled anywhere else in epkit (the fields the
# memory plan reads, ENGINE_FLAG_FIELDS, live next to the topology that reads them from extra_args).
VLLM_FLAGS = {
    "tp": "--tensor-parallel-size",
    "dp": "--data-parallel-size",
    "dp_local": "--data-parallel-size-local",
    "start_rank": "--data-parallel-start-rank",
    "address": "--data-parallel-address",
    "rpc_port": "--data-parallel-rpc-port",
    "enable_expert_parallel": "--enable-expert-parallel",
    "all2all_backend": "--all2all-backend",
    "enable_eplb": "--enable-eplb",
    "eplb_config": "--eplb-config",
    "api_server_count": "--api-server-count",
    "headless": "--headless",
    "nnodes": "--nnodes",  # tensor parallelism across nodes (Topology.tp_spans_nodes)
    "node_rank": "--node-rank",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
    "kv_transfer_config": "--kv-transfer-config",  # disaggregated prefill/decode (epkit.topology.disagg)
    **ENGINE_FLAG_FIELDS,
}
# vLLM's short spellings of the flags above (vllm/engine/arg_utils.py), refused in extra_args too.
VLLM_SHORT_FLAGS = {
    "-tp": "tp",
    "-dp": "dp",
    "-dpl": "dp_local",
    "-dpr": "start_rank",
    "-dpa": "address",
    "-dpp": "rpc_port",
    "-ep": "enable_expert_parallel",
    "-n": "nnodes",
    "-r": "node_rank",
}

# The topology field a VLLM_FLAGS word is rendered from, where the two names differ.
_FIELD_OF_WORD = {
    "start_rank": "nodes", "headless": "nodes", "nnodes": "nodes", "node_rank": "nodes",
    "address": "data_parallel_address", "master_addr": "data_parallel_address",
    "rpc_port": "data_parallel_rpc_port", "enable_eplb": "eplb", "eplb_config": "eplb",
}

# topology word -> environment variable set on every node.
ENV_VARS = {
    "gloo_socket_ifname": "GLOO_SOCKET_IFNAME",
    "nccl_socket_ifname": "NCCL_SOCKET_IFNAME",
}

ENGINE_COMMANDS = {"vllm": ("vllm", "serve"), "epkit": ("epkit", "serve")}


@dataclass(frozen=True)
class NodeLaunch:
    """What one node runs: its argv, the environment it adds, and its role."""

    node_index: int
    role: str  # "primary" (serves the API) or "headless"
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def shell(self, multiline: bool = True) -> str:
        """The command as a shell line, quoted and ready to paste (env exported first)."""
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())
        if not multiline:
            return exports + shlex.join(self.argv)
        lines, i = [shlex.join(self.argv[:3])], 3
        while i < len(self.argv):
            part = [self.argv[i]]
            if i + 1 < len(self.argv) and not self.argv[i + 1].startswith("--"):
                part.append(self.argv[i + 1])
            lines.append("    " + shlex.join(part))
            i += len(part)
        return exports + " \\\n".join(lines)


def _owned_flags() -> set[str]:
    return set(VLLM_FLAGS.values())


def _check_extra_args(topology: Topology) -> None:
    owned = _owned_flags()
    for arg in topology.extra_args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("_", "-")  # vLLM reads --data_parallel_size as --data-parallel-size
        flag = VLLM_FLAGS.get(VLLM_SHORT_FLAGS.get(flag, ""), flag)
        dotted = next((w for w in ("eplb_config", "kv_transfer_config") if flag.startswith(VLLM_FLAGS[w] + ".")), None)
        if flag in owned or dotted:
            word = next((k for k, v in VLLM_FLAGS.items() if v == flag), dotted)
            word = _FIELD_OF_WORD.get(word, word)
            raise TopologyError(
                f"topology.extra_args contains {arg!r}, which epkit renders from the topology; "
                f"set the topology field ({word}) instead"
            )


def _eplb_args(topology: Topology) -> list[str]:
    if topology.eplb is None:
        return []
    args = [VLLM_FLAGS["enable_eplb"]]
    explicit = topology.eplb.explicit()
    if not explicit:
        return args
    if topology.eplb_flag_style == "json":
        return args + [VLLM_FLAGS["eplb_config"], topology.eplb.to_json()]
    for key, value in explicit.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        args += [f"{VLLM_FLAGS['eplb_config']}.{key}", text]
    return args


def _placement_args(topology: Topology, node: int, address: str | None) -> list[str]:
    """Where this node's ranks sit: DP placement flags, or ``--nnodes``/``--node-rank`` when TP spans nodes."""
    if topology.tp_spans_nodes:  # one TP group over every node; its workers meet at tcp://ADDR:PORT
        args = [VLLM_FLAGS["nnodes"], str(topology.nodes), VLLM_FLAGS["node_rank"], str(node),
                VLLM_FLAGS["master_addr"], address]
        if topology.master_port is not None:
            args += [VLLM_FLAGS["master_port"], str(topology.master_port)]
        return args
    args = []
    if topology.nodes > 1 or topology.dp_local is not None:
        args += [VLLM_FLAGS["dp_local"], str(topology.dp_per_node)]
    if node > 0:
        args += [VLLM_FLAGS["start_rank"], str(topology.node_start_rank(node))]
    if address:
        args += [VLLM_FLAGS["address"], address]
    if topology.data_parallel_rpc_port is not None:
        args += [VLLM_FLAGS["rpc_port"], str(topology.data_parallel_rpc_port)]
    return args


def render(topology: Topology, address: str | None = None) -> list[NodeLaunch]:
    """One :class:`NodeLaunch` per node, primary first.

    ``address`` overrides ``topology.data_parallel_address`` (a Slurm executor knows
    node 0's hostname only once the job runs). A multi-node topology needs one: the
    DP address the headless nodes reach, or, when TP spans nodes, vLLM's ``--master-addr``.
    """
    _check_extra_args(topology)
    address = address or topology.data_parallel_address
    if topology.nodes > 1 and not address:
        why = (f"it is {VLLM_FLAGS['master_addr']}, where every node's TP workers meet in torch.distributed"
               if topology.tp_spans_nodes else "the headless nodes must reach the primary")
        raise TopologyError(
            f"topology.data_parallel_address is required when nodes={topology.nodes}: {why} "
            "(give node 0's IP or hostname)"
        )
    env = {var: getattr(topology, word) for word, var in ENV_VARS.items() if getattr(topology, word)}
    env.update(topology.env)
    launches = []
    for node in range(topology.nodes):
        headless = node > 0
        argv = [*ENGINE_COMMANDS[topology.engine], topology.model]
        argv += [VLLM_FLAGS["tp"], str(topology.tp), VLLM_FLAGS["dp"], str(topology.dp)]
        argv += _placement_args(topology, node, address)
        if topology.enable_expert_parallel:
            argv.append(VLLM_FLAGS["enable_expert_parallel"])
        if topology.all2all_backend:
            argv += [VLLM_FLAGS["all2all_backend"], topology.all2all_backend]
        argv += _eplb_args(topology)
        if headless:
            argv.append(VLLM_FLAGS["headless"])
        elif topology.api_server_count is not None:
            argv += [VLLM_FLAGS["api_server_count"], str(topology.api_server_count)]
        for word in ENGINE_FLAG_FIELDS:  # every node's engine reads them, headless ones too
            if getattr(topology, word) is not None:
                argv += [VLLM_FLAGS[word], str(getattr(topology, word))]
        if topology.kv_transfer_config is not None:  # every node's engine cores run the connector
            argv += [VLLM_FLAGS["kv_transfer_config"], topology.kv_transfer_config.to_json()]
        argv += list(topology.extra_args)
        launches.append(NodeLaunch(node, "headless" if headless else "primary", tuple(argv), dict(env)))
    return launches
