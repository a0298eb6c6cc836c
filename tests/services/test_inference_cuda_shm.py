"""The inference stage serves OIP's CUDA shared-memory extension with Triton's semantics.

On CPU the device memory is stood in for by CPU tensors: ``CpuIpc`` plays the other process,
handing out 64-byte "handles" for its tensors, and the stage opens them through the same
registry, servicer and request path a GPU uses (only ``cudaIpcOpenMemHandle`` differs). The
unmodified ``tritonclient.grpc`` registers regions and sends requests. The gpu-marked test at
the end does the same with real CUDA IPC from another process.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from inferline.common import cuda_regions
from inferline.common.cuda_ipc import IPC_HANDLE_BYTES, CudaUnavailable
from inferline.common.cuda_regions import stack_on_device
from inferline.common.errors import InvalidInput, Overloaded
from inferline.common.settings import Settings
from inferline.common.shm import RegionExists, RegionNotFound
from inferline.services.inference import cuda_shared_memory, models
from inferline.services.inference.backends import load_backend
from inferline.services.inference.cuda_shared_memory import CudaShmRegistry, OpenedRegion
from inferline.services.inference.repository import BUILTIN_REPOSITORY, load_config
from inferline.services.inference.weights import ResolvedWeights
from tests.support.servers import LoopThread, RunningServer, start_stage

IMAGE = np.random.default_rng(16).integers(0, 256, size=(1, 3, 64, 64), dtype=np.uint8)
OUTPUT0_BYTES = 84 * 84 * 4  # yolov8n on 64x64: 84 anchors of 84 floats
SHAPE_OFFSET = 32 * 1024


class CpuIpc:
    """The exporting process: tensors by handle, as cudaIpcGetMemHandle/cudaIpcOpenMemHandle."""

    memory: dict[bytes, torch.Tensor] = {}
    closed: list[bytes] = []

    @classmethod
    def export(cls, byte_size: int) -> tuple[bytes, torch.Tensor]:
        handle = os.urandom(IPC_HANDLE_BYTES)
        cls.memory[handle] = torch.zeros(byte_size, dtype=torch.uint8)
        return handle, cls.memory[handle]

    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> OpenedRegion:
        if raw_handle not in self.memory:
            raise InvalidInput("cudaIpcOpenMemHandle failed: invalid handle")
        return OpenedRegion(self.memory[raw_handle][:byte_size], lambda: self.closed.append(raw_handle))


def _registry(**limits: int) -> CudaShmRegistry:
    return CudaShmRegistry(limits.get("max_regions", 4), limits.get("max_bytes", 1 << 20), CpuIpc)


def test_register_opens_the_handle_and_reads_and_writes_stay_in_the_clients_memory():
    handle, memory = CpuIpc.export(64)
    memory[:8] = torch.arange(8, dtype=torch.uint8)
    regions = _registry()
    regions.register("r", handle, 0, 64)

    assert bytes(regions.read("r", 2, 4, "input 'x'")) == bytes([2, 3, 4, 5])
    regions.write("r", 16, 8, np.array([1.5, -2.0], np.float32), "output 'y'")
    assert memory[16:24].numpy().view(np.float32).tolist() == [1.5, -2.0]
    assert [(s.name, s.device_id, s.byte_size) for s in regions.status()] == [("r", 0, 64)]

    regions.unregister("r")
    regions.unregister("r")  # idempotent, as Triton's
    assert handle in CpuIpc.closed and regions.status() == []


def test_reads_and_writes_outside_a_region_are_refused_before_touching_it():
    handle, memory = CpuIpc.export(64)
    regions = _registry()
    regions.register("r", handle, 0, 32)  # the client may register less than it allocated
    with pytest.raises(InvalidInput, match=r"8 bytes at offset 28 of CUDA shared memory region 'r'.*32 bytes"):
        regions.read("r", 28, 8, "input 'x'")
    with pytest.raises(InvalidInput, match="larger region"):
        regions.write("r", 0, 4, np.zeros(2, np.float32), "output 'y'")
    with pytest.raises(InvalidInput, match="outside it"):
        regions.write("r", 30, 8, np.zeros(2, np.float32), "output 'y'")
    assert not memory.any()


def test_bad_handles_sizes_duplicates_and_limits_are_refused_with_what_to_change():
    regions = _registry(max_regions=2, max_bytes=100)
    with pytest.raises(InvalidInput, match="raw_handle has 6 bytes, a cudaIpcMemHandle_t has 64"):
        regions.register("r", b"handle", 0, 16)
    handle, _ = CpuIpc.export(128)
    for device_id, byte_size in ((0, 0), (-1, 16)):
        with pytest.raises(InvalidInput, match="byte_size must be > 0 and device_id >= 0"):
            regions.register("r", handle, device_id, byte_size)
    with pytest.raises(InvalidInput, match="invalid handle"):
        regions.register("r", os.urandom(IPC_HANDLE_BYTES), 0, 16)
    regions.register("a", handle, 0, 60)
    with pytest.raises(RegionExists, match="already registered"):
        regions.register("a", handle, 0, 16)
    with pytest.raises(Overloaded, match="INFERLINE_CUDA_SHM_MAX_BYTES"):
        regions.register("b", handle, 0, 41)
    regions.register("b", handle, 0, 40)
    with pytest.raises(Overloaded, match="INFERLINE_CUDA_SHM_MAX_REGIONS"):
        regions.register("c", handle, 0, 1)
    with pytest.raises(RegionNotFound, match="CudaSharedMemoryRegister"):
        regions.status("c")


def test_a_name_of_a_system_region_is_taken():
    handle, _ = CpuIpc.export(16)
    regions = CudaShmRegistry(4, 1 << 20, CpuIpc, taken=lambda name: name == "system")
    with pytest.raises(RegionExists):
        regions.register("system", handle, 0, 16)


def test_without_cuda_register_says_why_and_nothing_else_is_checked(monkeypatch):
    def no_cuda() -> cuda_shared_memory.IpcOpener:
        raise CudaUnavailable("no GPU to share")

    regions = CudaShmRegistry(4, 1 << 20, no_cuda)
    with pytest.raises(CudaUnavailable, match="no GPU"):
        regions.register("", b"", -1, 0)
    assert regions.status() == []


def test_an_input_in_a_cuda_region_is_a_typed_view_that_stays_where_it_lies():
    """What a backend that takes device tensors gets: no copy until the batch is stacked on the
    device; a host copy only when asked for (np.asarray)."""
    handle, memory = CpuIpc.export(64)
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    memory[8:40] = torch.from_numpy(values.reshape(-1).view(np.uint8))
    regions = _registry()
    regions.register("r", handle, 0, 64)

    batch = regions.typed("r", 8, 32, "input 'x'", np.dtype(np.float32), (2, 4))
    second = batch[1]
    assert (second.shape, second.dtype, second.nbytes) == ((4,), np.float32, 16)
    assert second.torch().tolist() == [4.0, 5.0, 6.0, 7.0]
    assert second.torch().data_ptr() == memory[24:].data_ptr(), "a view of the region, not a copy"
    assert batch[-2].torch().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.asarray(batch).tolist() == values.tolist()
    with pytest.raises(IndexError, match="outside the first dimension of size 2"):
        batch[2]

    stacked = stack_on_device([batch[0], batch[1]])
    assert stacked is not None and torch.equal(stacked, torch.from_numpy(values))
    memory[8:12] = 0
    assert stacked[0, 0] == 0.0, "the stack is a copy: the region may be reused once it is made"
    assert stack_on_device([batch[0], values[1]]) is None, "a host item: the batch is stacked on the host"
    with pytest.raises(InvalidInput, match="cannot be read from a CUDA region"):
        regions.typed("r", 0, 8, "input 'x'", np.dtype(object), (1,))


# Through a real stage: the stand-in replaces only cudaIpcOpenMemHandle.


@pytest.fixture(scope="module")
def client(settings) -> Iterator[triton.InferenceServerClient]:
    patch = pytest.MonkeyPatch()
    patch.setattr(cuda_regions, "CudaIpcOpener", CpuIpc)
    loop = LoopThread()
    server: RunningServer = start_stage(
        loop, "inference", dataclasses.replace(settings, models=("yolov8n",), metrics=False, cuda_shm_max_regions=3)
    )
    try:
        with triton.InferenceServerClient(server.address) as running:
            yield running
    finally:
        server.stop()
        loop.close()
        patch.undo()


@pytest.fixture(autouse=True)
def _unregistered(request):
    yield
    if "client" in request.fixturenames:
        request.getfixturevalue("client").unregister_cuda_shared_memory()


def _register(client, name: str, byte_size: int) -> torch.Tensor:
    handle, memory = CpuIpc.export(byte_size)
    client.register_cuda_shared_memory(name, base64.b64encode(handle), 0, byte_size)
    return memory


def _shm_request(input_offset: int = 0, output_size: int = OUTPUT0_BYTES):
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_shared_memory("input", IMAGE.nbytes, offset=input_offset)
    outputs = [triton.InferRequestedOutput("output0"), triton.InferRequestedOutput("output0__shape")]
    outputs[0].set_shared_memory("output", output_size)
    outputs[1].set_shared_memory("output", 16, offset=SHAPE_OFFSET)
    return [tensor], outputs


def _refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value


def test_inputs_from_and_outputs_into_cuda_regions_equal_the_raw_bytes_path(client):
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    plain = client.infer("yolov8n", [tensor])

    source = _register(client, "input", IMAGE.nbytes)
    source.copy_(torch.from_numpy(IMAGE.reshape(-1)))
    target = _register(client, "output", 64 * 1024)
    inputs, outputs = _shm_request()
    response = client.infer("yolov8n", inputs, outputs=outputs).get_response()

    assert list(response.raw_output_contents) == [b"", b""], "an output in shared memory carries no bytes"
    assert target[:OUTPUT0_BYTES].numpy().tobytes() == plain.as_numpy("output0").tobytes()
    shape = target[SHAPE_OFFSET : SHAPE_OFFSET + 16].numpy().view(np.int64)
    assert shape.tolist() == plain.as_numpy("output0__shape").reshape(-1).tolist()
    listed = client.get_cuda_shared_memory_status(as_json=True)["regions"]
    assert {n: int(r["byte_size"]) for n, r in listed.items()} == {"input": IMAGE.nbytes, "output": 64 * 1024}


def test_an_input_in_a_cuda_region_reaches_the_model_without_a_trip_through_the_host(client, monkeypatch):
    """The batch is stacked where the region lies and fed from there: on a GPU, the tensor the
    preprocess stage wrote never leaves the device (here the stand-in's CPU tensors)."""
    host_copies, stacks = [], []
    to_host = cuda_regions.RegionTensor.__array__
    monkeypatch.setattr(cuda_regions.RegionTensor, "__array__",
                        lambda self, *a, **k: host_copies.append(self) or to_host(self, *a, **k))
    stack = models.stack_on_device
    monkeypatch.setattr(models, "stack_on_device", lambda arrays: stacks.append(r := stack(arrays)) or r)
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    plain = client.infer("yolov8n", [tensor]).as_numpy("output0")

    source = _register(client, "input", IMAGE.nbytes)
    source.copy_(torch.from_numpy(IMAGE.reshape(-1)))
    inputs, _ = _shm_request()
    shared = client.infer("yolov8n", inputs).as_numpy("output0")

    assert shared.tobytes() == plain.tobytes()
    assert host_copies == []
    assert [type(s) for s in stacks] == [type(None), torch.Tensor], "the plain request stacks on the host"


def test_the_torch_backend_takes_a_batch_on_its_device_as_it_takes_host_arrays(yolo_weights):
    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    config = dataclasses.replace(config, backend="torch", parameters={})
    backend = load_backend(config, ResolvedWeights(path=yolo_weights, sha256="", official=False), Settings())
    assert backend.takes_device_tensors
    images = np.repeat(IMAGE, 2, axis=0)
    from_host = backend.run({"images": images})
    on_device = backend.run({"images": torch.from_numpy(images.copy())})
    assert [o["output0"].tobytes() for o in on_device] == [o["output0"].tobytes() for o in from_host]


def test_misuse_of_cuda_regions_is_refused_and_the_stage_serves_on(client):
    inputs, outputs = _shm_request()
    error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
    assert error.status() == "StatusCode.NOT_FOUND"

    _register(client, "input", IMAGE.nbytes)
    _register(client, "output", 64 * 1024)
    inputs, outputs = _shm_request(input_offset=1)
    error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
    assert (
        error.status() == "StatusCode.INVALID_ARGUMENT" and "offset 1 of CUDA shared memory region" in error.message()
    )
    inputs, outputs = _shm_request(output_size=100)
    error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "larger region" in error.message()

    error = _refused(client.register_cuda_shared_memory, "short", base64.b64encode(b"handle"), 0, 16)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "cudaIpcMemHandle_t" in error.message()
    error = _refused(client.register_cuda_shared_memory, "input", base64.b64encode(os.urandom(64)), 0, 16)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "already registered" in error.message()
    _register(client, "third", 16)
    error = _refused(client.register_cuda_shared_memory, "fourth", base64.b64encode(os.urandom(64)), 0, 16)
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "INFERLINE_CUDA_SHM_MAX_REGIONS" in error.message()
    error = _refused(client.get_cuda_shared_memory_status, "absent")
    assert error.status() == "StatusCode.NOT_FOUND"

    client.unregister_cuda_shared_memory()
    assert not client.get_cuda_shared_memory_status().regions
    assert client.is_model_ready("yolov8n")


# On the GPU: a client process allocates, exports and fills device memory; the stage opens it.
_GPU_CLIENT = textwrap.dedent(
    """
    import base64, sys
    import numpy as np, torch, tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException
    from inferline.common.cuda_ipc import allocate_exported

    address, image_bytes = sys.argv[1], int(sys.argv[2])
    image = np.random.default_rng(16).integers(0, 256, size=(1, 3, 64, 64), dtype=np.uint8)
    client = triton.InferenceServerClient(address)
    memory, frees = {}, []
    for name, size in (("input", image_bytes), ("output", 65536)):
        memory[name], raw_handle, free = allocate_exported(size, 0)
        frees.append(free)
        client.register_cuda_shared_memory(name, base64.b64encode(raw_handle), 0, size)
    # Claiming more than was allocated is refused (a read past it would fault the stage's GPU).
    _, raw_handle, free = allocate_exported(4096, 0)
    frees.append(free)
    try:
        client.register_cuda_shared_memory("huge", base64.b64encode(raw_handle), 0, 1 << 30)
    except InferenceServerException as error:
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "fewer than" in error.message(), error
    else:
        raise SystemExit("a region larger than its allocation was registered")
    memory["input"].copy_(torch.from_numpy(image.reshape(-1)))
    torch.cuda.synchronize()
    tensor = triton.InferInput("images", list(image.shape), "UINT8")
    tensor.set_shared_memory("input", image_bytes)
    output = triton.InferRequestedOutput("output0")
    output.set_shared_memory("output", 65536)
    client.infer("yolov8n", [tensor], outputs=[output])
    sys.stdout.buffer.write(memory["output"][: 84 * 84 * 4].cpu().numpy().tobytes())
    client.unregister_cuda_shared_memory()
    for free in frees:
        free()
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_client_process_shares_device_memory_with_the_stage_by_cuda_ipc(settings):
    loop = LoopThread()
    server = start_stage(loop, "inference", dataclasses.replace(settings, models=("yolov8n",), metrics=False))
    try:
        with triton.InferenceServerClient(server.address) as client:
            tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
            tensor.set_data_from_numpy(IMAGE)
            plain = client.infer("yolov8n", [tensor]).as_numpy("output0")
            shared = subprocess.run(
                [sys.executable, "-c", _GPU_CLIENT, server.address, str(IMAGE.nbytes)],
                capture_output=True,
                check=True,
                timeout=120,
            ).stdout
            # Two forward passes on the GPU: equal up to cuDNN's choice of algorithm.
            np.testing.assert_allclose(np.frombuffer(shared, np.float32), plain.reshape(-1), rtol=1e-4, atol=1e-3)
            assert not client.get_cuda_shared_memory_status().regions
    finally:
        server.stop()
        loop.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_a_batch_from_regions_feeds_the_model_where_it_lies(yolo_weights, settings):
    """Torch takes the stacked batch on its device; ONNX Runtime's CUDA provider binds it by its
    device pointer (when onnxruntime-gpu is installed). Both answer as from host arrays."""
    import onnxruntime as ort  # noqa: PLC0415 - only on a GPU machine

    memory = torch.from_numpy(np.repeat(IMAGE, 2, axis=0).reshape(-1)).cuda()
    size = IMAGE.nbytes
    items = [cuda_regions.RegionTensor(memory[i * size : (i + 1) * size], np.dtype(np.uint8), IMAGE.shape[1:])
             for i in range(2)]
    batch = stack_on_device(items)
    assert batch is not None and batch.is_cuda
    config = load_config(BUILTIN_REPOSITORY / "yolov8n" / "config.yaml")
    layouts = [dataclasses.replace(config, backend="torch", parameters={})]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        layouts.append(config)
    for layout in layouts:
        backend = load_backend(layout, ResolvedWeights(path=yolo_weights, sha256="", official=False),
                               dataclasses.replace(settings, device="cuda"))
        from_host = backend.run({"images": np.repeat(IMAGE, 2, axis=0)})
        on_device = backend.run({"images": batch})
        for ours, ref in zip(on_device, from_host, strict=True):
            np.testing.assert_allclose(ours["output0"], ref["output0"], rtol=1e-4, atol=1e-3)
