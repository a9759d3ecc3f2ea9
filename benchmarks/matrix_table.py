"""Issue 19's table: every cell of a two-engine sweep (``engine: [vllm, epkit]``), both engines, the ratios and
the targets (output tok/s >= 0.9x vLLM in every cell; p99 TTFT and p99 ITL <= 1.25x in every cell below
saturation), as Markdown.

    python benchmarks/matrix_table.py results/device/2026-12-06-matrix-1gpu [--saturating a-inf,b-r12]
        [--engine-results OTHER_FOLDER]   # the engine's rows from another run of the same spec
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epkit.analysis import results  # noqa: E402

THROUGHPUT_MIN, LATENCY_MAX = 0.9, 1.25


def cells(folder: Path, engine_folder: Path | None) -> list[dict]:
    df = results.load(folder)
    vllm = df[(df["engine"] == "vllm") & (df["status"] == "ok")]
    ours = results.load(engine_folder) if engine_folder else df
    ours = ours[(ours["engine"] == "epkit") & (ours["status"] == "ok")]
    for name, frame in (("vLLM", vllm), ("engine", ours)):
        if frame["workload_id"].duplicated().any():
            raise SystemExit(f"{name}: several ok runs of one workload (repeats or topologies): one run per cell here")
    vllm, ours = vllm.set_index("workload_id"), ours.set_index("workload_id")
    rows = []
    for w in vllm.index:
        if w.startswith("warmup") or "profile" in w:  # the warm-up, and a run under the profiler: not cells
            continue
        v = vllm.loc[w]
        e = ours.loc[w] if w in ours.index else None
        rows.append({"workload": w, "v": v, "e": e})
    return rows


def table(rows: list[dict], saturating: set[str]) -> str:
    head = ("| cell | vLLM out tok/s | engine out tok/s | ratio (>= 0.9) | vLLM p99 TTFT ms | engine p99 TTFT ms | "
            "ratio (<= 1.25) | vLLM p99 ITL ms | engine p99 ITL ms | ratio (<= 1.25) |")
    out = [head, "|" + "---|" * 10]
    met = total = 0
    for r in rows:
        v, e, w = r["v"], r["e"], r["workload"]
        sat = any(w.startswith(s) for s in saturating)
        if e is None:
            out.append(f"| {w}{' (saturating)' if sat else ''} | {v['output_throughput']:,.0f} | not run | | "
                       f"{v['p99_ttft_ms']:,.0f} | | | {v['p99_itl_ms']:,.1f} | | |")
            continue
        tput = e["output_throughput"] / v["output_throughput"]
        ttft = e["p99_ttft_ms"] / v["p99_ttft_ms"]
        itl = e["p99_itl_ms"] / v["p99_itl_ms"]
        oks = [tput >= THROUGHPUT_MIN] + ([] if sat else [ttft <= LATENCY_MAX, itl <= LATENCY_MAX])
        met += all(oks)
        total += 1

        def mark(x: float, ok: bool | None) -> str:
            return f"{x:.3f}" + ("" if ok is None else (" ✅" if ok else " ❌"))

        out.append(f"| {w}{' (saturating)' if sat else ''} | {v['output_throughput']:,.0f} | "
                   f"{e['output_throughput']:,.0f} | {mark(tput, tput >= THROUGHPUT_MIN)} | {v['p99_ttft_ms']:,.0f} | "
                   f"{e['p99_ttft_ms']:,.0f} | {mark(ttft, None if sat else ttft <= LATENCY_MAX)} | "
                   f"{v['p99_itl_ms']:,.1f} | {e['p99_itl_ms']:,.1f} | {mark(itl, None if sat else itl <= LATENCY_MAX)} |")
    out.append("")
    out.append(f"{met} of {total} measured cells meet every target that applies to them "
               f"(saturating cells: throughput only).")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a sweep folder with both engines (epkit sweep's results/<name>)")
    ap.add_argument("--saturating", default="a-inf,b-r12", help="workload ids (prefixes) at or past vLLM's capacity")
    ap.add_argument("--engine-results", type=Path, default=None, help="take the engine's rows from this sweep folder")
    a = ap.parse_args()
    print(table(cells(a.folder, a.engine_results), set(filter(None, a.saturating.split(",")))))


if __name__ == "__main__":
    main()
