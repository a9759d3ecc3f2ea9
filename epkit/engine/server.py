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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from epkit.engine.client import EngineClient
from epkit.engine.config import EngineConfig
from epkit.engine.protocol import ApiError, ChatRequest, CompletionRequest, prompts_of
from epkit.engine.sequence import SamplingParams
from epkit.engine.tokenizer import ByteTokenizer

log = logging.getLogger("epkit.engine")

LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _gauge(*args, **kwargs) -> Gauge:
    """A gauge that every API server sets to the same value (from the engine cores' reports): with several
    servers (prometheus_client's multiprocess mode) the exposition shows the most recent value."""
    return Gauge(*args, multiprocess_mode="mostrecent", **kwargs)


class Metrics:
    """Prometheus metrics of the API servers (names follow vLLM's, prefix ``epkit:``).

    With several API servers (``--api-server-count``, by default one per DP rank as in vLLM)
    the launcher points ``PROMETHEUS_MULTIPROC_DIR`` at a shared folder: counters and histograms
    add up over the servers, gauges show the latest value, and any server's ``/metrics`` shows
    the whole deployment (vLLM does the same)."""

    def __init__(self, model: str, dp_size: int, server_index: int = 0):
        self.registry = CollectorRegistry()
        self.server_index = server_index
        r, labels = self.registry, ["model_name"]
        self.running = _gauge("epkit:num_requests_running", "Requests running, per DP rank", ["model_name", "dp_rank"], registry=r)
        self.waiting = _gauge("epkit:num_requests_waiting", "Requests waiting, per DP rank", ["model_name", "dp_rank"], registry=r)
        self.prompt_tokens = Counter("epkit:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("epkit:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("epkit:time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("epkit:inter_token_latency_seconds", "Inter-token latency", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("epkit:e2e_request_latency_seconds", "Request latency", labels, buckets=LATENCY_BUCKETS_S, registry=r)
        self.success = Counter("epkit:request_success", "Finished requests", ["model_name", "finished_reason"], registry=r)
        self.preemptions = Counter("epkit:num_preemptions", "Sequences preempted for KV space, per DP rank",
                                   ["model_name", "dp_rank"], registry=r)
        self._preempted = [0] * dp_size
        # EPLB (rank 0 reports; see docs/engine.md): the last measured step and the last rearrangement
        self.eplb_balancedness = _gauge("epkit:eplb_balancedness", "EPLB: mean / max tokens per EP rank (vLLM's measure) "
                                       "at the last logged step", labels, registry=r)
        self.eplb_avg_tokens = _gauge("epkit:eplb_avg_tokens", "EPLB: sum over MoE layers of the mean tokens per EP rank "
                                     "at the last logged step", labels, registry=r)
        self.eplb_max_tokens = _gauge("epkit:eplb_max_tokens", "EPLB: sum over MoE layers of the max tokens per EP rank "
                                     "at the last logged step", labels, registry=r)
        self.eplb_rank_tokens = _gauge("epkit:eplb_rank_tokens", "EPLB: (token, expert) pairs computed by each EP rank's "
                                      "slots, all MoE layers, at the last logged step", ["model_name", "dp_rank"], registry=r)
        self.eplb_rearrangements = _gauge("epkit:eplb_rearrangements", "EPLB: rearrangements so far", labels, registry=r)
        self.eplb_window_balancedness = _gauge("epkit:eplb_window_balancedness", "EPLB: balancedness of the last window "
                                              "under the old and the new placement", ["model_name", "placement"], registry=r)
        self.eplb_median_step = _gauge("epkit:eplb_median_step_seconds", "EPLB: rank 0's median step time between the last "
                                      "two rearrangements", labels, registry=r)
        self.model = model
        # the per-token series, bound once (``labels()`` is a dict lookup under a lock on every call)
        self.ttft_m, self.itl_m, self.e2e_m = (h.labels(model) for h in (self.ttft, self.itl, self.e2e))
        self.prompt_m, self.generation_m = self.prompt_tokens.labels(model), self.generation_tokens.labels(model)
        for rank in range(dp_size):
            self.set_load(rank, 0, 0)

    def set_eplb(self, stats: dict) -> None:
        m = self.model
        if "balancedness" in stats:
            self.eplb_balancedness.labels(m).set(stats["balancedness"])
            self.eplb_avg_tokens.labels(m).set(stats["avg_tokens"])
            self.eplb_max_tokens.labels(m).set(stats["max_tokens"])
            for rank, tokens in enumerate(stats.get("rank_tokens") or []):
                self.eplb_rank_tokens.labels(m, str(rank)).set(tokens)
        self.eplb_rearrangements.labels(m).set(stats.get("rearrangements", 0))
        if "window_balancedness_before" in stats:
            self.eplb_window_balancedness.labels(m, "before").set(stats["window_balancedness_before"])
            self.eplb_window_balancedness.labels(m, "after").set(stats["window_balancedness_after"])
            if stats.get("median_step_ms") == stats.get("median_step_ms"):  # not NaN
                self.eplb_median_step.labels(m).set(stats["median_step_ms"] / 1e3)

    def set_load(self, rank: int, running: int, waiting: int, preemptions: int = 0) -> None:
        self.running.labels(self.model, str(rank)).set(running)
        self.waiting.labels(self.model, str(rank)).set(waiting)
        if preemptions > self._preempted[rank]:
            if self.server_index == 0:  # every server hears every core: one of them counts
                self.preemptions.labels(self.model, str(rank)).inc(preemptions - self._preempted[rank])
            self._preempted[rank] = preemptions


class StopChecker:
    """Turns token deltas into text deltas, cutting at the first stop string (held back until sure)."""

    def __init__(self, tokenizer: ByteTokenizer, stops: list[str]):
        self.decoder, self.stops = tokenizer.stream_decoder(), stops
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

    def __init__(self, cfg: EngineConfig, engine: EngineClient, tokenizer: ByteTokenizer, max_model_len: int, metrics: Metrics):
        self.cfg, self.engine, self.tok, self.max_model_len, self.metrics = cfg, engine, tokenizer, max_model_len, metrics

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

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary 0..{self.tok.vocab_size - 1}", "prompt")
        return prompt

    def stream(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], pinned: int | None):
        """(stream of one request, the DP rank it goes to); the rank's count is released even if never streamed."""
        ticket = self.engine.reserve(pinned)
        stream = self.run(prompt_ids, params, stops, ticket)
        weakref.finalize(stream, ticket.release)
        return stream, ticket.rank

    async def run(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], ticket) -> AsyncIterator[tuple[str, tuple[int, ...], str | None]]:
        """Yield (text delta, its token ids, finish reason or None) for one request."""
        checker = StopChecker(self.tok, stops)
        start = last = time.perf_counter()
        first = True
        metrics = self.metrics
        metrics.prompt_m.inc(len(prompt_ids))
        gen = self.engine.generate(prompt_ids, params, ticket)
        try:
            async for out in gen:
                now = time.perf_counter()
                (metrics.ttft_m if first else metrics.itl_m).observe(now - last)
                first, last = False, now
                metrics.generation_m.inc(len(out.new_token_ids))
                delta = checker.push(out.new_token_ids, final=out.finish_reason is not None)
                reason = "stop" if checker.stopped else out.finish_reason
                if reason is not None:
                    metrics.e2e_m.observe(now - start)
                    metrics.success.labels(metrics.model, reason).inc()
                yield delta, out.new_token_ids, reason
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
        return parsed

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        rank = api.pinned_rank(request)
        prompts = [api.encode(p) for p in prompts_of(req)]
        params = [req.sampling_params(len(p), api.max_model_len, req.max_tokens) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams, ranks = zip(*(api.stream(p, sp, req.stop_strings(), rank) for p, sp in zip(prompts, params)))
        prompt_tokens = sum(len(p) for p in prompts)

        def chunk(i: int, text: str, reason: str | None, ids: list[int]) -> dict[str, Any]:
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            if req.return_token_ids:
                choice["token_ids"] = list(ids)
            return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name, "choices": [choice]}

        headers = {"x-data-parallel-rank": ",".join(map(str, ranks)), "x-epkit-api-server": str(api.engine.server_index)}

        if req.stream:
            async def events():
                completion = 0
                async for i, (text, ids, reason) in _merge(streams):
                    completion += len(ids)
                    payload = chunk(i, text, reason, ids)
                    if req.include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
                if req.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                                "choices": [], "usage": _usage(prompt_tokens, completion)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        texts, reasons, token_ids = [""] * len(prompts), [None] * len(prompts), [[] for _ in prompts]
        async for i, (text, ids, reason) in _merge(streams):
            texts[i] += text
            reasons[i] = reason or reasons[i]
            token_ids[i].extend(ids)
        choices = [chunk(i, t, r, ids)["choices"][0] for i, (t, r, ids) in enumerate(zip(texts, reasons, token_ids))]
        completion = sum(len(ids) for ids in token_ids)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                             "choices": choices, "usage": _usage(prompt_tokens, completion)}, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        pinned = api.pinned_rank(request)
        prompt = api.tok.encode(api.tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages]))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = req.sampling_params(len(prompt), api.max_model_len, requested)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream, rank = api.stream(prompt, params, req.stop_strings(), pinned)
        headers = {"x-data-parallel-rank": str(rank), "x-epkit-api-server": str(api.engine.server_index)}

        def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if req.stream:
            async def events():
                completion = 0
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                async for text, ids, reason in stream:
                    completion += len(ids)
                    yield _sse(chunk({"content": text} if text else {}, reason))
                if req.include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                                "choices": [], "usage": _usage(len(prompt), completion)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        text, reason, token_ids = "", None, []
        async for delta, ids, r in stream:
            text, reason = text + delta, r or reason
            token_ids.extend(ids)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                             "choices": [choice], "usage": _usage(len(prompt), len(token_ids))}, headers=headers)

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
        tokenizer = ByteTokenizer(model_config, model_dir)
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
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, access_log=False)
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
