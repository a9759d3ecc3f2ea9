"""DisaggTopology: disaggregated prefill/decode, the seed's last section, as one checked description.

One or more prefill instances and one or more decode instances, each a full :class:`Topology` of its own
(TP/DP/EP, backend, EPLB, nodes), joined by a KV connector (vLLM's ``--kv-transfer-config``,
:class:`KVTransferConfig`) and fronted by a router (``epkit proxy``, :class:`RouterConfig`)::

    from epkit.topology import DisaggTopology, KVTransferConfig, Topology
    d = DisaggTopology(
        prefill=(Topology(model="Qwen/Qwen3-30B-A3B", dp=4, enable_expert_parallel=True,
                          all2all_backend="deepep_high_throughput"),),
        decode=(Topology(model="Qwen/Qwen3-30B-A3B", dp=4, enable_expert_parallel=True,
                         all2all_backend="deepep_low_latency"),),
        kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both"))
    for role, index, topology in d.instances:  # ("prefill", 0, …), ("decode", 0, …)
        ...

An instance may set its own ``kv_transfer_config`` (say ``kv_role: kv_producer`` on the prefill side); the
others get the deployment's. Pure: nothing here starts a process (``epkit.launch.deploy`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology.checks import check_int
from epkit.topology.kv_transfer import KVTransferConfig
from epkit.topology.plan import DEFAULT_RUNTIME_RESERVE_BYTES, MemoryPlan, memory_plan
from epkit.topology.topology import Topology

ROLES = ("prefill", "decode")
ROUTER_POLICIES = ("round_robin", "least_outstanding")  # the words `epkit proxy --policy` takes
ROUTER_PLACES = ("decode0", "driver")  # where the router runs: node 0 of the first decode instance, or here
# The KV roles each side may hold (vLLM: a prefill instance produces KV, a decode instance consumes it).
SIDE_ROLES = {"prefill": ("kv_producer", "kv_both"), "decode": ("kv_consumer", "kv_both")}
BLOCK_SIZE_FLAG = "--block-size"
DEFAULT_BLOCK_SIZE = 16  # vLLM's on GPUs and the built-in engine's (EngineConfig.block_size)
DEFAULT_KV_TRANSFER = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}  # the seed's
KEYS = ("prefill", "decode", "kv_transfer_config", "router")


@dataclass(frozen=True)
class RouterConfig:
    """The router in front of the instances (``epkit proxy``): its policy, port, and where it runs."""

    policy: str = "round_robin"
    port: int | None = None  # None: a free port where it runs
    on: str = "decode0"

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise TopologyError(f"router.policy={self.policy!r}; allowed: {', '.join(ROUTER_POLICIES)}")
        if self.port is not None:
            check_int("router", "port", self.port, 1, 65535)
        if self.on not in ROUTER_PLACES:
            raise TopologyError(f"router.on={self.on!r}; allowed: {', '.join(ROUTER_PLACES)} (node 0 of the first "
                                "decode instance, or the machine that deploys)")

    @classmethod
    def from_dict(cls, data: Any) -> "RouterConfig":
        if data is None or isinstance(data, RouterConfig):
            return data or cls()
        if not isinstance(data, Mapping):
            raise TopologyError(f"router={data!r} must be a mapping with keys policy, port, on")
        if True in data and "on" not in data:  # YAML 1.1 reads a bare `on:` key as the boolean true
            data = {("on" if key is True else key): value for key, value in data.items()}
        unknown = sorted(set(data) - {"policy", "port", "on"}, key=str)
        if unknown:
            raise TopologyError(f"router has unknown key(s) {', '.join(map(str, unknown))}; "
                                "valid keys: policy, port, on")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "port": self.port, "on": self.on}


def block_size(topology: Topology) -> int:
    """The KV block size an instance runs with: ``--block-size`` in its ``extra_args``, else
    :data:`DEFAULT_BLOCK_SIZE`. Raises naming the value when it is not a positive integer."""
    args = topology.extra_args
    for i, arg in enumerate(args):
        flag, eq, text = arg.partition("=")
        if flag.replace("_", "-") != BLOCK_SIZE_FLAG:
            continue
        if not eq:
            text = args[i + 1] if i + 1 < len(args) else ""
        if not text.isdigit() or int(text) < 1:
            raise TopologyError(f"topology.extra_args: {BLOCK_SIZE_FLAG} {text!r} must be a number of tokens >= 1 "
                                "(e.g. 16)")
        return int(text)
    return DEFAULT_BLOCK_SIZE


def _instances(value: Any, role: str) -> tuple[Topology, ...]:
    if isinstance(value, Topology):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise TopologyError(f"{role}={value!r} must be a non-empty list of topologies (one per {role} instance)")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            item = Topology.from_dict(item)
        if not isinstance(item, Topology):
            raise TopologyError(f"{role}[{i}]={item!r} must be a Topology or a mapping of topology fields")
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class DisaggTopology:
    """Prefill instances + decode instances + the KV connector between them + the router in front."""

    prefill: tuple[Topology, ...]
    decode: tuple[Topology, ...]
    kv_transfer_config: KVTransferConfig = field(default_factory=lambda: KVTransferConfig(**DEFAULT_KV_TRANSFER))
    router: RouterConfig = field(default_factory=RouterConfig)
    _filled: tuple[tuple[str, int, Topology], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill", _instances(self.prefill, "prefill"))
        object.__setattr__(self, "decode", _instances(self.decode, "decode"))
        config = KVTransferConfig.coerce(self.kv_transfer_config)
        if config is None:
            raise TopologyError("kv_transfer_config is missing: give the KV connector, e.g. "
                                "{kv_connector: NixlConnector, kv_role: kv_both}")
        object.__setattr__(self, "kv_transfer_config", config)
        object.__setattr__(self, "router", RouterConfig.from_dict(self.router))
        filled = tuple((role, i, self._with_config(role, i, t)) for role in ROLES
                       for i, t in enumerate(getattr(self, role)))
        object.__setattr__(self, "_filled", filled)
        self._check_sides()

    def _with_config(self, role: str, index: int, topology: Topology) -> Topology:
        """The instance with the deployment's KV config unless it has its own; its KV role checked for its side."""
        try:
            if topology.kv_transfer_config is None:
                topology = replace(topology, kv_transfer_config=self.kv_transfer_config)  # checks it for this engine
        except TopologyError as exc:
            raise TopologyError(f"{role}{index}: {exc}") from exc
        kv_role = topology.kv_transfer_config.kv_role
        if kv_role not in SIDE_ROLES[role]:
            raise TopologyError(f"{role}{index}.kv_transfer_config.kv_role={kv_role!r}; allowed on a {role} "
                                f"instance: {', '.join(SIDE_ROLES[role])}")
        return topology

    def _check_sides(self) -> None:
        """Every instance serves the same model with the same KV block size, engine and KV connector."""
        (_, _, first), *rest = self._filled
        first_label = self.labels[0]
        for label, (_, _, t) in zip(self.labels[1:], rest):
            for name, mine, theirs in (
                ("model", t.model, first.model),
                ("model_config", t.model_config, first.model_config),
                ("engine", t.engine, first.engine),
                ("kv_transfer_config.kv_connector", t.kv_transfer_config.kv_connector,
                 first.kv_transfer_config.kv_connector),
            ):
                if mine != theirs:
                    raise TopologyError(
                        f"{label}.{name}={mine!r} but {first_label}.{name}={theirs!r}; allowed: the same {name} on "
                        "every instance (the decode side reads the KV the prefill side wrote)")
            if block_size(t) != block_size(first):
                raise TopologyError(
                    f"{label} block size {block_size(t)} ({BLOCK_SIZE_FLAG} in extra_args) but {first_label} block "
                    f"size {block_size(first)}; allowed: the same block size on every instance (KV moves in blocks; "
                    f"default {DEFAULT_BLOCK_SIZE})")

    # ---- what it holds -----------------------------------------------------------------
    @property
    def instances(self) -> list[tuple[str, int, Topology]]:
        """``[("prefill", 0, Topology), …, ("decode", 0, Topology), …]``, each with its kv_transfer_config."""
        return list(self._filled)

    @property
    def labels(self) -> list[str]:
        """``prefill0``, ``prefill1``, …, ``decode0``, …: the instances' names (run folders, plan headings)."""
        return [f"{role}{i}" for role, i, _ in self._filled]

    @property
    def gpus(self) -> int:
        """GPUs of every instance together."""
        return sum(t.world_size for _, _, t in self._filled)

    @property
    def model(self) -> str:
        return self.prefill[0].model

    @property
    def block_size(self) -> int:
        return block_size(self.prefill[0])

    @property
    def pd(self) -> str:
        """``<p>P<d>D``, e.g. ``1P1D``."""
        return f"{len(self.prefill)}P{len(self.decode)}D"

    def memory_plans(self, gpu: str | Mapping[str, Any],
                     runtime_reserve_bytes: float = DEFAULT_RUNTIME_RESERVE_BYTES) -> list[tuple[str, MemoryPlan]]:
        """One GPU's memory plan per instance (each with its own sizes, backend and EPLB), by label."""
        return [(label, memory_plan(t, gpu, runtime_reserve_bytes=runtime_reserve_bytes))
                for label, (_, _, t) in zip(self.labels, self._filled)]

    def warnings(self) -> list[str]:
        """Each instance's warnings, named by instance (a warning every instance has is said once)."""
        seen: dict[str, list[str]] = {}
        for label, (_, _, t) in zip(self.labels, self._filled):
            for note in t.warnings():
                seen.setdefault(note, []).append(label)
        versions = sorted({t.vllm_version for _, _, t in self._filled if t.engine == "vllm"})
        out = [note if len(where) == len(self.labels) else f"{', '.join(where)}: {note}"
               for note, where in seen.items()]
        if len(versions) > 1:
            out.append(f"instances target different vLLM releases ({', '.join(versions)}); NixlConnector's handshake "
                       "checks that both sides run compatible versions")
        return out

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DisaggTopology":
        """Build from YAML/JSON: ``{prefill: [topology…], decode: [topology…], kv_transfer_config: {…},
        router: {…}}``; ``count: N`` on an instance repeats it N times."""
        if not isinstance(data, Mapping):
            raise TopologyError(f"a disaggregated topology must be a mapping with keys {', '.join(KEYS)}, "
                                f"got {type(data).__name__}")
        unknown = sorted(set(data) - set(KEYS), key=str)
        if unknown:
            raise TopologyError(f"disaggregated topology has unknown key(s) {', '.join(map(str, unknown))}; "
                                f"valid keys: {', '.join(KEYS)}")
        sides = {}
        for role in ROLES:
            if data.get(role) is None:
                raise TopologyError(f"{role} is missing: give a list of {role} instances, e.g. "
                                    f"{role}: [{{model: Qwen/Qwen3-30B-A3B, dp: 2, count: 1}}]")
            sides[role] = _expand_counts(data[role], role)
        return cls(prefill=sides["prefill"], decode=sides["decode"],
                   kv_transfer_config=data.get("kv_transfer_config") or dict(DEFAULT_KV_TRANSFER),
                   router=data.get("router"))

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": [t.to_dict() for t in self.prefill], "decode": [t.to_dict() for t in self.decode],
                "kv_transfer_config": self.kv_transfer_config.explicit(), "router": self.router.to_dict()}


def _expand_counts(items: Any, role: str) -> list[Topology]:
    """A side's list with every ``count: N`` instance repeated N times."""
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        raise TopologyError(f"{role}={items!r} must be a non-empty list of topologies (one per {role} instance)")
    out: list[Topology] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TopologyError(f"{role}[{i}]={item!r} must be a mapping of topology fields")
        item = dict(item)
        count = item.pop("count", 1)
        check_int(f"{role}[{i}]", "count", count, 1)
        try:
            topology = Topology.from_dict(item)
        except TopologyError as exc:
            raise TopologyError(f"{role}[{i}]: {exc}") from exc
        out += [topology] * count
    return out
