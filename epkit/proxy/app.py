"""The router's FastAPI app: the OpenAI routes over :class:`~epkit.proxy.flow.Router`, ``/health``, ``/metrics``
and the ``--api-key`` check."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from epkit.proxy.config import ProxyConfig
from epkit.proxy.flow import CHAT, COMPLETIONS, Router, describe, error_body, error_response, passthrough, short
from epkit.proxy.metrics import ProxyMetrics

log = logging.getLogger("epkit.proxy")
HEALTH_TIMEOUT_S = 5.0


class ApiKeyMiddleware:
    """``--api-key``: ``Authorization: Bearer KEY`` on every ``/v1`` request, else 401 (vLLM's rule: ``/health``
    and ``/metrics`` stay open). Plain ASGI, so streamed replies pass through untouched."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope.get("method") != "OPTIONS":
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            given = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self.expected):
                body = error_body(401, "Invalid or missing API key (send 'Authorization: Bearer <key>')")
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _probe(client: httpx.AsyncClient, url: str) -> str:
    try:
        resp = await client.get(url + "/health", timeout=HEALTH_TIMEOUT_S)
    except httpx.TransportError as exc:
        return describe(exc)
    return "ok" if resp.status_code == 200 else f"HTTP {resp.status_code}"


def _add_health_and_metrics(app: FastAPI, router: Router, metrics: ProxyMetrics) -> None:
    @app.get("/health")
    async def health():
        """200 when at least one prefill and one decode instance answer their /health; 503 otherwise."""
        pools = (router.prefill, router.decode)
        urls = [(pool.role, inst.url) for pool in pools for inst in pool.instances]
        states = await asyncio.gather(*(_probe(router.client, url) for _, url in urls))
        report: dict[str, dict[str, str]] = {"prefill": {}, "decode": {}}
        for (role, url), state in zip(urls, states):
            report[role][url] = state
        ok = all(any(s == "ok" for s in report[role].values()) for role in report)
        return JSONResponse(report, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)


def _add_openai_routes(app: FastAPI, router: Router) -> None:
    @app.get("/v1/models")
    async def models(request: Request):
        """The first decode instance that answers (the model the replies come from)."""
        headers = {k: v for k, v in request.headers.items() if k == "authorization"}
        failures = []
        for inst in router.decode.instances:
            try:
                resp = await router.client.get(inst.url + "/v1/models", headers=headers)
            except httpx.TransportError as exc:
                failures.append(f"{inst.url} ({describe(exc)})")
                continue
            if resp.status_code >= 500:
                failures.append(f"{inst.url} (HTTP {resp.status_code}: {short(resp.text)})")
                continue
            return passthrough(resp.status_code, resp.content, resp.headers)
        return error_response(502, f"no decode instance answered /v1/models; tried {len(failures)}: "
                              + "; ".join(failures))

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        return await router.handle(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await router.handle(request, CHAT)


def build_app(config: ProxyConfig) -> FastAPI:
    """The router as a FastAPI app (run it with uvicorn; its lifespan opens and closes the HTTP client):
    ``/v1/completions``, ``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/health``, ``/metrics``.
    ``app.state.router`` and ``app.state.metrics`` are the orchestration and its Prometheus series."""
    metrics = ProxyMetrics()
    router = Router(config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        log.info("epkit proxy ready on %s: prefill %s, decode %s, policy %s%s", config.url,
                 " ".join(config.prefill), " ".join(config.decode), config.policy,
                 ", API key required" if config.api_key else "")
        try:
            yield
        finally:
            await router.close()

    app = FastAPI(title="epkit proxy", lifespan=lifespan)
    app.state.router, app.state.metrics, app.state.config = router, metrics, config
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, key=config.api_key)
    _add_health_and_metrics(app, router, metrics)
    _add_openai_routes(app, router)
    return app
