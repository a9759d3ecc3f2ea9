"""The issue-8 table: the built-in engine against real vLLM, per topology and load point.

Reads every ``vllm bench serve`` result JSON under a folder (``epkit.analysis.results.load``), pairs the
two servers' runs of each (topology, load) and prints a markdown table: output tok/s of each and
their ratio, p99 ITL of each and their ratio, mean TTFT and TPOT of each. A ratio cell that meets
the issue's goal (output tok/s >= 0.8x vLLM; p99 ITL <= 1.25x vLLM) is marked ✅, one that misses
it ❌; the ``goal`` column says whether both are met.

Which run is which comes from the ``--metadata`` keys the retired ``vllm_vs_engine.sh`` saved
(``bench_topology``, ``bench_server``, ``bench_load``; its runs are in ``benchmarks/results/2026-11-30-h200x2``,
and both engines are now measured through ``epkit sweep``, docs/vllm_compare.md), else from the file name
``<topology>_<server>_<load>.json`` (so the anchor runs ``dp4ep_agrs_graph_inf.json`` read as
topology ``dp4ep_agrs``, server ``graph``, load ``inf``).

    python benchmarks/compare_vllm.py RESULTS_DIR [--vllm vllm] [--engine engine]
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import pandas as pd

from epkit.analysis import results

GOAL_THROUGHPUT_RATIO = 0.8
GOAL_P99_ITL_RATIO = 1.25
NAME = re.compile(r"^(?P<topology>.+)_(?P<server>[^_]+)_(?P<load>[^_]+)\.json$")
METRICS = ["output_throughput", "p99_itl_ms", "mean_ttft_ms", "mean_tpot_ms", "num_prompts", "completed",
           "failed", "total_input_tokens", "request_rate", "max_concurrency"]


def label_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` (from :func:`epkit.analysis.results.load`) with ``bench_topology``, ``bench_server`` and
    ``bench_load`` filled from the saved metadata or, where absent, from the file name."""
    runs = runs.copy()
    for key in ("bench_topology", "bench_server", "bench_load"):
        if key not in runs:
            runs[key] = None
    for i, source in runs["source"].items():
        m = NAME.match(Path(str(source).partition("#")[0]).name)
        for key, group in (("bench_topology", "topology"), ("bench_server", "server"), ("bench_load", "load")):
            if pd.isna(runs.at[i, key]) and m:
                runs.at[i, key] = m[group]
    return runs.dropna(subset=["bench_topology", "bench_server", "bench_load"])


def compare(runs: pd.DataFrame, vllm: str = "vllm", engine: str = "engine") -> pd.DataFrame:
    """One row per (topology, load) with both servers' metrics side by side (``vllm_*``, ``engine_*``),
    ``throughput_ratio`` = engine ÷ vLLM output tok/s, ``p99_itl_ratio`` = engine ÷ vLLM p99 ITL,
    ``throughput_goal``, ``p99_itl_goal`` and ``goal`` (both). A side without a run leaves NaN."""
    runs = label_runs(runs)
    runs = runs[runs["bench_server"].isin([vllm, engine])]
    key = ["bench_topology", "bench_load", "bench_server"]
    if runs.duplicated(key).any():
        dup = runs[runs.duplicated(key, keep=False)]
        raise ValueError("more than one run of the same (topology, server, load): " + ", ".join(map(str, dup["source"])))
    for col in METRICS:
        if col not in runs:
            runs[col] = float("nan")
    wide = runs.pivot(index=["bench_topology", "bench_load"], columns="bench_server", values=METRICS)
    out = pd.DataFrame(index=wide.index)
    for side, name in ((vllm, "vllm"), (engine, "engine")):
        for col in METRICS:
            out[f"{name}_{col}"] = pd.to_numeric(wide[col][side], errors="coerce") if side in wide[col] else math.nan
    out["throughput_ratio"] = out["engine_output_throughput"] / out["vllm_output_throughput"]
    out["p99_itl_ratio"] = out["engine_p99_itl_ms"] / out["vllm_p99_itl_ms"]
    out["throughput_goal"] = out["throughput_ratio"] >= GOAL_THROUGHPUT_RATIO
    out["p99_itl_goal"] = out["p99_itl_ratio"] <= GOAL_P99_ITL_RATIO
    out["goal"] = out["throughput_goal"] & out["p99_itl_goal"]
    out = out.reset_index().rename(columns={"bench_topology": "topology", "bench_load": "load"})
    return out.sort_values(["topology", "load"], key=_load_order).reset_index(drop=True)


