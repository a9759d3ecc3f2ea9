"""Load shapes against the real paced server: concurrency, rate, warm-ups, limits, DP pinning, ladders."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from epkit.bench import RandomWorkload, TraceWorkload, run, run_ladder
from epkit.bench.metrics import derive


def _max_in_flight(table) -> int:
    events = [(s, 1) for s in table["send_s"]] + [(e, -1) for e in table["end_s"]]
    level = peak = 0
    for _, step in sorted(events, key=lambda x: (x[0], x[1])):
        level += step
        peak = max(peak, level)
    return peak


def test_max_concurrency_caps_requests_in_flight(stream_server):
    server = stream_server("--ttft-ms", "10", "--itl-ms", "2")
    r = run(server.url, "m", RandomWorkload(num_prompts=30, input_len=8, output_len=10), max_concurrency=3,
            progress=False)
    assert r["completed"] == 30
    assert _max_in_flight(r.requests) == 3
    # Requests queue at the client, not at the server: each was sent as soon as a slot freed.
    assert (r.requests["send_s"] >= r.requests["scheduled_s"]).all()


def test_request_rate_sets_the_arrival_rate(stream_server):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "1")
    r = run(server.url, "m", RandomWorkload(num_prompts=20, input_len=8, output_len=4), request_rate=40.0,
            burstiness=math.inf, progress=False)
    sends = np.sort(r.requests["send_s"].to_numpy())
    assert np.median(np.diff(sends)) == pytest.approx(1 / 40, abs=2e-3)
    assert sends[-1] == pytest.approx(20 / 40, abs=5e-3)  # vLLM's schedule: last due at n / rate


def test_warmups_are_recorded_but_not_counted(stream_server):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "1")
    r = run(server.url, "m", RandomWorkload(num_prompts=10, input_len=8, output_len=4), num_warmups=4,
            max_concurrency=2, progress=False)
    assert len(r.requests) == 14 and r.requests["warmup"].sum() == 4
    assert r["completed"] == 10 and r["total_output_tokens"] == 40
    warm = r.requests[r.requests["warmup"]]
    assert (warm["end_s"] <= r.requests.loc[~r.requests["warmup"], "send_s"].min()).all()


def test_duration_limit_stops_sending(stream_server):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "5")
    r = run(server.url, "m", RandomWorkload(num_prompts=5, input_len=8, output_len=10), max_concurrency=2,
            duration_s=1.0, progress=False)
    # ~50 ms per request, 2 at a time, cycling the 5 samples for one second: ~40 requests.
    assert 25 <= r["completed"] <= 45
    assert r.requests["send_s"].max() < 1.0
    assert r["duration"] < 1.2


def test_dp_rank_pinning_is_round_robin(stream_server):
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1")
    run(server.url, "m", RandomWorkload(num_prompts=12, input_len=8, output_len=2), data_parallel_size=4,
        max_concurrency=1, progress=False)
    log = server.log()
    ranks = {e["request_id"]: int(e["dp_rank"]) for e in log}
    assert [ranks[f"epkit-{i}"] for i in range(12)] == [0, 1, 2, 3] * 3


def test_ladder_runs_every_rate_and_concurrency(stream_server):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "2")
    results = run_ladder(server.url, "m", RandomWorkload(num_prompts=8, input_len=8, output_len=5),
                         request_rates=[50.0, math.inf], max_concurrencies=[1, 4], progress=False)
    shapes = [(r.config["request_rate"], r.config["max_concurrency"]) for r in results]
    assert shapes == [(50.0, 1), (50.0, 4), (math.inf, 1), (math.inf, 4)]
    assert all(r["completed"] == 8 for r in results)
    assert _max_in_flight(results[3].requests) == 4 and _max_in_flight(results[2].requests) == 1


def test_trace_replay_sends_at_the_trace_timestamps(stream_server, tmp_path):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "1")
    trace = tmp_path / "trace.jsonl"
    stamps_ms = [1000, 1000, 1100, 1350, 1600]
    trace.write_text("\n".join(json.dumps({"timestamp": t, "input_length": 20 + i, "output_length": 3 + i,
                                           "hash_ids": [i]}) for i, t in enumerate(stamps_ms)))
    r = run(server.url, "m", TraceWorkload(path=str(trace)), request_rate=1.0, progress=False)
    d = derive(r.requests)
    np.testing.assert_allclose(d["send_s"], [(t - 1000) / 1e3 for t in stamps_ms], atol=10e-3)
    assert list(d["output_len"]) == [3, 4, 5, 6, 7] and list(d["input_len"]) == [20, 21, 22, 23, 24]


def test_api_key_and_custom_headers_are_sent(stream_server):
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1", "--api-key", "s3cret")
    wl = RandomWorkload(num_prompts=3, input_len=8, output_len=2)
    assert run(server.url, "m", wl, progress=False)["failed"] == 3  # no key: 401, recorded
    r = run(server.url, "m", wl, api_key="s3cret", headers={"x-request-id": "mine"}, progress=False)
    assert r["completed"] == 3
    assert {e["request_id"] for e in server.log()} == {"mine"}


def test_run_works_inside_a_running_event_loop(stream_server):
    """Jupyter runs cells inside an event loop; run() must not clash with it."""
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1")

    async def cell():
        return run(server.url, "m", RandomWorkload(num_prompts=4, input_len=8, output_len=3), progress=False)

    assert asyncio.run(cell())["completed"] == 4


def test_bench_imports_neither_torch_nor_topology():
    import subprocess
    import sys

    code = "import sys, epkit.bench, epkit.bench.cli; bad = [m for m in sys.modules if m == 'torch' or " \
           "m.startswith(('epkit.topology', 'epkit.engine'))]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True)
