"""vLLM's own log as data: start-up facts, the all2all manager, EPLB balancedness.

Pure functions over the text of one node's log (``node<i>.log`` in a deployment's run folder:
the engine's stdout and stderr), plus :func:`read_engine_logs` that reads the files. Every
fact is a key of one flat dict, numbers with their unit in the name; a fact the log does not
state is left out (``None`` where a caller asks for it by name).

The patterns match vLLM's wording on its stable words only (``Model loading took … GiB … and
… seconds``), so the releases epkit meets read alike: 0.26.0 on GPU (two KV cache lines) and
0.32.0's CPU build (one line, ``CPU KV cache size``, no model-load or CUDA-graph line). Where
several ranks of one log print the same fact (DP engines, workers), durations are the slowest
rank's (the API server waits for every engine) and KV cache sizes the smallest (the rank that
binds). Balancedness lines are read by :func:`epkit.eplb.readers.read_vllm_log`, which the
built-in engine's EPLB lines match too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from epkit.eplb.readers import read_vllm_log

_NUM = r"(\d+(?:\.\d+)?)"
_INT = r"(\d[\d,]*)"  # vLLM prints token counts with thousands separators: 1,019,152

# vllm/v1/worker/gpu_model_runner.py (and gpu/model_runner.py): "Model loading took %s GiB memory and %.6f seconds";
# older releases: "Model loading took %.4f GiB and %.6f seconds". The CPU runner prints no such line.
_MODEL_LOAD = re.compile(rf"Model loading took {_NUM} GiB(?: memory)? and {_NUM} s")
# vllm/compilation/monitor.py: "%storch.compile took %.2f s in total" (older: "takes"); the prefix is a
# "[tag] " for an encoder's compile, which is not the language model's. Printed in VLLM_COMPILE mode only:
# the CPU build compiles in DYNAMO_TRACE_ONCE mode, inside the warm-up that vllm/v1/worker/cpu_model_runner.py
# brackets with "Warming up model for the compilation..." and "Warming up done." (absent with --enforce-eager).
_TORCH_COMPILE = re.compile(rf"(\[[^\]:]*\] )?torch\.compile (?:took|takes) {_NUM} s in total")
_CPU_WARMUP_START = re.compile(r"Warming up model for the compilation")
_CPU_WARMUP_DONE = re.compile(r"Warming up done\.")
# vllm/v1/worker/gpu_model_runner.py: "Graph capturing finished in %.0f secs, took %.2f GiB"
_GRAPH_CAPTURE = re.compile(rf"Graph capturing finished in {_NUM} secs?(?:, took {_NUM} GiB)?")
# vllm/v1/engine/core.py: "init engine (profile, create kv cache, warmup model) took %.2f s
# (compilation: %.2f s …)"; older releases: "… took %.2f seconds".
_ENGINE_INIT = re.compile(rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s"
                          rf"(?:econds)?(?: \(compilation: {_NUM} s)?")
# vllm/v1/core/kv_cache_utils.py: "%s KV cache size: %s tokens" where %s is GPU, CPU, XPU (+ " + host");
# 0.32 goes on in the same line with ", Maximum concurrency for %s tokens per request: %.2fx",
# 0.26 prints that as a line of its own.
_KV_TOKENS = re.compile(rf"(?:\b([A-Z]+(?: \+ host)?) )?KV cache size: {_INT} tokens")
_CONCURRENCY = re.compile(rf"Maximum concurrency for {_INT} tokens per request: {_NUM}x")
# vllm/v1/worker/gpu_worker.py: "Available KV cache memory: %s GiB"; vllm/v1/worker/cpu_worker.py:
# "Auto set (%s/%s) GiB for KV cache on node %d, …" or "Explicitly set (%s/%s) GiB for KV cache …".
_KV_MEMORY = re.compile(rf"(?:Available KV cache memory: {_NUM} GiB|(?:Auto|Explicitly) set \({_NUM}/[\d.]+\) GiB "
                        r"for KV cache)")
# vllm/distributed/device_communicators/cuda_communicator.py: "Using %s all2all manager." with the
# manager's class name (AgRsAll2AllManager, DeepEPLLAll2AllManager…); cpu_communicator.py: "Using
# allgather_reducescatter all2all manager." (the backend's name: the CPU build has that one only).
_ALL2ALL = re.compile(r"Using (\S+) all2all manager")
# vllm/entrypoints/launchers/api_server/entry.py (0.32) and api_server.py (0.26): "Starting vLLM server on %s";
# older releases: "Starting vLLM API server %d on %s". Then uvicorn's "Application startup complete."
_SERVER_START = re.compile(r"Starting vLLM (?:API )?server\b")
_STARTUP_COMPLETE = re.compile(r"Application startup complete")
# vllm/logger.py: "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d]" with datefmt "%m-%d %H:%M:%S"
# (uvicorn's own lines carry no time).
_STAMP = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+(?:(\d{4})-)?(\d\d)-(\d\d) "
                    r"(\d\d):(\d\d):(\d\d)(?:[.,](\d+))? \[")

STARTUP_KEYS = ("model_load_s", "model_load_gib", "torch_compile_s", "cuda_graph_capture_s", "cuda_graph_gib",
                "engine_init_s", "engine_init_compilation_s", "kv_cache_tokens", "kv_cache_device",
                "kv_cache_gib", "max_concurrency_request_tokens", "max_concurrency_x", "all2all_manager",
                "api_server_start_s")
BALANCEDNESS_KEYS = ("balancedness_count", "balancedness_last", "balancedness_mean")


def _tokens(text: str) -> int:
    return int(text.replace(",", ""))


def _stamp(match: re.Match) -> datetime:
    year, month, day, hour, minute, second, frac = match.groups()
    # no year in vLLM's stamps: a leap year keeps 02-29 valid; a new year inside a log is handled by the caller
    return datetime(int(year or 2000), int(month), int(day), int(hour), int(minute), int(second),
                    int((frac or "0")[:6].ljust(6, "0")))


def _seconds_between(start: datetime, end: datetime) -> float:
    delta = end - start
    if delta < timedelta(0):  # the log ran over a new year (stamps without a year)
        delta = end.replace(year=end.year + 1) - start
    return delta.total_seconds()


def startup_facts(text: str) -> dict:
    """What one vLLM log says about its start-up (see :data:`STARTUP_KEYS`).

    ``model_load_s``/``model_load_gib`` (weights), ``torch_compile_s`` (on the CPU build, which prints
    no compile time, the span of its compile warm-up, to the second), ``cuda_graph_capture_s``/
    ``cuda_graph_gib``, ``engine_init_s`` (vLLM's "init engine (profile, create kv cache, warmup
    model)") and its ``engine_init_compilation_s``, ``kv_cache_tokens`` with ``kv_cache_device``
    (``GPU``/``CPU``) and ``kv_cache_gib``, ``max_concurrency_x`` for requests of
    ``max_concurrency_request_tokens`` tokens, ``all2all_manager`` as vLLM names it, and
    ``api_server_start_s``: seconds from the log's first time-stamped line to the API server's
    "Application startup complete" (timed by the last stamp before it), or to "Starting vLLM
    server" when uvicorn's line is missing. Keys the log does not state are absent."""
    maxima: dict[str, float] = {}
    minima: dict[str, float] = {}
    facts: dict = {}
    first = last = None
    server_at = ready_at = warmup_from = warmup_to = None

    def most(key, value):
        maxima[key] = max(maxima.get(key, value), value)

    def least(key, value):
        minima[key] = min(minima.get(key, value), value)

    for line in text.splitlines():
        stamp = _STAMP.search(line)
        if stamp:
            last = _stamp(stamp)
            first = first or last
        if m := _MODEL_LOAD.search(line):
            most("model_load_gib", float(m.group(1)))
            most("model_load_s", float(m.group(2)))
        if (m := _TORCH_COMPILE.search(line)) and not m.group(1):
            most("torch_compile_s", float(m.group(2)))
        if m := _GRAPH_CAPTURE.search(line):
            most("cuda_graph_capture_s", float(m.group(1)))
            if m.group(2):
                most("cuda_graph_gib", float(m.group(2)))
        if m := _ENGINE_INIT.search(line):
            most("engine_init_s", float(m.group(1)))
            if m.group(2):
                most("engine_init_compilation_s", float(m.group(2)))
        if m := _KV_TOKENS.search(line):
            least("kv_cache_tokens", _tokens(m.group(2)))
            if m.group(1):
                facts.setdefault("kv_cache_device", m.group(1))
        if m := _CONCURRENCY.search(line):
            facts.setdefault("max_concurrency_request_tokens", _tokens(m.group(1)))
            least("max_concurrency_x", float(m.group(2)))
        if m := _KV_MEMORY.search(line):
            least("kv_cache_gib", float(m.group(1) or m.group(2)))
        if _CPU_WARMUP_START.search(line) and warmup_from is None:
            warmup_from = last
        if _CPU_WARMUP_DONE.search(line) and warmup_from is not None:
            warmup_to = last
        if m := _ALL2ALL.search(line):
            facts.setdefault("all2all_manager", m.group(1))
        if _SERVER_START.search(line) and server_at is None:
            server_at = last
        if _STARTUP_COMPLETE.search(line) and ready_at is None:
            ready_at = last
    facts.update(maxima)
    facts.update(minima)
    if "torch_compile_s" not in facts and warmup_from is not None and warmup_to is not None:
        facts["torch_compile_s"] = _seconds_between(warmup_from, warmup_to)
    end = ready_at or server_at
    if first is not None and end is not None:
        facts["api_server_start_s"] = _seconds_between(first, end)
    for key in ("kv_cache_tokens", "max_concurrency_request_tokens"):
        if key in facts:
            facts[key] = int(facts[key])
    return {k: facts[k] for k in STARTUP_KEYS if k in facts}


