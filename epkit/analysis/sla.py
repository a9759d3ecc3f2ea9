"""SLA attainment and goodput under given latency limits, from the stored per-request data.

What disaggregated prefill/decode is for: meeting a TTFT limit and a TPOT limit at once, at a load.
For every stored point this module counts, from its requests table (:func:`epkit.analysis.results.requests`),
the requests that meet each limit and every limit, with ``vllm bench serve --goodput``'s semantics
(:func:`epkit.bench.metrics.meets_slos`: keys ttft, tpot, e2el in ms, ``value <= limit``, a one-token
request's TPOT is 0, a failed request meets nothing). So the limits are chosen when reading, not when
measuring: the same results answer any SLA.

Columns of :func:`attainment`: the point (``pd``, ``topology``, ``load``, ``repeat``, ``config``, ``source``),
``requests`` (sent, warm-ups left out), ``good`` (meeting every limit), ``<key>_attainment`` per limit
and ``sla_attainment`` (fractions of the requests sent), ``request_goodput`` (good ÷ the point's
duration, req/s, vLLM's ``request_goodput``) beside ``request_throughput``, and the point's
``p99_ttft_ms``, ``p99_itl_ms``, ``mean_prefill_ms``, ``mean_kv_transfer_ms`` (NaN where it has none).
"""

from __future__ import annotations

import math

import pandas as pd

from epkit.bench import metrics as M

# MLPerf Inference's Llama-2-70B server scenario: TTFT <= 2 s and TPOT <= 200 ms at the 99th percentile.
DEFAULT_SLOS_MS = {"ttft": 2000.0, "tpot": 200.0}
COLOCATED = "colocated"
# The point's own metrics shown beside its attainment (those of the P/D figure, and the router's).
SHOWN_METRICS = ("p99_ttft_ms", "p99_itl_ms", "mean_prefill_ms", "mean_kv_transfer_ms")


def parse_slos(text: str) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` (``KEY:MS`` pairs as vLLM's ``--goodput`` also work) as
    ``{"ttft": 500.0, "tpot": 50.0}``; ValueError naming the bad pair and what is allowed."""
    out: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.replace(" ", ",").split(","))):
        key, sep, value = item.replace(":", "=", 1).partition("=")
        if not sep or not value:
            raise ValueError(f"SLO {item!r}: expected KEY=MS, e.g. ttft=500,tpot=50 "
                             f"(keys: {', '.join(M.GOODPUT_METRICS)})")
        out[key.strip()] = value.strip()
    if not out:
        raise ValueError(f"SLO {text!r}: no limit given; e.g. ttft=500,tpot=50 (keys: {', '.join(M.GOODPUT_METRICS)})")
    return M.check_slos(out)


def has_pd(runs: pd.DataFrame) -> bool:
    """Whether the results compare prefill/decode configurations: a ``pd`` column with more than one
    value, or any point that is not colocated."""
    if "pd" not in runs:
        return False
    values = set(runs["pd"].dropna().astype(str))
    return len(values) > 1 or bool(values - {COLOCATED})


def pd_order(value) -> tuple:
    """Sort key of a ``pd`` value: colocated first (the reference), then by prefill and decode counts."""
    text = str(value)
    if text == COLOCATED:
        return (0, 0, 0, text)
    p, _, d = text.upper().rstrip("D").partition("P")
    try:
        return (1, int(p), int(d), text)
    except ValueError:
        return (2, 0, 0, text)


def attainment(runs: pd.DataFrame, reqs: pd.DataFrame, slos_ms: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per successful stored point of ``runs`` (a frame :func:`epkit.analysis.results.load`
    built) with the attainment of ``slos_ms`` (default :data:`DEFAULT_SLOS_MS`) over its requests in
    ``reqs`` (:func:`epkit.analysis.results.requests` of the same runs). Points without a request table
    are left out. Sorted by ``pd`` (colocated first), topology and load."""
    slos = M.check_slos(DEFAULT_SLOS_MS if slos_ms is None else slos_ms)
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    by_source = dict(tuple(reqs.groupby("source", sort=False))) if len(reqs) else {}
    rows, orders = [], []
    for _, run in ok.iterrows():
        table = by_source.get(run["source"])
        if table is None or not len(table):
            continue
        good = M.meets_slos(table, slos)
        pd_value = run.get("pd")
        row = {"pd": str(pd_value) if isinstance(pd_value, str) else COLOCATED,
               "topology": run.get("topology"), "load": run.get("load"), "repeat": run.get("repeat"),
               "config": run.get("config"),
               "requests": len(table), "good": int(good.sum())}
        for key, limit in slos.items():
            row[f"{key}_attainment"] = float(M.meets_slos(table, {key: limit}).mean())
        row["sla_attainment"] = float(good.mean())
        duration = float(run.get("duration", math.nan))
        row["request_goodput"] = row["good"] / duration if duration > 0 else math.nan
        row["request_throughput"] = run.get("request_throughput")
        row.update({k: run.get(k, math.nan) for k in SHOWN_METRICS})
        row["source"] = run["source"]
        rows.append(row)
        orders.append(load_order(run))
    cols = ["pd", "topology", "load", "repeat", "config", "requests", "good", *(f"{k}_attainment" for k in slos),
            "sla_attainment", "request_goodput", "request_throughput", *SHOWN_METRICS, "source"]
    out = pd.DataFrame(rows, columns=cols)
    if not len(out):
        return out
    keys = [(pd_order(p), str(t), order) for p, t, order in zip(out["pd"], out["topology"], orders)]
    return out.iloc[sorted(range(len(out)), key=lambda i: keys[i])].reset_index(drop=True)


def load_order(run: pd.Series | dict) -> tuple:
    """Sort key of a point's load: lighter first (concurrency, then rate; unlimited last), then repeat."""
    def num(v):
        v = pd.to_numeric(v, errors="coerce") if v is not None else math.nan
        return math.inf if pd.isna(v) else float(v)
    return tuple(num(run.get(key)) for key in ("max_concurrency", "request_rate", "repeat"))
