"""The controller's pipelines as an Open Inference Protocol server (``inference.GRPCInferenceService``).

Each served model is a pipeline model here (``oip_pipelines.py`` says what each takes and
gives): encoded images or texts in, detections or embeddings out, as a Triton ensemble for YOLO
looks to its users, so ``tritonclient`` and ``perf_analyzer`` measure the whole pipeline with the
command they use against Triton. Transport only: OIP messages <-> the operations' domain values
(common/api.py), and the Controller's Detect and Embed do the work, with their admission.

Errors are domain errors, turned into status codes by the one table (common/status.py): in the
server's interceptor for unary calls, here for ModelStreamInfer, whose failed requests are
answered with ``error_message`` while the stream stays open. OIP has no per-item status: an item
that fails fails its request, with a message that names it (``IMAGE[1]: ...``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from importlib import metadata as package_metadata

import grpc
import numpy as np

from inferline.common import oip, oip_bytes
from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from inferline.common.oip_stream import stream_infer
from inferline.common.settings import Settings
from inferline.services.controller import oip_pipelines
from inferline.services.controller.oip_pipelines import Pipeline, PipelineCatalog, Readiness, TensorSpec
from inferline.services.controller.operations import Controller
from inferline.services.controller.ports import Deadline

log = logging.getLogger(__name__)

SERVER_NAME = "inferline"
# Only the extensions served: ModelConfig is "model_configuration". RepositoryIndex is served,
# but "model_repository" also promises load and unload, which are not.
EXTENSIONS = ("model_configuration",)
PLATFORM = "inferline_pipeline"
BACKEND = "inferline"
# The settings variable that bounds a pipeline's batch (its max_batch_size).
MAX_BATCH_SETTING = "INFERLINE_MAX_BATCH_IMAGES"

TensorMetadata = grpc_service_pb2.ModelMetadataResponse.TensorMetadata


def _version() -> str:
    try:
        return package_metadata.version("inferline")
    except package_metadata.PackageNotFoundError:
        return "unknown"


class OipPipelineServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, settings: Settings, controller: Controller, ready: Readiness):
        self.settings = settings
        self.controller = controller
        self.ready = ready
        self.catalog = PipelineCatalog(controller.list_models)

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        remaining = context.time_remaining()
        return Deadline(self.settings.default_timeout_s if remaining is None else remaining)

    @property
    def max_batch_size(self) -> int:
        return self.settings.max_batch_images

    async def ServerLive(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerReadyResponse(ready=self.ready(""))

    async def ModelReady(self, request, context):  # noqa: N802 - gRPC's method name
        pipeline = await self.catalog.get(request.name, request.version, self._deadline(context))
        return grpc_service_pb2.ModelReadyResponse(ready=oip_pipelines.pipeline_ready(pipeline, self.ready))

    async def ServerMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        pipeline = await self.catalog.get(request.name, request.version, self._deadline(context))
        return grpc_service_pb2.ModelMetadataResponse(
            name=pipeline.name, versions=[pipeline.version], platform=PLATFORM,
            inputs=[_metadata(s) for s in pipeline.inputs], outputs=[_metadata(s) for s in pipeline.outputs],
        )

    async def ModelConfig(self, request, context):  # noqa: N802 - gRPC's method name
        pipeline = await self.catalog.get(request.name, request.version, self._deadline(context))
        return grpc_service_pb2.ModelConfigResponse(config=self._config(pipeline))

    async def RepositoryIndex(self, request, context):  # noqa: N802 - gRPC's method name
        pipelines = await self.catalog.all(self._deadline(context))
        index = grpc_service_pb2.RepositoryIndexResponse.ModelIndex
        models = []
        for pipeline in pipelines.values():
            ready = oip_pipelines.pipeline_ready(pipeline, self.ready)
            if ready or not request.ready:
                models.append(index(
                    name=pipeline.name, version=pipeline.version, state="READY" if ready else "UNAVAILABLE",
                    reason="" if ready else f"waiting for {', '.join(pipeline.models)} and the stages",
                ))
        return grpc_service_pb2.RepositoryIndexResponse(models=models)

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC's method name
        return await self._infer(request, self._deadline(context))

    async def ModelStreamInfer(  # noqa: N802 - gRPC's method name
        self, request_iterator: AsyncIterator[grpc_service_pb2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[grpc_service_pb2.ModelStreamInferResponse]:
        """Each request answered as soon as it is done, by its response or its error
        (common/oip_stream.py)."""
        async for response in stream_infer(request_iterator, lambda r: self._infer(r, self._deadline(context))):
            yield response

    async def _infer(
        self, request: grpc_service_pb2.ModelInferRequest, deadline: Deadline
    ) -> grpc_service_pb2.ModelInferResponse:
        pipeline = await self.catalog.get(request.model_name, request.model_version, deadline)
        items = self._items(pipeline, request)
        outputs: dict[str, np.ndarray]
        if pipeline.operation == "Detect":
            parameters = {
                name: (param.WhichOneof("parameter_choice"), _value(param))
                for name, param in request.parameters.items()
            }
            options = oip_pipelines.detect_options(parameters)
            result = await self.controller.detect(oip_pipelines.detect_request(pipeline, items, options), deadline)
            outputs = oip_pipelines.detect_outputs(result)
        else:
            embedded = await self.controller.embed(oip_pipelines.embed_request(pipeline, items), deadline)
            outputs = oip_pipelines.embed_outputs(pipeline, embedded)
        return oip.infer_response(request, pipeline.name, pipeline.version, outputs)

    def _items(self, pipeline: Pipeline, request: grpc_service_pb2.ModelInferRequest) -> list[bytes]:
        """The request's items (encoded images or texts), checked as Triton checks a request
        against a model's config: its one input by name, BYTES, shape [batch, 1]."""
        spec = pipeline.input
        names = [tensor.name for tensor in request.inputs]
        if names != [spec.name]:
            unknown = sorted(set(names) - {spec.name})
            raise InvalidInput(
                f"model {quoted(pipeline.name)} takes one input, {spec.name} ({spec.datatype}, one element per "
                f"batch item); unknown: {', '.join(map(quoted, unknown)) or 'none'}, "
                f"missing: {'none' if spec.name in names else spec.name}"
            )
        (tensor,) = request.inputs
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input {spec.name} of model {quoted(pipeline.name)} is {spec.datatype}, got {quoted(tensor.datatype)}"
            )
        shape = list(tensor.shape)
        if len(shape) != 2 or shape[1] != 1:
            raise InvalidInput(
                f"input {spec.name} of model {quoted(pipeline.name)} has shape [-1, 1] (-1: the batch), got {shape}"
            )
        if not 0 < shape[0] <= self.max_batch_size:
            raise InvalidInput(
                f"batch size {shape[0]} of model {quoted(pipeline.name)} must be within [1, {self.max_batch_size}] "
                f"(its max_batch_size, {MAX_BATCH_SETTING}); split the batch"
            )
        raw = request.raw_input_contents
        if raw and len(raw) != 1:
            raise InvalidInput(f"the request has 1 input but {len(raw)} raw_input_contents; give one or none")
        array = oip_bytes.decode_tensor(tensor, raw[0] if raw else None)
        return [bytes(element) for element in array[:, 0]]

    def _config(self, pipeline: Pipeline) -> model_config_pb2.ModelConfig:
        """Triton's ModelConfig for the pipeline; ``parameters`` name its task and the served
        models it runs (``models``, comma-separated; Embed runs texts through ``operation_model``)."""
        def data_type(datatype: str) -> str:
            return "TYPE_STRING" if datatype == oip_bytes.BYTES else f"TYPE_{datatype}"  # Triton's DataType enum

        strings = {"task": pipeline.task, "models": ",".join(pipeline.models), "operation": pipeline.operation}
        return model_config_pb2.ModelConfig(
            name=pipeline.name,
            platform=PLATFORM,
            backend=BACKEND,
            max_batch_size=self.max_batch_size,
            input=[model_config_pb2.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.dims)
                   for s in pipeline.inputs],
            output=[model_config_pb2.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.dims)
                    for s in pipeline.outputs],
            parameters={key: model_config_pb2.ModelParameter(string_value=value) for key, value in strings.items()},
        )


def _metadata(spec: TensorSpec) -> grpc_service_pb2.ModelMetadataResponse.TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])


def _value(param: grpc_service_pb2.InferParameter) -> object:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None