def balancedness(texts: Iterable[str]) -> dict:
    """Summary of the EPLB balancedness lines of one or more logs (vLLM's ``EPLB step … balancedness=``,
    read by :func:`epkit.eplb.readers.read_vllm_log`), in the order given: ``balancedness_count``,
    ``balancedness_last`` and ``balancedness_mean``; empty when no log has such a line."""
    values: list[float] = []
    for text in texts:
        values += read_vllm_log(text.splitlines())["balancedness"].tolist()
    if not values:
        return {}
    return {"balancedness_count": len(values), "balancedness_last": float(values[-1]),
            "balancedness_mean": float(sum(values) / len(values))}


def engine_log_facts(node_texts: Sequence[str], *, startup: bool = True) -> dict:
    """One deployment's facts from its node logs (node 0 first): start-up facts of node 0's log
    (when ``startup``) and the balancedness summary of every node's log."""
    facts = startup_facts(node_texts[0]) if (startup and node_texts) else {}
    facts.update(balancedness(node_texts))
    return facts


def read_engine_logs(paths: Sequence[str | Path], *, startup: bool = True) -> dict:
    """:func:`engine_log_facts` of the node logs at ``paths`` (node 0 first); a missing log reads as empty."""
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(errors="replace"))
        except OSError:
            texts.append("")
    return engine_log_facts(texts, startup=startup)
