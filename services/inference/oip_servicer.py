"""The inference stage as an Open Inference Protocol server (``inference.GRPCInferenceService``).

Transport only: OIP messages <-> ``Inference`` (service.py). Errors are domain errors, turned
into status codes by the one table (common/status.py) in the server's interceptor.

Batching is Triton's: when a model's ``max_batch_size`` > 0 the first dimension of every input
is the batch, which is split into items for the model's dynamic batcher and stacked back on the
way out; with ``max_batch_size`` 0 a request is one item. An output declared with a ``-1``
dimension may differ between the items of a batch (Faster R-CNN's boxes, a candidate filter's
anchors): it is sent padded beside ``<name>__shape`` (common/oip.py), and both are declared in
ModelMetadata and ModelConfig. What the controller needs beyond OIP (task, recipes, labels,
candidate filter, weights provenance) travels in ``ModelConfig.parameters``: ``ModelInfo``
(common/model_info.py) holds that conversion.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from importlib import metadata as package_metadata

import grpc
import numpy as np

from inferline.common import oip
from inferline.common.cuda_ipc import CudaUnavailable
from inferline.common.errors import InvalidInput, ModelNotReady, quoted
from inferline.common.generated import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from inferline.common.model_info import PARAMETER_KEYS, ModelInfo, TensorInfo
from inferline.common.oip import MIN_SCORE
from inferline.common.oip_stream import stream_infer
from inferline.services.inference.cuda_shared_memory import RegionTensor, SharedRegions
from inferline.services.inference.models import LoadedModel
from inferline.services.inference.oip_repository import RepositoryServicer
from inferline.services.inference.service import Inference, model_info

SERVER_NAME = "inferline"
# Only the extensions served here: ModelConfig is "model_configuration". RepositoryIndex is
# served, but "model_repository" also promises load and unload, which are not (yet).
# ModelStreamInfer is served too, but Triton's extension list has no name for it.
# "system_shared_memory": inputs read from and outputs written into client-created POSIX shm
# regions (shared_memory.py, docs/shared-memory.md). "cuda_shared_memory" is served where the
# stage sees a GPU (cuda_shared_memory.py, docs/gpu.md), so it is not promised here.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "system_shared_memory")
# The tensor parameters of OIP's shared-memory extension, on inputs and on requested outputs.
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"
__all__ = ["MIN_SCORE", "PARAMETER_KEYS", "OipInferenceServicer", "model_config", "model_metadata"]


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
        # As Triton: a model of the repository that is loading, unloaded or failed is not ready
        # (its reason is in RepositoryIndex); only a name the repository lacks is an error.
        try:
            self.service.model(request.name, request.version)
        except ModelNotReady:
            return grpc_service_pb2.ModelReadyResponse(ready=False)
        return grpc_service_pb2.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return grpc_service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):  # noqa: N802 - gRPC's method name
        return model_metadata(self.service.info(request.name, request.version))

    async def ModelConfig(self, request, context):  # noqa: N802 - gRPC's method name
        model = self.service.model(request.name, request.version)
        return grpc_service_pb2.ModelConfigResponse(config=model_config(model))

    async def ModelInfer(self, request, context):  # noqa: N802 - gRPC's method name
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(  # noqa: N802 - gRPC's method name
        self, request_iterator: AsyncIterator[grpc_service_pb2.ModelInferRequest], context
    ) -> AsyncIterator[grpc_service_pb2.ModelStreamInferResponse]:
        """Each request answered as soon as it is done, by its response or its error alone
        (common/oip_stream.py): requests of one stream reach the dynamic batcher together."""
        async for response in stream_infer(request_iterator, lambda r: self._infer(r, context.time_remaining())):
            yield response

    # OIP's system_shared_memory extension: regions the client created, by name.
    async def SystemSharedMemoryStatus(self, request, context):  # noqa: N802 - gRPC's method name
        Status = grpc_service_pb2.SystemSharedMemoryStatusResponse.RegionStatus  # noqa: N806 - a message class
        return grpc_service_pb2.SystemSharedMemoryStatusResponse(
            regions={
                r.name: Status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in self.service.shared_memory.status(request.name)
            }
        )

    async def SystemSharedMemoryRegister(self, request, context):  # noqa: N802 - gRPC's method name
        self.service.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return grpc_service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request, context):  # noqa: N802 - gRPC's method name
        self.service.shared_memory.unregister(request.name)
        return grpc_service_pb2.SystemSharedMemoryUnregisterResponse()

    # OIP's cuda_shared_memory extension: device memory the client allocated, by IPC handle
    # (cuda_shared_memory.py). Without CUDA no region can exist, which status and unregister say
    # truthfully (perf_analyzer and tritonclient unregister "all CUDA regions" and expect that
    # to succeed); registering one is refused with why, not gRPC's default "Method not found!".
    async def CudaSharedMemoryStatus(self, request, context):  # noqa: N802 - gRPC's method name
        Status = grpc_service_pb2.CudaSharedMemoryStatusResponse.RegionStatus  # noqa: N806 - a message class
        return grpc_service_pb2.CudaSharedMemoryStatusResponse(
            regions={
                r.name: Status(name=r.name, device_id=r.device_id, byte_size=r.byte_size)
                for r in self.service.cuda_shared_memory.status(request.name)
            }
        )

    async def CudaSharedMemoryRegister(self, request, context):  # noqa: N802 - gRPC's method name
        try:
            # A worker thread: opening a handle maps device memory and may initialise CUDA.
            await asyncio.to_thread(
                self.service.cuda_shared_memory.register,
                request.name,
                request.raw_handle,
                request.device_id,
                request.byte_size,
            )
        except CudaUnavailable as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        return grpc_service_pb2.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request, context):  # noqa: N802 - gRPC's method name
        await asyncio.to_thread(self.service.cuda_shared_memory.unregister, request.name)
        return grpc_service_pb2.CudaSharedMemoryUnregisterResponse()

    async def _infer(
        self, request: grpc_service_pb2.ModelInferRequest, timeout: float | None
    ) -> grpc_service_pb2.ModelInferResponse:
        info = self.service.info(request.model_name, request.model_version)
        regions = SharedRegions(self.service.shared_memory, self.service.cuda_shared_memory)
        # Where each output goes when the request puts it in shared memory: checked before the
        # model runs, so a wrong region costs no inference.
        placements = {}
        for output in request.outputs:
            where = _shm_parameters(output.parameters, f"output {quoted(output.name)}")
            if where is not None:
                regions.check(where[0])
                placements[output.name] = where
        items = split_batch(info, oip.decode_inputs(request, _shared_inputs(request, regions)))
        outputs = await self.service.infer(
            request.model_name, request.model_version, items, min_score=_min_score(request), timeout=timeout
        )
        results = []
        for result in outputs:
            if isinstance(result, Exception):
                raise result  # OIP has no per-item status: one failed item fails the request
            results.append(result)
        stacked = results[0] if info.max_batch_size == 0 else oip.stack_items(results, ragged=info.ragged_outputs)
        # Unasked, every output in the order ModelMetadata declares them.
        declared = [t.name for t in info.served_outputs]
        everything = [n for n in declared if n in stacked] + [n for n in stacked if n not in declared]
        return oip.infer_response(
            request, info.name, info.version, {n: stacked[n] for n in everything},
            placed=lambda name, array: _place(regions, placements, name, array),
        )


def _shm_parameters(
    parameters: Mapping[str, grpc_service_pb2.InferParameter], what: str
) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor's parameters put it in shared memory."""
    if SHM_REGION not in parameters:
        return None
    region = parameters[SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"{what}: parameter {SHM_REGION!r} must be a string_param (the region's name)")

    def integer(key: str, required: bool) -> int:
        if key not in parameters:
            if required:
                raise InvalidInput(f"{what}: parameter {SHM_REGION!r} needs {key!r} (int64_param) beside it")
            return 0
        param = parameters[key]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidInput(f"{what}: parameter {key!r} must be an int64_param")
        value = int(getattr(param, kind))
        if value < 0:
            raise InvalidInput(f"{what}: parameter {key!r} must be >= 0, got {value}")
        return value

    return region.string_param, integer(SHM_OFFSET, False), integer(SHM_BYTE_SIZE, True)


