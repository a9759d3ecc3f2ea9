"""KVTransferConfig: vLLM's ``--kv-transfer-config`` (the KV connector of disaggregated prefill/decode), typed
and self-checking.

The fields are vLLM's ``KVTransferConfig`` fields (``vllm/config/kv_transfer.py``) over every release in
:mod:`epkit.vllm.versions`; ``None`` means "vLLM's default" and is not rendered, so a config renders exactly
the keys its author set (the seed's ``{"kv_connector":"NixlConnector","kv_role":"kv_both"}``). What a field
may hold is checked here; whether a release has the connector and the field is :meth:`KVTransferConfig.check`
against that release's row (``Topology`` calls it with its ``vllm_version`` and engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

from epkit.errors import TopologyError
from epkit.topology.backends import KV_BUFFER_DEVICES, KV_LOAD_FAILURE_POLICIES, KV_ROLES, NIXL_BACKENDS
from epkit.topology.checks import check_bool, check_int, json_object
from epkit.vllm import versions as vllm_versions

# The connectors that speak NixlConnector's protocol (one module, vllm/…/kv_connector/v1/nixl) and read
# kv_connector_extra_config.backends (default ["UCX"]; base_worker.py:525 in 0.32.0).
NIXL_CONNECTORS = ("NixlConnector", "NixlPullConnector", "NixlPushConnector")
# The connectors the built-in engine implements (`epkit serve --kv-transfer-config`, NixlConnector's protocol).
BUILTIN_ENGINE_CONNECTORS = ("NixlConnector",)


@dataclass(frozen=True)
class KVTransferConfig:
    """vLLM's ``--kv-transfer-config``; ``.to_json()`` is the flag's value."""

    kv_connector: str | None = None
    engine_id: str | None = None
    kv_buffer_device: str | None = None
    kv_buffer_size: float | None = None
    kv_role: str | None = None
    kv_rank: int | None = None
    kv_parallel_size: int | None = None
    kv_ip: str | None = None
    kv_port: int | None = None
    kv_connector_extra_config: Mapping[str, Any] | None = None
    kv_connector_module_path: str | None = None
    enable_permute_local_kv: bool | None = None
    kv_load_failure_policy: str | None = None

    def __post_init__(self) -> None:
        owner = "kv_transfer_config"
        for name in ("kv_connector", "engine_id", "kv_ip", "kv_connector_module_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TopologyError(f"{owner}.{name}={value!r} must be a non-empty string")
        if self.kv_connector is None:  # vLLM's KVConnectorFactory: "Connector name is not set"
            raise TopologyError(f"{owner}.kv_connector is missing: give the connector, e.g. NixlConnector "
                                "(allowed: the connectors of the vLLM release, docs/vllm_versions.md; with "
                                "kv_connector_module_path, the class name in that module)")
        if self.kv_role not in KV_ROLES:
            raise TopologyError(f"{owner}.kv_role={self.kv_role!r}; allowed: {', '.join(KV_ROLES)} (vLLM requires "
                                "one when kv_connector is set)")
        if self.kv_buffer_device is not None and self.kv_buffer_device not in KV_BUFFER_DEVICES:
            raise TopologyError(f"{owner}.kv_buffer_device={self.kv_buffer_device!r}; allowed: "
                                f"{', '.join(KV_BUFFER_DEVICES)} (unset: the platform's device)")
        if self.kv_load_failure_policy is not None and self.kv_load_failure_policy not in KV_LOAD_FAILURE_POLICIES:
            raise TopologyError(f"{owner}.kv_load_failure_policy={self.kv_load_failure_policy!r}; allowed: "
                                f"{', '.join(KV_LOAD_FAILURE_POLICIES)}")
        self._check_numbers(owner)
        if self.enable_permute_local_kv is not None:
            check_bool(owner, "enable_permute_local_kv", self.enable_permute_local_kv)
        self._check_extra(owner)

    def _check_numbers(self, owner: str) -> None:
        if self.kv_port is not None:
            check_int(owner, "kv_port", self.kv_port, 1, 65535)
        if self.kv_parallel_size is not None:
            check_int(owner, "kv_parallel_size", self.kv_parallel_size, 1)
        if self.kv_rank is not None:
            check_int(owner, "kv_rank", self.kv_rank, 0)
            size = self.kv_parallel_size if self.kv_parallel_size is not None else 1
            if self.kv_rank >= size:
                raise TopologyError(f"{owner}.kv_rank={self.kv_rank} must be < kv_parallel_size={size} "
                                    f"(ranks 0..{size - 1})")
        size = self.kv_buffer_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0):
            raise TopologyError(f"{owner}.kv_buffer_size={size!r} must be a number of bytes > 0 (e.g. 1e9)")

    def _check_extra(self, owner: str) -> None:
        extra = self.kv_connector_extra_config
        if extra is None:
            return
        if not isinstance(extra, Mapping) or not all(isinstance(k, str) for k in extra):
            raise TopologyError(f"{owner}.kv_connector_extra_config={extra!r} must be a mapping of keys to values")
        object.__setattr__(self, "kv_connector_extra_config", dict(extra))
        if "backends" not in extra:
            return
        backends = extra["backends"]
        where = f"{owner}.kv_connector_extra_config.backends"
        if self.kv_connector not in NIXL_CONNECTORS:
            raise TopologyError(f"{where}={backends!r} is read by NIXL connectors only, not "
                                f"kv_connector={self.kv_connector!r}; allowed with: {', '.join(NIXL_CONNECTORS)}")
        if isinstance(backends, str) or not isinstance(backends, (list, tuple)) or not backends:
            raise TopologyError(f"{where}={backends!r} must be a non-empty list of NIXL backends such as "
                                "[UCX] or [UCX, GDS]")
        for backend in backends:
            if backend not in NIXL_BACKENDS:
                raise TopologyError(f"{where} has {backend!r}; allowed: {', '.join(NIXL_BACKENDS)}")
        if len(set(backends)) != len(backends):
            raise TopologyError(f"{where}={list(backends)!r} names a backend twice; give each once")

    # ---- what a release and an engine accept ---------------------------------------
    def check(self, vllm_version: str, engine: str = "vllm") -> None:
        """Raise :class:`TopologyError` unless vLLM ``vllm_version`` (its row in :mod:`epkit.vllm.versions`) has
        this connector and every field set, or, for ``engine="epkit"``, unless the built-in engine speaks it."""
        if engine == "epkit":
            if self.kv_connector not in BUILTIN_ENGINE_CONNECTORS:
                raise TopologyError(
                    f"kv_transfer_config.kv_connector={self.kv_connector!r}: the built-in engine implements "
                    f"{', '.join(BUILTIN_ENGINE_CONNECTORS)}'s protocol only; allowed: {', '.join(BUILTIN_ENGINE_CONNECTORS)} "
                    "(use engine vllm for other connectors)")
            return
        vllm_versions.check_kv_transfer_keys(vllm_version, self.explicit())
        if self.kv_connector_module_path is None:  # a connector loaded from a module path is the user's
            vllm_versions.check_kv_connector(vllm_version, self.kv_connector)

    # ---- (de)serialisation -----------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVTransferConfig":
        """Build from a mapping with vLLM's keys; unknown keys list every valid one."""
        if not isinstance(data, Mapping):
            raise TopologyError(f"kv_transfer_config={data!r} must be a mapping of vLLM's KVTransferConfig keys "
                                "or its JSON string")
        unknown = sorted(set(data) - set(cls.keys()), key=str)
        if unknown:
            raise TopologyError(f"kv_transfer_config has unknown key(s) {', '.join(map(str, unknown))}; "
                                f"valid keys: {', '.join(cls.keys())}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "KVTransferConfig":
        """Parse the ``--kv-transfer-config '{…}'`` JSON string."""
        data = json_object("kv_transfer_config", text, "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}'")
        return cls.from_dict(data)

    @classmethod
    def coerce(cls, value: Any) -> "KVTransferConfig | None":
        """A config from a mapping, a JSON string, a config or ``None`` (YAML and Python spell it any way)."""
        if value is None or isinstance(value, KVTransferConfig):
            return value
        if isinstance(value, str):
            return cls.from_json(value)
        return cls.from_dict(value)

    def explicit(self) -> dict[str, Any]:
        """The keys set by the user, in vLLM's order: what :meth:`to_json` renders."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dict(value) if f.name == "kv_connector_extra_config" else value
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.explicit()

    def to_json(self) -> str:
        """The ``--kv-transfer-config`` value: compact JSON of the keys set, as the seed writes it."""
        return json.dumps(self.explicit(), separators=(",", ":"))

    def replace(self, **changes: Any) -> "KVTransferConfig":
        """A copy with ``changes`` (e.g. the role of one side)."""
        return KVTransferConfig.from_dict({**self.explicit(), **changes})

    @property
    def uses_nixl(self) -> bool:
        return self.kv_connector in NIXL_CONNECTORS



def kv_transfer_warnings(config: KVTransferConfig | None, vllm_version: str, engine: str = "vllm") -> list[str]:
    """What is legal but probably not meant: ``kv_role='kv_both'`` with a NIXL connector, which vLLM logs as
    deprecated from :data:`~epkit.vllm.versions.KV_BOTH_DEPRECATED_FROM` (NixlBaseConnector.__init__; the seed
    uses it), and an unset ``kv_buffer_device`` where vLLM's default is still ``cuda`` (before 0.18.0)."""
    if config is None or engine != "vllm":
        return []
    row, notes = vllm_versions.release(vllm_version), []
    if config.kv_role == "kv_both" and config.uses_nixl and row.kv_both_deprecated:
        notes.append(f"kv_transfer_config.kv_role='kv_both' with {config.kv_connector}: vLLM {row.version} logs that "
                     f"it is deprecated and will be removed (vLLM >= {vllm_versions.KV_BOTH_DEPRECATED_FROM}); set "
                     "kv_role='kv_producer' on prefill instances and 'kv_consumer' on decode instances")
    if config.kv_buffer_device is None and row.key() < vllm_versions.release("0.18.0").key():
        notes.append(f"kv_transfer_config.kv_buffer_device is unset: vLLM {row.version} then takes 'cuda' (the "
                     "platform's device only from vLLM 0.18.0); on a CPU build set kv_buffer_device: cpu")
    return notes
