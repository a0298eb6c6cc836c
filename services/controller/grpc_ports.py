"""The stage ports over gRPC: the stage services' clients, proto <-> domain in one place.

One channel per stage, made once and reused by every request; it retries UNAVAILABLE and spreads
calls over the stage's replicas (common/channels.py). A stage's status becomes a domain error
with the stage named in the message, so a caller sees "inference stage at localhost:50053 is
unavailable" rather than a bare UNAVAILABLE; an item's status becomes that item's domain error
through the same status table the stage used to make it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from opentelemetry import trace

from inferline.common import oip, tensors
from inferline.common.api import (
    ENUM_BY_FORMAT,
    NO_CLUSTERING,
    ClusterOptions,
    Embeddings,
    Ranking,
    Rendering,
    error_from_status,
)
from inferline.common.channels import create_channel
from inferline.common.cuda_ipc import CudaUnavailable
from inferline.common.detections import Detection, DetectOptions, detections_from_proto
from inferline.common.device_pool import DeviceLease, DevicePool, DeviceTensor
from inferline.common.errors import (
    ConfigError,
    DeadlineExceeded,
    InferlineError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    StageFailed,
    StageUnavailable,
)
from inferline.common.generated import (
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    postprocess_pb2,
    postprocess_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
    types_pb2,
)
from inferline.common.model_info import ModelInfo
from inferline.common.recipes import Recipe
from inferline.common.settings import PIPELINE_STAGES, Settings
from inferline.common.shm_pool import PREFIX, Lease, ShmPool, owner_alive, reap_orphans
from inferline.common.status import error_for
from inferline.common.telemetry.metrics import TENSOR_TRANSPORT
from inferline.common.transform import ImageTransform, Region
from inferline.services.controller.ports import Deadline, Inputs, Outcome, Outputs, Preprocessed, RenderItem
from inferline.services.controller.stages import StageWatcher

Response = TypeVar("Response")
log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "cuda", "shm", "inline")
# Where a request's tensors lie, by id of the array: (on the device pool, byte offset in its pool).
Places = dict[int, tuple[bool, int]]
# OIP's tensor parameters for the system shared-memory extension.
SHM_REGION, SHM_OFFSET, SHM_BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


class _Caller:
    """One stage's calls: the caller's deadline as the timeout, wait-for-ready while the stage
    is expected back, and its failures as domain errors naming the stage."""

    def __init__(self, stage: str, target: str, watcher: StageWatcher):
        self.stage, self.target, self.watcher = stage, target, watcher

    async def __call__(
        self, method: Callable[..., Awaitable[Response]], request: object, deadline: Deadline
    ) -> Response:
        try:
            return await method(
                request, timeout=deadline.remaining(self.stage), wait_for_ready=self.watcher.expected(self.stage)
            )
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code is grpc.StatusCode.UNAVAILABLE:
                raise StageUnavailable(f"{self.stage} stage at {self.target} is unavailable: {details}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"deadline exceeded in the {self.stage} stage") from None
            # The caller's own mistakes read best unprefixed; anything else names the stage.
            caller_error = code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            raise error_for(code, details if caller_error else f"{self.stage} stage: {details}") from None


def expect(got: int, wanted: int, stage: str) -> None:
    """A stage answers one item per item asked; anything else is its bug, not the caller's."""
    if got != wanted:
        raise StageFailed(f"{stage} stage answered {got} items for {wanted}")


def _transform(message: types_pb2.ImageTransform) -> ImageTransform:
    return ImageTransform(
        message.orig_width, message.orig_height, message.input_width, message.input_height,
        message.scale_x, message.scale_y, message.pad_x, message.pad_y,
    )


def _transform_proto(transform: ImageTransform) -> types_pb2.ImageTransform:
    return types_pb2.ImageTransform(**dataclasses.asdict(transform))


def _box(box: Sequence[float]) -> types_pb2.Box:
    x1, y1, x2, y2 = box
    return types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2)


