"""The three stages inside the controller's process: the same servicers, no gRPC between them.

``inferline serve controller --inprocess`` (``INFERLINE_INPROCESS=true``) swaps the controller's
``StageClients`` for ``LocalStages``. Requests still arrive over gRPC at the controller, but the
stage calls are plain awaits on the stage servicers with the request messages as they are: no
serialisation, no sockets, no second process. Comparing it with the four services measures what
the service boundaries cost (bench/compare.py), on the very code that serves.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.services.controller.stages import Deadline

Response = TypeVar("Response")
STAGES = ("preprocess", "inference", "postprocess")


class _Context:
    """What the stage servicers use of a ``grpc.aio.ServicerContext``: the time left."""

    def __init__(self, timeout: float | None):
        self._expires = None if timeout is None else time.monotonic() + timeout

    def time_remaining(self) -> float | None:
        return None if self._expires is None else max(0.0, self._expires - time.monotonic())


class _LocalStub:
    """``stub.Method(request, timeout=...)`` that awaits ``servicer.Method(request, context)``."""

    def __init__(self, servicer: Any):
        self._servicer = servicer

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        handler = getattr(self._servicer, method)

        async def call(request: Any, timeout: float | None = None) -> Any:
            return await handler(request, _Context(timeout))

        return call


class LocalStages:
    """Drop-in for ``StageClients``: stage errors arrive as the domain errors the stage raised,
    which the controller's own interceptor maps to statuses with the same table."""

    def __init__(self, settings: Settings):
        self.targets = {stage: "in-process" for stage in STAGES}
        self.services: dict[str, Service] = {
            stage: importlib.import_module(f"inferline.services.{stage}.servicer").build_service(settings)
            for stage in STAGES
        }
        self.preprocess = _LocalStub(self.services["preprocess"].servicer)
        self.inference = _LocalStub(self.services["inference"].servicer)
        self.postprocess = _LocalStub(self.services["postprocess"].servicer)

    async def load(self) -> None:
        for service in self.services.values():
            if service.load is not None:
                await service.load()

    async def call(
        self, stage: str, method: Callable[..., Awaitable[Response]], request: object, deadline: Deadline
    ) -> Response:
        return await method(request, timeout=deadline.remaining(stage))

    async def close(self) -> None:
        for service in self.services.values():
            if service.close is not None:
                await service.close()
