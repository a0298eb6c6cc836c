"""The gateway's one gRPC channel to the controller, and the calls it makes on it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.channels import create_channel
from inferline.common.generated import controller_pb2, controller_pb2_grpc, inference_pb2
from inferline.common.settings import Settings
from inferline.services.controller.stages import MODEL_HEALTH_PREFIX

# The controller's health name that is SERVING while it takes calls (not draining).
CONTROLLER_SERVICE = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name

Reply = TypeVar("Reply")

# How long /readyz waits for the controller's health answer before calling it not ready.
READY_TIMEOUT_S = 2.0


class ControllerClient:
    """Async stubs on one channel, created on the server's event loop and reused by every request.

    Each call carries the caller's deadline (``timeout``) and request id, so the controller
    propagates the one and can log the other. A call waits for the controller (gRPC
    wait-for-ready, up to its deadline) while the controller answered less than
    ``stage_outage_wait_s`` ago, so a restarting controller costs latency, not 503s; one never
    reached, or gone longer, fails fast.
    """

    def __init__(self, settings: Settings):
        self.target = settings.controller_target
        self.outage_wait_s = settings.stage_outage_wait_s
        # A controller replica gets calls while it takes them (not draining), even while a stage
        # is down: it waits for its stages itself, and so that wait is shared by every replica.
        self.channel = create_channel(
            settings.controller_target, settings, health_service=CONTROLLER_SERVICE
        )
        self.stub = controller_pb2_grpc.ControllerServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._answered: float | None = None

    async def _call(self, method: Callable[..., Awaitable[Reply]], request: object, timeout: float, request_id: str) -> Reply:
        expected = self._answered is not None and time.monotonic() - self._answered <= self.outage_wait_s
        try:
            reply = await method(
                request, timeout=timeout, metadata=(("x-request-id", request_id),), wait_for_ready=expected
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._answered = time.monotonic()
            raise
        self._answered = time.monotonic()
        return reply

    async def detect(
        self, request: controller_pb2.DetectRequest, *, timeout: float, request_id: str
    ) -> controller_pb2.DetectResponse:
        return await self._call(self.stub.Detect, request, timeout, request_id)

    async def classify(
        self, request: controller_pb2.ClassifyRequest, *, timeout: float, request_id: str
    ) -> controller_pb2.ClassifyResponse:
        return await self._call(self.stub.Classify, request, timeout, request_id)

    async def embed(
        self, request: controller_pb2.EmbedRequest, *, timeout: float, request_id: str
    ) -> controller_pb2.EmbedResponse:
        return await self._call(self.stub.Embed, request, timeout, request_id)

    async def list_models(self, *, timeout: float, request_id: str) -> inference_pb2.ListModelsResponse:
        return await self._call(self.stub.ListModels, inference_pb2.ListModelsRequest(), timeout, request_id)

    async def model_info(self, name: str, *, timeout: float, request_id: str) -> inference_pb2.ModelMetadataResponse:
        return await self._call(self.stub.ModelInfo, inference_pb2.ModelMetadataRequest(name=name), timeout, request_id)

    async def health(self, model: str = "") -> str:
        """The controller's health right now: the whole controller, or with ``model`` its health
        name ``model/<model>``: SERVING, NOT_SERVING, NOT_FOUND (a model it does not serve) or
        UNREACHABLE."""
        service = MODEL_HEALTH_PREFIX + model if model else ""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=READY_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return "NOT_FOUND" if exc.code() is grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self.channel.close()
