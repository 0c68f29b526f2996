"""`create_app(settings)`: the FastAPI application (served by uvicorn via `twostage serve`).

Models, store and batchers are built in the lifespan (or handed in already loaded by the
CLI) and reached through `deps.py`; there are no module-level singletons. Errors meant for
users become 4xx/503 JSON with a `detail` message; anything else is logged with the
request id and answered 500 without internals.
"""

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from twostage.api.http.errors import answer
from twostage.api.http.routes import compat, documents, feedback, ops, quality, retrain, search, tei
from twostage.api.runtime.interrupts import graceful
from twostage.api.runtime.service import Service
from twostage.api.settings import Settings
from twostage.retrieval.core.errors import TwostageError
from twostage.retrieval.models.source import shown_text

STATIC = Path(__file__).resolve().parent / "static"
access_log = logging.getLogger("twostage.access")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def create_app(settings: Settings, service: Service | None = None) -> FastAPI:
    """The app; `service` may be passed in already started (the CLI loads models first)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = app.state.service
        if not own.ready:
            await run_in_threadpool(own.start)
        # uvicorn handles SIGINT from here (it installed its handlers before the lifespan began):
        # a drain, not the immediate exit a command gets while it loads (`interrupts`)
        graceful()
        try:
            yield
        finally:
            await run_in_threadpool(own.close)  # after uvicorn has drained in-flight requests

    app = FastAPI(
        title="twostage",
        summary="Two-stage retrieval (Qwen3 embedder + Qdrant + Qwen3 reranker) for RAG chatbots",
        lifespan=lifespan,
    )
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(documents.openapi_schemas())
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.service = service or Service(settings)
    app.state.settings = settings
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["Server-Timing", "X-Request-ID"],
        )
    app.add_middleware(
        BodyLimit, max_bytes=settings.api.max_body_bytes, upload_bytes=settings.api.max_upload_bytes
    )
    app.add_middleware(RequestLog, service=app.state.service)
    _add_error_handlers(app)
    app.include_router(search.router)
    app.include_router(feedback.router)
    app.include_router(compat.router)
    app.include_router(tei.router)
    app.include_router(documents.router)
    app.include_router(retrain.router)
    app.include_router(ops.router)
    app.include_router(quality.router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TwostageError)
    async def twostage_error(request: Request, exc: TwostageError) -> JSONResponse:
        status, headers = answer(exc)
        # no server path reaches a client: a model's folder is named by its last component
        return _error(
            status, shown_text(str(exc), request.app.state.service.settings.data_dir), headers or None
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request.scope.get("request_id", "-")
        logging.getLogger("twostage.api").exception("unhandled error in request %s", request_id)
        return _error(500, f"internal error (request id {request_id})")


class BodyLimit:
    """413 for bodies over `max_bytes`, by Content-Length or while streaming a chunked body.

    File uploads (multipart bodies of `POST /v1/documents`) have their own, larger limit.
    """

    UPLOADS = ("/v1/documents",)

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int, upload_bytes: int
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        upload = scope["path"] in self.UPLOADS and headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.upload_bytes if upload else self.max_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reject(send, limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reject(send, limit)


class _TooLarge(Exception):
    pass


async def _reject(send: Send, max_bytes: int) -> None:
    body = json.dumps({"detail": f"request body larger than {max_bytes} bytes"}).encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """Request id (X-Request-ID in and out), one JSON log line and metrics per request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = incoming if incoming.isprintable() and incoming else uuid.uuid4().hex
        scope["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics = self.service.metrics
            metrics.requests.labels(route, scope["method"], str(status)).inc()
            metrics.latency.labels(route).observe(elapsed)
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "ms": round(elapsed * 1000, 2),
                    }
                )
            )
