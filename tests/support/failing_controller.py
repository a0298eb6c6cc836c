"""A controller whose every call raises the domain error its request names, through the real
server bootstrap and its error interceptor: for testing the gateway against the whole status table.

``Detect(model="Overloaded")`` raises ``errors.Overloaded``; so do Classify, Embed and ModelInfo.
"""

from __future__ import annotations

import grpc

from inferline.common import errors
from inferline.common.generated import controller_pb2, controller_pb2_grpc
from inferline.common.server import Service
from inferline.common.settings import Settings


def _raise(name: str) -> None:
    kind = getattr(errors, name, None)
    if kind is None:
        raise RuntimeError(f"secret internals of {name}")  # an unexpected failure: INTERNAL
    raise kind(f"raised {name} on purpose")


class FailingController(controller_pb2_grpc.ControllerServiceServicer):
    async def Detect(self, request, context):  # noqa: N802 - gRPC's method name
        _raise(request.model)

    async def Classify(self, request, context):  # noqa: N802 - gRPC's method name
        _raise(request.model)

    async def Embed(self, request, context):  # noqa: N802 - gRPC's method name
        _raise(request.model)

    async def ModelInfo(self, request, context):  # noqa: N802 - gRPC's method name
        _raise(request.name)


def build_service(settings: Settings) -> Service:
    def register(server: grpc.aio.Server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(FailingController(), server)
        return [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name]

    return Service("failing-controller", register)
