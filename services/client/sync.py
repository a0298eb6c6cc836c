"""The blocking client: for the CLI, scripts and benchmarks (no event loop needed)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferline.common.api import ClassifyRequest, ClassifyResult, DetectRequest, DetectResult, EmbedRequest, EmbedResult
from inferline.common.channels import create_blocking_channel
from inferline.common.generated import controller_pb2_grpc, inference_pb2
from inferline.common.settings import Settings
from inferline.services.client import calls


class Client:
    """The controller's public API on one channel: domain values in, domain values out.

    ``target`` defaults to ``settings.controller_target``; ``settings`` (default: plaintext, the
    built-in limits) gives the channel its TLS files, message limit and retry policy, as for
    the services' own channels. ``timeout`` is the deadline of each call in seconds unless the
    call names its own (None: no deadline). A failed call raises the domain error of its status
    (see the package's docstring).
    """

    def __init__(self, target: str | None = None, settings: Settings | None = None, *, timeout: float | None = None):
        settings = settings or Settings()
        self.target = target or settings.controller_target
        self.timeout = timeout
        self.channel = create_blocking_channel(self.target, settings, health_service=calls.CONTROLLER_SERVICE)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._reachability = calls.Reachability(settings.stage_outage_wait_s)

    def detect(self, request: DetectRequest, *, timeout: float | None = None, request_id: str = "") -> DetectResult:
        return self._call(calls.DETECT, request, timeout, request_id)

    def classify(
        self, request: ClassifyRequest, *, timeout: float | None = None, request_id: str = ""
    ) -> ClassifyResult:
        return self._call(calls.CLASSIFY, request, timeout, request_id)

    def embed(self, request: EmbedRequest, *, timeout: float | None = None, request_id: str = "") -> EmbedResult:
        return self._call(calls.EMBED, request, timeout, request_id)

    def models(
        self, *, timeout: float | None = None, request_id: str = ""
    ) -> list[inference_pb2.ModelMetadataResponse]:
        return self._call(calls.MODELS, None, timeout, request_id)

    def model(
        self, name: str, *, timeout: float | None = None, request_id: str = ""
    ) -> inference_pb2.ModelMetadataResponse:
        return self._call(calls.MODEL, name, timeout, request_id)

    def health(self, service: str = "") -> str:
        """The controller's health now: SERVING, NOT_SERVING, NOT_FOUND or UNREACHABLE; never raises.
        ``service`` is a health name: "" for the controller as a whole (SERVING while its stages
        are), ``model/<name>`` for one model (services/controller/stages.py)."""
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = self._health.Check(  # type: ignore[attr-defined]  # stubs list no methods
                request, timeout=calls.HEALTH_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return calls.health_failure(exc)
        return calls.health_status(reply)

    def _call(
        self, operation: calls.Operation[Any, calls.Result], request: Any, timeout: float | None, request_id: str
    ) -> calls.Result:
        method = getattr(self._stub, operation.method)
        try:
            reply = method(
                operation.to_proto(request),
                timeout=self.timeout if timeout is None else timeout,
                metadata=calls.metadata(request_id),
                wait_for_ready=self._reachability.wait_for_ready(),
            )
        except grpc.RpcError as exc:
            self._reachability.failed_with(exc.code())
            raise calls.error_from_rpc(exc) from exc
        self._reachability.answered()
        return operation.from_proto(reply)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
