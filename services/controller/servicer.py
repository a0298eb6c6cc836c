"""gRPC transport of the controller, the public API."""

from __future__ import annotations

import grpc

from inferline.common.generated import controller_pb2, controller_pb2_grpc
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.services.controller.pipeline import Controller
from inferline.services.controller.stages import Deadline, StageClients


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(self, settings: Settings, controller: Controller):
        self.settings = settings
        self.controller = controller

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        """The caller's deadline flows on to every stage; without one, the configured default."""
        remaining = context.time_remaining()
        return Deadline(self.settings.default_timeout_s if remaining is None else remaining)

    async def Detect(self, request, context):
        return await self.controller.detect(request, self._deadline(context))

    async def Classify(self, request, context):
        return await self.controller.classify(request, self._deadline(context))

    async def Embed(self, request, context):
        return await self.controller.embed(request, self._deadline(context))

    async def ListModels(self, request, context):
        return await self.controller.list_models(self._deadline(context))

    async def ModelInfo(self, request, context):
        return await self.controller.model_metadata(request.name, self._deadline(context))


def build_service(settings: Settings) -> Service:
    """The controller; with ``settings.inprocess`` it also holds the three stages (and serves
    only once their models are loaded). Otherwise it is SERVING only while every stage it calls
    is (checked from its load on, so the first check is done before it takes a call), and its
    health names ``model/<name>`` say which models answer (services/controller/stages.py)."""
    readiness = None
    if settings.inprocess:
        from inferline.services.controller.inprocess import LocalStages  # noqa: PLC0415 - imports the stages

        local = LocalStages(settings)
        stages: StageClients | LocalStages = local
        load = local.load
    else:
        clients = StageClients(settings)
        stages, readiness = clients, clients.watcher.run

        async def load() -> None:
            await clients.watcher.poll()
    servicer = ControllerServicer(settings, Controller(settings, stages))

    def register(server: grpc.aio.Server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)
        return [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name]

    return Service("controller", register, load=load, close=stages.close, servicer=servicer, readiness=readiness)
