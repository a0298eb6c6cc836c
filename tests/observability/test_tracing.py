"""One request is one trace across the four services (and the HTTP gateway, continuing its
caller's ``traceparent``), every log line of it says so, and health checks make no spans.

The four stages and the gateway run as processes exporting OTLP/gRPC (configured only through
the standard ``OTEL_*`` variables) to a receiver in this test, built on opentelemetry-proto.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from inferline.common.generated import controller_pb2, controller_pb2_grpc, types_pb2
from tests.observability.harness import OtlpReceiver, Stages, free_ports, stage_env, wait_for

pytestmark = pytest.mark.slow

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STAGE_SERVICES = {"controller", "preprocess", "inference", "postprocess"}
# A caller's W3C trace context: the gateway's trace must be this trace, under this span.
CALLER_TRACE_ID, CALLER_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@dataclass
class Traced:
    spans: list[dict[str, Any]]  # the gRPC Detect's trace
    stages: Stages
    request_id: str
    not_found: list[dict[str, Any]]  # SERVER spans of calls answered NOT_FOUND
    http_spans: list[dict[str, Any]]  # the trace of the POST /v1/detect sent with a traceparent
    every_span: list[dict[str, Any]]


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(  # noqa: S310 - a loopback URL of this test
        url, data=body, headers=headers or {}, method="POST" if body else "GET"
    )
    with urllib.request.urlopen(request, timeout=120) as reply:  # noqa: S310 - a loopback URL of this test
        return reply.status, reply.read()


def _start_gateway(stages: Stages, log_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    env = {**stages.env, "INFERLINE_GATEWAY_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "inferline.services.cli", "serve", "gateway"],
        env=env, stderr=(log_dir / "gateway.log").open("w"), stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (log_dir / "gateway.log").read_text()
        try:
            return _http(f"{base}/readyz")[0] == 200
        except OSError:
            return False

    wait_for(ready, 60, "the gateway's /readyz")
    return process, base


@pytest.fixture(scope="module")
def traced(model_dir, clip_weights, data_dir, tmp_path_factory):
    """One Detect call (with a PNG rendering) through a traced stack; the spans and the logs."""
    receiver = OtlpReceiver()
    env = stage_env(
        model_dir, clip_weights.parent,
        INFERLINE_MODELS="yolov8n",
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    log_dir = tmp_path_factory.mktemp("traced")
    stages = Stages.start(env, log_dir)
    gateway = None
    request_id = uuid.uuid4().hex
    try:
        with grpc.insecure_channel(stages.target("controller")) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            response, call = stub.Detect.with_call(
                controller_pb2.DetectRequest(
                    model="yolov8n",
                    images=[types_pb2.Image(name="shapes_01.jpg", data=(data_dir / "shapes_01.jpg").read_bytes())],
                    render=[types_pb2.RENDER_FORMAT_PNG],
                ),
                metadata=[("x-request-id", request_id)],
                timeout=120,
            )
            assert response.results[0].detections, "the stand-in detector finds the shapes in shapes_01.jpg"
            assert ("x-request-id", request_id) in call.trailing_metadata(), "the caller gets its request id back"
            with pytest.raises(grpc.RpcError) as refused:
                stub.Detect(controller_pb2.DetectRequest(model="no-such-model", images=[types_pb2.Image(data=b"x")]),
                            timeout=60)
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        root = wait_for(
            lambda: next((s for s in receiver.spans if s["service"] == "controller" and s["kind"] == SERVER
                          and s["name"].endswith("/Detect")), None),
            30, "the controller's Detect span",
        )
        trace_id = root["trace_id"]
        wait_for(lambda: {s["service"] for s in receiver.trace(trace_id)} >= STAGE_SERVICES, 30,
                 "spans of all four services")
        gateway, base = _start_gateway(stages, log_dir)
        for probe in ("/healthz", "/readyz", "/metrics"):
            assert _http(base + probe)[0] == 200
        image = base64.b64encode((data_dir / "shapes_01.jpg").read_bytes()).decode()
        status, _ = _http(
            f"{base}/v1/detect", json.dumps({"model": "yolov8n", "images": [{"data": image}]}).encode(),
            {"Content-Type": "application/json", "traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01"},
        )
        assert status == 200
        wait_for(lambda: {s["service"] for s in receiver.trace(CALLER_TRACE_ID)} >= STAGE_SERVICES | {"gateway"}, 30,
                 "the HTTP call's spans from the gateway and all four services")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stages.stop()  # flushes whatever the batch processors still hold
        receiver.stop()
    not_found = [s for s in receiver.spans if s["kind"] == SERVER and s["attributes"].get("rpc.grpc.status_code") == 5]
    return Traced(receiver.trace(trace_id), stages, request_id, not_found, receiver.trace(CALLER_TRACE_ID),
                  receiver.spans)


def test_one_detect_is_one_trace_with_spans_from_all_four_services(traced):
    spans = traced.spans
    assert {s["service"] for s in spans} == STAGE_SERVICES
    assert len({s["trace_id"] for s in spans}) == 1


def test_every_span_has_its_parent_in_the_same_trace_and_only_the_controller_call_is_root(traced):
    spans = traced.spans
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if not s["parent"]]
    assert [(r["service"], r["name"]) for r in roots] == [("controller", "inferline.v1.ControllerService/Detect")]
    orphans = [(s["service"], s["name"]) for s in spans if s["parent"] and s["parent"] not in by_id]
    assert not orphans


def test_each_stage_call_is_a_server_span_under_the_controllers_client_span(traced):
    spans = traced.spans
    by_id = {s["span_id"]: s for s in spans}
    stage_calls = {
        "preprocess": "inferline.v1.PreprocessService/Preprocess",
        "inference": "inference.GRPCInferenceService/ModelInfer",
        "postprocess": "inferline.v1.PostprocessService/Postprocess",
    }
    for service, name in stage_calls.items():
        server = next(s for s in spans if s["service"] == service and s["name"] == name and s["kind"] == SERVER)
        client = by_id[server["parent"]]
        assert (client["service"], client["name"], client["kind"]) == ("controller", name, CLIENT)
        assert by_id[client["parent"]]["name"] == "inferline.v1.ControllerService/Detect"


def test_inner_steps_are_children_of_their_stage_call_with_model_batch_and_size_attributes(traced):
    spans = traced.spans
    by_id = {s["span_id"]: s for s in spans}

    def step(service: str, name: str) -> dict:
        found = [s for s in spans if s["service"] == service and s["name"] == name]
        assert found, f"no {name} span from {service}"
        parent = by_id[found[0]["parent"]]
        assert parent["service"] == service and parent["kind"] == SERVER, (name, parent["name"])
        return found[0]["attributes"]

    assert step("preprocess", "decode")["inferline.encoded_bytes"] > 0
    letterbox = step("preprocess", "letterbox")
    assert letterbox["inferline.image_size"] == "640x480" and letterbox["inferline.input_size"] == "640x480"
    for name in ("queue_wait", "batch_run"):
        attributes = step("inference", name)
        assert attributes["inferline.model"] == "yolov8n" and attributes["inferline.batch_size"] == 1
    assert step("postprocess", "nms")["inferline.recipe"] == "yolo_detect"
    assert step("postprocess", "render")["inferline.format"] == "png"


def test_rpc_spans_carry_the_grpc_status_code_and_a_callers_not_found_is_no_server_error(traced):
    """RPC semantic conventions: a server span is an error only for the server's own failures;
    the unknown model's NOT_FOUND was a correct answer (tests/observability/test_span_status.py
    covers every code)."""
    detect = next(s for s in traced.spans if s["name"] == "inferline.v1.ControllerService/Detect")
    assert detect["attributes"]["rpc.grpc.status_code"] == 0
    assert [(s["service"], s["name"], s["status"]) for s in traced.not_found if s["name"].endswith("/Detect")] == [
        ("controller", "inferline.v1.ControllerService/Detect", 0)
    ]


def test_an_http_callers_traceparent_is_continued_through_the_gateway_and_all_four_stages(traced):
    spans = traced.http_spans
    assert {s["service"] for s in spans} == STAGE_SERVICES | {"gateway"}
    by_id = {s["span_id"]: s for s in spans}
    [server] = [s for s in spans if s["service"] == "gateway" and s["kind"] == SERVER]
    assert server["parent"] == CALLER_SPAN_ID and server["name"] == "POST /v1/detect"
    assert server["attributes"]["http.route"] == "/v1/detect"
    detect = next(s for s in spans if s["service"] == "controller" and s["kind"] == SERVER)
    client = by_id[detect["parent"]]
    assert (client["service"], client["kind"], client["name"]) == ("gateway", CLIENT, detect["name"])
    assert by_id[client["parent"]] is server
    orphans = [(s["service"], s["name"]) for s in spans if s["parent"] not in by_id and s is not server]
    assert not orphans


def test_health_checks_probes_and_scrapes_make_no_spans(traced):
    """The stages were health-checked while starting (and the controller checks its stages); the
    gateway's /healthz, /readyz and /metrics were called: none of it is a trace."""
    health = [s for s in traced.every_span if s["attributes"].get("rpc.service") == "grpc.health.v1.Health"]
    probes = [s for s in traced.every_span
              if s["service"] == "gateway" and any(p in s["name"] for p in ("healthz", "readyz", "metrics"))]
    assert not health and not probes
    gateway_roots = {s["name"] for s in traced.every_span if s["service"] == "gateway" and s["kind"] == SERVER}
    assert gateway_roots == {"POST /v1/detect"}


