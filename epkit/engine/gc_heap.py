"""Keep the start-up heap out of Python's cyclic garbage collector, as vLLM's engine core and API server do
(``freeze_gc_heap``): everything alive once a process is ready - torch, Triton, the model's modules, the
tokenizer - is moved to the permanent generation, so a full collection while serving scans only what serving
made. A full collection of a torch process's start-up heap paused it for 89 ms (engine core) and 100 ms (API
server) on the H100 machine of 2026-12-06: in the engine core a pause delays the next step, in the API server every
stream's next chunk. (The ~40 ms late-then-early tokens measured that day were not these pauses but Nagle's
algorithm on the core's links: :func:`epkit.engine.core.without_nagle`.)"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("epkit.engine")


def freeze_startup_heap(who: str) -> dict:
    """Collect, then freeze what survives; log how long a full collection took before and after (the pause it
    saves). Returns ``{"objects": frozen, "before_ms": ..., "after_ms": ...}``."""
    started = time.perf_counter()
    gc.collect()
    before_ms = (time.perf_counter() - started) * 1e3
    gc.freeze()
    started = time.perf_counter()
    gc.collect()
    after_ms = (time.perf_counter() - started) * 1e3
    out = {"objects": gc.get_freeze_count(), "before_ms": before_ms, "after_ms": after_ms}
    log.info("%s: froze the start-up heap for the garbage collector (%d objects; a full collection took %.1f ms "
             "before, %.1f ms after)", who, out["objects"], before_ms, after_ms)
    return out
