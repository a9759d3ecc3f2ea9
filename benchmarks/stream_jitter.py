"""Whether streamed tokens arrive at the pace of the engine's steps: from the per-request results of a benchmark
(``*.requests.parquet``: each request's chunk arrival times), the ITL percentiles, how many tokens came late and the
next one early (a stall between the engine and the client, not a slow step: a slow step delays the next token too),
and the longest times in which no stream got any token.

    python benchmarks/stream_jitter.py RESULTS.requests.parquet [...]

On 2026-12-06 this found the ~40 ms stalls of issue 19's class (d) and (e) (Nagle's algorithm on the links between
the engine core and the API server, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from epkit.bench import metrics  # noqa: E402


def jitter(path: str) -> dict:
    df = metrics.derive(pd.read_parquet(path))  # itl_ms: each successful request's gaps between chunks
    kept = df[df["itl_ms"].map(len) > 1]
    if not len(kept):
        raise SystemExit(f"{path}: no successful request with more than two chunks")
    gaps = [np.asarray(g) for g in kept["itl_ms"]]
    streams = [np.asarray(c, dtype=float) for c in kept["chunk_s"]]
    itl = np.concatenate(gaps)
    p50, p99 = np.percentile(itl, [50, 99])
    # a token at least 0.9x the p99 late, then the next at most 0.6x the median: delivered late, not computed late
    late_then_early = sum(int(np.sum((g[:-1] >= 0.9 * p99) & (g[1:] <= 0.6 * p50))) for g in gaps)
    union = np.diff(np.sort(np.concatenate(streams))) * 1e3
    return {"file": path, "itl_ms": {f"p{q}": float(np.percentile(itl, q)) for q in (10, 50, 90, 98, 99)},
            "tokens": int(itl.size), "late_then_early": late_then_early,
            "longest_silences_ms": [float(x) for x in np.sort(union)[-5:][::-1]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="per-request results (*.requests.parquet)")
    for path in parser.parse_args().files:
        r = jitter(path)
        pct = "  ".join(f"{k} {v:.1f}" for k, v in r["itl_ms"].items())
        print(f"{r['file']}\n  ITL ms: {pct}\n  late then early: {r['late_then_early']} of {r['tokens']} tokens\n"
              f"  longest silences (no stream got a token), ms: {', '.join(f'{x:.1f}' for x in r['longest_silences_ms'])}")


if __name__ == "__main__":
    main()
