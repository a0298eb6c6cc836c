"""Faults through real in-process servers: the retry policy of the channels between services,
the drain order of the bootstrap, and the controller's readiness (and the gateway's /readyz)
following its stages (docs/reliability-faults.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.channels import create_channel
from inferline.common.generated import (
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    inference_pb2,
    postprocess_pb2,
    postprocess_pb2_grpc,
)
from inferline.common.server import RETRIED_CALLS, ServerApp, Service
from inferline.common.settings import Settings
from tests.support.gateway import RunningGateway
from tests.support.servers import LoopThread, RunningServer, start_stage


class FlakyPostprocess(postprocess_pb2_grpc.PostprocessServiceServicer):
    """Refuses the first ``failures`` calls with ``code``, then answers; ``gate`` holds calls."""

    def __init__(self, failures: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.attempts = failures, code, 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def Postprocess(self, request, context):  # noqa: N802 - gRPC's method name
        self.attempts += 1
        if self.attempts <= self.failures:
            await context.abort(self.code, "refused on purpose")
        await self.gate.wait()
        return postprocess_pb2.PostprocessResponse()


def _serve(loop: LoopThread, servicer: FlakyPostprocess, name: str = "postprocess") -> RunningServer:
    def register(server: grpc.aio.Server) -> list[str]:
        postprocess_pb2_grpc.add_PostprocessServiceServicer_to_server(servicer, server)
        return ["inferline.v1.PostprocessService"]

    async def start() -> ServerApp:
        app = ServerApp(Service(name, register), Settings(), port=0, host="127.0.0.1")
        await app.start()
        return app

    return RunningServer(loop, loop.run(start()))


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    running = LoopThread()
    yield running
    running.close()


def _postprocess(loop: LoopThread, address: str, request: postprocess_pb2.PostprocessRequest) -> grpc.StatusCode:
    async def call() -> grpc.StatusCode:
        channel = create_channel(address, Settings())
        try:
            await postprocess_pb2_grpc.PostprocessServiceStub(channel).Postprocess(request, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        finally:
            await channel.close()
        return grpc.StatusCode.OK

    return loop.run(call())


def test_a_megabyte_request_refused_with_unavailable_is_retried_until_answered(loop):
    servicer = FlakyPostprocess(failures=2)
    server = _serve(loop, servicer, name="flaky")
    before = RETRIED_CALLS.labels("flaky")._value.get()
    try:
        # Bigger than gRPC's default 256 KiB retry buffer, like a request carrying an image tensor.
        request = postprocess_pb2.PostprocessRequest(labels=["x" * 1_000_000])
        assert _postprocess(loop, server.address, request) is grpc.StatusCode.OK
    finally:
        server.stop()
    assert servicer.attempts == 3
    assert RETRIED_CALLS.labels("flaky")._value.get() - before == 2


@pytest.mark.parametrize("code",
                         [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                          grpc.StatusCode.INVALID_ARGUMENT])
def test_other_statuses_are_never_retried(loop, code):
    servicer = FlakyPostprocess(failures=1, code=code)
    server = _serve(loop, servicer)
    try:
        assert _postprocess(loop, server.address, postprocess_pb2.PostprocessRequest()) is code
    finally:
        server.stop()
    assert servicer.attempts == 1


def _status(channel: grpc.Channel, service: str = "") -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _until(condition, timeout: float = 10.0, what: str = "") -> None:
    """Waits on a health answer (polled), never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.02)


def test_a_draining_stage_is_not_serving_yet_answers_what_callers_sent_before_and_during_the_drain(loop):
    servicer = FlakyPostprocess()
    server = _serve(loop, servicer)
    stub_channel = grpc.insecure_channel(server.address)
    stub = postprocess_pb2_grpc.PostprocessServiceStub(stub_channel)
    loop.loop.call_soon_threadsafe(servicer.gate.clear)
    in_flight = stub.Postprocess.future(postprocess_pb2.PostprocessRequest(), timeout=20)
    _until(lambda: servicer.attempts == 1, what="the first call arrived")
    stopping = threading.Thread(target=lambda: loop.run(server.app.stop(grace=10, drain_delay=1.5)))
    stopping.start()
    try:
        _until(lambda: _status(stub_channel) == "NOT_SERVING", what="health NOT_SERVING at the drain's start")
        assert _status(stub_channel, "inferline.v1.PostprocessService") == "NOT_SERVING"
        during = stub.Postprocess.future(postprocess_pb2.PostprocessRequest(), timeout=20)
        _until(lambda: servicer.attempts == 2, what="a call sent during the drain delay was taken")
        loop.loop.call_soon_threadsafe(servicer.gate.set)
        assert in_flight.result() == postprocess_pb2.PostprocessResponse()
        assert during.result() == postprocess_pb2.PostprocessResponse()
    finally:
        stopping.join(30)
        stub_channel.close()


HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"


class FakeInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Lists the one model it serves (over OIP, as the controller asks); the test decides when
    its load ends."""

    async def RepositoryIndex(self, request, context):  # noqa: N802 - gRPC's method name
        index = grpc_service_pb2.RepositoryIndexResponse.ModelIndex(name="yolov8n", version="1", state="READY")
        return grpc_service_pb2.RepositoryIndexResponse(models=[index])


@dataclasses.dataclass
class FakeStages:
    """Preprocess and postprocess that serve at once, and an inference stage whose load waits."""

    loop: LoopThread
    loaded: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    servers: dict[str, ServerApp] = dataclasses.field(default_factory=dict)

    def start(self) -> None:
        def inference(server: grpc.aio.Server) -> list[str]:
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FakeInference(), server)
            return ["inference.GRPCInferenceService"]

        async def start_all() -> None:
            for stage in ("preprocess", "postprocess"):
                self.servers[stage] = ServerApp(Service(stage, lambda s: []), Settings(), port=0, host="127.0.0.1")
                await self.servers[stage].start()
            app = ServerApp(Service("inference", inference, load=self.loaded.wait), Settings(), port=0,
                            host="127.0.0.1")
            self.servers["inference"] = app
            starting = asyncio.create_task(app.start())
            while not app.port:  # listening, its load still waiting
                await asyncio.sleep(0.01)
            self._starting = starting

        self.loop.run(start_all())

    def targets(self) -> dict[str, str]:
        return {f"{stage}_target": app.address for stage, app in self.servers.items()}


def _container_health_check(target: str, service: str | None = None) -> int:
    """The images' health check (Kubernetes' exec probes with TLS) against ``target``."""
    env = {**os.environ, "INFERLINE_STAGE": "controller", **({"HEALTHCHECK_SERVICE": service} if service else {})}
    return subprocess.run([sys.executable, str(HEALTHCHECK), target], env=env, capture_output=True,
                          timeout=30).returncode


def test_the_controller_is_serving_only_while_its_stages_are_and_per_model(loop):
    stages = FakeStages(loop)
    stages.start()
    settings = dataclasses.replace(Settings(readiness_poll_s=0.05, models=("yolov8n",)), **stages.targets())
    controller = start_stage(loop, "controller", settings)
    gateway = RunningGateway(Settings(), controller.address)
    try:
        with (
            grpc.insecure_channel(controller.address) as channel,
            httpx.Client(base_url=gateway.url, timeout=10) as http,
        ):
            assert _status(channel) == "NOT_SERVING", "inference is still loading"
            assert _status(channel, "model/yolov8n") == "NOT_SERVING"
            assert _status(channel, "inferline.v1.ControllerService") == "SERVING", "it takes calls meanwhile"
            assert http.get("/readyz").status_code == 503
            assert http.get("/readyz", params={"model": "yolov8n"}).status_code == 503
            assert _container_health_check(controller.address) == 1, "readiness: not ready"
            assert _container_health_check(controller.address, "inferline.v1.ControllerService") == 0, "liveness: alive"

            loop.loop.call_soon_threadsafe(stages.loaded.set)
            _until(lambda: _status(channel) == "SERVING", what="SERVING once inference loaded")
            assert _status(channel, "model/yolov8n") == "SERVING"
            assert _status(channel, "model/nope") == "NOT_FOUND"
            assert http.get("/readyz").status_code == 200
            assert http.get("/readyz", params={"model": "yolov8n"}).status_code == 200
            unknown = http.get("/readyz", params={"model": "nope"})
            assert unknown.status_code == 404 and "model 'nope' is not served" in unknown.json()["detail"]

            loop.run(stages.servers["postprocess"].stop(grace=0))
            _until(lambda: _status(channel) == "NOT_SERVING", what="NOT_SERVING once postprocess is gone")
            assert _status(channel, "model/yolov8n") == "NOT_SERVING"
            assert http.get("/readyz").status_code == 503
    finally:
        gateway.stop()
        controller.stop()
        for app in stages.servers.values():
            loop.run(app.stop(grace=0))


class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    async def ListModels(self, request, context):  # noqa: N802 - gRPC's method name
        return inference_pb2.ListModelsResponse(models=[inference_pb2.ModelMetadataResponse(name="yolov8n")])


def _fake_controller(loop: LoopThread, port: int = 0) -> RunningServer:
    def register(server: grpc.aio.Server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(FakeController(), server)
        return ["inferline.v1.ControllerService"]

    async def start() -> ServerApp:
        app = ServerApp(Service("controller", register), Settings(), port=port, host="127.0.0.1")
        await app.start()
        return app

    return RunningServer(loop, loop.run(start()))


# Longer than the retry policy's attempts take (5 attempts, backoffs of at most 0.2+0.4+0.8+1.6 s).
CONTROLLER_OUTAGE_S = 4.0


def test_the_gateway_waits_for_a_controller_that_restarts_instead_of_answering_503(loop):
    controller = _fake_controller(loop)
    port = controller.app.port
    gateway = RunningGateway(Settings(), f"127.0.0.1:{port}")
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert http.get("/v1/models").status_code == 200
            controller.stop(grace=0)
            with ThreadPoolExecutor(1) as pool:
                during = pool.submit(http.get, "/v1/models", headers={"X-Request-Timeout": "20"})
                time.sleep(CONTROLLER_OUTAGE_S)  # the outage itself, not a wait for something
                controller = _fake_controller(loop, port)
                answer = during.result()
            assert answer.status_code == 200, answer.text
            assert answer.json()["models"][0]["name"] == "yolov8n"
    finally:
        gateway.stop()
        controller.stop()
