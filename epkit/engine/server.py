"""The OpenAI-compatible HTTP API (FastAPI + uvicorn) in front of the DP engine cores."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
import weakref
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from epkit.engine.client import EngineClient
from epkit.engine.config import EngineConfig
from epkit.engine.metrics import Metrics
from epkit.engine.protocol import (ApiError, ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                   prompt_logprobs_json, prompts_of)
from epkit.engine.sequence import RequestOutput, SamplingParams
from epkit.engine.tokenizer import load_tokenizer

log = logging.getLogger("epkit.engine")


class StopChecker:
    """Turns token deltas into text deltas, cutting at the first stop string (held back until sure)."""

    def __init__(self, tokenizer, stops: list[str], prompt_ids: list[int] = ()):
        self.decoder, self.stops = tokenizer.stream_decoder(prompt_ids), stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted, self.stopped = "", 0, False

    def push(self, token_ids: tuple[int, ...], final: bool) -> str:
        self.text += self.decoder.push(list(token_ids), final=final)
        cut = min((i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, end = True, cut
            self.text = self.text[:cut]
        else:
            end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta


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
                now = time.perf_counter()
                if first:
                    metrics.ttft_m.observe(now - last)
                    vllm.ttft.observe(now - last)
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


def stitch_trace(dumps: list[dict | None], model: str, last: int | None = None) -> dict[str, Any]:
    """Every rank's slot loads as one ``epkit-eplb-trace`` JSON document (``kind: physical``).

    Rank ``r`` holds physical slots ``r*S .. r*S+S-1``; steps are the engine steps every rank
    recorded (lockstep), the last ``last`` of them if given. ``epkit.eplb.read_trace`` reads it.
    """
    import numpy as np

    from epkit.eplb.readers import TRACE_FORMAT, TRACE_VERSION

    if not dumps or any(d is None for d in dumps):
        raise ApiError(404, "EPLB is not enabled on this deployment (start it with --enable-eplb)")
    common = set(dumps[0]["steps"]).intersection(*(d["steps"] for d in dumps[1:]))
    steps = sorted(common)[-last:] if last else sorted(common)
    load = np.concatenate([d["load"][[d["steps"].index(s) for s in steps]] for d in dumps], axis=-1)
    maps = dumps[0]["maps"]

    def map_at(step: int):
        current = maps[0][1]
        for first, m in maps:
            if first <= step:
                current = m
        return current

    doc: dict[str, Any] = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "kind": "physical", "model": model,
                           "num_logical_experts": dumps[0]["num_logical_experts"], "num_ranks": len(dumps),
                           "eplb_config": dumps[0]["config"], "steps": []}
    current = None
    for i, step in enumerate(steps):
        entry: dict[str, Any] = {"step": step, "load": load[i].astype(np.int64).tolist()}
        m = map_at(step)
        if current is None:
            doc["physical_to_logical"] = m
        elif m != current:
            entry["physical_to_logical"] = m
        current = m
        doc["steps"].append(entry)
    if current is None:
        doc["physical_to_logical"] = maps[-1][1]
    return doc


def trace_npz(doc: dict[str, Any]) -> bytes:
    """The same trace in epkit's NPZ layout (``load[T, L, P]``, ``physical_to_logical[T, L, P]``, ``step``)."""
    import io

    import numpy as np

    maps, current = [], doc["physical_to_logical"]
    for entry in doc["steps"]:
        current = entry.get("physical_to_logical", current)
        maps.append(current)
    num_layers = len(doc["physical_to_logical"])
    num_slots = len(doc["physical_to_logical"][0]) if num_layers else 0
    buf = io.BytesIO()
    np.savez_compressed(buf, load=np.array([e["load"] for e in doc["steps"]], dtype=np.int64).reshape(-1, num_layers, num_slots),
                        physical_to_logical=np.array(maps, dtype=np.int64).reshape(-1, num_layers, num_slots),
                        step=np.array([e["step"] for e in doc["steps"]], dtype=np.int64), kind=np.array("physical"),
                        num_logical_experts=np.array(int(doc["num_logical_experts"])), version=np.array(doc["version"]))
    return buf.getvalue()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators, yielding (index, item) as items arrive."""
    if len(streams) == 1:  # the usual single prompt: no extra task and queue per token
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # a client that left: the request is aborted now, not at garbage collection
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ApiKeyMiddleware:
    """``--api-key``: a bearer token on every ``/v1`` request (401 otherwise).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware relays a
    streamed body through an extra task and memory stream, which cost about a third of the API
    server's CPU per streamed token (py-spy, benchmarks/host_ceiling.py)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if auth != self.expected:
                body = ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')").body()
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(api: Api) -> FastAPI:
    """The FastAPI app: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions."""
    app = FastAPI(title="epkit serve")
    cfg = api.cfg

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        registry = api.metrics.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several API servers: the whole deployment's series
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/eplb/loads")
    async def eplb_loads(request: Request):
        """Per-step, per-physical-expert token counts of the last recorded steps (docs/eplb.md trace format)."""
        last = request.query_params.get("steps")
        fmt = request.query_params.get("format", "json")
        if last is not None and (not last.isdigit() or int(last) < 1):
            raise ApiError(400, f"steps={last!r} must be a positive integer", "steps")
        if fmt not in ("json", "npz"):
            raise ApiError(400, f"format={fmt!r}; allowed: json, npz", "format")
        if not cfg.enable_eplb:
            raise ApiError(404, "EPLB is not enabled on this deployment (start it with --enable-eplb)")
        doc = stitch_trace(await api.engine.eplb_dumps(), cfg.model_name, int(last) if last else None)
        if fmt == "npz":
            return Response(trace_npz(doc), media_type="application/octet-stream",
                            headers={"content-disposition": "attachment; filename=eplb_trace.npz"})
        return JSONResponse(doc)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "epkit",
                                            "root": cfg.model, "max_model_len": api.max_model_len}]}

    async def parse(request: Request, model_cls):
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
        api.check_model(parsed.model)
        api.log_ignored(parsed.unknown_fields())
        return parsed

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        rank = api.pinned_rank(request)
        top = req.engine_logprobs(cfg.max_logprobs, api.tok.vocab_size)
        raw_prompts = prompts_of(req)
        prompts = [api.encode(p) for p in raw_prompts]
        echo_only = req.echo and req.max_tokens == 0  # vLLM: only the prompt comes back
        params = [req.sampling_params(len(p), api.max_model_len, req.max_tokens, top, echo_only) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams, ranks = zip(*(api.stream(p, sp, req.stop_strings(), rank, f"{rid}-{i}")
                               for i, (p, sp) in enumerate(zip(prompts, params))))
        prompt_tokens = sum(len(p) for p in prompts)
        # echo: the prompt's text (token-id prompts decoded), empty with return_token_ids (the ids say it), as vLLM
        echo_texts = [("" if req.return_token_ids else p if isinstance(p, str) else api.tok.decode(p)) for p in raw_prompts]

        def shown(i: int, text: str, ids: list[int], entries: list, prompt_entries, first: bool):
            """(text, token ids, logprob entries) a choice shows: with echo, the prompt before the first output."""
            if not (req.echo and first):
                return text, ids, entries
            prompt_entries = list(prompt_entries or [None] * len(prompts[i]))
            if echo_only:
                return echo_texts[i], prompts[i], prompt_entries
            return echo_texts[i] + text, prompts[i] + ids, prompt_entries + entries

        def choice(i: int, text: str, reason: str | None, ids: list[int]) -> dict[str, Any]:
            out = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            if req.return_token_ids:
                out["token_ids"] = list(ids)
            return out

        def envelope(choices: list[dict[str, Any]], **extra) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name, "choices": choices,
                    **extra}

        headers = {"x-data-parallel-rank": ",".join(map(str, ranks)), "x-epkit-api-server": str(api.engine.server_index)}

        if req.stream:
            async def events():
                completion, offsets, started = 0, [0] * len(prompts), [False] * len(prompts)
                async for i, (text, out, reason) in _merge(streams):
                    ids = list(out.new_token_ids)
                    completion += len(ids)
                    text_shown, ids_shown, entries = shown(i, text, ids, list(out.logprobs or ()), out.prompt_logprobs,
                                                           not started[i])
                    c = choice(i, text_shown, reason, ids)
                    if req.return_token_ids and not started[i]:
                        c["prompt_token_ids"] = prompts[i]
                    started[i] = True
                    if req.logprobs is not None:
                        c["logprobs"], offsets[i] = completion_logprobs(api.tok, ids_shown, entries, req.logprobs, offsets[i])
                    payload = envelope([c])
                    if req.include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
                if req.include_usage:
                    yield _sse(envelope([], usage=_usage(prompt_tokens, completion)))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        n = len(prompts)
        texts, reasons, token_ids = [""] * n, [None] * n, [[] for _ in prompts]
        entries, prompt_entries = [[] for _ in prompts], [None] * n
        async for i, (text, out, reason) in _merge(streams):
            texts[i] += text
            reasons[i] = reason or reasons[i]
            token_ids[i].extend(out.new_token_ids)
            entries[i].extend(out.logprobs or ())
            if out.prompt_logprobs is not None:
                prompt_entries[i] = list(out.prompt_logprobs)
        choices = []
        for i in range(n):
            text_shown, ids_shown, lps = shown(i, texts[i], token_ids[i], entries[i], prompt_entries[i], True)
            c = choice(i, text_shown, reasons[i], token_ids[i])
            if req.logprobs is not None:
                c["logprobs"] = completion_logprobs(api.tok, ids_shown, lps, req.logprobs)[0]
            if req.prompt_logprobs is not None:
                c["prompt_logprobs"] = prompt_logprobs_json(api.tok, prompt_entries[i] or [])
            if req.return_token_ids:
                c["prompt_token_ids"] = prompts[i]
            choices.append(c)
        completion = sum(len(ids) for ids in token_ids)
        return JSONResponse(envelope(choices, usage=_usage(prompt_tokens, completion)), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        pinned = api.pinned_rank(request)
        top = req.engine_logprobs(cfg.max_logprobs, api.tok.vocab_size)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = api.tok.encode(api.tok.apply_chat_template(messages, req.add_generation_prompt), add_special_tokens=False)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(len(prompt), api.max_model_len, requested, top)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream, rank = api.stream(prompt, params, req.stop_strings(), pinned, rid)
        headers = {"x-data-parallel-rank": str(rank), "x-epkit-api-server": str(api.engine.server_index)}
        role = "assistant" if req.add_generation_prompt else messages[-1]["role"]  # vLLM's response role
        echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == role else ""  # vLLM's chat echo

        def chunk(delta: dict[str, Any], reason: str | None, logprobs=None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

        if req.stream:
            async def events():
                completion = 0
                first = chunk({"role": role, "content": ""}, None)
                if req.return_token_ids:
                    first["prompt_token_ids"] = prompt
                yield _sse(first)
                if echo:
                    yield _sse(chunk({"content": echo}, None))
                async for text, out, reason in stream:
                    completion += len(out.new_token_ids)
                    lp = chat_logprobs(api.tok, out.new_token_ids, out.logprobs, top) if req.logprobs else None
                    c = chunk({"content": text} if text else {}, reason, lp)
                    if req.return_token_ids:
                        c["choices"][0]["token_ids"] = list(out.new_token_ids)
                    yield _sse(c)
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                                "choices": [], "usage": _usage(len(prompt), completion)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        text, reason, token_ids, entries, prompt_entries = echo, None, [], [], None
        async for delta, out, r in stream:
            text, reason = text + delta, r or reason
            token_ids.extend(out.new_token_ids)
            entries.extend(out.logprobs or ())
            if out.prompt_logprobs is not None:
                prompt_entries = list(out.prompt_logprobs)
        choice = {"index": 0, "message": {"role": role, "content": text},
                  "logprobs": chat_logprobs(api.tok, token_ids, entries, top) if req.logprobs else None,
                  "finish_reason": reason}
        body = {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [choice], "usage": _usage(len(prompt), len(token_ids))}
        if req.return_token_ids:
            choice["token_ids"] = token_ids
            body["prompt_token_ids"] = prompt
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(api.tok, prompt_entries or [])
        return JSONResponse(body, headers=headers)

    return app


def run_api_server(cfg: EngineConfig, server_index: int) -> None:
    """Process entry point of API server ``server_index``: connect to every core, then serve HTTP."""
    import uvicorn

    from epkit.engine.core import connect_store, set_parent_death_signal
    from epkit.engine.model import model_config_of

    set_parent_death_signal()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [ApiServer_{server_index}] %(levelname)s %(message)s")
    failure: list[str] = []
    server: uvicorn.Server | None = None
    try:
        model_config, model_dir = model_config_of(cfg)
        tokenizer = load_tokenizer(cfg.tokenizer, model_config, model_dir)
        max_model_len = cfg.max_model_len or int(model_config.get("max_position_embeddings") or 4096)
        store = connect_store(cfg, False, cfg.startup_timeout_s)

        def core_lost(message: str) -> None:
            failure.append(message)
            log.error("%s; shutting the API server down", message)
            if server is not None:
                server.should_exit = True
            else:
                os._exit(1)

        engine = EngineClient(cfg, store, server_index, core_lost)
        metrics = Metrics(cfg.model_name, cfg.data_parallel_size, server_index)
        engine.on_stats = metrics.set_load
        engine.on_eplb_stats = metrics.set_eplb
        app = build_app(Api(cfg, engine, tokenizer, max_model_len, metrics))
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if cfg.api_server_count > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((cfg.host, cfg.port))
        config = uvicorn.Config(app, log_level=cfg.uvicorn_log_level, timeout_graceful_shutdown=2, access_log=False)
        server = uvicorn.Server(config)
    except Exception as exc:
        log.error("API server %d failed to start: %s", server_index, exc)
        os._exit(1)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            log.info("epkit serve ready: http://%s:%d/v1 (model %s, dp=%d, ep=%d, all2all %s, api server %d/%d)",
                     cfg.host, sock.getsockname()[1], cfg.model_name, cfg.data_parallel_size, cfg.ep_size,
                     cfg.all2all_backend if cfg.ep_size > 1 else "none", server_index + 1, cfg.api_server_count)
        await task

    run = asyncio.run
    try:  # uvloop where installed (as uvicorn's loop="auto" would pick): less CPU per streamed token
        import uvloop

        run = getattr(uvloop, "run", asyncio.run)
    except ImportError:
        pass
    run(serve())
    engine.close()
    os._exit(1 if failure else 0)
