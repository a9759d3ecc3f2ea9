"""One request through a prefill and a decode instance (vLLM's ``kv_transfer_params`` protocol, docs/proxy.md).

1. prefill: the client's body with ``max_tokens: 1`` (chat: ``max_completion_tokens: 1`` too), ``stream: false``,
   no ``stream_options`` / ``min_tokens`` / ``min_completion_tokens`` (as vLLM's own proxies), and
   ``kv_transfer_params: {do_remote_decode: true, …nulls}``, under ``X-Request-Id``; a connection error or 5xx
   moves on to the next prefill instance, none left is a 502 naming each one tried and its error;
2. decode: the client's original body plus the prefill's returned ``kv_transfer_params``, same
   ``X-Request-Id``, streamed back as it comes; a decode that cannot be reached moves on to the next decode
   instance; a failed decode releases the prefill's held KV (``POST /epkit/kv/release``) and its status and body
   go back to the client;
3. the reply gets ``epkit_pd`` (the whole body, or the stream's last chunk before ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from epkit.proxy.config import ProxyConfig
from epkit.proxy.metrics import ProxyMetrics
from epkit.proxy.pool import Instance, Pool

log = logging.getLogger("epkit.proxy")

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = {COMPLETIONS: "completions", CHAT: "chat_completions"}
PREFILL_ONLY_KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}
NOT_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens")
RELEASE_PATH = "/epkit/kv/release"
VLLM_RELEASE_NOTE = ("vLLM's NixlConnector frees a prefill's held blocks itself once their lease runs out "
                     "(kv_connector_extra_config.kv_lease_duration, 30 s by default in vLLM 0.32.0; "
                     "VLLM_NIXL_ABORT_REQUEST_TIMEOUT in releases before the lease)")
SSE_SEPARATOR = b"\n\n"


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape, as vLLM and the built-in engine return it."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 502: "BadGateway"}
    return {"error": {"message": message, "type": kind.get(status, "Error"), "param": None, "code": status}}


def error_response(status: int, message: str, request_id: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status,
                        headers={"X-Request-Id": request_id} if request_id else None)


def prefill_body(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """What the prefill instance gets: one token, not streamed, asking to keep the KV for a remote decode."""
    out = {k: v for k, v in body.items() if k not in NOT_FOR_PREFILL}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_ONLY_KV))
    if chat:
        out["max_completion_tokens"] = 1
    return out


def describe(exc: Exception) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"


def short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def passthrough(status: int, content: bytes, headers: httpx.Headers, request_id: str | None = None) -> Response:
    """An instance's reply handed to the client as it came: status, body, content type."""
    return Response(content, status_code=status, media_type=headers.get("content-type", "application/json"),
                    headers={"X-Request-Id": request_id} if request_id else None)


