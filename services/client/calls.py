"""What the sync and async clients share: the controller's methods with their conversions, the
wait-for-ready policy, and how a failed call becomes a domain error."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from inferline.common.api import ClassifyRequest, ClassifyResult, DetectRequest, DetectResult, EmbedRequest, EmbedResult
from inferline.common.errors import InferlineError
from inferline.common.generated import controller_pb2, inference_pb2
from inferline.common.status import STATUS_TABLE, error_for, retry_after_s
from inferline.common.telemetry.context import REQUEST_ID_HEADER

Request = TypeVar("Request")
Result = TypeVar("Result")

# The controller's health name that is SERVING while it takes calls (not draining): a channel
# sends calls to a controller replica while it does, even while a stage is down, since the
# controller waits for its stages itself.
CONTROLLER_SERVICE = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name

# How long a readiness check (``health``) waits for the controller's answer.
HEALTH_TIMEOUT_S = 2.0

_TABLE_CODES = {code for _, code, _ in STATUS_TABLE}


def error_from_rpc(exc: grpc.RpcError) -> InferlineError:
    """The domain error of a failed call, by the one status table read backwards.

    A status the table has no row for (UNIMPLEMENTED from an older controller, CANCELLED) becomes
    ``StageFailed`` with the status name kept in its message; a retry hint the server sent
    (``RetryInfo``) is kept as the error's ``retry_after_s``.
    """
    code = exc.code()
    details = exc.details() or code.name
    error = error_for(code, details if code in _TABLE_CODES else f"{code.name}: {details}")
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    hint = retry_after_s(trailers)
    if hint is not None:
        error.retry_after_s = hint
    return error


class Reachability:
    """Whether a call should wait for the controller (gRPC wait-for-ready, up to its deadline).

    It waits while the controller answered less than ``outage_wait_s`` ago, so a restarting
    controller costs latency, not errors; one never reached, or gone longer, fails fast.
    """

    def __init__(self, outage_wait_s: float):
        self.outage_wait_s = outage_wait_s
        self._answered: float | None = None

    def wait_for_ready(self) -> bool:
        return self._answered is not None and time.monotonic() - self._answered <= self.outage_wait_s

    def answered(self) -> None:
        self._answered = time.monotonic()

    def failed_with(self, code: grpc.StatusCode) -> None:
        """A call failed: any status but UNAVAILABLE or DEADLINE_EXCEEDED is the controller's
        own answer."""
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.answered()


def metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """The request id, for the controller's logs (and the stages', which it passes it on to)."""
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()


@dataclass(frozen=True)
class Operation(Generic[Request, Result]):
    """One controller method: its stub attribute and the conversions on either side of it."""

    method: str
    to_proto: Callable[[Request], Message]
    from_proto: Callable[[Any], Result]


DETECT: Operation[DetectRequest, DetectResult] = Operation("Detect", DetectRequest.to_proto, DetectResult.from_proto)
CLASSIFY: Operation[ClassifyRequest, ClassifyResult] = Operation(
    "Classify", ClassifyRequest.to_proto, ClassifyResult.from_proto
)
EMBED: Operation[EmbedRequest, EmbedResult] = Operation("Embed", EmbedRequest.to_proto, EmbedResult.from_proto)
MODELS: Operation[None, list[inference_pb2.ModelMetadataResponse]] = Operation(
    "ListModels", lambda _: inference_pb2.ListModelsRequest(), lambda reply: list(reply.models)
)
MODEL: Operation[str, inference_pb2.ModelMetadataResponse] = Operation(
    "ModelInfo", lambda name: inference_pb2.ModelMetadataRequest(name=name), lambda reply: reply
)


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    """SERVING or NOT_SERVING (or UNKNOWN, SERVICE_UNKNOWN: the health protocol's names)."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def health_failure(exc: grpc.RpcError) -> str:
    """NOT_FOUND for a health name the controller does not know, else UNREACHABLE."""
    return "NOT_FOUND" if exc.code() is grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
