"""The inference stage serves OIP's system shared-memory extension, as Triton does.

Every call goes through the unmodified ``tritonclient.grpc`` and ``tritonclient.utils.shared_memory``
(the client creates, fills, reads and destroys the POSIX shm objects; the stage only maps them)
against an in-process inference stage serving yolov8n. What comes out of shared memory must
equal, bit for bit, what the plain raw-bytes path answers; every misuse is refused with the right
status and a message naming what to change, and the stage keeps serving.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from inferline.common.errors import InvalidInput
from inferline.common.shm import SHM_ROOT, RegionNotFound, SharedMemoryRegistry, check_key
from tests.support.servers import LoopThread, RunningServer, start_stage

PREFIX = f"inferline-test-{uuid.uuid4().hex[:8]}"
IMAGE = np.random.default_rng(16).integers(0, 256, size=(1, 3, 64, 64), dtype=np.uint8)
# yolov8n on 64x64: 8x8 + 4x4 + 2x2 = 84 anchors of 84 floats, and output0__shape's [1, 2] int64.
OUTPUT0_BYTES = 84 * 84 * 4
SHAPE_OFFSET = 32 * 1024


@pytest.fixture(scope="module")
def server(settings) -> Iterator[RunningServer]:
    loop = LoopThread()
    running = start_stage(
        loop, "inference", dataclasses.replace(settings, models=("yolov8n",), shm_max_regions=6, metrics=False)
    )
    yield running
    running.stop()
    loop.close()


@pytest.fixture(scope="module")
def client(server) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as running:
        yield running
    assert not [n for n in os.listdir(SHM_ROOT) if n.startswith(PREFIX)], "a test left a shm object behind"


@pytest.fixture(autouse=True)
def _unregistered(client):
    yield
    client.unregister_system_shared_memory()


@contextmanager
def region(client, name: str, byte_size: int, register: bool = True) -> Iterator[tuple[object, str]]:
    """A shm object the client creates (and destroys), registered with the stage as ``name``."""
    key = f"/{PREFIX}-{name}"
    handle = shm.create_shared_memory_region(name, key, byte_size)
    try:
        if register:
            client.register_system_shared_memory(name, key, byte_size)
        yield handle, key
    finally:
        shm.destroy_shared_memory_region(handle)


def _plain(client) -> dict[str, np.ndarray]:
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_data_from_numpy(IMAGE)
    result = client.infer("yolov8n", [tensor])
    return {name: result.as_numpy(name) for name in ("output0", "output0__shape")}


def _shm_request(input_offset: int = 0, input_size: int = IMAGE.nbytes, output_size: int = OUTPUT0_BYTES):
    tensor = triton.InferInput("images", list(IMAGE.shape), "UINT8")
    tensor.set_shared_memory("input", input_size, offset=input_offset)
    outputs = [triton.InferRequestedOutput("output0"), triton.InferRequestedOutput("output0__shape")]
    outputs[0].set_shared_memory("output", output_size)
    outputs[1].set_shared_memory("output", 16, offset=SHAPE_OFFSET)
    return [tensor], outputs


def _from_shm(handle, response) -> dict[str, np.ndarray]:
    """The outputs as the client reads them: their shape from the response, their bytes from shm."""
    shapes = {o.name: list(o.shape) for o in response.outputs}
    assert list(response.raw_output_contents) == [b"", b""], "an output in shared memory carries no bytes"
    return {
        "output0": shm.get_contents_as_numpy(handle, np.float32, shapes["output0"]),
        "output0__shape": shm.get_contents_as_numpy(handle, np.int64, shapes["output0__shape"], offset=SHAPE_OFFSET),
    }


def _refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value


def test_server_metadata_names_the_extension(client):
    assert "system_shared_memory" in client.get_server_metadata().extensions


def test_inputs_from_and_outputs_into_shared_memory_equal_the_raw_bytes_path(client):
    plain = _plain(client)
    with region(client, "input", IMAGE.nbytes) as (input_handle, _), region(client, "output", 64 * 1024) as (out, _):
        shm.set_shared_memory_region(input_handle, [IMAGE])
        inputs, outputs = _shm_request()
        unary = _from_shm(out, client.infer("yolov8n", inputs, outputs=outputs).get_response())
        for name, array in plain.items():
            assert array.dtype == unary[name].dtype and array.tobytes() == unary[name].tobytes(), name

        # ModelStreamInfer reads and writes the same regions.
        shm.set_shared_memory_region(out, [np.zeros(OUTPUT0_BYTES, np.uint8)])
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            client.async_stream_infer("yolov8n", inputs, outputs=outputs)
            result, error = answers.get(timeout=30)
        finally:
            client.stop_stream()
        assert error is None
        streamed = _from_shm(out, result.get_response())
        assert all(plain[n].tobytes() == streamed[n].tobytes() for n in plain)


def test_status_lists_the_regions_and_unregister_removes_them(client):
    with region(client, "a", 4096) as (_, key_a), region(client, "b", 8192) as (_, key_b):
        regions = client.get_system_shared_memory_status(as_json=True)["regions"]
        listed = {n: (r["key"], int(r["byte_size"])) for n, r in regions.items()}
        assert listed == {"a": (key_a, 4096), "b": (key_b, 8192)}
        assert list(client.get_system_shared_memory_status("a").regions) == ["a"]

        client.unregister_system_shared_memory("a")
        client.unregister_system_shared_memory("a")  # as Triton: unregistering is idempotent
        error = _refused(client.get_system_shared_memory_status, "a")
        assert error.status() == "StatusCode.NOT_FOUND" and "'a'" in error.message()
        client.unregister_system_shared_memory()
        assert not client.get_system_shared_memory_status().regions


def test_reads_and_writes_outside_a_region_are_refused(client):
    with region(client, "input", IMAGE.nbytes) as (input_handle, _), region(client, "output", 64 * 1024):
        shm.set_shared_memory_region(input_handle, [IMAGE])
        inputs, outputs = _shm_request(input_offset=1)
        error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'input'" in error.message() and "offset 1" in error.message() and str(IMAGE.nbytes) in error.message()

        inputs, outputs = _shm_request(input_size=IMAGE.nbytes - 1)
        error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "needs 12288 bytes" in error.message()

        inputs, outputs = _shm_request(output_size=100)
        error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
        assert f"{OUTPUT0_BYTES} bytes" in error.message() and "larger region" in error.message()

    with region(client, "small", 4096, register=False) as (_, key):
        error = _refused(client.register_system_shared_memory, "small", key, 8192)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "does not fit" in error.message()
    assert _plain(client)["output0"].shape == (1, 84, 84)


def test_unknown_regions_foreign_keys_and_duplicates_are_refused(client):
    inputs, outputs = _shm_request()
    error = _refused(client.infer, "yolov8n", inputs, outputs=outputs)
    assert error.status() == "StatusCode.NOT_FOUND" and "SystemSharedMemoryRegister" in error.message()

    for key in ("/etc/passwd", "../etc/passwd", "/..", "/"):
        error = _refused(client.register_system_shared_memory, "evil", key, 16)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "shm name" in error.message(), key
    error = _refused(client.register_system_shared_memory, "none", f"/{PREFIX}-absent", 16)
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "shm_open" in error.message()

    with region(client, "twice", 4096) as (_, key):
        error = _refused(client.register_system_shared_memory, "twice", key, 4096)
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "already registered" in error.message()
    assert not client.get_system_shared_memory_status().regions.get("evil")
    assert _plain(client)["output0"].shape == (1, 84, 84)


def test_regions_are_bounded_and_cuda_shared_memory_says_why_it_is_not_served(client):
    with region(client, "many", 4096, register=False) as (_, key):
        for index in range(6):
            client.register_system_shared_memory(f"r{index}", key, 4096)
        error = _refused(client.register_system_shared_memory, "r6", key, 4096)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "INFERLINE_SHM_MAX_REGIONS" in error.message()
        client.unregister_system_shared_memory()
    # No CUDA region can exist here: listing or unregistering all of them succeeds (as clients
    # that clean up expect), registering one is refused with why.
    assert not client.get_cuda_shared_memory_status().regions
    client.unregister_cuda_shared_memory()
    error = _refused(client.register_cuda_shared_memory, "gpu", base64.b64encode(b"handle"), 0, 16)
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "no GPU" in error.message()


def test_the_registry_unmaps_everything_when_it_closes(tmp_path):
    """The domain registry, without gRPC: what the stage does when it stops."""
    key = f"/{PREFIX}-registry"
    handle = shm.create_shared_memory_region("registry", key, 4096)
    try:
        registry = SharedMemoryRegistry(max_regions=2, max_bytes=4096)
        registry.register("a", key, 0, 4096)
        with pytest.raises(Exception, match="INFERLINE_SHM_MAX_BYTES"):
            registry.register("b", key, 0, 1)
        view = registry.read("a", 0, 16, "input 'x'")
        assert view.readonly and len(view) == 16
        del view
        registry.close()
        assert registry.status() == []
        with pytest.raises(RegionNotFound):
            registry.read("a", 0, 16, "input 'x'")
    finally:
        shm.destroy_shared_memory_region(handle)
    for key in ("a/b", "..", "", "/a/b", "x" * 300):
        with pytest.raises(InvalidInput):
            check_key(key)
    assert check_key("/input0") == SHM_ROOT / "input0"