def test_every_log_line_is_json_and_the_request_lines_carry_its_trace_and_request_id(traced):
    stages, request_id = traced.stages, traced.request_id
    trace_id = traced.spans[0]["trace_id"]
    for stage in STAGE_SERVICES:
        lines = [json.loads(line) for line in stages.log(stage).splitlines() if line.strip()]
        assert lines and all({"ts", "level", "service", "message", "trace_id", "span_id",
                              "request_id"} <= set(record) for record in lines)
        ours = [record for record in lines if record["request_id"] == request_id]
        access = [record for record in ours if record["logger"] == "inferline.access"]
        assert access, f"no access line of the request in the {stage} log"
        for line in access:
            assert line["trace_id"] == trace_id and len(line["span_id"]) == 16
            # The inference stage speaks OIP (Triton's package), every other stage inferline.v1.
            package = "inference." if stage == "inference" else "inferline.v1."
            assert line["status"] == "OK" and line["duration_ms"] > 0 and line["rpc_method"].startswith(package)


def test_an_unreachable_collector_costs_requests_nothing_and_does_not_hold_up_shutdown(
    model_dir, clip_weights, data_dir, tmp_path
):
    closed = free_ports(1)[0]  # nothing listens there
    env = stage_env(model_dir, clip_weights.parent, INFERLINE_MODELS="yolov8n",
                    OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed}", OTEL_EXPORTER_OTLP_INSECURE="true",
                    OTEL_BSP_SCHEDULE_DELAY="100")
    stages = Stages.start(env, tmp_path)
    try:
        with grpc.insecure_channel(stages.target("controller")) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            image = types_pb2.Image(name="shapes_01.jpg", data=(data_dir / "shapes_01.jpg").read_bytes())
            for _ in range(3):
                response = stub.Detect(controller_pb2.DetectRequest(model="yolov8n", images=[image]), timeout=30)
                assert response.results[0].detections
    finally:
        started = time.monotonic()
        stages.stop()
        stopped_in = time.monotonic() - started
    assert all(p.returncode == 0 for p in stages.processes.values()), {
        s: p.returncode for s, p in stages.processes.items()
    }
    # INFERLINE_GRACE_PERIOD_S=2 bounds the drain and then the span flush, each.
    assert stopped_in < 8, f"shutdown took {stopped_in:.1f} s waiting on the collector"
