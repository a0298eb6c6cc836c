"""gRPC interceptors: one span, one metric sample, the CPU it cost and one access log line per RPC.

The server side continues the caller's W3C trace context from the call's metadata and sets the
request context (service, request id, profile flag) for the handler; the client side (the
controller's channels to the stages) starts a CLIENT span and passes all of it on, and brings
the stage's step timings back from the trailing metadata when a profile was asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeAlias, cast

import grpc
from opentelemetry import propagate
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from inferline.common.telemetry import metrics
from inferline.common.telemetry.context import (
    CPU,
    GPU,
    MODEL,
    MODEL_HEADER,
    PROFILE,
    PROFILE_HEADER,
    REQUEST_ID,
    REQUEST_ID_HEADER,
    SERVICE,
    TIMINGS_TRAILER,
    CpuMeter,
    Profile,
)
from inferline.common.telemetry.tracing import span_scope, tracing_on

access_log = logging.getLogger("inferline.access")

# A caller's request id is logged on every line; longer ones are cut.
MAX_REQUEST_ID = 128
# Probes and reflection would drown the access log and the traces (kubelet and the controller
# check health every few seconds): they are logged at DEBUG and never traced, only counted.
QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
# Server spans with these codes are errors (OpenTelemetry's RPC semantic conventions): the
# server's own failures. NOT_FOUND, INVALID_ARGUMENT and the like are the caller's, and the
# span of a call that answered them correctly is not an error. Client spans: every non-OK code.
SERVER_ERROR_CODES = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})

UnaryHandler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# A grpc.aio continuation's method handler: its behaviours are coroutine functions (grpc's stubs
# describe the sync server's, so the behaviour is cast below).
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


def split_method(full: str) -> tuple[str, str]:
    """``/inferline.v1.PreprocessService/Preprocess`` -> (``inferline.v1.PreprocessService``, ``Preprocess``)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def model_of(request: Any, metadata: dict[str, str]) -> str:
    """The model a call serves: the request's own field (inferline.v1 ``model``, OIP
    ``model_name``), else what the controller sent along in the metadata."""
    for name in ("model", "model_name"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value
    return metadata.get(MODEL_HEADER, "")


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


class TelemetryServerInterceptor(grpc.aio.ServerInterceptor):
    """Outermost interceptor: it sees the final status, after the error mapping."""

    def __init__(self, service: str, cost_per_core_hour: float = 0.0, cost_per_gpu_hour: float = 0.0):
        self.service = service
        self.cost_per_core_second = cost_per_core_hour / 3600.0
        self.cost_per_gpu_second = cost_per_gpu_hour / 3600.0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._observed(cast(UnaryHandler, handler.unary_unary), handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _cost(self, cpu_seconds: float, gpu_seconds: float) -> float:
        """The request's cost in this stage at the configured prices (0 without a price)."""
        return cpu_seconds * self.cost_per_core_second + gpu_seconds * self.cost_per_gpu_second

    def _observed(self, inner: UnaryHandler, full_method: str) -> UnaryHandler:
        rpc_service, method = split_method(full_method)
        quiet = rpc_service.startswith(QUIET_SERVICES)
        in_flight = metrics.RPC_IN_FLIGHT.labels(self.service, method)
        attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": method}

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            SERVICE.set(self.service)
            request_id = metadata.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID] or uuid.uuid4().hex
            REQUEST_ID.set(request_id)
            model = model_of(request, metadata)
            MODEL.set(model)
            profile = Profile() if _flag(metadata.get(PROFILE_HEADER)) else None
            PROFILE.set(profile)
            meter = CpuMeter()
            CPU.set(meter)
            gpu = CpuMeter()
            GPU.set(gpu)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            in_flight.inc()
            with _rpc_span(
                f"{rpc_service}/{method}", quiet, SpanKind.SERVER, attributes,
                propagate.extract(metadata) if tracing_on() and not quiet else None,
            ) as span:
                try:
                    response = await inner(request, context)
                    trailers = [(REQUEST_ID_HEADER, request_id)]
                    if profile is not None:
                        if meter.seconds:
                            profile.add(f"{self.service}.cpu", meter.seconds)
                        if gpu.seconds:
                            profile.add(f"{self.service}.gpu", gpu.seconds)
                        cost = self._cost(meter.seconds, gpu.seconds)
                        if cost:
                            # In the prices' currency, not ms: merged as is.
                            profile.merge({f"{self.service}.cost": cost})
                        trailers.append(_attach_profile(profile, self.service, started, response))
                    context.set_trailing_metadata(trailers)
                    return response
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED  # the caller went away or its deadline passed
                    raise
                except BaseException:
                    code = grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    elapsed = time.perf_counter() - started
                    in_flight.dec()
                    label = metrics.MODELS.label(model, code is grpc.StatusCode.OK)
                    metrics.RPC_SECONDS.labels(self.service, method, code.name, label).observe(elapsed)
                    if meter.seconds:
                        metrics.CPU_SECONDS.labels(label, self.service).inc(meter.seconds)
                    if gpu.seconds:
                        metrics.GPU_SECONDS.labels(label, self.service).inc(gpu.seconds)
                    cost = self._cost(meter.seconds, gpu.seconds)
                    if cost:
                        metrics.COST.labels(label, self.service).inc(cost)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in SERVER_ERROR_CODES:
                        span.set_status(Status(StatusCode.ERROR, code.name))
                    access_log.log(
                        logging.DEBUG if quiet else logging.INFO,
                        "%s %s %.1f ms", method, code.name, elapsed * 1000,
                        extra={"rpc_method": f"{rpc_service}/{method}", "status": code.name,
                               "duration_ms": round(elapsed * 1000, 3)},
                    )

        return call


def _rpc_span(
    name: str, quiet: bool, kind: SpanKind, attributes: dict[str, str], context: Any = None
) -> AbstractContextManager[Span]:
    """The RPC's span; none for health checks and reflection."""
    if quiet:
        return nullcontext(INVALID_SPAN)
    return span_scope(
        name, context=context, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
    )


def _attach_profile(profile: Profile, service: str, started: float, response: Any) -> tuple[str, str]:
    """The profile goes into ``timings_ms`` when the response has one (the controller's), beside
    the controller's own per-stage wall times; returns the trailer that carries it back."""
    profile.add(f"{service}.server", time.perf_counter() - started)
    timings = getattr(response, "timings_ms", None)
    if timings is not None:
        for key, value in profile.ms.items():
            if key not in timings:
                timings[key] = round(value, 3)
    return TIMINGS_TRAILER, json.dumps(profile.ms)


class TelemetryClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """On the controller's channels to the stages: trace context, request id and profile flag out;
    the stage's step timings back in."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        rpc_service, method = split_method(_text(client_call_details.method))
        stage = _stage_name(rpc_service)
        profile = PROFILE.get()
        model = MODEL.get()
        attributes = {"rpc.system": "grpc", "rpc.service": rpc_service, "rpc.method": method}
        with _rpc_span(f"{rpc_service}/{method}", rpc_service.startswith(QUIET_SERVICES), SpanKind.CLIENT,
                       attributes) as span:
            carrier: dict[str, str] = {}
            if tracing_on():
                propagate.inject(carrier)
            if REQUEST_ID.get():
                carrier[REQUEST_ID_HEADER] = REQUEST_ID.get()
            if model:
                carrier[MODEL_HEADER] = model
            if profile is not None:
                carrier[PROFILE_HEADER] = "1"
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *carrier.items())
            details = client_call_details._replace(metadata=metadata)
            started = time.perf_counter()
            call = await continuation(details, request)
            code = grpc.StatusCode.OK
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                span.set_status(Status(StatusCode.ERROR, code.name))
                raise
            finally:
                elapsed = time.perf_counter() - started
                label = metrics.MODELS.label(model, code is grpc.StatusCode.OK)
                metrics.STAGE_CALL_SECONDS.labels(stage, method, code.name, label).observe(elapsed)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
            if profile is not None:
                for key, value in await call.trailing_metadata() or ():
                    if key == TIMINGS_TRAILER:
                        profile.merge(json.loads(value))
            return call


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Services whose names do not say their stage: the Open Inference Protocol's is the inference stage's.
_STAGE_OF_SERVICE = {"inference.GRPCInferenceService": "inference"}


def _stage_name(rpc_service: str) -> str:
    """``inferline.v1.PreprocessService`` -> ``preprocess`` (a bounded label)."""
    if rpc_service in _STAGE_OF_SERVICE:
        return _STAGE_OF_SERVICE[rpc_service]
    name = rpc_service.rpartition(".")[2]
    return name.removesuffix("Service").lower() or "unknown"