class SharedTensors:
    """The controller's side of issue 16: its pools, and whether each stage shares them.

    Two pools, one design: POSIX shared memory on this host (common/shm_pool.py) and, when the
    preprocess stage works on a GPU, device memory on that GPU (common/device_pool.py). A
    request leases room in the device pool first (its tensors never leave the GPU), then in the
    shm pool, else its tensors travel inline.

    The preprocess stage takes a pool per request (``output_cuda``, ``output_shm``) and says when
    it cannot use it (``cuda_unavailable``, ``shm_unavailable``): from then on it gets the next
    way. The inference stage gets each pool through OIP's register RPCs (CudaSharedMemoryRegister,
    SystemSharedMemoryRegister); a refusal for good (no GPU there, another /dev/shm) means the
    tensors go to it inline, copied out of the pool here. Names carry 128 random bits: a stage
    that opens one shares this host's /dev/shm (or this GPU), which is the same-host test. A
    lease lives from the preprocess call until the inference call that reads its tensors ends
    (``consumed``), however either ends.
    """

    def __init__(self, settings: Settings, inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub, call: _Caller):
        if settings.tensor_transport not in TRANSPORTS:
            raise ConfigError(
                f"INFERLINE_TENSOR_TRANSPORT={settings.tensor_transport!r} is not one of {', '.join(TRANSPORTS)}"
            )
        self.settings = settings
        # Where the pool is created: /dev/shm, or elsewhere to stand for a stage that has
        # another /dev/shm (tests).
        self.root: Path | None = None
        self.pool: ShmPool | None = None
        self.device: DevicePool | None = None
        self.preprocess_shares = self.inference_shares = settings.tensor_transport != "inline"
        # Until that stage refuses the device pool (which exists only when ``open`` made one).
        self.preprocess_shares_device = self.inference_shares_device = True
        self._inference = inference
        self._call = call
        self._registered = self._device_registered = False
        self._register_lock = asyncio.Lock()
        self._pending: dict[Lease, int] = {}

    def open(self) -> None:
        """Creates the pools, first unlinking the shm objects of controllers that died on this host."""
        transport = self.settings.tensor_transport
        if transport == "inline":
            return
        self._open_device()
        try:
            reaped = reap_orphans(self.root)
            if reaped:
                log.info("unlinked %d shared memory objects of controllers that are gone", len(reaped))
            self.pool = ShmPool(self.settings.shm_pool_slots, self.settings.shm_slot_bytes, self.root)
        except (OSError, ValueError) as exc:
            if transport == "shm":
                raise ConfigError(f"INFERLINE_TENSOR_TRANSPORT=shm but the shared memory pool failed: {exc}") from exc
            log.warning("tensors travel inline: the shared memory pool failed: %s", exc)
            self.preprocess_shares = self.inference_shares = False

    def _open_device(self) -> None:
        """The device pool, on the GPU the preprocess stage works on: always with ``cuda``, with
        ``auto`` when INFERLINE_PREPROCESS_DEVICE names a GPU and this process can export memory."""
        transport, where = self.settings.tensor_transport, self.settings.preprocess_device
        if transport != "cuda" and not (transport == "auto" and where.startswith("cuda")):
            return
        device_id = int(where.partition(":")[2] or 0) if where.startswith("cuda") else 0
        try:
            self.device = DevicePool(self.settings.shm_pool_slots, self.settings.shm_slot_bytes, device_id)
        except (CudaUnavailable, OSError, ValueError) as exc:
            if transport == "cuda":
                raise ConfigError(f"INFERLINE_TENSOR_TRANSPORT=cuda but the device pool failed: {exc}") from exc
            log.info("preprocessed tensors leave the GPU between stages: the device pool failed: %s", exc)

    def lease(self, items: int) -> Lease | None:
        """Room for ``items`` preprocessed images: on the device, else in shm, else None (inline)."""
        if self.device is not None and self.preprocess_shares_device:
            lease = self.device.acquire(items * self.device.slot_bytes)
            if lease is not None:
                return lease
        if self.pool is None or not self.preprocess_shares:
            return None
        return self.pool.acquire(items * self.pool.slot_bytes)

    def hold(self, lease: Lease, placed: int) -> None:
        """The preprocess call put ``placed`` tensors in ``lease``; they are read later."""
        if placed:
            self._pending[lease] = placed
        else:
            self.release(lease)

    def release(self, lease: Lease) -> None:
        self._pending.pop(lease, None)
        pool = self.device if isinstance(lease, DeviceLease) else self.pool
        if pool is not None:
            pool.release(lease)

    def locate(self, array: object) -> tuple[bool, int] | None:
        """(on the device, offset) of a tensor that lies in one of the pools, else None."""
        if isinstance(array, DeviceTensor):
            return (True, array.offset) if array.pool is self.device else None
        if self.pool is not None and isinstance(array, np.ndarray):
            offset = self.pool.locate(array)
            return None if offset is None else (False, offset)
        return None

    def consumed(self, located: Sequence[tuple[bool, int]]) -> None:
        """The tensors at these places were read (or will never be): a lease with none left goes back."""
        for on_device, offset in located:
            for lease in self._pending:
                inside = lease.offset <= offset < lease.offset + lease.byte_size
                if inside and isinstance(lease, DeviceLease) == on_device:
                    self._pending[lease] -= 1
                    if self._pending[lease] <= 0:
                        self.release(lease)
                    break

    def preprocess_cannot_share(self, why: str) -> None:
        self.preprocess_shares = False
        level = logging.WARNING if self.settings.tensor_transport == "shm" else logging.INFO
        log.log(level, "preprocessed tensors travel inline: the preprocess stage cannot map the pool: %s", why)

    def preprocess_cannot_share_device(self, why: str) -> None:
        self.preprocess_shares_device = False
        level = logging.WARNING if self.settings.tensor_transport == "cuda" else logging.INFO
        log.log(level, "preprocessed tensors leave the GPU: the preprocess stage cannot open the device pool: %s", why)

    async def registered(self, deadline: Deadline) -> bool:
        """Whether the inference stage has the shm pool registered, registering it when it has
        not. Regions of controllers whose object is gone are unregistered on the way, so an
        inference stage keeps no mapping of a controller that died."""
        if self.pool is None or not self.inference_shares:
            return False
        if self._registered:
            return True
        pool = self.pool
        register = grpc_service_pb2.SystemSharedMemoryRegisterRequest(
            name=pool.name, key=pool.key, offset=0, byte_size=pool.byte_size
        )
        ok = await self._register(
            "SystemSharedMemory", grpc_service_pb2.SystemSharedMemoryStatusRequest(),
            lambda name: not (pool.path.parent / name).exists(),
            grpc_service_pb2.SystemSharedMemoryUnregisterRequest, register, deadline,
        )
        if ok is None:
            self.inference_shares = False
        self._registered = bool(ok)
        return self._registered

    async def registered_device(self, deadline: Deadline) -> bool:
        """As ``registered``, for the device pool (OIP's CUDA shared-memory RPCs). The regions
        of controllers that died on this host (their pid and start time are in the name) are
        unregistered on the way."""
        if self.device is None or not self.inference_shares_device:
            return False
        if self._device_registered:
            return True
        device = self.device
        register = grpc_service_pb2.CudaSharedMemoryRegisterRequest(
            name=device.name, raw_handle=device.raw_handle, device_id=device.device_id, byte_size=device.byte_size
        )
        ok = await self._register(
            "CudaSharedMemory", grpc_service_pb2.CudaSharedMemoryStatusRequest(),
            lambda name: not owner_alive(name),
            grpc_service_pb2.CudaSharedMemoryUnregisterRequest, register, deadline,
        )
        if ok is None:
            self.inference_shares_device = False
        self._device_registered = bool(ok)
        return self._device_registered

    async def _register(
        self, rpcs: str, status_request: object, gone: Callable[[str], bool],
        unregister_request: Callable[..., object], register: Any, deadline: Deadline,
    ) -> bool | None:
        """Registers a pool through OIP's ``<rpcs>Status/Unregister/Register``, unregistering on
        the way the stage's regions of controllers that are ``gone``. True once registered; False
        for now (the stage is away); None for good (it refused)."""
        kind = "CUDA" if rpcs.startswith("Cuda") else "system"
        async with self._register_lock:
            try:
                status = await self._call(getattr(self._inference, f"{rpcs}Status"), status_request, deadline)
                for name in status.regions:
                    if name.startswith(PREFIX) and name != register.name and gone(name):
                        stale = unregister_request(name=name)
                        await self._call(getattr(self._inference, f"{rpcs}Unregister"), stale, deadline)
                await self._call(getattr(self._inference, f"{rpcs}Register"), register, deadline)
            except (StageUnavailable, DeadlineExceeded, Overloaded) as exc:
                log.info("model inputs travel inline for now: registering the %s pool failed: %s", kind, exc)
                return False
            except InferlineError as exc:
                # Any other refusal is the stage's answer for good (another /dev/shm or GPU, a
                # server without the extension): asking again per request would only cost RPCs.
                if "already registered" not in str(exc):
                    forced = self.settings.tensor_transport in ("shm", "cuda")
                    log.log(logging.WARNING if forced else logging.INFO,
                            "model inputs leave the %s pool: the inference stage cannot use it: %s", kind, exc)
                    return None
            return True

    def lost(self, error: Exception) -> bool:
        """Whether ``error`` says the inference stage no longer has a pool (it restarted): then
        the next call registers it again."""
        if not isinstance(error, ModelNotFound):
            return False
        if self.pool is not None and self.pool.name in str(error):
            self._registered = False
            return True
        if self.device is not None and self.device.name in str(error):
            self._device_registered = False
            return True
        return False

    async def close(self) -> None:
        unregister = (
            (self._registered, self.pool, "SystemSharedMemoryUnregister",
             grpc_service_pb2.SystemSharedMemoryUnregisterRequest),
            (self._device_registered, self.device, "CudaSharedMemoryUnregister",
             grpc_service_pb2.CudaSharedMemoryUnregisterRequest),
        )
        for registered, pool, rpc, request in unregister:
            if registered and pool is not None:
                try:
                    await self._call(getattr(self._inference, rpc), request(name=pool.name), Deadline(2.0))
                except InferlineError as exc:
                    log.info("the inference stage did not unregister pool %s: %s", pool.name, exc)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.device is not None:
            self.device.close()
            self.device = None


