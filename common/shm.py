"""System shared-memory regions a stage maps: OIP's ``system_shared_memory`` extension.

The inference stage serves them over OIP, the preprocess stage writes its outputs into them
(issue 16); the controller's pool (``shm_pool.py``) creates the objects. Triton's semantics,
so that tritonclient's ``shared_memory`` utilities and ``perf_analyzer --shared-memory=system``
work unchanged: the *client* creates a POSIX shared-memory object
(``shm_open``), fills it, and registers it by name with its ``key`` (the shm name, e.g.
``/input0``), an ``offset`` and a ``byte_size``; the stage only maps ``key`` and reads inputs from,
or writes outputs into, ``[offset, offset + byte_size)`` of it. Unregistering unmaps; the object
itself stays the client's to unlink. The stage never creates or unlinks a shm object.

Safety, because the caller names a file this process opens:
- a key is a shm name (``/name`` or ``name``: letters, digits, ``.``, ``_``, ``-``; never ``/``
  inside, never ``.`` or ``..``), opened under /dev/shm with O_NOFOLLOW and required to be a
  regular file: a client cannot map any other file of this host;
- a region lies within its object, and every read or write lies within its region (checked
  before any access), else INVALID_ARGUMENT naming the region, the offset and the size;
- the regions are bounded in count and in mapped bytes (``INFERLINE_SHM_MAX_REGIONS``,
  ``INFERLINE_SHM_MAX_BYTES``), and all are unmapped when the stage stops.

A client that shrinks its object after registering it makes a later access fault (SIGBUS), as
with Triton: the object is the client's, and only a client on this host can register one.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from inferline.common.errors import InvalidInput, ModelNotFound, Overloaded, quoted

SHM_ROOT = Path("/dev/shm")
# Tensors packed into one region start at multiples of this, aligned for any dtype and SIMD loads.
ALIGN = 64
# POSIX shm names as shm_open takes them: one optional leading '/', then one path component.
_KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,255}")


class RegionNotFound(ModelNotFound):
    """No region is registered under that name (NOT_FOUND, as Triton)."""


class RegionExists(InvalidInput):
    """A region of that name is already registered. Triton answers ALREADY_EXISTS; the status
    table has no row for it, so this is INVALID_ARGUMENT (the request is what must change)."""


class ObjectMissing(InvalidInput):
    """The shm object is not in this process's /dev/shm: the caller is on another host or in a
    pod with its own /dev/shm, and must send its tensors inline."""


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass
class _Region:
    status: RegionStatus
    mapping: mmap.mmap = field(repr=False)

    def view(self, offset: int, byte_size: int, what: str) -> memoryview:
        name = self.status.name
        if offset < 0 or byte_size < 0 or offset + byte_size > self.status.byte_size:
            raise InvalidInput(
                f"{what}: {byte_size} bytes at offset {offset} of shared memory region {quoted(name)} "
                f"are outside it (it has {self.status.byte_size} bytes)"
            )
        start = self.status.offset + offset
        return memoryview(self.mapping)[start : start + byte_size]

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            # An inference still holds a view of it: the mapping goes with the last view.
            pass


def check_key(key: str) -> Path:
    """The /dev/shm path of a shm name, or InvalidInput: never a path outside /dev/shm."""
    if not _KEY.fullmatch(key) or key.lstrip("/") in (".", ".."):
        raise InvalidInput(
            f"shared memory key {quoted(key)} is not a POSIX shm name: give the name passed to shm_open, "
            "e.g. '/input0' (letters, digits, '.', '_', '-', and one optional leading '/')"
        )
    return SHM_ROOT / key.lstrip("/")


class _Sized(Protocol):
    @property
    def byte_size(self) -> int: ...


class _Held(Protocol):
    @property
    def status(self) -> _Sized: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=_Held)


class RegionTable(Generic[R]):
    """Regions by name under one lock, with Triton's semantics shared by the system and the CUDA
    registries: bounded count and bytes, status of one or all, idempotent unregister. Subclasses
    name their kind, RPCs and settings (in messages) and say how a region is registered."""

    KIND = "shared memory"
    RPC = "SystemSharedMemory"
    SETTING = "INFERLINE_SHM"

    def __init__(self, max_regions: int, max_bytes: int):
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._regions: dict[str, R] = {}
        self._lock = threading.Lock()

    def status(self, name: str = "") -> list[Any]:
        """Every region, or the one named (RegionNotFound when it is not registered)."""
        with self._lock:
            if not name:
                return [r.status for r in self._regions.values()]
            return [self._get(name).status]

    def unregister(self, name: str = "") -> None:
        """Releases the region named, or every region when ``name`` is empty. As Triton, a name
        that is not registered is no error: unregistering is idempotent."""
        with self._lock:
            for each in [name] if name else list(self._regions):
                region = self._regions.pop(each, None)
                if region is not None:
                    region.close()

    def close(self) -> None:
        """Releases everything: the stage is stopping."""
        self.unregister()

    def _check_room(self, byte_size: int) -> None:
        """Refuses (RESOURCE_EXHAUSTED) a register that would pass the bounds, naming the setting."""
        if len(self._regions) >= self.max_regions:
            raise Overloaded(
                f"{len(self._regions)} {self.KIND} regions are registered, the limit "
                f"({self.SETTING}_MAX_REGIONS); unregister some first"
            )
        mapped = sum(r.status.byte_size for r in self._regions.values())
        if mapped + byte_size > self.max_bytes:
            raise Overloaded(
                f"registering {byte_size} bytes would map {mapped + byte_size} bytes of {self.KIND}, over "
                f"the limit of {self.max_bytes} ({self.SETTING}_MAX_BYTES); unregister regions first"
            )

    def _get(self, name: str) -> R:
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(
                f"no {self.KIND} region {quoted(name)} is registered; register it first "
                f"({self.RPC}Register) or see {self.RPC}Status"
            )
        return region


class SharedMemoryRegistry(RegionTable[_Region]):
    """Registered regions by name; every method is safe to call from any thread."""

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Maps ``byte_size`` bytes of shm object ``key`` from ``offset`` as region ``name``."""
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        path = check_key(key)
        if byte_size <= 0 or offset < 0:
            raise InvalidInput(
                f"shared memory region {quoted(name)}: byte_size must be > 0 and offset >= 0, "
                f"got byte_size {byte_size} and offset {offset}"
            )
        with self._lock:
            if name in self._regions:
                raise RegionExists(
                    f"shared memory region {quoted(name)} is already registered; "
                    "unregister it first or use another name"
                )
            self._check_room(byte_size)
            mapping = _map(path, key, offset, byte_size)
            self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), mapping)

    def attach(self, key: str) -> None:
        """Maps all of object ``key`` as region ``key`` unless it is mapped already: how the
        preprocess stage takes the controller's pool, with no register call to lose when either
        side restarts. Before mapping a new object it unmaps the attached ones whose object is
        gone from /dev/shm (their controller stopped, or died and was reaped), so a stage keeps
        no memory of a controller that is no more."""
        with self._lock:
            if key in self._regions:
                return
            gone = [n for n, r in self._regions.items() if n == r.status.key and not check_key(n).exists()]
        path = check_key(key)
        for name in gone:
            self.unregister(name)
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except FileNotFoundError:
            raise ObjectMissing(
                f"no shared memory object {quoted(key)} exists in this stage's /dev/shm (another host or pod?)"
            ) from None
        try:
            self.register(key, key, 0, size)
        except RegionExists:
            pass  # another request attached it meanwhile

    def read(self, name: str, offset: int, byte_size: int, what: str) -> memoryview:
        """A read-only view of ``byte_size`` bytes at ``offset`` of region ``name`` (no copy)."""
        with self._lock:
            return self._get(name).view(offset, byte_size, what).toreadonly()

    def writable(self, name: str, offset: int, byte_size: int, what: str) -> memoryview:
        """A writable view of ``byte_size`` bytes at ``offset`` of region ``name``."""
        with self._lock:
            return self._get(name).view(offset, byte_size, what)


def _map(path: Path, key: str, offset: int, byte_size: int) -> mmap.mmap:
    """The object mapped from 0 to ``offset + byte_size`` (mmap offsets must be page-aligned)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ObjectMissing(
            f"no shared memory object {quoted(key)} exists on this host; create it (shm_open) before registering"
        ) from None
    except OSError as exc:
        raise InvalidInput(f"shared memory object {quoted(key)} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"shared memory key {quoted(key)} is not a shared memory object")
        if offset + byte_size > info.st_size:
            raise InvalidInput(
                f"shared memory object {quoted(key)} has {info.st_size} bytes: a region of {byte_size} bytes at "
                f"offset {offset} does not fit in it"
            )
        return mmap.mmap(fd, offset + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
