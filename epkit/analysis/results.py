"""Results as pandas: one tidy row per stored point, one row per request, the Pareto frontier.

Reads every kind of result file epkit meets, alike:

* the sweep store, ``results/<sweep>/<topology_id>/<workload_id>[__r<repeat>].json`` — vLLM's
  keys at the top level, the point (topology, workload, repeat, status, failure, versions,
  hardware, git commit) under ``"epkit"["point"]``; failed points have no metrics;
* a single ``epkit bench --save-result`` file (no point: the bench's own config only);
* a ``vllm bench serve --save-result`` file (one JSON, or one per line with ``--append-result``).

Column names follow the results' own keys (``median_ttft_ms``, ``output_throughput``) and carry
units in their suffix. Derived columns are named for what they are:

* ``gpus`` — GPUs the deployment used (``world_size``; ``tp × dp`` when only those are known);
* ``total_tok_s_per_gpu``, ``output_tok_s_per_gpu``, ``input_tok_s_per_gpu`` — throughput ÷ GPUs;
  for disaggregated runs also ``input_tok_s_per_prefill_gpu`` and ``output_tok_s_per_decode_gpu``;
* ``interactivity_pareto_tok_s`` — output throughput ÷ concurrency (vLLM's Pareto x-axis),
  ``interactivity_inferencex_tok_s`` — 1000 ÷ median TPOT (InferenceX's tok/s/user),
  ``interactivity_mean_tpot_tok_s`` — 1000 ÷ mean TPOT; both first come from
  :func:`epkit.bench.metrics.summarize` when the result file holds them;
* ``config`` — one string naming the full configuration (model, engine, TP/DP/EP, nodes,
  backend, EPLB, load, repeat), used as hover text and legend; ``topology`` — the same
  without load; ``load`` — the offered load alone (``rate=inf, concurrency=8``).

What the engine's own log said (the point's ``engine_log``, :mod:`epkit.vllm.logs`), per deployment,
as ``log_<key>`` columns: ``log_model_load_s``, ``log_model_load_gib``, ``log_torch_compile_s``,
``log_cuda_graph_capture_s``, ``log_cuda_graph_gib``, ``log_engine_init_s``,
``log_engine_init_compilation_s``, ``log_kv_cache_tokens``, ``log_kv_cache_device``, ``log_kv_cache_gib``,
``log_max_concurrency_request_tokens``, ``log_max_concurrency_x``, ``log_all2all_manager``,
``log_api_server_start_s`` (vLLM only), and with EPLB on ``log_balancedness_count``,
``log_balancedness_last``, ``log_balancedness_mean`` (vLLM and the built-in engine; counted over the
deployment's log up to the end of the point). A column is missing or NaN where the log did not say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from epkit.analysis.labels import (  # noqa: F401 — the labels are part of this module's API as before
    LABEL_COLUMNS, LABEL_PARTS, describe_load, describe_topology, shared_label, short_labels)
from epkit.bench import metrics as M
from epkit.bench.result import load_result, load_vllm_results, requests_path

# vLLM's header keys (not metrics); "backend" there is the HTTP API flavour, kept as api_backend.
_HEAD = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
         "request_rate", "burstiness", "max_concurrency")
# Per-request lists `vllm bench serve --save-detailed` adds; they belong in the request frame.
_DETAIL = ("start_times", "ttfts", "itls", "latencies", "input_lens", "output_lens", "errors",
           "generated_texts", "queue_times")
# Topology fields that are not worth a column (long or machine-specific).
_TOPOLOGY_SKIP = ("extra_args", "env", "model_config", "data_parallel_address", "data_parallel_rpc_port",
                  "master_port",
                  "gloo_socket_ifname", "nccl_socket_ifname", "plan")

IDENTITY = ["sweep", "topology_id", "workload_id", "repeat", "status", "config", "topology", "load"]


def result_files(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every result JSON under ``source`` (a file, a directory searched recursively, or several),
    sorted; temporary files (``*.json.tmp``) and request tables are not results."""
    if isinstance(source, (str, Path)):
        sources = [Path(source)]
    else:
        sources = [Path(s) for s in source]
    files: list[Path] = []
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"results source {str(s)!r} does not exist")
        files += sorted(s.rglob("*.json")) if s.is_dir() else [s]
    return [f for f in files if not f.name.endswith(".tmp")]