@dataclass
class Prefilled:
    instance: Instance
    kv: dict[str, Any] | None  # what the prefill returned (None: an engine without a KV connector)
    ms: float


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body iterator when the response ends for any reason, a client that
    went away included, so the upstream decode stream is closed at once (the engine aborts the request then),
    not whenever the suspended generator happens to be collected."""

    def __init__(self, *args, on_close=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close  # an idempotent coroutine function: the stream's cleanup, also when the body
        # iterator never started (a generator closed before its first step does not run its ``finally``)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                if self.on_close is not None:
                    await self.on_close()


class Router:
    """The orchestration over the two pools; one per app (``build_app``)."""

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics):
        self.config, self.metrics = config, metrics
        gauge = metrics.in_flight

        def show(inst: Instance) -> None:
            gauge.labels(inst.role, inst.url).set(inst.in_flight)

        self.prefill = Pool("prefill", config.prefill, config.policy, show)
        self.decode = Pool("decode", config.decode, config.policy, show)
        metrics.declare("prefill", config.prefill)
        metrics.declare("decode", config.decode)
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        timeout = httpx.Timeout(None, connect=self.config.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        # trust_env=False: an HTTP(S)_PROXY in the environment must not sit between the router and its instances
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def upstream_headers(self, request: Request, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        if "authorization" in request.headers:
            headers["Authorization"] = request.headers["authorization"]
        return headers

    def count(self, path: str, outcome: str) -> None:
        self.metrics.requests.labels(ENDPOINTS[path], outcome).inc()

    async def read_body(self, request: Request, request_id: str) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(400, f"request body is not valid JSON: {exc}", request_id)
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", request_id)
        model = self.config.model
        if model is not None:
            if body.get("model") is None:
                body["model"] = model
            elif body["model"] != model:
                return error_response(404, f"The model `{body['model']}` does not exist.", request_id)
        return body

    async def handle(self, request: Request, path: str) -> Response:
        """One client request: prefill, then decode, as the module docstring says. A client that leaves before
        the reply starts (during the prefill, or a non-streamed decode) cancels the calls in progress, closing
        their connections, so the engines abort them (vLLM's API server does the same for its own requests)."""
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        body = await self.read_body(request, request_id)
        if isinstance(body, Response):
            self.count(path, "client_error")
            return body
        headers = self.upstream_headers(request, request_id)
        work = asyncio.ensure_future(self.route(path, body, headers, request_id))
        left = asyncio.ensure_future(_client_left(request))
        try:
            await asyncio.wait((work, left), return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self.count(path, "client_disconnected")
            log.info("request %s: the client left before the reply started; its calls were cancelled", request_id)
            return Response(status_code=499)  # nobody reads it: the connection is gone
        finally:
            for task in (work, left):
                task.cancel()

    async def route(self, path: str, body: dict, headers: dict, request_id: str) -> Response:
        pre = await self.run_prefill(path, body, headers, request_id)
        if isinstance(pre, Response):
            return pre
        try:
            return await self.run_decode(path, body, headers, request_id, pre)
        except asyncio.CancelledError:
            await self.release(pre, headers)  # the client left: no decode will pull this KV
            raise

    async def run_decode(self, path: str, body: dict, headers: dict, request_id: str, pre: Prefilled) -> Response:
        decode_body = dict(body)
        if pre.kv:
            decode_body["kv_transfer_params"] = pre.kv
        opened = await self.open_decode(path, decode_body, headers)
        if isinstance(opened, list):
            await self.release(pre, headers)
            self.count(path, "decode_unavailable")
            return error_response(502, f"the prefill on {pre.instance.url} finished but no decode instance could be "
                                  f"reached; tried {len(opened)}: {'; '.join(opened)}", request_id)
        inst, resp, started = opened
        pd = {"request_id": request_id, "prefill_url": pre.instance.url, "decode_url": inst.url,
              "prefill_ms": round(pre.ms, 3), "kv_transfer_ms": None, "kv_transfer_bytes": None}
        if resp.status_code != 200:
            content = await self._drain(inst, resp)
            await self.release(pre, headers)
            self.count(path, "decode_error")
            log.warning("request %s: decode on %s answered %d: %s", request_id, inst.url, resp.status_code,
                        short(content.decode(errors="replace")))
            return passthrough(resp.status_code, content, resp.headers, request_id)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            state = {"outcome": "client_disconnected", "events": 0, "closed": False}

            async def close() -> None:
                await self.end_stream(path, inst, resp, started, pd, pre, headers, state)

            relay = self.relay(inst, resp, started, pd, include_usage, state, close)
            return ClosingStreamingResponse(relay, media_type="text/event-stream", headers={"X-Request-Id": request_id},
                                            on_close=close)
        return await self.whole(path, inst, resp, started, pd, pre, headers)

    async def run_prefill(self, path: str, body: dict, headers: dict, request_id: str) -> Prefilled | Response:
        """The prefill call on the first instance the policy names that answers; a 4xx goes back to the client."""
        payload = prefill_body(body, chat=path == CHAT)
        failures: list[str] = []
        for inst in self.prefill.order():
            if failures:
                self.metrics.retries.labels("prefill").inc()
            self.metrics.routed.labels("prefill", inst.url).inc()
            self.prefill.enter(inst)
            started = time.perf_counter()
            try:
                resp = await self.client.post(inst.url + path, json=payload, headers=headers)
            except httpx.TransportError as exc:
                failures.append(f"{inst.url} ({describe(exc)})")
                self.metrics.upstream_errors.labels("prefill", inst.url).inc()
                continue
            finally:
                self.prefill.leave(inst)
            if resp.status_code >= 500:
                failures.append(f"{inst.url} (HTTP {resp.status_code}: {short(resp.text)})")
                self.metrics.upstream_errors.labels("prefill", inst.url).inc()
                continue
            if resp.status_code != 200:
                self.count(path, "client_error")
                return passthrough(resp.status_code, resp.content, resp.headers, request_id)
            seconds = time.perf_counter() - started
            self.metrics.prefill_seconds.labels(inst.url).observe(seconds)
            try:
                reply = resp.json()
            except ValueError as exc:
                failures.append(f"{inst.url} (reply is not JSON: {exc})")
                self.metrics.upstream_errors.labels("prefill", inst.url).inc()
                continue
            kv = reply.get("kv_transfer_params") if isinstance(reply, dict) else None
            if failures:
                log.warning("request %s: prefill served by %s after %s", request_id, inst.url, "; ".join(failures))
            if not kv:
                self.metrics.prefills_without_kv.labels(inst.url).inc()
                log.warning("request %s: prefill instance %s returned no kv_transfer_params (started without "
                            "--kv-transfer-config?): the decode recomputes the whole prompt", request_id, inst.url)
            return Prefilled(inst, kv or None, seconds * 1e3)
        self.count(path, "prefill_unavailable")
        message = f"no prefill instance could serve the request; tried {len(failures)}: {'; '.join(failures)}"
        log.warning("request %s: %s", request_id, message)
        return error_response(502, message, request_id)

    async def open_decode(self, path: str, body: dict, headers: dict) -> tuple[Instance, httpx.Response, float] | list[str]:
        """Send the decode request to the first instance the policy names that accepts it; returns (instance,
        response with its body still to read, start time), or each instance's error if none could be reached.
        The instance stays counted in flight until its reply has been read."""
        failures: list[str] = []
        for inst in self.decode.order():
            if failures:
                self.metrics.retries.labels("decode").inc()
            self.metrics.routed.labels("decode", inst.url).inc()
            self.decode.enter(inst)
            started = time.perf_counter()
            try:
                resp = await self.client.send(self.client.build_request("POST", inst.url + path, json=body,
                                                                        headers=headers), stream=True)
            except httpx.TransportError as exc:
                self.decode.leave(inst)
                failures.append(f"{inst.url} ({describe(exc)})")
                self.metrics.upstream_errors.labels("decode", inst.url).inc()
                continue
            except BaseException:  # cancelled (the client left): the call is over
                self.decode.leave(inst)
                raise
            return inst, resp, started
        return failures

    async def _drain(self, inst: Instance, resp: httpx.Response) -> bytes:
        try:
            return await resp.aread()
        except httpx.TransportError as exc:
            return json.dumps(error_body(502, f"decode instance {inst.url} broke off: {describe(exc)}")).encode()
        finally:
            await resp.aclose()
            self.decode.leave(inst)

    async def release(self, pre: Prefilled, headers: dict) -> None:
        """Ask the prefill instance to free the KV it holds for a decode that will not come."""
        if not pre.kv:
            return  # the prefill kept nothing (an engine without a KV connector)
        url = pre.instance.url
        try:
            resp = await self.client.post(url + RELEASE_PATH, json={"kv_transfer_params": pre.kv}, headers=headers,
                                          timeout=httpx.Timeout(30.0, connect=self.config.connect_timeout_s))
        except httpx.TransportError as exc:
            log.warning("could not release the prefill KV on %s: %s", url, describe(exc))
            self.metrics.kv_releases.labels(url, "failed").inc()
            return
        if resp.status_code < 300:
            outcome = "released"
        elif resp.status_code in (404, 405) and _route_absent(resp):
            outcome = "unsupported"
            log.info("%s has no %s (real vLLM): %s", url, RELEASE_PATH, VLLM_RELEASE_NOTE)
        elif resp.status_code == 404:
            outcome = "not_held"
            log.info("%s holds no KV for this request any more: %s", url, short(resp.text))
        else:
            outcome = "failed"
            log.warning("releasing the prefill KV on %s answered %d: %s", url, resp.status_code, short(resp.text))
        self.metrics.kv_releases.labels(url, outcome).inc()

    def pd_fields(self, pd: dict, report: Any, inst: Instance) -> dict:
        """``epkit_pd`` with the decode's ``epkit_kv_transfer`` report folded in (when it sent one)."""
        if isinstance(report, dict) and isinstance(report.get("ms"), (int, float)):
            pd = dict(pd, kv_transfer_ms=report["ms"], kv_transfer_bytes=report.get("bytes"))
            self.metrics.kv_transfer_ms.labels(inst.url).observe(report["ms"])
        return pd

    async def whole(self, path: str, inst: Instance, resp: httpx.Response, started: float, pd: dict,
                    pre: Prefilled, headers: dict) -> Response:
        """A non-streamed decode reply, with ``epkit_pd`` added."""
        try:
            content = await resp.aread()
        except httpx.TransportError as exc:
            await self.release(pre, headers)
            self.count(path, "decode_error")
            return error_response(502, f"decode instance {inst.url} broke off its reply: {describe(exc)}",
                                  pd["request_id"])
        finally:
            await resp.aclose()
            self.decode.leave(inst)
            self.metrics.decode_seconds.labels(inst.url).observe(time.perf_counter() - started)
        self.count(path, "ok")
        try:
            reply = json.loads(content)
        except ValueError:
            return passthrough(resp.status_code, content, resp.headers, pd["request_id"])
        if isinstance(reply, dict):
            reply["epkit_pd"] = self.pd_fields(pd, reply.get("epkit_kv_transfer"), inst)
        return JSONResponse(reply, headers={"X-Request-Id": pd["request_id"]})

    async def relay(self, inst: Instance, resp: httpx.Response, started: float, pd: dict, include_usage: bool,
                    state: dict, close) -> AsyncIterator[bytes]:
        """The decode's server-sent events as they come, whole events only, the last one with ``epkit_pd``;
        ``close`` (idempotent) ends the decode call however the stream ends."""
        pending, seen = b"", {}
        try:
            async for chunk in resp.aiter_bytes():
                pending += chunk
                while (end := pending.find(SSE_SEPARATOR)) >= 0:
                    event, pending = pending[:end + len(SSE_SEPARATOR)], pending[end + len(SSE_SEPARATOR):]
                    if state["events"] == 0:
                        self.metrics.decode_ttft_seconds.labels(inst.url).observe(time.perf_counter() - started)
                    state["events"] += 1
                    yield self.mark_last(event, pd, include_usage, inst, seen)
            if pending:
                yield pending
            state["outcome"] = "ok"
        except httpx.TransportError as exc:
            state["outcome"] = "decode_error"
            message = f"decode instance {inst.url} broke off its stream: {describe(exc)}"
            log.warning("request %s: %s", pd["request_id"], message)
            yield f"data: {json.dumps(error_body(502, message))}\n\ndata: [DONE]\n\n".encode()
        finally:
            with anyio.CancelScope(shield=True):
                await close()

    async def end_stream(self, path: str, inst: Instance, resp: httpx.Response, started: float, pd: dict,
                         pre: Prefilled, headers: dict, state: dict) -> None:
        """Close the decode stream once: the upstream response, the instance's in-flight count, the metrics, and
        the prefill's KV when no decode event came (a failed decode, or a client gone before the first event)."""
        if state["closed"]:
            return
        state["closed"] = True
        outcome = state["outcome"]
        await resp.aclose()
        if outcome != "ok" and state["events"] == 0:
            await self.release(pre, headers)
        self.decode.leave(inst)
        self.metrics.decode_seconds.labels(inst.url).observe(time.perf_counter() - started)
        self.count(path, outcome)
        if outcome == "client_disconnected":
            log.info("request %s: the client left mid-stream; closed the decode stream on %s",
                     pd["request_id"], inst.url)

    def mark_last(self, event: bytes, pd: dict, include_usage: bool, inst: Instance, seen: dict) -> bytes:
        """``event`` as it came, or with ``epkit_pd`` if it is the stream's last chunk before ``[DONE]``: the
        usage chunk (``choices: []``) when the client asked for usage, else the chunk with a finish reason.
        The decode's ``epkit_kv_transfer`` may come on an earlier chunk (the engine's finish chunk): ``seen``
        keeps it for the last one. A cheap byte test first: token deltas are passed on without parsing."""
        report = b'"epkit_kv_transfer"' in event
        if include_usage:
            maybe = b'"prompt_tokens"' in event
        else:
            reasons = event.count(b'"finish_reason"')
            maybe = reasons > event.count(b'"finish_reason":null') + event.count(b'"finish_reason": null')
        if not (maybe or report) or not event.startswith(b"data: {"):
            return event
        try:
            chunk = json.loads(event[len(b"data: "):])
        except ValueError:
            return event
        if isinstance(chunk.get("epkit_kv_transfer"), dict):
            seen["epkit_kv_transfer"] = chunk["epkit_kv_transfer"]
        choices = chunk.get("choices") or []
        last = (not choices and chunk.get("usage")) if include_usage else any(c.get("finish_reason") for c in choices)
        if not last:
            return event
        chunk["epkit_pd"] = self.pd_fields(pd, seen.get("epkit_kv_transfer"), inst)
        return f"data: {json.dumps(chunk)}\n\n".encode()


async def _client_left(request: Request) -> None:
    """Return when the client's connection is gone (the body was read already: the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _route_absent(resp: httpx.Response) -> bool:
    """The reply of a server with no such route (vLLM answers /epkit/kv/release so): FastAPI's
    ``{"detail": "Not Found"}``, the same as an OpenAI-style error, or 405."""
    if resp.status_code == 405:
        return True
    try:
        body = resp.json()
    except ValueError:
        return True
    if not isinstance(body, dict):
        return True
    error = body.get("error")
    return body.get("detail") == "Not Found" or (isinstance(error, dict) and error.get("message") == "Not Found")
