"""ASGI middleware: request ids, the access log and metrics around every request; the body limit;
OpenTelemetry's ASGI middleware for traces.

Written as plain ASGI (not ``BaseHTTPMiddleware``) so uploads stream through without being
buffered, and so a request that crashes still gets its id, its log line and its metric.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferline.common.errors import QUOTE_LIMIT, quoted
from inferline.common.telemetry.context import REQUEST_ID_HEADER
from inferline.common.telemetry.tracing import configure_tracing, tracing_requested
from inferline.services.gateway.metrics import UNMATCHED_ROUTE, GatewayMetrics
from inferline.services.gateway.problems import ApiError, problem_response, unexpected_error_handler

log = logging.getLogger("inferline.gateway.access")

# A client's own id is kept when it is a plausible id; anything else is replaced, so a header
# cannot inject text into our logs.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
API_PREFIX = "/v1/"
# Probes, scrapes and assets are answered but never traced (kubelet alone probes every few
# seconds, and such traces would outnumber the requests). Regexes searched in the request's URL.
UNTRACED_URLS = ("/healthz$", "/readyz$", "/metrics$", "/static/", "/swagger-ui/", "/favicon.ico$")


class BodyTooLarge(ApiError):
    """Raised while reading a body past the limit; the app answers 413."""


class RequestContext:
    """Gives each request an id (``request.state.request_id``, the X-Request-ID response header),
    logs one line per request with it, and records the request in the gateway's metrics."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        response_started = False

        def record(status: int) -> None:
            # At the response's start, so the log line and the metric exist before the client has
            # its answer (the body follows at once; a test reading /metrics next sees this request).
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            _name_span(scope["method"], route)
            api_call = route.startswith(API_PREFIX) and route != "/v1/stats"
            self.metrics.observe(route, scope["method"], status, seconds, api_call=api_call)
            # Probes, scrapes, assets and the demo page's polling only at DEBUG, so the log reads.
            level = logging.INFO if api_call or status >= 400 else logging.DEBUG
            log.log(
                level, "%s %s -> %d in %.1f ms request_id=%s", scope["method"], _loggable(scope["path"]), status,
                seconds * 1000, request_id,
            )

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                record(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if response_started:
                raise
            response = await unexpected_error_handler(Request(scope), exc)
            await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            if not response_started:  # the client went away before any answer
                record(499)


def _name_span(method: str, route: str) -> None:
    """The tracing middleware names its span before routing, after the raw path; once the route is
    known the span takes its template (``POST /v1/models/{name}``), or the bare method when no
    route matched, as the HTTP semantic conventions ask: never the path, whose names and ids are
    unbounded."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    if route == UNMATCHED_ROUTE:
        span.update_name(method)
        return
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)


def add_tracing(app: Starlette, environ: Mapping[str, str] = os.environ, tracer_provider: Any = None) -> None:
    """Traces the gateway when OTLP export is configured (the ``OTEL_*`` variables, as for the
    stages): OpenTelemetry's ASGI middleware, outermost, makes one SERVER span per request that
    continues the caller's ``traceparent``; the controller client's interceptor carries it on.
    Without an endpoint nothing is added, so tracing off costs nothing."""
    if not tracing_requested(environ):
        return
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware  # noqa: PLC0415 - only when tracing is on

    app.add_middleware(
        OpenTelemetryMiddleware, excluded_urls=",".join(UNTRACED_URLS), exclude_spans=["receive", "send"],
        tracer_provider=tracer_provider,  # None: the process's, which traced_lifespan installs
    )


Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]


def traced_lifespan(lifespan: Lifespan, grace_s: float, environ: Mapping[str, str] = os.environ) -> Lifespan:
    """``lifespan`` inside the gateway's tracer provider: installed at start-up, its pending spans
    flushed (for at most ``grace_s``) at shutdown, as the stages do."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        flush = configure_tracing("gateway", environ)
        try:
            async with lifespan(app):
                yield
        finally:
            if flush is not None:
                flush(grace_s)

    return run


class BodyLimit:
    """Refuses a body over ``max_bytes`` with 413: at once from Content-Length, else while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await problem_response(Request(scope), self._error(int(declared)))(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error(seen)
            return message

        await self.app(scope, counting_receive, send)

    def _error(self, size: int) -> BodyTooLarge:
        limit_mb = self.max_bytes / (1024 * 1024)
        return BodyTooLarge(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request body of {size} bytes is over the gateway's limit of {self.max_bytes} bytes ({limit_mb:g} MiB); "
            "send fewer or smaller images per request, or raise INFERLINE_GATEWAY_MAX_UPLOAD_MB",
            413,
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _request_id(scope: Scope) -> str:
    given = _header(scope, REQUEST_ID_HEADER.encode())
    return given if given is not None and _SAFE_ID.match(given) else uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED_ROUTE


def _loggable(path: str) -> str:
    """A path as sent, unless it is long: then quoted and cut (a 60 KB path is one log line)."""
    return path if len(path) <= QUOTE_LIMIT else quoted(path)
