"""RPC spans follow OpenTelemetry's semantic conventions, through a real grpc.aio server with the
telemetry interceptor: a server span is an error only for the server's own failures (a caller's
NOT_FOUND or INVALID_ARGUMENT is a correct answer), and health checks make no span at all.

The spans go to an in-memory exporter of a tracer provider local to this test (the process-wide
one stays untouched for the other tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from inferline.common.telemetry import tracing
from inferline.common.telemetry.interceptors import TelemetryServerInterceptor
from tests.observability.harness import wait_for
from tests.support.servers import LoopThread

METHOD = "/test.Fails/Fail"


async def _fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Answers with the status code named in the request (OK answers the request back)."""
    code = grpc.StatusCode[request.decode()]
    if code is not grpc.StatusCode.OK:
        await context.abort(code, f"asked for {code.name}")
    return request


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    patch = pytest.MonkeyPatch()
    patch.setattr(tracing, "_enabled", True)
    patch.setattr(tracing, "_TRACER", provider.get_tracer("inferline"))
    loop = LoopThread()

    async def start() -> tuple[grpc.aio.Server, int]:
        aio = grpc.aio.server(interceptors=[TelemetryServerInterceptor("preprocess")])
        aio.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Fails", {"Fail": grpc.unary_unary_rpc_method_handler(_fail)}
        )])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), aio)
        port = aio.add_insecure_port("127.0.0.1:0")
        await aio.start()
        return aio, port

    aio, port = loop.run(start())
    try:
        yield f"127.0.0.1:{port}", exporter
    finally:
        loop.run(aio.stop(0))
        loop.close()
        patch.undo()


def _call(target: str, code: str) -> None:
    with grpc.insecure_channel(target) as channel:
        fail = channel.unary_unary(METHOD)
        try:
            fail(code.encode(), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code().name == code


@pytest.mark.parametrize(
    "code, error",
    [
        ("OK", False),
        ("NOT_FOUND", False),
        ("INVALID_ARGUMENT", False),
        ("RESOURCE_EXHAUSTED", False),
        ("UNKNOWN", True),
        ("DEADLINE_EXCEEDED", True),
        ("UNIMPLEMENTED", True),
        ("INTERNAL", True),
        ("UNAVAILABLE", True),
        ("DATA_LOSS", True),
    ],
)
def test_a_server_span_is_an_error_only_for_the_servers_own_failures(server, code, error):
    target, exporter = server
    exporter.clear()
    _call(target, code)
    # The server ends its span after the status went out: wait for it.
    name = METHOD.lstrip("/")
    [span] = wait_for(lambda: [s for s in exporter.get_finished_spans() if s.name == name], 10, "the span")
    assert span.kind is SpanKind.SERVER
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode[code].value[0]
    assert span.status.status_code is (StatusCode.ERROR if error else StatusCode.UNSET)


def test_health_checks_are_answered_but_never_traced(server):
    target, exporter = server
    exporter.clear()
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    _call(target, "OK")  # after the health check, so its span would be there by the time this one is
    name = METHOD.lstrip("/")
    wait_for(lambda: [s for s in exporter.get_finished_spans() if s.name == name], 30, "the Fail span")
    assert not [s.name for s in exporter.get_finished_spans() if "Health" in s.name]
