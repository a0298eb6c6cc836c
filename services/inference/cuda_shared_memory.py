"""CUDA shared-memory regions of the inference stage: OIP's ``cuda_shared_memory`` extension.

Triton's semantics, so that ``tritonclient.utils.cuda_shared_memory`` and ``perf_analyzer
--shared-memory=cuda`` work unchanged: the *client* allocates device memory (``cudaMalloc``),
exports it (``cudaIpcGetMemHandle``) and registers the handle's 64 bytes as ``raw_handle`` with
the ``device_id`` it lives on and its ``byte_size``; the stage opens the handle
(``cudaIpcOpenMemHandle``) and reads inputs from, or writes outputs into, ``[offset, offset +
byte_size)`` of it. Unregistering closes the handle; the memory stays the client's to free.

A region is a flat ``uint8`` torch tensor on its device, so the same code runs on CPU tensors
standing in for device memory (an ``IpcOpener`` other than CUDA's, in the tests). Without CUDA
there is no opener and registering says why (the servicer answers UNIMPLEMENTED).

Safety: a handle is exactly 64 bytes and the device one this process sees; regions are bounded
in count and bytes (``INFERLINE_CUDA_SHM_MAX_REGIONS``/``_MAX_BYTES``); every read or write is
checked to lie within its region before the device is touched (INVALID_ARGUMENT otherwise).
Unlike Triton, a region claimed larger than the allocation behind its handle is refused at
register (``cuMemGetAddressRange``): a read past an allocation faults this process's CUDA context.
"""

from __future__ import annotations

import numpy as np

from inferline.common.cuda_regions import CudaIpcOpener, CudaShmRegistry, IpcOpener, OpenedRegion, RegionTensor
from inferline.common.errors import InvalidInput, quoted
from inferline.common.shm import SharedMemoryRegistry

# The table itself is common (the preprocess stage keeps one too); these names stay importable here.
__all__ = ["CudaIpcOpener", "CudaShmRegistry", "IpcOpener", "OpenedRegion", "SharedRegions"]


class SharedRegions:
    """System and CUDA regions as one namespace, as Triton has it: a request's
    ``shared_memory_region`` names either kind, and reads and writes go to the right one."""

    def __init__(self, system: SharedMemoryRegistry, cuda: CudaShmRegistry):
        self.system = system
        self.cuda = cuda

    def check(self, name: str) -> None:
        """RegionNotFound unless ``name`` is registered (before the model runs)."""
        if not self.cuda.has(name):
            self.system.status(name)

    def input(
        self, name: str, offset: int, byte_size: int, what: str, dtype: np.dtype, shape: tuple[int, ...]
    ) -> memoryview | RegionTensor:
        """An input by reference: the bytes of a system region (a view of its mapping), or a
        CUDA region's tensor left on its device (the backend copies it there, or to the host)."""
        if self.cuda.has(name):
            return self.cuda.typed(name, offset, byte_size, what, dtype, shape)
        return self.system.read(name, offset, byte_size, what)

    def write(self, name: str, offset: int, byte_size: int, array: np.ndarray, what: str) -> None:
        """Puts ``array`` at ``offset`` of region ``name``; ``byte_size`` is what the request reserved."""
        if self.cuda.has(name):
            self.cuda.write(name, offset, byte_size, array, what)
            return
        if array.nbytes > byte_size:
            raise InvalidInput(
                f"{what} has {array.nbytes} bytes (shape {list(array.shape)}), more than the {byte_size} "
                f"reserved in shared memory region {quoted(name)}; give a larger region"
            )
        view = self.system.writable(name, offset, array.nbytes, what)
        target = np.frombuffer(view, dtype=array.dtype.newbyteorder("<")).reshape(array.shape)
        np.copyto(target, array)