def _shared_inputs(
    request: grpc_service_pb2.ModelInferRequest, regions: SharedRegions
) -> dict[str, memoryview | RegionTensor]:
    """The inputs the request puts in shared memory: read-only views of system regions, tensors
    left on the device for CUDA ones."""
    shared = {}
    for tensor in request.inputs:
        what = f"input {quoted(tensor.name)}"
        where = _shm_parameters(tensor.parameters, what)
        if where is None:
            continue
        region, offset, byte_size = where
        dtype = oip.numpy_dtype(tensor.datatype, tensor.name)
        if any(d < 0 for d in tensor.shape):
            raise InvalidInput(f"{what} has a negative dimension in shape {quoted(list(tensor.shape))}")
        needed = math.prod(tensor.shape) * dtype.itemsize
        if byte_size != needed:
            raise InvalidInput(
                f"{what}: shape {quoted(list(tensor.shape))} of {tensor.datatype} needs {needed} bytes, "
                f"but {SHM_BYTE_SIZE} is {byte_size}"
            )
        shared[tensor.name] = regions.input(region, offset, byte_size, what, dtype, tuple(tensor.shape))
    return shared


def _place(
    regions: SharedRegions, placements: Mapping[str, tuple[str, int, int]], name: str, array: np.ndarray
) -> bool:
    """Writes output ``name`` into its shared-memory region when the request asked for that."""
    where = placements.get(name)
    if where is None:
        return False
    region, offset, byte_size = where
    regions.write(region, offset, byte_size, array, f"output {quoted(name)}")
    return True


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