def _load_order(col: pd.Series) -> pd.Series:
    return col.map(lambda v: (0, v) if v == "inf" else (1, v)) if col.name == "load" else col


def _either(row: pd.Series, metric: str):
    """The metric from whichever server has it (vLLM first), else None."""
    return next((row[f"{s}_{metric}"] for s in ("vllm", "engine") if not pd.isna(row[f"{s}_{metric}"])), None)


def _load_text(row: pd.Series) -> str:
    n, conc = _either(row, "num_prompts"), _either(row, "max_concurrency")
    shape = f"concurrency {int(conc)}" if conc is not None else "rate inf"
    return f"{row['load']}: {int(n)} prompts, {shape}" if n is not None else str(row["load"])


def _num(value: float, digits: int = 1) -> str:
    return "—" if pd.isna(value) else f"{value:,.{digits}f}"


def _ratio(value: float, met: bool) -> str:
    return "—" if pd.isna(value) else f"{value:.2f} {'✅' if met else '❌'}"


def to_markdown(table: pd.DataFrame, vllm: str = "vllm", engine: str = "engine") -> str:
    """The table of :func:`compare` as markdown, goal cells marked, plus notes on anything that makes
    a row incomparable (failed requests, different prompt lengths)."""
    v, e = ("vLLM", "engine") if (vllm, engine) == ("vllm", "engine") else (vllm, engine)
    head = ["topology", "load", f"{v} out tok/s", f"{e} out tok/s", f"ratio (≥ {GOAL_THROUGHPUT_RATIO})",
            f"{v} p99 ITL ms", f"{e} p99 ITL ms", f"ITL ratio (≤ {GOAL_P99_ITL_RATIO})",
            f"{v} TTFT mean ms", f"{e} TTFT mean ms", f"{v} TPOT mean ms", f"{e} TPOT mean ms", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for _, r in table.iterrows():
        both = not (pd.isna(r["throughput_ratio"]) or pd.isna(r["p99_itl_ratio"]))
        cells = [r["topology"], _load_text(r), _num(r["vllm_output_throughput"]), _num(r["engine_output_throughput"]),
                 _ratio(r["throughput_ratio"], r["throughput_goal"]), _num(r["vllm_p99_itl_ms"]),
                 _num(r["engine_p99_itl_ms"]), _ratio(r["p99_itl_ratio"], r["p99_itl_goal"]),
                 _num(r["vllm_mean_ttft_ms"], 0), _num(r["engine_mean_ttft_ms"], 0), _num(r["vllm_mean_tpot_ms"], 2),
                 _num(r["engine_mean_tpot_ms"], 2), ("met" if r["goal"] else "missed") if both else "—"]
        lines.append("| " + " | ".join(cells) + " |")
        for side in ("vllm", "engine"):
            if r[f"{side}_failed"] > 0:
                notes.append(f"{r['topology']} {r['load']}: {int(r[f'{side}_failed'])} failed requests on {side}")
        per_prompt = [r[f"{s}_total_input_tokens"] / r[f"{s}_completed"] for s in ("vllm", "engine")
                      if r[f"{s}_completed"] > 0]
        if len(set(per_prompt)) > 1:
            notes.append(f"{r['topology']} {r['load']}: prompt tokens per request differ: "
                         + ", ".join(f"{x:.1f}" for x in per_prompt))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--vllm", default="vllm", help="server label of the vLLM runs (default: vllm)")
    ap.add_argument("--engine", default="engine", help="server label of the engine runs (default: engine)")
    args = ap.parse_args(argv)
    table = compare(results.load(args.results_dir), args.vllm, args.engine)
    if table.empty:
        print(f"no runs labelled {args.vllm!r} or {args.engine!r} under {args.results_dir}", file=sys.stderr)
        return 1
    print(to_markdown(table, args.vllm, args.engine), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