def _count(stage: str, by_handle: int, total: int, transport: str = "shm") -> None:
    """``by_handle`` of ``total`` tensors went by ``transport`` (shm or cuda), the rest inline."""
    if by_handle:
        TENSOR_TRANSPORT.labels(stage, transport).inc(by_handle)
    if total - by_handle:
        TENSOR_TRANSPORT.labels(stage, "inline").inc(total - by_handle)
    trace.get_current_span().set_attribute(
        f"inferline.{stage}.tensor_transport", transport if by_handle else "inline"
    )


class GrpcPreprocess:
    def __init__(self, channel: grpc.aio.Channel, call: _Caller, shared: SharedTensors):
        self._stub = preprocess_pb2_grpc.PreprocessServiceStub(channel)
        self._call = call
        self._shared = shared

    async def images(
        self, recipe: Recipe, images: Sequence[bytes], regions: Sequence[Region], deadline: Deadline
    ) -> list[Outcome[Preprocessed]]:
        request = preprocess_pb2.PreprocessRequest(
            recipe=recipe.to_proto(),
            images=[types_pb2.Image(data=data) for data in images],
            regions=[types_pb2.Region(image=r.image, box=_box(r.box)) for r in regions],
        )
        count = len(regions) or len(images)
        lease = self._shared.lease(count)
        pool, device = self._shared.pool, self._shared.device
        if lease is None:
            response = await self._call(self._stub.Preprocess, request, deadline)
            expect(len(response.images), count, "preprocess")
            _count("preprocess", 0, count)
            return [
                error_from_status(item.status)
                or Preprocessed(tensors.from_proto(item.tensor), _transform(item.transform))
                for item in response.images
            ]
        on_device = isinstance(lease, DeviceLease)
        if on_device:
            assert device is not None  # a device lease comes from the device pool
            request.output_cuda.CopyFrom(preprocess_pb2.CudaMemoryOutput(
                region=device.name, raw_handle=device.raw_handle, device_id=device.device_id,
                region_byte_size=device.byte_size, offset=lease.offset, byte_size=lease.byte_size,
            ))
        else:
            assert pool is not None  # a shm lease comes from the shm pool
            request.output_shm.CopyFrom(
                preprocess_pb2.SharedMemoryOutput(key=pool.key, offset=lease.offset, byte_size=lease.byte_size)
            )
        placed = 0
        try:
            response = await self._call(self._stub.Preprocess, request, deadline)
            if response.cuda_unavailable:
                self._shared.preprocess_cannot_share_device(response.cuda_unavailable)
            if response.shm_unavailable:
                self._shared.preprocess_cannot_share(response.shm_unavailable)
            expect(len(response.images), count, "preprocess")
            results: list[Outcome[Preprocessed]] = []
            for item in response.images:
                error = error_from_status(item.status)
                if error is not None:
                    results.append(error)
                    continue
                tensor: np.ndarray | DeviceTensor
                if item.in_cuda and on_device:
                    tensor = self._placed(item, lease, device)
                elif item.in_shm and not on_device:
                    tensor = self._placed(item, lease, pool)
                elif item.in_cuda or item.in_shm:
                    raise StageFailed("preprocess stage placed a tensor in a pool it was not given")
                else:
                    tensor = tensors.from_proto(item.tensor)
                placed += item.in_cuda or item.in_shm
                results.append(Preprocessed(tensor, _transform(item.transform)))
        except BaseException:
            # Cancelled or failed: no tensor of this lease reaches the inference stage.
            self._shared.release(lease)
            raise
        self._shared.hold(lease, placed)
        _count("preprocess", placed, count, "cuda" if on_device else "shm")
        return results

    def _placed(
        self, item: preprocess_pb2.PreprocessedImage, lease: Lease, pool: ShmPool | DevicePool | None
    ) -> np.ndarray | DeviceTensor:
        """Where the stage says it wrote the item, inside the lease it was given: a view of the
        shm pool, or the place in the device pool."""
        assert pool is not None  # a lease comes from a pool
        dtype = tensors.dtype_of(item.tensor.datatype)
        shape = tuple(item.tensor.shape)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = item.shm_offset
        if not (lease.offset <= start and start + size <= lease.offset + lease.byte_size) or min(shape, default=1) < 0:
            raise StageFailed(
                f"preprocess stage placed {size} bytes at offset {start}, outside the room it was given "
                f"({lease.byte_size} bytes at {lease.offset})"
            )
        if isinstance(pool, DevicePool):
            return pool.tensor(start, dtype, shape)
        return pool.array(start, dtype, shape)


    async def texts(self, recipe: Recipe, texts: Sequence[str], deadline: Deadline) -> list[Outcome[np.ndarray]]:
        request = preprocess_pb2.PreprocessRequest(recipe=recipe.to_proto(), texts=texts)
        response = await self._call(self._stub.Preprocess, request, deadline)
        expect(len(response.texts), len(texts), "preprocess")
        return [error_from_status(item.status) or tensors.from_proto(item.tensor) for item in response.texts]


