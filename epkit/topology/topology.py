"""Topology: one typed, self-checking description of an EP deployment (its EPLB part is
:class:`~epkit.topology.eplb.EPLBConfig`).

Fields follow vLLM's meaning (``tp`` is ``--tensor-parallel-size``, ``dp`` is
``--data-parallel-size`` …). Every check runs in ``__post_init__`` and raises
:class:`~epkit.errors.TopologyError` naming the field, the value and what is
allowed, so a bad topology never renders a command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology.checks import check_bool, check_int
from epkit.topology.eplb import EPLBConfig, valid_redundant_experts
from epkit.topology.kv_transfer import KVTransferConfig, kv_transfer_warnings
from epkit.topology.models import ModelSpec, bundled_model_names
import epkit.topology.warnings as topology_warnings
from epkit.vllm import versions as vllm_versions

ENGINES = ("vllm", "epkit")
# Backends only the built-in engine has (its true all_to_all dispatch/combine). Whether a vendor
# backend can run is the engine's call at start-up: it fails naming the missing package.
EPKIT_ONLY_BACKENDS = frozenset({"all_to_all"})
EPLB_POLICIES = ("default",)
_IFNAME = re.compile(r"^[A-Za-z0-9_.:^,-]+$")

# Topology fields that are plain engine flags the memory plan depends on. They are fields (so the
# plan and the rendered command read one value); written in ``extra_args`` instead, they are read
# from there into the field. render.VLLM_FLAGS takes these spellings from here.
ENGINE_FLAG_FIELDS = {
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
}
# vLLM reads --max-model-len as a human-readable integer: 32k = 32000, 25.6k = 25600, 32K = 32768.
_HUMAN_INT = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
_DECIMAL_SCALE = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SCALE = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(text: str) -> int:
    """An integer as vLLM's ``human_readable_int`` reads it (``1k`` = 1000, ``1K`` = 1024; no
    decimals with a binary suffix); raises ``ValueError`` otherwise."""
    text = text.strip()
    match = _HUMAN_INT.fullmatch(text)
    if not match:
        return int(text)
    number, suffix = match.groups()
    if suffix in _DECIMAL_SCALE:
        return int(float(number) * _DECIMAL_SCALE[suffix])
    return int(number) * _BINARY_SCALE[suffix]


def _flag_value(name: str, text: str) -> int | float:
    """The value of an ``extra_args`` flag that is a topology field, read as vLLM reads it."""
    flag = ENGINE_FLAG_FIELDS[name]
    if name == "max_model_len":
        if text.strip().lower() in ("auto", "-1"):
            raise TopologyError(f"topology.extra_args: {flag} {text!r} lets vLLM pick the length at start-up, which "
                                "a plan cannot check; give the length (e.g. 32768)")
        try:
            return human_readable_int(text)
        except ValueError:
            raise TopologyError(
                f"topology.extra_args: {flag} {text!r} is not an integer (e.g. 32768, 32k or 32K)"
            ) from None
    try:
        return float(text)
    except ValueError:
        raise TopologyError(f"topology.extra_args: {flag} {text!r} is not a number in (0, 1]") from None


def _lift_engine_flags(extra_args: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Split ``extra_args`` into the rest and the :data:`ENGINE_FLAG_FIELDS` values it sets."""
    by_flag = {flag: name for name, flag in ENGINE_FLAG_FIELDS.items()}
    rest: list[str] = []
    found: dict[str, Any] = {}
    i = 0
    while i < len(extra_args):
        arg = extra_args[i]
        flag, eq, text = arg.partition("=")
        flag = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag  # vLLM takes either
        name = by_flag.get(flag)
        if name is None:
            rest.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(extra_args) or extra_args[i + 1].startswith("--"):
                raise TopologyError(f"topology.extra_args: {flag} has no value (e.g. {flag} "
                                    f"{'32768' if name == 'max_model_len' else '0.9'})")
            text = extra_args[i + 1]
            i += 1
        value = _flag_value(name, text)
        if name in found and found[name] != value:
            raise TopologyError(f"topology.extra_args sets {flag} twice ({found[name]!r} and {value!r}); give it once")
        found[name] = value
        i += 1
    return tuple(rest), found


