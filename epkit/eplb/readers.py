"""Read recorded EPLB data: vLLM's ``EPLB step`` log lines and epkit trace files.

vLLM logs only aggregates (no per-expert loads), so its log lines become a table to
compare with the simulator's ``balancedness`` column; per-expert traces come from
the built-in engine in the format documented in ``docs/eplb.md`` (NPZ or JSON) and
read with :func:`read_trace`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from epkit.eplb.traces import Trace

TRACE_FORMAT = "epkit-eplb-trace"
TRACE_VERSION = 1

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|inf|nan)"
# vLLM before the multi-model EplbState: "EPLB step: avg_tokens=%.2f, max_tokens=%d, balancedness=%.4f"
# vLLM after it: "EPLB step: %d for model %s: avg_tokens=…, max_tokens=…, balancedness=…"
#   optionally followed by ", steps until the next rearrangement: %d"
_VLLM_LINE = re.compile(
    r"EPLB step:\s*(?:(?P<step>\d+) for model (?P<model>.*?):\s*)?"
    rf"avg_tokens={_NUM},\s*max_tokens={_NUM},\s*balancedness={_NUM}"
    r"(?:,\s*steps until the next rearrangement:\s*(?P<until>-?\d+))?"
)
_REARRANGED = re.compile(r"Rearranged experts.*?in\s+([\d.]+)\s*s")


def read_vllm_log(source: str | Path | Iterable[str]) -> pd.DataFrame:
    """One row per ``EPLB step`` line of a vLLM log (a path, the text, or lines).

    Columns: ``line`` (1-based), ``format`` (``old``/``new``), ``step`` (vLLM's
    rearrangement-step counter, new format only), ``model``, ``avg_tokens``,
    ``max_tokens``, ``balancedness``, ``steps_until_rearrangement`` and
    ``rearranged_before`` (how many ``Rearranged experts … in X s`` lines came
    before it, so rows split into placement epochs).
    """
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and Path(source).exists()):
        lines: Iterable[str] = Path(source).read_text(errors="replace").splitlines()
    elif isinstance(source, str):
        lines = source.splitlines()
    else:
        lines = source
    rows, rearrangements = [], 0
    for number, text in enumerate(lines, 1):
        if _REARRANGED.search(text):
            rearrangements += 1
            continue
        match = _VLLM_LINE.search(text)
        if not match:
            continue
        new = match.group("model") is not None
        rows.append({
            "line": number,
            "format": "new" if new else "old",
            "step": int(match.group("step")) if new else None,
            "model": match.group("model") if new else None,
            "avg_tokens": float(match.group(3)),
            "max_tokens": float(match.group(4)),
            "balancedness": float(match.group(5)),
            "steps_until_rearrangement": int(match.group("until")) if match.group("until") else None,
            "rearranged_before": rearrangements,
        })
    columns = ["line", "format", "step", "model", "avg_tokens", "max_tokens", "balancedness",
               "steps_until_rearrangement", "rearranged_before"]
    return pd.DataFrame(rows, columns=columns)


def read_trace(path: str | Path) -> Trace:
    """Read an epkit EPLB trace (``.npz`` or ``.json``, format in ``docs/eplb.md``) as logical loads."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            fields = {k: data[k] for k in data.files}
        if "load" not in fields:
            raise ValueError(f"{path}: an EPLB trace needs a 'load' array [steps, layers, experts]; has {sorted(fields)}")
        kind = str(fields["kind"]) if "kind" in fields else ("physical" if "physical_to_logical" in fields else "logical")
        p2l = fields.get("physical_to_logical")
        num_logical = int(fields["num_logical_experts"]) if "num_logical_experts" in fields else None
        return _build(path, kind, fields["load"], p2l, num_logical, fields.get("step"), {"source": str(path)})
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        if doc.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path}: 'format' must be {TRACE_FORMAT!r}; got {doc.get('format')!r}")
        steps = doc.get("steps") or []
        if not steps:
            raise ValueError(f"{path}: 'steps' is empty")
        load = np.array([s["load"] for s in steps], dtype=np.float64)
        kind = doc.get("kind", "logical")
        p2l = None
        if kind == "physical":
            current = doc.get("physical_to_logical")
            maps = []
            for s in steps:
                current = s.get("physical_to_logical", current)
                if current is None:
                    raise ValueError(f"{path}: physical trace needs 'physical_to_logical' (top level or per step)")
                maps.append(current)
            p2l = np.array(maps, dtype=np.int64)
        step = np.array([s.get("step", i) for i, s in enumerate(steps)])
        meta = {k: v for k, v in doc.items() if k not in ("steps", "physical_to_logical")}
        return _build(path, kind, load, p2l, doc.get("num_logical_experts"), step, {**meta, "source": str(path)})
    raise ValueError(f"{path}: EPLB traces are .npz or .json files")


def _build(path, kind, load, p2l, num_logical, step, meta) -> Trace:
    if kind == "logical":
        return Trace(np.asarray(load), step, meta)
    if kind != "physical":
        raise ValueError(f"{path}: kind={kind!r}; allowed: logical, physical")
    if p2l is None:
        raise ValueError(f"{path}: kind='physical' needs 'physical_to_logical' [layers, slots] or [steps, layers, slots]")
    return Trace.from_physical(load, p2l, num_logical, step, meta)


def write_trace(path: str | Path, load, physical_to_logical=None, step=None, num_logical_experts: int | None = None) -> Path:
    """Write a trace in epkit's NPZ format (what the built-in engine's dump produces)."""
    path = Path(path)
    arrays = {"load": np.asarray(load), "version": np.array(TRACE_VERSION)}
    arrays["kind"] = np.array("physical" if physical_to_logical is not None else "logical")
    if physical_to_logical is not None:
        arrays["physical_to_logical"] = np.asarray(physical_to_logical, dtype=np.int64)
    if step is not None:
        arrays["step"] = np.asarray(step)
    if num_logical_experts is not None:
        arrays["num_logical_experts"] = np.array(int(num_logical_experts))
    np.savez_compressed(path, **arrays)
    return path