class GrpcInference:
    """The inference stage over the Open Inference Protocol (``inference.GRPCInferenceService``):
    any OIP server whose ModelConfig carries the parameters of ``ModelInfo`` can be the stage.

    OIP has no per-item status, so a request is one batch that succeeds or fails whole. Items are
    therefore sent in groups of one input shape (the batch a model takes), each chunked at the
    model's ``max_batch_size``, all groups at once; a failed group fails its own items only.
    """

    def __init__(self, stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub, call: _Caller, shared: SharedTensors):
        self._stub = stub
        self._call = call
        self.shared = shared

    async def model(self, name: str, deadline: Deadline) -> ModelInfo:
        # ModelConfig has no version: ModelMetadata names the one served.
        metadata, config = await asyncio.gather(
            self._call(self._stub.ModelMetadata, grpc_service_pb2.ModelMetadataRequest(name=name), deadline),
            self._call(self._stub.ModelConfig, grpc_service_pb2.ModelConfigRequest(name=name), deadline),
        )
        return ModelInfo.from_config(config.config, metadata.versions[0] if metadata.versions else "")

    async def models(self, deadline: Deadline) -> list[ModelInfo]:
        index = await self._call(
            self._stub.RepositoryIndex, grpc_service_pb2.RepositoryIndexRequest(ready=True), deadline
        )
        ready = [m for m in index.models if m.state == "READY"]

        async def config(entry: grpc_service_pb2.RepositoryIndexResponse.ModelIndex) -> ModelInfo | None:
            request = grpc_service_pb2.ModelConfigRequest(name=entry.name, version=entry.version)
            try:
                reply = await self._call(self._stub.ModelConfig, request, deadline)
            except ModelNotFound:  # unloaded since the index was read
                return None
            return ModelInfo.from_config(reply.config, entry.version)

        return [info for info in await asyncio.gather(*(config(m) for m in ready)) if info is not None]

    async def infer(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, deadline: Deadline
    ) -> list[Outcome[Outputs]]:
        groups = _groups(model, items)
        # Each tensor's place in a pool, found once: by id, as the items hold the arrays until
        # this call ends.
        places = {id(a): o for item in items for a in item.values() if (o := self.shared.locate(a)) is not None}
        try:
            answers = await asyncio.gather(
                *(self._run_group(model, [items[k] for k in group], min_score, deadline, places) for group in groups)
            )
        finally:
            # Answered, failed or cancelled (maybe before a group's call began): these tensors
            # are read or never will be.
            self.shared.consumed(list(places.values()))
        outcomes: dict[int, Outcome[Outputs]] = {}
        for group, results in zip(groups, answers, strict=True):
            outcomes.update(zip(group, results, strict=True))
        return [outcomes[k] for k in range(len(items))]

    def _request(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, shm: bool, cuda: bool, places: Places
    ) -> tuple[grpc_service_pb2.ModelInferRequest, int, str]:
        """The ModelInfer for ``items``, with an input by reference to a pool when the stage has
        it registered (``shm``, ``cuda``) and its items' tensors lie there back to back (one
        batch, no copy); how many items did, and by which pool."""
        batched = model.max_batch_size > 0
        request = grpc_service_pb2.ModelInferRequest(model_name=model.name, model_version=model.version)
        by_handle, transport = 0, "shm"
        for name in items[0]:
            arrays = [item[name] for item in items] if batched else [items[0][name]]
            where = self._contiguous(arrays, shm, cuda, places)
            if where is None:
                # np.asarray copies a tensor of the device pool to the host (the stage cannot open it).
                array = np.stack([np.asarray(a) for a in arrays]) if batched else np.asarray(arrays[0])
                tensor, data = oip.input_tensor(name, array)
                request.inputs.append(tensor)
                request.raw_input_contents.append(data)
                continue
            region, offset = where
            shape = (len(arrays), *arrays[0].shape) if batched else arrays[0].shape
            tensor, _ = oip.input_tensor(name, np.empty(0, arrays[0].dtype))
            tensor.shape[:] = shape
            tensor.parameters[SHM_REGION].string_param = region
            tensor.parameters[SHM_OFFSET].int64_param = offset
            tensor.parameters[SHM_BYTE_SIZE].int64_param = sum(a.nbytes for a in arrays)
            request.inputs.append(tensor)
            by_handle = len(items)
            transport = "cuda" if isinstance(arrays[0], DeviceTensor) else "shm"
        if min_score > 0:
            request.parameters[oip.MIN_SCORE].double_param = min_score
        return request, by_handle, transport

    def _contiguous(
        self, arrays: Sequence[np.ndarray | DeviceTensor], shm: bool, cuda: bool, places: Places
    ) -> tuple[str, int] | None:
        """The region and offset of the first array when all lie one right after another in a
        pool the stage has registered, else None."""
        located = [places.get(id(a)) for a in arrays]
        if located[0] is None:
            return None
        on_device, first = located[0]
        pool = self.shared.device if on_device else self.shared.pool
        if pool is None or not (cuda if on_device else shm):
            return None
        at = first
        for array, where in zip(arrays, located, strict=True):
            if where != (on_device, at):
                return None
            at += array.nbytes
        return pool.name, first

    async def _infer(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, deadline: Deadline, places: Places
    ) -> tuple[grpc_service_pb2.ModelInferResponse, int, str]:
        """One ModelInfer for ``items``, by shared-memory handle where the stage has the pool.

        A handle the stage does not know (NOT_FOUND naming the region) means the pool was lost:
        first the stage restarted without it, so the pool is registered again and the call
        retried; then another replica behind the same name lacks it (round robin sent the
        register to one, the call to another), so the call goes inline, the tensors being in
        the controller's own mapping, and a later call registers again. Returns the response,
        how many items went by handle, and by which pool (shm or cuda)."""
        pools = {where[0] for item in items for a in item.values() if (where := places.get(id(a))) is not None}
        attempts = ("by handle", "by handle, pool registered again", "inline")
        for attempt in attempts:
            handles = attempt != "inline"
            shm = handles and False in pools and await self.shared.registered(deadline)
            cuda = handles and True in pools and await self.shared.registered_device(deadline)
            request, by_handle, transport = self._request(model, items, min_score, shm, cuda, places)
            try:
                return await self._call(self._stub.ModelInfer, request, deadline), by_handle, transport
            except ModelNotFound as exc:
                if attempt == attempts[-1] or not (by_handle and self.shared.lost(exc)):
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _run_group(
        self, model: ModelInfo, items: Sequence[Inputs], min_score: float, deadline: Deadline, places: Places
    ) -> list[Outcome[Outputs]]:
        batched = model.max_batch_size > 0
        try:
            response, by_handle, transport = await self._infer(model, items, min_score, deadline, places)
            _count("inference", by_handle, len(items), transport)
        except (StageUnavailable, DeadlineExceeded, Overloaded):
            raise  # the stage's state, not these items': the whole call fails, as before OIP
        except InferlineError as exc:
            return [exc] * len(items)
        try:
            outputs = oip.decode_outputs(response)
        except InvalidInput as exc:
            raise StageFailed(f"inference stage answered a malformed output: {exc}") from None
        if not batched:
            return [outputs]
        try:
            results: list[Outcome[Outputs]] = list(oip.unstack_items(outputs))
        except ValueError as exc:
            raise StageFailed(f"inference stage: {exc}") from None
        expect(len(results), len(items), "inference")
        return results


