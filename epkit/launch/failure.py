"""Classify why a deployment or a point failed, from a node's exit and its log.

A failure is data (STYLE 7): a :class:`Failure` with a ``kind`` users can group by,
a one-line ``message`` and the ``log_tail`` that shows it. The patterns are the
messages PyTorch, NCCL, Gloo, CUDA and the kernel print; the first match wins, most
specific first.
"""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

# kind -> patterns (case-insensitive), in priority order.
PATTERNS: dict[str, tuple[str, ...]] = {
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


def match_log(text: str) -> tuple[str, str] | None:
    """(kind, matching line) of the first known error in ``text``, else None."""
    lines = text.splitlines()
    for kind, patterns in _COMPILED.items():
        for line in lines:
            if any(p.search(line) for p in patterns):
                return kind, line.strip()[:300]
    return None


def classify_exit(returncode: int | None, log_text: str, node: int | None = None,
                  what: str = "engine") -> Failure:
    """A node's engine exited (``returncode``) while it should have been serving: say why."""
    found = match_log(log_text)
    tail_text = "\n".join(log_text.splitlines()[-40:])
    if found:
        kind, line = found
        return Failure(kind, f"{what} exited with code {returncode}: {line}", tail_text, node)
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
            return line.strip()[:300]
    for line in lines:
        if _ERROR_LINE.search(line):
            return line.strip()[:300]
    return None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
