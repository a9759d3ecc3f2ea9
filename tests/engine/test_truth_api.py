"""The built-in engine tells the truth (issue 15, section 4), against one real deployment of a small real
checkpoint built here (tests/engine/truth_model.py): a byte-level BPE tokenizer.json trained with the
`tokenizers` library, weights read from model.safetensors, the `vllm serve` flags a user pastes.

Logprobs are checked against log_softmax of the logits of the same weights, computed in this process with
the engine's model code. The server computes the prompt in one prefill and each new token in a decode step
against its KV cache; the reference runs the whole sequence at once. The GEMMs, norms and activations give
the same rows either way (on CPU they are exact fixed-point products, ``epkit.engine.batch_invariant``); only
attention differs: a decode query attends to the cache in its own call, the reference's rows in one causal
SDPA over the whole sequence, so its float32 sums run in another order. That rounding (a few ulps per
attention, over two layers, carried through the layers after it) keeps the two within TOL_ULPS ulps of the
largest logprob compared, which is still far below any real error (a wrong position, temperature applied,
a wrong token: differences of 0.1 to 10).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch
from deployments import Deployment, wait_gone
from prometheus_client.parser import text_string_to_metric_families
from truth_model import CHAIN_TEXT, CHAT_TEMPLATE, PROMPT_TEXT, reference_logprobs, write_model

TOL_ULPS = 256
NAME = "truth-model"
PASTED = ["--trust-remote-code", "--disable-log-requests", "--enable-chunked-prefill", "--kv-cache-dtype", "auto",
          "--max-num-seqs", "8", "--max-num-batched-tokens", "2k", "--gpu-memory-utilization", "0.5", "--seed", "3",
          "--uvicorn-log-level", "warning", "--dtype", "float32"]


def tol(*values: float) -> float:
    return TOL_ULPS * torch.finfo(torch.float32).eps * max(1.0, *(abs(v) for v in values))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("real-model")
    facts = write_model(directory)
    facts["dir"] = directory
    return facts


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("logs"), ["--model", str(model["dir"]), "--tokenizer", str(model["dir"]),
                                                     "--served-model-name", NAME, *PASTED])
    try:
        yield d.wait_ready()
    finally:
        pids = d.pids()
        d.stop()
        assert not wait_gone(pids), "processes left behind"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": NAME, **body}, timeout=120)


def ok(server, path: str, body: dict) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"model": NAME, "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def texts_of(tokenizer) -> dict[str, set[int]]:
    """Token text (as a single-token decode shows it) -> the ids that show as it."""
    out: dict[str, set[int]] = {}
    for i in range(tokenizer.get_vocab_size()):
        out.setdefault(tokenizer.decode([i], skip_special_tokens=False), set()).add(i)
    return out


def test_weight_source_tokenizer_and_pasted_flags_are_logged_once(server, model):
    log = server.nodes[0].log()
    assert f"weights read from 1 file(s) in {model['dir']} (model.safetensors" in log
    assert f"tokenizer: {model['dir'] / 'tokenizer.json'} (tokenizers library" in log
    warnings = [line for line in log.splitlines() if "accepted for `vllm serve` compatibility" in line]
    assert len(warnings) == 1 and "--trust-remote-code" in warnings[0] and "--disable-log-requests" in warnings[0]


def test_real_tokenizer_round_trip(server, model):
    """Prompt text -> the tokenizer's ids; the generated ids (the chain the weights encode) -> the right text,
    with its spaces and non-ASCII characters (one of them split over two tokens), streamed or not."""
    tok, chain, prompt = model["tokenizer"], model["chain"], model["prompt"]
    want_text, want_ids = CHAIN_TEXT[len(PROMPT_TEXT):], chain[len(prompt):] + [model["eos"]]
    body = {"prompt": PROMPT_TEXT, "max_tokens": 32, "temperature": 0, "return_token_ids": True}
    out = ok(server, "/v1/completions", body)["choices"][0]
    assert out["prompt_token_ids"] == tok.encode(PROMPT_TEXT).ids == prompt
    assert out["token_ids"] == want_ids and out["finish_reason"] == "stop"
    assert out["text"] == want_text == tok.decode(want_ids) and "Ġ" not in out["text"]
    streamed = events(server, "/v1/completions", body)
    assert "".join(e["choices"][0]["text"] for e in streamed) == want_text
    echoed = ok(server, "/v1/completions", {"prompt": chain, "max_tokens": 0, "echo": True})["choices"][0]
    assert echoed["text"] == CHAIN_TEXT  # a token-id prompt echoed as its text
    reply = ok(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "naïve café"}], "max_tokens": 3,
                                                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert reply["choices"][0]["message"]["content"] == tok.decode(reply["choices"][0]["token_ids"])


def test_completion_logprobs_and_echo_match_the_models_logits(server, model):
    tok, k = model["tokenizer"], 3
    body = {"prompt": PROMPT_TEXT + " sat", "max_tokens": 5, "temperature": 0, "logprobs": k, "echo": True,
            "ignore_eos": True, "return_token_ids": True}
    out = ok(server, "/v1/completions", body)["choices"][0]
    ids = out["prompt_token_ids"] + out["token_ids"]
    lp = out["logprobs"]
    # echo: the prompt's text, then the completion's - none with return_token_ids (the ids say it), as in vLLM
    assert ok(server, "/v1/completions", {**body, "return_token_ids": False})["choices"][0]["text"] == (
        PROMPT_TEXT + " sat" + out["text"])
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:j]) for j in range(len(ids))]
    ref = reference_logprobs(model["dir"], ids)
    by_text = texts_of(tok)
    for j in range(1, len(ids)):
        want = ref[j - 1, ids[j]].item()
        assert abs(lp["token_logprobs"][j] - want) <= tol(want), (j, lp["token_logprobs"][j], want)
        top = lp["top_logprobs"][j]
        assert len(top) <= k + 1 and lp["tokens"][j] in top  # the token itself and the k most likely
        for text, value in top.items():
            assert min(abs(value - ref[j - 1, i].item()) for i in by_text[text]) <= tol(value), (j, text)
        kth = ref[j - 1].topk(k).values[-1].item()
        assert sum(v >= kth - tol(kth) for v in top.values()) >= min(k, len(top))
    assert [p is None for p in out["prompt_logprobs"]] == [True] + [False] * (len(out["prompt_token_ids"]) - 1)
    streamed = events(server, "/v1/completions", body)
    joined = {key: [x for e in streamed for x in e["choices"][0]["logprobs"][key]] for key in lp}
    assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
    assert all(a == b or abs(a - b) <= tol(a) for a, b in zip(joined["token_logprobs"][1:], lp["token_logprobs"][1:]))


def test_chat_logprobs_match_the_models_logits(server, model):
    from transformers import PreTrainedTokenizerFast

    tok, k = model["tokenizer"], 2
    messages = [{"role": "user", "content": "über the café?"}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": k,
            "ignore_eos": True, "return_token_ids": True}
    out = ok(server, "/v1/chat/completions", body)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(model["dir"] / "tokenizer.json"))
    hf.chat_template = CHAT_TEMPLATE
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out["prompt_token_ids"] == tok.encode(rendered, add_special_tokens=False).ids
    gen = out["choices"][0]["token_ids"]
    content = out["choices"][0]["logprobs"]["content"]
    ids = out["prompt_token_ids"] + gen
    ref = reference_logprobs(model["dir"], ids)
    n = len(out["prompt_token_ids"])
    by_text = texts_of(tok)
    assert len(content) == len(gen)
    for j, (entry, token_id) in enumerate(zip(content, gen)):
        want = ref[n + j - 1, token_id].item()
        assert entry["token"] == tok.decode([token_id], skip_special_tokens=False)
        assert entry["bytes"] == list(entry["token"].encode("utf-8", errors="replace"))
        assert abs(entry["logprob"] - want) <= tol(want)
        assert len(entry["top_logprobs"]) == k and entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the top one
        for alt in entry["top_logprobs"]:
            assert min(abs(alt["logprob"] - ref[n + j - 1, i].item()) for i in by_text[alt["token"]]) <= tol(alt["logprob"])
    streamed = events(server, "/v1/chat/completions", body)
    joined = [c for e in streamed if e["choices"] and e["choices"][0]["logprobs"] for c in e["choices"][0]["logprobs"]["content"]]
    assert [c["token"] for c in joined] == [c["token"] for c in content]


def test_limits_unsupported_and_unknown_fields(server):
    cases = [("/v1/completions", {"prompt": "the", "logprobs": 21}, "logprobs", "greater than max allowed: 20"),
             ("/v1/completions", {"prompt": "the", "logprobs": -2}, "logprobs", "positive value or -1"),
             ("/v1/completions", {"prompt": "the", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs",
              "`logprobs` must be set to true"),
             ("/v1/completions", {"prompt": "the", "presence_penalty": 0.5}, "presence_penalty", "not supported")]
    for path, body, param, message in cases:
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and message in r.json()["error"]["message"], r.text
    for _ in range(2):
        ok(server, "/v1/completions", {"prompt": "the", "max_tokens": 1, "frobnicate_level": 3, "repetition_penalty": 1.0})
    logged = [line for line in server.nodes[0].log().splitlines() if "'frobnicate_level'" in line]
    assert len(logged) == 1 and "ignored" in logged[0]
    assert not any("'repetition_penalty'" in line for line in server.nodes[0].log().splitlines())  # vLLM's default: known


VLLM_TYPES = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
              "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
              "vllm:e2e_request_latency_seconds": "histogram", "vllm:prompt_tokens": "counter",
              "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter"}


def scrape(server) -> dict[str, dict[str, float]]:
    """family -> {sample name + labels: value}, parsed by prometheus_client's own text parser."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in VLLM_TYPES.items():
        assert name in families and families[name].type == kind, name
        for s in families[name].samples:
            assert s.labels["model_name"] == NAME and s.labels["engine"] == "0", s
    return {name: {s.name + json.dumps(s.labels, sort_keys=True): s.value for s in families[name].samples}
            for name in VLLM_TYPES}


