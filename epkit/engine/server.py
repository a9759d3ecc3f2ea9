"""The API server process: the FastAPI app composed of its routes, the API-key check, and uvicorn over the DP engine cores.

The routes live by concept: :mod:`epkit.engine.openai_api` (``/v1/*``), :mod:`epkit.engine.eplb_export`
(``/eplb/loads``), :mod:`epkit.engine.metrics` (what ``/metrics`` shows); :mod:`epkit.engine.streaming` holds
the SSE helpers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from epkit.engine.client import EngineClient
from epkit.engine.config import EngineConfig
from epkit.engine.eplb_export import add_eplb_routes
from epkit.engine.gc_heap import freeze_startup_heap
from epkit.engine.metrics import Metrics
from epkit.engine.openai_api import Api, add_openai_routes
from epkit.engine.protocol import ApiError
from epkit.engine.tokenizer import load_tokenizer

log = logging.getLogger("epkit.engine")


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


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _add_health_and_metrics(app: FastAPI, metrics: Metrics) -> None:
    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


def build_app(api: Api) -> FastAPI:
    """The FastAPI app: /health, /metrics, /eplb/loads, /v1/models, /v1/completions, /v1/chat/completions."""
    app = FastAPI(title="epkit serve")
    app.add_exception_handler(ApiError, _api_error)
    if api.cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=api.cfg.api_key)
    _add_health_and_metrics(app, api.metrics)
    add_eplb_routes(app, api)
    add_openai_routes(app, api)
    if api.cfg.kv_transfer_config is not None:
        _add_kv_release(app, api.cfg.kv_transfer_config["engine_id"])
    if (api.cfg.profiler_config or {}).get("profiler") == "torch":
        _add_profile_routes(app, api.engine)
    return app


def _add_profile_routes(app: FastAPI, engine: EngineClient) -> None:
    """vLLM's ``POST /start_profile`` (optional body: ``profile_prefix``, ``delay_iterations``, ``max_iterations``)
    and ``POST /stop_profile``; present only with ``--profiler-config``. 200 with every DP rank's answer (the trace
    files a stop wrote), 400 for a bad override."""

    async def ask(action: str, overrides: dict) -> JSONResponse:
        answers = await engine.profile(action, overrides)
        failed = [message for ok, message in answers if not ok]
        if failed:
            raise ApiError(400, failed[0])
        return JSONResponse({"ranks": [message for _, message in answers]})

    @app.post("/start_profile")
    async def start_profile(request: Request):
        body = await request.body()
        try:
            overrides = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"body must be a JSON object or empty: {exc}")
        if not isinstance(overrides, dict):
            raise ApiError(400, f"body must be a JSON object or empty, got {type(overrides).__name__}")
        keys = ("profile_prefix", "delay_iterations", "max_iterations")
        log.info("Starting profiler...")
        return await ask("start", {k: v for k, v in overrides.items() if k in keys and v is not None})

    @app.post("/stop_profile")
    async def stop_profile():
        log.info("Stopping profiler...")
        return await ask("stop", {})


def _add_kv_release(app: FastAPI, engine_id: str) -> None:
    """``POST /epkit/kv/release`` with ``{"kv_transfer_params": <a prefill's>}``: free the KV blocks this engine holds
    for them (a router calls it when the decode failed after the prefill): 200 with what was freed, 404 if none."""
    from epkit.engine.kv_transfer import rank_of_engine, release, side_channel_address

    @app.post("/epkit/kv/release")
    async def kv_release(request: Request):
        try:
            params = (await request.json())["kv_transfer_params"]
            rank = rank_of_engine(engine_id, params.get("remote_engine_id"))
            params["remote_host"], int(params["remote_port"]), params["remote_request_id"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ApiError(400, f"body must be {{\"kv_transfer_params\": {{remote_engine_id, remote_request_id, "
                                f"remote_host, remote_port, ...}}}} as a prefill returned them ({type(exc).__name__}: "
                                f"{exc})", "kv_transfer_params")
        if rank is None or int(params["remote_port"]) != side_channel_address(rank)[1]:
            raise ApiError(404, f"remote_engine_id={params.get('remote_engine_id')!r} at port {params['remote_port']} is "
                                f"not a side channel of this instance (engine {engine_id}_dp<rank>)", "kv_transfer_params")
        try:
            reply = await asyncio.to_thread(release, params)
        except OSError as exc:
            raise ApiError(502, f"the KV side channel at {params['remote_host']}:{params['remote_port']} did not "
                                f"answer: {exc}", "kv_transfer_params")
        if not reply.get("ok"):
            raise ApiError(404, str(reply.get("error")), "kv_transfer_params")
        return {"released": True, "engine_id": reply["engine_id"], "request_id": reply["request_id"],
                "blocks": reply["blocks"]}


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
        engine.on_kv_stats = metrics.set_kv_held
        app = build_app(Api(cfg, engine, tokenizer, max_model_len, metrics))
        sock = _bound_socket(cfg)
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
            freeze_startup_heap(f"API server {server_index}")
            log.info("epkit serve ready: http://%s:%d/v1 (model %s, dp=%d, ep=%d, all2all %s, api server %d/%d)",
                     cfg.host, sock.getsockname()[1], cfg.model_name, cfg.data_parallel_size, cfg.ep_size,
                     cfg.all2all_backend if cfg.ep_size > 1 else "none", server_index + 1, cfg.api_server_count)
        await task

    _event_loop_run()(serve())
    engine.close()
    os._exit(1 if failure else 0)


def _bound_socket(cfg: EngineConfig) -> socket.socket:
    """The listening socket at ``--host:--port``; shared by every API server (SO_REUSEPORT) when there are several."""
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if cfg.api_server_count > 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((cfg.host, cfg.port))
    return sock


def _event_loop_run():
    """uvloop's ``run`` where installed (as uvicorn's loop="auto" would pick: less CPU per streamed token), else asyncio's."""
    try:
        import uvloop

        return getattr(uvloop, "run", asyncio.run)
    except ImportError:
        return asyncio.run
