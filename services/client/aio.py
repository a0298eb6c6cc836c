"""The asyncio client: for the HTTP gateway and the load generator (grpc.aio, on their loop)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.api import ClassifyRequest, ClassifyResult, DetectRequest, DetectResult, EmbedRequest, EmbedResult
from inferline.common.channels import create_channel
from inferline.common.generated import controller_pb2_grpc, inference_pb2
from inferline.common.settings import Settings
from inferline.services.client import calls


class AsyncClient:
    """:class:`~inferline.services.client.sync.Client` on a grpc.aio channel: the same
    arguments, methods (awaited) and errors. Create it on the event loop that will use it.
    The channel carries the services' telemetry interceptor, so a gateway's trace continues
    into the controller."""

    def __init__(self, target: str | None = None, settings: Settings | None = None, *, timeout: float | None = None):
        settings = settings or Settings()
        self.target = target or settings.controller_target
        self.timeout = timeout
        self.channel = create_channel(self.target, settings, health_service=calls.CONTROLLER_SERVICE)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._reachability = calls.Reachability(settings.stage_outage_wait_s)

    async def detect(
        self, request: DetectRequest, *, timeout: float | None = None, request_id: str = ""
    ) -> DetectResult:
        return await self._call(calls.DETECT, request, timeout, request_id)

    async def classify(
        self, request: ClassifyRequest, *, timeout: float | None = None, request_id: str = ""
    ) -> ClassifyResult:
        return await self._call(calls.CLASSIFY, request, timeout, request_id)

    async def embed(self, request: EmbedRequest, *, timeout: float | None = None, request_id: str = "") -> EmbedResult:
        return await self._call(calls.EMBED, request, timeout, request_id)

    async def models(
        self, *, timeout: float | None = None, request_id: str = ""
    ) -> list[inference_pb2.ModelMetadataResponse]:
        return await self._call(calls.MODELS, None, timeout, request_id)

    async def model(
        self, name: str, *, timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.ModelMetadataResponse:
        return await self._call(calls.MODEL, name, timeout, request_id)

    async def health(self, service: str = "") -> str:
        """The controller's health now: SERVING, NOT_SERVING, NOT_FOUND or UNREACHABLE; never raises.
        ``service`` is a health name: "" for the controller as a whole (SERVING while its stages
        are), ``model/<name>`` for one model (services/controller/stages.py)."""
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = await self._health.Check(  # type: ignore[attr-defined]  # stubs list no methods
                request, timeout=calls.HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            return calls.health_failure(exc)
        return calls.health_status(reply)

    async def _call(
        self, operation: calls.Operation[Any, calls.Result], request: Any, timeout: float | None, request_id: str
    ) -> calls.Result:
        method = getattr(self._stub, operation.method)
        try:
            reply = await method(
                operation.to_proto(request),
                timeout=self.timeout if timeout is None else timeout,
                metadata=calls.metadata(request_id),
                wait_for_ready=self._reachability.wait_for_ready(),
            )
        except grpc.aio.AioRpcError as exc:
            self._reachability.failed_with(exc.code())
            raise calls.error_from_rpc(exc) from exc
        self._reachability.answered()
        return operation.from_proto(reply)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
