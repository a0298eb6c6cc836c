"""gRPC transport of the inference stage: proto <-> ``Inference`` (service.py), nothing else."""

from __future__ import annotations

import grpc

from inferline.common import tensors
from inferline.common.errors import InvalidInput
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc, inference_pb2, inference_pb2_grpc
from inferline.common.items import LazySequence
from inferline.common.server import Service
from inferline.common.settings import Settings
from inferline.common.status import OK, item_status
from inferline.common.telemetry.profiler import profile_route
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.oip_servicer import OipInferenceServicer
from inferline.services.inference.service import Inference


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, service: Inference):
        self.service = service

    async def ServerLive(self, request, context):  # noqa: N802 - gRPC's method name
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802 - gRPC's method name
        return inference_pb2.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):  # noqa: N802 - gRPC's method name
        self.service.model(request.name, request.version)
        return inference_pb2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return metadata(self.service.model(request.name, request.version))

    async def ListModels(self, request, context):  # noqa: N802 - gRPC's method name
        return inference_pb2.ListModelsResponse(models=[metadata(m) for m in self.service.models()])

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC's method name
        model = self.service.model(request.model_name, request.model_version)
        outputs = await self.service.infer(
            request.model_name, request.model_version, LazySequence(request.items, _decode_item),
            min_score=request.min_score, timeout=context.time_remaining(),
        )
        response = inference_pb2.ModelInferResponse(
            model_name=model.config.name, model_version=model.config.version, id=request.id
        )
        for result in outputs:
            if isinstance(result, Exception):
                response.results.add(status=item_status(result))
            else:
                response.results.add(
                    outputs=[tensors.to_proto(array, name) for name, array in result.items()], status=OK
                )
        return response


def _decode_item(item: inference_pb2.InferItem) -> dict | Exception:
    """A malformed tensor (``tensors.from_proto`` says how) fails its item only."""
    try:
        return {t.name: tensors.from_proto(t) for t in item.inputs}
    except InvalidInput as exc:
        return exc


def metadata(model: LoadedModel) -> inference_pb2.ModelMetadataResponse:
    """What a caller plans with. ``weights.path`` is the file's name only: the server's folder
    layout is no caller's business (the load log names the full path)."""
    config = model.config

    def specs(items):
        return [
            inference_pb2.TensorMetadata(name=s.name, datatype=tensors.DTYPE_NAMES[s.dtype], shape=s.shape)
            for s in items
        ]

    return inference_pb2.ModelMetadataResponse(
        name=config.name,
        versions=[config.version],
        platform=config.backend,
        task=config.task,
        inputs=specs(config.inputs),
        outputs=specs(config.outputs),
        preprocess=config.preprocess.to_proto(),
        postprocess=model.postprocess.to_proto(),
        labels=model.labels,
        weights=inference_pb2.WeightsInfo(
            path=model.weights.path.name, sha256=model.weights.sha256, official=model.weights.official
        ),
        max_batch_size=config.max_batch_size,
    )


def build_service(settings: Settings) -> Service:
    """The stage's server; ``.domain`` is its ``Inference``, for callers in this process.

    It serves the Open Inference Protocol (``inference.GRPCInferenceService``, oip_servicer.py)
    beside ``inferline.v1.InferenceService``, which the controller's gRPC port still calls.
    """
    inference = Inference(settings)
    servicer = InferenceServicer(inference)
    oip_servicer = OipInferenceServicer(inference)

    def register(server: grpc.aio.Server) -> list[str]:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(oip_servicer, server)
        return [
            inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        ]

    routes = profile_route(settings.profile_dir, enabled=settings.profiling)
    return Service(
        "inference", register, inference.load, inference.close,
        servicer=servicer, domain=inference, routes=routes, gpu_metrics=True,
    )
