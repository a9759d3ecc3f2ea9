"""all2all backends by name: the ones the built-in engine implements, and the vendor package each other needs.

Plain data shared by both sides of the engine boundary: the built-in engine (``epkit/engine/all2all.py``) builds
its ``--all2all-backend`` table from it, and the rest of epkit reads it where it needs to know which kernel
package a backend asks for (the local executor looks for that package in vLLM's interpreter). DESIGN.md lets
``epkit/engine`` import only ``eplb/`` and ``models.py`` from the rest of epkit; this module is the one further
exception, so neither side imports the other. Stdlib only (no torch): importing it must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = ["BUILTIN_BACKENDS", "KV_BUFFER_DEVICES", "KV_LOAD_FAILURE_POLICIES", "KV_ROLES", "NIXL_BACKENDS",
           "VendorPackage", "VENDOR_PACKAGES"]

# --kv-transfer-config words both the topology checks and the built-in engine's own flag check use.
KV_ROLES: tuple[str, ...] = ("kv_producer", "kv_consumer", "kv_both")  # vLLM's KVRole Literal
# What vLLM's connectors take as a buffer device: KVTransferConfig's doc ("Choices are 'cuda', 'cpu' and
# 'xpu'") and NixlConnector's _NIXL_SUPPORTED_DEVICE (vllm 0.32.0 nixl/utils.py:18). Unset: the platform's device.
KV_BUFFER_DEVICES: tuple[str, ...] = ("cuda", "cpu", "xpu")
KV_LOAD_FAILURE_POLICIES: tuple[str, ...] = ("recompute", "fail")
# NIXL backend (plugin) names for kv_connector_extra_config.backends: the plugins the nixl-cu12 1.5.1 wheel ships
# (libplugin_<NAME>.so), then the ones only a NIXL built from source has (src/plugins/meson.build of ai-dynamo/nixl).
NIXL_BACKENDS: tuple[str, ...] = ("UCX", "GDS", "GDS_MT", "POSIX", "OBJ", "AZURE_BLOB", "LIBFABRIC", "GPUNETIO", "GUSLI",
                                  "INFINIA", "MOONCAKE", "UCCL", "HF3FS", "TCPXO")

# The algorithms the built-in engine runs itself over torch.distributed (docstring of epkit/engine/all2all.py).
BUILTIN_BACKENDS: tuple[str, ...] = ("allgather_reducescatter", "naive", "all_to_all")

EP_KERNELS = "vLLM's EP kernels installer (tools/ep_kernels, see the expert-parallel deployment guide)"


@dataclass(frozen=True)
class VendorPackage:
    """The kernel library behind a vendor backend: its Python ``module``, the ``package`` users know it by, and
    how to ``install`` it."""

    module: str
    package: str
    install: str


# Backends that exist only as a vendor kernel library (vLLM runs them; the built-in engine refuses them).
VENDOR_PACKAGES: Mapping[str, VendorPackage] = MappingProxyType({
    "pplx": VendorPackage("pplx_kernels", "pplx-kernels", EP_KERNELS),
    "deepep_high_throughput": VendorPackage("deep_ep", "DeepEP", EP_KERNELS),
    "deepep_low_latency": VendorPackage("deep_ep", "DeepEP", EP_KERNELS),
    "flashinfer_all2allv": VendorPackage("flashinfer", "flashinfer",
                                         "`pip install flashinfer-python` (FlashInfer, with MNNVL support)"),
    "mori": VendorPackage("mori", "MoRI", "ROCm's MoRI build instructions (https://github.com/ROCm/mori)"),
})
