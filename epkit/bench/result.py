"""BenchResult: one run's headline numbers, its raw request table, and how it was produced.

Saved as a JSON file whose top-level keys are those ``vllm bench serve --save-result``
writes without ``--save-detailed`` (vLLM 0.32: the same key set, so tools that read vLLM
results read epkit's), plus epkit's own metadata under ``"epkit"`` and its named metric
variants (:func:`epkit_only_keys`), plus the raw request table as Parquet next to it
(``<stem>.requests.parquet``).
:func:`load_vllm_result` reads a file ``vllm bench serve`` wrote into the same shape,
rebuilding the request table from ``--save-detailed`` fields when they are there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from epkit.bench import metrics as M
from epkit.tables import REQUESTS_PARQUET

# Keys `vllm bench serve` writes before the metrics, in its order.
_VLLM_HEAD = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
              "request_rate", "burstiness", "max_concurrency")
# Per-request lists vLLM 0.32 writes even without --save-detailed (epkit derives them from its table).
VLLM_LISTS = ("latencies", "queue_times")
# Per-request lists vLLM writes only with --save-detailed (epkit keeps its Parquet table instead).
VLLM_DETAILED = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors")


def epkit_only_keys(doc: dict) -> set[str]:
    """The top-level keys of a saved epkit result that ``vllm bench serve`` does not write:
    ``"epkit"`` (config and metadata), the named metric variants (``*_tpot_incl_first_ms``,
    ``interactivity_*``) and, behind ``epkit proxy``, ``*_prefill_ms`` and ``*_kv_transfer_ms``
    (see :mod:`epkit.bench.metrics`). Every other key is vLLM's, same meaning."""
    own = ("_tpot_incl_first_ms",) + tuple(f"_{name}_ms" for name in M.PD_METRICS)
    return {k for k in doc if k == "epkit" or k.endswith(own) or k.startswith("interactivity_")}


@dataclass
class BenchResult:
    """One load point: ``metrics`` (vLLM's keys), ``requests`` (raw, one row per request,
    warm-ups flagged), ``config`` (target, workload, load shape) and ``meta`` (versions, clock)."""

    metrics: dict
    requests: pd.DataFrame
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.metrics[key]

    def recompute(self, percentiles=M.DEFAULT_PERCENTILES, goodput_slos_ms: dict | None = None) -> dict:
        """The metrics again from the raw table, e.g. with other percentiles or SLOs."""
        return M.summarize(self.requests, self.metrics["duration"], percentiles, goodput_slos_ms,
                           self.config.get("max_concurrency"))

    def derived(self) -> pd.DataFrame:
        """The request table with per-request ttft_ms, tpot_ms, e2el_ms, itl_ms, output_len."""
        return M.derive(self.requests)

    def to_vllm_json(self) -> dict:
        """The result as ``vllm bench serve`` would save it, plus ``"epkit"`` metadata."""
        c = self.config
        rate = c.get("request_rate", math.inf)
        head = {
            "date": self.meta.get("date", ""),
            "endpoint_type": "openai-chat" if str(c.get("endpoint", "")).endswith("chat/completions") else "openai",
            "backend": "openai-chat" if str(c.get("endpoint", "")).endswith("chat/completions") else "openai",
            "label": c.get("label"),
            "model_id": c.get("model"),
            "tokenizer_id": c.get("tokenizer") or c.get("model"),
            "num_prompts": c.get("num_prompts"),
            "request_rate": "inf" if math.isinf(rate) else rate,
            "burstiness": c.get("burstiness", 1.0),
            "max_concurrency": c.get("max_concurrency"),
        }
        body: dict = {}
        for key, value in self.metrics.items():
            if key in VLLM_LISTS + ("rtfx",):
                continue  # written below, from the request table
            body[key] = value
            if key == "total_token_throughput":
                body.update(M.per_request_lists(self.requests) if len(self.requests)
                            else {k: [] for k in VLLM_LISTS})
            elif key == "max_concurrent_requests":
                body["rtfx"] = 0.0  # vLLM's inverse real-time factor: audio input seconds / duration; text has none
        return {**head, **body, "epkit": {"config": _plain(c), "meta": self.meta}}

    def summary(self) -> str:
        """A printed summary like ``vllm bench serve``'s."""
        m, c = self.metrics, self.config
        lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

        def row(label, value, fmt="{:<10.2f}"):
            lines.append("{:<40} ".format(label) + fmt.format(value))

        row("Successful requests:", m["completed"], "{:<10}")
        row("Failed requests:", m["failed"], "{:<10}")
        if c.get("max_concurrency") is not None:
            row("Maximum request concurrency:", c["max_concurrency"], "{:<10}")
        if not math.isinf(c.get("request_rate", math.inf)):
            row("Request rate configured (RPS):", c["request_rate"])
        row("Benchmark duration (s):", m["duration"])
        row("Total input tokens:", m["total_input_tokens"], "{:<10}")
        row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
        row("Request throughput (req/s):", m["request_throughput"])
        if m.get("request_goodput") is not None:
            row("Request goodput (req/s):", m["request_goodput"])
        row("Output token throughput (tok/s):", m["output_throughput"])
        row("Peak output token throughput (tok/s):", m["max_output_tokens_per_s"])
        row("Peak concurrent requests:", m["max_concurrent_requests"])
        row("Total token throughput (tok/s):", m["total_token_throughput"])
        for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                                  ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                                  ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"),
                                  ("prefill", "prefill", "Prefill (router)"),
                                  ("kv_transfer", "KV transfer", "KV Transfer (router)")):
            if f"mean_{key}_ms" not in m:
                continue
            lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
            row(f"Mean {name} (ms):", m[f"mean_{key}_ms"])
            row(f"Median {name} (ms):", m[f"median_{key}_ms"])
            for k in m:
                if k.startswith("p") and k.endswith(f"_{key}_ms") and k[1:-len(key) - 4].replace(".", "").isdigit():
                    row(f"P{k[1:-len(key) - 4]} {name} (ms):", m[k])
        lines.append("=" * 50)
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write the JSON to ``path`` (a ``.json`` file, or a directory to name one in) and the
        request table next to it; return the JSON's path."""
        path = Path(path)
        if path.suffix != ".json":
            c = self.config
            rate = c.get("request_rate", math.inf)
            conc = f"-concurrency{c['max_concurrency']}" if c.get("max_concurrency") else ""
            name = f"{c.get('label') or 'epkit'}-{rate}qps{conc}-{str(c.get('model', 'model')).split('/')[-1]}" \
                   f"-{self.meta.get('date', 'now')}.json"
            path = path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_plain(self.to_vllm_json()), indent=1))
        tmp.replace(path)
        self.requests.to_parquet(requests_path(path), index=False, **REQUESTS_PARQUET)
        return path


