"""The inference stage as an Open Inference Protocol server (``inference.GRPCInferenceService``).

Transport only: OIP messages <-> ``Inference`` (service.py). Errors are domain errors, turned
into status codes by the one table (common/status.py) in the server's interceptor.

Batching is Triton's: when a model's ``max_batch_size`` > 0 the first dimension of every input
is the batch, which is split into items for the model's dynamic batcher and stacked back on the
way out; with ``max_batch_size`` 0 a request is one item. What the controller needs beyond OIP
(task, recipes, labels, candidate filter, weights provenance) travels in ``ModelConfig.parameters``
as JSON strings, as a Triton user would write them in ``config.pbtxt`` (``PARAMETER_KEYS``).
"""

from __future__ import annotations

import json
from importlib import metadata as package_metadata

import numpy as np

from inferline.common import oip
from inferline.common.errors import InvalidInput, quoted
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.oip_repository import RepositoryServicer
from inferline.services.inference.service import Inference

SERVER_NAME = "inferline"
# Only the extensions served here: ModelConfig is "model_configuration". RepositoryIndex is
# served, but "model_repository" also promises load and unload, which are not (yet).
EXTENSIONS = ("model_configuration",)
# The request parameter that asks for the candidate filter (Inference.infer's min_score).
MIN_SCORE = "min_score"
# ModelConfig.parameters keys, each a string (JSON where the value is structured).
PARAMETER_KEYS = (
    "task", "preprocess", "postprocess", "labels", "candidate_filter",
    "weights_file", "weights_sha256", "weights_official", "precision",
)


def _version() -> str:
    try:
        return package_metadata.version("inferline")
    except package_metadata.PackageNotFoundError:
        return "unknown"


class OipInferenceServicer(RepositoryServicer, grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: Inference):
        self.service = service

    async def ServerLive(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):  # noqa: N802 - gRPC's method name
        self.service.model(request.name, request.version)
        return grpc_service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return model_metadata(self.service.model(request.name, request.version))

    async def ModelConfig(self, request, context):  # noqa: N802 - gRPC's method name
        model = self.service.model(request.name, request.version)
        return grpc_service_pb2.ModelConfigResponse(config=model_config(model))

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC's method name
        model = self.service.model(request.model_name, request.model_version)
        items = split_batch(model, oip.decode_inputs(request))
        outputs = await self.service.infer(
            request.model_name, request.model_version, items,
            min_score=_min_score(request), timeout=context.time_remaining(),
        )
        results = []
        for result in outputs:
            if isinstance(result, Exception):
                raise result  # OIP has no per-item status: one failed item fails the request
            results.append(result)
        stacked = stack_batch(model, results)
        wanted = [o.name for o in request.outputs] or list(stacked)
        response = grpc_service_pb2.ModelInferResponse(
            model_name=model.config.name, model_version=model.config.version, id=request.id
        )
        for name in wanted:
            if name not in stacked:
                raise InvalidInput(
                    f"model {quoted(model.config.name)} has no output {quoted(name)} (it has: {', '.join(stacked)})"
                )
            tensor, data = oip.output_tensor(name, stacked[name])
            response.outputs.append(tensor)
            response.raw_output_contents.append(data)
        return response


def _min_score(request: grpc_service_pb2.ModelInferRequest) -> float:
    if MIN_SCORE not in request.parameters:
        return 0.0
    # A number, or a number as a string: tritonclient's ``parameters`` sends only bool, int and str.
    param = request.parameters[MIN_SCORE]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("double_param", "int64_param"):
        return float(getattr(param, kind))
    if kind == "string_param":
        try:
            return float(param.string_param)
        except ValueError:
            pass
    raise InvalidInput(f"parameter {MIN_SCORE!r} must be a number within [0, 1] (double_param or a string of one)")


