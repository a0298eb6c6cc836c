"""The common bootstrap: health, reflection, error mapping and graceful drain, on real servers."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inferline.common import errors
from inferline.common.server import ServerApp, Service
from inferline.common.settings import Settings
from inferline.common.status import INTERNAL_MESSAGE, retry_after_s
from inferline.services.stack import wait_serving
from tests.support import slow_server
from tests.support.servers import LoopThread

REPO = Path(__file__).resolve().parents[2]
ERRORS_SERVICE = "inferline.test.Errors"


def _raising_service(exc: Exception) -> Service:
    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise exc

    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(fail)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ERRORS_SERVICE, {"Fail": handler})])
        return [ERRORS_SERVICE]

    return Service("errors", register)


@pytest.fixture()
def loop():
    running = LoopThread()
    yield running
    running.close()


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (errors.InvalidInput("bad image"), grpc.StatusCode.INVALID_ARGUMENT, "bad image"),
        (errors.WrongTask("wrong task"), grpc.StatusCode.INVALID_ARGUMENT, "wrong task"),
        (errors.ModelNotFound("no such model"), grpc.StatusCode.NOT_FOUND, "no such model"),
        (errors.ModelNotReady("loading"), grpc.StatusCode.UNAVAILABLE, "loading"),
        (errors.StageUnavailable("stage down"), grpc.StatusCode.UNAVAILABLE, "stage down"),
        (errors.Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        (errors.DeadlineExceeded("too late"), grpc.StatusCode.DEADLINE_EXCEEDED, "too late"),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE),
    ],
)
def test_domain_errors_become_their_status_codes_through_a_real_server(loop, exc, code, message):
    app = ServerApp(_raising_service(exc), Settings(), port=0, host="127.0.0.1")
    loop.run(app.start())
    try:
        with grpc.insecure_channel(app.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f"/{ERRORS_SERVICE}/Fail")(b"", timeout=5)
        assert raised.value.code() is code
        assert raised.value.details() == message
        assert _health(app.address) == health_pb2.HealthCheckResponse.SERVING, "the server stays up"
    finally:
        loop.run(app.stop(0))


def test_overloaded_carries_its_retry_delay_as_retry_info(loop):
    app = ServerApp(_raising_service(errors.Overloaded("queue full", retry_after_s=1.25)), Settings(), port=0,
                    host="127.0.0.1")
    loop.run(app.start())
    try:
        with grpc.insecure_channel(app.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f"/{ERRORS_SERVICE}/Fail")(b"", timeout=5)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after_s(raised.value.trailing_metadata()) == pytest.approx(1.25)
        assert ("grpc-retry-pushback-ms", "1250") in tuple(raised.value.trailing_metadata())
    finally:
        loop.run(app.stop(0))


def test_a_stock_grpc_client_retrying_resource_exhausted_waits_the_pushback(loop):
    """A client whose own retry policy retries RESOURCE_EXHAUSTED needs no inferline code to
    back off: gRPC obeys the server's pushback before its next attempt."""
    attempts: list[float] = []

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        attempts.append(time.monotonic())
        raise errors.Overloaded("queue full", retry_after_s=0.6)

    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(refuse)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ERRORS_SERVICE, {"Fail": handler})])
        return [ERRORS_SERVICE]

    app = ServerApp(Service("refusing", register), Settings(), port=0, host="127.0.0.1")
    loop.run(app.start())
    policy = {"methodConfig": [{"name": [{"service": ERRORS_SERVICE}], "retryPolicy": {
        "maxAttempts": 2, "initialBackoff": "0.01s", "maxBackoff": "0.01s", "backoffMultiplier": 1,
        "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]}}]}
    try:
        options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(policy))]
        with grpc.insecure_channel(app.address, options=options) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f"/{ERRORS_SERVICE}/Fail")(b"", timeout=5)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(attempts) == 2
        assert attempts[1] - attempts[0] >= 0.55, "the retry waited the pushback, not the 10 ms backoff"
    finally:
        loop.run(app.stop(0))


def test_an_overload_without_an_estimate_sends_no_retry_info(loop):
    app = ServerApp(_raising_service(errors.Overloaded("queue full")), Settings(), port=0, host="127.0.0.1")
    loop.run(app.start())
    try:
        with grpc.insecure_channel(app.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(f"/{ERRORS_SERVICE}/Fail")(b"", timeout=5)
        assert retry_after_s(raised.value.trailing_metadata()) is None
    finally:
        loop.run(app.stop(0))


def test_client_strings_are_quoted_short():
    assert errors.quoted("yolov8n") == "'yolov8n'"
    long = errors.quoted("x" * 100_000)
    assert len(long) < 120 and long.endswith("[100002 chars]")


def test_health_is_not_serving_until_load_finishes(loop):
    loading = threading.Event()
    release = asyncio.Event()

    async def load() -> None:
        loading.set()
        await release.wait()

    service = Service("loading", lambda server: [], load=load)
    app = ServerApp(service, Settings(), port=0, host="127.0.0.1")
    started = asyncio.run_coroutine_threadsafe(app.start(), loop.loop)
    assert loading.wait(10)
    assert _health(app.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    loop.loop.call_soon_threadsafe(release.set)
    started.result(10)
    assert _health(app.address) == health_pb2.HealthCheckResponse.SERVING
    loop.run(app.stop(0))


def test_reflection_lists_the_registered_services(loop):
    app = ServerApp(_raising_service(RuntimeError()), Settings(), port=0, host="127.0.0.1")
    loop.run(app.start())
    try:
        with grpc.insecure_channel(app.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
            names = {s.name for reply in replies for s in reply.list_services_response.service}
        assert {ERRORS_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    finally:
        loop.run(app.stop(0))


def test_binding_a_port_in_use_fails_with_a_clear_error(loop):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = ServerApp(_raising_service(RuntimeError()), Settings(), port=port, host="127.0.0.1")
        with pytest.raises(errors.ConfigError, match="cannot listen"):
            loop.run(app.start())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_the_call_in_flight_then_exits_cleanly():
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.slow_server", str(port)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_serving(f"localhost:{port}", timeout=30, alive=lambda: process.poll() is None)
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            call = channel.unary_unary(slow_server.METHOD).future(b"", timeout=20)
            assert process.stdout.readline().strip() == "in-flight"
            process.send_signal(signal.SIGTERM)
            assert call.result() == b"done", "the call in flight at SIGTERM completes"
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()


_NICE_CHILD = """
import os, threading
from inferline.common.server import lower_priority
from inferline.common.settings import Settings
from inferline.services.inference.servicer import build_service

service = build_service(Settings.from_env())
before = os.getpriority(os.PRIO_PROCESS, 0)
lower_priority(service)
seen = []
later = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
later.start(); later.join()
print(service.nice, os.getpriority(os.PRIO_PROCESS, 0) - before, seen[0] - before)
"""


def test_the_inference_stage_starts_at_its_niceness_and_its_later_threads_inherit_it(tmp_path):
    """INFERLINE_INFERENCE_NICE: the model's threads, made after the start, yield to the short
    stages' wake-ups on a shared host. In a child process: niceness cannot be taken back."""
    env = {"INFERLINE_INFERENCE_NICE": "5", "INFERLINE_MODELS": "", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _NICE_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["5", "5", "5"]
    unchanged = subprocess.run([sys.executable, "-c", _NICE_CHILD], env={**env, "INFERLINE_INFERENCE_NICE": "0"},
                               capture_output=True, text=True, timeout=120)
    assert unchanged.stdout.split() == ["0", "0", "0"], unchanged.stderr[-2000:]
