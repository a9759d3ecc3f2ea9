"""Bad inputs end in a clear message or a failed-request record; the run's other results are kept."""

from __future__ import annotations

import socket

import pytest

from epkit.bench import RandomWorkload, ShareGPTWorkload, TraceWorkload, run
from epkit.bench.cli import main

WL = RandomWorkload(num_prompts=9, input_len=8, output_len=6)


@pytest.mark.parametrize("fault, error", [
    ("500", "HTTP 500"),
    ("429", "HTTP 429"),
    ("close", "after 3 chunks"),
    ("malformed", "malformed SSE"),
    ("empty", "without a single token"),
])
def test_every_third_request_fails_and_the_rest_count(stream_server, fault, error):
    server = stream_server("--ttft-ms", "2", "--itl-ms", "1", "--fail-every", "3", "--fault", fault)
    r = run(server.url, "m", WL, max_concurrency=1, progress=False)
    failed = r.requests[~r.requests["success"]]
    assert r["completed"] == 6 and r["failed"] == 3
    assert all(error in e for e in failed["error"]), list(failed["error"])
    assert r["total_output_tokens"] == 6 * 6  # failures add no tokens
    d = r.derived()
    assert d["ttft_ms"].notna().sum() == 6 and d["tpot_ms"].notna().sum() == 6  # and no latency samples
    assert sum(len(x) for x in d["itl_ms"]) == 6 * 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_failed_records_and_a_clear_cli_error(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    r = run(url, "m", WL, progress=False)
    assert r["completed"] == 0 and r["failed"] == 9
    assert all("Cannot connect" in e for e in r.requests["error"])
    assert main(["--base-url", url, "--model", "m", "--num-prompts", "2", "--disable-tqdm"]) == 1
    err = capsys.readouterr().err
    assert "every request to" in err and "Cannot connect" in err


def test_timeout_is_a_failed_record(stream_server):
    server = stream_server("--ttft-ms", "2000", "--itl-ms", "1")
    r = run(server.url, "m", RandomWorkload(num_prompts=2, input_len=8, output_len=2), timeout_s=0.3,
            progress=False)
    assert r["failed"] == 2 and all("Timeout" in e for e in r.requests["error"])


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "-1"], "request_rate=-1.0 must be > 0"),
    (["--max-concurrency", "0"], "max_concurrency=0 must be >= 1"),
    (["--burstiness", "0"], "burstiness=0.0 must be > 0"),
    (["--random-range-ratio", "1.5"], "range_ratio=1.5 must be in [0, 1)"),
    (["--dataset-name", "sharegpt"], "needs --dataset-path"),
    (["--goodput", "ttft=5"], "expected KEY:MS"),
])
def test_bad_flags_are_one_clear_error_before_sending(capsys, argv, message):
    assert main(["--base-url", "http://127.0.0.1:9", "--model", "m", *argv]) == 2
    assert message in capsys.readouterr().err


def test_empty_or_broken_dataset_files_are_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="cannot read a ShareGPT JSON file"):
        ShareGPTWorkload(path=str(empty)).sample()
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no conversation"):
        ShareGPTWorkload(path=str(empty)).sample()
    trace = tmp_path / "t.jsonl"
    trace.write_text("")
    with pytest.raises(ValueError, match="holds no request"):
        TraceWorkload(path=str(trace)).sample()
    trace.write_text('{"timestamp": 1, "input_length": 3}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: need .*output_length"):
        TraceWorkload(path=str(trace)).sample()
    assert main(["--model", "m", "--dataset-name", "sharegpt", "--dataset-path", str(empty)]) == 2
    assert "no conversation" in capsys.readouterr().err
