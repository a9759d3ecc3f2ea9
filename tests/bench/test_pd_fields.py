"""What the bench records of a disaggregated request (``epkit_pd`` from ``epkit proxy``, contract C4),
and vLLM's ``--goodput`` semantics per request.

The parsing tests feed SSE bytes at the client's parsing edge (``EventReader``), shaped as the router
sends them; tests/bench/test_pd_router.py runs the real bench against the real router.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from epkit.bench.client import EventReader, RequestRecord, record_pd
from epkit.bench.metrics import derive, goodput_count, meets_slos, request_table, summarize
from epkit.bench.result import BenchResult, epkit_only_keys, load_result

PD = {"request_id": "epkit-0", "prefill_url": "http://127.0.0.1:8101", "decode_url": "http://127.0.0.1:8102",
      "prefill_ms": 12.5, "kv_transfer_ms": 3.25, "kv_transfer_bytes": 65536}


def sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n"
                    for e in events)


def chunk(text: str, **extra) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": text}], **extra}


def read(data: bytes, split: int | None = None) -> tuple[RequestRecord, EventReader]:
    rec = RequestRecord(index=0, prompt_len=4, output_len_requested=3)
    reader = EventReader(rec, chat=False, t0=0.0)
    parts = [data] if split is None else [data[:split], data[split:]]
    for i, part in enumerate(parts):
        assert reader.feed(part, at_s=1.0 + i)
    reader.close()
    return rec, reader


def test_the_last_chunk_of_a_routed_stream_fills_the_pd_fields():
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}, "epkit_pd": PD}
    data = sse(chunk("a"), chunk("b"), chunk("c"), usage, "[DONE]")
    for split in (None, 7, len(data) - 20):  # the event split over two reads anywhere
        rec, reader = read(data, split)
        assert reader.done and rec.generated_text == "abc" and len(rec.chunk_s) == 3
        assert (rec.prefill_ms, rec.kv_transfer_ms, rec.kv_transfer_bytes) == (12.5, 3.25, 65536)
        assert (rec.prefill_url, rec.decode_url) == (PD["prefill_url"], PD["decode_url"])
        assert rec.completion_tokens == 3


def test_epkit_pd_on_a_token_chunk_counts_the_chunk_too():
    rec, _ = read(sse(chunk("a"), chunk("b", epkit_pd=PD), "[DONE]"))
    assert len(rec.chunk_s) == 2 and rec.prefill_ms == 12.5


def test_the_decode_engines_own_transfer_report_fills_what_the_router_left_null():
    """The engine reports ``epkit_kv_transfer`` (C2) on the chunk that ends its stream; with usage asked, the
    router's ``epkit_pd`` is on the usage chunk after it and may carry kv_transfer_ms null."""
    last = chunk("c", epkit_kv_transfer={"ms": 1.5, "bytes": 4096, "blocks": 2, "transport": "tcp"})
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3},
             "epkit_pd": {**PD, "kv_transfer_ms": None, "kv_transfer_bytes": None}}
    rec, _ = read(sse(chunk("a"), chunk("b"), last, usage, "[DONE]"))
    assert (rec.prefill_ms, rec.kv_transfer_ms, rec.kv_transfer_bytes) == (12.5, 1.5, 4096)
    rec, _ = read(sse(chunk("a"), last, {"choices": [], "epkit_pd": PD}, "[DONE]"))
    assert (rec.kv_transfer_ms, rec.kv_transfer_bytes) == (3.25, 65536)  # the router's numbers when it gives them


def test_a_plain_server_leaves_the_pd_fields_empty():
    rec, reader = read(sse(chunk("a"), chunk("b"), "[DONE]"))
    assert reader.done and not rec.error
    assert rec.prefill_ms is rec.kv_transfer_ms is rec.kv_transfer_bytes is rec.prefill_url is rec.decode_url is None


def test_nulls_and_odd_types_from_the_router_are_not_errors():
    """kv_transfer_ms is null where the decode engine did not report a transfer (C4)."""
    rec = RequestRecord(index=0, prompt_len=1, output_len_requested=1)
    record_pd(rec, {"epkit_pd": {**PD, "kv_transfer_ms": None, "kv_transfer_bytes": "many", "decode_url": 5}})
    assert rec.prefill_ms == 12.5 and rec.kv_transfer_ms is None and rec.kv_transfer_bytes is None
    assert rec.decode_url is None and rec.prefill_url == PD["prefill_url"]
    record_pd(rec, {"epkit_pd": None})
    record_pd(rec, {"choices": []})
    assert rec.prefill_ms == 12.5


def test_a_whole_response_body_fills_the_pd_fields():
    rec = RequestRecord(index=0, prompt_len=1, output_len_requested=1)
    record_pd(rec, {"id": "cmpl-2", "choices": [{"text": "xy"}], "epkit_pd": {**PD, "prefill_ms": 7}})
    assert rec.prefill_ms == 7.0 and isinstance(rec.prefill_ms, float) and rec.kv_transfer_bytes == 65536


