"""CUDA IPC between two processes on one GPU: device memory exported by one, opened by the other.

The preprocess stage exports a buffer it allocated (``allocate_exported``); the inference stage
opens a client's or preprocess's handle (``open_exported``), as Triton's CUDA shared-memory
extension does. Both sides see the memory as a flat uint8 torch tensor on the device, wrapped
without a copy through ``__cuda_array_interface__``.

Memory comes straight from ``cudaMalloc``, not torch's caching allocator: an IPC handle names a
whole allocation, and a block torch carved out of a larger segment would be opened at the
segment's start. torch and cuda-python (``cuda.bindings``) are imported only when called.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# CUDA_IPC_HANDLE_SIZE: a cudaIpcMemHandle_t is 64 opaque bytes.
IPC_HANDLE_BYTES = 64


class CudaUnavailable(Exception):
    """This process cannot share device memory (no GPU, or no cuda-python); the message says why."""


def _runtime() -> tuple[Any, Any]:
    """torch and cuda-python's runtime bindings, or CudaUnavailable with why. The GPU is checked
    first: a process without one never loads cuda-python's native modules."""
    try:
        import torch  # noqa: PLC0415 - only a process that shares device memory loads these
    except ImportError as exc:
        raise CudaUnavailable(
            f"CUDA shared memory is not served: {exc.name or exc} is not installed (torch and cuda-python "
            "are needed); use system shared memory (SystemSharedMemoryRegister)"
        ) from None
    if not torch.cuda.is_available():
        raise CudaUnavailable(
            "CUDA shared memory is not served: this stage has no GPU to share; use system shared memory "
            "(SystemSharedMemoryRegister, perf_analyzer --shared-memory=system)"
        )
    try:
        from cuda.bindings import runtime  # noqa: PLC0415 - as above
    except ImportError as exc:
        raise CudaUnavailable(
            f"CUDA shared memory is not served: {exc.name or exc} is not installed (cuda-python is "
            "needed); use system shared memory (SystemSharedMemoryRegister)"
        ) from None
    return torch, runtime


def check_available() -> None:
    """CudaUnavailable, with why, unless this process can export and open CUDA IPC handles."""
    _runtime()


class _DeviceArray:
    """A device pointer as ``__cuda_array_interface__``, which ``torch.as_tensor`` wraps without copying."""

    def __init__(self, pointer: int, byte_size: int):
        self.__cuda_array_interface__ = {
            "shape": (byte_size,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
        }


def _check(runtime: Any, error: Any, call: str, device_id: int) -> None:
    if error != runtime.cudaError_t.cudaSuccess:
        raise OSError(f"{call} failed on CUDA device {device_id}: {runtime.cudaGetErrorString(error)[1].decode()}")


def allocate_exported(byte_size: int, device_id: int) -> tuple[torch.Tensor, bytes, Callable[[], None]]:
    """``byte_size`` bytes of device memory, their IPC handle, and how to free them (after every
    process that opened the handle has closed it)."""
    torch, rt = _runtime()
    with torch.cuda.device(device_id):
        _check(rt, rt.cudaSetDevice(device_id)[0], "cudaSetDevice", device_id)
        error, pointer = rt.cudaMalloc(byte_size)
        _check(rt, error, "cudaMalloc", device_id)
        error, handle = rt.cudaIpcGetMemHandle(pointer)
        _check(rt, error, "cudaIpcGetMemHandle", device_id)
    raw_handle = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)
    tensor = torch.as_tensor(_DeviceArray(int(pointer), byte_size), device=f"cuda:{device_id}")

    def free() -> None:
        with torch.cuda.device(device_id):
            torch.cuda.synchronize()
            rt.cudaFree(pointer)

    return tensor, raw_handle, free


def open_exported(raw_handle: bytes, device_id: int, byte_size: int) -> tuple[torch.Tensor, Callable[[], None]]:
    """Another process's device memory as a tensor (``cudaIpcOpenMemHandle``), and how to close it.
    ValueError when the device is not visible here or CUDA refuses the handle."""
    torch, rt = _runtime()
    if device_id >= torch.cuda.device_count():
        raise ValueError(
            f"CUDA device {device_id} is not visible to this process ({torch.cuda.device_count()} are); "
            "share memory between processes on the same GPU"
        )
    if len(raw_handle) != IPC_HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, not {len(raw_handle)}")
    # cuda-python 13's handle type exposes only its address: the 64 bytes are copied in by hand.
    handle = rt.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw_handle, IPC_HANDLE_BYTES)
    with torch.cuda.device(device_id):
        _check(rt, rt.cudaSetDevice(device_id)[0], "cudaSetDevice", device_id)
        error, pointer = rt.cudaIpcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess)
    if error != rt.cudaError_t.cudaSuccess:
        raise ValueError(
            f"cudaIpcOpenMemHandle failed on device {device_id}: {rt.cudaGetErrorString(error)[1].decode()}; "
            "the handle must come from cudaIpcGetMemHandle in another process on this host"
        )

    def close() -> None:
        with torch.cuda.device(device_id):
            torch.cuda.synchronize()
            rt.cudaIpcCloseMemHandle(pointer)

    # The allocation's real size: a region claimed larger would let a request reach past it,
    # and an illegal address poisons this process's whole CUDA context.
    allocated = _allocation_size(int(pointer))
    if allocated is not None and byte_size > allocated:
        close()
        raise ValueError(
            f"the handle's allocation has {allocated} bytes, fewer than the {byte_size} registered; "
            "register at most what was allocated"
        )
    tensor = torch.as_tensor(_DeviceArray(int(pointer), byte_size), device=f"cuda:{device_id}")
    return tensor, close


def _allocation_size(pointer: int) -> int | None:
    """Bytes from ``pointer`` to the end of its allocation (cuMemGetAddressRange), None if unknown."""
    from cuda.bindings import driver  # noqa: PLC0415 - as _runtime's imports

    error, base, size = driver.cuMemGetAddressRange(pointer)
    if error != driver.CUresult.CUDA_SUCCESS:
        return None
    return int(base) + int(size) - pointer
