"""Routing policies (pure: the order a policy gives) and least_outstanding through a real router: a decode instance
busy with a long stream gets no new request while the other one is idle; and the router's command line."""

from __future__ import annotations

import httpx
import pytest

from conftest import API_KEY, MODEL, metric, scrape
from epkit import cli
from epkit.proxy import POLICIES, ProxyConfig, ProxyError
from epkit.proxy.pool import Instance, Pool
from test_flow import PROMPT, client


def test_round_robin_and_least_outstanding_orders():
    urls = ("http://a:1", "http://b:2", "http://c:3")
    rr = Pool("decode", urls, "round_robin")
    assert [[i.url[7] for i in rr.order()] for _ in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    lo = Pool("decode", urls, "least_outstanding")
    a, b, c = lo.instances
    lo.enter(a)
    lo.enter(a)
    lo.enter(c)
    assert [i.url[7] for i in lo.order()] == ["b", "c", "a"]
    lo.leave(a)
    lo.leave(a)
    lo.leave(c)
    # all idle: ties go round robin (this is the pool's second turn)
    assert [i.url[7] for i in lo.order()] == ["b", "c", "a"]
    assert [i.url[7] for i in lo.order()] == ["c", "a", "b"]
    assert set(POLICIES) == {"round_robin", "least_outstanding"}
    assert POLICIES["least_outstanding"]([Instance("prefill", 0, "x", 3), Instance("prefill", 1, "y", 1)], 0)[0].url == "y"


def test_least_outstanding_skips_the_busy_decode_instance(engines, proxy):
    p0, d0, d1 = engines["p0"], engines["d0"], engines["d1"]
    router = proxy([p0.url], [d0.url, d1.url], "--policy", "least_outstanding")
    before = {d: metric(scrape(engines[d].url), "epkit:request_success_total") for d in ("d0", "d1")}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 440, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    pd = client(router.url)
    with httpx.Client(timeout=120) as http, http.stream("POST", router.url + "/v1/completions", json=body,
                                                        headers=headers) as long:
        lines = long.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # the long request runs on D0 (ties: D0 first)
        decoders = []
        for _ in range(3):
            in_flight = metric(router.metrics(), "epkit:proxy_in_flight_requests", role="decode", instance=d0.url)
            assert in_flight == 1, "the long request ended before the short ones were sent"
            reply = pd.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
            decoders.append(reply.model_extra["epkit_pd"]["decode_url"])
        assert decoders == [d1.url] * 3
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
    text = router.metrics()
    assert [metric(text, "epkit:proxy_routed_requests_total", role="decode", instance=d.url) for d in (d0, d1)] == [1, 3]
    after = {d: metric(scrape(engines[d].url), "epkit:request_success_total") for d in ("d0", "d1")}
    assert {d: after[d] - before[d] for d in after} == {"d0": 1, "d1": 3}


@pytest.mark.parametrize("argv, words", [
    (["--prefill", "ftp://x:1", "--decode", "http://a:1"], ["--prefill", "ftp://x:1", "http://HOST:PORT"]),
    (["--prefill", "http://a:1", "--decode", "http://b:2", "http://b:2/"], ["--decode", "http://b:2", "more than once"]),
    (["--prefill", "http://a:1", "--decode", "http://b:2", "--policy", "fastest"],
     ["--policy", "fastest", "round_robin", "least_outstanding"]),
    (["--prefill", "http://a:1", "--decode", "http://b:2", "--port", "70000"], ["--port", "70000", "1..65535"]),
    (["--prefill", "http://a:1"], ["--decode"]),
    (["--prefill", "http://a:1", "--decode", "http://a:1/v1/chat"], ["--decode", "http://a:1/v1/chat"]),
])
def test_bad_arguments_name_the_flag_value_and_what_is_allowed(argv, words, capsys):
    try:
        status = cli.main(["proxy", *argv])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert "Traceback" not in err


def test_config_python_api():
    config = ProxyConfig(prefill=["http://h:1/v1/"], decode="http://h:2", policy="least_outstanding", port=9000)
    assert config.prefill == ("http://h:1",) and config.decode == ("http://h:2",)
    assert config.url == "http://127.0.0.1:9000"
    with pytest.raises(ProxyError, match=r"decode \(--decode\)=\[\]: at least one"):
        ProxyConfig(prefill=("http://h:1",), decode=())
