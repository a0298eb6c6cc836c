"""Registered CUDA regions: another process's device memory, opened once by its IPC handle.

The one table both stages that read or write another process's device memory keep (issue 16):
the inference stage's OIP ``cuda_shared_memory`` extension (the client's regions, Triton's
semantics: services/inference/cuda_shared_memory.py) and the preprocess stage's outputs into the
controller's device pool (services/preprocess/device_outputs.py). A region is a flat ``uint8``
torch tensor on its device, so the same code runs on CPU tensors standing in for device memory
(an ``IpcOpener`` other than CUDA's, in the tests). Without CUDA there is no opener and
registering says why (CudaUnavailable).

Safety: a handle is exactly 64 bytes and the device one this process sees; regions are bounded
in count and bytes; every view is checked to lie within its region before the device is
touched (INVALID_ARGUMENT otherwise); a region claimed larger than the allocation behind its
handle is refused at register (``cuMemGetAddressRange``, common/cuda_ipc.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from inferline.common.cuda_ipc import IPC_HANDLE_BYTES, check_available, open_exported
from inferline.common.errors import InvalidInput, quoted
from inferline.common.shm import RegionExists, RegionTable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CudaRegionStatus:
    name: str
    device_id: int
    byte_size: int


@dataclass(frozen=True)
class OpenedRegion:
    """An opened handle: its memory as a flat uint8 tensor, and how to close it."""

    tensor: torch.Tensor
    close: Callable[[], None]


@dataclass(frozen=True)
class RegionTensor:
    """A typed tensor that lies in a CUDA region: the inference stage's input read by handle.

    It stays where it is: ``torch()`` is a typed view on its device, which a backend that takes
    device tensors feeds the model from (``stack_on_device``), so a tensor the preprocess stage
    wrote on the GPU reaches the model without a trip through the host. ``np.asarray`` of it is
    a host copy, for a backend that takes only numpy. Indexing the first dimension gives one
    item (``split_batch``), still in the region."""

    data: torch.Tensor  # flat uint8, exactly this tensor's bytes
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> RegionTensor:
        if not isinstance(index, int) or not self.shape:
            raise TypeError("a region tensor is indexed by one integer along its first dimension")
        if not -self.shape[0] <= index < self.shape[0]:
            raise IndexError(f"index {index} is outside the first dimension of size {self.shape[0]}")
        item = math.prod(self.shape[1:]) * self.dtype.itemsize
        start = (index % self.shape[0]) * item
        return RegionTensor(self.data[start : start + item], self.dtype, self.shape[1:])

    def torch(self) -> torch.Tensor:
        """The tensor on its device, typed and shaped: a view of the region, no copy."""
        return self.data.view(_torch_dtype(self.dtype)).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        host = self.data.cpu().numpy().view(self.dtype).reshape(self.shape)
        return host if dtype is None else host.astype(dtype)


@functools.cache
def _torch_dtype(dtype: np.dtype) -> Any:
    import torch  # noqa: PLC0415 - a region exists, so torch is already loaded

    try:
        # The tensor's own byte order: OIP's raw tensors are little-endian, as is every GPU.
        return torch.from_numpy(np.empty(0, dtype.newbyteorder("="))).dtype
    except TypeError:
        raise InvalidInput(f"a tensor of {dtype} cannot be read from a CUDA region on its device") from None


def stack_on_device(arrays: Sequence[Any]) -> torch.Tensor | None:
    """One batch on the device when every item lies in a CUDA region, else None (the caller
    stacks on the host). The stack is a copy: the batch no longer depends on the region."""
    if not arrays or not all(isinstance(a, RegionTensor) for a in arrays):
        return None
    import torch  # noqa: PLC0415 - a region exists, so torch is already loaded

    views = [a.torch() for a in arrays]
    if len({v.device for v in views}) != 1:
        return None
    return torch.stack(views)


class IpcOpener(Protocol):
    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> OpenedRegion: ...


@dataclass
class _Region:
    status: CudaRegionStatus
    opened: OpenedRegion = field(repr=False)

    def view(self, offset: int, byte_size: int, what: str) -> torch.Tensor:
        if offset < 0 or byte_size < 0 or offset + byte_size > self.status.byte_size:
            raise InvalidInput(
                f"{what}: {byte_size} bytes at offset {offset} of CUDA shared memory region "
                f"{quoted(self.status.name)} are outside it (it has {self.status.byte_size} bytes)"
            )
        return self.opened.tensor[offset : offset + byte_size]

    def close(self) -> None:
        self.opened.close()


class CudaShmRegistry(RegionTable[_Region]):
    """Registered CUDA regions by name; every method is safe to call from any thread.

    ``taken`` says whether a name is already a region of another kind (system shared memory):
    Triton keeps one namespace for both, so a request's ``shared_memory_region`` is unambiguous.
    """

    KIND = "CUDA shared memory"
    RPC = "CudaSharedMemory"
    SETTING = "INFERLINE_CUDA_SHM"

    def __init__(
        self,
        max_regions: int,
        max_bytes: int,
        opener: Callable[[], IpcOpener] | None = None,
        taken: Callable[[str], bool] = lambda name: False,
    ):
        super().__init__(max_regions, max_bytes)
        # Built on the first Register, not here: importing torch and cuda-python costs a stage
        # that never sees a CUDA region (an ONNX Runtime one on CPU) seconds and hundreds of MB.
        self._make_opener = opener
        self._opener: IpcOpener | None = None
        self._taken = taken

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._regions

    def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Opens the handle as region ``name``; refused before CUDA is called when it cannot fit.
        CudaUnavailable first, whatever the request: without CUDA nothing else can be said."""
        with self._lock:
            if self._opener is None:
                self._opener = (self._make_opener or CudaIpcOpener)()
            opener = self._opener
        if not name:
            raise InvalidInput("a CUDA shared memory region needs a name")
        if len(raw_handle) != IPC_HANDLE_BYTES:
            raise InvalidInput(
                f"CUDA shared memory region {quoted(name)}: raw_handle has {len(raw_handle)} bytes, a "
                f"cudaIpcMemHandle_t has {IPC_HANDLE_BYTES}; send the bytes cudaIpcGetMemHandle returned"
            )
        if byte_size <= 0 or device_id < 0:
            raise InvalidInput(
                f"CUDA shared memory region {quoted(name)}: byte_size must be > 0 and device_id >= 0, "
                f"got byte_size {byte_size} and device_id {device_id}"
            )
        with self._lock:
            if name in self._regions or self._taken(name):
                raise RegionExists(
                    f"shared memory region {quoted(name)} is already registered; "
                    "unregister it first or use another name"
                )
            self._check_room(byte_size)
            opened = opener.open(raw_handle, device_id, byte_size)
            self._regions[name] = _Region(CudaRegionStatus(name, device_id, byte_size), opened)

    def tensor(self, name: str, offset: int, byte_size: int, what: str) -> torch.Tensor:
        """``byte_size`` bytes at ``offset`` of region ``name`` as a uint8 tensor on its device (no copy)."""
        with self._lock:
            return self._get(name).view(offset, byte_size, what)

    def typed(
        self, name: str, offset: int, byte_size: int, what: str, dtype: np.dtype, shape: Sequence[int]
    ) -> RegionTensor:
        """An input of ``dtype`` and ``shape`` at ``offset`` of region ``name``, left on its device;
        ``byte_size`` must be exactly its size (the caller checks it against the request)."""
        _torch_dtype(np.dtype(dtype))  # refused now, not when its batch is stacked
        return RegionTensor(self.tensor(name, offset, byte_size, what), np.dtype(dtype), tuple(shape))

    def read(self, name: str, offset: int, byte_size: int, what: str) -> memoryview:
        """The bytes copied to the host."""
        device = self.tensor(name, offset, byte_size, what)
        return device.cpu().numpy().data

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray, what: str) -> None:
        """Copies ``array`` into the region and waits for the copy, so the client reads it after
        the response. ``byte_size`` is what the request reserved: a larger array is refused."""
        if array.nbytes > byte_size:
            raise InvalidInput(
                f"{what} has {array.nbytes} bytes (shape {list(array.shape)}), more than the {byte_size} "
                f"reserved in CUDA shared memory region {quoted(name)}; give a larger region"
            )
        import torch  # noqa: PLC0415 - a region exists, so torch is already loaded

        target = self.tensor(name, offset, array.nbytes, what)
        source = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        target.copy_(torch.from_numpy(source))
        if target.is_cuda:
            torch.cuda.synchronize(target.device)



class CudaIpcOpener:
    """Opens handles with ``cudaIpcOpenMemHandle`` (common/cuda_ipc.py)."""

    def __init__(self) -> None:
        check_available()

    def open(self, raw_handle: bytes, device_id: int, byte_size: int) -> OpenedRegion:
        try:
            return OpenedRegion(*open_exported(raw_handle, device_id, byte_size))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
