"""The small pieces: when tracing turns on, what a log line holds, context in thread pools."""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from inferline.common.logs import JsonFormatter, TextFormatter
from inferline.common.telemetry.context import REQUEST_ID, SERVICE, Profile, in_context
from inferline.common.telemetry.metrics import OTHER_MODEL, ModelLabels
from inferline.common.telemetry.tracing import configure_tracing, span_exporter, tracing_requested
from tests.observability.harness import OtlpHttpReceiver


@pytest.mark.parametrize(
    "environ, on",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, False),
    ],
)
def test_tracing_is_on_only_when_an_otlp_endpoint_is_configured(environ, on):
    assert tracing_requested(environ) is on


def test_without_otlp_no_sdk_is_installed_and_spans_are_no_ops():
    assert configure_tracing("preprocess", {}) is None
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    with trace.get_tracer("t").start_as_current_span("x") as span:
        assert not span.is_recording()


def _log_line(formatter: logging.Formatter, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("inferline.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("Detect %s", "OK", extra=extra)
    finally:
        logger.handlers.clear()
    return stream.getvalue().strip()


def test_json_line_holds_the_request_context_and_structured_fields():
    service, request = SERVICE.set("controller"), REQUEST_ID.set("req-7")
    try:
        line = json.loads(_log_line(JsonFormatter("fallback"), status="OK", duration_ms=12.5))
    finally:
        SERVICE.reset(service)
        REQUEST_ID.reset(request)
    assert line["service"] == "controller" and line["request_id"] == "req-7" and line["message"] == "Detect OK"
    assert (line["status"], line["duration_ms"]) == ("OK", 12.5)
    assert {"ts", "level", "logger", "trace_id", "span_id"} <= set(line)


def test_json_line_outside_a_request_names_the_process_service_and_has_empty_ids():
    line = json.loads(_log_line(JsonFormatter("inference")))
    assert line["service"] == "inference" and line["request_id"] == "" and line["trace_id"] == ""


def test_text_line_ends_with_the_request_id():
    request = REQUEST_ID.set("req-9")
    try:
        assert _log_line(TextFormatter("controller")).endswith("Detect OK (request req-9)")
    finally:
        REQUEST_ID.reset(request)


def test_thread_pool_work_sees_the_request_only_through_in_context():
    token = REQUEST_ID.set("req-pool")
    try:
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(REQUEST_ID.get).result() == ""
            assert pool.submit(in_context(REQUEST_ID.get)).result() == "req-pool"
    finally:
        REQUEST_ID.reset(token)


def test_profile_sums_steps_in_milliseconds_and_merges_a_stages_timings():
    profile = Profile()
    profile.add("preprocess.decode", 0.002)
    profile.add("preprocess.decode", 0.003)
    profile.merge({"preprocess.decode": 1.0, "inference.batch_run": 40.0})
    assert profile.ms == pytest.approx({"preprocess.decode": 6.0, "inference.batch_run": 40.0})


def test_model_labels_are_names_loaded_or_served_and_anything_else_is_other():
    labels = ModelLabels(limit=2)
    labels.add("yolov8n")
    assert labels.label("yolov8n", served=False) == "yolov8n"
    assert labels.label("typo", served=False) == OTHER_MODEL  # an unknown model's NOT_FOUND
    assert labels.label("clip", served=True) == "clip"
    assert labels.label("clip", served=False) == "clip"
    assert labels.label("third", served=True) == OTHER_MODEL  # past the limit
    assert labels.label("", served=True) == ""  # calls that name no model


@pytest.mark.parametrize(
    "environ, exporter_module",
    [
        ({}, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        ),
    ],
)
def test_the_otlp_protocol_variable_picks_the_exporter(environ, exporter_module):
    exporter = span_exporter(environ)
    try:
        assert type(exporter).__module__ == exporter_module
    finally:
        exporter.shutdown()


def test_an_unsupported_otlp_protocol_leaves_tracing_off_and_says_why(caplog):
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    with caplog.at_level(logging.ERROR):
        assert configure_tracing("preprocess", environ) is None
    assert "http/json" in caplog.text and "http/protobuf" in caplog.text


def test_spans_reach_an_otlp_http_protobuf_endpoint(monkeypatch):
    """``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` (the SDK reads the endpoint from the variable):
    spans POSTed to ``/v1/traces`` of a real HTTP receiver."""
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - the SDK only in the tests that need it
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: PLC0415

    receiver = OtlpHttpReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        provider = TracerProvider(resource=Resource.create({"service.name": "preprocess"}))
        exporter = span_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("t").start_as_current_span("decode"):
            pass
        provider.shutdown()
        assert [(s["service"], s["name"]) for s in receiver.spans] == [("preprocess", "decode")]
        assert receiver.paths == ["/v1/traces"]
    finally:
        receiver.stop()
