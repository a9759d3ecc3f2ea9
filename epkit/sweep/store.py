"""The results store: one JSON per point under ``results/<sweep>/<topology_id>/``, written atomically.

A point's file is ``BenchResult.to_vllm_json()`` (vLLM bench keys at the top level) whose
``"epkit"`` dict also holds ``"point"`` (what ran, where, how it ended); a failed point
writes the same file with ``status: failed``, its failure and no metrics. The request
table lies next to it as ``<stem>.requests.parquet`` (written first, so a JSON never
points at a missing table); node logs under ``<topology_id>/logs/``. The JSON is the
resume index: a point whose file says ``ok`` is done. See docs/sweep.md for the contract.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from epkit.errors import LaunchError
from epkit.tables import REQUESTS_PARQUET

STATUSES = ("ok", "failed")


def _plain(obj: Any) -> Any:
    """JSON-safe: inf -> "inf", NaN -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultStore:
    """``root/<sweep>/``: the sweep's spec, one folder per topology, one JSON per point."""

    def __init__(self, root: str | Path, sweep: str):
        self.root = Path(root)
        self.sweep = sweep
        self.dir = self.root / sweep

    def topology_dir(self, topology_id: str) -> Path:
        return self.dir / topology_id

    def logs_dir(self, topology_id: str) -> Path:
        return self.topology_dir(topology_id) / "logs"

    @staticmethod
    def stem(workload_id: str, repeat: int, repeats: int) -> str:
        return f"{workload_id}__r{repeat}" if repeats > 1 else workload_id

    def point_path(self, topology_id: str, workload_id: str, repeat: int = 0, repeats: int = 1) -> Path:
        return self.topology_dir(topology_id) / f"{self.stem(workload_id, repeat, repeats)}.json"

    @staticmethod
    def requests_path(json_path: Path) -> Path:
        return json_path.with_name(json_path.stem + ".requests.parquet")

    def status(self, path: Path) -> str | None:
        """``"ok"``, ``"failed"`` or None (not run, or unreadable: then it runs again)."""
        try:
            doc = json.loads(path.read_text())
            return doc["epkit"]["point"]["status"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_spec(self, text: str) -> Path:
        path = self.dir / "sweep.yaml"
        atomic_write_text(path, text)
        return path

    def write_point(self, path: Path, doc: dict, requests=None) -> Path:
        """Write one point: its request table (if any) first, then its JSON, both atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        rp = self.requests_path(path)
        if requests is not None:
            tmp = rp.with_name(f".{rp.name}.tmp{os.getpid()}")
            requests.to_parquet(tmp, index=False, **REQUESTS_PARQUET)
            os.replace(tmp, rp)
        elif rp.exists():
            rp.unlink()  # a failed retry must not leave an older run's table beside it
        atomic_write_text(path, json.dumps(_plain(doc), indent=1))
        return path

    def append_event(self, topology_id: str, event: dict) -> None:
        """One line per deployment in ``<topology_id>/deployments.jsonl`` (start-ups, failures, timings)."""
        path = self.topology_dir(topology_id) / "deployments.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(_plain(event)) + "\n")

    def run_dirs(self) -> list[Path]:
        """Every deployment's run folder (``<topology_id>/logs/<stamp>-<id>/``), and inside a disaggregated one each
        instance's (``…/prefill0/``, with a ``deployment.json`` of its own)."""
        tops = [p for p in self.dir.glob("*/logs/*") if p.is_dir()]
        return sorted(tops + [p.parent for p in self.dir.glob("*/logs/*/*/deployment.json")])

    @staticmethod
    def topology_of(run_dir: Path) -> str:
        """The topology id a run folder belongs to (the folder above ``logs/``)."""
        parts = Path(run_dir).parts
        if "logs" not in parts:
            return Path(run_dir).parent.parent.name
        return parts[len(parts) - 1 - parts[::-1].index("logs") - 1]

    @contextlib.contextmanager
    def driver_lock(self) -> Iterator[None]:
        """Hold ``<sweep>/.driver.lock`` while a driver runs the sweep: a second driver of the same results
        folder is refused (naming the first), and a lock left by a killed driver is free (the kernel drops it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / ".driver.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise LaunchError(f"another epkit sweep driver runs sweep {self.sweep!r} in {self.dir} "
                                  f"({holder}); wait for it to finish or stop it, then run again") from None
            except OSError:  # a filesystem without locks: run unguarded rather than not at all
                yield
                return
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def points(self) -> list[Path]:
        """Every point JSON in the sweep."""
        return sorted(p for p in self.dir.glob("*/*.json"))
