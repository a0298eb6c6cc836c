"""Errors as RFC 9457 problem documents (``application/problem+json``).

A failed call to the controller (the client raises it as the domain error of its status) keeps
its gRPC status name in the body (``code``) and gets its HTTP code from the one status table in
``inferline.common.status``; a retry hint the controller sent (gRPC ``RetryInfo``, on a refusal
under overload) becomes ``Retry-After`` on the 429 or 503. Errors the gateway finds itself (a
bad field, a body over the limit) are built the same way, so a client parses one shape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferline.common.errors import InferlineError, quoted
from inferline.common.status import HTTP_INTERNAL, INTERNAL_MESSAGE, STATUS_TABLE, http_status_for, status_for

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"
# 429 (refused under load) and 503 (a stage or the controller is away) invite a retry; without
# an estimate from the controller, one second: about a restart's or a queue's turn.
RETRYABLE_HTTP = (429, 503)
DEFAULT_RETRY_AFTER_S = 1

# HTTP codes the transport produces that the status table has no row for, with the gRPC status
# name a gRPC client would have seen for the same mistake.
_TRANSPORT_ONLY = {
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
}


def _code_for_http(status: int) -> grpc.StatusCode:
    """The gRPC status of an HTTP error raised by the framework (unknown path, bad multipart)."""
    if status >= HTTP_INTERNAL:
        return grpc.StatusCode.INTERNAL
    for _, code, http in STATUS_TABLE:
        if http == status:
            return code
    return _TRANSPORT_ONLY.get(status, grpc.StatusCode.INVALID_ARGUMENT)


class Problem(BaseModel):
    """The body of every error response."""

    type: str = Field("about:blank", description="always about:blank: `title` is the HTTP reason")
    title: str = Field(description="the HTTP reason phrase", examples=["Not Found"])
    status: int = Field(description="the HTTP status code", examples=[404])
    detail: str = Field(description="what went wrong and what to do about it")
    code: str = Field(description="the gRPC status name of the same failure", examples=["NOT_FOUND"])
    request_id: str = Field(description="also in the X-Request-ID header and the gateway's log")


class ApiError(Exception):
    """An error the gateway answers with; ``http`` defaults from the status table."""

    def __init__(self, code: grpc.StatusCode, detail: str, http: int | None = None, retry_after: float | None = None):
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.http = http_status_for(code) if http is None else http
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` in whole seconds (RFC 9110 allows no fraction), rounded up so a client
        that honours it never comes back before the server's estimate."""
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def invalid(detail: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, detail)


def from_error(error: InferlineError) -> ApiError:
    """A failed controller call (the client's domain error) as an HTTP error, by the status table;
    a server-side failure never leaks its text."""
    code, message = status_for(error)
    http = http_status_for(code)
    detail = INTERNAL_MESSAGE if http == HTTP_INTERNAL else message
    if code is grpc.StatusCode.UNAVAILABLE and "controller" not in detail:
        detail = f"the controller is unavailable: {detail}"
    return ApiError(code, detail, http, retry_after=error.retry_after_s)


def with_retry_after(status: int, headers: dict[str, str] | None) -> dict[str, str] | None:
    """Every 429 and 503 says when to come back (RFC 9110 10.2.3): the server's estimate when it
    sent one, else ``DEFAULT_RETRY_AFTER_S``, so a client that honours the header never spins."""
    if status not in RETRYABLE_HTTP or any(name.lower() == "retry-after" for name in headers or {}):
        return headers
    return {**(headers or {}), "Retry-After": str(DEFAULT_RETRY_AFTER_S)}


def problem_response(request: Request, error: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = with_retry_after(error.http, headers)
    request_id = getattr(request.state, "request_id", "")
    body = Problem(
        type="about:blank",
        title=HTTPStatus(error.http).phrase,
        status=error.http,
        detail=error.detail,
        code=error.code.name,
        request_id=request_id,
    )
    return JSONResponse(body.model_dump(), status_code=error.http, media_type=PROBLEM_TYPE, headers=headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.http >= HTTP_INTERNAL:
        log.warning(
            "%s %s -> %d %s: %s request_id=%s", request.method, request.url.path, exc.http, exc.code.name, exc.detail,
            getattr(request.state, "request_id", ""),
        )
    return problem_response(request, exc, headers=exc.headers)


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A controller call that failed as a whole (``inferline.services.client`` raises the domain
    error of its status)."""
    assert isinstance(exc, InferlineError)
    error = from_error(exc)
    if error.http == HTTP_INTERNAL:
        log.error(
            "controller failed: %s: %s request_id=%s", error.code.name, exc, getattr(request.state, "request_id", "")
        )
    return await api_error_handler(request, error)


def describe_errors(errors: Sequence[Any]) -> str:
    """Pydantic's errors in one line, each with the field it is about: "conf: Input should be ..."."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes our 400, with every bad field named in one line."""
    assert isinstance(exc, RequestValidationError)
    return problem_response(request, invalid(describe_errors(exc.errors())))


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _code_for_http(exc.status_code)
    detail = str(exc.detail) if exc.status_code < HTTP_INTERNAL else INTERNAL_MESSAGE
    if exc.status_code == 404 and exc.detail == "Not Found":
        detail = f"no such endpoint: {request.method} {quoted(request.url.path)} (see /docs)"
    return problem_response(request, ApiError(code, detail, exc.status_code), headers=getattr(exc, "headers", None))


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "%s %s failed request_id=%s", request.method, request.url.path, getattr(request.state, "request_id", ""),
        exc_info=exc,
    )
    return problem_response(request, ApiError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, HTTP_INTERNAL))


def oip_error_response(code: grpc.StatusCode, message: str) -> JSONResponse:
    """An error of the OIP REST routes (``/v2``): the v2 spec's ``{"error": message}`` body, which
    tritonclient.http reads, with the HTTP code of ``code`` from the same status table as the
    problem documents; a server-side failure never leaks its text."""
    http = http_status_for(code)
    if http == HTTP_INTERNAL:
        log.warning("OIP call failed: %s: %s", code.name, message)
        message = INTERNAL_MESSAGE
    return JSONResponse({"error": message}, status_code=http, headers=with_retry_after(http, None))
