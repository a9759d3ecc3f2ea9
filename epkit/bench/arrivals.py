"""Arrival schedules: when each request is due, as offsets in seconds from the run start.

Pure functions of (count, rate, burstiness, seed). Gaps are gamma-distributed with shape
``burstiness`` and mean ``1/rate`` — ``burstiness=1`` is a Poisson process, ``inf`` a
constant gap, below 1 burstier — then rescaled so the last request is due at
``n/rate``, exactly as ``vllm bench serve``'s ``get_request`` does. ``rate=inf`` sends
everything at once (a ``max_concurrency`` semaphore then shapes the load).
"""

from __future__ import annotations

import math

import numpy as np


def check_load(request_rate: float, burstiness: float, max_concurrency: int | None) -> None:
    """Raise ``ValueError`` naming the bad knob; used before anything is sent."""
    if not request_rate > 0:  # also catches NaN
        raise ValueError(f"request_rate={request_rate!r} must be > 0 (use inf to send all at once)")
    if not burstiness > 0:
        raise ValueError(f"burstiness={burstiness!r} must be > 0 (1 = Poisson, inf = constant gaps)")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency!r} must be >= 1 or None (unbounded)")


def arrival_offsets_s(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Due time of each of ``n`` requests, seconds from the start, non-decreasing."""
    check_load(request_rate, burstiness, None)
    if n <= 0:
        return np.zeros(0)
    if math.isinf(request_rate):
        return np.zeros(n)
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / request_rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    due = np.cumsum(gaps)
    return due * ((n / request_rate) / due[-1])