def split_batch(model: LoadedModel, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The request's items, each input checked against the model's config as Triton checks it."""
    config = model.config
    batched = config.max_batch_size > 0
    expected = {spec.name: spec for spec in config.inputs}
    unknown = sorted(set(inputs) - set(expected))
    missing = sorted(set(expected) - set(inputs))
    if unknown or missing:
        raise InvalidInput(
            f"model {quoted(config.name)} takes inputs {', '.join(expected)}; "
            f"unknown: {', '.join(map(quoted, unknown)) or 'none'}, missing: {', '.join(missing) or 'none'}"
        )
    sizes = set()
    for name, array in inputs.items():
        spec = expected[name]
        datatype = oip.FROM_CONFIG[spec.dtype]
        got = oip.FROM_NUMPY[array.dtype.newbyteorder("<")]
        if got != datatype:
            raise InvalidInput(f"input {quoted(name)} of model {quoted(config.name)} is {datatype}, got {got}")
        want = ([-1] if batched else []) + list(spec.shape)
        if len(array.shape) != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True)):
            raise InvalidInput(
                f"input {quoted(name)} of model {quoted(config.name)} has shape {want} (-1: any size), "
                f"got {list(array.shape)}"
            )
        if batched:
            sizes.add(array.shape[0])
    if not batched:
        return [inputs]
    if len(sizes) != 1:
        raise InvalidInput(f"the inputs of one request must have one batch size, got {sorted(sizes)}")
    (size,) = sizes
    if not 0 < size <= config.max_batch_size:
        raise InvalidInput(
            f"batch size {size} of model {quoted(config.name)} must be within [1, {config.max_batch_size}] "
            "(its max_batch_size)"
        )
    return [{name: array[i] for name, array in inputs.items()} for i in range(size)]


def stack_batch(model: LoadedModel, outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Items' outputs as one batch (a leading batch dimension when ``max_batch_size`` > 0)."""
    if model.config.max_batch_size == 0:
        return outputs[0]
    stacked = {}
    for name in outputs[0]:
        shapes = {o[name].shape for o in outputs}
        if len(shapes) > 1:
            # Only the candidate filter makes items of one request differ (each keeps its own
            # candidates), and a batch tensor needs one shape.
            raise InvalidInput(
                f"output {quoted(name)} differs in shape between the request's items ({sorted(shapes)}) "
                f"and cannot form one batch: send one item per request when using {MIN_SCORE!r}"
            )
        stacked[name] = np.stack([o[name] for o in outputs])
    return stacked


def _tensor_metadata(model: LoadedModel, specs) -> list[grpc_service_pb2.ModelMetadataResponse.TensorMetadata]:
    batch = [-1] if model.config.max_batch_size > 0 else []
    return [
        grpc_service_pb2.ModelMetadataResponse.TensorMetadata(
            name=s.name, datatype=oip.FROM_CONFIG[s.dtype], shape=[*batch, *s.shape]
        )
        for s in specs
    ]


def model_metadata(model: LoadedModel) -> grpc_service_pb2.ModelMetadataResponse:
    config = model.config
    return grpc_service_pb2.ModelMetadataResponse(
        name=config.name,
        versions=[config.version],
        platform=config.backend,
        inputs=_tensor_metadata(model, config.inputs),
        outputs=_tensor_metadata(model, config.outputs),
    )


def _recipe_json(recipe) -> str:
    return json.dumps({"name": recipe.name, "params": dict(recipe.params)}, sort_keys=True)


def model_config(model: LoadedModel) -> model_config_pb2.ModelConfig:
    """Triton's ModelConfig for the model, with our extras in ``parameters`` (PARAMETER_KEYS).

    ``weights_file`` is the file's name only: the server's folder layout is no caller's business.
    """
    config = model.config
    strings = {
        "task": config.task,
        "preprocess": _recipe_json(config.preprocess),
        "postprocess": _recipe_json(model.postprocess),
        "labels": json.dumps(list(model.labels)),
        "weights_file": model.weights.path.name,
        "weights_sha256": model.weights.sha256,
        "weights_official": json.dumps(bool(model.weights.official)),
        "precision": config.precision,
    }
    if config.candidate_filter is not None:
        strings["candidate_filter"] = _recipe_json(config.candidate_filter)
    def data_type(dtype: str) -> str:
        return f"TYPE_{oip.FROM_CONFIG[dtype]}"  # Triton's DataType enum, by name

    return model_config_pb2.ModelConfig(
        name=config.name,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        input=[
            model_config_pb2.ModelInput(name=s.name, data_type=data_type(s.dtype), dims=s.shape)
            for s in config.inputs
        ],
        output=[
            model_config_pb2.ModelOutput(name=s.name, data_type=data_type(s.dtype), dims=s.shape)
            for s in config.outputs
        ],
        dynamic_batching=model_config_pb2.ModelDynamicBatching(
            preferred_batch_size=config.preferred_batch_sizes,
            max_queue_delay_microseconds=round(config.max_queue_delay_ms * 1000),
            default_queue_policy=model_config_pb2.ModelQueuePolicy(max_queue_size=config.max_queue_size),
        ),
        instance_group=[model_config_pb2.ModelInstanceGroup(count=config.instance_count)],
        parameters={key: model_config_pb2.ModelParameter(string_value=value) for key, value in strings.items()},
    )
