"""Disaggregated prefill/decode with the built-in engine: vLLM's NixlConnector protocol (kv_transfer_params),
the KV pulled over the engines' side channels, the real `openai` client doing the seed's orchestration.

Two instances, both ``kv_both``: A with DP=2, B with DP=1; each is the other's prefill or decode, so both
directions of "DP sizes differ" run. Greedy tokens of prefill-on-one + decode-on-other equal colocated serving.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from deployments import ROOT, Deployment, free_port, wait_gone

MODEL = "epkit-tiny-moe"
KV_CONFIG = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
PROMPTS = [
    "Hi",  # shorter than a block (16 tokens)
    "Sixteen tokens!!",  # exactly one block
    "Expert parallelism splits the experts of every MoE layer",  # not a multiple of the block size
    [5, 17, 200, 33, 99, 128, 7, 64, 12, 250, 3, 88, 41, 19, 150, 77, 9, 31, 2, 111, 45, 66, 90, 8, 13, 14, 15, 16,
     17, 18, 19, 20, 21],  # token ids, two blocks and a bit
]
PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


def side_channel_base(ranks: int) -> int:
    """A port with ``ranks`` free ports from it on (VLLM_NIXL_SIDE_CHANNEL_PORT + dp_rank)."""
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base + 1, base + ranks):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free consecutive ports")


def start(tmp, monkeypatch, args: list[str], ranks: int = 1, **env) -> Deployment:
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", str(side_channel_base(ranks)))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Deployment(tmp, ["--kv-transfer-config", KV_CONFIG, *args]).wait_ready()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("pd")
    started = []
    try:
        started.append(start(tmp, mp, ["-dp", "2", "--enable-expert-parallel"], ranks=2))
        started.append(start(tmp, mp, []))
        yield started
    finally:
        mp.undo()
        for d in started:
            pids = d.pids()
            d.stop()
            assert not wait_gone(pids)


def client(d: Deployment) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="EMPTY", max_retries=0)


def prefill(p: openai.OpenAI, prompt, request_id: str):
    """The seed's prefill call: max_tokens=1 and kv_transfer_params asking a remote decode."""
    return p.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                extra_body={"kv_transfer_params": PREFILL_PARAMS},
                                extra_headers={"X-Request-Id": request_id})


def disaggregated(p: openai.OpenAI, d: openai.OpenAI, prompt, max_tokens: int = 10):
    request_id = str(uuid.uuid4())
    first = prefill(p, prompt, request_id)
    return d.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                extra_body={"kv_transfer_params": first.kv_transfer_params},
                                extra_headers={"X-Request-Id": request_id})


def held(d: Deployment) -> float:
    text = httpx.get(d.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("epkit:kv_transfer_held_blocks{"))


@pytest.mark.parametrize("direction", ["dp2-prefill-dp1-decode", "dp1-prefill-dp2-decode"])
def test_disaggregated_greedy_equals_colocated(pair, direction):
    a, b = pair
    p, d = (a, b) if direction.startswith("dp2") else (b, a)
    for prompt in PROMPTS:
        colocated = client(d).completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        also = client(p).completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        split = disaggregated(client(p), client(d), prompt)
        assert split.choices[0].text == colocated.choices[0].text == also.choices[0].text, prompt
        assert split.usage == colocated.usage
        transfer = split.model_extra["epkit_kv_transfer"]
        tokens = len(prompt) if isinstance(prompt, list) else len(prompt.encode())
        assert transfer["transport"] == "tcp" and transfer["blocks"] == -(-tokens // 16)
        assert transfer["bytes"] > 0 and transfer["ms"] >= 0
    assert held(p) == 0  # every pulled prompt's blocks were freed


def test_prefill_response_keys_held_blocks_and_stream(pair):
    a, b = pair
    first = prefill(client(a), PROMPTS[2], "req-keys")
    assert first.id == "cmpl-req-keys"
    params = first.kv_transfer_params
    assert set(params) >= {"do_remote_prefill", "do_remote_decode", "remote_engine_id", "remote_request_id",
                           "remote_block_ids", "remote_host", "remote_port", "tp_size"}
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False and params["tp_size"] == 1
    assert params["remote_host"] == "127.0.0.1" and len(params["remote_block_ids"][0]) == 4  # 56 tokens
    assert held(a) == 4  # kept after the 1-token response, shown on /metrics
    chunks = list(client(b).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, stream=True,
                                               extra_body={"kv_transfer_params": params}))
    assert chunks[-1].model_extra["epkit_kv_transfer"]["blocks"] == 4
    colocated = client(b).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == colocated.choices[0].text
    assert held(a) == 0  # freed after the pull
    with pytest.raises(openai.APIStatusError) as err:  # pulled once: nothing left to pull
        client(b).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, extra_body={"kv_transfer_params": params})
    assert err.value.status_code == 502 and f"127.0.0.1:{params['remote_port']}" in err.value.message
    assert "holds no KV" in err.value.message


