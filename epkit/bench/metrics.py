"""Metrics: pure functions over the one-row-per-request table.

The definitions are ``vllm bench serve``'s (``vllm/benchmarks/serve.py``,
``calculate_metrics``), computed over successful requests only:

- TTFT = first token chunk − send; E2EL = last token chunk − send (the usage chunk and
  ``[DONE]`` do not count);
- TPOT = (E2EL − TTFT) / (output_len − 1), only for requests with output_len > 1;
- ITL = every gap between consecutive token chunks, pooled over all requests;
- output_len = ``usage.completion_tokens`` when the server sent it, else the tokenizer's
  count of the text (``output_tokens_tokenized``), else the number of chunks;
- throughputs divide by the run duration; ``max_output_tokens_per_s`` and
  ``max_concurrent_requests`` come from one-second buckets since the first send;
- goodput counts requests meeting every SLO (ms, ``value <= slo``; TPOT of a one-token
  request is 0): vLLM's ``--goodput``; :func:`meets_slos` says it per request, so attainment
  under any limits can be computed again from a stored request table;
- behind ``epkit proxy`` (disaggregated prefill/decode), ``prefill_ms`` and ``kv_transfer_ms``
  are what the router measured per request (:mod:`epkit.bench.client`); their statistics
  (``mean_prefill_ms``, ``p99_kv_transfer_ms``…) are there only when some request has them.
  The decode side's inter-token latency is the ITL above.

Variants other tools use carry their own names: ``tpot_incl_first_ms`` (E2EL/output_len,
guidellm's "time per output token"), ``interactivity_pareto_tok_s`` (output_throughput /
concurrency, the x-axis of vLLM's Pareto plot) and ``interactivity_inferencex_tok_s``
(1000 / median TPOT, InferenceX's tok/s/user).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
PD_METRICS = ("prefill", "kv_transfer")  # per-request <name>_ms the router reports, when there is one


def request_table(records: Iterable) -> pd.DataFrame:
    """The raw table: one row per request record (dataclass or dict), nothing derived."""
    rows = [r if isinstance(r, dict) else dict(vars(r)) for r in records]
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    df["chunk_s"] = df["chunk_s"].map(lambda v: list(v) if v is not None else [])
    for name in PD_METRICS:  # the router's numbers: NaN where it did not say (no router, no transfer report)
        if f"{name}_ms" in df:
            df[f"{name}_ms"] = pd.to_numeric(df[f"{name}_ms"], errors="coerce").astype(float)
    if "kv_transfer_bytes" in df:
        df["kv_transfer_bytes"] = pd.to_numeric(df["kv_transfer_bytes"], errors="coerce").astype("Int64")
    return df


def _output_len(row) -> int:
    for col in ("completion_tokens", "output_tokens_tokenized"):
        v = row.get(col)
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v > 0:
            return int(v)
    return len(row["chunk_s"])


def derive(table: pd.DataFrame) -> pd.DataFrame:
    """Per-request latencies (ms) and token counts, added as columns to a copy of ``table``.

    Columns: ``output_len``, ``input_len``, ``ttft_ms``, ``e2el_ms``, ``tpot_ms`` (NaN when
    output_len <= 1), ``tpot_incl_first_ms``, ``itl_ms`` (a list per request). Failed
    requests get NaN latencies and output_len 0.
    """
    df = table.copy()
    if not len(df):
        for c in ("output_len", "input_len", "ttft_ms", "e2el_ms", "tpot_ms", "tpot_incl_first_ms", "itl_ms"):
            df[c] = []
        return df
    ok = df["success"].astype(bool)
    first = df["chunk_s"].map(lambda c: c[0] if len(c) else np.nan)
    last = df["chunk_s"].map(lambda c: c[-1] if len(c) else np.nan)
    df["output_len"] = [(_output_len(r) if s else 0) for r, s in zip(df.to_dict("records"), ok)]
    pt = df["prompt_tokens"] if "prompt_tokens" in df else pd.Series(np.nan, index=df.index)
    df["input_len"] = pt.where(pt.notna(), df["prompt_len"]).astype(int)
    df["ttft_ms"] = ((first - df["send_s"]) * 1e3).where(ok)
    df["e2el_ms"] = ((last - df["send_s"]) * 1e3).where(ok)
    n = df["output_len"]
    df["tpot_ms"] = ((df["e2el_ms"] - df["ttft_ms"]) / (n - 1)).where(ok & (n > 1))
    df["tpot_incl_first_ms"] = (df["e2el_ms"] / n).where(ok & (n > 0))
    df["itl_ms"] = [list(np.diff(c) * 1e3) if s else [] for c, s in zip(df["chunk_s"], ok)]
    return df


def per_request_lists(table: pd.DataFrame) -> dict[str, list]:
    """The per-request lists ``vllm bench serve`` saves even without ``--save-detailed``, in
    request order, warm-ups left out: ``latencies`` (E2EL in seconds, 0.0 for a failed request,
    as vLLM) and ``queue_times`` (seconds from when a request was due to when the client took it
    up, i.e. the wait for a concurrency slot: vLLM's ``client_queue_time``; None where the
    table does not say, e.g. a request table read from vLLM's own file)."""
    raw = table[~table["warmup"].astype(bool)] if len(table) and "warmup" in table else table
    if not len(raw):
        return {"latencies": [], "queue_times": []}
    d = derive(raw.sort_values("index") if "index" in raw else raw)
    latencies = (d["e2el_ms"] / 1e3).where(d["success"].astype(bool), 0.0).fillna(0.0)
    start = d["start_s"] if "start_s" in d else d["send_s"]  # tables saved before start_s existed
    queue = start - d["scheduled_s"] if "scheduled_s" in d else pd.Series(np.nan, index=d.index)
    return {"latencies": [float(x) for x in latencies],
            "queue_times": [None if math.isnan(q) else float(q) for q in queue.astype(float)]}


def _stats(name: str, values: Sequence[float], percentiles: Sequence[float]) -> dict:
    # vLLM reports 0 (np.mean(0)) when there is no value, e.g. every request failed.
    v = np.asarray(values, dtype=float) if len(values) else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(v)), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(np.std(v))}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(v, p))
    return out


