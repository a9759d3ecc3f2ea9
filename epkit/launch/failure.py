"""Classify why a deployment or a point failed, from a node's exit and its log.

A failure is data (STYLE 7): a :class:`Failure` with a ``kind`` users can group by,
a one-line ``message`` and the ``log_tail`` that shows it. The patterns are the
messages vLLM, PyTorch, NCCL, Gloo, CUDA and the kernel print; the first match wins, most
specific first. Where the kind says what to change (``kv_cache``: which memory knob to raise or
lower), the message says it too (:data:`ADVICE`), and the log tail keeps the matching line even
when the process printed long tracebacks after it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

# kind -> patterns (case-insensitive), in priority order.
PATTERNS: dict[str, tuple[str, ...]] = {
    # vLLM's KV cache sizing refused (vllm/v1/core/kv_cache_utils.py; vLLM's CPU worker): ValueErrors that the
    # "config" patterns would otherwise take, and an out-of-memory that is no allocation failure ("oom")
    "kv_cache": (r"No available memory for the cache blocks",
                 r"KV cache is needed, which is larger than the available KV cache memory",
                 r"on kv cache allocation is less than requested memory for kv",
                 r"is less than desired CPU memory utilization"),
    "oom": (r"CUDA out of memory", r"OutOfMemoryError", r"torch\.OutOfMemoryError", r"Cannot allocate memory",
            r"std::bad_alloc", r"MemoryError", r"oom-kill", r"Out of memory"),
    "nccl": (r"NCCL error", r"ncclInternalError", r"ncclSystemError", r"ncclUnhandledCudaError",
             r"ncclRemoteError", r"NCCL WARN .*(timeout|failed)", r"ProcessGroupNCCL.*(Watchdog|timeout)"),
    "gloo": (r"\[enforce fail at .*gloo", r"gloo/transport", r"Gloo connectFullMesh failed", r"ProcessGroupGloo",
             r"DistNetworkError", r"DistStoreError", r"TCPStore.*(timed out|refused)"),
    "address_in_use": (r"Address already in use", r"EADDRINUSE"),
    "config": (r"EngineError", r"TopologyError", r"error: (unrecognized|argument)", r"invalid choice",
               r"ValueError: .*(must|not supported|allowed)"),
    "import": (r"ModuleNotFoundError", r"ImportError"),
}
_COMPILED = {kind: [re.compile(p, re.IGNORECASE) for p in pats] for kind, pats in PATTERNS.items()}

KINDS = (*PATTERNS, "exit", "killed", "hang", "timeout", "cancelled", "http", "bench", "lost")


@dataclass(frozen=True)
class Failure:
    """Why something ended: ``kind`` (one of :data:`KINDS`), a message, the log tail, the node;
    ``traceback`` when the cause was an exception in epkit itself (kinds ``lost`` and ``bench``)."""

    kind: str
    message: str
    log_tail: str = ""
    node: int | None = None
    traceback: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.traceback:
            del out["traceback"]
        return out

    def __str__(self) -> str:
        where = f" on node {self.node}" if self.node is not None else ""
        return f"[{self.kind}]{where} {self.message}"


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


# vLLM's logger prefix: "(Worker pid=4036) ERROR 12-06 03:38:53 [multiproc_executor.py:1063] " (the process tag
# only when several processes share the log).
_VLLM_PREFIX = re.compile(r"^(?:\([^()]*pid=\d+\)\s+)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d "
                          r"\d\d:\d\d:\d\d(?:\.\d+)?\s+\[[^\]]*\]\s+)?")


def _said(line: str, limit: int = 300) -> str:
    """A log line as a message: stripped, without vLLM's logger prefix, at most ``limit`` characters."""
    return _VLLM_PREFIX.sub("", line.strip(), count=1)[:limit]


def _first_match(lines: list[str]) -> tuple[str, int] | None:
    for kind, patterns in _COMPILED.items():
        for i, line in enumerate(lines):
            if any(p.search(line) for p in patterns):
                return kind, i
    return None


def match_log(text: str) -> tuple[str, str] | None:
    """(kind, matching line without vLLM's logger prefix) of the first known error in ``text``, else None."""
    lines = text.splitlines()
    found = _first_match(lines)
    return (found[0], _said(lines[found[1]])) if found else None


_GIB = r"(-?\d+(?:\.\d+)?)"
_KV_REQUESTED = re.compile(r"less than requested memory for kv \(" + _GIB + "/" + _GIB + r" GiB\)", re.IGNORECASE)
_KV_EXPLICIT = re.compile(r"less than requested memory for kv \(" + _GIB + r" GiB\)", re.IGNORECASE)
_KV_MAX_LEN = re.compile(r"estimated maximum model length is (\d+)", re.IGNORECASE)
_CPU_NOTE = "on vLLM's CPU build it is the share of host memory vLLM takes"


