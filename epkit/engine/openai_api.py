"""The OpenAI routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streamed or not), shaped as vLLM's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
import weakref
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from epkit.engine.client import EngineClient
from epkit.engine.config import EngineConfig
from epkit.engine.metrics import Metrics
from epkit.engine.protocol import (ApiError, ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                   prompt_logprobs_json, prompts_of)
from epkit.engine.sequence import RequestOutput, SamplingParams
from epkit.engine.streaming import SSE_DONE, StopChecker, merge, sse, usage

log = logging.getLogger("epkit.engine")


class Api:
    """Request handling shared by the endpoints; one per API server process."""

    def __init__(self, cfg: EngineConfig, engine: EngineClient, tokenizer, max_model_len: int, metrics: Metrics):
        self.cfg, self.engine, self.tok, self.max_model_len, self.metrics = cfg, engine, tokenizer, max_model_len, metrics
        self.ignored_fields: set[str] = set()  # request fields already logged as ignored (once per name)

    def log_ignored(self, fields: list[str]) -> None:
        """Log each request field the engine does not know, the first time a request carries it."""
        for name in fields:
            if name not in self.ignored_fields:
                self.ignored_fields.add(name)
                log.warning("request field %r is not known to the built-in engine and is ignored (logged once per field)",
                            name)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", "model")

    def pinned_rank(self, request: Request) -> int | None:
        value = request.headers.get("x-data-parallel-rank")
        if value is None:
            return None
        if not value.strip().isdigit() or not 0 <= int(value) < self.cfg.data_parallel_size:
            raise ApiError(400, f"X-data-parallel-rank={value!r} must be an integer in 0..{self.cfg.data_parallel_size - 1}")
        return int(value)

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt, add_special_tokens)
        bad = [t for t in prompt if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{self.tok.vocab_size - 1}", "prompt")
        return prompt

    async def parse(self, request: Request, model_cls):
        """The request body validated as ``model_cls``; a 400 naming the first bad field otherwise."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0]))
        self.check_model(parsed.model)
        self.log_ignored(parsed.unknown_fields())
        return parsed

    def stream(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], pinned: int | None, rid: str = ""):
        """(stream of one request, the DP rank it goes to); the rank's count is released even if never streamed."""
        ticket = self.engine.reserve(pinned)
        if self.cfg.enable_log_requests:
            log.info("request %s: DP rank %d, %d prompt tokens, %s", rid, ticket.rank, len(prompt_ids), params)
        stream = self.run(prompt_ids, params, stops, ticket)
        weakref.finalize(stream, ticket.release)
        return stream, ticket.rank

    async def run(self, prompt_ids: list[int], params: SamplingParams, stops: list[str],
                  ticket) -> AsyncIterator[tuple[str, RequestOutput, str | None]]:
        """Yield (text delta, the engine's output with its token ids and logprobs, finish reason or None)."""
        checker = StopChecker(self.tok, stops, prompt_ids)
        start = last = time.perf_counter()
        first = True
        metrics, vllm = self.metrics, self.metrics.vllm[ticket.rank]
        metrics.prompt_m.inc(len(prompt_ids))
        vllm.prompt.inc(len(prompt_ids))
        gen = self.engine.generate(prompt_ids, params, ticket)
        try:
            async for out in gen:
                if out.error is not None:
                    raise ApiError(502, out.error, "kv_transfer_params")
                now = time.perf_counter()
                if first:
                    metrics.ttft_m.observe(now - last)
                    vllm.ttft.observe(now - last)
                    if out.num_cached_tokens is not None:  # the prefix cache was looked up at admission
                        vllm.cache_queries.inc(len(prompt_ids))
                        vllm.cache_hits.inc(out.num_cached_tokens)
                else:
                    metrics.itl_m.observe(now - last)
                    vllm.itl.observe(now - last)
                first, last = False, now
                metrics.generation_m.inc(len(out.new_token_ids))
                vllm.generation.inc(len(out.new_token_ids))
                delta = checker.push(out.new_token_ids, final=out.finish_reason is not None)
                reason = "stop" if checker.stopped else out.finish_reason
                if reason is not None:
                    metrics.e2e_m.observe(now - start)
                    vllm.e2e.observe(now - start)
                    metrics.success.labels(metrics.model, reason).inc()
                yield delta, out, reason
                if reason is not None:
                    return
        finally:
            await gen.aclose()


