"""OpenTelemetry tracing: the per-process set-up, and spans for the inner steps of a stage.

Off unless OTLP export (gRPC or HTTP/protobuf) is configured through the standard ``OTEL_*`` variables; then the API's
no-op tracer answers every span call and nothing is recorded or sent. The step timings that
feed Prometheus and the profile breakdown are measured either way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from inferline.common.telemetry import metrics
from inferline.common.telemetry.context import CPU, PROFILE, SERVICE, RequestContext
from inferline.common.telemetry.profiler import PROFILER

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

TRACER_NAME = "inferline"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """OTLP is on when an endpoint is set, unless the SDK or the traces exporter is switched off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return any(environ.get(var) for var in _ENDPOINT_VARS)


# OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL values this process can export with (the SDK's own names).
PROTOCOLS = ("grpc", "http/protobuf")


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP transport the standard variables ask for; the traces-specific one wins."""
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if environ.get(var, "").strip():
            return environ[var].strip().lower()
    return "grpc"


def span_exporter(environ: Mapping[str, str]) -> SpanExporter:
    """An OTLP exporter over the transport asked for: gRPC (port 4317) or HTTP/protobuf (4318,
    the only one some collectors and SaaS endpoints accept). Each reads its endpoint, headers,
    TLS and timeout from the same ``OTEL_EXPORTER_OTLP_*`` variables."""
    protocol = otlp_protocol(environ)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415 - the SDK only when tracing is on

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as OTLPHttpSpanExporter,
        )

        return OTLPHttpSpanExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported here; use one of {', '.join(PROTOCOLS)}"
    )


def configure_tracing(service: str, environ: Mapping[str, str]) -> Callable[[float], None] | None:
    """Installs an SDK tracer provider exporting OTLP (gRPC or HTTP/protobuf, from
    ``OTEL_EXPORTER_OTLP_PROTOCOL``) for this process; returns its shutdown (which flushes
    pending spans for at most the seconds it is given), or None when tracing is off.

    ``service.name`` is the stage's own name even when ``OTEL_SERVICE_NAME`` is set for the whole
    deployment; ``OTEL_RESOURCE_ATTRIBUTES`` adds the rest (namespace, environment). A protocol
    this process cannot speak is logged at ERROR and leaves tracing off: traces are not worth
    losing the data plane for.
    """
    if not tracing_requested(environ):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415 - the SDK only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    global _enabled
    try:
        exporter = span_exporter(environ)
    except ValueError as exc:
        log.error("tracing off: %s", exc)
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    endpoint = next(environ[v] for v in reversed(_ENDPOINT_VARS) if environ.get(v))
    log.info("tracing on: OTLP (%s) spans of %s go to %s", otlp_protocol(environ), service, endpoint)

    def shutdown(timeout_s: float) -> None:
        """The exporter retries an unreachable collector for OTEL_EXPORTER_OTLP_TIMEOUT (10 s) per
        batch, and the SDK's force_flush ignores its timeout; a stopping stage gives the flush
        ``timeout_s`` on a thread of its own, then shuts the exporter (ending its retries and
        the call in flight)."""
        flushing = threading.Thread(target=provider.force_flush, name="otlp-flush", daemon=True)
        flushing.start()
        flushing.join(timeout_s)
        if flushing.is_alive():
            log.warning("spans not delivered to %s within %.1f s of shutdown; dropping them", endpoint, timeout_s)
        exporter.shutdown()
        provider.shutdown()

    return shutdown


# A proxy until a provider is installed, then the provider's tracer: safe to take at import, and
# get_tracer() per span would read the environment on every call.
_TRACER = trace.get_tracer(TRACER_NAME)


_enabled = False


def tracer() -> trace.Tracer:
    return _TRACER


def tracing_on() -> bool:
    """Whether this process records spans; when not, callers skip span bookkeeping entirely."""
    return _enabled


def span_scope(name: str, **kwargs: Any) -> AbstractContextManager[trace.Span]:
    """A current span, or (tracing off) a do-nothing stand-in that costs one object."""
    if _enabled:
        return _TRACER.start_as_current_span(name, **kwargs)
    return nullcontext(trace.INVALID_SPAN)


@contextmanager
def span(step: str, **attributes: Any) -> Iterator[trace.Span]:
    """One inner step of a stage: a child span, a ``inferline_step_duration_seconds`` sample,
    the step's CPU time on the request's meter (steps run on one thread each: its CPU clock), and
    the step's time in the request's profile when the caller asked for one."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    with span_scope(step, attributes=attributes) as current:
        yield current
    elapsed = time.perf_counter() - started
    meter = CPU.get()
    if meter is not None:
        meter.add(time.thread_time() - cpu_started)
    service = SERVICE.get()
    metrics.STEP_SECONDS.labels(service, step).observe(elapsed)
    profile = PROFILE.get()
    if profile is not None:
        profile.add(f"{service}.{step}", elapsed)


