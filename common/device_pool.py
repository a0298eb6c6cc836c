"""The controller's device memory: where preprocessed tensors live between stages on one GPU.

Issue 16, the GPU half of common/shm_pool.py and the same design: the controller owns one
buffer on the GPU the preprocess stage decodes on, cut into slots; a request leases a run of
them, the preprocess stage writes its letterboxed tensors there device to device, the inference
stage reads them as model inputs, and only region names, offsets and sizes travel over gRPC.
The controller registers the buffer with the inference stage through OIP's own
``CudaSharedMemoryRegister`` (so a Triton server works as the stage too), and hands it to the
preprocess stage in each request (``output_cuda``), which opens it once. The lease ends when the
inference call that reads it ends, however it ends, exactly as a system shared-memory lease.

Why the controller owns it, not the preprocess stage (which made the tensors): a controller
spreads its calls over every replica of a stage, so memory one preprocess replica owned would
need its release sent to that replica, and leak when it died; memory the controller owns is
released where the request ends, and any replica on the same GPU can write into it. One that
cannot open it (another GPU or host) says so and gets bytes on the host path.

The buffer comes from ``cudaMalloc`` (common/cuda_ipc.py), not torch's caching allocator: an IPC
handle names a whole allocation. Its name is a shm pool's (owner pid and start time, 128 random
bits), so a stage can tell the region of a controller that died and close it. The allocator is a
parameter: the tests hand a CPU tensor and an opaque 64-byte handle in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inferline.common.cuda_ipc import allocate_exported
from inferline.common.shm_pool import Lease, Slots, object_name

if TYPE_CHECKING:
    import torch

# (flat uint8 tensor, raw IPC handle, free) for byte_size bytes on device device_id.
Allocator = Callable[[int, int], tuple["torch.Tensor", bytes, Callable[[], None]]]


@dataclass(frozen=True)
class DeviceLease(Lease):
    """A run of the device pool's slots (not equal to a shm ``Lease`` at the same offset)."""


@dataclass(frozen=True, eq=False)
class DeviceTensor:
    """A tensor the preprocess stage wrote into the device pool: where it lies, not its bytes.

    What the controller hands the inference port in place of a host array. ``np.asarray`` of it
    copies it to the host (the inline path, when the inference stage cannot open the pool)."""

    pool: DevicePool
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.pool.host(self)
        return host if dtype is None else host.astype(dtype)


class DevicePool:
    """``slots`` x ``slot_bytes`` of device memory on ``device_id``, leased in runs of slots."""

    def __init__(self, slots: int, slot_bytes: int, device_id: int = 0, allocate: Allocator | None = None):
        self._slots = Slots(slots, slot_bytes)
        self.slot_bytes = self._slots.slot_bytes
        self.byte_size = self._slots.byte_size
        self.device_id = device_id
        self.name = object_name()
        self.memory, self.raw_handle, self._free = (allocate or allocate_exported)(self.byte_size, device_id)
        self._closed = False

    @property
    def in_use(self) -> int:
        return self._slots.in_use

    def acquire(self, byte_size: int) -> DeviceLease | None:
        """A run of free slots holding ``byte_size`` bytes, or None (the request goes another way)."""
        run = self._slots.acquire(byte_size)
        return None if run is None else DeviceLease(*run)

    def release(self, lease: Lease) -> None:
        self._slots.release(lease.offset, lease.byte_size)

    def tensor(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> DeviceTensor:
        """The tensor a stage says it wrote at ``offset``; ValueError when it is outside the pool."""
        placed = DeviceTensor(self, offset, tuple(shape), np.dtype(dtype))
        if offset < 0 or min(shape, default=1) < 0 or offset + placed.nbytes > self.byte_size:
            raise ValueError(f"{placed.nbytes} bytes at offset {offset} are outside the device pool's {self.byte_size}")
        return placed

    def host(self, placed: DeviceTensor) -> np.ndarray:
        """A host copy of a tensor in the pool."""
        flat = self.memory[placed.offset : placed.offset + placed.nbytes].cpu().numpy()
        return flat.view(placed.dtype).reshape(placed.shape)

    def close(self) -> None:
        """Frees the buffer (every stage that opened it must have closed it, or be gone). Idempotent."""
        if not self._closed:
            self._closed = True
            self._free()
