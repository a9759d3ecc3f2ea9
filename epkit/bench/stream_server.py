"""A paced OpenAI-compatible streaming server whose TTFT and inter-token gap are set.

It exists to calibrate clients: every stream sends its first token ``ttft_ms`` after the
request arrived and each next one ``itl_ms`` later (``itl_ms=0``: as fast as the socket
takes them), and it logs the monotonic time at which it wrote each token, so a client's
measured timestamps can be compared with the truth. ``time.perf_counter`` is
CLOCK_MONOTONIC on Linux, shared by every process on the machine.

Tokens are bytes: a prompt of text counts one token per UTF-8 byte, a prompt of token ids
one per id, and every output token is one printable ASCII letter. That is exactly what
the byte-level tokenizer written by :func:`write_byte_tokenizer` counts, so ``vllm bench
serve`` and epkit agree on token counts. Output length is always ``max_tokens``.

It speaks HTTP/1.1 with keep-alive and chunked transfer directly on an asyncio protocol
(no framework): a Python web framework costs more per event than the clients it measures.

Run it: ``python -m epkit.bench.stream_server --port 8000 --ttft-ms 50 --itl-ms 10``.
Faults for testing clients: ``--fail-every N --fault {500,429,close,malformed,empty}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FAULTS = ("500", "429", "close", "malformed", "empty")
_LETTERS = b"abcdefghijklmnopqrstuvwxyz"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error"}
SPIN_S = 0.0015  # sleep until this close to a deadline, then poll: asyncio's timer rounds to 1 ms


@dataclass
class ServerConfig:
    """How the server paces and fails; ``fail_every=0`` never fails."""

    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    model: str = "stream-test"
    api_key: str | None = None
    fail_every: int = 0
    fault: str = "500"
    spin: bool = True
    log_requests: bool = True

    def __post_init__(self) -> None:
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError(f"ttft_ms={self.ttft_ms}, itl_ms={self.itl_ms}: both must be >= 0")
        if self.fault not in FAULTS:
            raise ValueError(f"fault={self.fault!r} is not one of {FAULTS}")


@dataclass
class _State:
    config: ServerConfig
    n_requests: int = 0
    log: list[dict] = field(default_factory=list)


def _count_prompt_tokens(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).encode()) for m in body["messages"])
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return len(prompt) if not prompt or isinstance(prompt[0], int) else sum(len(p) for p in prompt)
    return len(str(prompt).encode())


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Conn(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.busy = False
        self.closed = False
        self.first_byte_s = 0.0

    # asyncio.Protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        if not self.buf:
            self.first_byte_s = time.perf_counter()  # a request's clock starts when its first byte lands
        self.buf += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].decode("latin-1").split("\r\n")
        headers = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", 0))
        if len(self.buf) < head_end + 4 + length:
            return
        body = self.buf[head_end + 4 : head_end + 4 + length]
        self.buf = self.buf[head_end + 4 + length :]
        method, path = head[0].split(" ")[:2]
        self.busy = True
        recv_s, self.first_byte_s = self.first_byte_s, time.perf_counter()
        asyncio.get_running_loop().create_task(self._serve(method, path, headers, body, recv_s))

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def _reply(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self._write(
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )

    async def _chunk(self, data: bytes) -> None:
        if not self.can_write.is_set():
            await self.can_write.wait()
        self._write(b"%x\r\n%s\r\n" % (len(data), data))

    async def _serve(self, method: str, path: str, headers: dict, body: bytes, recv_s: float) -> None:
        try:
            await self._dispatch(method, path, headers, body, recv_s)
        except Exception as e:  # noqa: BLE001 — a broken request must not kill the server
            self._reply(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
        self.busy = False
        if not self.closed and self.buf:
            self._next_request()

    async def _dispatch(self, method: str, path: str, headers: dict, body: bytes, recv_s: float) -> None:
        cfg, st = self.state.config, self.state
        path = path.split("?")[0]
        if method == "GET" and path in ("/health", "/ping"):
            return self._reply(200, {})
        if method == "GET" and path == "/v1/models":
            return self._reply(200, {"object": "list", "data": [{"id": cfg.model, "object": "model"}]})
        if path == "/debug/requests":
            log = st.log
            if method == "DELETE":
                st.log = []
            return self._reply(200, log)
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return self._reply(404, {"error": {"message": f"no route {method} {path}"}})
        if cfg.api_key and headers.get("authorization") != f"Bearer {cfg.api_key}":
            return self._reply(401, {"error": {"message": "bad or missing API key"}})
        req = json.loads(body)
        st.n_requests += 1
        fault = cfg.fault if cfg.fail_every and st.n_requests % cfg.fail_every == 0 else None
        if fault in ("500", "429"):
            return self._reply(int(fault), {"error": {"message": f"injected {fault}"}})
        chat = path.endswith("chat/completions")
        n_out = 0 if fault == "empty" else int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        n_in = _count_prompt_tokens(req)
        rid = headers.get("x-request-id", "")
        entry = {"request_id": rid, "dp_rank": headers.get("x-data-parallel-rank"), "recv_s": recv_s,
                 "token_s": [], "prompt_tokens": n_in, "fault": fault}
        if cfg.log_requests:
            st.log.append(entry)
        self._write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        head = {"id": f"cmpl-{rid or st.n_requests}", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": req.get("model", cfg.model)}
        stamps = entry["token_s"]
        for i in range(n_out):
            deadline = recv_s + (cfg.ttft_ms + i * cfg.itl_ms) / 1e3
            await self._wait_until(deadline)
            if self.closed:
                return
            if fault == "close" and i == n_out // 2:
                self.transport.abort()  # a server dying mid-stream: no terminating chunk
                return
            text = chr(_LETTERS[i % 26])
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            choice["finish_reason"] = "length" if i == n_out - 1 else None
            stamps.append(time.perf_counter())
            await self._chunk(_event({**head, "choices": [choice]}))
            if fault == "malformed" and i == 0:
                await self._chunk(b"data: {not json\n\n")
        if req.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            await self._chunk(_event({**head, "choices": [], "usage": usage}))
        await self._chunk(b"data: [DONE]\n\n")
        self._write(b"0\r\n\r\n")

    async def _wait_until(self, deadline: float) -> None:
        left = deadline - time.perf_counter()
        if left > SPIN_S or (left > 0 and not self.state.config.spin):
            await asyncio.sleep(left - (SPIN_S if self.state.config.spin else 0))
        if self.state.config.spin:
            # Poll the loop rather than block it, so other streams' reads and writes go on.
            while time.perf_counter() < deadline:
                await asyncio.sleep(0)
        elif self.state.config.itl_ms == 0:
            await asyncio.sleep(0)  # let other streams and the reader in


async def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 0, ready=None,
                stop_on_sigterm: bool = False) -> None:
    """Serve until cancelled (or SIGTERM, with ``stop_on_sigterm``); ``ready(port)`` is called
    once the socket listens. Stopping drops every open connection."""
    state = _State(config)
    conns: set[_Conn] = set()

    def connection() -> _Conn:
        conn = _Conn(state)
        conns.add(conn)
        return conn

    loop = asyncio.get_running_loop()
    server = await loop.create_server(connection, host, port)
    if stop_on_sigterm:
        loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    try:
        async with server:
            await server.serve_forever()
    finally:
        for conn in conns:
            if not conn.closed and conn.transport is not None:
                conn.transport.abort()


def write_byte_tokenizer(directory: str | Path) -> Path:
    """Write a Hugging Face tokenizer (one token per UTF-8 byte) that counts as this server does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from epkit.topology.byte_level import byte_of

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=byte_of))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "model_max_length": 1 << 20, "add_bos_token": False}))
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 258, "bos_token_id": 256, "eos_token_id": 257}))
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epkit.bench.stream_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port; the port is printed")
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=5.0)
    p.add_argument("--model", default="stream-test")
    p.add_argument("--api-key", default=None)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fault", choices=FAULTS, default="500")
    p.add_argument("--no-spin", action="store_true", help="sleep only (1 ms timer granularity), never busy-wait")
    p.add_argument("--no-log", action="store_true", help="keep no per-token send log (long runs)")
    a = p.parse_args(argv)
    cfg = ServerConfig(a.ttft_ms, a.itl_ms, a.model, a.api_key, a.fail_every, a.fault, not a.no_spin, not a.no_log)

    def ready(port: int) -> None:
        print(f"listening on http://{a.host}:{port}", flush=True)

    try:
        asyncio.run(serve(cfg, a.host, a.port, ready, stop_on_sigterm=True))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
