"""The host side of an engine step for ``epkit profile`` (:mod:`epkit.analysis.step_profile`): cpu ops by self
time, CUDA runtime/driver calls (which of them waited for the GPU, how many launches) and the host time outside
every recorded op, per step kind. Times in µs as the trace holds them; summaries in ms per step.

Per step, on the step's CPU thread, over the ``cpu_op`` and runtime/driver events that start inside its range:

- **in cpu ops**: the union of the top-level ``cpu_op`` intervals (an op nested in none other), clipped to the step;
- **runtime outside ops**: the union of the runtime/driver calls that lie in no ``cpu_op``, clipped to the step;
- **python/other** = wall − (in cpu ops + runtime outside ops): host time inside no recorded op — Python between
  ops, the engine's own bookkeeping, user-annotation sub-ranges without ops. An estimate: ops on other threads
  and time the profiler itself adds are not told apart;
- **host sync**: the summed duration of the calls that block the host on the GPU — ``cu[da]{Stream,Device,Event,
  Ctx}Synchronize`` and memcpy calls that block: a synchronous one (no ``Async`` in its name) or an ``Async`` one
  whose copy (the GPU memcpy event with its correlation) is DtoH into pageable memory;
- **launches**: kernel launch calls (``cudaLaunchKernel``, ``cudaLaunchKernelExC``, ``cuLaunchKernel``,
  ``cuLaunchKernelEx``, cooperative ones); **graph launches** (``cudaGraphLaunch``, ``cuGraphLaunch``) apart.

A runtime/driver call nested in another one on the same thread (a driver call the runtime made) is not counted
again. Pure: no imports from epkit.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

SYNC_RE = re.compile(r"^cu(?:da)?(?:Stream|Device|Event|Ctx)Synchroni[sz]e")
MEMCPY_RE = re.compile(r"^cu(?:da)?Memcpy")
LAUNCH_RE = re.compile(r"^cu(?:da)?Launch(?:Cooperative)?Kernel")
GRAPH_LAUNCH_RE = re.compile(r"^cu(?:da)?GraphLaunch")


def _span(e: dict) -> tuple[float, float]:
    ts = float(e.get("ts", 0.0))
    return ts, ts + float(e.get("dur", 0.0))


def _thread(e: dict) -> tuple:
    return e.get("pid"), e.get("tid")


def blocks_host(name: str, copy_name: str | None = None) -> bool:
    """Whether a runtime/driver call named ``name`` waits for the GPU (``copy_name``: its GPU copy's name)."""
    if SYNC_RE.match(name):
        return True
    if MEMCPY_RE.match(name):
        if "Async" not in name:
            return True
        return copy_name is not None and "DtoH" in copy_name and "Pageable" in copy_name
    return False


def union_us(intervals: list[tuple[float, float]], lo: float | None = None, hi: float | None = None) -> float:
    """Length of the union of ``(start, end)`` intervals, optionally clipped to ``[lo, hi]``."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        start, end = max(start, lo) if lo is not None else start, min(end, hi) if hi is not None else end
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            total += (cur_end - cur_start) if cur_end is not None else 0.0
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return total + ((cur_end - cur_start) if cur_end is not None else 0.0)


def nesting(events: list[dict]) -> list[tuple[dict, float, bool]]:
    """Each event with its self time (its duration less that of the events nested directly in it, same thread)
    and whether it is top level (nested in none)."""
    by_thread = defaultdict(list)
    for e in events:
        by_thread[_thread(e)].append(e)
    out = []
    for ops in by_thread.values():
        ops.sort(key=lambda e: (float(e.get("ts", 0.0)), -float(e.get("dur", 0.0))))
        stack: list[list] = []  # [event, end, children µs, top level]
        for e in ops:
            start, end = _span(e)
            while stack and start >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], float(done[0].get("dur", 0.0)) - done[2], done[3]))
            if stack:
                stack[-1][2] += end - start
            stack.append([e, end, 0.0, not stack])
        out += [(d[0], float(d[0].get("dur", 0.0)) - d[2], d[3]) for d in stack]
    return out


def top_entries(sums: dict[str, float], calls: Counter, n_steps: int, top: int, extra=None) -> list[dict]:
    """The ``top`` names by summed µs: name, ``extra(name)``'s keys, ms and calls per step."""
    ranked = sorted(sums.items(), key=lambda kv: -kv[1])[:top]
    return [{"name": name, **(extra(name) if extra else {}), "ms_per_step": us / 1e3 / n_steps,
             "calls_per_step": calls[name] / n_steps} for name, us in ranked]


def kind_host_summary(steps: list, has_gpu: bool, top: int) -> dict:
    """Per-step means of the host numbers of one kind's steps (each a ``Step`` of step_profile: ``start_us``,
    ``end_us``, ``cpu_ops`` [(name, self µs)], ``op_spans`` [top-level (start, end)], ``runtime``
    [(start, end, name, blocks host)])."""
    n = len(steps)
    in_ops = covered = 0.0
    for s in steps:
        in_ops += union_us(s.op_spans, s.start_us, s.end_us)
        covered += union_us(s.op_spans + [(a, b) for a, b, _, _ in s.runtime], s.start_us, s.end_us)
    wall = sum(s.end_us - s.start_us for s in steps)
    out = {"cpu_op_ms_per_step": in_ops / 1e3 / n, "python_other_ms_per_step": (wall - covered) / 1e3 / n}
    if has_gpu:
        sums, sync_sums, calls = defaultdict(float), defaultdict(float), Counter()
        for s in steps:
            for start, end, name, sync in s.runtime:
                sums[name] += end - start
                sync_sums[name] += (end - start) if sync else 0.0
                calls[name] += 1
        count = lambda pattern: sum(c for k, c in calls.items() if pattern.match(k)) / n  # noqa: E731
        out.update(runtime_outside_ops_ms_per_step=(covered - in_ops) / 1e3 / n,
                   host_sync_ms_per_step=sum(sync_sums.values()) / 1e3 / n,
                   launches_per_step=count(LAUNCH_RE), graph_launches_per_step=count(GRAPH_LAUNCH_RE),
                   runtime_calls=top_entries(sums, calls, n, top,
                                             lambda k: {"sync_ms_per_step": sync_sums[k] / 1e3 / n}))
    ops, op_calls = defaultdict(float), Counter()
    for s in steps:
        for name, self_us in s.cpu_ops:
            ops[name] += self_us
            op_calls[name] += 1
    out["top_cpu_ops"] = top_entries(ops, op_calls, n, top)
    for entry in out["top_cpu_ops"]:
        entry["self_ms_per_step"] = entry.pop("ms_per_step")
    return out


# ---- table rows (step_profile renders them) ----

HOST_COLUMNS_GPU = (("host sync ms/step", "host_sync_ms_per_step"), ("launches/step", "launches_per_step"),
                    ("graph launches/step", "graph_launches_per_step"))
PYTHON_COLUMN = ("python/other host ms/step", "python_other_ms_per_step")


def host_tables(label: str, kind: str, summary: dict, fmt, short) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of one kind's top cpu ops and (GPU traces) its runtime/driver calls."""
    out = []
    if summary["top_cpu_ops"]:
        rows = [[short(t["name"]), fmt(t["self_ms_per_step"]), fmt(t["calls_per_step"])]
                for t in summary["top_cpu_ops"]]
        out.append((f"{label}: top cpu ops by self time, {kind} steps", ["cpu op", "self ms/step", "calls/step"],
                    rows))
    if summary.get("runtime_calls"):
        rows = [[t["name"], fmt(t["ms_per_step"]), fmt(t["calls_per_step"]), fmt(t["sync_ms_per_step"])]
                for t in summary["runtime_calls"]]
        out.append((f"{label}: CUDA runtime/driver calls, {kind} steps",
                    ["call", "ms/step", "calls/step", "host sync ms/step"], rows))
    return out
