"""Issue 16 on one GPU: preprocessed tensors stay in the controller's device pool and only their
place crosses the controller; the results equal the inline path bit for bit; every lease comes
back; a stage that cannot open the pool gets the tensors another way.

On CPU the device memory is a CPU tensor with an opaque 64-byte name standing in for the CUDA
IPC handle (``CpuIpc``, shared with the inference stage's CUDA shared-memory tests, replaces
only ``cudaMalloc`` + ``cudaIpcGetMemHandle`` and ``cudaIpcOpenMemHandle``): the pool, the proto,
the preprocess stage's writes, the controller's leases and the inference stage's reads are the
GPU path's code. The gpu-marked test runs the four services as processes on a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from inferline.common import cuda_regions, device_pool
from inferline.common.cuda_ipc import IPC_HANDLE_BYTES
from inferline.common.device_pool import DevicePool
from inferline.common.errors import ConfigError
from inferline.common.generated import (
    controller_pb2,
    controller_pb2_grpc,
    grpc_service_pb2,
    preprocess_pb2,
    preprocess_pb2_grpc,
    types_pb2,
)
from inferline.common.recipes import Recipe
from inferline.common.settings import Settings
from inferline.services.controller.grpc_ports import GrpcStages
from inferline.services.preprocess.device_outputs import CudaRoom, DeviceOutputs
from inferline.services.stack import LocalStack, free_port_env
from tests.services.test_inference_cuda_shm import CpuIpc
from tests.support.servers import LoopThread, start_stage
from tests.support.stages import assert_same, run_stages

MODEL = "yolov8n"
LETTERBOX = Recipe("letterbox", {"size": 640, "stride": 32, "auto": True, "pad_value": 114})
SLOT = 3 * 640 * 640


def cpu_allocate(byte_size: int, device_id: int):
    handle, memory = CpuIpc.export(byte_size)
    return memory, handle, lambda: None


def _count(stage: str, transport: str) -> float:
    return REGISTRY.get_sample_value("inferline_tensor_transport_total", {"stage": stage, "transport": transport}) or 0


@pytest.fixture(scope="module")
def images(data_dir) -> list[bytes]:
    return [(data_dir / f"shapes_0{i}.jpg").read_bytes() for i in (1, 2, 3)]


@pytest.fixture
def on_cpu_ipc(monkeypatch) -> None:
    """Device memory and its handles as CPU tensors, in every stage of this process."""
    monkeypatch.setattr(cuda_regions, "CudaIpcOpener", CpuIpc)
    monkeypatch.setattr(device_pool, "allocate_exported", cpu_allocate)


def _run(stack, stages, images: list[bytes], before_infer=lambda: None):
    """Preprocess then infer, as the controller does: host copies of the preprocessed tensors,
    the outputs, and whether each tensor reached the controller as a place in its device pool."""
    tensors, outputs, where = run_stages(stack, stages, images, before_infer)
    return tensors, outputs, [w is not None and w[0] for w in where]


def test_the_device_pool_leases_runs_of_slots_and_knows_where_each_tensor_lies():
    pool = DevicePool(slots=3, slot_bytes=1000, allocate=cpu_allocate)
    assert pool.slot_bytes == 1024 and pool.byte_size == 3072 and len(pool.raw_handle) == IPC_HANDLE_BYTES
    first, second = pool.acquire(1500), pool.acquire(10)
    assert (first.offset, first.byte_size, second.offset) == (0, 2048, 2048)
    assert pool.acquire(1) is None and pool.in_use == 3
    pool.memory[2048:2054] = torch.arange(6, dtype=torch.uint8)
    placed = pool.tensor(2048, np.dtype(np.uint8), (2, 3))
    assert placed.nbytes == 6
    np.testing.assert_array_equal(np.asarray(placed), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="outside the device pool"):
        pool.tensor(3000, np.dtype(np.float32), (100,))
    pool.release(first)
    assert pool.in_use == 1 and pool.acquire(2048).offset == 0


def test_tensors_through_the_device_pool_equal_the_inline_path_bit_for_bit(stack, open_stages, images, on_cpu_ipc):
    inline = open_stages(tensor_transport="inline")
    device = open_stages(tensor_transport="cuda")
    assert device.shared.device is not None and inline.shared.device is None
    before = {s: _count(s, "cuda") for s in ("preprocess", "inference")}
    tensors_inline, outputs_inline, _ = _run(stack, inline, images)
    tensors_device, outputs_device, on_device = _run(stack, device, images)
    assert on_device == [True, True, True], "the controller got places in its device pool, not bytes"
    assert_same(tensors_device, tensors_inline)
    assert_same(outputs_device, outputs_inline)
    assert _count("preprocess", "cuda") - before["preprocess"] == 3
    assert _count("inference", "cuda") - before["inference"] == 3
    assert device.shared.device.in_use == 0, "every lease came back after the inference call"
    # The inference stage has the pool registered under its name (OIP CUDA shared memory).
    async def status():
        return await device.inference._stub.CudaSharedMemoryStatus(
            grpc_service_pb2.CudaSharedMemoryStatusRequest(), timeout=10
        )

    status = stack.loop.run(status())
    assert device.shared.device.name in status.regions


def test_an_inference_stage_that_cannot_open_the_pool_gets_the_tensors_as_bytes(
    stack, open_stages, images, on_cpu_ipc
):
    inline = open_stages(tensor_transport="inline")
    device = open_stages(tensor_transport="cuda")

    def refused() -> None:  # as after CudaSharedMemoryRegister answered UNIMPLEMENTED (no GPU there)
        device.shared.inference_shares_device = False

    before = _count("inference", "inline")
    _, outputs, on_device = _run(stack, device, images, before_infer=refused)
    assert on_device == [True, True, True]
    assert_same(outputs, _run(stack, inline, images)[1])
    assert _count("inference", "inline") - before == 6  # both runs: copied out of the pool here
    assert device.shared.device.in_use == 0


def test_a_preprocess_stage_that_cannot_open_the_pool_sends_bytes_and_the_controller_stops_asking(
    stack, open_stages, images, monkeypatch
):
    # A handle no opener here knows (CUDA's own, on this machine, has no GPU at all).
    monkeypatch.setattr(
        device_pool, "allocate_exported", lambda n, d: (torch.zeros(n, dtype=torch.uint8), os.urandom(64), lambda: None)
    )
    inline = open_stages(tensor_transport="inline")
    device = open_stages(tensor_transport="auto", preprocess_device="cuda")
    assert device.shared.device is not None
    _, outputs, on_device = _run(stack, device, images)
    assert on_device == [False, False, False]
    assert_same(outputs, _run(stack, inline, images)[1])
    assert not device.shared.preprocess_shares_device, "the stage said why (no GPU here)"
    assert device.shared.device.in_use == 0
    # The next request goes by the shm pool.
    before = _count("preprocess", "shm")
    _run(stack, device, images[:1])
    assert _count("preprocess", "shm") - before == 1


def test_the_controller_s_detect_keeps_tensors_in_its_device_pool_with_tensor_transport_cuda(
    stack, images, on_cpu_ipc
):
    controller = start_stage(stack.loop, "controller", dataclasses.replace(stack.settings, tensor_transport="cuda"))
    try:
        request = controller_pb2.DetectRequest(model=MODEL, images=[types_pb2.Image(data=d) for d in images])
        answers = []
        before = _count("inference", "cuda")
        for address in (controller.address, stack.controller):
            with grpc.insecure_channel(address) as channel:
                answers.append(controller_pb2_grpc.ControllerServiceStub(channel).Detect(request, timeout=60))
        assert _count("inference", "cuda") - before == 3
        by_device, by_default = ([list(r.detections) for r in answer.results] for answer in answers)
        assert by_device == by_default and all(by_device)
    finally:
        controller.stop()


def test_tensor_transport_cuda_without_a_gpu_refuses_to_start_and_says_why(stack):
    async def make() -> GrpcStages:
        return GrpcStages(dataclasses.replace(stack.settings, tensor_transport="cuda"))

    required = stack.loop.run(make())
    with pytest.raises(ConfigError, match="INFERLINE_TENSOR_TRANSPORT=cuda but the device pool failed: .*GPU|cuda"):
        required.shared.open()
    stack.loop.run(required.close())


def test_auto_opens_no_device_pool_unless_preprocess_works_on_a_gpu(stack, open_stages, on_cpu_ipc):
    assert open_stages(tensor_transport="auto").shared.device is None
    assert open_stages(tensor_transport="shm", preprocess_device="cuda:0").shared.device is None


# ---- the preprocess stage's side, with the GPU path's code on CPU tensors ----------------


@pytest.fixture(scope="module")
def torch_preprocess(settings) -> Iterator[preprocess_pb2_grpc.PreprocessServiceStub]:
    """A preprocess stage that decodes and letterboxes with torch (``torch-cpu``: the code the
    GPU runs), so its outputs are tensors where they were made."""
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_regions, "CudaIpcOpener", CpuIpc)
    loop = LoopThread()
    server = start_stage(
        loop, "preprocess", dataclasses.replace(settings, preprocess_device="torch-cpu", metrics=False)
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield preprocess_pb2_grpc.PreprocessServiceStub(channel)
    finally:
        server.stop()
        loop.close()
        patch.undo()


def _output(handle: bytes, region: str, size: int, offset: int = 0, room: int | None = None):
    return preprocess_pb2.CudaMemoryOutput(
        region=region, raw_handle=handle, device_id=0, region_byte_size=size, offset=offset,
        byte_size=size - offset if room is None else room,
    )


def test_the_preprocess_stage_writes_its_tensors_into_the_device_room_it_is_given(torch_preprocess, images):
    handle, memory = CpuIpc.export(4 * SLOT)
    inline = torch_preprocess.Preprocess(preprocess_pb2.PreprocessRequest(
        recipe=LETTERBOX.to_proto(), images=[types_pb2.Image(data=d) for d in images]
    ), timeout=60)
    request = preprocess_pb2.PreprocessRequest(
        recipe=LETTERBOX.to_proto(), images=[types_pb2.Image(data=d) for d in images],
        output_cuda=_output(handle, "controller-a", 4 * SLOT, offset=SLOT, room=3 * SLOT),
    )
    response = torch_preprocess.Preprocess(request, timeout=60)
    assert not response.cuda_unavailable
    at = SLOT
    for placed, sent in zip(response.images, inline.images, strict=True):
        assert placed.in_cuda and not placed.in_shm and not placed.tensor.data
        assert placed.shm_offset == at and list(placed.tensor.shape) == list(sent.tensor.shape)
        size = len(sent.tensor.data)
        assert memory[at : at + size].numpy().tobytes() == sent.tensor.data
        at += -(-size // 64) * 64


def test_the_preprocess_stage_refuses_a_room_outside_the_region_and_names_it(torch_preprocess, images):
    handle, _ = CpuIpc.export(SLOT)
    request = preprocess_pb2.PreprocessRequest(
        recipe=LETTERBOX.to_proto(), images=[types_pb2.Image(data=images[0])],
        output_cuda=_output(handle, "controller-b", SLOT, offset=SLOT // 2, room=SLOT),
    )
    with pytest.raises(grpc.RpcError) as refused:
        torch_preprocess.Preprocess(request, timeout=60)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "outside region 'controller-b'" in refused.value.details()


def test_a_handle_the_stage_cannot_open_gets_the_tensors_inline_with_why(torch_preprocess, images):
    request = preprocess_pb2.PreprocessRequest(
        recipe=LETTERBOX.to_proto(), images=[types_pb2.Image(data=images[0])],
        output_cuda=_output(os.urandom(IPC_HANDLE_BYTES), "controller-gone", SLOT),
    )
    response = torch_preprocess.Preprocess(request, timeout=60)
    assert "invalid handle" in response.cuda_unavailable
    (item,) = response.images
    assert not item.in_cuda and len(item.tensor.data) == int(np.prod(item.tensor.shape))


def test_opened_regions_are_bounded_and_the_least_recently_used_is_closed_first():
    outputs = DeviceOutputs(max_regions=2, max_bytes=1 << 30, opener=CpuIpc)
    rooms = []
    for name in ("a", "b", "c"):
        handle, _ = CpuIpc.export(1024)
        rooms.append(CudaRoom(name, handle, 0, 1024, 0, 1024))
    ones = np.ones(8, np.uint8)
    outputs.place(rooms[0], [ones])
    outputs.place(rooms[1], [ones])
    outputs.place(rooms[0], [ones])  # a is used again: b is now the oldest
    outputs.place(rooms[2], [ones])
    assert sorted(r.name for r in outputs.regions.status()) == ["a", "c"]
    outputs.close()
    assert outputs.regions.status() == []


# ---- on a GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_four_services_on_a_gpu_keep_the_preprocessed_tensors_on_the_device(images):
    """The four services as processes: nvJPEG and the letterbox on the GPU, the tensors in the
    controller's device pool, read by the inference stage by CUDA IPC; the same boxes as inline."""
    found = {}
    for transport in ("inline", "cuda"):
        env = free_port_env() | {
            "INFERLINE_MODELS": MODEL, "INFERLINE_DEVICE": "cuda", "INFERLINE_PREPROCESS_DEVICE": "cuda",
            "INFERLINE_TENSOR_TRANSPORT": transport,
        }
        running = LocalStack(Settings.from_env(env), env=env)
        running.start(timeout=300)
        try:
            with grpc.insecure_channel(running.controller_target) as channel:
                stub = controller_pb2_grpc.ControllerServiceStub(channel)
                request = controller_pb2.DetectRequest(model=MODEL, images=[types_pb2.Image(data=d) for d in images])
                response = stub.Detect(request, timeout=120)
            found[transport] = [[(d.class_id, round(d.score, 3)) for d in r.detections] for r in response.results]
        finally:
            running.stop()
    assert found["cuda"] == found["inline"]
