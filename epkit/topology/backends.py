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

__all__ = ["BUILTIN_BACKENDS", "VendorPackage", "VENDOR_PACKAGES"]

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
