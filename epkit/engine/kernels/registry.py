"""Which kernel serves a computation: each kernel's first-use self-check, and the ``EPKIT_*`` switches that choose.

Each kernel is used only where it was checked: on first use (per device, dtype and shape family)
it runs a small random case against the plain PyTorch computation and logs the outcome; a missing
Triton, an unsupported shape, or a mismatch leaves that computation on PyTorch (and says so).
:func:`kernel_serves` keeps one verdict per key. ``EPKIT_DECODE_ATTENTION=torch`` /
``EPKIT_FUSED_KERNELS=torch`` force the PyTorch paths (A/B runs; every ``EPKIT_*`` variable is listed in
``epkit.engine.config.ENV_VARS`` and docs/engine.md). On CPU the kernels run only under
``TRITON_INTERPRET=1`` (Triton's interpreter), as in the tests.
"""

from __future__ import annotations

import logging
import os

import torch

from epkit.engine.config import env_value

log = logging.getLogger("epkit.engine")

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

verdicts: dict[tuple, bool] = {}  # key of a kernel's shape family -> whether the kernel serves it


def kernel_serves(name: str, key: tuple, x: torch.Tensor, check, used: str = "Triton kernel",
                  fallback: str = "PyTorch") -> bool:
    """Whether kernel ``name`` serves ``key``: Triton present, a device it runs on, ``check()`` (None = passed) on first use.

    Logs ``name: used (checked against PyTorch)`` or ``name: fallback (why)`` once per key."""
    if key in verdicts:
        return verdicts[key]
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False  # decided at the next eager call (a check cannot run inside a CUDA graph capture)
    if triton is None:
        why = "Triton is not installed"
    elif x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why = f"device {x.device.type}"
    else:
        try:
            why = check()
        except Exception as exc:  # a compile or launch failure: stay on PyTorch, say why
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    verdicts[key] = why is None
    log.info("%s: %s", name, f"{used} (checked against PyTorch)" if why is None else f"{fallback} ({why})")
    return why is None


def forget_verdicts() -> None:
    """Drop every kernel's verdict: the next use checks again (after the ``EPKIT_*`` choices changed, in A/B runs)."""
    verdicts.clear()


def mismatch(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> str | None:
    """Why ``got`` fails a self-check against ``want``: a max error past the dtype's tolerance (times ``scale``); else None."""
    err = (got.float() - want.float()).abs().max().item()
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * max(1.0, scale)
    return None if err <= tol else f"self-check max error {err:.3g} > {tol:.3g}"


def check_environment() -> None:
    """Validate the engine's environment variables at engine start (a bad value fails there, not mid-step);
    raises :class:`~epkit.engine.config.EnvVarError` (a ValueError)."""
    from epkit.engine.config import check_environment as check_all

    check_all()


def kernel_choice(name: str) -> str:
    """The value of environment variable ``name`` (``EPKIT_PREFILL_ATTENTION``, ``EPKIT_MOE_GEMM``): ``auto``
    (default), ``triton`` or ``torch``; a bad value raises EnvVarError (a ValueError)."""
    return env_value(name)


def fused_kernels_off() -> bool:
    """``EPKIT_FUSED_KERNELS=torch`` (formerly ``EPKIT_FUSED_NORMS=0``): every small fused kernel stays on PyTorch."""
    return env_value("EPKIT_FUSED_KERNELS") == "torch"


def prefill_choice() -> str:
    """``EPKIT_PREFILL_ATTENTION``: ``auto`` (bursts of equal whole prompts through SDPA, other multi-token steps
    through the Triton prefill kernel), ``triton`` (the kernel for every multi-token step) or ``torch`` (SDPA only)."""
    return kernel_choice("EPKIT_PREFILL_ATTENTION")
