"""The client's record of every request against the paced server's own log, in one run.

The server logs, on CLOCK_MONOTONIC (the clock the client reads too), when it read each request
and when it wrote each token. Whatever the machine's load, the client's stamps must sit where
causality puts them (sent before the server read, each token stamped after the server wrote
it), one chunk per token, and every metric must be vLLM's definition applied to those stamps.
How close the stamps come to the server's (the accuracy in ms) depends on the load; that is a
benchmark (``benchmarks/timing_targets.py``, ``benchmarks/client_ttft.py``), not a test.
"""

from __future__ import annotations

import numpy as np
import pytest

from epkit.bench import RandomWorkload, run

TTFT_MS, ITL_MS, OUT, N, SLOTS = 40.0, 8.0, 16, 40, 2


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_every_stamp_agrees_with_the_servers_log(stream_server, byte_tokenizer_dir, endpoint):
    server = stream_server("--ttft-ms", str(TTFT_MS), "--itl-ms", str(ITL_MS))
    # Chat needs text: decode the random token ids with the server's (byte-level) tokenizer.
    tokenizer = byte_tokenizer_dir if "chat" in endpoint else None
    r = run(server.url, "m", RandomWorkload(num_prompts=N, input_len=64, output_len=OUT), endpoint=endpoint,
            tokenizer=tokenizer, max_concurrency=SLOTS, progress=False)
    m, t0 = r.metrics, r.meta["t0_perf_counter_s"]
    log = {e["request_id"]: e for e in server.log()}
    assert m["completed"] == N and m["failed"] == 0 and len(log) == N
    schedule_s = (TTFT_MS + ITL_MS * np.arange(OUT)) / 1e3
    ttft, server_ttft, e2el, server_e2el = [], [], [], []
    for q in r.requests.itertuples():
        e = log[f"epkit-{q.index}"]
        writes, chunks = np.asarray(e["token_s"]), t0 + np.asarray(q.chunk_s)
        assert len(chunks) == len(writes) == OUT  # one chunk per token, the usage chunk not counted
        # One clock: taken up <= written to the socket <= read by the server; the server keeps its
        # schedule (never early); the client stamps each token after the server wrote it, in order.
        assert t0 + q.start_s <= t0 + q.send_s <= e["recv_s"]
        assert (writes - e["recv_s"] >= schedule_s - 1e-9).all()
        assert (chunks >= writes).all() and (np.diff(chunks) >= 0).all() and t0 + q.end_s >= chunks[-1]
        ttft.append((chunks[0] - (t0 + q.send_s)) * 1e3)
        e2el.append((chunks[-1] - (t0 + q.send_s)) * 1e3)
        server_ttft.append((writes[0] - e["recv_s"]) * 1e3)
        server_e2el.append((writes[-1] - e["recv_s"]) * 1e3)
    # The metrics are vLLM's definitions over these stamps, so they bound the server's own numbers.
    assert m["median_ttft_ms"] == pytest.approx(np.median(ttft), rel=1e-12)
    assert m["mean_e2el_ms"] == pytest.approx(np.mean(e2el), rel=1e-12)
    assert m["median_ttft_ms"] >= np.median(server_ttft) >= TTFT_MS
    assert m["mean_e2el_ms"] >= np.mean(server_e2el) >= TTFT_MS + (OUT - 1) * ITL_MS
    itl = np.concatenate([np.diff(c) for c in r.requests["chunk_s"]]) * 1e3
    assert m["median_itl_ms"] == pytest.approx(np.median(itl), rel=1e-12)
    assert m["median_tpot_ms"] == pytest.approx(np.median((np.asarray(e2el) - ttft) / (OUT - 1)), rel=1e-12)
    # Token counts come from the server's usage chunk; throughput is tokens / duration.
    assert m["total_output_tokens"] == N * OUT
    # The prompt lengths epkit sampled are the ones the server counted.
    assert m["total_input_tokens"] == r.requests["prompt_len"].sum() == sum(e["prompt_tokens"] for e in log.values())
    if tokenizer is None:
        assert m["total_input_tokens"] == N * 64
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration"], rel=1e-12)
    assert m["request_throughput"] == pytest.approx(N / m["duration"], rel=1e-12)
    # SLOTS at a time, each request at least the server's schedule long: a floor on the duration.
    assert m["duration"] >= N / SLOTS * (TTFT_MS + (OUT - 1) * ITL_MS) / 1e3
