"""The async OpenAI-compatible streaming client: one request in, one raw record out.

It records what happened, never what it means: the send time, the arrival time of every
streamed chunk that carries a choice, the token counts the server reported in ``usage``,
and success or the error text. Metrics are derived later (:mod:`epkit.bench.metrics`).
All times are ``time.perf_counter()`` seconds relative to the run's ``t0``.

A failure of any kind (refused connection, 4xx/5xx, a stream closed early, malformed
SSE, a timeout) is returned as a record with ``success=False``; nothing is raised.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from epkit.bench.datasets import SampleRequest

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestRecord:
    """What one request did. Times are seconds since the run's t0 (``time.perf_counter``)."""

    index: int
    prompt_len: int
    output_len_requested: int
    warmup: bool = False
    dp_rank: int | None = None
    scheduled_s: float = float("nan")
    send_s: float = float("nan")
    chunk_s: list[float] = field(default_factory=list)
    end_s: float = float("nan")
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    output_tokens_tokenized: int | None = None
    generated_text: str = ""
    success: bool = False
    http_status: int | None = None
    error: str = ""


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send: endpoint, auth, headers, timeouts, sampling knobs."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 6 * 3600.0
    connect_timeout_s: float = 30.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)
    request_id_prefix: str = "epkit-"

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint={self.endpoint!r} is not one of {ENDPOINTS}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r} must start with http:// or https://")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s}, connect_timeout_s={self.connect_timeout_s}: must be > 0")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")


def make_session(config: ClientConfig, max_connections: int | None) -> aiohttp.ClientSession:
    """One keep-alive session for a run (connections reused across requests, as vLLM's client does)."""
    connector = aiohttp.TCPConnector(limit=max_connections or 0, limit_per_host=max_connections or 0,
                                     keepalive_timeout=60, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s, sock_connect=config.connect_timeout_s)
    # No trust_env: reading proxy settings and ~/.netrc on every request costs about a millisecond.
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def build_payload(config: ClientConfig, req: SampleRequest) -> dict:
    """The JSON body: streaming, usage requested, ``max_tokens`` from the sample."""
    payload: dict = {"model": config.model, "stream": True, "stream_options": {"include_usage": True}}
    if config.chat:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        payload["messages"] = req.messages or [{"role": "user", "content": text}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if config.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(config.extra_body)
    return payload


def build_headers(config: ClientConfig, index: int, dp_rank: int | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-request-id": f"{config.request_id_prefix}{index}"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    if dp_rank is not None:
        headers["X-data-parallel-rank"] = str(dp_rank)
    headers.update(config.headers)
    return headers


async def send(session: aiohttp.ClientSession, config: ClientConfig, rec: RequestRecord, req: SampleRequest,
               t0: float) -> RequestRecord:
    """Send one streaming request and fill ``rec`` with what arrived; never raises."""
    body_bytes = json.dumps(build_payload(config, req), separators=(",", ":")).encode()
    headers = build_headers(config, rec.index, rec.dp_rank)
    clock = time.perf_counter
    chunks = rec.chunk_s
    texts: list[str] = []
    key = "delta" if config.chat else None
    rec.send_s = clock() - t0
    try:
        async with session.post(config.url, data=body_bytes, headers=headers) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                body = (await resp.text())[:500]
                rec.error = f"HTTP {resp.status} {resp.reason}: {body}"
                return rec
            buf = b""
            done = False
            async for data in resp.content.iter_any():
                now = clock() - t0
                buf += data
                while True:
                    cut = buf.find(b"\n\n")
                    if cut < 0:
                        break
                    event, buf = buf[:cut], buf[cut + 2 :]
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue  # SSE comments (":" pings), event:/id: lines
                        body = line[5:].strip()
                        if body == b"[DONE]":
                            done = True
                            continue
                        msg = json.loads(body)
                        if choices := msg.get("choices"):
                            chunks.append(now)
                            c = choices[0]
                            texts.append((c.get(key) or {}).get("content") or "" if key else c.get("text") or "")
                        if usage := msg.get("usage"):
                            rec.prompt_tokens = usage.get("prompt_tokens")
                            rec.completion_tokens = usage.get("completion_tokens")
            rec.end_s = clock() - t0
            rec.generated_text = "".join(texts)
            if not chunks:
                rec.error = "stream ended without a single token chunk"
            elif not done:
                rec.error = f"stream ended without [DONE] after {len(chunks)} chunks"
            else:
                rec.success = True
    except json.JSONDecodeError as e:
        rec.error = f"malformed SSE data after {len(chunks)} chunks: {e.doc[:200]!r} ({e.msg})"
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}" + (f" after {len(chunks)} chunks" if chunks else "")
    if rec.error and chunks and not rec.generated_text:
        rec.generated_text = "".join(texts)
    if rec.end_s != rec.end_s:  # NaN: ended by an exception
        rec.end_s = clock() - t0
    return rec