def sample(families: dict, family: str, suffix: str) -> float:
    return next(v for k, v in families[family].items() if re.fullmatch(re.escape(family + suffix) + r"\{.*", k) and '"le"' not in k)


def test_vllm_metric_names_scraped_from_a_running_engine(server):
    before = scrape(server)
    out = ok(server, "/v1/completions", {"prompt": "the cat sat", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    after = scrape(server)
    usage = out["usage"]
    assert sample(after, "vllm:prompt_tokens", "_total") - sample(before, "vllm:prompt_tokens", "_total") == usage["prompt_tokens"]
    assert (sample(after, "vllm:generation_tokens", "_total") - sample(before, "vllm:generation_tokens", "_total")
            == usage["completion_tokens"] == 6)
    for family, count in (("vllm:time_to_first_token_seconds", 1), ("vllm:inter_token_latency_seconds", 5),
                          ("vllm:e2e_request_latency_seconds", 1)):
        assert sample(after, family, "_count") - sample(before, family, "_count") == count, family
    # while a request runs, its rank reports it running and KV blocks in use
    body = {"model": NAME, "prompt": "the", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()  # kept open: a client that leaves aborts its request
        next(line for line in lines if line.startswith("data: "))
        during = scrape(server)
    assert sample(during, "vllm:num_requests_running", "") == 1
    assert 0 < sample(during, "vllm:kv_cache_usage_perc", "") <= 1