def _groups(model: ModelInfo, items: Sequence[Inputs]) -> list[list[int]]:
    """Indices of the items that can share one ModelInfer: one input shape and dtype (a model
    without a batch dimension takes one item a request), at most ``max_batch_size`` each."""
    if model.max_batch_size == 0:
        return [[k] for k in range(len(items))]
    by_shape: dict[tuple, list[int]] = {}
    for k, item in enumerate(items):
        key = tuple((name, array.shape, array.dtype.str) for name, array in item.items())
        by_shape.setdefault(key, []).append(k)
    size = model.max_batch_size
    return [group[i : i + size] for group in by_shape.values() for i in range(0, len(group), size)]


class GrpcPostprocess:
    def __init__(self, channel: grpc.aio.Channel, call: _Caller):
        self._stub = postprocess_pb2_grpc.PostprocessServiceStub(channel)
        self._call = call

    async def detections(
        self,
        recipe: Recipe,
        options: DetectOptions,
        labels: Sequence[str],
        items: Sequence[tuple[Outputs, ImageTransform]],
        deadline: Deadline,
    ) -> list[Outcome[list[Detection]]]:
        request = postprocess_pb2.PostprocessRequest(
            recipe=recipe.to_proto(),
            options=options.to_proto(),
            labels=labels,
            items=[
                postprocess_pb2.PostprocessItem(
                    outputs=[tensors.to_proto(array, name) for name, array in outputs.items()],
                    transform=_transform_proto(transform),
                )
                for outputs, transform in items
            ],
        )
        response = await self._call(self._stub.Postprocess, request, deadline)
        expect(len(response.results), len(items), "postprocess")
        return [error_from_status(r.status) or detections_from_proto(r.detections) for r in response.results]

    async def render(self, format: str, items: Sequence[RenderItem], deadline: Deadline) -> list[Rendering]:
        request = postprocess_pb2.RenderRequest(
            format=ENUM_BY_FORMAT[format],
            items=[
                postprocess_pb2.RenderItem(
                    name=item.name, width=item.width, height=item.height,
                    detections=[d.to_proto() for d in item.detections], image=item.image,
                )
                for item in items
            ],
        )
        response = await self._call(self._stub.Render, request, deadline)
        expect(len(response.renderings), len(items), "postprocess")
        return [Rendering.from_proto(r) for r in response.renderings]

    async def embeddings(
        self,
        images: Sequence[np.ndarray],
        texts: Sequence[np.ndarray],
        deadline: Deadline,
        *,
        logit_scale: float = 0.0,
        top_k: int = 0,
        cluster: ClusterOptions = NO_CLUSTERING,
    ) -> Embeddings:
        request = postprocess_pb2.EmbeddingsRequest(
            images=[tensors.to_proto(v, "embedding") for v in images],
            texts=[tensors.to_proto(v, "embedding") for v in texts],
            logit_scale=logit_scale,
            top_k=top_k,
            cluster=cluster.to_proto(),
        )
        response = await self._call(self._stub.Embeddings, request, deadline)
        expect(len(response.images), len(images), "postprocess")
        expect(len(response.texts), len(texts), "postprocess")
        return Embeddings(
            images=_rows(response.images),
            texts=_rows(response.texts),
            zero_shot=[Ranking.from_proto(r) for r in response.zero_shot],
            text_to_images=[Ranking.from_proto(r) for r in response.text_to_images],
            clusters=list(response.clusters),
        )


