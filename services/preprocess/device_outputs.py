"""The preprocess stage's writes into a controller's device pool (issue 16, common/device_pool.py).

A request's ``output_cuda`` names the controller's buffer (region name, IPC handle, device, size)
and the room this request may fill. The buffer is opened once per region name (CUDA IPC) and
kept; each tensor is copied into the room device to device when it was made on the GPU (nvJPEG
and the torch letterbox), host to device otherwise, one after another, each 64-byte aligned, as
into a system shared-memory room. One stream sync after the copies: the inference stage reads
them from another process once this call has answered.

Opened regions are bounded (``INFERLINE_CUDA_SHM_MAX_REGIONS`` / ``_MAX_BYTES``); when the table
is full the least recently used one is closed to open a new one (a controller that restarted, or
died, leaves its region behind until then: an owner's pid cannot be checked from another pod).
A region this stage cannot open (no GPU here, another GPU, a stale handle) is ``CudaUnavailable``
for the caller, who then sends the tensors by another way; a room outside its region is the
caller's error (INVALID_ARGUMENT).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inferline.common.cuda_ipc import CudaUnavailable
from inferline.common.cuda_regions import CudaShmRegistry, IpcOpener
from inferline.common.errors import InvalidInput, Overloaded, quoted
from inferline.common.shm import ALIGN, RegionExists


@dataclass(frozen=True)
class CudaRoom:
    """What a request's ``output_cuda`` says: the region, and the bytes of it this call may fill."""

    region: str
    raw_handle: bytes
    device_id: int
    region_byte_size: int
    offset: int
    byte_size: int


class DeviceOutputs:
    def __init__(self, max_regions: int, max_bytes: int, opener: Callable[[], IpcOpener] | None = None):
        self.regions = CudaShmRegistry(max_regions, max_bytes, opener)
        self._used: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def place(self, room: CudaRoom, tensors: Sequence[Any]) -> list[int | None]:
        """Writes each tensor (a torch tensor or a numpy array; None: left out) into the room one
        after another; returns where each went (an offset in the region), None for one left out
        or past the room (it travels another way). CudaUnavailable when the region cannot be opened."""
        self._open(room)
        if room.offset < 0 or room.byte_size < 0 or room.offset + room.byte_size > room.region_byte_size:
            raise InvalidInput(
                f"output_cuda: {room.byte_size} bytes at offset {room.offset} are outside region "
                f"{quoted(room.region)} ({room.region_byte_size} bytes)"
            )
        import torch  # noqa: PLC0415 - a region is open, so torch is loaded

        where: list[int | None] = []
        at = 0
        targets = []
        for tensor in tensors:
            if tensor is None:
                where.append(None)
                continue
            source = tensor if isinstance(tensor, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tensor))
            nbytes = source.numel() * source.element_size()
            if at + nbytes > room.byte_size:
                where.append(None)
                continue
            target = self.regions.tensor(room.region, room.offset + at, nbytes, "preprocess output")
            target.copy_(source.contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            targets.append(target)
            where.append(room.offset + at)
            at += -(-nbytes // ALIGN) * ALIGN
        devices = {t.device for t in targets if t.is_cuda}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return where

    def _open(self, room: CudaRoom) -> None:
        with self._lock:
            if room.region in self._used:
                self._used.move_to_end(room.region)
                return
        for _ in range(2):
            try:
                self.regions.register(room.region, room.raw_handle, room.device_id, room.region_byte_size)
            except RegionExists:
                pass  # a concurrent call opened it first
            except Overloaded:
                if not self._evict_oldest():
                    raise
                continue
            except InvalidInput as exc:  # a handle CUDA refuses here (another GPU, a stale handle)
                raise CudaUnavailable(str(exc)) from None
            with self._lock:
                self._used[room.region] = None
                self._used.move_to_end(room.region)
            return
        raise CudaUnavailable(f"no room to open CUDA region {quoted(room.region)}")

    def _evict_oldest(self) -> bool:
        with self._lock:
            if not self._used:
                return False
            oldest, _ = self._used.popitem(last=False)
        self.regions.unregister(oldest)
        return True

    def close(self) -> None:
        with self._lock:
            self._used.clear()
        self.regions.unregister()