def _records(pd_on: bool) -> list[RequestRecord]:
    out = []
    for i, (prefill, kv) in enumerate([(10.0, 1.0), (20.0, None), (30.0, 3.0), (40.0, 4.0)]):
        r = RequestRecord(index=i, prompt_len=4, output_len_requested=3, send_s=float(i),
                          chunk_s=[i + 0.1, i + 0.11, i + 0.12], end_s=i + 0.13, completion_tokens=3,
                          success=i != 3, error="" if i != 3 else "HTTP 502")
        if pd_on:
            record_pd(r, {"epkit_pd": {**PD, "prefill_ms": prefill, "kv_transfer_ms": kv}})
        out.append(r)
    return out


def test_point_metrics_over_the_successful_requests_that_carry_them():
    m = summarize(request_table(_records(True)), duration_s=4.0)
    assert m["mean_prefill_ms"] == pytest.approx(20.0)  # the failed request (40 ms) is left out, as for TTFT
    assert m["median_prefill_ms"] == pytest.approx(20.0)
    assert m["p99_prefill_ms"] == pytest.approx(np.percentile([10, 20, 30], 99))
    assert m["mean_kv_transfer_ms"] == pytest.approx(2.0)  # the request without a transfer time is left out
    assert m["p99_kv_transfer_ms"] == pytest.approx(np.percentile([1, 3], 99))
    plain = summarize(request_table(_records(False)), duration_s=4.0)
    assert not [k for k in plain if "prefill" in k or "kv_transfer" in k]


def test_pd_fields_go_through_the_requests_parquet_and_stay_epkit_keys(tmp_path):
    table = request_table(_records(True))
    result = BenchResult(summarize(table, 4.0), table, {"model": "m", "endpoint": "/v1/completions",
                                                        "request_rate": math.inf})
    path = result.save(tmp_path / "r.json")
    back = load_result(path)
    assert back.metrics == result.metrics
    assert back.requests["prefill_ms"].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert back.requests["kv_transfer_ms"].isna().tolist() == [False, True, False, False]
    assert back.requests["decode_url"].tolist() == [PD["decode_url"]] * 4
    doc = json.loads(path.read_text())
    assert {"mean_prefill_ms", "p99_kv_transfer_ms"} <= epkit_only_keys(doc)
    assert "Prefill (router)" in back.summary() and "P99 KV transfer (ms):" in back.summary()
    plain = request_table(_records(False))  # no router: the columns are there, empty, and load back
    back = load_result(BenchResult(summarize(plain, 4.0), plain, {"model": "m"}).save(tmp_path / "p.json"))
    assert back.requests["prefill_ms"].isna().all()


def test_meets_slos_is_vllms_goodput():
    """vLLM's calculate_metrics: good when every given limit holds (value <= limit, ms), TPOT of a
    one-token request counts as 0, failed requests are never good."""
    table = request_table([
        {"index": 0, "prompt_len": 1, "output_len_requested": 3, "send_s": 0.0, "chunk_s": [0.1, 0.15, 0.2],
         "completion_tokens": 3, "success": True},     # ttft 100, tpot 50
        {"index": 1, "prompt_len": 1, "output_len_requested": 3, "send_s": 0.0, "chunk_s": [0.3, 0.31, 0.32],
         "completion_tokens": 3, "success": True},     # ttft 300, tpot 10
        {"index": 2, "prompt_len": 1, "output_len_requested": 1, "send_s": 0.0, "chunk_s": [0.05],
         "completion_tokens": 1, "success": True},     # ttft 50, one token: tpot 0
        {"index": 3, "prompt_len": 1, "output_len_requested": 3, "send_s": 0.0, "chunk_s": [],
         "success": False},
    ])
    d = derive(table)
    assert meets_slos(d, {"ttft": 200}).tolist() == [True, False, True, False]
    assert meets_slos(d, {"tpot": 20}).tolist() == [False, True, True, False]
    assert meets_slos(d, {"ttft": 200, "tpot": 50}).tolist() == [True, False, True, False]
    assert meets_slos(d, {"ttft": 100}).tolist()[0]  # the limit itself is met
    assert goodput_count(d, {"ttft": 200, "tpot": 50}) == 2
    assert summarize(table, 2.0, goodput_slos_ms={"ttft": 200, "tpot": 50})["request_goodput"] == 1.0
    with pytest.raises(ValueError, match="latency"):
        meets_slos(d, {"latency": 5})
    with pytest.raises(ValueError, match="ttft=-1"):
        meets_slos(d, {"ttft": -1})
    assert meets_slos(derive(pd.DataFrame()), {"ttft": 1}).tolist() == []
