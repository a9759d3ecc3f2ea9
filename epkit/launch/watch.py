"""Watch a serving deployment while load runs against it, so that a point ends within seconds of its death.

``DeploymentWatch(deployment).poll()`` returns a :class:`~epkit.launch.failure.Failure` as soon as
a node's engine has ended (its record ``node<i>.json``), a node logged an OOM / NCCL / Gloo error,
the Slurm job has ended (cancel, time limit, node failure), or the API stopped answering
``/health`` (connection refused or an error status several times in a row; a ``/health`` that
only times out for ``hang_timeout_s`` is a hang). Each poll is cheap, because it runs beside a
load generator whose timings it must not disturb: a node record is read only when its mtime
changes, a log only from where the last poll stopped, the job state every ``job_every_s`` and
``/health`` every ``health_every_s``.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from epkit.launch.deployment import FAIL_FAST_KINDS
from epkit.launch.failure import Failure, fatal, match_log, tail
from epkit.launch.node import node_file, read_json

if TYPE_CHECKING:
    from epkit.launch.deployment import Deployment

MAX_LOG_READ_BYTES = 256 * 1024


class DeploymentWatch:
    """Polls one deployment for the first sign that it stopped serving."""

    def __init__(self, deployment: "Deployment", health_every_s: float = 2.0, job_every_s: float = 5.0,
                 health_timeout_s: float = 5.0, refused_limit: int = 3):
        self.deployment = deployment
        self.health_every_s = health_every_s
        self.job_every_s = job_every_s
        self.health_timeout_s = health_timeout_s
        self.refused_limit = refused_limit
        nodes = range(deployment.topology.nodes)
        self._record_mtime = {n: None for n in nodes}
        self._log_pos = {n: _size(deployment.logs[n]) for n in nodes}  # the start-up log was checked before
        self._log_rest = {n: b"" for n in nodes}
        self._job_t = self._health_t = time.monotonic()
        self._refused: list[str] = []
        self._unanswered_since: float | None = None

    def poll(self) -> Failure | None:
        """The first failure seen since the last poll, else None."""
        d = self.deployment
        for n in range(d.topology.nodes):
            failure = self._node_record(n) or self._node_log(n)
            if failure is not None:
                return failure
        now = time.monotonic()
        if now - self._job_t >= self.job_every_s:
            self._job_t = now
            problem = d.handle.problem()
            if problem is not None:
                return problem
        if now - self._health_t >= self.health_every_s:
            self._health_t = now
            return self._health()
        return None

    def _node_record(self, n: int) -> Failure | None:
        path = node_file(self.deployment.run_dir, n, "json")
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        if mtime == self._record_mtime[n]:
            return None
        self._record_mtime[n] = mtime
        info = read_json(path)
        return self.deployment.node_ended(n, info) if "returncode" in info else None

    def _node_log(self, n: int) -> Failure | None:
        path = self.deployment.logs[n]
        size = _size(path)
        pos = self._log_pos[n]
        if size <= pos:
            if size < pos:  # truncated: start over
                self._log_pos[n], self._log_rest[n] = 0, b""
            return None
        start = max(pos, size - MAX_LOG_READ_BYTES)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return None
        self._log_pos[n] = size
        data = (self._log_rest[n] if start == pos else b"") + data
        complete, _, rest = data.rpartition(b"\n")
        self._log_rest[n] = rest[-4096:]
        found = match_log(complete.decode("utf-8", "replace"))
        if found and found[0] in FAIL_FAST_KINDS:
            return fatal(tail(path, 200), n, FAIL_FAST_KINDS) or Failure(found[0], f"node {n}: {found[1]}",
                                                                          tail(path, 40), n)
        return None

    def _health(self) -> Failure | None:
        d = self.deployment
        outcome = _probe(d.url + "/health", self.health_timeout_s) if d.url else "no URL yet"
        now = time.monotonic()
        if outcome == "ok":
            self._refused, self._unanswered_since = [], None
            return None
        if outcome == "timeout":
            self._unanswered_since = self._unanswered_since or now
            if now - self._unanswered_since > d.hang_timeout_s:
                return Failure("hang", f"{d.url}/health has not answered for {now - self._unanswered_since:.0f} s "
                                       f"(hang_timeout_s={d.hang_timeout_s:.0f})", d.log_tail(0), 0)
            return None
        self._unanswered_since = None
        self._refused.append(outcome)
        if len(self._refused) < self.refused_limit:
            return None
        # The API is gone: a node record usually says why a moment later (its supervisor notices within poll_s).
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            found = d.check()
            if found is not None:
                return found
            time.sleep(0.25)
        return Failure("http", f"{d.url}/health failed {len(self._refused)} times in a row ({self._refused[-1]}) "
                               "while every node's engine process still runs", d.log_tail(0), 0)


def _probe(url: str, timeout_s: float) -> str:
    """``ok``, ``timeout``, or what went wrong (refused, an HTTP error status…)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return "ok" if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            return "timeout"
        return str(exc.reason)
    except (socket.timeout, TimeoutError):
        return "timeout"
    except OSError as exc:
        return str(exc)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
