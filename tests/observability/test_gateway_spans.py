"""The gateway's HTTP spans, in process: named by route template (never the raw path), the caller's
``traceparent`` continued, probes, scrapes and assets not traced, nothing added without OTLP.

The gateway's own middleware stack (add_tracing, RequestContext) around a few routes, with a
tracer provider local to the test (the process-wide one stays untouched).
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.testclient import TestClient

from inferline.services.gateway.metrics import GatewayMetrics
from inferline.services.gateway.middleware import RequestContext, add_tracing

OTLP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
CALLER_TRACE_ID, CALLER_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def _app(environ: dict[str, str], provider: TracerProvider | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, str]:
        return {"name": name}

    for probe in ("/healthz", "/readyz", "/metrics"):
        app.add_api_route(probe, lambda: {"ok": True}, methods=["GET"])
    app.add_middleware(RequestContext, metrics=GatewayMetrics())
    add_tracing(app, environ, tracer_provider=provider)
    return app


@pytest.fixture
def traced() -> tuple[TestClient, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TestClient(_app(OTLP, provider)), exporter


def test_a_request_is_one_server_span_named_by_its_route_under_the_callers_traceparent(traced):
    client, exporter = traced
    reply = client.get("/v1/models/yolov8n", headers={"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"})
    assert reply.status_code == 200
    [span] = exporter.get_finished_spans()  # no per-message receive/send spans
    assert span.kind is SpanKind.SERVER and span.name == "GET /v1/models/{name}"
    assert span.attributes["http.route"] == "/v1/models/{name}"
    assert format(span.context.trace_id, "032x") == CALLER_TRACE_ID
    assert format(span.parent.span_id, "016x") == CALLER_SPAN_ID


def test_an_unmatched_path_is_named_by_the_method_alone(traced):
    client, exporter = traced
    assert client.get("/no/such/path/12345").status_code == 404
    assert [s.name for s in exporter.get_finished_spans()] == ["GET"]


def test_probes_and_scrapes_are_answered_and_not_traced(traced):
    client, exporter = traced
    for probe in ("/healthz", "/readyz", "/metrics", "/readyz?verbose=1"):
        assert client.get(probe).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_without_an_otlp_endpoint_no_tracing_middleware_is_added():
    app = _app({})
    assert not any(m.cls is OpenTelemetryMiddleware for m in app.user_middleware)
    assert any(m.cls is OpenTelemetryMiddleware for m in _app(OTLP).user_middleware)
