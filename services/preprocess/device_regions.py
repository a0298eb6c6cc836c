"""Preprocessed tensors handed to the inference stage on the same GPU without a host copy (issue 16).

The preprocess stage allocates one device buffer, exports it once by CUDA IPC and registers it
with the inference stage (``CudaSharedMemoryRegister``: its raw handle, device and size); after
that a request's letterboxed tensor is copied device to device into a free slot of it and only
the slot's ``shared_memory_region`` / ``_offset`` / ``_byte_size`` travel, as OIP's tensor
parameters, in place of the bytes. A slot is leased until the inference request that reads it has
ended, then released; when every slot is leased, placing refuses with Overloaded (the caller sends
bytes instead, or sheds) rather than growing device memory.

The allocator is a parameter: on a GPU ``common.cuda_ipc.allocate_exported``; in the tests a
CPU tensor with an opaque 64-byte name stands in for the device memory and its handle.

Not built yet: the wire. The preprocess proto's ``Tensor`` has no placement field and the
controller forwards bytes, so nothing sends these placements between stages (docs/gpu.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferline.common.cuda_ipc import allocate_exported
from inferline.common.errors import InvalidInput, Overloaded

if TYPE_CHECKING:
    import torch

# (tensor, raw IPC handle, free) for byte_size bytes on device device_id.
Allocator = Callable[[int, int], tuple["torch.Tensor", bytes, Callable[[], None]]]
# What registering a region with the inference stage takes: name, raw_handle, device_id, byte_size.
Register = Callable[[str, bytes, int, int], Any]


@dataclass(frozen=True)
class Placement:
    """Where one tensor lies in the shared region: what an OIP input names instead of its bytes."""

    region: str
    slot: int
    offset: int
    byte_size: int
    shape: tuple[int, ...]

    def parameters(self) -> dict[str, str | int]:
        """The OIP input's shared-memory parameters (services/inference/oip_servicer.py reads them)."""
        return {
            "shared_memory_region": self.region,
            "shared_memory_offset": self.offset,
            "shared_memory_byte_size": self.byte_size,
        }


class DeviceRegionPool:
    """``slots`` slots of ``slot_bytes`` each in one exported device buffer; thread-safe."""

    def __init__(
        self,
        name: str,
        slots: int,
        slot_bytes: int,
        device_id: int = 0,
        allocate: Allocator = allocate_exported,
    ):
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a region pool needs slots >= 1 and slot_bytes >= 1, got {slots} and {slot_bytes}")
        self.name = name
        self.slot_bytes = slot_bytes
        self.device_id = device_id
        self.byte_size = slots * slot_bytes
        self.memory, self.raw_handle, self._free = allocate(self.byte_size, device_id)
        self._idle = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def register_with(self, register: Register) -> None:
        """Registers the whole buffer once with the inference stage (a client's RPC, or its registry)."""
        register(self.name, self.raw_handle, self.device_id, self.byte_size)

    def place(self, tensor: torch.Tensor) -> Placement:
        """Copies a contiguous uint8 tensor into a free slot (on the device: no host copy)."""
        byte_size = tensor.numel() * tensor.element_size()
        if byte_size > self.slot_bytes:
            raise InvalidInput(
                f"a tensor of shape {list(tensor.shape)} has {byte_size} bytes, more than a slot's {self.slot_bytes} "
                f"in CUDA region {self.name!r}; make the slots larger"
            )
        with self._lock:
            if not self._idle:
                raise Overloaded(f"every slot of CUDA region {self.name!r} is in use; retry when requests finish")
            slot = self._idle.pop()
        offset = slot * self.slot_bytes
        target = self.memory[offset : offset + byte_size]
        target.copy_(tensor.contiguous().reshape(-1).view(target.dtype))
        if target.is_cuda:
            # The inference stage reads the slot from another process: the copy must be done first.
            import torch  # noqa: PLC0415 - a CUDA tensor is here, so torch is loaded

            torch.cuda.current_stream(target.device).synchronize()
        return Placement(self.name, slot, offset, byte_size, tuple(tensor.shape))

    def release(self, placement: Placement) -> None:
        """The slot is free again: the request that read it has ended (answered, failed or cancelled)."""
        with self._lock:
            if placement.region != self.name or placement.slot in self._idle:
                raise ValueError(f"slot {placement.slot} of {placement.region!r} is not leased from {self.name!r}")
            self._idle.append(placement.slot)

    @property
    def leased(self) -> int:
        with self._lock:
            return self.byte_size // self.slot_bytes - len(self._idle)

    def close(self) -> None:
        """Frees the buffer; the inference stage must have unregistered (closed) it first."""
        self._free()