def kv_cache_advice(line: str) -> str:
    """What to change when vLLM refused to size its KV cache, from the line that says so (vLLM's own advice
    is cut off in a one-line message, and on its CPU build it says "Reduce CPU memory used by other
    processes" also when the share asked for is below what its worker already holds)."""
    if re.search(r"No available memory for the cache blocks", line, re.IGNORECASE):
        return ("nothing is left for the KV cache once the weights and activations are in: raise "
                f"gpu_memory_utilization ({_CPU_NOTE}), or --kv-cache-memory-bytes where extra_args set it")
    if re.search(r"larger than the available KV cache memory", line, re.IGNORECASE):
        fits = _KV_MAX_LEN.search(line)
        longest = f" (vLLM's estimate of the longest that fits: {fits.group(1)})" if fits else ""
        return ("the KV cache cannot hold one request of max_model_len tokens: raise gpu_memory_utilization or "
                f"lower max_model_len{longest}")
    requested = _KV_REQUESTED.search(line)
    if requested and float(requested.group(1)) <= 0:
        return (f"gpu_memory_utilization times host memory ({requested.group(2)} GiB) is less than what vLLM's "
                f"worker already holds (weights, activations), so nothing is left for the KV cache: raise "
                f"gpu_memory_utilization ({_CPU_NOTE})")
    if requested:
        return (f"the KV cache's share of host memory ({requested.group(1)} GiB) is more than is free: lower "
                "gpu_memory_utilization or free host memory")
    explicit = _KV_EXPLICIT.search(line)
    if explicit:
        return (f"the KV cache size set ({explicit.group(1)} GiB) is more than the free host memory: lower "
                "--kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE) or free host memory")
    if re.search(r"desired CPU memory utilization", line, re.IGNORECASE):
        return (f"gpu_memory_utilization asks for more host memory than is free ({_CPU_NOTE}): lower it or free "
                "host memory")
    return "raise gpu_memory_utilization or lower max_model_len"


# kind -> what to change, from the matching line; appended to the failure's message.
ADVICE = {"kv_cache": kv_cache_advice}


def _tail_showing(lines: list[str], index: int, count: int = 40, before: int = 2) -> str:
    """The last ``count`` lines; when line ``index`` (the cause) is older, it and ``before`` lines before it first."""
    last = lines[-count:]
    start = len(lines) - len(last)
    if index >= start:
        return "\n".join(last)
    head = lines[max(0, index - before):index + 1]
    skipped = start - index - 1
    gap = [f"[... {skipped} lines ...]"] if skipped else []
    return "\n".join(head + gap + last)


def fatal(log_text: str, node: int, kinds: tuple[str, ...]) -> Failure | None:
    """The first known error in ``log_text`` when it is one of ``kinds`` (those that end a deployment while
    its engine may still be running): its line, what to change, and a tail that shows it."""
    lines = log_text.splitlines()
    found = _first_match(lines)
    if found is None or found[0] not in kinds:
        return None
    kind, index = found
    advice = ADVICE[kind](_said(lines[index], limit=2000)) if kind in ADVICE else ""
    return Failure(kind, f"node {node}: {_said(lines[index])}" + (f" -- {advice}" if advice else ""),
                   _tail_showing(lines, index), node)


def classify_exit(returncode: int | None, log_text: str, node: int | None = None,
                  what: str = "engine") -> Failure:
    """A node's engine exited (``returncode``) while it should have been serving: say why."""
    lines = log_text.splitlines()
    found = _first_match(lines)
    tail_text = "\n".join(lines[-40:])
    if found:
        kind, index = found
        advice = ADVICE[kind](_said(lines[index], limit=2000)) if kind in ADVICE else ""
        message = f"{what} exited with code {returncode}: {_said(lines[index])}" + (f" -- {advice}" if advice else "")
        return Failure(kind, message, _tail_showing(lines, index), node)
    if returncode is not None and returncode in (-9, 137):
        return Failure("killed", f"{what} was killed (SIGKILL, code {returncode}): often the kernel's OOM killer",
                       tail_text, node)
    said = error_line(log_text)
    said = f": {said}" if said else ""
    if returncode is not None and returncode < 0:
        return Failure("exit", f"{what} died of signal {signal_name(-returncode)} (code {returncode}){said}",
                       tail_text, node)
    return Failure("exit", f"{what} exited with code {returncode}{said}", tail_text, node)


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit)): \S")
_ERROR_LINE = re.compile(r"\b(ERROR|error:|Error:|FATAL|fatal:)")


def error_line(text: str) -> str | None:
    """The line that says why a process failed: a traceback's last exception line, else the first error line."""
    lines = text.splitlines()
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return _said(line)
    for line in lines:
        if _ERROR_LINE.search(line):
            return _said(line)
    return None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