class KVFields:
    """A reply's disaggregated prefill/decode fields: the request's checked ``kv_transfer_params``, and what the
    engine said: a prefill's ``kv_transfer_params`` (where its KV is held), a decode's ``epkit_kv_transfer``."""

    def __init__(self, params: dict[str, Any] | None):
        self.params = params
        self.remote_prefill = bool(params and params.get("do_remote_prefill"))
        self.returned: dict[str, Any] | None = None
        self.transfer: dict[str, Any] | None = None

    def see(self, out: RequestOutput) -> None:
        self.returned = out.kv_transfer_params or self.returned
        self.transfer = out.kv_transfer_stats or self.transfer

    def fields(self) -> dict[str, Any]:
        """Top-level keys of the body (or the last streamed chunk): vLLM's ``kv_transfer_params`` when a transfer
        was asked (null when nothing is held), epkit's ``epkit_kv_transfer`` after a pull."""
        out: dict[str, Any] = {}
        if self.params is not None:
            out["kv_transfer_params"] = self.returned
        if self.transfer is not None:
            out["epkit_kv_transfer"] = self.transfer
        return out


async def primed(stream):
    """``stream`` with its first item already awaited (so its errors raise here), as an async iterator."""
    first = await stream.__anext__()

    async def chain():
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # a client that left: the request is aborted now

    return chain()


