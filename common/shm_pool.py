"""The controller's pool of POSIX shared memory: where preprocessed tensors live between stages.

Issue 16: between stages on one host a tensor should not travel through the controller as
bytes. The controller creates one shm object (this pool), registers it with the preprocess stage
(which writes its outputs into it) and with the inference stage (OIP's system shared-memory
extension, which reads the model inputs from it); only offsets and sizes travel over gRPC.

Why one object cut into slots rather than an object per request: creating, registering and
unlinking an object costs syscalls and an RPC per stage, while a slot costs a lock. The object
is bounded (``slots`` x ``slot_bytes``); a request that finds no room gets ``None`` and sends its
tensors inline, never an error.

Safety:
- created ``O_CREAT | O_EXCL | O_NOFOLLOW`` with mode 0600: only this user maps it, and a file
  planted under the name is never opened;
- the name carries 128 random bits (unguessable, so a stage that can open it shares this
  host's /dev/shm: that is the same-host test) and the owner's pid and process start time, so
  a later controller on the same PID namespace unlinks the objects of one that died
  (``reap_orphans``); the object is unlinked when the pool closes.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferline.common import shm

PREFIX = "inferline-"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22): a
    pid alone can be reused, a pid with its start time names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def object_name() -> str:
    """``inferline-<pid>-<start time>-<32 hex>``: owner and 128 unguessable bits."""
    pid = os.getpid()
    return f"{PREFIX}{pid}-{_start_time(pid)}-{secrets.token_hex(16)}"


def owner_alive(name: str) -> bool:
    """Whether the process that created object ``name`` still runs (in this PID namespace)."""
    try:
        pid_text, started, _ = name[len(PREFIX) :].split("-", 2)
        pid = int(pid_text)
    except ValueError:
        return True  # not one of ours: never reaped
    return _start_time(pid) == started != ""


def reap_orphans(root: Path | None = None) -> list[str]:
    """Unlinks the pool objects in ``root`` of this user whose owner process is gone (a
    controller killed with SIGKILL never unlinks its own). Only this PID namespace's processes
    can be checked: in another one a pid means another process, so run it where the controllers
    run (docs/shared-memory.md)."""
    folder = root or shm.SHM_ROOT
    reaped = []
    for entry in os.scandir(folder):
        if not entry.name.startswith(PREFIX) or owner_alive(entry.name):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # another controller reaped it first
        reaped.append(entry.name)
    return reaped


@dataclass(frozen=True)
class Lease:
    """``byte_size`` bytes at ``offset`` of the pool, held by one request slice."""

    offset: int
    byte_size: int


class Slots:
    """Runs of whole slots of ``slot_bytes`` leased first fit: the bookkeeping of the controller's
    pools (this one, and the device pool of common/device_pool.py). Thread-safe."""

    def __init__(self, slots: int, slot_bytes: int):
        if slots <= 0 or slot_bytes <= 0:
            raise ValueError(f"a pool needs slots > 0 and slot_bytes > 0, got {slots} and {slot_bytes}")
        self.slot_bytes = -(-slot_bytes // shm.ALIGN) * shm.ALIGN
        self.slots = slots
        self.byte_size = slots * self.slot_bytes
        self._free = [True] * slots
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Slots leased now."""
        with self._lock:
            return self._free.count(False)

    def acquire(self, byte_size: int) -> tuple[int, int] | None:
        """(offset, bytes) of a run of free slots holding ``byte_size`` bytes, or None."""
        need = max(1, -(-byte_size // self.slot_bytes))
        with self._lock:
            run = 0
            for slot, free in enumerate(self._free):
                run = run + 1 if free else 0
                if run == need:
                    first = slot - need + 1
                    self._free[first : slot + 1] = [False] * need
                    return first * self.slot_bytes, need * self.slot_bytes
        return None

    def release(self, offset: int, byte_size: int) -> None:
        first, count = offset // self.slot_bytes, byte_size // self.slot_bytes
        with self._lock:
            self._free[first : first + count] = [True] * count


class ShmPool:
    """One shm object of ``slots`` x ``slot_bytes``, leased in runs of whole slots.

    Thread-safe: the controller's event loop leases and releases, tests may from any thread.
    """

    def __init__(self, slots: int, slot_bytes: int, root: Path | None = None):
        self._slots = Slots(slots, slot_bytes)
        self.slot_bytes = self._slots.slot_bytes
        self.slots = slots
        self.byte_size = self._slots.byte_size
        self.name = object_name()
        self.path = (root or shm.SHM_ROOT) / self.name
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # Reserves the pages: a /dev/shm too small for the pool (a container's 64 MB
            # default) fails here, not later as SIGBUS in the stage that writes.
            os.posix_fallocate(fd, 0, self.byte_size)
            self._mapping = mmap.mmap(fd, self.byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._base = np.frombuffer(self._mapping, np.uint8)
        self._address = self._base.ctypes.data

    @property
    def key(self) -> str:
        """The name as shm_open and OIP's SystemSharedMemoryRegister take it."""
        return "/" + self.name

    @property
    def in_use(self) -> int:
        """Slots leased now."""
        return self._slots.in_use

    def acquire(self, byte_size: int) -> Lease | None:
        """A run of free slots holding ``byte_size`` bytes (first fit), or None when there is
        none: the caller then sends its tensors inline."""
        run = self._slots.acquire(byte_size)
        return None if run is None else Lease(*run)

    def release(self, lease: Lease) -> None:
        self._slots.release(lease.offset, lease.byte_size)

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only view of a tensor a stage wrote at ``offset`` (no copy); bounds checked."""
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise ValueError(f"{size} bytes at offset {offset} are outside the pool's {self.byte_size}")
        view = self._base[offset : offset + size].view(dtype).reshape(shape)
        view.flags.writeable = False
        return view

    def locate(self, array: np.ndarray) -> int | None:
        """The offset of ``array``'s bytes in the pool when it is a contiguous view of it."""
        if not array.flags.c_contiguous:
            return None
        offset = array.ctypes.data - self._address
        return offset if 0 <= offset and offset + array.nbytes <= self.byte_size else None

    def close(self) -> None:
        """Unlinks the object; the mapping goes when the last view of it does. Idempotent."""
        if self._mapping.closed:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._base = np.zeros(0, np.uint8)
        try:
            self._mapping.close()
        except BufferError:
            pass  # an array still views it: the mapping goes with the last view