def traced(step: str, fn: Callable[..., Any], **attributes: Any) -> Callable[..., Any]:
    """``fn`` run inside ``span(step)``: for work handed to an executor as a function."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with span(step, **attributes):
            return fn(*args, **kwargs)

    return run


class BatchRun:
    """Reports one forward pass of the dynamic batcher under every request it served.

    A batch mixes items of several requests; each request's trace gets its own ``queue_wait``
    and ``batch_run`` spans (same times, its own parent), so every trace is complete on its own.
    """

    def __init__(
        self, model: str, contexts: Sequence[RequestContext], enqueued: Sequence[float], on_gpu: bool = False
    ):
        self.model = model
        self.on_gpu = on_gpu
        self.size = len(contexts)
        now = time.monotonic()
        waits: dict[tuple[int, int, int], tuple[RequestContext, float, int]] = {}
        for ctx, queued in zip(contexts, enqueued, strict=True):
            wait = now - queued
            metrics.QUEUE_WAIT_SECONDS.labels(model).observe(wait)
            _, longest, count = waits.get(ctx.key, (ctx, 0.0, 0))
            waits[ctx.key] = (ctx, max(longest, wait), count + 1)
        self.requests = list(waits.values())
        metrics.BATCH_SIZE.labels(model).observe(self.size)
        for ctx, wait, _ in self.requests:
            self._record(ctx, "queue_wait", now - wait, now, {})

    def run(self, fn: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], list[Any]]:
        """``fn`` timed where it runs (the model's thread), so the span is the pass itself."""

        def timed(items: list[Any]) -> list[Any]:
            started, cpu_started = time.monotonic(), time.process_time()
            try:
                return PROFILER.around(self.model, fn, items)
            finally:
                ended = time.monotonic()
                self._share_cpu(time.process_time() - cpu_started)
                if self.on_gpu:
                    self._share_gpu(ended - started)
                metrics.STEP_SECONDS.labels(self.requests[0][0].service, "batch_run").observe(ended - started)
                for ctx, _, count in self.requests:
                    self._record(ctx, "batch_run", started, ended, {"inferline.request_items": count})

        return timed

    def _share_cpu(self, seconds: float) -> None:
        """The pass's process CPU time, shared by the requests of the batch in proportion to their
        items (other threads' work during the pass counts too: one pass per model runs at once)."""
        for ctx, _, count in self.requests:
            if ctx.cpu is not None:
                ctx.cpu.add(seconds * count / self.size)

    def _share_gpu(self, seconds: float) -> None:
        """The pass's wall time on its GPU (the device is the model's while it runs), shared by
        the requests of the batch in proportion to their items, as the CPU is."""
        for ctx, _, count in self.requests:
            if ctx.gpu is not None:
                ctx.gpu.add(seconds * count / self.size)

    def _record(self, ctx: RequestContext, step: str, start: float, end: float, extra: dict[str, Any]) -> None:
        if ctx.profile is not None:
            ctx.profile.add(f"{ctx.service}.{step}", end - start)
        parent = trace.get_current_span(ctx.otel)
        if not parent.is_recording():
            return
        offset = time.time_ns() - time.monotonic_ns()
        attributes = {"inferline.model": self.model, "inferline.batch_size": self.size, **extra}
        child = tracer().start_span(step, context=ctx.otel, attributes=attributes, start_time=int(start * 1e9) + offset)
        child.end(end_time=int(end * 1e9) + offset)


def batch_started(
    model: str, contexts: Sequence[RequestContext], enqueued: Sequence[float], on_gpu: bool = False
) -> BatchRun:
    return BatchRun(model, contexts, enqueued, on_gpu)