def _rows(messages: Sequence[types_pb2.Tensor]) -> np.ndarray:
    return np.stack([tensors.from_proto(t) for t in messages]) if messages else np.zeros((0, 0), np.float32)


class GrpcStages:
    """The three ports over gRPC, with the watch on the stages that makes the controller's
    readiness (``stages.StageWatcher``)."""

    def __init__(self, settings: Settings):
        self.targets = {stage: settings.target(stage) for stage in PIPELINE_STAGES}
        self._channels = {stage: create_channel(target, settings) for stage, target in self.targets.items()}
        self.watcher = StageWatcher(settings, self.targets)
        callers = {stage: _Caller(stage, target, self.watcher) for stage, target in self.targets.items()}
        inference_stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channels["inference"])
        self.shared = SharedTensors(settings, inference_stub, callers["inference"])
        self.preprocess = GrpcPreprocess(self._channels["preprocess"], callers["preprocess"], self.shared)
        self.inference = GrpcInference(inference_stub, callers["inference"], self.shared)
        self.postprocess = GrpcPostprocess(self._channels["postprocess"], callers["postprocess"])

    async def load(self) -> None:
        """One check of every stage before the controller takes a call, and the shm pool."""
        self.shared.open()
        await self.watcher.poll()

    async def close(self) -> None:
        await self.shared.close()
        for channel in self._channels.values():
            await channel.close()
        await self.watcher.close()
