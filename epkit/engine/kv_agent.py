"""The engine core's side of disaggregated prefill/decode: its KV side channel and its pulls.

One :class:`KVAgent` per DP rank (engine core). On a prefill, a listener thread takes peers' requests
(``pull``, ``release``) and queues them; the core serves them between steps (:meth:`KVAgent.service`), so
reading blocks never races the step loop: it copies the held prompt's K/V to the host, frees the blocks and
hands the bytes back to the connection's thread to send. Held blocks not pulled within the lease
(:func:`epkit.engine.kv_transfer.hold_timeout_s`) are freed. On a decode, each admitted remote-prefill request
gets a thread that pulls its prompt's KV into a (pinned) host buffer; the core writes it into the request's
blocks between steps and lets the request run. A pull that fails ends its request with an error naming the
prefill's host:port; the engine serves on.

Transport: NIXL READs where both sides load it (:mod:`epkit.engine.kv_nixl`), else the bytes over TCP; the
one used is ``transport`` in the decode response's ``epkit_kv_transfer``; see docs/engine.md.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any

import torch

from epkit.engine.kv_transfer import (CONNECT_TIMEOUT_S, REPLY_TIMEOUT_S, ask, hold_timeout_s, no_delay, prompt_digest,
                                      recv_message, release, remote_decode_params, send_message, side_channel_address)
from epkit.engine.sequence import RequestOutput, Sequence
from epkit.errors import EngineError

log = logging.getLogger("epkit.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Refused(Exception):
    """A pull the prefill answered but that cannot be used (refused, another model, another prompt)."""


class _Reply:
    """What the core answers one connection: a header and maybe a payload, set once."""

    def __init__(self):
        self.done = threading.Event()
        self.header: dict[str, Any] = {"ok": False, "error": "the engine core did not answer (stopping?)"}
        self.payload = None

    def set(self, header: dict[str, Any], payload=None) -> None:
        self.header, self.payload = header, payload
        self.done.set()


class KVAgent:
    """One DP rank's KV side channel and pulls; every method but the threads' runs on the core's thread."""

    def __init__(self, config: dict[str, Any], dp_rank: int, scheduler, runner):
        self.engine_id = f"{config['engine_id']}_dp{dp_rank}"  # vLLM's engine id of a DP rank
        self.host, self.port = side_channel_address(dp_rank)
        self.timeout_s = hold_timeout_s(config)
        self.scheduler, self.runner = scheduler, runner
        self.layout = runner.kv_layout()
        self.pinned = runner.device.type == "cuda"
        from epkit.engine.kv_nixl import load_nixl

        self.nixl = load_nixl(self.engine_id, runner.kv_caches)
        self.transport = "nixl" if self.nixl is not None else "tcp"
        self.expiry: dict[str, float] = {}  # held request id -> monotonic deadline
        self.last_touch = time.monotonic()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # (header, _Reply) from connection threads
        self.pulled: queue.SimpleQueue = queue.SimpleQueue()  # (request id, error, (data, header, started)) from pulls
        self.wakeup, self._wake_w = socket.socketpair()  # the core waits on ``wakeup`` with its API connections
        for s in (self.wakeup, self._wake_w):
            s.setblocking(False)
        try:
            self._server = socket.create_server((self.host, self.port), reuse_port=False)
        except OSError as exc:
            raise EngineError(f"DP rank {dp_rank}: cannot listen on the KV side channel {self.host}:{self.port} "
                              f"(VLLM_NIXL_SIDE_CHANNEL_HOST / VLLM_NIXL_SIDE_CHANNEL_PORT + dp_rank): {exc}") from exc
        scheduler.on_hold = self.hold
        threading.Thread(target=self._accept, daemon=True, name="kv-side-channel").start()
        log.info("DP rank %d: KV side channel on %s:%d (engine id %s, transport %s, held blocks freed after %.0f s "
                 "unless pulled)", dp_rank, self.host, self.port, self.engine_id, self.transport, self.timeout_s)

    # ---- threads --------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(no_delay(sock),), daemon=True, name="kv-peer").start()

    def _serve_connection(self, sock: socket.socket) -> None:
        with sock:
            try:
                sock.settimeout(REPLY_TIMEOUT_S)
                header, _ = recv_message(sock)
                reply = _Reply()
                self.inbox.put((header, reply))
                self._wake()
                reply.done.wait(REPLY_TIMEOUT_S)
                send_message(sock, reply.header, reply.payload)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("KV side channel %s:%d: a peer's request failed: %s", self.host, self.port, exc)

    def _pull(self, request_id: str, num_tokens: int, digest: str, params: dict[str, Any]) -> None:
        started = time.perf_counter()
        where = f"{params['remote_host']}:{params['remote_port']}"
        try:
            data, header = self._receive(params, num_tokens, digest)
            self.pulled.put((request_id, None, (data, header, started)))
        except Exception as exc:  # any failure ends the request with its reason, never a silent hang
            reason = str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
            self.pulled.put((request_id, f"could not pull the prompt's KV from the prefill's side channel at {where} "
                                         f"(remote_engine_id {params['remote_engine_id']}, remote_request_id "
                                         f"{params['remote_request_id']}): {reason}", None))
        self._wake()

    def _receive(self, params: dict[str, Any], num_tokens: int, digest: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """One pull: ``[layers, 2, tokens, heads, dim]`` on the host (pinned on a GPU) and the prefill's header."""
        held: list[torch.Tensor] = []

        def buffer(nbytes: int):  # pinned host memory on a GPU: one fast host-to-device copy
            held.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned))
            return held[0].numpy()

        with no_delay(socket.create_connection((params["remote_host"], int(params["remote_port"])),
                                               timeout=CONNECT_TIMEOUT_S)) as sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            send_message(sock, {"op": "pull", "engine_id": params["remote_engine_id"],
                                "request_id": params["remote_request_id"], "transport": self.transport})
            header, _ = recv_message(sock, buffer)
        if not header.get("ok"):
            raise _Refused(f"the prefill refused the pull: {header.get('error')}")
        problem = self._mismatch(header, num_tokens, digest)
        if problem is not None:
            raise _Refused(problem)
        if "nixl" not in header:
            return held[0].view(DTYPES[header["dtype"]]).reshape(header["shape"]), {**header, "transport": "tcp"}
        data = torch.empty(header["shape"], dtype=DTYPES[header["dtype"]], pin_memory=self.pinned)
        self.nixl.read(header["nixl"], data)
        try:  # read: the prefill frees its blocks now; they must still have been held, or the read may be stale
            freed = release(params)
        except OSError as exc:
            log.warning("KV of %s read over NIXL, but its release failed (freed at the prefill's lease): %s",
                        params["remote_request_id"], exc)
        else:
            if not freed.get("ok"):
                raise _Refused("the prefill freed the blocks before the NIXL read completed (its lease ran out or the "
                               f"router released them), so the read may hold another request's KV: {freed.get('error')}")
        return data, {**header, "transport": "nixl"}

    def _mismatch(self, header: dict[str, Any], num_tokens: int, digest: str) -> str | None:
        shape, (layers, heads, dim) = header.get("shape") or [0] * 5, self.layout
        mine = str(self.runner.dtype).replace("torch.", "")
        if header.get("dtype") != mine:
            return (f"the prefill's KV cache is {header.get('dtype')!r}, this engine's {mine!r}: both sides must run "
                    "the same --dtype")
        if (shape[0], shape[1], shape[3], shape[4]) != (layers, 2, heads, dim):
            return (f"the prefill's KV cache has {shape[0]} layers x {shape[3]} KV heads x head dim {shape[4]}, this "
                    f"engine's {layers} x {heads} x {dim}: both sides must serve the same model")
        if header.get("num_tokens") != num_tokens or header.get("prompt_digest") != digest:
            return (f"the prefill computed a different prompt ({header.get('num_tokens')} tokens) than this request's "
                    f"({num_tokens} tokens): send the decode the original prompt with the prefill's kv_transfer_params")
        return None

    # ---- the core's thread ---------------------------------------------------------------
    def hold(self, seq: Sequence) -> dict[str, Any]:
        """Keep a finished prefill's blocks for its decode (until pulled, released or the lease ends)."""
        self.expiry[seq.request_id] = time.monotonic() + self.timeout_s
        return remote_decode_params(self.engine_id, seq.request_id, seq.block_table, self.host, self.port,
                                    seq.num_prompt_tokens)

    def service(self) -> list[RequestOutput]:
        """Between steps: answer peers, free expired holds, start new pulls, finish done ones (their outputs:
        failed requests)."""
        try:
            while self.wakeup.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while not self.inbox.empty():
            header, reply = self.inbox.get_nowait()
            reply.set(*self._answer(header))
        self._expire()
        self._touch_waiting()
        for seq in self.scheduler.new_receiving:
            threading.Thread(target=self._pull, daemon=True, name="kv-pull",
                             args=(seq.request_id, seq.num_prompt_tokens, prompt_digest(seq.token_ids[:seq.num_prompt_tokens]),
                                   seq.kv_transfer_params)).start()
        self.scheduler.new_receiving.clear()
        return self._finish_pulls()

    def _answer(self, header: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        op, request_id = header.get("op"), header.get("request_id")
        if header.get("engine_id") != self.engine_id:
            return {"ok": False, "error": f"this side channel ({self.host}:{self.port}) is engine {self.engine_id}, "
                                          f"not {header.get('engine_id')!r}"}, None
        seq = self.scheduler.holding.get(request_id)
        if op not in ("pull", "release", "touch"):
            return {"ok": False, "error": f"op={op!r}; allowed: pull, release, touch"}, None
        if seq is None:
            return {"ok": False, "error": f"request {request_id!r} holds no KV here (not prefilled here with "
                                          "do_remote_decode, already pulled or released, or freed after "
                                          f"{self.timeout_s:.0f} s)"}, None
        if op == "touch":  # a decode still queued extends the lease (vLLM 0.32.0's heartbeat)
            self.expiry[request_id] = time.monotonic() + self.timeout_s
            return {"ok": True, "engine_id": self.engine_id, "request_id": request_id}, None
        if op == "release":
            blocks = self._free(request_id)
            log.info("KV of request %s released (%d blocks)", request_id, blocks)
            return {"ok": True, "engine_id": self.engine_id, "request_id": request_id, "blocks": blocks}, None
        n, (layers, heads, dim) = seq.num_prompt_tokens, self.layout
        reply = {"ok": True, "engine_id": self.engine_id, "request_id": request_id, "shape": [layers, 2, n, heads, dim],
                 "dtype": str(self.runner.dtype).replace("torch.", ""), "num_tokens": n,
                 "blocks": -(-n // self.runner.block_size), "prompt_digest": prompt_digest(seq.token_ids[:n])}
        if header.get("transport") == "nixl" and self.nixl is not None:  # the decode READs; it releases after
            self.expiry[request_id] = time.monotonic() + self.timeout_s
            return {**reply, "nixl": self.nixl.offer(seq.block_table, n, self.runner.block_size)}, None
        data = self.runner.read_kv(seq.block_table, n)
        self._free(request_id)
        return reply, memoryview(data.contiguous().view(torch.uint8).reshape(-1).numpy())

    def _free(self, request_id: str) -> int:
        self.expiry.pop(request_id, None)
        return self.scheduler.release_held(request_id) or 0

    def _touch_waiting(self) -> None:
        """Every sixth of the lease (vLLM's heartbeat interval), extend the prefill's hold of each decode still
        queued here, so a busy decode does not lose its prompt's KV to the prefill's lease."""
        now = time.monotonic()
        if now - self.last_touch < self.timeout_s / 6:
            return
        self.last_touch = now
        for seq in self.scheduler.waiting:
            if seq.remote_prefill:
                threading.Thread(target=self._touch, args=(dict(seq.kv_transfer_params),), daemon=True,
                                 name="kv-touch").start()

    @staticmethod
    def _touch(params: dict[str, Any]) -> None:
        try:
            ask(str(params["remote_host"]), int(params["remote_port"]),
                {"op": "touch", "engine_id": params["remote_engine_id"], "request_id": params["remote_request_id"]})
        except (OSError, ValueError, KeyError):
            pass  # the pull will say what is wrong

    def _expire(self) -> None:
        if not self.expiry:
            return
        now = time.monotonic()
        for request_id in [r for r, deadline in self.expiry.items() if deadline <= now]:
            blocks = self._free(request_id)
            log.warning("KV of request %s not pulled within %.0f s: %d held blocks freed", request_id, self.timeout_s,
                        blocks)

    def _finish_pulls(self) -> list[RequestOutput]:
        failed = []
        while not self.pulled.empty():
            request_id, error, result = self.pulled.get_nowait()
            seq = self.scheduler.receiving.get(request_id)
            if seq is None:
                continue  # aborted while pulling
            if error is not None:
                log.error("request %s: %s", request_id, error)
                failed.append(self.scheduler.receive_failed(request_id, error))
                continue
            data, header, started = result
            self.runner.write_kv(seq.block_table, data)
            stats = {"ms": (time.perf_counter() - started) * 1e3, "bytes": data.numel() * data.element_size(),
                     "blocks": int(header["blocks"]), "transport": header["transport"]}
            self.scheduler.receive_done(request_id, stats)
            log.info("request %s: pulled %d tokens of KV (%d blocks, %d bytes) from %s over %s in %.1f ms", request_id,
                     seq.num_prompt_tokens, stats["blocks"], stats["bytes"], header.get("engine_id"), stats["transport"],
                     stats["ms"])
        return failed

    @property
    def held(self) -> tuple[int, int]:
        """(requests, blocks) held for remote decodes."""
        return len(self.scheduler.holding), self.scheduler.held_blocks

    def close(self) -> None:
        for s in (self._server, self.wakeup, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
