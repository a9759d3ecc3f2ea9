"""Write a JSONL trace (Mooncake's fields: ``timestamp`` ms, ``input_length``, ``output_length``) of long
prompts arriving while many requests decode: issue 19's workload class (c).

Short requests (``--short-in`` tokens in, ``--short-out`` out) arrive as a Poisson process at ``--rate`` for
``--duration`` seconds; ``--long`` long prompts (lengths uniform in ``--long-min``..``--long-max``, ``--long-out``
tokens out) arrive at uniform random times in the middle 80 % of that span, so each lands among running decodes.
Replayed with ``dataset: trace`` (``time_scale_s: 0.001``), the schedule is the same for every engine.

    python benchmarks/make_mixed_trace.py --out benchmarks/traces/long_among_decodes.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def make_trace(rate: float, duration: float, short_in: int, short_out: int, long: int, long_min: int,
               long_max: int, long_out: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    t = 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration:
            break
        rows.append({"timestamp": round(t * 1000, 3), "input_length": short_in, "output_length": short_out})
    for t in rng.uniform(0.1 * duration, 0.9 * duration, size=long):
        rows.append({"timestamp": round(float(t) * 1000, 3),
                     "input_length": int(rng.integers(long_min, long_max + 1)), "output_length": long_out})
    return sorted(rows, key=lambda r: r["timestamp"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=5.0, help="short requests per second (Poisson)")
    ap.add_argument("--duration", type=float, default=32.0, help="seconds of arrivals")
    ap.add_argument("--short-in", type=int, default=128)
    ap.add_argument("--short-out", type=int, default=384)
    ap.add_argument("--long", type=int, default=10, help="number of long prompts")
    ap.add_argument("--long-min", type=int, default=4096)
    ap.add_argument("--long-max", type=int, default=8192)
    ap.add_argument("--long-out", type=int, default=32)
    ap.add_argument("--seed", type=int, default=19)
    a = ap.parse_args()
    rows = make_trace(a.rate, a.duration, a.short_in, a.short_out, a.long, a.long_min, a.long_max, a.long_out,
                      a.seed)
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{a.out}: {len(rows)} requests, {sum(r['input_length'] > a.short_in for r in rows)} long")


if __name__ == "__main__":
    main()
