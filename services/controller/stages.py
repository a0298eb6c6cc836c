"""Clients of the three stages, with their failures turned into domain errors.

One channel per stage, made once and reused by every request. A stage's status becomes the
controller's status with the stage named in the message, so a caller sees "inference stage at
localhost:50053 is unavailable" rather than a bare UNAVAILABLE.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from inferline.common.channels import create_channel
from inferline.common.errors import DeadlineExceeded, StageUnavailable
from inferline.common.generated import (
    inference_pb2_grpc,
    postprocess_pb2_grpc,
    preprocess_pb2_grpc,
)
from inferline.common.settings import Settings
from inferline.common.status import error_for

Response = TypeVar("Response")


class Deadline:
    """The caller's deadline, shared by every stage call of one request."""

    def __init__(self, seconds: float):
        self.expires = time.monotonic() + seconds

    def remaining(self, stage: str) -> float:
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
        return left


class StageClients:
    def __init__(self, settings: Settings):
        self.targets = {stage: settings.target(stage) for stage in ("preprocess", "inference", "postprocess")}
        self._channels = {stage: create_channel(target, settings) for stage, target in self.targets.items()}
        self.preprocess = preprocess_pb2_grpc.PreprocessServiceStub(self._channels["preprocess"])
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._channels["inference"])
        self.postprocess = postprocess_pb2_grpc.PostprocessServiceStub(self._channels["postprocess"])

    async def call(
        self, stage: str, method: Callable[..., Awaitable[Response]], request: object, deadline: Deadline
    ) -> Response:
        try:
            return await method(request, timeout=deadline.remaining(stage))
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                raise StageUnavailable(f"{stage} stage at {self.targets[stage]} is unavailable: {details}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"deadline exceeded in the {stage} stage") from None
            # The caller's own mistakes read best unprefixed; anything else names the stage.
            caller_error = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            raise error_for(code, details if caller_error else f"{stage} stage: {details}") from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
