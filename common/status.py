"""The one table from domain errors to gRPC status codes, and the interceptor that applies it.

Whole calls (the interceptor) and single items of a batch (``item_status``) use the same table,
so a bad image gets the same code whether it came alone or in a batch of fifty. The HTTP gateway
reads its HTTP codes from the same rows, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from inferline.common import errors
from inferline.common.generated import types_pb2
from inferline.common.telemetry.context import SERVICE
from inferline.common.telemetry.metrics import ITEM_ERRORS

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"
HTTP_INTERNAL = 500

# Most specific first: the first matching class wins. Columns: domain error, gRPC code, HTTP
# code (the gateway's); a server-side failure is 500 there, with INTERNAL_MESSAGE as its text.
STATUS_TABLE: tuple[tuple[type[errors.InferlineError], grpc.StatusCode, int], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT, 400),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND, 404),
    (errors.StageUnavailable, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE, 503),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (errors.WeightsError, grpc.StatusCode.FAILED_PRECONDITION, HTTP_INTERNAL),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION, HTTP_INTERNAL),
    (errors.StageFailed, grpc.StatusCode.INTERNAL, HTTP_INTERNAL),
)

OK = types_pb2.Status(code=grpc.StatusCode.OK.value[0])


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Code and caller-facing message; unknown exceptions never leak their text."""
    for kind, code, _ in STATUS_TABLE:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def error_for(code: grpc.StatusCode, message: str) -> errors.InferlineError:
    """The reverse of the table, for a status a downstream stage answered with."""
    for kind, mapped, _ in STATUS_TABLE:
        if mapped is code:
            return kind(message)
    return errors.StageFailed(message)


def http_status_for(code: grpc.StatusCode) -> int:
    """The gateway's HTTP code for a gRPC status; a code outside the table is a 500."""
    for _, mapped, http in STATUS_TABLE:
        if mapped is code:
            return http
    return HTTP_INTERNAL


def item_status(exc: BaseException) -> types_pb2.Status:
    code, message = status_for(exc)
    ITEM_ERRORS.labels(SERVICE.get(), code.name).inc()
    if code is grpc.StatusCode.INTERNAL:
        log.error("item failed", exc_info=exc)
    return types_pb2.Status(code=code.value[0], message=message)


def code_from_status(status: types_pb2.Status) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN


# gRPC's rich error model: a google.rpc.Status in this trailer carries typed details (RetryInfo).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


# gRPC's server pushback (the retry design, A6): a client whose retry policy retries this status
# waits this many milliseconds before its next attempt, without parsing anything.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_trailer(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, bytes | str], ...]:
    """Trailing metadata for an error that knows when a retry could be taken (``Overloaded``).

    Two forms of the same delay: a ``RetryInfo`` in the rich status, which applications read
    (``grpc_status.rpc_status.from_call``, or ``retry_after_s`` below; the gateway turns it into
    ``Retry-After``), and, on RESOURCE_EXHAUSTED only, gRPC's pushback header, which a stock
    client's retry policy obeys. Not on UNAVAILABLE: the channels between inferline services
    retry that status with their own short backoff (a drain or a lost replica), and a pushback
    there would hold every retry for the whole hint.
    """
    delay = getattr(exc, "retry_after_s", None)
    if delay is None:
        return ()
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(delay), nanos=int(delay % 1 * 1e9))
    )
    detail = status_pb2.Status(code=code.value[0], message=message)
    detail.details.add().Pack(info)
    trailer: tuple[tuple[str, bytes | str], ...] = ((STATUS_DETAILS_KEY, detail.SerializeToString()),)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailer += ((PUSHBACK_KEY, str(max(0, round(delay * 1000)))),)
    return trailer


def retry_after_s(metadata: Any) -> float | None:
    """The ``RetryInfo`` delay in a call's trailing metadata, or None when it carries none."""
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY:
            continue
        detail = status_pb2.Status.FromString(value)
        for any_detail in detail.details:
            if any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                any_detail.Unpack(info)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None




UnaryHandler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# What a grpc.aio continuation returns: a method handler whose behaviours are coroutine functions
# (grpc's stubs describe the sync server's, so the behaviours are cast below).
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors raised by unary handlers into their status codes, and requests that
    do not parse into INVALID_ARGUMENT.

    grpc.aio runs the deserializer before any handler and answers its exceptions with UNKNOWN
    and the exception's text ("Unexpected <class 'DecodeError'>: ..."): a client bug reported as
    a server mystery. The deserializer is therefore wrapped: a failure becomes an ``Undecodable``
    value that the handler wrapper turns into INVALID_ARGUMENT naming the message type.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _mapped(cast(UnaryHandler, handler.unary_unary), method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # health's Watch: one request message, too
            return grpc.unary_stream_rpc_method_handler(
                _streamed(cast(Callable[[Any, grpc.aio.ServicerContext], Any], handler.unary_stream), method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse: what the handler wrapper reports instead of it."""

    message_type: str
    size: int
    reason: str

    @property
    def message(self) -> str:
        return (
            f"the request is not a valid {self.message_type} message ({self.size} bytes: {self.reason}); "
            "send the message built by code generated from protos/inferline/v1, with text fields in UTF-8"
        )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", None) or "request"

    def run(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the bytes were the client's
            # protobuf says "Error parsing message with type 'X': <reason>"; the reason is what helps.
            return Undecodable(message_type, len(raw), errors.quoted(str(exc).rsplit(": ", 1)[-1]).strip("'\""))

    return run


async def _refuse(request: Undecodable, method: str, context: grpc.aio.ServicerContext) -> None:
    log.info("%s -> INVALID_ARGUMENT: undecodable %s (%d bytes)", method, request.message_type, request.size)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def _streamed(inner: Callable[[Any, grpc.aio.ServicerContext], Any], method: str) -> UnaryHandler:
    """A server-streaming handler behind the same parse check; its responses pass through
    (written by the handler itself, or yielded by it and written here)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await _refuse(request, method, context)
        result = inner(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                await context.write(response)
        else:
            await result

    return call


def _mapped(inner: UnaryHandler, method: str) -> UnaryHandler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, method, context)
        try:
            return await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure must become a status
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Refusals come in storms under overload: a log line each would cost more than
                # the refusal itself (inferline_admission_refused_total counts them).
                log.debug("%s -> %s: %s", method, code.name, message)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
            await context.abort(code, message, trailing_metadata=retry_trailer(exc, code, message))

    return call