def _read_docs(path: Path) -> list[dict]:
    text = path.read_text().strip()
    if not text:
        return []
    try:
        doc = json.loads(text)
        return [doc] if isinstance(doc, dict) else []
    except json.JSONDecodeError:
        out = []
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                return []  # not a result file (and not JSON lines)
            if isinstance(doc, dict):
                out.append(doc)
        return out


def _is_result(doc: dict) -> bool:
    point = (doc.get("epkit") or {}).get("point")
    return ("completed" in doc and "duration" in doc) or (isinstance(point, dict) and "status" in point)


def _num(v):
    if v in ("inf", "Infinity"):
        return math.inf
    return v


def _eplb_columns(eplb) -> dict:
    if not eplb:
        return {"eplb": False}
    if isinstance(eplb, str):
        eplb = json.loads(eplb)
    return {"eplb": True, **{f"eplb_{k}": v for k, v in eplb.items()}}


def _row(doc: dict, path: Path, index: int) -> dict:
    ep = doc.get("epkit") or {}
    point = ep.get("point") or {}
    config = ep.get("config") or {}
    meta = ep.get("meta") or {}
    topo = dict(point.get("topology") or {})
    derived = point.get("derived") or {}
    workload = dict(point.get("workload") or config.get("workload") or {})
    row: dict = {
        "sweep": point.get("sweep"),
        "topology_id": point.get("topology_id"),
        "workload_id": point.get("workload_id"),
        "repeat": point.get("repeat", 0),
        "status": point.get("status", "ok"),
        "failure_kind": (point.get("failure") or {}).get("kind"),
        "failure_message": (point.get("failure") or {}).get("message"),
        "source": str(path) + (f"#{index}" if index else ""),
        "client": meta.get("client", "vllm bench serve" if not ep else None),
    }
    row["label"] = doc.get("label") or config.get("label")
    row["model"] = topo.get("model") or doc.get("model_id") or config.get("model")
    for key, value in topo.items():
        if key in _TOPOLOGY_SKIP or key == "model":
            continue
        if key == "eplb":
            row.update(_eplb_columns(value))
        else:
            row[key] = value
    row.update({k: v for k, v in derived.items()})
    row["engine"] = point.get("engine") or topo.get("engine")
    row["engine_version"] = point.get("engine_version") or topo.get("vllm_version")
    for key in ("hardware", "git_commit", "started_at", "finished_at"):
        value = point.get(key)
        row[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
    row.update({k: v for k, v in (point.get("timing") or {}).items() if not isinstance(v, (dict, list))})
    row.update({f"log_{k}": v for k, v in (point.get("engine_log") or {}).items() if not isinstance(v, (dict, list))})
    for key, value in workload.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        row[f"workload_{key}"] = value
    row["request_rate"] = _num(doc.get("request_rate", workload.get("request_rate", config.get("request_rate"))))
    row["max_concurrency"] = doc.get("max_concurrency", workload.get("max_concurrency", config.get("max_concurrency")))
    row["num_prompts"] = doc.get("num_prompts", workload.get("num_prompts"))
    row["burstiness"] = _num(doc.get("burstiness", config.get("burstiness")))
    row["api_backend"] = doc.get("backend")
    row["date"] = doc.get("date")
    for key, value in doc.items():
        if key in _HEAD or key in _DETAIL or key == "epkit" or isinstance(value, (dict, list)):
            continue
        row[key] = _num(value)
    return row


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``gpus``, per-GPU throughputs, interactivity variants and the ``config`` names
    (see the module docstring) to a copy of a frame :func:`load` built."""
    df = df.copy()
    for col in ("tp", "dp", "world_size", "prefill_gpus", "decode_gpus", "max_concurrent_requests",
                "output_throughput", "total_token_throughput", "total_input_tokens", "duration",
                "median_tpot_ms", "mean_tpot_ms", "max_concurrency", "interactivity_pareto_tok_s",
                "interactivity_inferencex_tok_s"):
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    gpus = df["world_size"]
    gpus = gpus.where(gpus.notna(), df["tp"].fillna(1) * df["dp"].fillna(1))
    df["gpus"] = gpus.where(df["tp"].notna() | df["dp"].notna() | df["world_size"].notna())
    input_tok_s = df["total_input_tokens"] / df["duration"]
    df["input_throughput"] = input_tok_s
    df["total_tok_s_per_gpu"] = df["total_token_throughput"] / df["gpus"]
    df["output_tok_s_per_gpu"] = df["output_throughput"] / df["gpus"]
    df["input_tok_s_per_gpu"] = input_tok_s / df["gpus"]
    if df["prefill_gpus"].notna().any():
        df["input_tok_s_per_prefill_gpu"] = input_tok_s / df["prefill_gpus"]
        df["output_tok_s_per_decode_gpu"] = df["output_throughput"] / df["decode_gpus"]
    # Same formulas as epkit.bench.metrics.summarize, for vLLM files that lack these keys.
    users = df["max_concurrency"].where(df["max_concurrency"] > 0, df["max_concurrent_requests"])
    df["interactivity_pareto_tok_s"] = df["interactivity_pareto_tok_s"].where(
        df["interactivity_pareto_tok_s"].notna(), df["output_throughput"] / users)
    inv = lambda ms: (1e3 / ms).where(ms > 0)  # noqa: E731 — tok/s from ms per token
    df["interactivity_inferencex_tok_s"] = df["interactivity_inferencex_tok_s"].where(
        df["interactivity_inferencex_tok_s"].notna(), inv(df["median_tpot_ms"]))
    df["interactivity_mean_tpot_tok_s"] = inv(df["mean_tpot_ms"])
    df["topology"] = [describe_topology(r) for _, r in df.iterrows()] if len(df) else []
    loads = [describe_load(r) for _, r in df.iterrows()] if len(df) else []
    df["config"] = [f"{t} | {load}" if load else t for t, load in zip(df["topology"], loads)]
    df["load"] = [describe_load(r.drop("repeat", errors="ignore")) for _, r in df.iterrows()] if len(df) else []
    return df


def load(source: str | Path | Iterable[str | Path], *, failed: bool = True) -> pd.DataFrame:
    """Every result under ``source`` as one tidy frame: one row per (topology, workload, repeat).

    ``source`` is a result file, a directory (a sweep, or a whole ``results/`` tree, searched
    recursively), or several of them. Columns: the point's identity (``sweep``, ``topology_id``,
    ``workload_id``, ``repeat``, ``status``, ``failure_kind``, ``failure_message``, ``source``
    file), every topology field (``model``, ``engine``, ``engine_version``, ``tp``, ``dp``,
    ``ep_size``, ``world_size``, ``nodes``, ``all2all_backend``, ``eplb`` and ``eplb_<key>``…),
    ``workload_<key>`` fields with ``request_rate``/``max_concurrency``, every metric under its
    ``vllm bench serve`` key, hardware, git commit, what the engine's log said (``log_<key>``,
    see the module docstring), and the derived columns of :func:`add_derived`. ``failed=False``
    drops failed points (they have no metrics).
    """
    rows = []
    for path in result_files(source):
        for i, doc in enumerate(_read_docs(path)):
            if _is_result(doc):
                rows.append(_row(doc, path, i))
    if not rows:
        raise FileNotFoundError(f"no result files under {source!r} (looked for *.json with vLLM bench keys)")
    df = add_derived(pd.DataFrame(rows))
    if not failed:
        df = df[df["status"] == "ok"]
    first = [c for c in IDENTITY if c in df]
    return df[first + [c for c in df.columns if c not in first]].reset_index(drop=True)


def requests(source: str | Path | Iterable[str | Path] | pd.DataFrame, *, warmup: bool = False) -> pd.DataFrame:
    """One row per request of every result under ``source`` (or of every row of a frame
    :func:`load` returned), with per-request ``ttft_ms``, ``tpot_ms``, ``e2el_ms``,
    ``itl_ms`` (a list) from :func:`epkit.bench.metrics.derive`, plus the result's identity
    columns and ``config``. Results without a request table (plain vLLM files without
    ``--save-detailed``, failed points) contribute no rows. Warm-ups are dropped unless
    ``warmup=True``."""
    runs = source if isinstance(source, pd.DataFrame) else load(source)
    keep = [c for c in IDENTITY + ["source", "gpus"] + LABEL_COLUMNS if c in runs]
    keep += sorted(c for c in runs.columns if c.startswith("eplb_") and c not in keep)
    keep = list(dict.fromkeys(keep))
    frames = []
    for _, run in runs.iterrows():
        if run.get("status") != "ok":
            continue
        path_text, _, index = str(run["source"]).partition("#")
        path = Path(path_text)
        doc = _read_docs(path)[int(index or 0)]
        if "epkit" in doc:
            if not requests_path(path).exists():
                continue
            table = load_result(path).requests
        else:
            table = load_vllm_results(path)[int(index or 0)].requests
        if not len(table):
            continue
        if not warmup and "warmup" in table:
            table = table[~table["warmup"].astype(bool)]
        d = M.derive(table).drop(columns=["chunk_s", "generated_text"], errors="ignore")
        for col in keep:
            d[col] = run[col]
        frames.append(d)
    if not frames:
        return pd.DataFrame(columns=keep + ["ttft_ms", "tpot_ms", "e2el_ms", "itl_ms"])
    out = pd.concat(frames, ignore_index=True)
    return out[keep + [c for c in out.columns if c not in keep]]


def itl_samples(requests_frame: pd.DataFrame) -> pd.DataFrame:
    """The pooled inter-token latencies of a request frame: one row per gap, ``itl_ms`` a number."""
    out = requests_frame.explode("itl_ms")
    out = out[out["itl_ms"].notna()].copy()
    out["itl_ms"] = out["itl_ms"].astype(float)
    return out.reset_index(drop=True)


def pareto_frontier(df: pd.DataFrame, x: str, y: str, by: str | Sequence[str] | None = None,
                    maximize: tuple[bool, bool] = (True, True)) -> pd.DataFrame:
    """The rows of ``df`` no other row (of the same ``by`` group) beats on both ``x`` and ``y``.

    ``maximize`` says, per axis, whether more is better (throughput, interactivity) or less
    (latency: pass ``False``). Rows with NaN in ``x`` or ``y`` are ignored. The result is
    sorted by group, then by ``x``, so it draws as a staircase line.
    """
    for col in (x, y):
        if col not in df:
            raise KeyError(f"pareto_frontier: column {col!r} not in the frame; columns: {', '.join(df.columns)}")
    groups = [by] if isinstance(by, str) else list(by or [])
    data = df.dropna(subset=[x, y])
    parts = []
    for _, g in (data.groupby(groups, dropna=False, sort=True) if groups else [(None, data)]):
        xs = g[x].to_numpy(float) * (1 if maximize[0] else -1)
        ys = g[y].to_numpy(float) * (1 if maximize[1] else -1)
        # walk from the best x down; a row is on the frontier when its y beats every row with better x
        order = np.lexsort((-ys, -xs))
        best_y = -np.inf
        keep = []
        for i in order:
            if ys[i] > best_y:
                keep.append(i)
                best_y = ys[i]
        parts.append(g.iloc[sorted(keep, key=lambda i: xs[i] * (1 if maximize[0] else -1))])
    if not parts:
        return data.iloc[0:0]
    return pd.concat(parts)


def heaviest_load(df: pd.DataFrame) -> pd.DataFrame:
    """The rows at each topology's heaviest offered load (highest ``max_concurrency`` when it
    varies, else highest ``request_rate``; unlimited counts as highest), every repeat kept."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    key = "max_concurrency" if ok["max_concurrency"].dropna().nunique() > 1 else "request_rate"
    level = pd.to_numeric(ok[key], errors="coerce").fillna(math.inf)
    top = level.groupby(ok["topology"]).transform("max")
    return ok[level == top]


def aggregate(df: pd.DataFrame, metrics: Sequence[str], by: str | Sequence[str] = ("config",)) -> pd.DataFrame:
    """Mean, std, min, max and count of ``metrics`` over repeats: one row per ``by`` group
    (successful points only). Columns ``<metric>``, ``<metric>_std``, ``<metric>_min``,
    ``<metric>_max``, ``repeats``."""
    groups = [by] if isinstance(by, str) else list(by)
    ok = df[df["status"] == "ok"] if "status" in df else df
    g = ok.groupby(groups, dropna=False, sort=True)
    out = g[list(metrics)].mean()
    for m in metrics:
        out[f"{m}_std"] = g[m].std(ddof=0)
        out[f"{m}_min"] = g[m].min()
        out[f"{m}_max"] = g[m].max()
    out["repeats"] = g.size()
    return out.reset_index()
