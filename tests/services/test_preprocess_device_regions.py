"""Preprocess writes letterboxed tensors into a device region the inference stage reads (issue 16).

On CPU the region is a CPU tensor with an opaque 64-byte name standing in for the CUDA IPC
handle (``CpuIpc``, shared with the inference stage's CUDA shared-memory tests): the pool, the
placement parameters and the inference stage's reading of them are the GPU path's code. The
gpu-marked test exports real device memory to an inference stage in another process.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from inferline.common.errors import InvalidInput, Overloaded
from inferline.common.settings import Settings
from inferline.services.inference import cuda_shared_memory
from inferline.services.preprocess.device_regions import DeviceRegionPool, Placement
from inferline.services.preprocess.gpu import decode_jpegs, letterbox_on_device, letterbox_tensor
from inferline.services.stack import LocalStack, free_port_env
from tests.services.test_inference_cuda_shm import CpuIpc
from tests.support.servers import LoopThread, start_stage

LETTERBOX = {"size": 640, "stride": 32, "auto": True, "pad_value": 114}
SLOT = 3 * 640 * 640


def cpu_allocate(byte_size: int, device_id: int):
    handle, memory = CpuIpc.export(byte_size)
    return memory, handle, lambda: None


@pytest.fixture(scope="module")
def jpegs(sample_images) -> list[bytes]:
    found = [p.read_bytes() for p in sample_images if p.suffix.lower() in (".jpg", ".jpeg")]
    assert len(found) >= 2
    return found[:3]


def _letterboxed(data: bytes, device: str = "cpu") -> tuple[torch.Tensor, np.ndarray]:
    (image,) = decode_jpegs([data], device, 100_000_000)
    tensor, _ = letterbox_on_device(image, LETTERBOX)
    return tensor, letterbox_tensor(image, LETTERBOX)[0]


def test_placed_tensors_are_the_letterboxed_pixels_at_their_slots_offsets(jpegs):
    pool = DeviceRegionPool("pre", slots=4, slot_bytes=SLOT, allocate=cpu_allocate)
    placements = []
    for data in jpegs:
        tensor, host = _letterboxed(data)
        placement = pool.place(tensor)
        placements.append(placement)
        assert placement.shape == host.shape and placement.byte_size == host.nbytes
        stored = pool.memory[placement.offset : placement.offset + placement.byte_size].numpy()
        assert stored.tobytes() == host.tobytes()
    assert [p.offset for p in placements] == [0, SLOT, 2 * SLOT] and pool.leased == 3
    assert placements[1].parameters() == {
        "shared_memory_region": "pre",
        "shared_memory_offset": SLOT,
        "shared_memory_byte_size": placements[1].byte_size,
    }


def test_slots_are_bounded_reused_after_release_and_never_overrun(jpegs):
    pool = DeviceRegionPool("pre", slots=2, slot_bytes=SLOT, allocate=cpu_allocate)
    tensor, _ = _letterboxed(jpegs[0])
    first, second = pool.place(tensor), pool.place(tensor)
    with pytest.raises(Overloaded, match="every slot"):
        pool.place(tensor)
    pool.release(first)
    assert pool.place(tensor).offset == first.offset
    with pytest.raises(ValueError, match="not leased"):
        pool.release(Placement("other", 0, 0, 1, (1,)))
    with pytest.raises(InvalidInput, match="more than a slot's"):
        DeviceRegionPool("small", 1, 100, allocate=cpu_allocate).place(tensor)
    assert second.slot != first.slot


@pytest.fixture(scope="module")
def inference(settings) -> Iterator[triton.InferenceServerClient]:
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_shared_memory, "CudaIpcOpener", CpuIpc)
    loop = LoopThread()
    server = start_stage(loop, "inference", dataclasses.replace(settings, models=("yolov8n",), metrics=False))
    try:
        with triton.InferenceServerClient(server.address) as client:
            yield client
    finally:
        server.stop()
        loop.close()
        patch.undo()


def _register(client: triton.InferenceServerClient):
    return lambda name, raw, device_id, size: client.register_cuda_shared_memory(
        name, base64.b64encode(raw), device_id, size
    )


def _infer_placed(client, placement: Placement) -> np.ndarray:
    tensor = triton.InferInput("images", [1, *placement.shape], "UINT8")
    tensor.set_shared_memory(placement.region, placement.byte_size, offset=placement.offset)
    return client.infer("yolov8n", [tensor]).as_numpy("output0")


def test_the_inference_stage_reads_what_preprocess_placed_as_if_sent_as_bytes(inference, jpegs):
    pool = DeviceRegionPool("preprocess-0", slots=4, slot_bytes=SLOT, allocate=cpu_allocate)
    pool.register_with(_register(inference))
    try:
        for data in jpegs:
            tensor, host = _letterboxed(data)
            placement = pool.place(tensor)
            sent = triton.InferInput("images", [1, *host.shape], "UINT8")
            sent.set_data_from_numpy(host[None])
            plain = inference.infer("yolov8n", [sent]).as_numpy("output0")
            assert _infer_placed(inference, placement).tobytes() == plain.tobytes()
            pool.release(placement)
        assert pool.leased == 0
    finally:
        inference.unregister_cuda_shared_memory(pool.name)
        pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_preprocess_hands_device_tensors_to_an_inference_stage_in_another_process(jpegs):
    env = free_port_env() | {"INFERLINE_MODELS": "yolov8n", "INFERLINE_DEVICE": "cuda"}
    running = LocalStack(Settings.from_env(env), env=env, stages=("inference",))
    running.start(timeout=300)
    pool = DeviceRegionPool("preprocess-gpu", slots=4, slot_bytes=SLOT)
    try:
        with triton.InferenceServerClient(running.target("inference")) as client:
            pool.register_with(_register(client))
            for data in jpegs:
                tensor, host = _letterboxed(data, "cuda")
                assert tensor.is_cuda
                placement = pool.place(tensor)
                sent = triton.InferInput("images", [1, *host.shape], "UINT8")
                sent.set_data_from_numpy(host[None])
                plain = client.infer("yolov8n", [sent]).as_numpy("output0")
                np.testing.assert_allclose(_infer_placed(client, placement), plain, rtol=1e-3, atol=1e-3)
                pool.release(placement)
            client.unregister_cuda_shared_memory(pool.name)
    finally:
        running.stop()
        pool.close()