def test_chat_disaggregated_streamed(pair):
    a, b = pair
    messages = [{"role": "user", "content": "Tell me about paged attention."}]
    colocated = client(a).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    first = client(a).chat.completions.create(model=MODEL, messages=messages, max_tokens=1, max_completion_tokens=1,
                                              temperature=0, extra_body={"kv_transfer_params": PREFILL_PARAMS})
    chunks = list(client(b).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                    stream=True, extra_body={"kv_transfer_params": first.kv_transfer_params}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == colocated.choices[0].message.content
    assert chunks[-1].model_extra["epkit_kv_transfer"]["transport"] == "tcp"


def test_release_endpoint_frees_held_blocks(pair):
    a, b = pair
    params = prefill(client(b), PROMPTS[3], "req-release").kv_transfer_params
    assert held(b) == 3
    r = httpx.post(b.url + "/epkit/kv/release", json={"kv_transfer_params": params})
    assert r.status_code == 200 and r.json()["blocks"] == 3 and r.json()["released"] is True
    assert held(b) == 0
    again = httpx.post(b.url + "/epkit/kv/release", json={"kv_transfer_params": params})
    assert again.status_code == 404 and "holds no KV" in again.json()["error"]["message"]
    other = httpx.post(a.url + "/epkit/kv/release", json={"kv_transfer_params": params})  # not A's engine
    assert other.status_code == 404 and "not a side channel of this instance" in other.json()["error"]["message"]


def test_decode_to_unreachable_prefill_fails_clearly_and_engine_serves_on(pair):
    a, _ = pair
    port = free_port()  # nothing listens there
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "gone_dp0",
              "remote_request_id": "0-1", "remote_block_ids": [[0]], "remote_host": "127.0.0.1", "remote_port": port,
              "tp_size": 1}
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as err:
            out = client(a).completions.create(model=MODEL, prompt="Hello there", max_tokens=4, stream=stream,
                                               extra_body={"kv_transfer_params": params})
            list(out) if stream else None
        assert err.value.status_code == 502 and f"127.0.0.1:{port}" in err.value.message
    ok = client(a).completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4
    text = httpx.get(a.url + "/metrics").text
    assert "vllm:kv_cache_usage_perc" in text and held(a) == 0


def test_held_blocks_freed_after_timeout(tmp_path, monkeypatch):
    d = start(tmp_path, monkeypatch, [], VLLM_NIXL_ABORT_REQUEST_TIMEOUT="1")
    try:
        prefill(client(d), PROMPTS[2], "req-timeout")
        deadline = time.time() + 60
        while held(d) and time.time() < deadline:
            time.sleep(0.2)
        assert held(d) == 0
        assert "not pulled within 1 s: 4 held blocks freed" in d.nodes[0].log()
    finally:
        pids = d.pids()
        d.stop()
        assert not wait_gone(pids)