def latency_values(derived: pd.DataFrame) -> dict[str, np.ndarray]:
    """The samples each latency statistic is taken over (ms): ttft, tpot, itl (pooled), e2el."""
    ok = derived[derived["success"].astype(bool)] if len(derived) else derived
    itl = np.concatenate([np.asarray(x, float) for x in ok["itl_ms"]]) if len(ok) else np.zeros(0)
    return {"ttft": ok["ttft_ms"].to_numpy(float), "tpot": ok["tpot_ms"].dropna().to_numpy(float),
            "itl": itl, "e2el": ok["e2el_ms"].to_numpy(float)}


def peak_rates(derived: pd.DataFrame) -> tuple[float, int]:
    """(max_output_tokens_per_s, max_concurrent_requests) over one-second buckets, as vLLM.

    vLLM counts token *chunks* per bucket and counts a request in every bucket from its
    send to its last token, inclusive.
    """
    ok = derived[derived["success"].astype(bool)]
    if not len(ok):
        return 0.0, 0
    start = ok["send_s"].to_numpy(float)
    end = start + ok["e2el_ms"].to_numpy(float) / 1e3
    t_min = start.min()
    n_buckets = int(np.ceil(end.max() - t_min)) + 1
    tokens = np.zeros(n_buckets)
    conc = np.zeros(n_buckets)
    for chunks, s, e in zip(ok["chunk_s"], start, end):
        b = (np.asarray(chunks, float) - t_min).astype(int)
        b = b[(b >= 0) & (b < n_buckets)]
        np.add.at(tokens, b, 1)
        conc[int(s - t_min): int(e - t_min) + 1] += 1
    return float(tokens.max()), int(conc.max())


