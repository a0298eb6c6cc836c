"""gRPC transport of the controller, the public API: protos in, domain values to the operations,
protos out (``common/api.py`` holds each message's one conversion)."""

from __future__ import annotations

import grpc

from inferline.common.api import ClassifyRequest, DetectRequest, EmbedRequest
from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    inference_pb2,
)
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.services.controller import oip_pipelines
from inferline.services.controller.oip_servicer import OipPipelineServicer
from inferline.services.controller.operations import Controller
from inferline.services.controller.ports import Deadline, Stages


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    def __init__(self, settings: Settings, controller: Controller):
        self.settings = settings
        self.controller = controller

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        """The caller's deadline flows on to every stage; without one, the configured default."""
        remaining = context.time_remaining()
        return Deadline(self.settings.default_timeout_s if remaining is None else remaining)

    async def Detect(  # noqa: N802 - gRPC's method name
        self, request: controller_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.DetectResponse:
        result = await self.controller.detect(DetectRequest.from_proto(request), self._deadline(context))
        return result.to_proto()

    async def Classify(  # noqa: N802 - gRPC's method name
        self, request: controller_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ClassifyResponse:
        result = await self.controller.classify(ClassifyRequest.from_proto(request), self._deadline(context))
        return result.to_proto()

    async def Embed(  # noqa: N802 - gRPC's method name
        self, request: controller_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.EmbedResponse:
        result = await self.controller.embed(EmbedRequest.from_proto(request), self._deadline(context))
        return result.to_proto()

    async def ListModels(  # noqa: N802 - gRPC's method name
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        models = await self.controller.list_models(self._deadline(context))
        return inference_pb2.ListModelsResponse(models=[m.to_metadata() for m in models])

    async def ModelInfo(  # noqa: N802 - gRPC's method name
        self, request: inference_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ModelMetadataResponse:
        info = await self.controller.model_info(request.name, self._deadline(context))
        return info.to_metadata()


def build_service(settings: Settings) -> Service:
    """The controller; with ``settings.inprocess`` it also holds the three stages (and serves
    only once their models are loaded). Otherwise it is SERVING only while every stage it calls
    is (checked from its load on, so the first check is done before it takes a call), and its
    health names ``model/<name>`` say which models answer (services/controller/stages.py)."""
    readiness = None
    stages: Stages
    if settings.inprocess:
        from inferline.services.controller.local_ports import LocalStages  # noqa: PLC0415 - imports the stages

        stages = LocalStages(settings)
        ready = oip_pipelines.loaded(stages.services["inference"])
    else:
        from inferline.services.controller.grpc_ports import GrpcStages  # noqa: PLC0415 - one of two transports

        clients = GrpcStages(settings)
        stages, readiness, ready = clients, clients.watcher.run, oip_pipelines.watched(clients.watcher)
    controller = Controller(settings, stages)
    servicer = ControllerServicer(settings, controller)
    # The same operations as Open Inference Protocol models, one per pipeline (oip_servicer.py).
    pipelines = OipPipelineServicer(settings, controller, ready)
    if not settings.inprocess:
        # A model loaded, reloaded or unloaded on the inference stage is planned afresh, and the
        # pipelines are listed afresh.
        def model_changed(name: str) -> None:
            controller.plans.forget(name)
            pipelines.catalog.forget(name)

        clients.watcher.on_model_change = model_changed

    def register(server: grpc.aio.Server) -> list[str]:
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(pipelines, server)
        return [
            controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]

    return Service("controller", register, load=stages.load, close=stages.close, servicer=servicer, readiness=readiness)