@pytest.mark.parametrize("config, needle", [
    ('{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}', "kv_connector='LMCacheConnectorV1'"),
    ('{"kv_connector": "NixlConnector"}', "kv_role=None; allowed: kv_producer, kv_consumer, kv_both"),
    ('{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "tpu"}', "kv_buffer_device='tpu'"),
    ('{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": ["XYZ"]}}',
     "backends=['XYZ']"),
    ('{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_rol": 1}', "unknown keys ['kv_rol']"),
    ('{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": ["UCX", "GDS"]}}',
     "with its UCX backend only"),
    ('{"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}',
     "does not recompute it; allowed: fail"),
])
def test_bad_kv_transfer_config_is_refused(config, needle):
    r = subprocess.run([sys.executable, "-m", "epkit.engine.cli", "--kv-transfer-config", config, "--check-args"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and needle in r.stderr, r.stderr


def test_scheduler_holds_receives_and_frees_blocks():
    """The bookkeeping alone: a prefill for a remote decode keeps its blocks; a remote-prefilled decode is admitted
    into ``receiving`` with blocks for its prompt and then recomputes only its last prompt token (vLLM's rule)."""
    from epkit.engine.block_manager import BlockManager
    from epkit.engine.scheduler import Scheduler, SchedulerConfig
    from epkit.engine.sequence import EngineRequest, SamplingParams

    sched = Scheduler(SchedulerConfig(8, 64, 128, eos_token_id=0), BlockManager(8, 4))
    sched.on_hold = lambda seq: {"remote_request_id": seq.request_id, "remote_block_ids": [list(seq.block_table)]}
    sched.add(EngineRequest("p", tuple(range(1, 11)), SamplingParams(max_tokens=1, temperature=0,
                                                                     kv_transfer_params={"do_remote_decode": True})))
    batch = sched.schedule()
    out = sched.postprocess(batch, {"p": 5})
    assert out[0].finish_reason == "length" and out[0].kv_transfer_params["remote_block_ids"] == [[0, 1, 2]]
    assert sched.blocks.num_free_blocks == 5 and sched.held_blocks == 3
    assert sched.release_held("p") == 3 and sched.blocks.num_free_blocks == 8 and sched.release_held("p") is None

    remote = {"do_remote_prefill": True, "remote_host": "h", "remote_port": 1}
    sched.add(EngineRequest("d", tuple(range(1, 11)), SamplingParams(max_tokens=3, temperature=0,
                                                                     kv_transfer_params=remote)))
    assert sched.schedule() == [] and list(sched.receiving) == ["d"] and sched.blocks.num_free_blocks == 5
    sched.receive_done("d", {"ms": 1.0})
    (seq, new), = sched.schedule()
    assert (seq.num_computed_tokens, new) == (9, 1) and not seq.remote_prefill
    assert sched.postprocess([(seq, new)], {"d": 7})[0].kv_transfer_stats == {"ms": 1.0}

    sched.add(EngineRequest("e", (1, 2, 3), SamplingParams(kv_transfer_params=remote)))
    sched.schedule()
    failed = sched.receive_failed("e", "unreachable")
    assert failed.finish_reason == "abort" and failed.error == "unreachable" and "e" not in sched.receiving


def nixl_python() -> str | None:
    """A Python with torch, the engine's dependencies and a loading NIXL: the real-vLLM venv has them
    (scripts/vllm_venv.sh installs nixl-cu12 there); None where there is none."""
    import os
    from pathlib import Path

    python = os.environ.get("EPKIT_VLLM_PYTHON") or str(Path.home() / ".cache/epkit/vllm-venv/bin/python")
    if not Path(python).exists():
        return None
    probe = ("import fastapi, uvicorn, tokenizers, prometheus_client, torch\n"
             "from nixl._api import nixl_agent, nixl_agent_config as c\nnixl_agent('probe', c(backends=['UCX']))")
    ok = subprocess.run([python, "-c", probe], cwd=ROOT, capture_output=True, timeout=120).returncode == 0
    return python if ok else None


def test_nixl_transport_same_tokens_as_tcp_and_colocated(tmp_path, monkeypatch, pair):
    """With NIXL loadable on both sides the decode READs the prompt's blocks over UCX (transport "nixl"); a TCP
    peer (the pair, without NIXL) still pulls over TCP from it."""
    python = nixl_python()
    if python is None:
        pytest.skip("no Python with NIXL and the engine's dependencies (the real-vLLM venv of scripts/vllm_venv.sh)")
    monkeypatch.setattr(sys, "executable", python)  # read by Node when it starts the engine
    started = []
    try:
        started.append(start(tmp_path, monkeypatch, [], ranks=1, EPKIT_KV_TRANSPORT="nixl"))
        started.append(start(tmp_path, monkeypatch, ["-dp", "2"], ranks=2, EPKIT_KV_TRANSPORT="nixl"))
        monkeypatch.undo()
        p, d = started
        tcp_peer = pair[1]
        for prompt in PROMPTS[1:3]:
            colocated = client(d).completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
            split = disaggregated(client(p), client(d), prompt)
            assert split.choices[0].text == colocated.choices[0].text
            assert split.model_extra["epkit_kv_transfer"]["transport"] == "nixl"
            mixed = disaggregated(client(p), client(tcp_peer), prompt)
            assert mixed.choices[0].text == colocated.choices[0].text
            assert mixed.model_extra["epkit_kv_transfer"]["transport"] == "tcp"
        deadline = time.time() + 30
        while held(p) and time.time() < deadline:  # the decode's release after its READ
            time.sleep(0.1)
        assert held(p) == 0
        assert "KV side channel on" in p.nodes[0].log() and "transport nixl" in p.nodes[0].log()
    finally:
        for dep in started:
            pids = dep.pids()
            dep.stop()
            assert not wait_gone(pids)


def test_request_kv_transfer_params_are_checked():
    from epkit.engine.protocol import ApiError, CompletionRequest

    def check(params, on=True, prompts=1, **body):
        return CompletionRequest.model_validate({"prompt": "x", "kv_transfer_params": params, **body}).kv_params(on, prompts)

    assert check(None) is None and check({"do_remote_decode": False, "do_remote_prefill": False}) is None
    assert check(PREFILL_PARAMS)["do_remote_decode"] is True
    pull = {"do_remote_prefill": True, "remote_engine_id": "e_dp0", "remote_request_id": "0-1",
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1}
    assert check(pull) == pull
    for params, on, prompts, body, needle in [
        (PREFILL_PARAMS, False, 1, {}, "started without --kv-transfer-config"),
        ({**pull, "do_remote_decode": True}, True, 1, {}, "cannot both be true"),
        ({**pull, "remote_host": None}, True, 1, {}, "needs remote_host"),
        ({**pull, "remote_port": "x"}, True, 1, {}, "remote_port='x'"),
        ({**pull, "tp_size": 2}, True, 1, {}, "tp_size=2"),
        (PREFILL_PARAMS, True, 2, {}, "needs one prompt and n=1"),
    ]:
        with pytest.raises(ApiError) as err:
            check(params, on, prompts, **body)
        assert err.value.status == 400 and needle in err.value.message and err.value.param == "kv_transfer_params"


def test_queued_decode_extends_its_prefills_lease(monkeypatch):
    """A decode still waiting for a slot 'touches' its prefill every sixth of the lease (vLLM 0.32.0's heartbeat),
    so the prefill keeps the blocks past the lease; once nothing touches them, the lease frees them. Two real
    side channels in this process; the runner (the device edge) is a stand-in, never read here."""
    from types import SimpleNamespace

    import torch

    from epkit.engine.block_manager import BlockManager
    from epkit.engine.kv_agent import KVAgent
    from epkit.engine.scheduler import Scheduler, SchedulerConfig
    from epkit.engine.sequence import EngineRequest, SamplingParams

    monkeypatch.setenv("EPKIT_KV_TRANSPORT", "tcp")
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    runner = SimpleNamespace(kv_layout=lambda: (1, 1, 4), device=torch.device("cpu"), kv_caches=[], block_size=4,
                             dtype=torch.float32)
    config = {"engine_id": "lease", "kv_connector_extra_config": {"kv_lease_duration": 10}}  # touches every 10/6 s
    agents, scheds = [], []
    try:
        for _ in range(2):
            monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", str(free_port()))
            scheds.append(Scheduler(SchedulerConfig(8, 64, 128, eos_token_id=0), BlockManager(8, 4)))
            agents.append(KVAgent(config, 0, scheds[-1], runner))
        prefill_sched, decode_sched = scheds
        prefill_sched.add(EngineRequest("p", (1, 2, 3, 4, 5), SamplingParams(
            max_tokens=1, kv_transfer_params={"do_remote_decode": True})))
        params = prefill_sched.postprocess(prefill_sched.schedule(), {"p": 9})[0].kv_transfer_params
        queued = EngineRequest("d", (1, 2, 3, 4, 5), SamplingParams(kv_transfer_params=params))
        decode_sched.add(queued)  # queued: never scheduled here, as if no slot were free
        until = time.monotonic() + 15  # 1.5 leases: a stall of a few seconds on a loaded box does not fail it
        while time.monotonic() < until:
            for agent in agents:
                agent.service()
            time.sleep(0.02)
        assert "p" in prefill_sched.holding  # touched: still held after the lease
        decode_sched.waiting.clear()
        deadline = time.monotonic() + 30
        while "p" in prefill_sched.holding and time.monotonic() < deadline:
            agents[0].service()
            time.sleep(0.05)
        assert "p" not in prefill_sched.holding and prefill_sched.blocks.num_free_blocks == 8
    finally:
        for agent in agents:
            agent.close()


def test_side_channel_refuses_a_peer_that_speaks_something_else():
    """A peer that is not the engine's side channel (vLLM's NIXL handshake is ZMQ: its greeting starts 0xFF) is
    named as such at once, not read as a 4 GB length."""
    import socket as _socket

    from epkit.engine.kv_transfer import recv_message

    a, b = _socket.socketpair()
    try:
        a.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f")  # ZMTP's greeting signature
        with pytest.raises(ValueError, match="is not the built-in engine's KV side channel"):
            b.settimeout(5)
            recv_message(b)
    finally:
        a.close()
        b.close()
