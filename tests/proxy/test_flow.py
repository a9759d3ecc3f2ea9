"""`epkit proxy` with the real `openai` client in front of real `epkit serve` instances: 1P1D and 1P2D, completions
and chat, streamed and not; greedy equality with colocated serving; what each reply says in ``epkit_pd``."""

from __future__ import annotations

import httpx
import openai

from conftest import API_KEY, MODEL, metric, scrape

PROMPT = "The quick brown fox jumps over the lazy dog, then"  # more than one 16-token block (byte-level tokens)
MESSAGES = [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]
PD_KEYS = {"request_id", "prefill_url", "decode_url", "prefill_ms", "kv_transfer_ms", "kv_transfer_bytes"}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)


def check_pd(pd: dict, prefill: str, decode: str | set[str]) -> None:
    assert set(pd) == PD_KEYS
    assert pd["prefill_url"] == prefill
    assert pd["decode_url"] in ({decode} if isinstance(decode, str) else decode)
    assert pd["prefill_ms"] > 0 and pd["request_id"]
    # the decode pulled the prompt's KV from the prefill and said so (epkit_kv_transfer)
    assert pd["kv_transfer_ms"] > 0 and pd["kv_transfer_bytes"] > 0


def test_1p1d_completions_and_chat_streamed_and_not_equal_colocated(engines, proxy):
    p0, d0, d1 = engines["p0"], engines["d0"], engines["d1"]
    router = proxy([p0.url], [d0.url])
    pd, colocated = client(router.url), client(d1.url)  # D1 alone, no kv_transfer_params: colocated serving
    p0_tokens = metric(scrape(p0.url), "epkit:generation_tokens_total")

    alone = colocated.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    whole = pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_headers={"X-Request-Id": "my-request-1"})
    assert whole.choices[0].text == alone.choices[0].text and whole.usage.completion_tokens == 12
    check_pd(whole.model_extra["epkit_pd"], p0.url, d0.url)
    assert whole.model_extra["epkit_pd"]["request_id"] == "my-request-1"

    chunks = list(pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == alone.choices[0].text
    assert [("epkit_pd" in c.model_extra) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices[0].finish_reason == "length"
    check_pd(chunks[-1].model_extra["epkit_pd"], p0.url, d0.url)

    chat_alone = colocated.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chat = pd.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == chat_alone.choices[0].message.content
    check_pd(chat.model_extra["epkit_pd"], p0.url, d0.url)

    streamed = list(pd.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat_alone.choices[0].message.content
    last = streamed[-1]  # the usage chunk: choices [], and the only one with epkit_pd
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert [c for c in streamed if "epkit_pd" in c.model_extra] == [last]
    check_pd(last.model_extra["epkit_pd"], p0.url, d0.url)

    # each request was prefilled on P0 (one token each) and decoded on D0
    assert metric(scrape(p0.url), "epkit:generation_tokens_total") - p0_tokens == 4
    text = router.metrics()
    assert metric(text, "epkit:proxy_requests_total", outcome="ok") == 4
    assert metric(text, "epkit:proxy_routed_requests_total", role="prefill", instance=p0.url) == 4
    assert metric(text, "epkit:proxy_routed_requests_total", role="decode", instance=d0.url) == 4
    assert metric(text, "epkit:proxy_prefill_seconds_count", instance=p0.url) == 4
    assert metric(text, "epkit:proxy_decode_seconds_count", instance=d0.url) == 4
    assert metric(text, "epkit:proxy_decode_ttft_seconds_count", instance=d0.url) == 2  # the streamed ones
    assert metric(text, "epkit:proxy_kv_transfer_milliseconds_count", instance=d0.url) == 4
    assert [m.id for m in pd.models.list().data] == [MODEL]
    health = httpx.get(router.url + "/health")
    assert health.status_code == 200 and health.json() == {"prefill": {p0.url: "ok"}, "decode": {d0.url: "ok"}}


def test_1p2d_round_robin_streamed_and_not(engines, proxy):
    p0, d0, d1 = engines["p0"], engines["d0"], engines["d1"]
    before = {name: metric(scrape(engines[name].url), "epkit:request_success_total") for name in engines}
    router = proxy([p0.url], [d0.url, d1.url])
    pd = client(router.url)
    texts, decoders = [], []
    for i in range(4):
        if i % 2:
            chunks = list(pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
            texts.append("".join(c.choices[0].text for c in chunks))
            decoders.append(chunks[-1].model_extra["epkit_pd"]["decode_url"])
        else:
            reply = pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
            texts.append(reply.choices[0].text)
            decoders.append(reply.model_extra["epkit_pd"]["decode_url"])
    assert len(set(texts)) == 1  # greedy: the same on both decode instances
    assert decoders == [d0.url, d1.url, d0.url, d1.url]
    text = router.metrics()
    assert [metric(text, "epkit:proxy_routed_requests_total", role="decode", instance=d.url) for d in (d0, d1)] == [2, 2]
    # and the instances' own counters agree: 4 one-token prefills on P0, 2 decodes each on D0 and D1
    after = {name: metric(scrape(engines[name].url), "epkit:request_success_total") for name in engines}
    assert {name: after[name] - before[name] for name in engines} == {"p0": 4, "d0": 2, "d1": 2}


def test_prefill_body_as_vllm_proxies_send_it():
    from epkit.proxy.flow import prefill_body

    body = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 50, "min_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    sent = prefill_body(body, chat=True)
    assert sent == {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "max_completion_tokens": 1, "stream": False,
                    "temperature": 0, "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                                             "remote_engine_id": None, "remote_block_ids": None,
                                                             "remote_host": None, "remote_port": None}}
    assert body["max_completion_tokens"] == 50 and body["stream"] is True  # the decode gets the original
    assert "max_completion_tokens" not in prefill_body({"prompt": "x", "max_tokens": 9}, chat=False)
