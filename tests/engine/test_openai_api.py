"""The OpenAI API as a user sees it, against `epkit serve` on CPU with DP=2 + EP (one deployment)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest

from deployments import Deployment, wait_gone

API_KEY = "sk-epkit-test"
MODEL = "epkit-tiny-moe"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("api"), ["-dp", "2", "--enable-expert-parallel", "--max-num-seqs", "128"],
                   api_key=API_KEY, api_servers=None)  # the engine's default: one API server per DP rank
    d.wait_ready()
    yield d
    pids = d.pids()
    d.stop()
    assert not wait_gone(pids)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def running(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("epkit:num_requests_running{"))


def test_models_complete_stream_and_chat(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == len("Once upon a time".encode())
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=8,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_token_id_prompts_stop_and_sampling(client, server):
    ids = client.completions.create(model=MODEL, prompt=[72, 105, 33], max_tokens=6, temperature=0)
    text = client.completions.create(model=MODEL, prompt="Hi!", max_tokens=6, temperature=0)
    assert ids.choices[0].text == text.choices[0].text and ids.usage.prompt_tokens == 3
    full = text.choices[0].text
    stop = full[2:4]
    cut = client.completions.create(model=MODEL, prompt="Hi!", max_tokens=6, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.index(stop)]
    a, b = (client.completions.create(model=MODEL, prompt="Hi!", max_tokens=10, temperature=1.0, seed=5) for _ in "ab")
    assert a.choices[0].text == b.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=["Hi!", "Bye"], max_tokens=4, temperature=0)
    assert [c.index for c in sorted(batch.choices, key=lambda c: c.index)] == [0, 1] and batch.usage.completion_tokens == 8


def load_per_rank(server) -> list[float]:
    """Requests running or waiting on each DP rank, as the engine cores last reported them (/metrics)."""
    text = httpx.get(server.url + "/metrics").text
    load = [0.0, 0.0]
    for line in text.splitlines():
        if line.startswith(("epkit:num_requests_running{", "epkit:num_requests_waiting{")):
            load[int(line.split('dp_rank="')[1].split('"')[0])] += float(line.split()[-1])
    return load


def wait_for_load(server, want: list[float], timeout: float = 30.0) -> list[float]:
    deadline = time.time() + timeout
    while (got := load_per_rank(server)) != want and time.time() < deadline:
        time.sleep(0.1)
    return got


def test_pinning_header_and_least_loaded_routing(server):
    """Each API server sends a request to the rank an X-data-parallel-rank header pins, else to the DP rank with the
    fewest of *its own* requests in flight (ties rotate: EngineClient.reserve). Which server a new connection reaches
    is the kernel's choice (SO_REUSEPORT), so the rule is checked per server, from each response's headers
    (x-epkit-api-server, x-data-parallel-rank), with every stream held open until all are routed."""
    headers = {**server.headers}
    for rank in (0, 1):
        r = httpx.post(server.url + "/v1/completions", headers={**headers, "X-data-parallel-rank": str(rank)},
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-data-parallel-rank"] == str(rank)
    bad = httpx.post(server.url + "/v1/completions", headers={**headers, "X-data-parallel-rank": "7"},
                     json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert bad.status_code == 400
    assert wait_for_load(server, [0, 0]) == [0, 0]

    # two requests pinned to rank 1 first: "least loaded" then differs from plain alternation on their server(s)
    pins = ["1", "1", None, None, None, None, None, None, None]
    in_flight: dict[str, list[int]] = {}  # API server -> our open streams per rank
    routed = []
    with contextlib.ExitStack() as open_streams:
        for i, pin in enumerate(pins):
            fresh = open_streams.enter_context(httpx.Client(timeout=60))  # a new connection: any server may take it
            body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 480, "ignore_eos": True, "stream": True}
            r = open_streams.enter_context(fresh.stream("POST", server.url + "/v1/completions", json=body,
                                                        headers={**headers, **({"X-data-parallel-rank": pin} if pin else {})}))
            assert r.status_code == 200
            api_server, rank = r.headers["x-epkit-api-server"], int(r.headers["x-data-parallel-rank"])
            counts = in_flight.setdefault(api_server, [0, 0])
            routed.append((pin, api_server, rank, list(counts)))
            if pin is None:
                assert counts[rank] == min(counts), f"not the least-loaded rank of API server {api_server}: {routed}"
            else:
                assert rank == int(pin), routed
            counts[rank] += 1
        assert set(in_flight) <= {"0", "1"}, routed
        # the engine cores hold every stream (none ended before the last one was routed, so each was in flight)
        mine = [float(sum(c[rank] for c in in_flight.values())) for rank in (0, 1)]
        assert wait_for_load(server, mine) == mine, routed
    assert wait_for_load(server, [0, 0]) == [0, 0], "closing the streams should abort them"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"model": "no-such-model", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x" * 600, "max_tokens": 4}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": "x" * 100, "max_tokens": 500}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "outside the vocabulary"),
        ({"model": MODEL}, 400, "prompt"),
        ('{"model": "epkit-tiny-moe", "prompt": ', 400, "not valid JSON"),
        ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n=2"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, content=content,
                   headers={**server.headers, "content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status and error["type"]


def test_wrong_api_key_and_openai_exceptions(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_disconnect_mid_stream_frees_the_slot(server, client):
    body = {"model": MODEL, "prompt": "long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert running(server) >= 1
    deadline = time.time() + 20
    while running(server) > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert running(server) == 0, "the aborted request still holds a slot"
    after = client.completions.create(model=MODEL, prompt="still serving?", max_tokens=4, temperature=0)
    assert after.usage.completion_tokens == 4


def test_disconnect_before_a_non_streamed_reply_aborts_the_request(server, client):
    """A client that leaves before a non-streamed reply is ready: the request is aborted (vLLM's
    with_cancellation), not finished for nobody."""
    body = {"model": MODEL, "prompt": "long story", "max_tokens": 480, "ignore_eos": True}
    finished = int(_finished(server))
    with pytest.raises(httpx.ReadTimeout):
        # the client gives up 0.3 s after sending (480 tokens take seconds) and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.time() + 20
    while running(server) > 0 and time.time() < deadline:
        time.sleep(0.1)
    assert running(server) == 0, "the abandoned request still holds a slot"
    assert int(_finished(server)) == finished, "the abandoned request ran to its end"
    after = client.completions.create(model=MODEL, prompt="still serving?", max_tokens=4, temperature=0)
    assert after.usage.completion_tokens == 4


def _finished(server) -> float:
    """Requests finished with a reason (vllm:request_success_total over every rank and reason)."""
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total{"))


def test_256_concurrent_streams(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=8,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        return sum([1 async for c in stream if c.choices and c.choices[0].text is not None])

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=240)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(256)))

    chunks = asyncio.run(main())
    assert len(chunks) == 256 and all(n == 8 for n in chunks)
    metrics = httpx.get(server.url + "/metrics").text
    assert "epkit:time_to_first_token_seconds_count" in metrics and 'dp_rank="1"' in metrics
    assert running(server) == 0


def test_one_api_server_per_dp_rank_and_one_view_of_metrics(server, client):
    """vLLM's default: --api-server-count = DP size; any server's /metrics shows the whole deployment."""
    log = server.nodes[0].log()
    assert "api server 1/2" in log and "api server 2/2" in log

    def generated() -> set[float]:  # a new connection per fetch: SO_REUSEPORT spreads them over both servers
        values = set()
        for _ in range(8):
            text = httpx.get(server.url + "/metrics", headers={"Connection": "close"}).text
            values |= {float(line.split()[-1]) for line in text.splitlines() if line.startswith("epkit:generation_tokens_total{")}
        return values

    before = generated()
    assert len(before) == 1
    for _ in range(4):  # spread over both servers as well
        with httpx.Client() as fresh:
            r = fresh.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": MODEL, "prompt": "count me", "max_tokens": 5, "ignore_eos": True})
            assert r.status_code == 200
    assert generated() == {before.pop() + 20}
