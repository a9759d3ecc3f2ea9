"""The async OpenAI-compatible streaming client: one request in, one raw record out.

It records what happened, never what it means: the send time, the arrival time of every
streamed chunk that carries a choice, the token counts the server reported in ``usage``,
and success or the error text. Metrics are derived later (:mod:`epkit.bench.metrics`).
All times are ``time.perf_counter()`` seconds relative to the run's ``t0``.

What the two stamps mean, and why they are taken where they are:

- ``send_s`` is when the request's bytes are handed to the socket (aiohttp's
  ``on_request_chunk_sent`` trace signal, fired right before the write), not when
  ``session.post`` was called. On Python < 3.12 aiohttp writes the body from a task of its
  own, one event-loop turn after ``post``; at concurrency N the other N−1 requests'
  preparation ran in between, and a stamp taken before ``post`` read up to N × 0.3 ms early.
- a chunk's time is taken first thing when the reading task wakes; the bytes and their
  arrival time are kept and the SSE events are split and decoded in batches of ~1 KiB (each
  event keeps the arrival time of the read that completed it). Decoding each read at once put
  a parse before the stamps of every stream woken after it in the same loop turn — 64 first
  tokens arriving together waited up to 0.8 ms for the last; a first token's read is far
  below a batch, so a burst of them now waits for no parsing. Decoding whole streams at their
  end instead stalled the loop for milliseconds when many streams ended together.

A failure of any kind (refused connection, 4xx/5xx, a stream closed early, malformed
SSE, a timeout) is returned as a record with ``success=False``; nothing is raised.

Behind ``epkit proxy`` (disaggregated prefill/decode) the last chunk of a stream (or the body of
a whole response) carries ``epkit_pd``: what the router measured of the prefill call and the KV
transfer, and which instances served the request. :func:`record_pd` copies it into the record's
``prefill_ms``, ``kv_transfer_ms``, ``kv_transfer_bytes``, ``prefill_url``, ``decode_url``; a
server without a router (colocated, a plain vLLM) leaves them None.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from epkit.bench.datasets import SampleRequest

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
PARSE_BACKLOG_BYTES = 1024  # parse a stream's events once this much is pending (~4 vLLM events, ~50 µs)


@dataclass
class RequestRecord:
    """What one request did. Times are seconds since the run's t0 (``time.perf_counter``):
    ``scheduled_s`` when it was due, ``start_s`` when the client took it up (a concurrency slot
    was free: vLLM's ``start_time``), ``send_s`` when its bytes went to the socket, ``chunk_s``
    the arrival of each token chunk, ``end_s`` the end of the stream."""

    index: int
    prompt_len: int
    output_len_requested: int
    warmup: bool = False
    dp_rank: int | None = None
    scheduled_s: float = float("nan")
    start_s: float = float("nan")
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
    prefill_ms: float | None = None
    kv_transfer_ms: float | None = None
    kv_transfer_bytes: int | None = None
    prefill_url: str | None = None
    decode_url: str | None = None


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
    """One keep-alive session for a run (connections reused across requests, as vLLM's client
    does), with the trace hook that stamps each request when its bytes go to the socket."""
    connector = aiohttp.TCPConnector(limit=max_connections or 0, limit_per_host=max_connections or 0,
                                     keepalive_timeout=60, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s, sock_connect=config.connect_timeout_s)
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_stamp_send)
    # No trust_env: reading proxy settings and ~/.netrc on every request costs about a millisecond.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace])


async def _stamp_send(session, ctx, params) -> None:
    """aiohttp calls this right before it writes a request body chunk: the request leaves now."""
    stamp = ctx.trace_request_ctx
    if stamp is not None:
        rec, t0 = stamp
        if rec.send_s != rec.send_s:  # NaN: the first chunk of this request
            rec.send_s = time.perf_counter() - t0


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


def encode_body(config: ClientConfig, req: SampleRequest) -> bytes:
    """The request body as sent; the runner encodes every sample once, before the clock starts
    (a 1024-token prompt costs ~0.1 ms of ``json.dumps``, on the send path of every request)."""
    return json.dumps(build_payload(config, req), separators=(",", ":")).encode()


def build_headers(config: ClientConfig, index: int, dp_rank: int | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "x-request-id": f"{config.request_id_prefix}{index}"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    if dp_rank is not None:
        headers["X-data-parallel-rank"] = str(dp_rank)
    headers.update(config.headers)
    return headers


async def send(session: aiohttp.ClientSession, config: ClientConfig, rec: RequestRecord, req: SampleRequest,
               t0: float, body: bytes | None = None) -> RequestRecord:
    """Send one streaming request and fill ``rec`` with what arrived; never raises.

    ``body`` is :func:`encode_body` of ``req`` when the caller encoded it ahead. With a session
    from :func:`make_session`, ``send_s`` is when the request went to the socket; with another
    session (no trace hook), when ``post`` was called.
    """
    if body is None:
        body = encode_body(config, req)
    headers = build_headers(config, rec.index, rec.dp_rank)
    clock = time.perf_counter
    events = EventReader(rec, config.chat, t0)
    reads: list[bytes] = []
    read_s: list[float] = []
    failure = ""
    rec.send_s = float("nan")
    rec.start_s = clock() - t0
    try:
        async with session.post(config.url, data=body, headers=headers, trace_request_ctx=(rec, t0)) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                text = (await resp.text())[:500]
                rec.error = f"HTTP {resp.status} {resp.reason}: {text}"
            else:
                backlog = 0
                async for data in resp.content.iter_any():
                    read_s.append(clock())  # the hot path: the arrival time and the bytes, nothing else
                    reads.append(data)
                    backlog += len(data)
                    if backlog >= PARSE_BACKLOG_BYTES:  # a first token's read never gets here
                        backlog = 0
                        if not events.feed_all(reads, read_s):
                            break
                rec.end_s = clock() - t0
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
        failure = f"{type(e).__name__}: {e}"
    if rec.send_s != rec.send_s:  # never written (refused, timed out connecting) or no trace hook
        rec.send_s = rec.start_s
    if not rec.error:
        events.feed_all(reads, read_s)
    events.close()
    n = len(rec.chunk_s)
    if failure:
        rec.error = failure + (f" after {n} chunks" if n else "")
    elif rec.error:
        pass  # HTTP status or malformed data
    elif not n:
        rec.error = "stream ended without a single token chunk"
    elif not events.done:
        rec.error = f"stream ended without [DONE] after {n} chunks"
    else:
        rec.success = True
    if rec.end_s != rec.end_s:  # NaN: ended by an exception
        rec.end_s = clock() - t0
    return rec


PD_FIELDS = {"prefill_ms": float, "kv_transfer_ms": float, "kv_transfer_bytes": int, "prefill_url": str,
             "decode_url": str}


def record_pd(rec: RequestRecord, body: dict) -> None:
    """Copy what ``epkit proxy`` reported of one request (``body["epkit_pd"]``: a streamed chunk,
    the last one carries it, or a whole response's JSON) into ``rec``. A decode engine's own
    ``epkit_kv_transfer`` report (``{"ms", "bytes", …}``, on the chunk that ends its stream, which
    the router passes on) fills the KV transfer fields the router left null. A missing or null
    field stays None, and so does a field of the wrong type (the router's numbers are extras to
    the measurement, never a reason to fail a request)."""
    pd_info = body.get("epkit_pd")
    if isinstance(pd_info, dict):
        for name, kind in PD_FIELDS.items():
            value = pd_info.get(name)
            if isinstance(value, bool) or value is None:
                continue
            if kind is str and isinstance(value, str):
                setattr(rec, name, value)
            elif kind is not str and isinstance(value, (int, float)):
                setattr(rec, name, kind(value))
    kv = body.get("epkit_kv_transfer")
    if isinstance(kv, dict):
        for name, key, kind in (("kv_transfer_ms", "ms", float), ("kv_transfer_bytes", "bytes", int)):
            value = kv.get(key)
            if getattr(rec, name) is None and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(rec, name, kind(value))


class EventReader:
    """Server-sent events of one OpenAI stream into its record. Each event that carries a
    choice adds one chunk time (that of the read that completed the event) and its text;
    ``usage`` sets the token counts; ``data: [DONE]`` sets ``done``."""

    def __init__(self, rec: RequestRecord, chat: bool, t0: float) -> None:
        self.rec, self.chat, self.t0 = rec, chat, t0
        self.buf = b""
        self.texts: list[str] = []
        self.done = False

    def feed(self, data: bytes, at_s: float) -> bool:
        """Take one read that arrived at ``at_s`` (perf_counter); False (and ``rec.error``) on
        malformed data, after which nothing more is read."""
        buf, pos, rec = self.buf + data, 0, self.rec
        while (cut := buf.find(b"\n\n", pos)) >= 0:
            event, pos = buf[pos:cut], cut + 2
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue  # SSE comments (":" pings), event:/id: lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    continue
                try:
                    msg = json.loads(payload)
                    if not isinstance(msg, dict):
                        raise ValueError(f"a JSON {type(msg).__name__}, not an object")
                except ValueError as e:
                    rec.error = f"malformed SSE data after {len(rec.chunk_s)} chunks: {payload[:200]!r} ({e})"
                    return False
                if choices := msg.get("choices"):
                    rec.chunk_s.append(at_s - self.t0)
                    c = choices[0]
                    self.texts.append(((c.get("delta") or {}).get("content") or "") if self.chat
                                      else (c.get("text") or ""))
                if usage := msg.get("usage"):
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.completion_tokens = usage.get("completion_tokens")
                if "epkit_pd" in msg or "epkit_kv_transfer" in msg:
                    record_pd(rec, msg)
        self.buf = buf[pos:]
        return True

    def feed_all(self, reads: list[bytes], read_s: list[float]) -> bool:
        """:meth:`feed` every pending read in order, then empty both lists."""
        ok = all(self.feed(data, at_s) for data, at_s in zip(reads, read_s))
        reads.clear()
        read_s.clear()
        return ok

    def close(self) -> None:
        self.rec.generated_text = "".join(self.texts)
