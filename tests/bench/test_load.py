"""Load shapes against the real paced server: concurrency, rate, warm-ups, limits, DP pinning, ladders.

Only relations that hold however loaded the machine is: the schedule is exact, a request is never
sent before it is due nor while all slots are busy, a slot's requests follow one another, and the
server's schedule (never early) bounds what fits in a time. How late the client sends under load
is measured by ``benchmarks/timing_targets.py``, not asserted here.
"""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from epkit.bench import RandomWorkload, TraceWorkload, run, run_ladder
from epkit.bench.arrivals import arrival_offsets_s
from epkit.bench.metrics import derive


def _max_in_flight(table) -> int:
    events = [(s, 1) for s in table["send_s"]] + [(e, -1) for e in table["end_s"]]
    level = peak = 0
    for _, step in sorted(events, key=lambda x: (x[0], x[1])):
        level += step
        peak = max(peak, level)
    return peak


def test_max_concurrency_caps_requests_in_flight(stream_server):
    server = stream_server("--ttft-ms", "50", "--itl-ms", "2")
    r = run(server.url, "m", RandomWorkload(num_prompts=30, input_len=8, output_len=10), max_concurrency=3,
            progress=False)
    assert r["completed"] == 30
    assert _max_in_flight(r.requests) == 3
    # Requests queue at the client, not at the server: each was sent as soon as a slot freed.
    assert (r.requests["send_s"] >= r.requests["start_s"]).all() and (r.requests["start_s"] >= r.requests["scheduled_s"]).all()


def test_request_rate_sets_the_arrival_rate(stream_server):
    server = stream_server("--ttft-ms", "5", "--itl-ms", "1")
    r = run(server.url, "m", RandomWorkload(num_prompts=20, input_len=8, output_len=4), request_rate=40.0,
            burstiness=math.inf, progress=False)
    t = r.requests.sort_values("index")
    # vLLM's schedule exactly (constant gaps of 1/40 s, the last due at n / rate), and never sent early
    np.testing.assert_array_equal(t["scheduled_s"], arrival_offsets_s(20, 40.0, math.inf))
    assert t["scheduled_s"].iloc[-1] == pytest.approx(20 / 40, rel=1e-12)
    assert (t["start_s"] >= t["scheduled_s"]).all() and (t["send_s"] >= t["start_s"]).all()
    assert (np.diff(t["start_s"]) >= 0).all()  # taken up in schedule order
    assert r["duration"] >= 20 / 40


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
    # The loop sends until the second has passed, then waits for what is in flight.
    assert r["duration"] >= 1.0 and r["failed"] == 0 and r["completed"] >= 1
    # Each request takes the server's 5 + 9 x 5 = 50 ms at least and a slot serves one at a time, so at
    # most 2 x (1 s / 50 ms + 1) requests can have started within the second: sending stopped.
    assert r["completed"] <= 2 * (1.0 / 0.050 + 1)
    # With 2 slots, the k-th request can start only once k - 1 have ended.
    t = r.requests.sort_values("index")
    assert (t["start_s"].to_numpy()[2:] >= np.sort(t["end_s"].to_numpy())[:-2]).all()


def test_max_requests_cycles_the_samples(stream_server):
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1")
    wl = RandomWorkload(num_prompts=5, input_len=8, output_len=3, range_ratio=0.5)
    r = run(server.url, "m", wl, max_requests=12, max_concurrency=2, progress=False)
    lens = [s.prompt_len for s in wl.sample()]
    assert list(r.requests.sort_values("index")["prompt_len"]) == (lens * 3)[:12]
    assert r["completed"] == 12


def test_dp_rank_pinning_is_round_robin(stream_server):
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1")
    run(server.url, "m", RandomWorkload(num_prompts=12, input_len=8, output_len=2), data_parallel_size=4,
        max_concurrency=1, progress=False)
    log = server.log()
    ranks = {e["request_id"]: int(e["dp_rank"]) for e in log}
    assert [ranks[f"epkit-{i}"] for i in range(12)] == [0, 1, 2, 3] * 3


def test_ladder_runs_every_rate_and_concurrency(stream_server):
    server = stream_server("--ttft-ms", "20", "--itl-ms", "2")
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
    d = derive(r.requests.sort_values("index"))
    np.testing.assert_allclose(d["scheduled_s"], [(t - 1000) / 1e3 for t in stamps_ms], rtol=0, atol=1e-12)
    assert (d["send_s"] >= d["scheduled_s"]).all()
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
