"""The controller's ports with its shm pool, against fake stages: what a preprocess answer may
point at, and when a ModelInfer carries a handle instead of bytes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from inferline.common.errors import StageFailed, StageUnavailable
from inferline.common.generated import grpc_service_pb2 as pb
from inferline.common.generated import preprocess_pb2, types_pb2
from inferline.common.model_info import ModelInfo, TensorInfo
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.services.controller.grpc_ports import GrpcInference, GrpcPreprocess, SharedTensors
from inferline.services.controller.ports import Deadline

MODEL = ModelInfo(
    name="det", version="1", platform="torch", task="detect", max_batch_size=8,
    inputs=(TensorInfo("images", "uint8", (3, -1, -1)),), outputs=(TensorInfo("boxes", "float32", (-1, 4)),),
    preprocess=Recipe("letterbox"), postprocess=Recipe("yolo_detect"),
)
SHAPE = (3, 4, 4)


async def _call(method, request, deadline):
    return await method(request)


class FakePreprocess:
    """Writes one 3x4x4 tensor of ``value`` where it was told, and answers ``shift`` bytes off."""

    def __init__(self, shared: SharedTensors, shift: int = 0):
        self.shared, self.shift = shared, shift

    async def Preprocess(self, request):  # noqa: N802 - gRPC's method name
        room = request.output_shm
        assert self.shared.pool is not None
        np.frombuffer(self.shared.pool._mapping, np.uint8, 48, room.offset)[:] = 7
        tensor = types_pb2.Tensor(name="images", datatype=types_pb2.DATA_TYPE_UINT8, shape=SHAPE)
        item = preprocess_pb2.PreprocessedImage(tensor=tensor, in_shm=True, shm_offset=room.offset + self.shift)
        return preprocess_pb2.PreprocessResponse(images=[item] * len(request.images))


class FakeInference:
    def __init__(self) -> None:
        self.requests: list[pb.ModelInferRequest] = []

    async def ModelInfer(self, request):  # noqa: N802 - gRPC's method name
        self.requests.append(request)
        batch = request.inputs[0].shape[0]
        response = pb.ModelInferResponse(model_name="det")
        response.outputs.add(name="boxes", datatype="FP32", shape=[batch, 1, 4])
        response.raw_output_contents.append(np.zeros((batch, 1, 4), np.float32).tobytes())
        return response


@pytest.fixture
def shared(tmp_path):
    settings = Settings(tensor_transport="shm", shm_pool_slots=4, shm_slot_bytes=64)
    made = SharedTensors(settings, None, _call)  # type: ignore[arg-type]
    made.root = tmp_path
    made.open()
    made._registered = True  # as after a SystemSharedMemoryRegister
    yield made
    made._registered = False  # no stage to unregister from
    asyncio.run(made.close())
    assert not list(tmp_path.iterdir()), "closing unlinked the pool"


def _port(cls, stub, shared):
    port = cls.__new__(cls)
    port._stub, port._call = stub, _call
    if cls is GrpcPreprocess:
        port._shared = shared
    else:
        port.shared = shared
    return port


def test_preprocessed_tensors_are_read_only_views_of_the_lease(shared):
    port = _port(GrpcPreprocess, FakePreprocess(shared), shared)
    (item,) = asyncio.run(port.images(Recipe("letterbox"), [b"x"], [], Deadline(5)))
    assert shared.pool.locate(item.tensor) == 0 and not item.tensor.flags.writeable
    assert item.tensor.shape == SHAPE and int(item.tensor.max()) == 7
    assert shared.pool.in_use == 1, "held until the inference call reads it"
    shared.consumed([(False, 0)])  # (on the device, offset)
    assert shared.pool.in_use == 0


def test_an_offset_outside_the_lease_is_the_stage_s_fault_and_frees_the_lease(shared):
    port = _port(GrpcPreprocess, FakePreprocess(shared, shift=64), shared)
    with pytest.raises(StageFailed, match="outside the room it was given"):
        asyncio.run(port.images(Recipe("letterbox"), [b"x"], [], Deadline(5)))
    assert shared.pool.in_use == 0


def test_items_back_to_back_in_the_pool_go_as_one_handle_and_others_as_bytes(shared):
    stage = FakeInference()
    port = _port(GrpcInference, stage, shared)
    pool = shared.pool
    together = pool.acquire(2 * pool.slot_bytes)
    first = pool.array(together.offset, np.dtype(np.uint8), SHAPE)
    second = pool.array(together.offset + 48, np.dtype(np.uint8), SHAPE)
    shared.hold(together, 2)
    asyncio.run(port.infer(MODEL, [{"images": first}, {"images": second}], 0.0, Deadline(5)))
    (request,) = stage.requests
    params = request.inputs[0].parameters
    assert params["shared_memory_region"].string_param == pool.name
    assert (params["shared_memory_offset"].int64_param, params["shared_memory_byte_size"].int64_param) == (0, 96)
    assert list(request.inputs[0].shape) == [2, *SHAPE] and not request.raw_input_contents
    assert pool.in_use == 0, "the inference call ended: its lease went back"

    apart = pool.acquire(2 * pool.slot_bytes)
    gap = [pool.array(apart.offset + at, np.dtype(np.uint8), SHAPE) for at in (0, 64)]
    shared.hold(apart, 2)
    asyncio.run(port.infer(MODEL, [{"images": a} for a in gap], 0.0, Deadline(5)))
    request = stage.requests[-1]
    assert "shared_memory_region" not in request.inputs[0].parameters
    assert len(request.raw_input_contents[0]) == 96
    assert pool.in_use == 0


class RefusingRegister:
    """An inference stage whose SystemSharedMemoryRegister raises ``error``."""

    def __init__(self, error: Exception):
        self.error, self.registers = error, 0

    async def SystemSharedMemoryStatus(self, request):  # noqa: N802 - gRPC's method name
        return pb.SystemSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request):  # noqa: N802 - gRPC's method name
        self.registers += 1
        raise self.error


@pytest.mark.parametrize(
    ("error", "for_good"),
    [
        (StageFailed("inference stage: Unable to open shared memory region"), True),  # e.g. Triton elsewhere
        (StageUnavailable("inference stage at x is unavailable"), False),
    ],
)
def test_a_stage_that_refuses_the_pool_is_asked_once_but_an_unavailable_one_again(shared, error, for_good):
    stage = RefusingRegister(error)
    shared._inference, shared._registered = stage, False
    assert not asyncio.run(shared.registered(Deadline(5)))
    assert not asyncio.run(shared.registered(Deadline(5)))
    assert shared.inference_shares is not for_good
    assert stage.registers == (1 if for_good else 2)
