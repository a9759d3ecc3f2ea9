"""Metrics as pure functions over a hand-made request table whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from epkit.bench.arrivals import arrival_offsets_s
from epkit.bench.metrics import derive, goodput_count, peak_rates, per_request_lists, request_table, summarize
from epkit.bench.result import BenchResult, epkit_only_keys, load_result


def rec(i, send, chunks, out=None, ok=True, warmup=False, prompt=10):
    return {"index": i, "prompt_len": prompt, "output_len_requested": len(chunks), "warmup": warmup,
            "send_s": send, "chunk_s": chunks, "end_s": chunks[-1] if chunks else send,
            "prompt_tokens": prompt, "completion_tokens": out if out is not None else len(chunks),
            "success": ok, "error": "" if ok else "HTTP 500"}


TABLE = request_table([
    rec(0, 0.0, [0.100, 0.110, 0.120, 0.130]),          # ttft 100, tpot 10, itl 10,10,10
    rec(1, 0.5, [0.700, 0.740]),                        # ttft 200, tpot 40, itl 40
    rec(2, 1.0, [1.050], out=1),                        # ttft 50, one token: no tpot, no itl
    rec(3, 1.2, [], ok=False),                          # failed
    rec(4, -1.0, [-0.9, -0.8], warmup=True),            # warm-up: never counted
])


def test_vllm_definitions_on_known_values():
    m = summarize(TABLE, duration_s=2.0, percentiles=(50, 100))
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 7
    assert m["mean_ttft_ms"] == pytest.approx((100 + 200 + 50) / 3)
    assert m["median_ttft_ms"] == pytest.approx(100)
    assert m["p100_ttft_ms"] == pytest.approx(200)
    assert m["mean_tpot_ms"] == pytest.approx((10 + 40) / 2)           # one-token request has no TPOT
    assert m["mean_itl_ms"] == pytest.approx((10 * 3 + 40) / 4)        # pooled gaps, not per-request means
    assert m["median_itl_ms"] == pytest.approx(10)
    assert m["mean_e2el_ms"] == pytest.approx((130 + 240 + 50) / 3)
    assert m["std_ttft_ms"] == pytest.approx(np.std([100, 200, 50]))   # population std, as vLLM
    assert m["output_throughput"] == pytest.approx(7 / 2.0)
    assert m["total_token_throughput"] == pytest.approx(37 / 2.0)
    assert m["request_throughput"] == pytest.approx(3 / 2.0)
    assert m["request_goodput"] is None


def test_named_variants():
    m = summarize(TABLE, duration_s=2.0, max_concurrency=2)
    assert m["mean_tpot_incl_first_ms"] == pytest.approx((130 / 4 + 240 / 2 + 50 / 1) / 3)  # guidellm
    assert m["interactivity_pareto_tok_s"] == pytest.approx(3.5 / 2)
    assert m["interactivity_inferencex_tok_s"] == pytest.approx(1000 / m["median_tpot_ms"])


def test_goodput_counts_requests_meeting_every_slo():
    d = derive(TABLE[~TABLE["warmup"]])
    assert goodput_count(d, {"ttft": 150}) == 2
    assert goodput_count(d, {"ttft": 150, "tpot": 20}) == 2     # the one-token request's TPOT counts as 0
    assert goodput_count(d, {"tpot": 20, "e2el": 100}) == 1
    assert summarize(TABLE, 2.0, goodput_slos_ms={"ttft": 150})["request_goodput"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="itl"):
        goodput_count(d, {"itl": 5})


def test_peak_buckets_as_vllm():
    d = derive(TABLE[~TABLE["warmup"]])
    tok_s, conc = peak_rates(d)
    assert tok_s == 6.0    # second 0 holds 4 + 2 chunks; second 1 holds 1
    assert conc == 2       # seconds 0: reqs 0,1; second 1: req 2 only (req 1 ends at 0.74)


def test_all_failed_gives_zeros_not_errors():
    t = request_table([rec(0, 0.0, [], ok=False), rec(1, 0.1, [], ok=False)])
    m = summarize(t, 1.0)
    assert m["completed"] == 0 and m["failed"] == 2 and m["mean_ttft_ms"] == 0.0 and m["output_throughput"] == 0


def test_usage_count_wins_over_chunk_count():
    t = request_table([rec(0, 0.0, [0.1, 0.2], out=6)])  # a server that sends 3 tokens per chunk
    d = derive(t)
    assert d["output_len"][0] == 6 and d["tpot_ms"][0] == pytest.approx(100 / 5)


def test_arrivals_follow_vllms_schedule():
    assert (arrival_offsets_s(5, math.inf) == 0).all()
    np.testing.assert_allclose(arrival_offsets_s(4, 2.0, math.inf), [0.5, 1.0, 1.5, 2.0])
    poisson = arrival_offsets_s(20000, 100.0, 1.0, seed=1)
    gaps = np.diff(poisson)
    assert poisson[-1] == pytest.approx(200.0)                      # rescaled: last due at n / rate
    assert gaps.mean() == pytest.approx(0.01, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrival_offsets_s(20000, 100.0, 0.25, seed=1))
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma shape k: CV 1/sqrt(k)
    with pytest.raises(ValueError, match="request_rate=-1 must be > 0"):
        arrival_offsets_s(3, -1)


def test_per_request_lists_as_vllm_writes_them():
    """latencies: E2EL in s, 0.0 for a failed request; queue_times: due -> taken up, in s; warm-ups out."""
    t = TABLE.assign(scheduled_s=[0.0, 0.5, 0.5, 1.0, float("nan")], start_s=[0.0, 0.5, 0.75, 1.125, -1.0])
    lists = per_request_lists(t)
    assert lists["latencies"] == pytest.approx([0.130, 0.240, 0.050, 0.0])
    assert lists["queue_times"] == pytest.approx([0.0, 0.0, 0.25, 0.125])
    doc = BenchResult(summarize(t, 2.0), t, {"model": "m", "endpoint": "/v1/completions"}).to_vllm_json()
    assert doc["latencies"] == lists["latencies"] and doc["queue_times"] == lists["queue_times"]
    assert doc["rtfx"] == 0.0
    keys = list(doc)  # vLLM's order: the lists after the throughputs, rtfx after the peaks
    assert keys.index("total_token_throughput") < keys.index("latencies") < keys.index("queue_times") \
        < keys.index("max_output_tokens_per_s") < keys.index("max_concurrent_requests") < keys.index("rtfx") \
        < keys.index("mean_ttft_ms")
    assert epkit_only_keys(doc) == {"epkit", "interactivity_pareto_tok_s", "interactivity_inferencex_tok_s",
                                    *(f"{s}_tpot_incl_first_ms" for s in ("mean", "median", "std", "p50", "p90", "p99"))}


def test_saved_result_loads_back_with_the_same_metrics(tmp_path):
    t = TABLE.assign(scheduled_s=0.0, start_s=TABLE["send_s"])
    r = BenchResult(summarize(t, 2.0), t, {"model": "m", "endpoint": "/v1/completions", "request_rate": math.inf})
    back = load_result(r.save(tmp_path / "r.json"))
    assert back.metrics == r.metrics  # the vLLM lists and rtfx are written for vLLM's readers, derived on load
    assert back.recompute() == pytest.approx(r.metrics)