@dataclass(frozen=True)
class Topology:
    """One deployment: model, parallel sizes, backend, EPLB, placement over nodes."""

    model: str
    tp: int = 1
    dp: int = 1
    nodes: int = 1
    gpus_per_node: int = 8
    dp_local: int | None = None
    enable_expert_parallel: bool = False
    all2all_backend: str | None = None
    eplb: EPLBConfig | None = None
    eplb_flag_style: str = "json"  # "json" -> --eplb-config '{…}'; "dotted" -> --eplb-config.key value
    api_server_count: int | None = None
    data_parallel_address: str | None = None
    data_parallel_rpc_port: int | None = None
    master_port: int | None = None  # --master-port of TP across nodes; None: vLLM's (a Deployment picks a free one)
    gloo_socket_ifname: str | None = None
    nccl_socket_ifname: str | None = None
    max_model_len: int | None = None  # --max-model-len; None: the model's (what the memory plan assumes too)
    gpu_memory_utilization: float | None = None  # --gpu-memory-utilization; None: vLLM's default (0.92 in 0.26 and 0.32)
    engine: str = "vllm"
    vllm_version: str = vllm_versions.DEFAULT_VLLM_VERSION
    allow_replaced_backend: bool = False
    model_config: str | None = None  # path to config.json when `model` is not bundled
    kv_transfer_config: KVTransferConfig | None = None  # --kv-transfer-config: one side of prefill/decode
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "topology"
        if not isinstance(self.model, str) or not self.model.strip():
            raise TopologyError(f"{owner}.model={self.model!r} must be a model name or path")
        if self.engine not in ENGINES:
            raise TopologyError(f"{owner}.engine={self.engine!r}; allowed: {', '.join(ENGINES)}")
        for name in ("tp", "dp", "nodes", "gpus_per_node"):
            check_int(owner, name, getattr(self, name), 1)
        check_bool(owner, "enable_expert_parallel", self.enable_expert_parallel)
        check_bool(owner, "allow_replaced_backend", self.allow_replaced_backend)
        if self.tp_spans_nodes:
            self._check_tp_across_nodes(owner)
        else:
            self._check_dp_placement(owner)
        if self.eplb_flag_style not in ("json", "dotted"):
            raise TopologyError(f"{owner}.eplb_flag_style={self.eplb_flag_style!r}; allowed: json, dotted")
        if self.api_server_count is not None:
            check_int(owner, "api_server_count", self.api_server_count, 1)
        for name in ("data_parallel_rpc_port", "master_port"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), 1, 65535)
        if self.data_parallel_address is not None and (
            not isinstance(self.data_parallel_address, str) or not self.data_parallel_address.strip()
            or any(c.isspace() for c in self.data_parallel_address)
        ):
            raise TopologyError(
                f"{owner}.data_parallel_address={self.data_parallel_address!r} must be a host name or IP address"
            )
        for name in ("gloo_socket_ifname", "nccl_socket_ifname"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _IFNAME.match(value)):
                raise TopologyError(f"{owner}.{name}={value!r} must be a network interface name such as eth0")
        if not isinstance(self.extra_args, (list, tuple)) or not all(isinstance(a, str) for a in self.extra_args):
            raise TopologyError(f"{owner}.extra_args={self.extra_args!r} must be a list of strings")
        self._read_engine_flags(owner)
        self._check_backend(owner)
        self._check_experts(owner)
        object.__setattr__(self, "kv_transfer_config", KVTransferConfig.coerce(self.kv_transfer_config))
        if self.kv_transfer_config is not None:  # a mapping or JSON string from YAML becomes a config
            self.kv_transfer_config.check(self.vllm_version, self.engine)

    # ---- validation pieces ------------------------------------------------------
    def _check_dp_placement(self, owner: str) -> None:
        """Every node runs the same number of DP ranks, each of them ``tp`` GPUs of that node."""
        if self.dp_local is not None:
            check_int(owner, "dp_local", self.dp_local, 1)
            if self.dp_local * self.nodes != self.dp:
                raise TopologyError(
                    f"{owner}.dp_local={self.dp_local} × nodes={self.nodes} = {self.dp_local * self.nodes} "
                    f"must equal dp={self.dp}"
                )
        elif self.dp % self.nodes:
            hint = ""
            if self.dp == 1 and self.tp % self.nodes == 0 and self.tp > 1:
                hint = (f"; for tensor parallelism across nodes give gpus_per_node={self.tp // self.nodes} "
                        f"(tp / nodes: TP spans nodes when tp > gpus_per_node)")
            raise TopologyError(
                f"{owner}.dp={self.dp} is not divisible by nodes={self.nodes}; every node runs the same number "
                f"of DP ranks (dp must be a multiple of {self.nodes}){hint}"
            )
        if self.gpus_on_node > self.gpus_per_node:
            hint = ""
            if self.nodes == 1 and self.dp == 1 and self.tp % self.gpus_per_node == 0:
                hint = (f"; for tensor parallelism across nodes give nodes={self.tp // self.gpus_per_node} "
                        "and data_parallel_address (node 0's address)")
            raise TopologyError(
                f"{owner}: tp={self.tp} × dp_local={self.dp_per_node} = {self.gpus_on_node} GPUs per node "
                f"exceeds gpus_per_node={self.gpus_per_node}{hint}"
            )

    def _check_tp_across_nodes(self, owner: str) -> None:
        """tp > gpus_per_node over several nodes: vLLM's ``--nnodes`` / ``--node-rank`` with one DP rank.

        vLLM (``EngineArgs.create_engine_config``) needs ``nnodes`` to divide the world size and runs
        ``world_size // nnodes`` ranks on every node; epkit asks for full nodes (tp = nodes ×
        gpus_per_node), so ``gpus_per_node`` is also the number of TP ranks a node holds."""
        what = (f"tp={self.tp} > gpus_per_node={self.gpus_per_node} over nodes={self.nodes} "
                "(tensor parallelism across nodes)")
        if self.engine != "vllm":
            raise TopologyError(
                f"{owner}.engine={self.engine!r} cannot run {what}: the built-in engine has no tensor parallelism "
                "across nodes (it runs tp=1); allowed: engine vllm (vLLM's --nnodes/--node-rank)"
            )
        if self.dp != 1:
            raise TopologyError(
                f"{owner}.dp={self.dp} with {what}; allowed: dp=1 (one TP group over all nodes, as vLLM's "
                "--nnodes/--node-rank run it; DP with TP across nodes is not supported by epkit)"
            )
        if self.dp_local is not None:
            raise TopologyError(
                f"{owner}.dp_local={self.dp_local} with {what}; allowed: unset (the one DP rank spans every node)"
            )
        if self.tp != self.nodes * self.gpus_per_node:
            hint = (f"gpus_per_node={self.tp // self.nodes} (tp / nodes TP ranks on each node)"
                    if self.tp % self.nodes == 0 else f"a node count that divides tp={self.tp}")
            raise TopologyError(
                f"{owner}.tp={self.tp} spans nodes (tp > gpus_per_node={self.gpus_per_node}) but is not "
                f"nodes={self.nodes} × gpus_per_node={self.gpus_per_node} = {self.nodes * self.gpus_per_node}; "
                f"vLLM runs tp / nnodes ranks on every node, so allowed: tp={self.nodes * self.gpus_per_node}, "
                f"or {hint}"
            )
        vllm_versions.check_nnodes(self.vllm_version)

    def _read_engine_flags(self, owner: str) -> None:
        """Move ``--max-model-len`` / ``--gpu-memory-utilization`` from extra_args into their fields."""
        rest, found = _lift_engine_flags(tuple(self.extra_args))
        for name, value in found.items():
            mine = getattr(self, name)
            if mine is not None and mine != value:
                raise TopologyError(
                    f"{owner}.{name}={mine!r} but extra_args says {ENGINE_FLAG_FIELDS[name]} {value!r}; "
                    f"give it once (the field {name})"
                )
            object.__setattr__(self, name, value)
        object.__setattr__(self, "extra_args", rest)
        if self.max_model_len is not None:
            check_int(owner, "max_model_len", self.max_model_len, 1)
        gmu = self.gpu_memory_utilization
        if gmu is not None and (isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1):
            raise TopologyError(f"{owner}.gpu_memory_utilization={gmu!r} must be a number in (0, 1]")

    def _check_backend(self, owner: str) -> None:
        release = vllm_versions.release(self.vllm_version)  # raises on an unknown version
        if self.all2all_backend is None:
            return
        if not isinstance(self.all2all_backend, str):
            raise TopologyError(
                f"{owner}.all2all_backend={self.all2all_backend!r} must be a backend name; "
                f"vLLM {release.version} allows: {', '.join(sorted(release.backends))}"
            )
        if self.engine == "vllm":
            vllm_versions.check_backend(release.version, self.all2all_backend, self.allow_replaced_backend)
        elif self.all2all_backend not in vllm_versions.all_backends() | EPKIT_ONLY_BACKENDS:
            raise TopologyError(
                f"{owner}.all2all_backend={self.all2all_backend!r} is not a known backend; allowed: "
                f"{', '.join(sorted(vllm_versions.all_backends() | EPKIT_ONLY_BACKENDS))}"
            )

    def _check_experts(self, owner: str) -> None:
        spec = self.spec
        if self.eplb is not None:
            if not isinstance(self.eplb, EPLBConfig):
                raise TopologyError(f"{owner}.eplb={self.eplb!r} must be an EPLBConfig")
            if not self.enable_expert_parallel:
                raise TopologyError(
                    f"{owner}.eplb is set but enable_expert_parallel=False; EPLB moves experts between EP ranks, "
                    "so it needs enable_expert_parallel: true"
                )
            if self.tp * self.dp <= 1:
                raise TopologyError(
                    f"{owner}.eplb is set but ep_size=1 (tp={self.tp}, dp={self.dp}); EPLB needs tp × dp > 1"
                )
            self._check_eplb_policy()
            release = vllm_versions.release(self.vllm_version)
            if self.engine == "vllm":
                missing = sorted(set(self.eplb.explicit()) - set(release.eplb_keys))
                if missing:
                    raise TopologyError(
                        f"eplb_config.{missing[0]} is not an EPLB key of vLLM {release.version} "
                        f"(vllm_version={self.vllm_version!r}); its keys: {', '.join(release.eplb_keys)}"
                    )
            resolved = self.eplb.resolved(release.eplb_keys) if self.engine == "vllm" else {}
            if resolved.get("use_async") and resolved.get("communicator") in ("torch_nccl", "pynccl"):
                raise TopologyError(
                    f"eplb_config.communicator={resolved['communicator']!r} cannot be used with use_async=true "
                    "(NCCL multi-stream conflicts in vLLM); use torch_gloo or nixl, or set use_async: false"
                )
            if resolved.get("use_async") and resolved.get("policy", "default") != "default":
                raise TopologyError(
                    f"eplb_config.policy={resolved['policy']!r} cannot be used with use_async=true; vLLM's async "
                    "EPLB supports only the default policy"
                )
        if self.enable_expert_parallel and self.ep_size > 1:
            physical = self.num_physical_experts
            if physical % self.ep_size:
                hint = ""
                if self.redundant_experts:
                    hint = f"; valid num_redundant_experts for EP={self.ep_size}: {', '.join(map(str, valid_redundant_experts(spec.num_experts, self.ep_size, limit=5)))} …"
                raise TopologyError(
                    f"{owner}: {spec.num_experts} routed experts + num_redundant_experts={self.redundant_experts} "
                    f"= {physical} physical experts is not divisible by ep_size={self.ep_size} (tp × dp){hint}"
                )
        if self.redundant_experts and self.redundant_experts > spec.num_experts * self.ep_size:
            raise TopologyError(
                f"eplb_config.num_redundant_experts={self.redundant_experts} is more than the model's "
                f"{spec.num_experts} experts can use on ep_size={self.ep_size}"
            )

    def _check_eplb_policy(self) -> None:
        policy = self.eplb.policy
        if policy is None:
            return
        if self.engine == "vllm":
            allowed = EPLB_POLICIES
        else:  # the built-in engine runs epkit's own policies too
            from epkit.eplb.policies import POLICIES

            allowed = tuple(POLICIES)
        if policy not in allowed:
            raise TopologyError(
                f"eplb_config.policy={policy!r} is not an EPLB policy of engine {self.engine!r}; "
                f"allowed: {', '.join(allowed)}"
            )

    # ---- derived sizes ----------------------------------------------------------
    @cached_property
    def spec(self) -> ModelSpec:
        """The model's sizes (from ``model_config`` when given, else the bundled ``model``)."""
        if self.model_config is not None and (not isinstance(self.model_config, str) or not self.model_config.strip()):
            raise TopologyError(f"topology.model_config={self.model_config!r} must be the path of a config.json")
        try:
            return ModelSpec.load(self.model_config or self.model, name=self.model)
        except TopologyError:
            raise
        except (OSError, UnicodeDecodeError, TypeError, KeyError, AttributeError, ValueError) as exc:
            where = f"model_config={self.model_config!r}" if self.model_config else f"model={self.model!r}"
            raise TopologyError(
                f"topology.{where}: cannot read a Hugging Face config.json from it ({type(exc).__name__}: {exc})"
            ) from exc

    @property
    def tp_spans_nodes(self) -> bool:
        """Whether one TP group spans several nodes (tp > gpus_per_node): vLLM's ``--nnodes``/``--node-rank``."""
        return self.nodes > 1 and self.tp > self.gpus_per_node

    @property
    def tp_per_node(self) -> int:
        """TP ranks on one node: ``tp / nodes`` when TP spans nodes, else ``tp``."""
        return self.tp // self.nodes if self.tp_spans_nodes else self.tp

    @property
    def dp_per_node(self) -> int:
        """DP ranks per node (``--data-parallel-size-local``); 1 when TP spans nodes (the one DP rank is on
        every node, as vLLM infers it from ``--nnodes``)."""
        if self.tp_spans_nodes:
            return 1
        return self.dp_local if self.dp_local is not None else self.dp // self.nodes

    @property
    def gpus_on_node(self) -> int:
        """GPUs the deployment uses on each node."""
        return self.tp_per_node if self.tp_spans_nodes else self.tp * self.dp_per_node

    @property
    def world_size(self) -> int:
        """GPUs in the whole deployment."""
        return self.tp * self.dp

    @property
    def ep_size(self) -> int:
        """``EP_SIZE = TP_SIZE × DP_SIZE`` with expert parallelism on, else 1 (experts TP-sharded)."""
        return self.tp * self.dp if self.enable_expert_parallel else 1

    @property
    def redundant_experts(self) -> int:
        return self.eplb.redundant if self.eplb is not None else 0

    @property
    def num_physical_experts(self) -> int:
        return self.spec.num_experts + self.redundant_experts

    @property
    def experts_per_rank(self) -> float:
        """``(NUM_TOTAL_EXPERTS + NUM_REDUNDANT_EXPERTS) ÷ NUM_EP_RANKS`` per MoE layer."""
        return self.num_physical_experts / self.ep_size

    def node_start_rank(self, node: int) -> int:
        """``--data-parallel-start-rank`` of a node: the local DP sizes of the nodes before it (0 on every
        node when TP spans nodes: each holds part of DP rank 0)."""
        if not 0 <= node < self.nodes:
            raise TopologyError(f"node={node} must be in [0, {self.nodes - 1}]")
        return 0 if self.tp_spans_nodes else node * self.dp_per_node

    @property
    def expert_bytes_per_rank(self) -> float:
        """The seed's formula: ``NUM_MOE_LAYERS × BYTES_PER_EXPERT × (E + R) ÷ EP`` (all routed experts a rank holds)."""
        spec = self.spec
        if not self.enable_expert_parallel:
            return spec.num_moe_layers * spec.bytes_per_expert * spec.num_experts / self.tp
        return spec.num_moe_layers * spec.bytes_per_expert * self.experts_per_rank

    @property
    def eplb_overhead_bytes_per_rank(self) -> float:
        """The redundant experts' share: ``NUM_MOE_LAYERS × BYTES_PER_EXPERT × R ÷ EP``."""
        spec = self.spec
        return spec.num_moe_layers * spec.bytes_per_expert * self.redundant_experts / self.ep_size

    @property
    def all2all_in_effect(self) -> bool:
        """Whether ``all2all_backend`` changes what runs (:func:`epkit.topology.warnings.all2all_in_effect`)."""
        return topology_warnings.all2all_in_effect(self)

    def warnings(self) -> list[str]:
        """Things that are legal but probably not what the author meant (:mod:`epkit.topology.warnings`)."""
        return topology_warnings.warnings(self) + kv_transfer_warnings(self.kv_transfer_config, self.vllm_version,
                                                                       self.engine)

    # ---- (de)serialisation --------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Topology":
        """Build from YAML/JSON data; ``eplb`` may be a mapping or a JSON string (``--eplb-config``)."""
        if not isinstance(data, Mapping):
            raise TopologyError(f"a topology must be a mapping of fields, got {type(data).__name__}")
        data = dict(data)
        unknown = sorted(set(data) - set(cls.field_names()), key=str)
        if unknown:
            raise TopologyError(
                f"topology has unknown key(s) {', '.join(map(str, unknown))}; "
                f"valid keys: {', '.join(cls.field_names())}"
            )
        if data.get("model") is None:
            raise TopologyError(
                "topology.model is missing: give the model (`model: NAME`), a bundled one such as "
                f"{', '.join(bundled_model_names()[:3])} …, or any name with model_config: <path to its config.json>"
            )
        eplb = data.get("eplb")
        if isinstance(eplb, str):
            data["eplb"] = EPLBConfig.from_json(eplb)
        elif isinstance(eplb, Mapping):
            data["eplb"] = EPLBConfig.from_dict(eplb)
        elif eplb is not None and not isinstance(eplb, EPLBConfig):
            raise TopologyError(f"topology.eplb={eplb!r} must be a mapping of EPLB keys or a JSON string")
        if "extra_args" in data:
            extra = data["extra_args"]
            if isinstance(extra, str) or not isinstance(extra, (list, tuple)):
                raise TopologyError(f"topology.extra_args={extra!r} must be a list of strings")
            data["extra_args"] = tuple(extra)
        if "env" in data:
            env = data["env"]
            if not isinstance(env, Mapping) or not all(isinstance(k, str) for k in env):
                raise TopologyError(f"topology.env={env!r} must be a mapping of variable names to values")
            data["env"] = {k: str(v) for k, v in env.items()}
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "eplb":
                value = value.explicit() if value is not None else None
            elif f.name == "kv_transfer_config":
                value = value.explicit() if value is not None else None
            elif f.name == "extra_args":
                value = list(value)
            elif f.name == "env":
                value = dict(value)
            out[f.name] = value
        return out