def requests_path(json_path: str | Path) -> Path:
    """Where the request table of a result JSON lies."""
    p = Path(json_path)
    return p.with_name(p.stem + ".requests.parquet")


def load_result(path: str | Path) -> BenchResult:
    """Read a result epkit saved (JSON + Parquet)."""
    data = json.loads(Path(path).read_text())
    ep = data.pop("epkit", {})
    head = {k: data.pop(k) for k in _VLLM_HEAD if k in data}
    for k in VLLM_LISTS + ("rtfx",):  # written for vLLM's readers; derived from the request table
        data.pop(k, None)
    rp = requests_path(path)
    table = pd.read_parquet(rp) if rp.exists() else pd.DataFrame()
    if len(table):
        table["chunk_s"] = table["chunk_s"].map(list)
    config = ep.get("config", {})
    if config.get("request_rate") in ("inf", None):
        config["request_rate"] = math.inf
    return BenchResult(data, table, config, {**ep.get("meta", {}), "vllm_head": head})


def load_vllm_results(path: str | Path) -> list[BenchResult]:
    """Every result in a file ``vllm bench serve`` wrote (one JSON, or one per line with
    ``--append-result``)."""
    text = Path(path).read_text().strip()
    if not text:
        raise ValueError(f"{path}: empty file, no vLLM result in it")
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError:
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [_from_vllm(d, str(path)) for d in docs]


def load_vllm_result(path: str | Path) -> BenchResult:
    """The one result in a file ``vllm bench serve --save-result`` wrote, as a BenchResult.

    With ``--save-detailed`` the request table is rebuilt (chunk times from start, ttft and
    itls), so every epkit metric can be recomputed from vLLM's own measurements.
    """
    results = load_vllm_results(path)
    if len(results) != 1:
        raise ValueError(f"{path} holds {len(results)} results; use load_vllm_results")
    return results[0]


def _from_vllm(d: dict, source: str) -> BenchResult:
    if "completed" not in d or "duration" not in d:
        raise ValueError(f"{source}: not a `vllm bench serve` result (no 'completed'/'duration' key)")
    rate = d.get("request_rate", "inf")
    config = {"model": d.get("model_id"), "tokenizer": d.get("tokenizer_id"), "label": d.get("label"),
              "num_prompts": d.get("num_prompts"), "request_rate": math.inf if rate == "inf" else float(rate),
              "burstiness": d.get("burstiness"), "max_concurrency": d.get("max_concurrency"),
              "endpoint": "/v1/chat/completions" if d.get("backend") == "openai-chat" else "/v1/completions"}
    detail = ("start_times", "ttfts", "itls", "latencies", "input_lens", "output_lens", "errors")
    table = pd.DataFrame()
    if all(k in d for k in detail):
        rows = []
        queue = d.get("queue_times") or [np.nan] * len(d["start_times"])
        for i, (st, ttft, itl, lat, n_in, n_out, err) in enumerate(zip(*(d[k] for k in detail))):
            ok = not err and lat > 0
            chunks = list(st + ttft + np.concatenate([[0.0], np.cumsum(itl)])) if ok else []
            rows.append({"index": i, "prompt_len": n_in, "output_len_requested": None, "warmup": False,
                         "dp_rank": None, "scheduled_s": st - queue[i], "start_s": st, "send_s": st, "chunk_s": chunks,
                         "end_s": st + lat if ok else np.nan, "prompt_tokens": n_in,
                         "completion_tokens": n_out if ok else None, "generated_text": "",
                         "success": ok, "http_status": None, "error": err or ""})
        table = pd.DataFrame(rows)
    head = {k: d[k] for k in _VLLM_HEAD if k in d}
    metrics = {k: v for k, v in d.items() if k not in _VLLM_HEAD and k not in VLLM_LISTS + VLLM_DETAILED}
    return BenchResult(metrics, table, config, {"source": source, "client": "vllm bench serve", "vllm_head": head})


def _plain(obj):
    """JSON-safe: inf -> "inf", numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    return obj
