"""Triton kernels of the engine's GPU path, one module per concept.

- :mod:`~epkit.engine.kernels.attention`: paged decode attention, paged prefill attention and the one-launch
  K/V cache write;
- :mod:`~epkit.engine.kernels.norm_rope`: fused RMSNorm and fused (q/k-norm +) RoPE;
- :mod:`~epkit.engine.kernels.moe`: the fused router and the MoE row kernels (counting sort of the (token,
  expert) pairs, row gather, SiLU * up, weighted combine);
- :mod:`~epkit.engine.kernels.moe_gemm`: the expert-grouped GEMMs, one Triton tile per band of group size;
- :mod:`~epkit.engine.kernels.registry`: which kernel serves (each kernel's first-use self-check against
  PyTorch, one verdict per device, dtype and shape family) and the ``EPKIT_*`` switches that choose;
- :mod:`~epkit.engine.kernels.timing`: the CUDA-graph timing harness of the checks that also compare speed.

Each kernel has a launcher (``rms_norm``) and a gate (``rms_norm_enabled``) that says whether the kernel serves
a tensor; the engine calls the gate, then the launcher or its PyTorch path. This package re-exports both, so
callers write ``from epkit.engine import kernels`` and ``kernels.rms_norm(...)``.
"""

from epkit.engine.kernels.attention import (decode_kernel_enabled, paged_decode_attention, prefill_attention,
                                            prefill_block_tokens, prefill_kernel_enabled, prefill_programs,
                                            unsupported_reason, write_kv, write_kv_enabled)
from epkit.engine.kernels.moe import (combine_rows, gather_rows, group_pairs, moe_rows_enabled, route, route_enabled,
                                      silu_mul, silu_mul_enabled, sort_pairs, sort_pairs_enabled)
from epkit.engine.kernels.moe_gemm import (MOE_TILES, MoeTile, moe_gemm, moe_gemm_enabled, moe_gemms, moe_tile,
                                           moe_tiles)
from epkit.engine.kernels.norm_rope import (add_rms_norm, add_rms_norm_enabled, norm_rope, norm_rope_enabled, rms_norm,
                                            rms_norm_enabled)
from epkit.engine.kernels.registry import (check_environment, forget_verdicts, fused_kernels_off, kernel_choice,
                                           prefill_choice)

__all__ = [
    "add_rms_norm", "add_rms_norm_enabled", "check_environment", "combine_rows", "decode_kernel_enabled", "forget_verdicts", "fused_kernels_off",
    "gather_rows", "group_pairs", "kernel_choice", "MOE_TILES", "MoeTile", "moe_gemm", "moe_gemm_enabled", "moe_gemms",
    "moe_tile", "moe_rows_enabled", "moe_tiles", "norm_rope", "norm_rope_enabled", "paged_decode_attention", "prefill_attention",
    "prefill_block_tokens", "prefill_choice", "prefill_kernel_enabled", "prefill_programs", "rms_norm",
    "rms_norm_enabled", "route", "route_enabled", "silu_mul", "silu_mul_enabled", "sort_pairs", "sort_pairs_enabled", "unsupported_reason", "write_kv",
    "write_kv_enabled",
]
