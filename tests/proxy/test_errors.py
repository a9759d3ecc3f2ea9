"""`epkit proxy` when parts fail: a prefill instance down (retried elsewhere, or a 502 naming every one tried), a
decode failing after its prefill (the prefill's held KV is released), a client leaving mid-stream (the decode
request is aborted), and --api-key."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from conftest import API_KEY, MODEL, dead_url, metric, scrape
from test_flow import PROMPT, client


def wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until true (a wait for a state, not a timing assert)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not reached in {timeout} s: {what}")


@pytest.fixture
def failing_instance():
    """A test double at the router's edge: an HTTP server whose every POST answers 503 (an overloaded instance)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.dumps({"error": {"message": "overloaded", "code": 503}}).encode()
            self.send_response(503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def held_blocks(url: str) -> float:
    return metric(scrape(url), "epkit:kv_transfer_held_blocks")


def test_a_dead_or_failing_prefill_instance_is_retried_on_another(engines, proxy, failing_instance):
    p0, d0 = engines["p0"], engines["d0"]
    dead = dead_url()
    router = proxy([dead, failing_instance, p0.url], [d0.url])
    pd = client(router.url)
    # round robin starts each request one instance further: dead -> 503 -> P0, then 503 -> P0, then P0
    for _ in range(3):
        reply = pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
        assert reply.model_extra["epkit_pd"]["prefill_url"] == p0.url
    text = router.metrics()
    assert metric(text, "epkit:proxy_upstream_errors_total", role="prefill", instance=dead) == 1
    assert metric(text, "epkit:proxy_upstream_errors_total", role="prefill", instance=failing_instance) == 2
    assert metric(text, "epkit:proxy_retries_total", role="prefill") == 3
    assert metric(text, "epkit:proxy_requests_total", outcome="ok") == 3


def test_no_prefill_instance_left_is_a_502_naming_each(engines, proxy, failing_instance):
    dead = dead_url()
    router = proxy([dead, failing_instance], [engines["d0"].url])
    with pytest.raises(openai.APIStatusError) as caught:
        client(router.url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert caught.value.status_code == 502
    message = caught.value.body["message"]
    assert dead in message and "ConnectError" in message
    assert failing_instance in message and "HTTP 503" in message and "overloaded" in message
    health = httpx.get(router.url + "/health")
    assert health.status_code == 503 and health.json()["decode"] == {engines["d0"].url: "ok"}
    assert metric(router.metrics(), "epkit:proxy_requests_total", outcome="prefill_unavailable") == 1


def test_a_decode_failing_after_prefill_releases_the_prefill_kv(engines, proxy):
    p0, d0 = engines["p0"], engines["d0"]
    router = proxy([p0.url], [d0.url])
    pd = client(router.url)
    # max_tokens=2000 passes the prefill (which gets max_tokens=1) and fails the decode (context 512): a real
    # decode error after a real prefill that holds the prompt's KV for it
    with pytest.raises(openai.BadRequestError) as caught:
        pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000)
    assert "maximum context length" in caught.value.body["message"]  # the decode's own error, passed through
    with pytest.raises(openai.BadRequestError):  # streamed: the decode refuses before its stream starts
        list(pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2000, stream=True))
    text = router.metrics()
    assert metric(text, "epkit:proxy_requests_total", outcome="decode_error") == 2
    assert metric(text, "epkit:proxy_kv_releases_total", instance=p0.url) == 2
    assert metric(text, "epkit:proxy_kv_releases_total", instance=p0.url, outcome="failed") == 0
    wait_for(lambda: held_blocks(p0.url) == 0, what="P0 holds no KV blocks")

    # a decode instance that cannot be reached: 502 naming it, the prefill's KV released
    dead = dead_url()
    router2 = proxy([p0.url], [dead])
    with pytest.raises(openai.APIStatusError) as caught:
        client(router2.url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert caught.value.status_code == 502 and dead in caught.value.body["message"]
    text = router2.metrics()
    assert metric(text, "epkit:proxy_kv_releases_total", instance=p0.url, outcome="released") == 1
    wait_for(lambda: held_blocks(p0.url) == 0, what="P0 holds no KV blocks")


def test_an_unreachable_decode_instance_is_retried_on_another(engines, proxy):
    p0, d0 = engines["p0"], engines["d0"]
    dead = dead_url()
    router = proxy([p0.url], [dead, d0.url])
    reply = client(router.url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.model_extra["epkit_pd"]["decode_url"] == d0.url
    assert reply.model_extra["epkit_pd"]["kv_transfer_ms"] is not None  # D0 pulled the KV P0 kept
    text = router.metrics()
    assert metric(text, "epkit:proxy_retries_total", role="decode") == 1
    assert metric(text, "epkit:proxy_upstream_errors_total", role="decode", instance=dead) == 1
    assert metric(text, "epkit:proxy_kv_releases_total") == 0


def test_a_client_leaving_mid_stream_aborts_the_decode(engines, proxy):
    p0, d0 = engines["p0"], engines["d0"]
    router = proxy([p0.url], [d0.url])
    finished_before = metric(scrape(d0.url), "epkit:request_success_total")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 440, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", router.url + "/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: {")
                if events == 3:
                    break  # leave: the connection is closed here
    wait_for(lambda: metric(scrape(d0.url), "epkit:num_requests_running") == 0, what="D0 runs nothing")
    wait_for(lambda: metric(router.metrics(), "epkit:proxy_requests_total", outcome="client_disconnected") == 1,
             what="the router counts the request as disconnected")
    # the engine counts a request it finished; an aborted one is not
    assert metric(scrape(d0.url), "epkit:request_success_total") == finished_before
    assert metric(router.metrics(), "epkit:proxy_in_flight_requests", role="decode") == 0


def test_a_client_leaving_a_whole_reply_aborts_the_decode(engines, proxy):
    p0, d0 = engines["p0"], engines["d0"]
    router = proxy([p0.url], [d0.url])
    finished_before = metric(scrape(d0.url), "epkit:request_success_total")
    # 440 tokens: ~6 s here; the client gives up 0.3 s after sending and closes its connection
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 440, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(router.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(10.0, read=0.3))
    wait_for(lambda: metric(router.metrics(), "epkit:proxy_requests_total", outcome="client_disconnected") == 1,
             what="the router counts the request as disconnected")
    assert metric(router.metrics(), "epkit:proxy_in_flight_requests") == 0  # its decode call was closed
    assert metric(router.metrics(), "epkit:proxy_requests_total", outcome="ok") == 0
    # The router closed its decode connection; the engine aborts a non-streamed request then, as vLLM does (its
    # API routes are @with_cancellation): the request is not finished for nobody
    wait_for(lambda: metric(scrape(d0.url), "epkit:num_requests_running") == 0, what="D0 runs nothing")
    assert metric(scrape(d0.url), "epkit:request_success_total") == finished_before
    wait_for(lambda: held_blocks(p0.url) == 0, what="P0 holds no KV blocks")


def test_api_key_and_model(engines, proxy):
    p0, d0 = engines["p0"], engines["d0"]
    headers_ok = {"Authorization": f"Bearer {API_KEY}"}
    router = proxy([p0.url], [d0.url], "--api-key", API_KEY)
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.post(router.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT}, headers=headers)
        assert resp.status_code == 401 and "API key" in resp.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert metric(router.metrics(), "epkit:proxy_routed_requests_total") == 0  # nothing reached an instance
    assert httpx.get(router.url + "/health").status_code == 200  # open, as vLLM's
    reply = client(router.url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4  # the key went on to the instances, which require it
    # --model: filled in where a request has none; another model is refused by the router itself
    named = proxy([p0.url], [d0.url], "--model", MODEL)
    resp = httpx.post(named.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers=headers_ok)
    assert resp.status_code == 200 and resp.json()["model"] == MODEL
    resp = httpx.post(named.url + "/v1/completions", json={"model": "other", "prompt": PROMPT}, headers=headers_ok)
    assert resp.status_code == 404 and "other" in resp.json()["error"]["message"]
    # a router without --api-key passes the client's header on: the instances' own 401 comes back
    open_router = proxy([p0.url], [d0.url])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=open_router.url + "/v1", api_key="wrong", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4)


def test_a_missing_release_endpoint_is_told_from_nothing_held():
    from epkit.proxy.flow import _route_absent

    assert _route_absent(httpx.Response(404, json={"detail": "Not Found"}))  # FastAPI without the route (vLLM)
    assert _route_absent(httpx.Response(404, json={"error": {"message": "Not Found", "type": "Not Found", "code": 404}}))
    assert _route_absent(httpx.Response(405, json={"detail": "Method Not Allowed"}))
    # the built-in engine's answer when it holds nothing for these params any more
    assert not _route_absent(httpx.Response(404, json={"error": {"message": "request cmpl-x holds no KV blocks",
                                                                 "code": 404}}))
