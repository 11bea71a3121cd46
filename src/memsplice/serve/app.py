"""The HTTP face of `MemoryService`: an OpenAI-compatible chat API, the memory API, health, metrics, inspector.

    app = create_app(MemoryService(memory, MemoryStore(url), ServeConfig()))

Routes (all under /v1 need an API key when auth is on):
    POST /v1/chat/completions                 OpenAI schema, streaming (SSE) or not; scope from `user` or header
    GET  /v1/models, /v1/models/{model}
    GET  /v1/memory/scopes                    scopes this key may touch
    GET  /v1/memory/scopes/{scope}            summary: turns, memory stats, gate, rows per table
    POST /v1/memory/scopes/{scope}/turns      add turns {"turns": [{"role", "content"}]}
    POST /v1/memory/scopes/{scope}/text       add text {"text"}
    GET  /v1/memory/scopes/{scope}/spans      transcript with LRU state (resident, last_read)
    GET  /v1/memory/scopes/{scope}/slots      per-slot gate and latent norm
    GET  /v1/memory/scopes/{scope}/gate       gate statistics
    GET  /v1/memory/scopes/{scope}/events     fallback events
    GET  /v1/memory/scopes/{scope}/export     the whole scope as JSON
    POST /v1/memory/scopes/{scope}/import     load an export (?replace=true to overwrite)
    DELETE /v1/memory/scopes/{scope}          delete the scope from every store
    GET  /v1/memory/training                  online learning status and curves
    GET  /healthz, /metrics, /inspector

Guarantees: every error is a JSON body {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status; bodies
over `max_body_bytes` are refused with 413 before they are read whole; a request is authenticated, parsed and
checked (model, scope, limits) before anything is written, so a refused request leaves the store unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..store import ApiKey
from .auth import Authenticator
from .schemas import (
    AddTextRequest,
    AddTurnsRequest,
    APIError,
    ChatCompletionRequest,
    chat_chunk,
    chat_completion,
    completion_id,
    parse_body,
    usage,
)
from .service import MemoryService

logger = logging.getLogger("memsplice.serve")


# -- middleware --------------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: from Content-Length before reading, or while a chunked body is read (the
    route reading it then fails with the 413 APIError, before it acted on anything)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_error(send, self._error())
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)


class ObserveMiddleware:
    """Per request: a request id (echoed as x-request-id), Prometheus counters and latency, one structured log line.
    Routes are labelled by their template, never by the concrete path."""

    def __init__(self, app, service: MemoryService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            dt = time.perf_counter() - t0
            metrics = self.service.metrics
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.latency.labels(scope["method"], route).observe(dt)
            metrics.queue_depth.set(self.service.worker.pending)
            logger.info(
                "%s %s %d",
                scope["method"],
                route,
                status,
                extra={
                    "event": "request",
                    "request_id": rid,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "ms": round(dt * 1000, 2),
                },
            )


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": err.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# -- the app -----------------------------------------------------------------------------------------------------
def create_app(service: MemoryService) -> FastAPI:
    config = service.config
    auth = Authenticator(service.store, enabled=config.auth)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        logger.info(
            "serving %s (memory weights %s) from %s",
            service.model_id,
            service.weights,
            service.store,
            extra={"event": "startup"},
        )
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish (graceful_timeout_s); now finish their model jobs and writes.
            await service.drain(timeout=config.graceful_timeout_s)
            await asyncio.to_thread(service.close)
            logger.info("shut down cleanly", extra={"event": "shutdown"})

    app = FastAPI(title="memsplice", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    metrics = service.metrics

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(ObserveMiddleware, service=service)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        return _error_response(APIError(400, f"{param}: {err.get('msg')}", code="invalid_value", param=param))

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        logger.exception("unhandled error", exc_info=exc)
        return _error_response(
            APIError(
                500,
                "internal server error; the request was not completed",
                type="server_error",
                code="internal_error",
            )
        )

    async def key_of(request: Request) -> ApiKey:
        return await auth.authenticate(request.headers.get("authorization"))

    async def scoped(request: Request, scope: str) -> str:
        return auth.check_scope(await key_of(request), scope)

    # -- health, metrics, inspector ------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(service.store.ping), timeout=5)
            store = "ok" if ok else "error"
        except Exception as e:
            store = f"error: {type(e).__name__}"
        body = {
            "status": "ok" if store == "ok" else "degraded",
            "model": service.model_id,
            "store": store,
            "memory_weights": service.weights,
            "inference_queue": service.worker.pending,
            "online_learning": service.online is not None,
            "uptime_s": round(time.time() - service.started_at, 1),
        }
        return JSONResponse(body, status_code=200 if store == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.queue_depth.set(service.worker.pending)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/inspector", response_class=HTMLResponse)
    async def inspector():
        return HTMLResponse(resources.files("memsplice.serve").joinpath("static/inspector.html").read_text())

    # -- models --------------------------------------------------------------------------------------------------
    def model_card() -> dict:
        return {
            "id": service.model_id,
            "object": "model",
            "created": int(service.started_at),
            "owned_by": "memsplice",
            "memsplice": {
                "reasoner": service.reasoner.name,
                "memory_slots": service.memory.config.num_slots,
                "memory_weights": service.weights,
            },
        }

    @app.get("/v1/models")
    async def list_models(request: Request):
        await key_of(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str, request: Request):
        await key_of(request)
        if model != service.model_id:
            raise APIError(
                404,
                f"the model {model!r} does not exist; this server serves {service.model_id!r}",
                code="model_not_found",
                param="model",
            )
        return model_card()

    # -- chat ----------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = await key_of(request)
        req = parse_body(ChatCompletionRequest, await request.body())
        if req.model != service.model_id:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist; this server serves {service.model_id!r}",
                code="model_not_found",
                param="model",
            )
        header = request.headers.get(config.scope_header)
        if req.user and header and req.user != header:
            raise APIError(
                400,
                f"the user field ({req.user!r}) and the {config.scope_header} header ({header!r}) "
                "name different scopes",
                code="conflicting_scope",
                param="user",
            )
        scope = req.user or header
        if scope is not None:
            auth.check_scope(key, scope)
        service.generation_params(req)  # refuse a bad max_tokens before streaming starts
        cid = completion_id()
        if not req.stream:
            result = await service.chat(req, scope)
            extra = result.memory
            return chat_completion(
                cid,
                service.model_id,
                result.text,
                result.finish_reason,
                usage(result.prompt_tokens, result.completion_tokens),
                extra,
            )
        return await _stream(service, req, scope, cid)

    # -- memory API ----------------------------------------------------------------------------------------------
    @app.get("/v1/memory/scopes")
    async def list_scopes(request: Request, limit: int = 1000, offset: int = 0):
        key = await key_of(request)
        rows = await asyncio.to_thread(
            service.store.list_scopes, max(1, min(limit, 10_000)), max(0, offset), key.scopes
        )
        return {"object": "list", "data": rows}

    @app.get("/v1/memory/scopes/{scope}")
    async def scope_summary(scope: str, request: Request):
        await scoped(request, scope)
        summary = await service.scope_summary(scope)
        if summary is None:
            raise APIError(404, f"scope {scope!r} does not exist", code="scope_not_found", param="scope")
        return summary

    @app.post("/v1/memory/scopes/{scope}/turns")
    async def add_turns(scope: str, request: Request):
        await scoped(request, scope)
        body = parse_body(AddTurnsRequest, await request.body())
        return await service.add_turns(scope, [(t.role, t.content) for t in body.turns])

    @app.post("/v1/memory/scopes/{scope}/text")
    async def add_text(scope: str, request: Request):
        await scoped(request, scope)
        body = parse_body(AddTextRequest, await request.body())
        return await service.add_turns(scope, [(body.role, body.text)])

    @app.get("/v1/memory/scopes/{scope}/spans")
    async def list_spans(scope: str, request: Request, limit: int = 100, offset: int = 0):
        await scoped(request, scope)
        return {
            "object": "list",
            "scope": scope,
            "data": await service.spans(scope, max(1, min(limit, 10_000)), max(0, offset)),
        }

    @app.get("/v1/memory/scopes/{scope}/slots")
    async def list_slots(scope: str, request: Request):
        await scoped(request, scope)
        return await service.slots(scope)

    @app.get("/v1/memory/scopes/{scope}/gate")
    async def gate_stats(scope: str, request: Request):
        await scoped(request, scope)
        return await service.gate(scope)

    @app.get("/v1/memory/scopes/{scope}/events")
    async def list_events(scope: str, request: Request, limit: int = 100):
        await scoped(request, scope)
        return {
            "object": "list",
            "scope": scope,
            "data": await service.events(scope, max(1, min(limit, 10_000))),
        }

    @app.get("/v1/memory/scopes/{scope}/export")
    async def export_scope(scope: str, request: Request):
        await scoped(request, scope)
        data = await service.export_scope(scope)
        if data is None:
            raise APIError(404, f"scope {scope!r} does not exist", code="scope_not_found", param="scope")
        return data

    @app.post("/v1/memory/scopes/{scope}/import")
    async def import_scope(scope: str, request: Request, replace: bool = False):
        await scoped(request, scope)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        return await service.import_scope(scope, data, replace)

    @app.delete("/v1/memory/scopes/{scope}")
    async def delete_scope(scope: str, request: Request):
        await scoped(request, scope)
        return await service.delete_scope(scope)

    @app.get("/v1/memory/training")
    async def training(request: Request):
        await key_of(request)
        return await asyncio.to_thread(service.training)

    return app


async def _stream(service: MemoryService, req: ChatCompletionRequest, scope: str | None, cid: str):
    """Start the chat as a task; answer with a JSON error if it fails before its first token, else stream SSE."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def sink(delta: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, delta)

    task = asyncio.create_task(service.chat(req, scope, sink=sink, cancel=cancel))
    service.track(task)
    first = asyncio.create_task(queue.get())
    await asyncio.wait({first, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done() and not first.done():
        first.cancel()
        task.result()  # raises the APIError (bad prompt, ...) as a plain JSON response
        first = None
    created = int(time.time())
    model = service.model_id
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def events():
        pending = first
        try:
            yield sse(chat_chunk(cid, model, created, {"role": "assistant", "content": ""}))
            while True:
                if pending is None:
                    pending = asyncio.create_task(queue.get())
                await asyncio.wait({pending, task}, return_when=asyncio.FIRST_COMPLETED)
                if pending.done():
                    yield sse(chat_chunk(cid, model, created, {"content": pending.result()}))
                    pending = None
                    continue
                break
            pending.cancel()
            pending = None
            while not queue.empty():
                yield sse(chat_chunk(cid, model, created, {"content": queue.get_nowait()}))
            try:
                result = task.result()
            except APIError as e:
                yield sse(e.body())
                return
            except Exception:
                logger.exception("chat stream failed")
                yield sse(
                    APIError(500, "internal server error", type="server_error", code="internal_error").body()
                )
                return
            extra = result.memory
            yield sse(chat_chunk(cid, model, created, {}, finish_reason=result.finish_reason, extra=extra))
            if include_usage:
                yield sse(
                    chat_chunk(
                        cid,
                        model,
                        created,
                        {},
                        usage=usage(result.prompt_tokens, result.completion_tokens),
                        choices=False,
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            if pending is not None:
                pending.cancel()
            if not task.done():
                cancel.set()  # the client went away: stop generating; the exchange is not written to memory

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