class CompletionReply:
    """One ``/v1/completions`` request, started: its prompts' streams and how its choices read (streamed or whole)."""

    def __init__(self, api: Api, req: CompletionRequest, pinned: int | None, request_id: str | None = None):
        self.api, self.req, self.model = api, req, api.cfg.model_name
        top = req.engine_logprobs(api.cfg.max_logprobs, api.tok.vocab_size)
        raw_prompts = prompts_of(req)
        self.prompts = [api.encode(p) for p in raw_prompts]
        self.echo_only = req.echo and req.max_tokens == 0  # vLLM: only the prompt comes back
        self.kv = KVFields(req.kv_params(api.cfg.kv_transfer_config is not None, len(self.prompts)))
        params = [req.sampling_params(len(p), api.max_model_len, req.max_tokens, top, self.echo_only, self.kv.params)
                  for p in self.prompts]
        self.rid, self.created = f"cmpl-{request_id or uuid.uuid4().hex}", int(time.time())
        self.streams, ranks = zip(*(api.stream(p, sp, req.stop_strings(), pinned, f"{self.rid}-{i}")
                                    for i, (p, sp) in enumerate(zip(self.prompts, params))))
        self.prompt_tokens = sum(len(p) for p in self.prompts)
        # echo: the prompt's text (token-id prompts decoded), empty with return_token_ids (the ids say it), as vLLM
        self.echo_texts = [("" if req.return_token_ids else p if isinstance(p, str) else api.tok.decode(p))
                           for p in raw_prompts]
        self.headers = {"x-data-parallel-rank": ",".join(map(str, ranks)), "x-epkit-api-server": str(api.engine.server_index)}

    def shown(self, i: int, text: str, ids: list[int], entries: list, prompt_entries, first: bool):
        """(text, token ids, logprob entries) a choice shows: with echo, the prompt before the first output."""
        if not (self.req.echo and first):
            return text, ids, entries
        prompt_entries = list(prompt_entries or [None] * len(self.prompts[i]))
        if self.echo_only:
            return self.echo_texts[i], self.prompts[i], prompt_entries
        return self.echo_texts[i] + text, self.prompts[i] + ids, prompt_entries + entries

    def choice(self, i: int, text: str, reason: str | None, ids: list[int]) -> dict[str, Any]:
        out = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        if self.req.return_token_ids:
            out["token_ids"] = list(ids)
        return out

    def envelope(self, choices: list[dict[str, Any]], **extra) -> dict[str, Any]:
        return {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    async def events(self) -> AsyncIterator[str]:
        """The streamed reply: one SSE chunk per output of any prompt, then usage (if asked) and ``[DONE]``."""
        req, tok = self.req, self.api.tok
        completion, offsets, started = 0, [0] * len(self.prompts), [False] * len(self.prompts)
        async for i, (text, out, reason) in merge(self.streams):
            ids = list(out.new_token_ids)
            completion += len(ids)
            self.kv.see(out)
            text_shown, ids_shown, entries = self.shown(i, text, ids, list(out.logprobs or ()), out.prompt_logprobs,
                                                        not started[i])
            c = self.choice(i, text_shown, reason, ids)
            if req.return_token_ids and not started[i]:
                c["prompt_token_ids"] = self.prompts[i]
            started[i] = True
            if req.logprobs is not None:
                c["logprobs"], offsets[i] = completion_logprobs(tok, ids_shown, entries, req.logprobs, offsets[i])
            payload = self.envelope([c])
            if req.include_usage:
                payload["usage"] = None
            if reason is not None:
                payload.update(self.kv.fields())
            yield sse(payload)
        if req.include_usage:
            yield sse(self.envelope([], usage=usage(self.prompt_tokens, completion)))
        yield SSE_DONE

    async def body(self) -> dict[str, Any]:
        """The whole reply: every prompt's choice once its stream ends."""
        req, tok, n = self.req, self.api.tok, len(self.prompts)
        texts, reasons, token_ids = [""] * n, [None] * n, [[] for _ in range(n)]
        entries, prompt_entries = [[] for _ in range(n)], [None] * n
        async for i, (text, out, reason) in merge(self.streams):
            self.kv.see(out)
            texts[i] += text
            reasons[i] = reason or reasons[i]
            token_ids[i].extend(out.new_token_ids)
            entries[i].extend(out.logprobs or ())
            if out.prompt_logprobs is not None:
                prompt_entries[i] = list(out.prompt_logprobs)
        choices = []
        for i in range(n):
            text_shown, ids_shown, lps = self.shown(i, texts[i], token_ids[i], entries[i], prompt_entries[i], True)
            c = self.choice(i, text_shown, reasons[i], token_ids[i])
            if req.logprobs is not None:
                c["logprobs"] = completion_logprobs(tok, ids_shown, lps, req.logprobs)[0]
            if req.prompt_logprobs is not None:
                c["prompt_logprobs"] = prompt_logprobs_json(tok, prompt_entries[i] or [])
            if req.return_token_ids:
                c["prompt_token_ids"] = self.prompts[i]
            choices.append(c)
        completion = sum(len(ids) for ids in token_ids)
        return self.envelope(choices, usage=usage(self.prompt_tokens, completion), **self.kv.fields())

    async def prime(self) -> None:
        """Wait for the first output, so that a failed KV pull is an error reply, not a broken stream."""
        self.streams = (await primed(self.streams[0]),)


class ChatReply:
    """One ``/v1/chat/completions`` request, started: the chat template applied, one stream (streamed or whole)."""

    def __init__(self, api: Api, req: ChatRequest, pinned: int | None, request_id: str | None = None):
        self.api, self.req, self.model = api, req, api.cfg.model_name
        self.top = req.engine_logprobs(api.cfg.max_logprobs, api.tok.vocab_size)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        self.prompt = api.tok.encode(api.tok.apply_chat_template(messages, req.add_generation_prompt),
                                     add_special_tokens=False)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self.kv = KVFields(req.kv_params(api.cfg.kv_transfer_config is not None))
        params = req.sampling_params(len(self.prompt), api.max_model_len, requested, self.top,
                                     kv_transfer_params=self.kv.params)
        self.rid, self.created = f"chatcmpl-{request_id or uuid.uuid4().hex}", int(time.time())
        self.stream, rank = api.stream(self.prompt, params, req.stop_strings(), pinned, self.rid)
        self.headers = {"x-data-parallel-rank": str(rank), "x-epkit-api-server": str(api.engine.server_index)}
        self.role = "assistant" if req.add_generation_prompt else messages[-1]["role"]  # vLLM's response role
        self.echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == self.role else ""  # vLLM's chat echo

    def chunk(self, delta: dict[str, Any], reason: str | None, logprobs=None) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    async def events(self) -> AsyncIterator[str]:
        """The streamed reply: the role chunk, the echo (if any), one chunk per output, usage (if asked), ``[DONE]``."""
        req, tok = self.req, self.api.tok
        completion = 0
        first = self.chunk({"role": self.role, "content": ""}, None)
        if req.return_token_ids:
            first["prompt_token_ids"] = self.prompt
        yield sse(first)
        if self.echo:
            yield sse(self.chunk({"content": self.echo}, None))
        async for text, out, reason in self.stream:
            completion += len(out.new_token_ids)
            self.kv.see(out)
            lp = chat_logprobs(tok, out.new_token_ids, out.logprobs, self.top) if req.logprobs else None
            c = self.chunk({"content": text} if text else {}, reason, lp)
            if reason is not None:
                c.update(self.kv.fields())
            if req.return_token_ids:
                c["choices"][0]["token_ids"] = list(out.new_token_ids)
            yield sse(c)
        if req.include_usage:
            yield sse({"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [], "usage": usage(len(self.prompt), completion)})
        yield SSE_DONE

    async def body(self) -> dict[str, Any]:
        """The whole reply once the stream ends."""
        req, tok = self.req, self.api.tok
        text, reason, token_ids, entries, prompt_entries = self.echo, None, [], [], None
        async for delta, out, r in self.stream:
            self.kv.see(out)
            text, reason = text + delta, r or reason
            token_ids.extend(out.new_token_ids)
            entries.extend(out.logprobs or ())
            if out.prompt_logprobs is not None:
                prompt_entries = list(out.prompt_logprobs)
        choice = {"index": 0, "message": {"role": self.role, "content": text},
                  "logprobs": chat_logprobs(tok, token_ids, entries, self.top) if req.logprobs else None,
                  "finish_reason": reason}
        body = {"id": self.rid, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(len(self.prompt), len(token_ids))}
        if req.return_token_ids:
            choice["token_ids"] = token_ids
            body["prompt_token_ids"] = self.prompt
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(tok, prompt_entries or [])
        body.update(self.kv.fields())
        return body

    async def prime(self) -> None:
        """Wait for the first output, so that a failed KV pull is an error reply, not a broken stream."""
        self.stream = await primed(self.stream)


async def _client_gone(request: Request) -> None:
    """Return once the client has disconnected (its body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work):
    """``await work`` (a coroutine), cancelled if the client disconnects first, as vLLM's ``with_cancellation``
    does for its routes: the engine then aborts the request (``run``'s ``finally``) instead of finishing it for
    nobody. Returns the result, or None when the client left."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _reply(request: Request, reply: CompletionReply | ChatReply, stream: bool):
    if stream and reply.kv.remote_prefill:
        await reply.prime()
    if stream:
        return StreamingResponse(reply.events(), media_type="text/event-stream", headers=reply.headers)
    body = await _unless_client_leaves(request, reply.body())
    if body is None:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    return JSONResponse(body, headers=reply.headers)


def add_openai_routes(app: FastAPI, api: Api) -> None:
    """``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``."""

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": api.cfg.model_name, "object": "model", "created": 0, "owned_by": "epkit",
                                            "root": api.cfg.model, "max_model_len": api.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await api.parse(request, CompletionRequest)
        reply = CompletionReply(api, req, api.pinned_rank(request), request.headers.get("x-request-id"))
        return await _reply(request, reply, req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await api.parse(request, ChatRequest)
        reply = ChatReply(api, req, api.pinned_rank(request), request.headers.get("x-request-id"))
        return await _reply(request, reply, req.stream)