def split_batch(info: ModelInfo, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The request's items, each input checked against the model's config as Triton checks it."""
    batched = info.max_batch_size > 0
    expected = {spec.name: spec for spec in info.inputs}
    unknown = sorted(set(inputs) - set(expected))
    missing = sorted(set(expected) - set(inputs))
    if unknown or missing:
        raise InvalidInput(
            f"model {quoted(info.name)} takes inputs {', '.join(expected)}; "
            f"unknown: {', '.join(map(quoted, unknown)) or 'none'}, missing: {', '.join(missing) or 'none'}"
        )
    sizes = set()
    for name, array in inputs.items():
        spec = expected[name]
        datatype = oip.FROM_CONFIG[spec.dtype]
        got = oip.FROM_NUMPY[array.dtype.newbyteorder("<")]
        if got != datatype:
            raise InvalidInput(f"input {quoted(name)} of model {quoted(info.name)} is {datatype}, got {got}")
        want = ([-1] if batched else []) + list(spec.shape)
        if len(array.shape) != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True)):
            raise InvalidInput(
                f"input {quoted(name)} of model {quoted(info.name)} has shape {want} (-1: any size), "
                f"got {list(array.shape)}"
            )
        if batched:
            sizes.add(array.shape[0])
    if not batched:
        return [inputs]
    if len(sizes) != 1:
        raise InvalidInput(f"the inputs of one request must have one batch size, got {sorted(sizes)}")
    (size,) = sizes
    if not 0 < size <= info.max_batch_size:
        raise InvalidInput(
            f"batch size {size} of model {quoted(info.name)} must be within [1, {info.max_batch_size}] "
            "(its max_batch_size)"
        )
    return [{name: array[i] for name, array in inputs.items()} for i in range(size)]


def _tensor_metadata(
    info: ModelInfo, specs: tuple[TensorInfo, ...]
) -> list[grpc_service_pb2.ModelMetadataResponse.TensorMetadata]:
    batch = [-1] if info.max_batch_size > 0 else []
    return [
        grpc_service_pb2.ModelMetadataResponse.TensorMetadata(
            name=s.name, datatype=oip.FROM_CONFIG[s.dtype], shape=[*batch, *s.shape]
        )
        for s in specs
    ]


def model_metadata(info: ModelInfo) -> grpc_service_pb2.ModelMetadataResponse:
    """OIP's ModelMetadata: every output a ModelInfer answers, ``__shape`` ones included."""
    return grpc_service_pb2.ModelMetadataResponse(
        name=info.name,
        versions=[info.version],
        platform=info.platform,
        inputs=_tensor_metadata(info, info.inputs),
        outputs=_tensor_metadata(info, info.served_outputs),
    )


def model_config(model: LoadedModel) -> model_config_pb2.ModelConfig:
    """Triton's ModelConfig: the model's description (``ModelInfo.to_config``) and how this
    server batches and runs it, which is the server's business, not the description's."""
    config = model.config
    message = model_info(model).to_config()
    message.dynamic_batching.CopyFrom(
        model_config_pb2.ModelDynamicBatching(
            preferred_batch_size=config.preferred_batch_sizes,
            max_queue_delay_microseconds=round(config.max_queue_delay_ms * 1000),
            default_queue_policy=model_config_pb2.ModelQueuePolicy(max_queue_size=config.max_queue_size),
        )
    )
    message.instance_group.append(model_config_pb2.ModelInstanceGroup(count=config.instance_count))
    return message