def check_slos(slos_ms: dict[str, float]) -> dict[str, float]:
    """``slos_ms`` as floats, or ValueError naming the bad key or value (vLLM's ``--goodput``
    rules: keys ttft, tpot, e2el; values in ms, >= 0)."""
    bad = set(slos_ms) - set(GOODPUT_METRICS)
    if bad:
        raise ValueError(f"goodput SLO keys {sorted(bad)} unknown; valid: {list(GOODPUT_METRICS)}")
    out = {}
    for key, value in slos_ms.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"goodput SLO {key}={value!r} is not a number of milliseconds") from None
        if not out[key] >= 0:
            raise ValueError(f"goodput SLO {key}={value!r} must be >= 0 ms")
    return out


def meets_slos(derived: pd.DataFrame, slos_ms: dict[str, float]) -> pd.Series:
    """Per request of a :func:`derive` table: True where it succeeded and meets every SLO (ms)
    in ``slos_ms`` (keys ttft, tpot, e2el; ``value <= slo``; a one-token request's TPOT is 0),
    as ``vllm bench serve --goodput`` counts it."""
    slos_ms = check_slos(slos_ms)
    good = derived["success"].astype(bool) if len(derived) else pd.Series(dtype=bool)
    for key, slo in slos_ms.items():
        col = derived[f"{key}_ms"].fillna(0.0) if key == "tpot" else derived[f"{key}_ms"]
        good &= col <= slo
    return good


def goodput_count(derived: pd.DataFrame, slos_ms: dict[str, float]) -> int:
    """Successful requests meeting every SLO (ms) in ``slos_ms`` (keys: ttft, tpot, e2el)."""
    return int(meets_slos(derived, slos_ms).sum())


def pd_stats(derived: pd.DataFrame, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """``mean_/median_/std_/p<N>_prefill_ms`` and ``…_kv_transfer_ms`` over the successful
    requests that carry them; empty for a run without a router in front (no value anywhere)."""
    out: dict = {}
    ok = derived[derived["success"].astype(bool)] if len(derived) else derived
    for name in PD_METRICS:
        col = f"{name}_ms"
        values = pd.to_numeric(ok[col], errors="coerce").dropna() if col in ok else pd.Series(dtype=float)
        if len(values):
            out.update(_stats(name, values.to_numpy(float), percentiles))
    return out


def summarize(table: pd.DataFrame, duration_s: float, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              goodput_slos_ms: dict[str, float] | None = None, max_concurrency: int | None = None) -> dict:
    """Every headline number of a run under ``vllm bench serve``'s keys, plus named variants.

    ``table`` is the raw request table (warm-up rows are dropped here); ``duration_s`` the
    run's wall time from the first scheduled send to the last response.
    """
    raw = table[~table["warmup"].astype(bool)] if len(table) and "warmup" in table else table
    d = derive(raw)
    ok = d[d["success"].astype(bool)] if len(d) else d
    completed = int(len(ok))
    total_in = int(ok["input_len"].sum()) if completed else 0
    total_out = int(d["output_len"].sum()) if len(d) else 0
    values = latency_values(d)
    peak_tok_s, peak_conc = peak_rates(d) if len(d) else (0.0, 0)
    out = {
        "duration": duration_s,
        "completed": completed,
        "failed": int(len(d) - completed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / duration_s,
        "request_goodput": (goodput_count(d, goodput_slos_ms) / duration_s) if goodput_slos_ms else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_tok_s,
        "max_concurrent_requests": peak_conc,
    }
    for name in LATENCY_METRICS:
        out.update(_stats(name, values[name], percentiles))
    tpot_incl = ok["tpot_incl_first_ms"].dropna().to_numpy(float) if completed else np.zeros(0)
    out.update(_stats("tpot_incl_first", tpot_incl, percentiles))
    users = max_concurrency or peak_conc
    out["interactivity_pareto_tok_s"] = out["output_throughput"] / users if users else 0.0
    out["interactivity_inferencex_tok_s"] = 1e3 / out["median_tpot_ms"] if out["median_tpot_ms"] > 0 else 0.0
    out.update(pd_stats(d, percentiles))
    return out
